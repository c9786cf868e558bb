"""Pieces the single-stage commands share."""
from __future__ import annotations

from pathlib import Path


def new_output(path, cfg, what: str = "output") -> Path:
    """``path`` as a command's output: an existing file, or a non-empty folder, is refused unless
    ``overwrite=true`` (nothing of a user's is replaced without being asked)."""
    from edgeus.errors import EdgeusError

    path = Path(path)
    taken = path.is_file() or path.is_symlink() or (path.is_dir() and any(path.iterdir()))
    if taken and not bool(getattr(cfg, "overwrite", False)):
        raise EdgeusError(f"{path} exists; the {what} would replace it. Choose another out= or add overwrite=true")
    return path


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
