"""Checkpoints that carry everything needed to rebuild and use a model.

A checkpoint is a plain dict of tensors, strings, numbers, lists and dicts, so it loads with
``torch.load(path, weights_only=True)`` (no pickle of arbitrary objects, safe for files from
elsewhere)::

    {"format": "edgeus-checkpoint/1",
     "arch": {"name", "num_classes", "in_chans", "width", "kwargs"},
     "transforms": [...],             # structural edits to replay (pruning, decomposition)
     "classes": [...], "preprocessing": {"image_size", "in_chans", "mean", "std"},
     "state_dict": {...}, "config": "<yaml>", "metrics": {...}, "extra": {...},
     "data": {...}}                   # the data fingerprint (edgeus.data.fingerprint), when known
"""
from __future__ import annotations

import os
import pickle
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
    try:
        torch.save(obj, tmp)
        os.replace(tmp, path)
    except BaseException:      # disk full, interrupted, unwritable: leave no temporary file behind
        try:
            tmp.unlink()
        except OSError:
            pass
        raise
    return path


def save_checkpoint(path: str | Path, model: nn.Module, *, classes: list[str], preprocessing: dict,
                    config: str | None = None, metrics: dict | None = None, extra: dict | None = None,
                    state_dict: dict | None = None, data: dict | None = None) -> Path:
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
    if data:
        ckpt["data"] = dict(data)
    return atomic_save(ckpt, path)


def stamp_data(path: str | Path, data: dict) -> Path:
    """Add the data fingerprint ``data`` to the edgeus checkpoint at ``path`` (rewritten atomically)."""
    ckpt = read_checkpoint(path)
    ckpt["data"] = dict(data)
    return atomic_save(ckpt, path)


def read_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError:   # the file holds pickled Python objects: refused, never executed
        raise CheckpointError(
            f"{path} holds pickled Python objects, which edgeus never loads (only tensors, numbers, strings, "
            "lists and dicts): save the weights as an edgeus checkpoint (edgeus.train.save_checkpoint), or give "
            "a plain state dict as model.pretrained=<path>") from None
    except Exception as e:  # truncated or corrupt
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        if "weights_only" in first:   # never relay torch's advice to turn the safety check off
            first = type(e).__name__
        raise CheckpointError(f"cannot read {path} as a checkpoint (truncated or corrupt?): {first}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise CheckpointError(
            f"{path} is not an edgeus checkpoint (format {ckpt.get('format') if isinstance(ckpt, dict) else type(ckpt).__name__!r}); "
            "to start from plain weights use model.pretrained=<path>"
        )
    return ckpt


def build_from_checkpoint(ckpt: dict) -> nn.Module:
    from edgeus.models import create_model, ensemble
    from edgeus.models.structure import replay

    arch = ckpt.get("arch")
    if not isinstance(arch, dict) or not isinstance(arch.get("name"), str):
        raise CheckpointError("the checkpoint does not say which architecture it holds (no arch.name); "
                              "it was not written by edgeus.train.save_checkpoint")
    try:
        if arch["name"] == ensemble.NAME:   # an ensemble teacher: its members' archs are in kwargs.members
            model = ensemble.from_arch(arch)
        else:
            model = create_model(arch["name"], num_classes=int(arch["num_classes"]), in_chans=int(arch["in_chans"]),
                                 width=float(arch["width"]), **dict(arch.get("kwargs") or {}))
    except KeyError as e:
        what = str(e.args[0]) if e.args else "?"
        if what.strip("'\"") in ("num_classes", "in_chans", "width"):
            raise CheckpointError(f"the checkpoint's arch lacks {what}; it was not written by edgeus") from None
        raise CheckpointError(f"the checkpoint's architecture {arch['name']!r} cannot be built: {what}") from None
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"the checkpoint's architecture {arch['name']!r} cannot be built with its settings "
                              f"{ {k: arch.get(k) for k in ('num_classes', 'in_chans', 'width', 'kwargs')} }: "
                              f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    if ckpt.get("transforms"):
        model = replay(model, ckpt["transforms"])
    return model


def check_classes(ckpt: dict, source: str = "checkpoint") -> None:
    """The model's head must have one output per class name the checkpoint lists."""
    classes = ckpt.get("classes")
    n = (ckpt.get("arch") or {}).get("num_classes")
    if not isinstance(classes, (list, tuple)) or not classes:
        raise CheckpointError(f"{source} lists no class names")
    if n is not None and int(n) != len(classes):
        raise CheckpointError(f"{source}: the model has {n} outputs but the checkpoint names {len(classes)} "
                              f"classes {list(classes)}; it is inconsistent, re-save it with matching classes")


def check_finite(state_dict: dict, source: str = "state dict") -> None:
    """Refuse weights with NaN or Inf: such a model answers nonsense (and NaN passes ``>`` checks)."""
    bad = [k for k, v in state_dict.items()
           if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        more = f" and {len(bad) - 1} more tensor(s)" if len(bad) > 1 else ""
        raise CheckpointError(f"{source} has NaN or Inf weights (in {bad[0]}{more}); the model is unusable: "
                              "retrain, or use an earlier checkpoint")


def load_checkpoint(path: str | Path, *, expect_arch: str | None = None) -> tuple[nn.Module, dict]:
    """Rebuild the model a checkpoint describes and load its weights. Returns (model, checkpoint)."""
    ckpt = read_checkpoint(path)
    if expect_arch and ckpt["arch"]["name"] != expect_arch:
        raise CheckpointError(f"{path} holds a {ckpt['arch']['name']!r} model, expected {expect_arch!r}")
    check_classes(ckpt, str(path))
    try:
        model = build_from_checkpoint(ckpt)
    except CheckpointError as e:
        raise CheckpointError(f"{path}: {e}") from None
    if not isinstance(ckpt.get("state_dict"), dict):
        raise CheckpointError(f"{path} holds no state_dict")
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
    check_finite(state_dict, source)
    model.load_state_dict(state_dict, strict=True)
