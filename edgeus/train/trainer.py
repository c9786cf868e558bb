"""Training loop shared by teacher training, distillation and every fine-tuning step.

``fit`` trains any *trainable* with the mdistiller shape: ``.student`` (the model that is
evaluated and saved) and ``.forward_train(batch) -> (logits, {loss_name: tensor})``; the losses
are summed. :class:`Supervised` is the plain (weighted cross-entropy) trainable; the distillers
in :mod:`edgeus.distill` have the same shape. Fine-tuning with a teacher is composed one level up,
in :mod:`edgeus.finetune` (this package does not import :mod:`edgeus.distill`).
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from edgeus.config import SELECT_CHOICES as SELECT
from edgeus.evaluate import compute_metrics, predict_torch
from edgeus.train import distributed as D
from edgeus.train.checkpoint import atomic_save, save_checkpoint

log = logging.getLogger("edgeus.train")


class Supervised(nn.Module):
    """Weighted cross-entropy on the model's logits, plus the model's own auxiliary losses
    (``model.auxiliary_loss(batch)``, e.g. the two-stage network's segmentation loss)."""

    def __init__(self, model: nn.Module, class_weights: torch.Tensor | None = None, label_smoothing: float = 0.0):
        super().__init__()
        self.student = model
        self.register_buffer("class_weights", class_weights.float() if class_weights is not None else None)
        self.label_smoothing = label_smoothing

    def forward_train(self, batch: dict):
        logits = self.student(batch["image"])
        losses = {"ce": F.cross_entropy(logits, batch["label"], weight=self.class_weights,
                                        label_smoothing=self.label_smoothing)}
        aux = getattr(self.student, "auxiliary_loss", None)
        if callable(aux):
            losses.update(aux(batch))
        return logits, losses

    forward = forward_train


class _DDPForward(nn.Module):
    """DDP calls ``forward``; route it to the trainable's ``forward_train``."""

    def __init__(self, trainable):
        super().__init__()
        self.trainable = trainable

    def forward(self, batch):
        return self.trainable.forward_train(batch)


@dataclass
class FitResult:
    best_path: Path | None
    last_path: Path | None
    best_metrics: dict
    history: list = field(default_factory=list)
    model: nn.Module | None = None
    best_epoch: int = -1


def metric_value(metrics: dict, name: str) -> float:
    if name.startswith("recall:"):
        return float(metrics["recall"][name.split(":", 1)[1]])
    if name == "ece":
        return -float(metrics["ece"])
    v = metrics.get(name)
    if v is None:
        if name == "auc":
            return float(metrics["accuracy"])
        raise KeyError(f"unknown validation metric {name!r}; use accuracy, macro_f1, auc, ece or recall:<class>")
    return float(v)


class WeightAverage:
    """Exponential moving average of a model's state: parameters and BatchNorm statistics alike, with
    timm's ``ModelEmaV2`` warm-up (the decay used at update n is ``min(decay, (1 + n) / (10 + n))``, so
    the first weights, still random, fade fast). ``model`` is the averaged copy (eval mode).

    Hand-written rather than ``torch.optim.swa_utils.AveragedModel``: that averages integer buffers
    (BatchNorm's ``num_batches_tracked``) through the same float update and has no warm-up."""

    def __init__(self, model: nn.Module, decay: float):
        self.decay, self.updates = float(decay), 0
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for avg, cur in zip(self.model.state_dict().values(), model.state_dict().values()):
            if avg.dtype.is_floating_point:
                avg.mul_(d).add_(cur.detach(), alpha=1 - d)
            else:
                avg.copy_(cur)

    def state_dict(self) -> dict:
        return {"updates": self.updates, "state": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.updates = int(state["updates"])
        self.model.load_state_dict(state["state"])


def agreement(teacher_pred, student_pred, classes) -> dict:
    """Label-free agreement of a student with its teacher: ``per_class[c]`` is the fraction of the
    images the teacher calls ``c`` that the student calls ``c`` too (None when the teacher calls none
    ``c``); ``balanced`` their mean (each class counts alike, so a minority class is not drowned);
    ``overall`` the plain fraction of images on which both agree; ``n`` the number of images."""
    import numpy as np

    t, s = np.asarray(teacher_pred), np.asarray(student_pred)
    per = {}
    for i, c in enumerate(classes):
        m = t == i
        per[str(c)] = float((s[m] == i).mean()) if m.any() else None
    seen = [v for v in per.values() if v is not None]
    return {"balanced": float(np.mean(seen)) if seen else 0.0, "overall": float((t == s).mean()) if len(t) else 0.0,
            "per_class": per, "n": int(len(t))}


def selection_score(select: str, val: dict, agree: dict | None, metric: str, epoch: int = 0) -> float:
    """The number ``fit`` maximises to keep an epoch (see ``train.select``); ``last``: the epoch itself."""
    if select not in SELECT:
        raise ValueError(f"train.select={select}: use one of {', '.join(SELECT)}")
    if select == "last":
        return float(epoch)
    if select == "val" or agree is None:
        return metric_value(val, metric)
    if select == "agreement":
        return float(agree["balanced"])
    return 0.5 * (metric_value(val, metric) + float(agree["balanced"]))


def _agreement_sets(loaders: dict) -> list:
    """All non-test images without augmentation: the plain train split and the val split."""
    return [loaders[k] for k in ("train_plain", "val") if loaders.get(k) is not None]


def _predicted(model, loaders: list, device: str):
    """Predicted classes over ``loaders``; the global RNG is left as it was (iterating a loader draws
    a seed from it), so recording agreement never changes the training that follows."""
    import numpy as np

    state = torch.random.get_rng_state()
    try:
        return np.concatenate([predict_torch(model, ld, device)[1].argmax(1) for ld in loaders])
    finally:
        torch.random.set_rng_state(state)


def _to(batch: dict, device: str) -> dict:
    return {k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


def _optimizer(params: list, train_cfg, lr: float) -> torch.optim.Optimizer:
    if train_cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=float(train_cfg.weight_decay))
    if train_cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=float(train_cfg.weight_decay), nesterov=True)
    raise ValueError(f"train.optimizer={train_cfg.optimizer}: use adamw or sgd")


def _schedule(opt, train_cfg, epochs: int, steps_per_epoch: int):
    """Linear warm-up over ``train.warmup_epochs``, then cosine (or constant) per step."""
    total = max(1, epochs * steps_per_epoch)
    warm = int(train_cfg.warmup_epochs) * steps_per_epoch

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        if train_cfg.schedule == "constant":
            return 1.0
        t = (step - warm) / max(1, total - warm)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    return torch.optim.lr_scheduler.LambdaLR(opt, lr_at)


@dataclass
class _Progress:
    """What a resumed run continues from."""
    start_epoch: int = 0
    history: list = field(default_factory=list)
    best: float = -math.inf
    best_state: dict | None = None
    best_epoch: int = -1


def _resume(last_path: Path, trainable, opt, sched, desc: str, epochs: int, ema: WeightAverage | None) -> _Progress:
    """Load ``last.pt`` when it is this run's (same ``desc``, architecture and weight averaging)."""
    state = torch.load(last_path, map_location="cpu", weights_only=True)
    if state.get("desc") != desc or state.get("arch") != getattr(trainable.student, "edgeus_arch", None) \
            or (state.get("ema") is None) != (ema is None):
        return _Progress()
    trainable.load_state_dict(state["trainable"])
    if ema is not None:
        ema.load_state_dict(state["ema"])
    opt.load_state_dict(state["optimizer"])
    sched.load_state_dict(state["scheduler"])
    if D.is_main():
        log.info("resuming %s from %s at epoch %d/%d", desc, last_path, state["epoch"] + 2, epochs)
    return _Progress(state["epoch"] + 1, state["history"], state["best"], state.get("best_state"),
                     state["best_epoch"])


def _start_epoch(trainable, loaders: dict, seed: int, epoch: int) -> None:
    """Seed the epoch (so that a resumed run repeats the uninterrupted one) and tell the data and
    the trainable which epoch it is."""
    epoch_seed = seed * 1000 + epoch
    torch.manual_seed(epoch_seed)
    for gen in (getattr(loaders["train"], "generator", None), getattr(loaders["train"].sampler, "generator", None)):
        if gen is not None:
            gen.manual_seed(epoch_seed)
    trainable.train()
    if callable(getattr(trainable, "set_epoch", None)):   # e.g. DKD's warm-up counts epochs
        trainable.set_epoch(epoch)
    ds = loaders["train"].dataset
    if hasattr(ds, "set_epoch"):
        ds.set_epoch(epoch)
    if hasattr(loaders["train"].sampler, "set_epoch"):
        loaders["train"].sampler.set_epoch(epoch)


def _train_epoch(model, loader, opt, sched, params: list, train_cfg, *, device: str, desc: str, epoch: int,
                 epochs: int, steps_per_epoch: int, ema: WeightAverage | None = None, student=None) -> dict:
    """One pass over ``loader`` (at most ``steps_per_epoch`` batches); returns the epoch's row."""
    totals: dict[str, float] = {}
    correct = seen = 0
    bar = tqdm(loader, total=steps_per_epoch, desc=f"{desc} {epoch + 1}/{epochs}", leave=False,
               disable=(not D.is_main()) or None, dynamic_ncols=True)  # None: only on a terminal
    for step, batch in enumerate(bar):
        if step >= steps_per_epoch:
            break
        batch = _to(batch, device)
        logits, losses = model(batch)
        loss = sum(losses.values())
        if not torch.isfinite(loss):
            raise FloatingPointError(f"{desc}: loss became {loss.item()} at epoch {epoch + 1} step {step} "
                                     f"({ {k: float(v) for k, v in losses.items()} }); lower train.lr")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if train_cfg.grad_clip:
            nn.utils.clip_grad_norm_(params, float(train_cfg.grad_clip))
        opt.step()
        sched.step()
        if ema is not None:
            ema.update(student)
        for k, v in losses.items():
            totals[k] = totals.get(k, 0.0) + float(v.detach())
        correct += int((logits.argmax(1) == batch["label"]).sum())
        seen += len(batch["label"])
        bar.set_postfix(loss=f"{float(loss.detach()):.3f}", acc=f"{correct / max(seen, 1):.3f}")
    n = max(1, min(steps_per_epoch, step + 1))
    return {"epoch": epoch + 1, "loss": {k: v / n for k, v in totals.items()},
            "train_acc": correct / max(seen, 1), "lr": sched.get_last_lr()[0]}


def fit(trainable, loaders: dict, train_cfg, out_dir: str | Path | None, *, classes, preprocessing,
        device: str = "cpu", config_yaml: str | None = None, desc: str = "train", seed: int = 0,
        epochs: int | None = None, lr: float | None = None, teacher: nn.Module | None = None) -> FitResult:
    """Train, validate each epoch on ``loaders['val']``, keep the best student (in memory and on disk).

    With a ``teacher`` each epoch also records the student's agreement with it (:func:`agreement`) on
    every non-test image (``train_plain`` and ``val``), and ``train.select`` chooses what picks the
    kept epoch: ``val`` (``train.metric`` on val), ``agreement`` (balanced agreement) or
    ``val+agreement`` (their mean). Without a teacher the val metric picks. ``train.select=last``
    keeps the final epoch whatever val says. With ``train.ema`` > 0 the weight average
    (:class:`WeightAverage`) is what is validated, selected and kept."""
    select = str(getattr(train_cfg, "select", None) or "val")
    if select not in SELECT:
        raise ValueError(f"train.select={select}: use one of {', '.join(SELECT)}")
    torch.manual_seed(seed)
    epochs = int(train_cfg.epochs if epochs is None else epochs)
    lr = float(train_cfg.lr if lr is None else lr)
    out = Path(out_dir) if out_dir else None
    trainable.to(device)
    params = [p for p in trainable.parameters() if p.requires_grad]
    opt = _optimizer(params, train_cfg, lr)
    steps_per_epoch = len(loaders["train"])
    if train_cfg.max_steps_per_epoch:
        steps_per_epoch = min(steps_per_epoch, int(train_cfg.max_steps_per_epoch))
    sched = _schedule(opt, train_cfg, epochs, steps_per_epoch)
    last_path = out / "last.pt" if out else None
    decay = float(getattr(train_cfg, "ema", 0.0) or 0.0)
    ema = WeightAverage(trainable.student, decay) if decay > 0 else None
    kept = ema.model if ema is not None else trainable.student     # what is validated, selected and saved
    pg = _Progress()
    if out and train_cfg.resume and last_path.is_file():
        pg = _resume(last_path, trainable, opt, sched, desc, epochs, ema)
    model = _DDPForward(trainable)
    if D.active():
        model = nn.parallel.DistributedDataParallel(model, find_unused_parameters=True)
    history, best, best_state, best_epoch = pg.history, pg.best, pg.best_state, pg.best_epoch
    best_metrics = history[best_epoch]["val"] if 0 <= best_epoch < len(history) else {}
    agree_sets, teacher_pred = [], None
    if teacher is not None and D.is_main() and pg.start_epoch < epochs:
        agree_sets = _agreement_sets(loaders)
        teacher.eval()
        with torch.no_grad():
            teacher_pred = _predicted(teacher, agree_sets, device)   # the teacher is frozen: once per fit
    for epoch in range(pg.start_epoch, epochs):
        t0 = time.time()
        _start_epoch(trainable, loaders, seed, epoch)
        row = _train_epoch(model, loaders["train"], opt, sched, params, train_cfg, device=device, desc=desc,
                           epoch=epoch, epochs=epochs, steps_per_epoch=steps_per_epoch, ema=ema,
                           student=trainable.student)
        if D.is_main():
            y, p = predict_torch(kept, loaders["val"], device)
            val = compute_metrics(y, p, classes)
            row["val"] = val
            agree = None
            if teacher_pred is not None:
                with torch.no_grad():
                    agree = agreement(teacher_pred, _predicted(kept, agree_sets, device), classes)
                row["agreement"] = agree
            row["seconds"] = round(time.time() - t0, 2)
            score = selection_score(select, val, agree, train_cfg.metric, epoch)
            row["select"] = {"by": select if agree is not None or select == "last" else "val", "score": score}
            improved = score > best
            if improved:
                best, best_epoch, best_metrics = score, epoch, val
                best_state = {k: v.detach().cpu().clone() for k, v in kept.state_dict().items()}
                if out:
                    save_checkpoint(out / "best.pt", kept, classes=classes, preprocessing=preprocessing,
                                    config=config_yaml, metrics={"val": val, "epoch": epoch + 1})
            history.append(row)
            log.info("%s epoch %d/%d  loss %.4f  train acc %.3f  val acc %.3f  val %s %.4f%s%s", desc, epoch + 1,
                     epochs, sum(row["loss"].values()), row["train_acc"], val["accuracy"], train_cfg.metric,
                     metric_value(val, train_cfg.metric),
                     f"  agreement {agree['balanced']:.3f}" if agree is not None else "", "  *best*" if improved else "")
            if out:
                atomic_save({"desc": desc, "arch": getattr(trainable.student, "edgeus_arch", None),
                             "trainable": trainable.state_dict(), "optimizer": opt.state_dict(),
                             "scheduler": sched.state_dict(), "epoch": epoch, "history": history, "best": best,
                             "best_epoch": best_epoch, "best_state": best_state,
                             "ema": ema.state_dict() if ema is not None else None}, last_path)
        D.barrier()
    if best_state is not None and D.is_main():
        trainable.student.load_state_dict(best_state)
    if D.active():
        for t in trainable.student.state_dict().values():
            torch.distributed.broadcast(t, src=0)
    trainable.student.eval()
    best_path = out / "best.pt" if out and (out / "best.pt").is_file() else None   # none when no epoch ran
    return FitResult(best_path=best_path, last_path=last_path, best_metrics=best_metrics,
                     history=history, model=trainable.student, best_epoch=best_epoch + 1)
