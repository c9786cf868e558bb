"""``train_model`` (the teacher stage over its sections) and ``train_from_config`` (``edgeus train``)."""
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
    """A fresh ``cfg.model`` (root config) for ``num_classes``, seeded by ``cfg.seed``."""
    return create_from_section(cfg.model, num_classes, in_chans=int(cfg.data.in_chans), seed=int(cfg.seed))


def create_from_section(model_cfg, num_classes: int, *, in_chans: int, seed: int):
    """A fresh model from the ``model`` section (name, width, kwargs, pretrained weights), its initial
    weights fixed by ``seed``."""
    from edgeus.models import create_model

    import torch

    m = model_cfg
    torch.manual_seed(int(seed))          # the same seed always gives the same initial weights
    try:
        model = create_model(m.name, num_classes=num_classes, in_chans=int(in_chans), width=float(m.width),
                             **dict(m.kwargs))
    except (KeyError, TypeError, ValueError) as e:
        from edgeus.errors import EdgeusError

        raise EdgeusError(str(e.args[0]) if e.args else str(e)) from None
    if m.pretrained:
        from edgeus.models.pretrained import load_pretrained

        load_pretrained(model, m.pretrained)
    return model


def train_from_config(cfg, out_dir: str | Path | None = None, bundle=None):
    """Train ``cfg.model`` on ``cfg.data``; returns (FitResult, bundle). Checkpoints go to ``out_dir``.

    The command-level wrapper (``edgeus train``): resolves the device, joins a torchrun process group,
    picks the output folder, then runs :func:`train_model` on the config's sections."""
    device = resolve_device(cfg.device)
    distributed = D.setup(device)
    if distributed and device.startswith("cuda"):
        import os

        device = f"cuda:{os.environ.get('LOCAL_RANK', 0)}"
    out = Path(out_dir or cfg.train.out or Path(cfg.out_dir) / f"train-{cfg.model.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    if distributed:
        out = Path(D.broadcast_object(str(out)))
    return train_model(cfg.model, cfg.data, cfg.train, seed=int(cfg.seed), out_dir=out, bundle=bundle, device=device,
                       distributed=distributed, config_yaml=C.to_yaml(cfg))


def _same_data_or_fail(out: Path, bundle, train_cfg) -> None:
    """A folder holding an interrupted training continues only on the same images (train.resume)."""
    saved = out / "data.json"
    if not (train_cfg.resume and (out / "last.pt").is_file() and saved.is_file()):
        return
    old = json.loads(saved.read_text())
    if old.get("fingerprint") != bundle.fingerprint() or old.get("classes") != bundle.classes:
        from edgeus.errors import InputError

        raise InputError(f"train.out={out} holds a training on other data ({old.get('dataset')}, classes "
                         f"{old.get('classes')}); it would resume from it. Use another train.out, or "
                         "train.resume=false to start over there")


def refit_bundle(bundle):
    """``bundle`` with its train split (augmented and plain) extended by the val split, for
    ``train.fit_on=train+val``; val and test stay as they are (val is then no hold-out)."""
    import dataclasses

    import numpy as np

    from edgeus.data import SplitDataset

    tr, va = bundle.train, bundle.val
    idx = np.concatenate([tr.indices, va.indices])
    return dataclasses.replace(bundle, train=SplitDataset(tr.images, idx, tr.pre, tr.augment, tr.seed),
                               train_plain=SplitDataset(tr.images, idx, tr.pre))


def train_model(model_cfg, data_cfg, train_cfg, *, seed: int, out_dir: str | Path, bundle=None, device: str = "cpu",
                distributed: bool = False, config_yaml: str | None = None):
    """Train a classifier from its sections: ``model_cfg`` (the ``model`` section: a fresh model), or
    ``train_cfg.checkpoint`` (continue from an edgeus checkpoint), on ``bundle`` (or the data
    ``data_cfg`` describes) with ``train_cfg``. Writes ``best.pt``, ``last.pt``, ``history.json`` and
    (given ``config_yaml``) ``config.yaml`` under ``out_dir``. Returns (FitResult, bundle)."""
    from edgeus.data import build_datasets, build_loaders
    from edgeus.train.checkpoint import load_checkpoint
    from edgeus.train.trainer import Supervised, fit

    out = Path(out_dir)
    bundle = bundle or build_datasets(data_cfg)
    if D.is_main():
        log.info("%s", bundle.summary())
    if train_cfg.checkpoint:
        model, ckpt = load_checkpoint(train_cfg.checkpoint)
        if ckpt["classes"] != bundle.classes:
            from edgeus.errors import CheckpointError

            raise CheckpointError(f"{train_cfg.checkpoint} was trained on classes {ckpt['classes']}, "
                                  f"the data has {bundle.classes}")
    else:
        model = create_from_section(model_cfg, len(bundle.classes), in_chans=int(data_cfg.in_chans), seed=int(seed))
    fit_on = str(getattr(train_cfg, "fit_on", None) or "train")
    fitted = refit_bundle(bundle) if fit_on == "train+val" else bundle
    if fitted is not bundle and D.is_main():
        log.info("train.fit_on=train+val: training on %d images (train + val); val is no hold-out, the last "
                 "epoch is kept", len(fitted.train))
    loaders = build_loaders(fitted, data_cfg, distributed=distributed)
    first = getattr(model, "train_first", None)   # two_stage_published: its U-Net trains first, alone (seed 001)
    if callable(first) and not train_cfg.checkpoint:
        first(loaders, device=device, out_dir=out, log=log)
    weights = fitted.class_weights() if data_cfg.balance == "weights" else None
    trainable = Supervised(model, weights, float(train_cfg.label_smoothing))
    if D.is_main():
        _same_data_or_fail(out, bundle, train_cfg)
        out.mkdir(parents=True, exist_ok=True)
        (out / "data.json").write_text(json.dumps({"fingerprint": bundle.fingerprint(), "classes": bundle.classes,
                                                   "dataset": bundle.name}))
        if config_yaml is not None:
            (out / "config.yaml").write_text(config_yaml)
    result = fit(trainable, loaders, train_cfg, out, classes=bundle.classes, preprocessing=bundle.preprocessing,
                 device=device, config_yaml=config_yaml, desc=f"train {model_cfg.name}", seed=int(seed))
    if D.is_main():
        (out / "history.json").write_text(json.dumps(result.history, indent=1, default=float))
        if result.best_path is not None and Path(result.best_path).is_file():
            from edgeus.data.fingerprint import data_fingerprint
            from edgeus.train.checkpoint import stamp_data

            fp = data_fingerprint(bundle, data_cfg)   # the images this model saw
            fp["fit_on"] = fit_on
            stamp_data(result.best_path, fp)
    return result, bundle
