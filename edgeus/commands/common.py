"""Pieces the single-stage commands share."""
from __future__ import annotations

from pathlib import Path


def checkpoint_argument(cfg, args: list[str], command: str):
    """Load the one checkpoint a command takes. Its preprocessing and classes become ``cfg.data``'s,
    so data is prepared (and MACs counted) as the model was trained. Returns (path, model, ckpt)."""
    from edgeus.errors import EdgeusError
    from edgeus.train.checkpoint import load_checkpoint

    if len(args) != 1:
        raise EdgeusError(f"edgeus {command} takes one checkpoint path, got {len(args)}: {args}")
    path = Path(args[0])
    model, ckpt = load_checkpoint(path)
    pre = ckpt.get("preprocessing") or {}
    for key in ("image_size", "in_chans", "mean", "std"):
        if pre.get(key) is not None:
            cfg.data[key] = pre[key]
    if ckpt.get("classes"):
        cfg.data.classes = list(ckpt["classes"])
    return path, model, ckpt
