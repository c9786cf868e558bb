"""Knowledge distillation: logit (Hinton KD, DKD) and feature (FitNets hints, attention transfer).

    from edgeus.distill import build_distiller, distill
    with build_distiller(student, teacher, cfg.distill, class_weights=w) as d:   # d: Distiller
        fit(d, loaders, cfg.train, out_dir, classes=..., preprocessing=...)
    student, report = distill(student, teacher, cfg, bundle, out_dir)            # the stage

One small class per loss (``CE``, ``KD``, ``DKD``, ``FitNet``, ``AT``), all built as
``Term(cfg.distill, info)``, combined by ``distill.losses`` and ``distill.weights``.
"""
from edgeus.distill.base import DEFAULT_WEIGHTS, LOSSES, CE, Distiller, LossTerm, Outputs, TermInfo
from edgeus.distill.kd import KD, kd_loss
from edgeus.distill.dkd import DKD, dkd_loss, dkd_terms
from edgeus.distill.fitnet import FitNet, align_maps
from edgeus.distill.at import AT, at_loss, attention_map
from edgeus.distill.config import DistillConfig
from edgeus.distill.hooks import FeatureTaps, count_hooks, default_feature_module, resolve_module
from edgeus.distill.stage import build_distiller, distill

__all__ = [
    "AT", "CE", "DEFAULT_WEIGHTS", "DKD", "KD", "LOSSES", "DistillConfig", "Distiller", "FeatureTaps", "FitNet",
    "LossTerm", "Outputs", "TermInfo", "align_maps", "at_loss", "attention_map", "build_distiller",
    "count_hooks", "default_feature_module", "distill", "dkd_loss", "dkd_terms", "kd_loss", "resolve_module",
]
