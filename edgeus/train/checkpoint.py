"""Checkpoints that carry everything needed to rebuild and use a model.

A checkpoint is a plain dict of tensors, strings, numbers, lists and dicts, so it loads with
``torch.load(path, weights_only=True)`` (no pickle of arbitrary objects, safe for files from
elsewhere)::

    {"format": "edgeus-checkpoint/1",
     "arch": {"name", "num_classes", "in_chans", "width", "kwargs"},
     "transforms": [...],             # structural edits to replay (pruning, decomposition)
     "classes": [...], "preprocessing": {"image_size", "in_chans", "mean", "std"},
     "state_dict": {...}, "config": "<yaml>", "metrics": {...}, "extra": {...}}
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from edgeus.errors import CheckpointError

FORMAT = "edgeus-checkpoint/1"


def atomic_save(obj: Any, path: str | Path) -> Path:
    """torch.save to a temporary name, then rename: an interrupted save never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)
    return path


def save_checkpoint(path: str | Path, model: nn.Module, *, classes: list[str], preprocessing: dict,
                    config: str | None = None, metrics: dict | None = None, extra: dict | None = None,
                    state_dict: dict | None = None) -> Path:
    arch = getattr(model, "edgeus_arch", None)
    if arch is None:
        raise CheckpointError("model was not built by edgeus.models.create_model (no edgeus_arch)")
    sd = state_dict if state_dict is not None else model.state_dict()
    ckpt = {
        "format": FORMAT,
        "arch": dict(arch),
        "transforms": list(getattr(model, "edgeus_transforms", [])),
        "classes": list(classes),
        "preprocessing": dict(preprocessing),
        "state_dict": {k: v.detach().cpu() for k, v in sd.items()},
        "config": config or "",
        "metrics": metrics or {},
        "extra": extra or {},
    }
    return atomic_save(ckpt, path)


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated, corrupt, or containing pickled objects
        raise CheckpointError(f"cannot load {path} safely (weights_only=True): {str(e).splitlines()[0]}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an edgeus checkpoint (format {ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__!r}); "
            "to start from plain weights use model.pretrained=<path>"
        )
    return ckpt


def build_from_checkpoint(ckpt: dict) -> nn.Module:
    from edgeus.models import create_model
    from edgeus.models.structure import replay

    arch = ckpt["arch"]
    model = create_model(arch["name"], num_classes=arch["num_classes"], in_chans=arch["in_chans"],
                         width=arch["width"], **arch.get("kwargs", {}))
    if ckpt.get("transforms"):
        model = replay(model, ckpt["transforms"])
    return model


def load_checkpoint(path: str | Path, *, expect_arch: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint describes and load its weights. Returns (model, checkpoint)."""
    ckpt = read_checkpoint(path)
    if expect_arch and ckpt["arch"]["name"] != expect_arch:
        raise CheckpointError(f"{path} holds a {ckpt['arch']['name']!r} model, expected {expect_arch!r}")
    model = build_from_checkpoint(ckpt)
    load_state(model, ckpt["state_dict"], source=str(path))
    model.eval()
    return model, ckpt


def load_state(model: nn.Module, state_dict: dict, source: str = "state dict") -> None:
    """Strict load with a readable message when the file belongs to another architecture."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    shape = [f"{k}: file {tuple(state_dict[k].shape)} vs model {tuple(own[k].shape)}"
             for k in own if k in state_dict and tuple(state_dict[k].shape) != tuple(own[k].shape)]
    if missing or unexpected or shape:
        arch = getattr(model, "edgeus_arch", {}).get("name", type(model).__name__)
        parts = [f"{source} does not fit model {arch!r}:"]
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {', '.join(missing[:3])})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {', '.join(unexpected[:3])})")
        if shape:
            parts.append(f"{len(shape)} shape mismatches (e.g. {'; '.join(shape[:3])})")
        raise CheckpointError(" ".join(parts))
    model.load_state_dict(state_dict, strict=True)
