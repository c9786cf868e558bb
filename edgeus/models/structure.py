"""Structural edits (pruning, decomposition) that a checkpoint must replay to rebuild a model.

A pruned or decomposed model no longer matches what ``create_model`` builds. Each stage that
changes structure appends a JSON-able record to ``model.edgeus_transforms`` and registers a
``restore(model, record) -> model`` function here under its ``kind``. Loading a checkpoint builds
the architecture, replays the records in order, then loads the state dict strictly::

    @register_transform("prune")
    def _restore(model, record): ...
    record_transform(model, {"kind": "prune", ...})
"""
from __future__ import annotations

import importlib
from typing import Any, Callable

import torch.nn as nn

_RESTORERS: dict[str, Callable[[nn.Module, dict], nn.Module]] = {}
# modules that register restorers; imported lazily when a checkpoint needs them
_PROVIDERS = {"prune": "edgeus.prune.structure", "decompose": "edgeus.decompose.structure",
              "sparsity": "edgeus.prune.structure"}


def register_transform(kind: str):
    def deco(fn: Callable[[nn.Module, dict], nn.Module]):
        _RESTORERS[kind] = fn
        return fn
    return deco


def record_transform(model: nn.Module, record: dict[str, Any]) -> None:
    if "kind" not in record:
        raise ValueError("a transform record needs a 'kind'")
    transforms = list(getattr(model, "edgeus_transforms", []))
    transforms.append(record)
    model.edgeus_transforms = transforms


def replay(model: nn.Module, transforms: list[dict]) -> nn.Module:
    for rec in transforms:
        kind = rec.get("kind")
        if kind not in _RESTORERS and kind in _PROVIDERS:
            importlib.import_module(_PROVIDERS[kind])
        if kind not in _RESTORERS:
            raise KeyError(f"checkpoint needs structural transform {kind!r}, which this edgeus cannot replay")
        model = _RESTORERS[kind](model, rec)
    model.edgeus_transforms = list(transforms)
    return model
