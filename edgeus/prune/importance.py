"""What matters: channel-importance criteria (torch-pruning's scorers) and the training they need.

- ``l1`` / ``l2``: group weight magnitude (Li et al. 2017, "Pruning Filters for Efficient ConvNets").
- ``bn_scale``: network slimming (Liu et al. 2017): |gamma| of the BatchNorms in the group, after
  a few epochs of sparsity training with an L1 penalty on the gammas (:class:`SlimmingTrainable`).
- ``taylor``: first-order Taylor expansion of the loss (Molchanov et al. 2019), from gradients of
  a few labelled batches (:func:`accumulate_taylor_grads`).
- ``lamp`` (Lee et al. 2021) and ``random`` (a baseline) come for free from torch-pruning.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeus.errors import EdgeusError

IMPORTANCES = ("l1", "l2", "bn_scale", "taylor", "lamp", "random")


def build_importance(name: str):
    import torch_pruning as tp

    name = name.lower()
    if name == "l1":
        return tp.importance.MagnitudeImportance(p=1)
    if name == "l2":
        return tp.importance.MagnitudeImportance(p=2)
    if name in ("bn_scale", "slimming"):
        return tp.importance.BNScaleImportance()
    if name == "taylor":
        return tp.importance.TaylorImportance()
    if name == "lamp":
        return tp.importance.LAMPImportance(p=2)
    if name == "random":
        return tp.importance.RandomImportance()
    raise EdgeusError(f"unknown prune.importance={name!r}; choose one of {', '.join(IMPORTANCES)}")


def accumulate_taylor_grads(model: nn.Module, batches: Iterable[dict], device="cpu", max_batches: int = 4) -> int:
    """Fill ``.grad`` of every parameter with the summed CE gradient of a few batches.

    torch-pruning's TaylorImportance reads ``weight * weight.grad``. Returns the batches used.
    """
    was = model.training
    model.eval()  # BN statistics stay as trained; the gradient is what we want
    model.zero_grad(set_to_none=True)
    n = 0
    for batch in batches:
        if n >= max_batches:
            break
        logits = model(batch["image"].to(device))
        loss = F.cross_entropy(logits, batch["label"].to(device))
        loss.backward()
        n += 1
    model.train(was)
    if n == 0:
        raise EdgeusError("prune.importance=taylor needs labelled data; none was given")
    return n


def bn_gammas(model: nn.Module, exclude: Iterable[nn.Module] = ()) -> list[torch.Tensor]:
    ex = set(exclude)
    return [m.weight for m in model.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine and m not in ex]


class SlimmingTrainable(nn.Module):
    """Sparsity training for network slimming: CE (or a distiller's losses) + reg * sum |gamma|.

    Wraps a trainable with the ``.student`` / ``.forward_train(batch)`` shape that
    ``edgeus.train.fit`` accepts, adding the L1 term to its losses dict.
    """

    def __init__(self, inner: nn.Module, reg: float = 1e-4):
        super().__init__()
        self.inner = inner
        self.reg = float(reg)

    @property
    def student(self) -> nn.Module:
        return self.inner.student

    def forward(self, x):
        return self.inner.student(x)

    def forward_train(self, batch):
        logits, losses = self.inner.forward_train(batch)
        gammas = bn_gammas(self.inner.student)
        if gammas:
            losses = dict(losses)
            losses["bn_l1"] = self.reg * sum(g.abs().sum() for g in gammas)
        return logits, losses
