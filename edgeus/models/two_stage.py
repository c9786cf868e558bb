"""Two-stage breast-ultrasound classifier (Long et al.): a U-Net segments the lesion, then a CNN
classifies ``[image, mask, mask]``.

U-Net (the paper's tuned layout): 5 encoder blocks of two 3x3 conv + BN + ReLU, each of the first
four followed by 2x2 max-pooling and dropout (0.1); 4 decoder blocks of a 3x3 transposed conv
(stride 2), concatenation with the encoder skip, dropout and two 3x3 conv + BN + ReLU; a 1x1 conv
with a sigmoid gives the lesion mask. Channels ``unet_base * 2^i`` (16..256 at width 1).

Classifier: any zoo model (``classifier``, default ``resnet50`` standing in for the paper's
DenseNet-201) with ``in_chans + 2`` input channels: the image and the predicted mask twice. The mask
is detached, so the classification loss does not train the segmenter; the segmenter is trained by
``auxiliary_loss(batch)`` (BCE + Dice on the samples whose ``has_mask`` is true), which the training
loop adds to the cross-entropy. With a 1-channel image the classifier sees 3 channels, so
torchvision ImageNet weights load into it unchanged (``pretrained_target = "classifier"``).

``forward(x)`` returns class logits only (ONNX export and every compression stage see a plain
classifier) and keeps the mask logits of that pass in ``self.last_mask_logits``;
``segment(x)`` returns mask probabilities; ``WithMask(model)`` returns both from one pass (an ONNX
graph with the mask as a second output). ``two_stage_published`` (below) is seed 001 as published:
the U-Net trained first, then a frozen DenseNet-201 with 3 x FC-64.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeus.models.layers import make_divisible
from edgeus.models.registry import create_model, register_model


def _double_conv(inp: int, out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(inp, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
        nn.Conv2d(out, out, 3, padding=1, bias=False), nn.BatchNorm2d(out), nn.ReLU(inplace=True),
    )


class UNet(nn.Module):
    """U-Net with 5 encoder blocks (4 poolings) and 4 transposed-conv decoder blocks; returns mask logits."""

    def __init__(self, in_chans: int = 1, base: int = 16, depth: int = 5, dropout: float = 0.1):
        super().__init__()
        chans = [base * 2 ** i for i in range(depth)]
        self.enc = nn.ModuleList()
        prev = in_chans
        for c in chans:
            self.enc.append(_double_conv(prev, c))
            prev = c
        self.pool = nn.MaxPool2d(2)
        self.drop = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.ModuleList()
        self.dec = nn.ModuleList()
        for c in reversed(chans[:-1]):
            self.up.append(nn.ConvTranspose2d(prev, c, 3, stride=2, padding=1, output_padding=1))
            self.dec.append(_double_conv(2 * c, c))
            prev = c
        self.head = nn.Conv2d(prev, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.enc):
            x = block(x)
            if i < len(self.enc) - 1:
                skips.append(x)
                x = self.drop(self.pool(x))
        for up, dec, skip in zip(self.up, self.dec, reversed(skips)):
            x = up(x)
            if x.shape[-2:] != skip.shape[-2:]:  # sizes not divisible by 16: match the skip
                x = F.interpolate(x, size=skip.shape[-2:], mode="bilinear", align_corners=False)
            x = dec(self.drop(torch.cat([x, skip], dim=1)))
        return self.head(x)


def dice_loss(logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0) -> torch.Tensor:
    p = torch.sigmoid(logits).flatten(1)
    t = target.flatten(1)
    inter = (p * t).sum(1)
    return (1.0 - (2 * inter + eps) / (p.sum(1) + t.sum(1) + eps)).mean()


class TwoStage(nn.Module):
    pretrained_target = "classifier"

    def __init__(self, num_classes: int = 3, in_chans: int = 1, width: float = 1.0, classifier: str = "resnet50",
                 unet_base: int = 16, unet_dropout: float = 0.1, seg_weight: float = 1.0,
                 classifier_kwargs: dict | None = None):
        super().__init__()
        base = make_divisible(unet_base * width, 4, min_value=4)
        self.segmenter = UNet(in_chans, base, 5, unet_dropout)
        self.classifier = create_model(classifier, num_classes=num_classes, in_chans=in_chans + 2, width=width,
                                       **dict(classifier_kwargs or {}))
        self.seg_weight = float(seg_weight)
        self.last_mask_logits: torch.Tensor | None = None

    def __getstate__(self):  # deepcopy / pickle: drop the cached (graph-holding) mask logits
        state = self.__dict__.copy()
        state["last_mask_logits"] = None
        return state

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Lesion mask probabilities [B, 1, H, W]."""
        return torch.sigmoid(self.segmenter(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mask_logits = self.segmenter(x)
        self.last_mask_logits = mask_logits
        mask = torch.sigmoid(mask_logits).detach()
        return self.classifier(torch.cat([x, mask, mask], dim=1))

    def auxiliary_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """``{"seg": seg_weight * (BCE + Dice)}`` of the last forward's masks, on samples with a mask."""
        logits = self.last_mask_logits
        if logits is None:
            raise RuntimeError("two_stage.auxiliary_loss needs a forward pass first")
        has = batch["has_mask"].to(logits.device).bool()
        if not bool(has.any()):
            return {"seg": logits.sum() * 0.0}
        lg = logits[has]
        target = batch["mask"].to(logits.device)[has].to(lg.dtype)
        if target.shape[-2:] != lg.shape[-2:]:
            target = F.interpolate(target, size=lg.shape[-2:], mode="nearest")
        loss = F.binary_cross_entropy_with_logits(lg, target) + dice_loss(lg, target)
        return {"seg": self.seg_weight * loss}


class WithMask(nn.Module):
    """``(logits, mask probabilities)`` of a two-stage model in one pass, for an ONNX graph with the mask as a
    second output (``output_names=["logits", "mask"]``) that firmware can show beside the class.

    One U-Net pass: the mask the classifier saw is the mask returned."""

    def __init__(self, model: nn.Module):
        super().__init__()
        if getattr(model, "segmenter", None) is None:
            raise ValueError(f"{type(model).__name__} has no segmenter: nothing to return as a mask")
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.model(x)
        return logits, torch.sigmoid(self.model.last_mask_logits)


@register_model
def two_stage(num_classes: int = 3, in_chans: int = 1, width: float = 1.0, classifier: str = "resnet50",
              unet_base: int = 16, unet_dropout: float = 0.1, seg_weight: float = 1.0,
              classifier_kwargs: dict | None = None) -> nn.Module:
    """U-Net segmenter, then a classifier on [image, mask, mask]."""
    if classifier == "two_stage":
        raise ValueError("two_stage cannot use itself as its classifier")
    return TwoStage(num_classes, in_chans, width, classifier, unet_base, unet_dropout, seg_weight, classifier_kwargs)


# ---------------------------------------------------------------------------------------------
# seed 001 as published: the U-Net trained first, then a frozen DenseNet-201 with a 3 x FC-64 head


class _Stage2Head(nn.Sequential):
    """``layers`` x (Linear -> ``units``, ReLU), dropout, Linear -> classes (seed 001: 3 x 64, 0.05)."""

    def __init__(self, in_features: int, num_classes: int, units: int = 64, layers: int = 3, dropout: float = 0.05):
        mods: list[nn.Module] = []
        n = in_features
        for _ in range(layers):
            mods += [nn.Linear(n, units), nn.ReLU(inplace=True)]
            n = units
        mods += [nn.Dropout(dropout), nn.Linear(n, num_classes)]
        super().__init__(*mods)


INPUTS = ("predicted", "image", "ground_truth")


class GroundTruthInput:
    """A data loader whose batches carry the ground-truth mask as one more ``image`` channel (last), for
    ``two_stage_published`` with ``inputs="ground_truth"`` (the paper's image + ground-truth-mask row).
    Everything else (``dataset``, ``sampler``, ``generator``, ``len``) is the wrapped loader's, so
    ``edgeus.train.trainer.fit`` trains and validates through it unchanged."""

    def __init__(self, loader):
        self.__dict__["loader"] = loader

    def __getattr__(self, name):
        return getattr(self.__dict__["loader"], name)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for b in self.loader:
            yield {**b, "image": torch.cat([b["image"], b["mask"].to(b["image"].dtype)], dim=1)}


def ground_truth_loaders(loaders: dict) -> dict:
    """``{split: GroundTruthInput(loader)}``: an oracle ablation (masks drawn by hand are not there at
    inference): ``fit(Supervised(model), ground_truth_loaders(loaders), ...)``."""
    return {k: GroundTruthInput(v) for k, v in loaders.items()}


class TwoStagePublished(nn.Module):
    """Seed 001's two-stage classifier as the paper trains it (``two_stage_published``).

    Stage 1, a U-Net (the same layout as ``two_stage``), is trained first and on its own:
    :meth:`train_first` (BCE on the images with a mask, Adam, ``seg_epochs`` epochs at ``seg_lr``, the
    epoch with the lowest validation BCE kept), which ``edgeus.train.run.train_model`` calls before the
    classifier is trained. Afterwards the U-Net is frozen and always runs in inference mode.

    Stage 2 classifies ``[image, predicted mask, predicted mask]`` (``inputs="predicted"``),
    ``[image, image, image]`` (``inputs="image"``: the paper's images-only row; no U-Net at all) or
    ``[image, true mask, true mask]`` (``inputs="ground_truth"``: the oracle row; no U-Net; the mask comes
    as the last input channel, through :func:`ground_truth_loaders`, so this variant is for the ablation
    only: the compress stages feed images alone) with a
    zoo model (``classifier``, default ``densenet201``; torchvision's ImageNet file loads into it with
    ``model.pretrained=``) whose last linear layer is replaced by ``head_layers`` x FC-``head_units``
    with ReLU, a dropout of ``head_dropout`` and the output layer. ``freeze_features`` (the paper's
    non-trainable convolutional layers) trains the head only, with the backbone's BatchNorm in
    inference mode. Features are globally average-pooled before the head (the paper's Keras model
    flattens DenseNet's output; pooling keeps the head independent of the input size).

    ``forward(x)`` returns class logits (ONNX export and the compression stages see a plain
    classifier); ``segment(x)`` returns mask probabilities.
    """

    pretrained_target = "classifier"

    def __init__(self, num_classes: int = 3, in_chans: int = 1, width: float = 1.0, classifier: str = "densenet201",
                 inputs: str = "predicted", freeze_features: bool = True, head_units: int = 64, head_layers: int = 3,
                 head_dropout: float = 0.05, unet_base: int = 16, unet_dropout: float = 0.1, seg_epochs: int = 50,
                 seg_lr: float = 1e-3, classifier_kwargs: dict | None = None):
        super().__init__()
        if inputs not in INPUTS:
            raise ValueError(f"two_stage_published inputs must be one of {', '.join(INPUTS)}, not {inputs!r}")
        if classifier in ("two_stage", "two_stage_published"):
            raise ValueError(f"two_stage_published cannot use {classifier} as its classifier")
        self.inputs = inputs
        self.in_chans = int(in_chans)
        self.seg_epochs, self.seg_lr = int(seg_epochs), float(seg_lr)
        self.freeze_features = bool(freeze_features)
        self.last_mask_logits: torch.Tensor | None = None
        if inputs in ("image", "ground_truth"):
            self.segmenter = None
        else:
            base = make_divisible(unet_base * width, 4, min_value=4)
            self.segmenter = UNet(in_chans, base, 5, unet_dropout)   # trained by train_first only
        self.classifier = create_model(classifier, num_classes=num_classes, in_chans=in_chans + 2, width=width,
                                       **dict(classifier_kwargs or {}))
        head_name = [n for n, m in self.classifier.named_modules() if isinstance(m, nn.Linear)][-1]
        old = self.classifier.get_submodule(head_name)
        parent, _, leaf = head_name.rpartition(".")
        setattr(self.classifier.get_submodule(parent) if parent else self.classifier, leaf,
                _Stage2Head(old.in_features, num_classes, int(head_units), int(head_layers), float(head_dropout)))
        self.head_name = head_name
        # the head is new: a torchvision file's own head is reported, not loaded
        self.classifier.pretrained_rebuilt_prefixes = (
            *getattr(self.classifier, "pretrained_rebuilt_prefixes", ()), f"{head_name}.")
        self._freeze()

    def _freeze(self) -> None:
        """The U-Net (trained by :meth:`train_first` only) and, with ``freeze_features``, the backbone do not
        train. Applied again by :meth:`train`: pruning replaces parameters with new, trainable ones."""
        if self.segmenter is not None:
            for p in self.segmenter.parameters():
                p.requires_grad_(False)
        if self.freeze_features:
            head_params = {id(p) for p in self.classifier.get_submodule(self.head_name).parameters()}
            for p in self.classifier.parameters():
                if id(p) not in head_params:
                    p.requires_grad_(False)

    def __getstate__(self):  # deepcopy / pickle: drop the cached (possibly graph-holding) mask logits
        state = self.__dict__.copy()
        state["last_mask_logits"] = None
        return state

    def train(self, mode: bool = True):
        super().train(mode)
        if getattr(self, "_stage1", False):          # train_first is training the U-Net
            return self
        self._freeze()
        if self.segmenter is not None:
            self.segmenter.eval()                    # stage 1 is done: inference mode (BN statistics, no dropout)
        if self.freeze_features:                     # Keras' non-trainable layers: BN in inference mode
            for m in self.classifier.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def segment(self, x: torch.Tensor) -> torch.Tensor:
        """Mask probabilities [B, 1, H, W] (``inputs="image"`` has no segmenter)."""
        if self.segmenter is None:
            raise RuntimeError(f"two_stage_published with inputs={self.inputs} has no segmenter")
        return torch.sigmoid(self.segmenter(x))

    def stage2_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.inputs == "ground_truth":
            if x.shape[1] != self.in_chans + 1:
                raise ValueError(f"two_stage_published inputs=ground_truth takes the image ({self.in_chans} "
                                 f"channel(s)) and its mask as one more channel, got {x.shape[1]} channel(s): "
                                 "wrap the loaders with edgeus.models.two_stage.ground_truth_loaders")
            img, gt = x[:, :-1], x[:, -1:]
            return torch.cat([img, gt, gt], dim=1)
        if self.inputs == "image":
            g = x[:, :1]
            return torch.cat([x, g, g], dim=1)
        logits = self.segmenter(x)       # frozen: no graph is kept unless the pruner traces the model
        self.last_mask_logits = logits   # the pruner traces it as an output, so the U-Net is pruned too
        mask = torch.sigmoid(logits).detach()
        return torch.cat([x, mask, mask], dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.stage2_input(x))

    def train_first(self, loaders: dict, *, device: str = "cpu", out_dir=None, log=None) -> dict:
        """Stage 1: train the U-Net alone (BCE on images with a mask, Adam at ``seg_lr``, ``seg_epochs``
        epochs), keep the epoch with the lowest validation BCE, freeze it. With ``out_dir`` the result is
        kept in ``<out_dir>/segmenter.pt`` and reused (a resumed run does not train it again).
        Returns ``{"epochs", "best_epoch", "val_bce", "history", "reused"}``."""
        from pathlib import Path

        if self.segmenter is None:
            return {"epochs": 0, "note": f"inputs={self.inputs}: no segmenter"}
        seg = self.segmenter
        path = Path(out_dir) / "segmenter.pt" if out_dir else None
        if path is not None and path.is_file():
            seg.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            seg.to(device).eval()
            return {"epochs": self.seg_epochs, "reused": str(path)}

        def masked_batches(loader):
            for batch in loader:
                has = batch["has_mask"].bool()
                if bool(has.any()):
                    yield batch["image"][has].to(device), batch["mask"][has].to(device).float()

        if not any(bool(b["has_mask"].any()) for b in loaders["train_plain"]):
            raise ValueError("two_stage_published trains its U-Net on lesion masks; the training split has none")
        seg.to(device)
        params = list(seg.parameters())
        self._stage1 = True
        for p in params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(params, lr=self.seg_lr)
        best, best_state, best_epoch, history = float("inf"), None, 0, []
        try:
            for epoch in range(self.seg_epochs):
                seg.train()
                total, n = 0.0, 0
                for x, m in masked_batches(loaders["train"]):
                    loss = F.binary_cross_entropy_with_logits(seg(x), m)
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    total, n = total + float(loss.detach()) * len(x), n + len(x)
                seg.eval()
                vt, vn = 0.0, 0
                with torch.no_grad():
                    for x, m in masked_batches(loaders["val"]):
                        bce = F.binary_cross_entropy_with_logits(seg(x), m, reduction="sum") / m[0].numel()
                        vt, vn = vt + float(bce), vn + len(x)
                val = vt / vn if vn else total / max(n, 1)
                history.append({"epoch": epoch + 1, "train_bce": total / max(n, 1), "val_bce": val})
                if val < best:
                    best, best_epoch = val, epoch + 1
                    best_state = {k: v.detach().cpu().clone() for k, v in seg.state_dict().items()}
                if log is not None:
                    log.info("U-Net epoch %d/%d  train BCE %.4f  val BCE %.4f", epoch + 1, self.seg_epochs,
                             history[-1]["train_bce"], val)
        finally:
            self._stage1 = False
            for p in params:
                p.requires_grad_(False)
        if best_state is not None:
            seg.load_state_dict(best_state)
        seg.eval()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            torch.save({k: v.cpu() for k, v in seg.state_dict().items()}, path)
        return {"epochs": self.seg_epochs, "best_epoch": best_epoch, "val_bce": best, "history": history,
                "reused": None}


@register_model
def two_stage_published(num_classes: int = 3, in_chans: int = 1, width: float = 1.0, classifier: str = "densenet201",
                        inputs: str = "predicted", freeze_features: bool = True, head_units: int = 64,
                        head_layers: int = 3, head_dropout: float = 0.05, unet_base: int = 16,
                        unet_dropout: float = 0.1, seg_epochs: int = 50, seg_lr: float = 1e-3,
                        classifier_kwargs: dict | None = None) -> nn.Module:
    """Seed 001 as published: U-Net trained first, then frozen DenseNet-201 + 3 x FC-64 on [image, mask, mask]."""
    return TwoStagePublished(num_classes, in_chans, width, classifier, inputs, freeze_features, head_units,
                             head_layers, head_dropout, unet_base, unet_dropout, seg_epochs, seg_lr, classifier_kwargs)
