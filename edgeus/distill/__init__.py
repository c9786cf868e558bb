"""Knowledge distillation: logit (Hinton KD, DKD) and feature (FitNets hints, attention transfer).

    from edgeus.distill import build_distiller, distill
    with build_distiller(student, teacher, dcfg, class_weights=w) as d:        # d: Distiller
        fit(d, loaders, train_cfg, out_dir, classes=..., preprocessing=...)
    student, report = distill(student, teacher, dcfg, loaders=loaders, train_cfg=train_cfg,
                              classes=classes, preprocessing=pre)                # the stage

One small class per loss (``CE``, ``KD``, ``DKD``, ``FitNet``, ``AT``), all built as
``Term(dcfg, info)``, combined by ``distill.losses`` and ``distill.weights``.

Imports are lazy: ``edgeus.config`` imports ``edgeus.distill.config`` for its dataclass and must
not pull in torch.
"""
from __future__ import annotations

from edgeus.lazy import lazy_exports

_API = {
    **{n: "edgeus.distill.base" for n in ("DEFAULT_WEIGHTS", "LOSSES", "CE", "Distiller", "LossTerm", "Outputs",
                                          "TermInfo")},
    "KD": "edgeus.distill.kd", "kd_loss": "edgeus.distill.kd",
    "DKD": "edgeus.distill.dkd", "dkd_loss": "edgeus.distill.dkd", "dkd_terms": "edgeus.distill.dkd",
    "FitNet": "edgeus.distill.fitnet", "align_maps": "edgeus.distill.fitnet",
    "AT": "edgeus.distill.at", "at_loss": "edgeus.distill.at", "attention_map": "edgeus.distill.at",
    "DistillConfig": "edgeus.distill.config",
    **{n: "edgeus.distill.hooks" for n in ("FeatureTaps", "count_hooks", "default_feature_module",
                                           "resolve_module")},
    "build_distiller": "edgeus.distill.stage", "distill": "edgeus.distill.stage",
}
__all__ = sorted(_API)


# the modules whose loss terms register themselves in ``LOSSES`` when imported
_LOSS_MODULES = ("edgeus.distill.kd", "edgeus.distill.dkd", "edgeus.distill.fitnet", "edgeus.distill.at")


__getattr__ = lazy_exports(__name__, _API, first=_LOSS_MODULES)
