"""Replay of structural pruning when a checkpoint is loaded.

Channel pruning leaves irregular channel counts that ``create_model`` cannot know. Before and
after pruning we take a :func:`snapshot` of every module's plain attributes (``in_channels``,
``num_features``, ``groups``, a custom block's split sizes or head count, ...) and the shapes of its
own parameters and buffers; the difference is recorded on the model as a ``{"kind": "prune"}``
transform. Loading replays it: each recorded module gets its attributes set and its tensors
re-allocated at the recorded shapes, then the state dict loads strictly. The record is plain JSON,
so checkpoints still load with ``weights_only=True``.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from edgeus.models.structure import register_transform

_SIMPLE = (bool, int, float, str)


def _plain(v: Any):
    """The JSON-able form of a module attribute, or None when it is not a plain value."""
    if isinstance(v, _SIMPLE):
        return v
    if isinstance(v, (list, tuple)) and all(isinstance(x, _SIMPLE) for x in v):
        return list(v)
    return None


def snapshot(model: nn.Module) -> dict[str, dict]:
    """Plain attributes and own tensor shapes of every module, by qualified name."""
    snap = {}
    for name, m in model.named_modules():
        attrs = {}
        for k, v in vars(m).items():
            if k.startswith("_") or k in ("training",) or k.startswith("edgeus_"):
                continue
            p = _plain(v)
            if p is not None:
                attrs[k] = p
        tensors = {k: list(t.shape) for k, t in m._parameters.items() if t is not None}
        tensors.update({k: list(t.shape) for k, t in m._buffers.items() if t is not None})
        snap[name] = {"type": type(m).__name__, "attrs": attrs, "tensors": tensors}
    return snap


def diff(before: dict[str, dict], after: dict[str, dict]) -> dict[str, dict]:
    """The modules whose attributes or tensor shapes changed: {name: {type, attrs, tensors}}."""
    changes = {}
    for name, a in after.items():
        b = before.get(name)
        if b is None:
            raise ValueError(f"module {name!r} appeared during pruning; pruning must edit modules in place")
        attrs = {k: v for k, v in a["attrs"].items() if b["attrs"].get(k) != v}
        tensors = {k: v for k, v in a["tensors"].items() if b["tensors"].get(k) != v}
        if attrs or tensors:
            changes[name] = {"type": a["type"], "attrs": attrs, "tensors": tensors}
    return changes


def apply_shapes(model: nn.Module, modules: dict[str, dict]) -> nn.Module:
    """Set recorded attributes and re-allocate recorded tensors (values come from the state dict)."""
    for name, rec in modules.items():
        try:
            m = model.get_submodule(name) if name else model
        except AttributeError:
            raise KeyError(f"pruning record names module {name!r}, which this architecture lacks") from None
        if type(m).__name__ != rec.get("type", type(m).__name__):
            raise KeyError(f"pruning record expects {rec['type']} at {name!r}, found {type(m).__name__}")
        for k, v in rec.get("attrs", {}).items():
            old = getattr(m, k, None)
            setattr(m, k, tuple(v) if isinstance(old, tuple) else v)
        for k, shape in rec.get("tensors", {}).items():
            if k in m._parameters and m._parameters[k] is not None:
                old = m._parameters[k]
                m._parameters[k] = nn.Parameter(torch.zeros(shape, dtype=old.dtype, device=old.device),
                                                requires_grad=old.requires_grad)
            elif k in m._buffers and m._buffers[k] is not None:
                old = m._buffers[k]
                m._buffers[k] = torch.zeros(shape, dtype=old.dtype, device=old.device)
            else:
                raise KeyError(f"pruning record names tensor {name}.{k}, which the model lacks")
    return model


@register_transform("prune")
def _restore_prune(model: nn.Module, record: dict) -> nn.Module:
    return apply_shapes(model, record.get("modules", {}))


@register_transform("sparsity")
def _restore_sparsity(model: nn.Module, record: dict) -> nn.Module:
    # unstructured / 2:4 sparsity changes values only; the record documents it, nothing to rebuild
    return model
