"""An ensemble teacher: N classifiers whose logits are averaged (``teacher.ensemble=N`` or
``teacher.members=[rsmas, resnet50]``).

The ensemble is a teacher only. Distillation and the clinical gates see its averaged logits; the
student starts from one member (``teacher.student_from``, default member 0), so it keeps the cost
of a single model. Pruning or decomposing the ensemble itself is refused.

It is not in the model registry (it cannot be built from a name alone): its ``edgeus_arch`` is::

    {"name": "ensemble", "num_classes": K, "in_chans": C, "width": 1.0,
     "kwargs": {"members": [<each member's edgeus_arch>, ...]}}

so an edgeus checkpoint of it is plain tensors, strings and numbers (``torch.load(...,
weights_only=True)``), and :func:`edgeus.train.checkpoint.build_from_checkpoint` rebuilds it with
:func:`from_arch`; its state dict is the members' (``members.<i>.<key>``).
"""
from __future__ import annotations

import copy

import torch
import torch.nn as nn

from edgeus.errors import EdgeusError

NAME = "ensemble"

__all__ = ["EnsembleModel", "NAME", "from_arch", "is_ensemble", "make_ensemble", "student_member"]


class EnsembleModel(nn.Module):
    """Averages the logits of its members (all see the same input)."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        if len(members) < 1:
            raise EdgeusError("an ensemble needs at least one member")
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.members[0](x)
        for m in self.members[1:]:
            out = out + m(x)
        return out / len(self.members)


def is_ensemble(model) -> bool:
    return isinstance(model, EnsembleModel) or (getattr(model, "edgeus_arch", None) or {}).get("name") == NAME


def make_ensemble(members: list[nn.Module]) -> EnsembleModel:
    """An ensemble of edgeus models (each built by ``create_model``, unpruned), with its ``edgeus_arch``."""
    archs = []
    for i, m in enumerate(members):
        arch = getattr(m, "edgeus_arch", None)
        if arch is None:
            raise EdgeusError(f"ensemble member {i} was not built by edgeus.models.create_model (no edgeus_arch)")
        if getattr(m, "edgeus_transforms", None):
            raise EdgeusError(f"ensemble member {i} is pruned or decomposed; ensemble members are plain teachers")
        archs.append(copy.deepcopy(dict(arch)))
    k = {a["num_classes"] for a in archs}
    c = {a["in_chans"] for a in archs}
    if len(k) != 1 or len(c) != 1:
        raise EdgeusError(f"ensemble members disagree on classes / channels: "
                          f"{[(a['name'], a['num_classes'], a['in_chans']) for a in archs]}")
    model = EnsembleModel(list(members))
    model.edgeus_arch = {"name": NAME, "num_classes": int(k.pop()), "in_chans": int(c.pop()), "width": 1.0,
                         "kwargs": {"members": archs}}
    return model


def from_arch(arch: dict) -> EnsembleModel:
    """Rebuild an (untrained) ensemble from its ``edgeus_arch`` (as a checkpoint stores it)."""
    from edgeus.models import create_model

    members = (arch.get("kwargs") or {}).get("members")
    if not isinstance(members, (list, tuple)) or not members:
        raise ValueError("an ensemble checkpoint lists no members (arch.kwargs.members)")
    built = []
    for a in members:
        built.append(create_model(a["name"], num_classes=int(a["num_classes"]), in_chans=int(a["in_chans"]),
                                  width=float(a["width"]), **dict(a.get("kwargs") or {})))
    return make_ensemble(built)


def student_member(model: nn.Module, which=None) -> nn.Module:
    """A copy of the member a student starts from: ``which`` is a member index (default 0) or a
    member's architecture name (the first such member). ``ensemble`` is refused: the student of an
    ensemble teacher keeps the cost of one model."""
    if not isinstance(model, EnsembleModel):
        return model
    names = [getattr(m, "edgeus_arch", {}).get("name", type(m).__name__) for m in model.members]
    choices = f"0..{len(names) - 1} or one of {names}"
    if which is None or str(which).strip() == "":
        idx = 0
    elif str(which).strip().lower() in (NAME, "all"):
        raise EdgeusError(f"teacher.student_from={which}: a student is never the whole ensemble (pruning or "
                          f"decomposing {len(names)} averaged models makes no sense, and the student must keep the "
                          f"cost of one model); name the member to start from: {choices}")
    elif str(which).strip().lstrip("-").isdigit():
        idx = int(str(which).strip())
        if not 0 <= idx < len(names):
            raise EdgeusError(f"teacher.student_from={which}: the ensemble has {len(names)} members; use {choices}")
    elif str(which) in names:
        idx = names.index(str(which))
    else:
        raise EdgeusError(f"teacher.student_from={which}: no such member; use {choices}")
    member = copy.deepcopy(model.members[idx])
    member.eval()
    return member
