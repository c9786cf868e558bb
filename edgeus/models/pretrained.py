"""Start a zoo model from a weights file the user passes (``model.pretrained=/path/weights.pth``).

Nothing is downloaded: the file is read with ``torch.load(weights_only=True)``. It may be a raw state
dict (a torchvision ``resnet50``/``mobilenet_v2``/``efficientnet_b0`` checkpoint, for example), a dict
holding one under ``"state_dict"`` or ``"model"`` (an edgeus checkpoint works too), with or without a
DataParallel ``module.`` prefix. A model may rename the file's keys first
(``remap_pretrained_keys(state) -> state``: densenet201 reads old torchvision names). Tensors are
matched by key name:

- same name, same shape: loaded;
- the classifier head (the last ``nn.Linear``: ``fc``, ``classifier.1``) with another class count:
  kept at its fresh initialisation and reported;
- the stem (the first conv) with 3 input channels in the file and 1 in the model: the RGB filters are
  summed (a grey image through summed filters = the same grey image repeated as RGB); 1 -> 3 repeats / 3;
- keys of parts the architecture rebuilt (``model.pretrained_rebuilt_prefixes``: rsmas's ``layer4.``,
  the CBAM modules) may be missing from the file or not fit; those are reported, not fatal;
- anything else missing or with another shape raises ``CheckpointError`` naming the keys and shapes
  (a file from another architecture, or a model built at another ``width``).

Models with a ``pretrained_target`` attribute (``two_stage``: ``"classifier"``) load into that submodule.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn as nn

from edgeus.errors import CheckpointError

log = logging.getLogger(__name__)

_SHOW = 6  # keys listed in messages


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file (raw state dict, or under "state_dict" / "model")."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"pretrained weights not found: {path}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"cannot load {path} safely (weights_only=True): {str(e).splitlines()[0]}") from None
    if isinstance(obj, dict):
        for key in ("state_dict", "model", "model_state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} holds no state dict (expected name -> tensor, or one under 'state_dict'/'model')")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def _first_conv_and_head(model: nn.Module) -> tuple[str | None, str | None]:
    first_conv = head = None
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and first_conv is None:
            first_conv = name
        if isinstance(m, nn.Linear):
            head = name
    return first_conv, head


def _fmt(items: list[str]) -> str:
    return ", ".join(items[:_SHOW]) + (f" (+{len(items) - _SHOW} more)" if len(items) > _SHOW else "")


def _short(keys: list[str]) -> list[str]:
    """Group keys by module: layer4.0.conv2.weight, layer4.0.bn2.* -> 'layer4.0.conv2.weight', 'layer4.0.bn2.*'."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        mod, _, leaf = k.rpartition(".")
        groups.setdefault(mod, []).append(leaf)
    return [f"{m}.{v[0]}" if len(v) == 1 else f"{m}.*" for m, v in groups.items()]


def load_pretrained(model: nn.Module, path: str | Path, *, strict_rebuilt: bool = False) -> dict:
    """Load the weights in ``path`` into ``model`` (in place); returns a JSON-able report.

    ``report = {"path", "target", "loaded", "adapted": {key: how}, "head_reinitialised": [...],
    "rebuilt_not_loaded": [...], "unused": [...]}``; raises ``CheckpointError`` on a mismatch outside
    the head, the stem and the rebuilt parts.
    """
    src = read_state_dict(path)
    target_name = getattr(model, "pretrained_target", None)
    target = model.get_submodule(target_name) if target_name else model
    remap = getattr(target, "remap_pretrained_keys", None)   # e.g. densenet201: old torchvision key names
    if callable(remap):
        src = remap(src)
    rebuilt = tuple(getattr(target, "pretrained_rebuilt_prefixes", ()))
    own = target.state_dict()
    stem, head = _first_conv_and_head(target)
    stem_key = f"{stem}.weight" if stem else None
    head_prefix = f"{head}." if head else None

    new_state: dict[str, torch.Tensor] = {}
    adapted: dict[str, str] = {}
    head_reinit: list[str] = []
    rebuilt_skipped: list[str] = []
    missing: list[str] = []
    mismatched: list[str] = []
    for key, ref in own.items():
        is_rebuilt = any(key.startswith(p) for p in rebuilt)
        if key not in src:
            if key.endswith("num_batches_tracked"):
                continue
            (rebuilt_skipped if is_rebuilt else missing).append(key)
            continue
        t = src[key]
        if t.shape == ref.shape:
            new_state[key] = t.to(ref.dtype)
        elif head_prefix and key.startswith(head_prefix) and t.shape[1:] == ref.shape[1:]:
            head_reinit.append(key)
        elif key == stem_key and t.dim() == 4 and t.shape[0] == ref.shape[0] and t.shape[2:] == ref.shape[2:]:
            cin_src, cin = t.shape[1], ref.shape[1]
            if cin == 1:
                new_state[key] = t.sum(dim=1, keepdim=True).to(ref.dtype)
                adapted[key] = f"summed {cin_src} input channels into 1"
            elif cin_src == 1:
                new_state[key] = (t.repeat(1, cin, 1, 1) / cin).to(ref.dtype)
                adapted[key] = f"repeated 1 input channel to {cin} (/ {cin})"
            elif cin_src == 3 and cin > 3:  # e.g. 5 channels: RGB filters for the first 3, zeros after
                w = torch.zeros_like(ref)
                w[:, :3] = t
                new_state[key] = w
                adapted[key] = f"copied 3 input channels, zero-initialised {cin - 3} more"
            else:
                mismatched.append(f"{key} file {tuple(t.shape)} vs model {tuple(ref.shape)}")
        elif is_rebuilt:
            rebuilt_skipped.append(key)
        else:
            mismatched.append(f"{key} file {tuple(t.shape)} vs model {tuple(ref.shape)}")

    unused = sorted(k for k in src if k not in own)
    where = f"{type(target).__name__}" + (f" ({target_name} of {type(model).__name__})" if target_name else "")
    if mismatched or missing:
        arch = getattr(model, "edgeus_arch", {})
        parts = [f"{path} does not fit {where}"
                 + (f" built with width={arch.get('width')}" if arch else "") + ":"]
        if mismatched:
            parts.append(f"{len(mismatched)} tensor(s) with other shapes: {_fmt(mismatched)}")
        if missing:
            parts.append(f"{len(missing)} model key(s) not in the file: {_fmt(_short(missing))}")
        if unused:
            parts.append(f"file keys the model lacks: {_fmt(_short(unused))}")
        parts.append("is it a checkpoint of another architecture (or of another width)?")
        raise CheckpointError(" ".join(parts))
    if not new_state:
        raise CheckpointError(f"{path}: no tensor of the file fits {where}")

    result = target.load_state_dict(new_state, strict=False)
    assert not result.unexpected_keys, result.unexpected_keys
    report = {
        "path": str(path),
        "target": target_name or "",
        "loaded": len(new_state),
        "adapted": adapted,
        "head_reinitialised": head_reinit,
        "rebuilt_not_loaded": _short(rebuilt_skipped),
        "unused": _short(unused),
    }
    if rebuilt_skipped and strict_rebuilt:
        raise CheckpointError(f"{path}: rebuilt parts not loaded: {_fmt(_short(rebuilt_skipped))}")
    log.info("pretrained %s: loaded %d tensors%s%s%s", path, len(new_state),
             f"; adapted {', '.join(adapted)}" if adapted else "",
             f"; head re-initialised ({len(head_reinit)} tensors, class count differs)" if head_reinit else "",
             f"; rebuilt parts start fresh: {_fmt(_short(rebuilt_skipped))}" if rebuilt_skipped else "")
    if unused:
        log.info("pretrained %s: file tensors not used by %s: %s", path, where, _fmt(_short(unused)))
    return report
