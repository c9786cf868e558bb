"""The stages of ``compress``: thin adapters from a run's context to the stage functions that a
user can also call directly (``edgeus.prune.prune_model``, ``edgeus.distill.distill``, ...).

Each stage function takes ``(ctx, out_dir)`` and returns its report; it updates ``ctx.model``
(torch stages) or ``ctx.artifacts`` (ONNX, engine, bundle).
"""
from __future__ import annotations

import copy
import shutil
from pathlib import Path

from edgeus.errors import EdgeusError

TORCH_STAGES = ("teacher", "prune", "distill", "decompose")
ORDER = ("teacher", "prune", "distill", "decompose", "export", "quantize", "build", "bench", "package")


def _teacher_for_finetune(ctx):
    return ctx.teacher if ctx.cfg.compress.teacher_guided else None


def stage_teacher(ctx, out: Path) -> dict:
    from edgeus.train.checkpoint import load_checkpoint
    from edgeus.train.run import train_from_config

    cfg = ctx.cfg
    if cfg.teacher.checkpoint:
        model, ckpt = load_checkpoint(cfg.teacher.checkpoint)
        if list(ckpt["classes"]) != ctx.bundle.classes:
            raise EdgeusError(f"teacher.checkpoint={cfg.teacher.checkpoint} predicts {ckpt['classes']}, "
                              f"the data has {ctx.bundle.classes}")
        shutil.copyfile(cfg.teacher.checkpoint, out / "model.pt")
        ctx.set_model(model)
        return {"source": "loaded", "checkpoint": str(cfg.teacher.checkpoint)}
    tcfg = copy.deepcopy(cfg)
    for k, v in (cfg.teacher.train or {}).items():
        tcfg.train[k] = v
    tcfg.train.out = str(out / "train")
    result, _ = train_from_config(tcfg, out / "train", bundle=ctx.bundle)
    shutil.copyfile(result.best_path, out / "model.pt")
    ctx.set_model(result.model)
    return {"source": "trained", "epochs": int(tcfg.train.epochs), "best_epoch": result.best_epoch,
            "val": _brief(result.best_metrics)}


def stage_prune(ctx, out: Path) -> dict:
    from edgeus.prune import prune_model

    model, report = prune_model(ctx.model, ctx.cfg, bundle=ctx.bundle, teacher=_teacher_for_finetune(ctx),
                                device=ctx.device, out_dir=out)
    ctx.set_model(model)
    return report


def stage_distill(ctx, out: Path) -> dict:
    from edgeus.distill import distill
    from edgeus.train.run import build_model

    cfg = ctx.cfg
    student = ctx.model
    if cfg.distill.student:
        from edgeus.train.checkpoint import load_checkpoint

        if Path(cfg.distill.student).suffix in (".pt", ".pth"):
            student, _ = load_checkpoint(cfg.distill.student)
        else:
            scfg = copy.deepcopy(cfg)
            scfg.model.name = cfg.distill.student
            scfg.model.pretrained = None
            scfg.model.kwargs = {}
            student = build_model(scfg, len(ctx.bundle.classes))
    elif student is ctx.teacher:
        raise EdgeusError("the distill stage needs a student: set distill.student=<model name or checkpoint>, "
                          "or put a prune / decompose stage before it")
    student, report = distill(student, ctx.teacher, cfg, ctx.bundle, out, device=ctx.device)
    ctx.set_model(student)
    return report


def stage_decompose(ctx, out: Path) -> dict:
    from edgeus.decompose import decompose_model

    model, report = decompose_model(ctx.model, ctx.cfg, bundle=ctx.bundle, teacher=_teacher_for_finetune(ctx),
                                    device=ctx.device, out_dir=out)
    ctx.set_model(model)
    return report


def stage_export(ctx, out: Path) -> dict:
    from edgeus.quantize import export_onnx

    path = out / "student.fp32.onnx"
    report = export_onnx(ctx.model, path, ctx.cfg, bundle=ctx.bundle)
    ctx.artifacts["fp32_onnx"] = str(path)
    return report


def stage_quantize(ctx, out: Path) -> dict:
    from edgeus.quantize import quantize_onnx

    fp32 = ctx.need("fp32_onnx", "export")
    path = out / "student.int8.onnx"
    report = quantize_onnx(fp32, path, ctx.cfg, ctx.bundle, teacher_onnx=ctx.teacher_onnx(), model=ctx.model,
                           out_dir=out / "work", device=ctx.device)
    ctx.artifacts["int8_onnx"] = str(path)
    if ctx.cfg.compress.baseline_int8:
        # the obvious alternative a user tries first: ONNX Runtime INT8 of the uncompressed teacher
        bcfg = copy.deepcopy(ctx.cfg)
        bcfg.quantize.fallback = "none"
        bcfg.quantize.qat = "false"
        bpath = out / "teacher.int8.onnx"
        report["baseline"] = {"path": str(bpath),
                              "report": quantize_onnx(ctx.teacher_onnx(), bpath, bcfg, ctx.bundle,
                                                      out_dir=out / "work-baseline", device=ctx.device)}
        ctx.artifacts["teacher_int8_onnx"] = str(bpath)
    return report


def stage_build(ctx, out: Path) -> dict:
    from edgeus.deploy import build

    onnx_path = ctx.need("int8_onnx", "quantize")
    if ctx.cfg.target.backend != "tensorrt":
        return {"skipped": True, "reason": f"target {ctx.cfg.target.name} runs the INT8 ONNX with "
                f"{ctx.cfg.target.backend}; there is no engine to build (the bundle carries the ONNX)"}
    meta = {"classes": ctx.bundle.classes, "preprocessing": ctx.bundle.preprocessing,
            "recipe": ctx.cfg.recipe.name, "run": str(ctx.run_dir)}
    report = build(onnx_path, ctx.cfg.target, ctx.cfg.build, out, meta)
    ctx.artifacts["build_dir"] = str(out)
    return report


def stage_bench(ctx, out: Path) -> dict:
    """Teacher, INT8-only teacher and student (FP32, INT8) timed together with ``edgeus bench``."""
    from edgeus.pipeline.runner import measure_latency

    models = {"teacher fp32": ctx.teacher_onnx()}
    for key, name in (("teacher_int8_onnx", "teacher int8 (ORT only)"), ("fp32_onnx", "student fp32"),
                      ("int8_onnx", "student int8")):
        if ctx.artifacts.get(key):
            models[name] = ctx.artifacts[key]
    table = measure_latency(ctx.cfg, models, ctx.cfg.bench.iters, ctx.cfg.bench.warmup, ctx.cfg.bench.batch_sizes,
                            out=out / "bench.json")
    lines = ["| model | batch | median ms | p90 ms | speed-up vs teacher | bytes |", "|---|---|---|---|---|---|"]
    for b, lat in table.items():
        for n, v in lat.items():
            lines.append(f"| {n} | {b.split()[1]} | {v['median_ms']:.2f} | {v['p90_ms']:.2f} | "
                         f"{v['speedup']:.2f}× | {v['bytes']} |")
    (out / "latency.md").write_text("\n".join(lines) + "\n")
    return {"latency": table, "models": {n: str(p) for n, p in models.items()}}


def stage_package(ctx, out: Path) -> dict:
    from edgeus.deploy import package, verify

    cfg = ctx.cfg
    bundle_dir = Path(cfg.package.out) if cfg.package.out else out / "bundle"
    metrics = {"student": ctx.state_metrics("final"), "teacher": ctx.state_metrics("teacher")}
    path = package(ctx.run_dir, bundle_dir, cfg.package, target=cfg.target, build_cfg=cfg.build,
                   data=ctx.bundle if cfg.package.golden_data else None,
                   data_preprocessing={k: list(cfg.data[k]) for k in ("mean", "std")}, seed=cfg.seed,
                   recipe=cfg.recipe.name, overwrite=True,   # a re-run of this stage replaces its own bundle
                   fp32_onnx=ctx.artifacts.get("fp32_onnx"), int8_onnx=ctx.artifacts.get("int8_onnx"),
                   build_dir=ctx.artifacts.get("build_dir"), metrics=metrics)
    ctx.artifacts["bundle"] = str(path)
    check = verify(path)
    ok = check.get("ok", True) if isinstance(check, dict) else bool(check)
    if not ok:
        raise EdgeusError(f"the bundle just written does not verify: {check}")
    return {"bundle": str(path), "verify": check}


STAGES = {
    "teacher": stage_teacher, "prune": stage_prune, "distill": stage_distill, "decompose": stage_decompose,
    "export": stage_export, "quantize": stage_quantize, "build": stage_build, "bench": stage_bench,
    "package": stage_package,
}


def _brief(m: dict | None) -> dict:
    if not m:
        return {}
    return {k: m[k] for k in ("accuracy", "macro_f1", "auc", "ece", "recall") if k in m}
