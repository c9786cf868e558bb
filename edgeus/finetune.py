"""Fine-tuning with (or without) a teacher: one level above :mod:`edgeus.train` and :mod:`edgeus.distill`.

    ft = make_finetuner(cfg, bundle, teacher=teacher, device="cpu")     # reads cfg.data/train/distill/seed once
    model, report = ft(model, epochs=5, lr=None, out_dir=None, desc="prune-final")

The stages (prune, decompose, QAT) receive ``ft`` as a plain callable and never import
:mod:`edgeus.train` or :mod:`edgeus.distill` to fine-tune; this module imports both, and neither
imports it. With a teacher the trainable is :func:`edgeus.distill.build_distiller` over
``cfg.distill``; without one it is :class:`edgeus.train.Supervised` (weighted cross-entropy).
The data loaders are built once per finetuner, on first use (building them consumes no global
random numbers: each loader seeds its own generator, and :func:`edgeus.train.fit` reseeds them
every epoch, so sharing them across calls trains exactly as separate loaders did).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from edgeus.distill import build_distiller
from edgeus.train import Supervised, fit

__all__ = ["Finetuner", "make_finetuner"]


class Finetuner:
    """A callable that fine-tunes a model on one dataset with fixed settings (see the module doc).

    ``ft(model, epochs, lr=None, out_dir=None, desc="finetune", trainable=None, use_teacher=True)``
    returns ``(model, report)``; ``report`` is a dict: ``epochs``, ``lr``, ``with_teacher``,
    ``best_epoch`` (1-based), ``best_metrics`` (validation metrics of the kept epoch),
    ``best_path``, ``history``, ``select`` (what picked the kept epoch, ``train.select``) and
    ``signals`` (both signals of every epoch, compact: :func:`signals`),
    ``best_agreement`` (the kept epoch's agreement with the teacher, see :func:`edgeus.train.trainer.agreement`;
    each history row has ``val`` and, with a teacher, ``agreement``: it is recorded even when the
    teacher does not drive the loss). ``trainable`` replaces the default trainable: a function
    ``(model, class_weights) -> trainable`` (for example network slimming's L1-regularised CE);
    the teacher is not used then. ``use_teacher=False`` trains with plain cross-entropy.
    """

    def __init__(self, bundle, *, data_cfg, train_cfg, distill_cfg, seed: int, teacher: nn.Module | None = None,
                 device: str = "cpu", loaders: dict | None = None):
        self.bundle = bundle
        self.data_cfg = copy.deepcopy(data_cfg)
        self.train_cfg = copy.deepcopy(train_cfg)
        self.distill_cfg = copy.deepcopy(distill_cfg)
        self.seed = int(seed)
        self.teacher = teacher
        if teacher is not None:
            teacher.eval()         # the teacher is frozen: eval mode from here on (BN statistics fixed)
        self.device = device
        self._loaders = loaders

    @property
    def loaders(self) -> dict:
        """``train``, ``val``, ``test``, ``train_plain`` loaders (built on first use, then reused)."""
        if self._loaders is None:
            from edgeus.data import build_loaders

            self._loaders = build_loaders(self.bundle, self.data_cfg)
        return self._loaders

    @property
    def class_weights(self) -> torch.Tensor | None:
        """Inverse-frequency class weights of the train split when ``data.balance=weights``, else None."""
        return self.bundle.class_weights() if self.data_cfg.balance == "weights" else None

    def __call__(self, model: nn.Module, epochs: int | None = None, lr: float | None = None,
                 out_dir: str | Path | None = None, desc: str = "finetune",
                 trainable: Callable | None = None, use_teacher: bool = True) -> tuple[nn.Module, dict]:
        weights = self.class_weights
        teacher = self.teacher if (use_teacher and trainable is None) else None
        if trainable is not None:
            wrapped = trainable(model, weights)
        elif teacher is not None:
            wrapped = build_distiller(model, teacher, self.distill_cfg, class_weights=weights)
        else:
            wrapped = Supervised(model, weights, float(self.train_cfg.label_smoothing))
        try:
            result = fit(wrapped, self.loaders, self.train_cfg, out_dir, classes=self.bundle.classes,
                         preprocessing=self.bundle.preprocessing, device=self.device, desc=desc, seed=self.seed,
                         epochs=epochs, lr=lr, teacher=self.teacher)   # agreement is recorded whenever a teacher exists
        finally:
            close = getattr(wrapped, "close", None)
            if callable(close):
                close()
        report = {"epochs": int(self.train_cfg.epochs if epochs is None else epochs), "lr": lr,
                  "with_teacher": teacher is not None, "best_epoch": result.best_epoch,
                  "best_metrics": result.best_metrics, "best_path": str(result.best_path) if result.best_path else None,
                  "select": str(self.train_cfg.get("select") or "val") if self.teacher is not None else "val",
                  "best_agreement": _kept(result, "agreement"), "signals": signals(result.history, self.train_cfg.metric),
                  "history": result.history}
        return result.model, report


def signals(history: list, metric: str) -> list[dict]:
    """Both selection signals of every epoch, compact (for stage reports): ``val`` (``train.metric``
    on the val split), ``val_accuracy``, ``agreement`` (balanced agreement with the teacher on
    train+val, None without a teacher) and ``agreement_per_class``."""
    rows = []
    for h in history:
        agree = h.get("agreement") or {}
        val = h.get("val") or {}
        rows.append({"epoch": h.get("epoch"), "val": _num(val.get(metric) if not metric.startswith("recall:")
                                                          else (val.get("recall") or {}).get(metric.split(":", 1)[1])),
                     "val_accuracy": _num(val.get("accuracy")), "agreement": _num(agree.get("balanced")),
                     "agreement_per_class": agree.get("per_class")})
    return rows


def _num(v):
    return None if v is None else round(float(v), 4)


def _kept(result, key: str):
    """``key`` of the kept epoch's history row (None when no epoch ran or it was not recorded)."""
    i = int(result.best_epoch) - 1
    return result.history[i].get(key) if 0 <= i < len(result.history) else None


def make_finetuner(cfg, bundle, teacher: nn.Module | None = None, device: str = "cpu", *,
                   loaders: dict | None = None) -> Finetuner:
    """A :class:`Finetuner` over ``bundle`` with ``cfg.data``, ``cfg.train``, ``cfg.distill`` and
    ``cfg.seed`` (read here, once). ``loaders`` reuses loaders the caller already built."""
    return Finetuner(bundle, data_cfg=cfg.data, train_cfg=cfg.train, distill_cfg=cfg.distill, seed=int(cfg.seed),
                     teacher=teacher, device=device, loaders=loaders)
