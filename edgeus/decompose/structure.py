"""The ``decompose`` structure record: which layers became which factored layers.

``decompose_model`` appends ``{"kind": "decompose", "method": ..., "layers": {path: spec}}`` to the
model's transforms, with ``spec`` one of::

    {"type": "tucker2", "ranks": [R_out, R_in], "first": bool, "last": bool}
    {"type": "svd_conv", "ranks": [R]}
    {"type": "svd_linear", "ranks": [R]}
    {"type": "cp", "ranks": [R], "tucker_ranks": [R_out, R_in]}     (decompose.method=cp)

Loading a checkpoint replays it (:func:`restore`): each named layer is swapped for an empty
replacement of the same shapes, and the state dict then fills the weights.
"""
from __future__ import annotations

import torch.nn as nn

from edgeus.decompose.svd import linear_skeleton, pointwise_skeleton
from edgeus.decompose.tucker import tucker2_skeleton
from edgeus.models.structure import register_transform


def get_module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError as e:
        raise KeyError(f"model has no layer {path!r}: {e}") from None


def set_module(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def skeleton(module: nn.Module, spec: dict) -> nn.Sequential:
    """The empty replacement of ``module`` that ``spec`` describes."""
    kind = spec.get("type")
    ranks = [int(r) for r in spec["ranks"]]
    if kind == "tucker2":
        if type(module) is not nn.Conv2d:
            raise TypeError(f"a tucker2 record needs an nn.Conv2d, found {type(module).__name__}")
        return tucker2_skeleton(module, ranks[0], ranks[1], first=bool(spec.get("first", True)),
                                last=bool(spec.get("last", True)))
    if kind == "cp":
        from edgeus.decompose.cp import cp_skeleton

        if type(module) is not nn.Conv2d:
            raise TypeError(f"a cp record needs an nn.Conv2d, found {type(module).__name__}")
        return cp_skeleton(module, ranks[0])
    if kind == "svd_conv":
        if type(module) is not nn.Conv2d:
            raise TypeError(f"an svd_conv record needs an nn.Conv2d, found {type(module).__name__}")
        return pointwise_skeleton(module, ranks[0])
    if kind == "svd_linear":
        if type(module) is not nn.Linear:
            raise TypeError(f"an svd_linear record needs an nn.Linear, found {type(module).__name__}")
        return linear_skeleton(module, ranks[0])
    raise ValueError(f"unknown decomposition type {kind!r}")


@register_transform("decompose")
def restore(model: nn.Module, record: dict) -> nn.Module:
    for path, spec in record.get("layers", {}).items():
        old = get_module(model, path)
        new = skeleton(old, spec)
        new.train(old.training)
        set_module(model, path, new)
    return model
