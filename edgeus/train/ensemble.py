"""Train an ensemble teacher (``teacher.ensemble=N`` or ``teacher.members=[a, b]``): each member is
an ordinary :func:`edgeus.train.run.train_model` run in ``<out>/member-<i>/`` (so each resumes on
its own), member ``i`` seeded ``seed + i``; member 0 is exactly the single teacher of the same seed.
The members are joined into an :class:`edgeus.models.ensemble.EnsembleModel` (averaged logits)."""
from __future__ import annotations

import logging
from pathlib import Path

log = logging.getLogger("edgeus.train")

__all__ = ["ensemble_members", "train_ensemble"]


def ensemble_members(teacher_cfg, model_name: str) -> list[str]:
    """The architecture of each member: ``teacher.members`` when given, else ``teacher.ensemble`` copies
    of ``model.name``. A list of length 1 means a single teacher."""
    from edgeus.errors import UsageError

    names = [str(n) for n in (teacher_cfg.get("members") or [])]
    n = int(teacher_cfg.get("ensemble") or 1)
    if n < 1:
        raise UsageError(f"teacher.ensemble={n}: use 1 (a single teacher) or more")
    if names:
        if n not in (1, len(names)):
            raise UsageError(f"teacher.ensemble={n} but teacher.members lists {len(names)} architectures {names}; "
                             "give one of them (or the same count)")
        return names
    return [str(model_name)] * n


def train_ensemble(teacher_cfg, model_cfg, data_cfg, train_cfg, *, seed: int, out_dir: str | Path, bundle,
                   device: str = "cpu", config_yaml: str | None = None):
    """Train every member; returns ``(ensemble, report)``. ``report["members"]`` holds each member's
    architecture, seed, best epoch, validation metrics and checkpoint; ``report["val"]`` the ensemble's
    validation metrics (averaged logits)."""
    from edgeus.evaluate import compute_metrics, predict_torch
    from edgeus.models.ensemble import make_ensemble
    from omegaconf import OmegaConf

    from edgeus.data import build_loaders
    from edgeus.train.run import train_model

    out = Path(out_dir)
    names = ensemble_members(teacher_cfg, model_cfg.name)
    members, rows = [], []
    for i, name in enumerate(names):
        mcfg = model_cfg
        if name != model_cfg.name:       # another architecture: its own defaults (no kwargs, no weights)
            mcfg = OmegaConf.merge(model_cfg, {"name": name, "pretrained": None})
            mcfg.kwargs = {}
        mdir = out / f"member-{i}"
        log.info("ensemble teacher: member %d/%d (%s, seed %d)", i + 1, len(names), name, int(seed) + i)
        result, _ = train_model(mcfg, data_cfg, OmegaConf.merge(train_cfg, {"out": str(mdir)}), seed=int(seed) + i, out_dir=mdir,
                                bundle=bundle, device=device, config_yaml=config_yaml)
        members.append(result.model.cpu().eval())
        rows.append({"member": i, "arch": name, "seed": int(seed) + i, "best_epoch": result.best_epoch,
                     "val": _brief(result.best_metrics),
                     "checkpoint": str(result.best_path) if result.best_path else None})
    model = make_ensemble(members).eval()
    y, p = predict_torch(model, build_loaders(bundle, data_cfg)["val"], "cpu")
    val = compute_metrics(y, p, bundle.classes)
    return model, {"ensemble": len(names), "members": rows, "val": _brief(val)}


def _brief(m: dict | None) -> dict:
    if not m:
        return {}
    return {k: m[k] for k in ("accuracy", "macro_f1", "auc", "ece", "recall") if k in m}
