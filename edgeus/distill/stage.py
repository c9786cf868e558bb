"""The distill stage: :func:`build_distiller` (used by every fine-tune with a teacher) and :func:`distill`."""
from __future__ import annotations

import logging
import math
import time

import torch
import torch.nn as nn

from edgeus.distill import at, dkd, fitnet, kd  # noqa: F401  (each registers its loss term in LOSSES)
from edgeus.distill.base import LOSSES, Distiller, PairInfo, TermInfo, resolve_weights
from edgeus.distill.config import DistillConfig
from edgeus.distill.hooks import FeatureTaps, default_feature_module, model_label, validate_pairs
from edgeus.errors import EdgeusError

log = logging.getLogger("edgeus.distill")

PROBE_SIZE = 64
CACHE_LIMIT = 2 * 2**30   # bytes of teacher logits + features kept by cache_teacher


def _example_input(student: nn.Module, example: torch.Tensor | None, image_size: int | None) -> torch.Tensor:
    if example is not None:
        return example[:1].detach()
    arch = getattr(student, "edgeus_arch", None) or {}
    in_chans = int(arch.get("in_chans", 1))
    size = int(image_size or PROBE_SIZE)
    p = next(student.parameters(), None)
    device = p.device if p is not None else "cpu"
    return torch.zeros(1, in_chans, size, size, device=device)


@torch.no_grad()
def _probe_shapes(model: nn.Module, paths: list[str], example: torch.Tensor) -> tuple[list[tuple], torch.Tensor]:
    modules = dict(model.named_modules())
    got: dict[str, tuple] = {}
    handles = []
    for path in paths:
        def hook(m, i, o, path=path):
            if isinstance(o, torch.Tensor):
                got[path] = tuple(o.shape[1:])
        handles.append(modules[path].register_forward_hook(hook))
    was = model.training
    try:
        model.eval()
        logits = model(example.to(next(model.parameters()).device))
    finally:
        for h in handles:
            h.remove()
        model.train(was)
    shapes = []
    for path in paths:
        s = got.get(path)
        if s is None:
            raise EdgeusError(f"module {path!r} of {model_label(model)} did not run (or returned no tensor) "
                              "in a forward pass; pick another layer for distill.pairs")
        if len(s) != 3:
            raise EdgeusError(f"module {path!r} of {model_label(model)} returns shape {s} per sample; feature "
                              "distillation needs C x H x W maps")
        shapes.append(s)
    return shapes, logits


def build_distiller(student: nn.Module, teacher: nn.Module, distill_cfg=None, class_weights=None, *,
                    example_input: torch.Tensor | None = None, image_size: int | None = None,
                    steps_per_epoch: int | None = None, cache_teacher: bool = False,
                    teacher_cache: dict | None = None) -> Distiller:
    """A :class:`Distiller` for ``distill_cfg`` (``cfg.distill``; a DictConfig or DistillConfig).

    Feature pairs are validated here (a missing module names the nearest existing ones) and a
    probe pass (one input, eval mode, no gradient) measures their shapes for the FitNet adapters.
    ``teacher_cache`` (with ``cache_teacher``) is a dict the caller keeps to reuse the teacher's
    outputs across runs on the same (unaugmented) data, teacher and pairs.
    """
    cfg = distill_cfg if distill_cfg is not None else DistillConfig()
    weights = resolve_weights(cfg)
    if teacher is None:
        raise EdgeusError("distillation needs a teacher model")
    teacher.eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    example = _example_input(student, example_input, image_size)
    needs_features = any(LOSSES[n].needs_features for n in weights)
    pairs: list[PairInfo] = []
    taps = None
    with torch.no_grad():
        s_logits = None
        if needs_features:
            raw = [list(p) for p in (getattr(cfg, "pairs", None) or [])]
            if raw:
                names = validate_pairs(teacher, student, raw)
            else:
                from edgeus.models.ensemble import is_ensemble

                if is_ensemble(teacher):   # whose features? averaged logits have no single feature map
                    raise EdgeusError(
                        f"distill.losses={list(weights)}: an ensemble teacher has no single feature map to "
                        "distil; use logit losses (kd, dkd) or name the member's module in distill.pairs, "
                        "e.g. distill.pairs=[[members.0.<module>,<student module>]]")
                names = [(default_feature_module(teacher, example), default_feature_module(student, example))]
            t_shapes, t_logits = _probe_shapes(teacher, [t for t, _ in names], example)
            s_shapes, s_logits = _probe_shapes(student, [s for _, s in names], example)
            pairs = [PairInfo(t, s, ts, ss) for (t, s), ts, ss in zip(names, t_shapes, s_shapes)]
            taps = FeatureTaps(teacher, student, names, pre_relu=bool(getattr(cfg, "pre_relu", False)),
                               example=example)
        else:
            was = (teacher.training, student.training)
            teacher.eval(), student.eval()
            t_logits, s_logits = teacher(example), student(example)
            teacher.train(was[0]), student.train(was[1])
    if t_logits.shape[-1] != s_logits.shape[-1]:
        if taps is not None:
            taps.close()
        raise EdgeusError(f"teacher ({model_label(teacher)}) has {t_logits.shape[-1]} outputs and the student "
                          f"({model_label(student)}) {s_logits.shape[-1]}: they must classify the same classes")
    info = TermInfo(num_classes=int(s_logits.shape[-1]), class_weights=class_weights, pairs=pairs)
    try:
        terms = {name: LOSSES[name](cfg, info) for name in weights}
    except Exception:
        if taps is not None:
            taps.close()
        raise
    # cfg.cache_teacher is honoured by distill(), which first checks that the data is not augmented;
    # a direct caller opts in with cache_teacher=True (cached outputs are wrong under augmentation)
    cache = bool(cache_teacher)
    return Distiller(student, teacher, terms, weights, taps=taps, pairs=pairs, cache_teacher=cache,
                     steps_per_epoch=steps_per_epoch, cache=teacher_cache)


def distill(student: nn.Module, teacher: nn.Module, dcfg, *, loaders: dict, train_cfg, classes, preprocessing: dict,
            class_weights: torch.Tensor | None = None, seed: int = 0, out_dir=None, device: str = "cpu",
            teacher_cache: dict | None = None, evaluate: bool = True,
            config_yaml: str | None = None) -> tuple[nn.Module, dict]:
    """Train ``student`` from ``teacher`` with the losses of ``dcfg`` (the ``distill`` section).

    Runs :func:`edgeus.train.fit` on ``loaders`` (``train``, ``val``, ``test``) with ``train_cfg``
    (the ``train`` section) for ``dcfg.epochs`` (default ``train_cfg.epochs``) at ``dcfg.lr``
    (default ``train_cfg.lr``), keeps the best student by the validation metric
    (``train_cfg.metric``), removes its hooks, and returns ``(student, report)``; the report says
    which losses and pairs were used, what the feature taps did and (``evaluate``) the student's
    final val/test metrics and the teacher's val metrics. ``classes`` and ``preprocessing`` go
    into the checkpoints written under ``out_dir``; ``config_yaml`` too, when given.
    """
    from edgeus.evaluate import compute_metrics, predict_torch
    from edgeus.train import fit

    epochs = int(dcfg.epochs if dcfg.epochs is not None else train_cfg.epochs)
    lr = float(dcfg.lr if dcfg.lr is not None else train_cfg.lr)
    classes = list(classes)
    train_set = loaders["train"].dataset
    notes = []
    cache = bool(dcfg.cache_teacher)
    if cache and getattr(train_set, "augment", None) is not None:
        cache = False
        notes.append("cache_teacher ignored: the train split is augmented (teacher logits change every epoch)")
    steps = len(loaders["train"])
    if train_cfg.max_steps_per_epoch:
        steps = min(steps, int(train_cfg.max_steps_per_epoch))
    student.to(device)
    teacher.to(device)
    example = torch.zeros(1, int(preprocessing["in_chans"]), int(preprocessing["image_size"]),
                          int(preprocessing["image_size"]), device=device)
    t0 = time.time()
    with build_distiller(student, teacher, dcfg, class_weights=class_weights, example_input=example,
                         steps_per_epoch=steps, cache_teacher=cache, teacher_cache=teacher_cache) as distiller:
        if distiller.cache_teacher:
            per_sample = 4 * (len(classes) + sum(math.prod(p.teacher_shape) for p in distiller.pairs))
            need = per_sample * len(train_set)
            if need > CACHE_LIMIT:
                distiller.cache_teacher = False
                notes.append(f"cache_teacher ignored: the teacher's outputs would take {need / 2**30:.1f} GiB "
                             f"(limit {CACHE_LIMIT / 2**30:.0f} GiB)")
        desc = distiller.describe()
        for name, term in distiller.terms.items():
            if getattr(term, "note", None):
                notes.append(f"{name}: {term.note}")
        log.info("distill %s -> %s: %s", model_label(teacher), model_label(student),
                 " + ".join(f"{w:g}*{n}" for n, w in distiller.weights.items()))
        result = fit(distiller, loaders, train_cfg, out_dir, classes=classes, preprocessing=preprocessing,
                     device=device, config_yaml=config_yaml, desc="distill", seed=int(seed), epochs=epochs, lr=lr)
        cache_hits = distiller.cache_hits
    student = result.model
    student.eval()
    metrics = {"val": None, "test": None, "teacher_val": None}
    if evaluate:
        for split in ("val", "test"):
            y, p = predict_torch(student, loaders[split], device)
            metrics[split] = compute_metrics(y, p, classes)
        y, p = predict_torch(teacher, loaders["val"], device)
        metrics["teacher_val"] = compute_metrics(y, p, classes)
    report = {
        "stage": "distill",
        "teacher": model_label(teacher),
        "student": model_label(student),
        **desc,
        "temperature": float(dcfg.temperature),
        "epochs": epochs,
        "lr": lr,
        "best_epoch": result.best_epoch,
        "seconds": round(time.time() - t0, 1),
        "teacher_cache_hits": cache_hits,
        "notes": notes + desc.get("feature_taps", []),
        "teacher_val": metrics["teacher_val"],
        "val": metrics["val"],
        "test": metrics["test"],
        "best_path": str(result.best_path) if result.best_path else None,
        "history": [{"epoch": r["epoch"], "loss": r["loss"], "val_accuracy": r.get("val", {}).get("accuracy")}
                    for r in result.history],
    }
    return student, report


__all__ = ["build_distiller", "distill"]
