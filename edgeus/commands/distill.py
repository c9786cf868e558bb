"""Train a student from a teacher checkpoint with knowledge distillation.

    edgeus distill runs/teacher/best.pt model.name=mobilenetv2 model.width=0.5
    edgeus distill teacher.pt pruned.pt distill.losses=[ce,dkd] distill.epochs=20
    edgeus distill teacher.pt model.name=dsc_sta distill.losses=[ce,kd,fitnet] \\
                   distill.pairs=[[layer3,features.13]] distill.weights.fitnet=2 distill.pre_relu=true

The teacher is the first argument (or distill.teacher=); the student is the second argument (an
edgeus checkpoint, e.g. a pruned model), or distill.student=<checkpoint | model name>, or else a
fresh model.name / model.width / model.kwargs. The data is read with the teacher's classes and
preprocessing (image size, channels, mean, std).

Losses (distill.losses, summed with distill.weights.<name>): ce (class-weighted cross-entropy),
kd (Hinton, distill.temperature, T^2-scaled; or distill.alpha mixes ce and kd), dkd (decoupled KD:
distill.dkd_alpha, distill.dkd_beta, distill.dkd_warmup), fitnet (1x1 conv + BN adapter, MSE on
feature maps), at (attention transfer, distill.at_p). Feature pairs are [teacher_module,
student_module] paths from model.named_modules(); without distill.pairs the last feature stage of
each model is used. distill.cache_teacher=true computes the teacher's outputs once per
sample and reuses them every epoch (only when data.augment=false).

Writes <out>/student.pt (the best student by train.metric), best.pt, last.pt, distill_report.json;
prints the student's validation and test metrics next to the teacher's.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

USAGE = "<teacher.pt> [student.pt] [model.name=...] [distill.losses=[ce,kd]] [key=value ...]"


def _student(cfg, spec: str | None, num_classes: int):
    from edgeus.train.checkpoint import load_checkpoint
    from edgeus.train.run import build_model

    if spec and (Path(spec).is_file() or spec.endswith((".pt", ".pth"))):
        model, ckpt = load_checkpoint(spec)
        return model, ckpt, spec
    if spec:
        cfg.model.name = spec
    return build_model(cfg, num_classes), None, f"new {cfg.model.name} (width {cfg.model.width})"


def run(cfg, args):
    import torch

    from edgeus import config as C
    from edgeus.data import build_datasets, build_loaders
    from edgeus.distill import distill
    from edgeus.distill.base import resolve_weights
    from edgeus.distill.hooks import validate_pairs
    from edgeus.errors import CheckpointError, EdgeusError
    from edgeus.evaluate import format_metrics
    from edgeus.train.checkpoint import load_checkpoint, save_checkpoint
    from edgeus.train.run import resolve_device

    if len(args) > 2:
        raise EdgeusError(f"edgeus distill takes <teacher.pt> [student.pt], got {len(args)} paths: {args}")
    teacher_path = args[0] if args else (cfg.distill.teacher or cfg.teacher.checkpoint)
    if not teacher_path:
        raise EdgeusError("no teacher: give its checkpoint as the first argument (edgeus distill teacher.pt ...)")
    student_spec = args[1] if len(args) > 1 else cfg.distill.student
    device = resolve_device(cfg.device)

    resolve_weights(cfg.distill)  # a mistyped loss name fails before anything is loaded
    teacher, tckpt = load_checkpoint(teacher_path)
    pre = tckpt["preprocessing"]
    classes = list(tckpt["classes"])
    cfg.data.classes = classes
    if pre:
        cfg.data.image_size = int(pre["image_size"])
        cfg.data.in_chans = int(pre["in_chans"])
        cfg.data.mean = [float(v) for v in pre["mean"]]
        cfg.data.std = [float(v) for v in pre["std"]]
    torch.manual_seed(int(cfg.seed))
    student, sckpt, student_desc = _student(cfg, student_spec, len(classes))
    if sckpt is not None and sckpt["classes"] != classes:
        raise CheckpointError(f"{student_spec} classifies {sckpt['classes']}, the teacher {classes}")
    if cfg.distill.pairs:
        validate_pairs(teacher, student, [list(p) for p in cfg.distill.pairs])  # before the data is read
    bundle = build_datasets(cfg.data)
    if bundle.classes != classes:
        raise CheckpointError(f"{teacher_path} was trained on classes {classes}, the data has {bundle.classes}")

    out = Path(cfg.out or cfg.train.out or Path(cfg.out_dir) / f"distill-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    C.save(cfg, out / "config.yaml")
    print(f"teacher {teacher_path} ({tckpt['arch']['name']}) -> student {student_desc}; {bundle.summary()}")
    loaders = build_loaders(bundle, cfg.data)
    weights = bundle.class_weights() if cfg.data.balance == "weights" else None
    student, report = distill(student, teacher, cfg.distill, loaders=loaders, train_cfg=cfg.train,
                              classes=bundle.classes, preprocessing=bundle.preprocessing, class_weights=weights,
                              seed=int(cfg.seed), out_dir=out, device=device, config_yaml=C.to_yaml(cfg))
    report["teacher_path"], report["student_source"] = str(teacher_path), student_desc
    from edgeus.data.fingerprint import data_fingerprint

    path = save_checkpoint(out / "student.pt", student, classes=bundle.classes, preprocessing=bundle.preprocessing,
                           config=C.to_yaml(cfg), metrics={"val": report["val"], "test": report["test"]},
                           extra={"distill": {k: report[k] for k in ("losses", "weights", "teacher_path")}},
                           data=data_fingerprint(bundle, cfg.data))
    (out / "distill_report.json").write_text(json.dumps(report, indent=1, default=float))
    print("losses: " + " + ".join(f"{w:g}*{n}" for n, w in report["weights"].items())
          + "".join(f"\n  pair {p['teacher']} -> {p['student']}" for p in report["pairs"]))
    for note in report["notes"]:
        print(f"note: {note}")
    print(format_metrics(report["teacher_val"], "teacher, validation split:"))
    print(format_metrics(report["val"], f"student, validation split (best epoch {report['best_epoch']}):"))
    print(format_metrics(report["test"], "student, test split:"))
    print(f"student checkpoint: {path}")
    return 0
