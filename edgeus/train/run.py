"""``train_from_config``: what ``edgeus train`` and the teacher stage of ``compress`` run."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from edgeus import config as C
from edgeus.train import distributed as D

log = logging.getLogger("edgeus.train")


def resolve_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        from edgeus.errors import EdgeusError

        raise EdgeusError(f"device={device} but CUDA is not available on this machine; use device=cpu")
    return device


def build_model(cfg, num_classes: int):
    from edgeus.models import create_model

    import torch

    m = cfg.model
    torch.manual_seed(int(cfg.seed))          # the same seed always gives the same initial weights
    try:
        model = create_model(m.name, num_classes=num_classes, in_chans=int(cfg.data.in_chans), width=float(m.width),
                             **dict(m.kwargs))
    except (KeyError, TypeError, ValueError) as e:
        from edgeus.errors import EdgeusError

        raise EdgeusError(str(e.args[0]) if e.args else str(e)) from None
    if m.pretrained:
        from edgeus.models.pretrained import load_pretrained

        load_pretrained(model, m.pretrained)
    return model


def train_from_config(cfg, out_dir: str | Path | None = None, bundle=None):
    """Train ``cfg.model`` on ``cfg.data``; returns (FitResult, bundle). Checkpoints go to ``out_dir``."""
    from edgeus.data import build_datasets, build_loaders
    from edgeus.train.checkpoint import load_checkpoint
    from edgeus.train.trainer import Supervised, fit

    device = resolve_device(cfg.device)
    distributed = D.setup(device)
    if distributed and device.startswith("cuda"):
        import os

        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    out = Path(out_dir or cfg.train.out or Path(cfg.out_dir) / f"train-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if distributed:
        out = Path(D.broadcast_object(str(out)))
    bundle = bundle or build_datasets(cfg.data)
    if D.is_main():
        log.info("%s", bundle.summary())
    if cfg.train.checkpoint:
        model, ckpt = load_checkpoint(cfg.train.checkpoint)
        if ckpt["classes"] != bundle.classes:
            from edgeus.errors import CheckpointError

            raise CheckpointError(f"{cfg.train.checkpoint} was trained on classes {ckpt['classes']}, "
                                  f"the data has {bundle.classes}")
    else:
        model = build_model(cfg, len(bundle.classes))
    loaders = build_loaders(bundle, cfg.data, distributed=distributed)
    weights = bundle.class_weights() if cfg.data.balance == "weights" else None
    trainable = Supervised(model, weights, float(cfg.train.label_smoothing))
    if D.is_main():
        out.mkdir(parents=True, exist_ok=True)
        C.save(cfg, out / "config.yaml")
    result = fit(trainable, loaders, cfg.train, out, classes=bundle.classes, preprocessing=bundle.preprocessing,
                 device=device, config_yaml=C.to_yaml(cfg), desc=f"train {cfg.model.name}", seed=int(cfg.seed))
    if D.is_main():
        (out / "history.json").write_text(json.dumps(result.history, indent=1, default=float))
        if result.best_path is not None and Path(result.best_path).is_file():
            from edgeus.data.fingerprint import data_fingerprint
            from edgeus.train.checkpoint import stamp_data

            stamp_data(result.best_path, data_fingerprint(bundle, cfg.data))   # the images this model saw
    return result, bundle
