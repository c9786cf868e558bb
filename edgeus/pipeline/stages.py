"""The stages of ``compress``: thin adapters from a run's context to the stage functions that a
user can also call directly (``edgeus.prune.prune_model``, ``edgeus.distill.distill``, ...).

Each adapter takes ``(ctx, out_dir)``, reads the root config, passes each library function only its
own section plus the pieces it needs (data, loaders, a fine-tuning callable, the teacher), and
returns a :class:`StageResult`. The runner turns results into ledger rows without knowing any stage
by name: a result with a ``model`` is a torch row (its ONNX export, made once here, is what the
ledger times), a result with only ``onnx`` is an ONNX row, anything else a deploy row, and a result
with ``skipped`` a row that says why nothing was done.

Adapters never modify ``ctx.cfg``: a stage that needs different settings (the teacher's training,
the baseline INT8 of the teacher) composes a new section with :func:`section`.
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from edgeus.errors import EdgeusError

ORDER = ("teacher", "prune", "distill", "decompose", "export", "quantize", "build", "bench", "package")


@dataclass
class Baseline:
    """An extra ledger row a stage measures beside its own (e.g. ONNX Runtime INT8 of the teacher)."""
    label: str            # the row's name in the ledger
    onnx: str             # the ONNX file timed and evaluated
    like: str             # the stage whose params / MACs the row shows (its model's architecture)


@dataclass
class StageResult:
    """What one stage produced.

    ``report``: JSON-able, written to ``NN-<stage>/report.json``. ``model``: the torch model after the
    stage (torch stages only). ``checkpoint`` / ``onnx``: that model's checkpoint and ONNX export (for an
    ONNX stage, ``onnx`` is its output): the ledger measures ``onnx``. ``artifacts``: named paths merged
    into the run's artifacts (what later stages ``need``). ``skipped``: why the stage did nothing (a
    disabled stage, no engine for the target); a skipped stage changes nothing else. ``baselines``:
    extra ledger rows. ``export``: the export report of ``onnx`` (torch stages).
    """
    report: dict = field(default_factory=dict)
    model: Any = None
    checkpoint: str | None = None
    onnx: str | None = None
    artifacts: dict = field(default_factory=dict)
    skipped: str | None = None
    baselines: list = field(default_factory=list)
    export: dict | None = None
    gated: bool = False        # the recipe's clinical gates judge this stage's row against the teacher's
    role: str | None = None    # "teacher": this stage's model is the run's teacher
    publish: dict = field(default_factory=dict)   # {name at the top of the run directory: file}

    @property
    def kind(self) -> str:
        if self.skipped:
            return "skipped"
        if self.model is not None:
            return "torch"
        return "onnx" if self.onnx else "deploy"


def section(node, **overrides):
    """A new config section: ``node`` (a typed section of the run's config) with ``overrides``
    applied. ``node`` is never modified (callers never deep-copy and mutate the run's config)."""
    from omegaconf import OmegaConf

    return OmegaConf.merge(node, overrides) if overrides else node


def with_sections(cfg, **sections):
    """A new root config equal to ``cfg`` with whole sections replaced (for library functions that
    still take the root config). ``cfg`` is never modified."""
    from omegaconf import OmegaConf

    return OmegaConf.merge(cfg, {k: v for k, v in sections.items()})


def _student(ctx):
    """The model a compression stage starts from: ``ctx.model``; after an ensemble teacher, a copy of
    the member ``teacher.student_from`` names (default 0): the student keeps one model's cost."""
    from edgeus.models.ensemble import student_member

    return student_member(ctx.model, ctx.cfg.teacher.student_from)


def _teacher_for_finetune(ctx):
    return ctx.teacher if ctx.cfg.compress.teacher_guided else None


def needs_teacher(fn):
    """Stages after the teacher: refuse to run before a teacher exists (trained or resumed)."""
    import functools

    @functools.wraps(fn)
    def wrapper(ctx, out):
        if ctx.teacher is None:
            raise EdgeusError(f"stage {fn.__name__.removeprefix('stage_')} needs the teacher; "
                              "run the teacher stage first")
        return fn(ctx, out)
    return wrapper


def torch_result(ctx, out: Path, model, report: dict, stage: str, *, checkpoint: Path | None = None,
                 artifacts: dict | None = None, gated: bool = True) -> StageResult:
    """Save ``model`` as ``out/model.pt`` (unless ``checkpoint`` already holds it) and export it to
    ``out/model.onnx`` once; the ledger, the export stage and the quantize stage reuse that file."""
    from edgeus import config as C
    from edgeus.data.fingerprint import data_fingerprint
    from edgeus.onnx.export import export_onnx, parity_sample, target_opset
    from edgeus.train.checkpoint import read_checkpoint, save_checkpoint

    ckpt = out / "model.pt"
    if checkpoint is None:
        data = data_fingerprint(ctx.bundle, ctx.cfg.data)   # the images this model was trained on
        save_checkpoint(ckpt, model, classes=ctx.bundle.classes, preprocessing=ctx.bundle.preprocessing,
                        config=C.to_yaml(ctx.cfg), extra={"stage": stage, "recipe": ctx.cfg.recipe.name}, data=data)
    else:   # a checkpoint that carries its own fingerprint (a loaded teacher may have seen other images)
        data = read_checkpoint(checkpoint).get("data")
    onnx_path = out / "model.onnx"
    sample, source = parity_sample(ctx.bundle.val, int(ctx.cfg.export.parity_samples))
    exp = export_onnx(model, onnx_path, ctx.cfg.export, preprocessing=dict(ctx.bundle.preprocessing),
                      classes=list(ctx.bundle.classes), sample=sample, sample_source=source,
                      target_opset=target_opset(ctx.cfg.target), seed=int(ctx.cfg.seed), data=data)
    from edgeus.pipeline.ledger import write_json

    write_json(out / "export.json", exp)
    arts = {"model": str(ckpt), "onnx": str(onnx_path), "export_report": str(out / "export.json")}
    arts.update(artifacts or {})
    return StageResult(report=report, model=model, checkpoint=str(ckpt), onnx=str(onnx_path), artifacts=arts,
                       export=exp, gated=gated)


def stage_teacher(ctx, out: Path) -> StageResult:
    from edgeus import config as C
    from edgeus.models.ensemble import student_member
    from edgeus.train.checkpoint import load_checkpoint
    from edgeus.train.ensemble import ensemble_members, train_ensemble
    from edgeus.train.run import train_model

    cfg = ctx.cfg
    if cfg.teacher.checkpoint:
        model, ckpt = load_checkpoint(cfg.teacher.checkpoint)
        check_teacher_checkpoint(cfg, ckpt, ctx.bundle.classes)
        shutil.copyfile(cfg.teacher.checkpoint, out / "model.pt")
        report = {"source": "loaded", "checkpoint": str(cfg.teacher.checkpoint)}
    elif len(ensemble_members(cfg.teacher, cfg.model.name)) > 1:   # an ensemble teacher (averaged logits)
        train = section(cfg.train, **{**dict(cfg.teacher.train or {}), "out": str(out / "train")})
        model, report = train_ensemble(cfg.teacher, cfg.model, cfg.data, train, seed=int(cfg.seed),
                                       out_dir=out / "train", bundle=ctx.bundle, device=ctx.device,
                                       config_yaml=C.to_yaml(with_sections(cfg, train=train)))
        student_member(model, cfg.teacher.student_from)    # a bad teacher.student_from fails now, not after training
        res = torch_result(ctx, out, model, {"source": "trained", "epochs": int(train.epochs), **report}, "teacher",
                           gated=False)
        res.artifacts.update(teacher_model=res.checkpoint, teacher_onnx=res.onnx)
        res.role = "teacher"
        return res
    else:
        train = section(cfg.train, **{**dict(cfg.teacher.train or {}), "out": str(out / "train")})
        result, _ = train_model(cfg.model, cfg.data, train, seed=int(cfg.seed), out_dir=out / "train", bundle=ctx.bundle,
                                device=ctx.device, config_yaml=C.to_yaml(with_sections(cfg, train=train)))
        shutil.copyfile(result.best_path, out / "model.pt")
        model = result.model
        report = {"source": "trained", "epochs": int(train.epochs), "best_epoch": result.best_epoch,
                  "val": _brief(result.best_metrics)}
    res = torch_result(ctx, out, model, report, "teacher", checkpoint=out / "model.pt", gated=False)
    res.artifacts.update(teacher_model=res.checkpoint, teacher_onnx=res.onnx)
    res.role = "teacher"
    return res


@needs_teacher
def stage_prune(ctx, out: Path) -> StageResult:
    from edgeus.finetune import make_finetuner
    from edgeus.prune import example_input, prune_model

    ft = make_finetuner(ctx.cfg, ctx.bundle, teacher=_teacher_for_finetune(ctx), device=ctx.device)
    start = _student(ctx)
    model, report = prune_model(start, ctx.cfg.prune, finetune=ft, loaders=ft.loaders, device=ctx.device,
                                example_inputs=example_input(start, ctx.cfg.data.image_size, ctx.cfg.data.in_chans),
                                out_dir=out, channel_multiple=ctx.cfg.target.channel_multiple)
    return torch_result(ctx, out, model, report, "prune")


@needs_teacher
def stage_distill(ctx, out: Path) -> StageResult:
    from edgeus import config as C
    from edgeus.distill import distill
    from edgeus.train.run import build_model

    cfg = ctx.cfg
    student = _student(ctx)
    if cfg.distill.student:
        from edgeus.train.checkpoint import load_checkpoint

        if Path(cfg.distill.student).suffix in (".pt", ".pth"):
            student, _ = load_checkpoint(cfg.distill.student)
        else:
            model = section(cfg.model, name=cfg.distill.student, pretrained=None)
            model.kwargs = {}
            student = build_model(with_sections(cfg, model=model), len(ctx.bundle.classes))
    elif student is ctx.teacher:
        raise EdgeusError("the distill stage needs a student: set distill.student=<model name or checkpoint>, "
                          "or put a prune / decompose stage before it")
    weights = ctx.bundle.class_weights() if cfg.data.balance == "weights" else None
    student, report = distill(student, ctx.teacher, cfg.distill, loaders=ctx.train_loaders(), train_cfg=cfg.train,
                              classes=ctx.bundle.classes, preprocessing=ctx.bundle.preprocessing,
                              class_weights=weights, seed=int(cfg.seed), out_dir=out, device=ctx.device,
                              config_yaml=C.to_yaml(cfg))
    return torch_result(ctx, out, student, report, "distill")


@needs_teacher
def stage_decompose(ctx, out: Path) -> StageResult:
    from edgeus.decompose import decompose_model

    if not ctx.cfg.decompose.enabled:
        return StageResult(report={"stage": "decompose", "enabled": False}, skipped="decompose.enabled=false")
    from edgeus.finetune import make_finetuner

    ft = make_finetuner(ctx.cfg, ctx.bundle, teacher=_teacher_for_finetune(ctx), device=ctx.device)
    model, report = decompose_model(_student(ctx), ctx.cfg.decompose, image_size=ctx.cfg.data.image_size,
                                    in_chans=ctx.cfg.data.in_chans, finetune=ft,
                                    calib_loader=ft.loaders["train_plain"], device=ctx.device, out_dir=out,
                                    channel_multiple=ctx.cfg.target.channel_multiple)
    return torch_result(ctx, out, model, report, "decompose")


@needs_teacher
def stage_export(ctx, out: Path) -> StageResult:
    """The student's FP32 ONNX: the export its torch stage already made (and parity-checked)."""
    import json

    from edgeus.models.ensemble import is_ensemble

    if is_ensemble(ctx.model):
        raise EdgeusError("the student would be the whole ensemble teacher: with teacher.ensemble>1 or "
                          "teacher.members the recipe needs a prune, decompose or distill stage (the student "
                          "starts from one member, teacher.student_from)")
    src = Path(ctx.need("onnx", "teacher"))
    path = out / "student.fp32.onnx"
    shutil.copyfile(src, path)
    rep = ctx.artifacts.get("export_report")
    report = json.loads(Path(rep).read_text()) if rep and Path(rep).is_file() else {}
    report.update(path=str(path), source=str(src))
    return StageResult(report=report, onnx=str(path), artifacts={"fp32_onnx": str(path)},
                       publish={"student.fp32.onnx": str(path)})


@needs_teacher
def stage_quantize(ctx, out: Path) -> StageResult:
    from edgeus.data.fingerprint import data_fingerprint
    from edgeus.finetune import make_finetuner
    from edgeus.onnx.export import export_onnx, parity_sample, target_opset
    from edgeus.quantize import QATSetup, QDQLayout, inputs_from_bundle, quantize_onnx

    cfg = ctx.cfg
    fp32 = ctx.need("fp32_onnx", "export")
    teacher_onnx = ctx.need("teacher_onnx", "teacher")
    path = out / "student.int8.onnx"
    layout = QDQLayout.from_target(cfg.target)
    data = inputs_from_bundle(ctx.bundle, cfg.quantize)      # calibration (train) and evaluation (val) sets

    def export(model, onnx_path):  # QAT's fine-tuned model, exported like every torch stage's
        sample, source = parity_sample(ctx.bundle.val, int(cfg.export.parity_samples))
        return export_onnx(model, onnx_path, cfg.export, preprocessing=dict(ctx.bundle.preprocessing),
                           classes=list(ctx.bundle.classes), sample=sample, sample_source=source,
                           target_opset=target_opset(cfg.target), seed=int(cfg.seed),
                           data=data_fingerprint(ctx.bundle, cfg.data))

    qat = QATSetup(ctx.model, finetune=lambda fp32_model: make_finetuner(cfg, ctx.bundle, teacher=fp32_model,
                                                                         device=ctx.device),
                   export=export, device=ctx.device)
    report = quantize_onnx(fp32, path, cfg.quantize, layout=layout, target=cfg.target.name, **data, qat=qat,
                           teacher_onnx=teacher_onnx, out_dir=out / "work")
    res = StageResult(report=report, onnx=str(path), artifacts={"int8_onnx": str(path)}, gated=True,
                      publish={"student.int8.onnx": str(path)})
    if cfg.compress.baseline_int8:
        # the obvious alternative a user tries first: ONNX Runtime INT8 of the uncompressed teacher (PTQ alone)
        bpath = out / "teacher.int8.onnx"
        report["baseline"] = {"path": str(bpath),
                              "report": quantize_onnx(teacher_onnx, bpath, cfg.quantize, layout=layout,
                                                      target=cfg.target.name, **data, recovery=False,
                                                      out_dir=out / "work-baseline")}
        res.artifacts["teacher_int8_onnx"] = str(bpath)
        res.baselines.append(Baseline("baseline: teacher int8 (ORT)", str(bpath), like="teacher"))
    return res


@needs_teacher
def stage_build(ctx, out: Path) -> StageResult:
    from edgeus.deploy import build

    cfg = ctx.cfg
    onnx_path = ctx.need("int8_onnx", "quantize")
    if cfg.target.backend != "tensorrt":
        why = (f"target {cfg.target.name} runs the INT8 ONNX with {cfg.target.backend}; there is no engine to "
               f"build (the bundle carries the ONNX)")
        return StageResult(report={"skipped": True, "reason": why}, skipped=why)
    meta = {"classes": ctx.bundle.classes, "preprocessing": ctx.bundle.preprocessing,
            "recipe": cfg.recipe.name, "run": str(ctx.run_dir)}
    report = build(onnx_path, cfg.target, cfg.build, out, meta)
    return StageResult(report=report, artifacts={"build_dir": str(out)})


@needs_teacher
def stage_bench(ctx, out: Path) -> StageResult:
    """Teacher, INT8-only teacher and student (FP32, INT8) timed together with ``edgeus bench``."""
    from edgeus.pipeline.latency import measure_latency

    cfg = ctx.cfg
    models = {"teacher fp32": ctx.need("teacher_onnx", "teacher")}
    for key, name in (("teacher_int8_onnx", "teacher int8 (ORT only)"), ("fp32_onnx", "student fp32"),
                      ("int8_onnx", "student int8")):
        if ctx.artifacts.get(key):
            models[name] = ctx.artifacts[key]
    table = measure_latency(cfg, models, cfg.bench.iters, cfg.bench.warmup, cfg.bench.batch_sizes,
                            threads=cfg.compress.latency_threads, out=out / "bench.json")
    lines = ["| model | batch | median ms | p90 ms | speed-up vs teacher | bytes |", "|---|---|---|---|---|---|"]
    for b, lat in table.items():
        for n, v in lat.items():
            lines.append(f"| {n} | {b.split()[1]} | {v['median_ms']:.2f} | {v['p90_ms']:.2f} | "
                         f"{v['speedup']:.2f}× | {v['bytes']} |")
    (out / "latency.md").write_text("\n".join(lines) + "\n")
    return StageResult(report={"latency": table, "models": {n: str(p) for n, p in models.items()}})


@needs_teacher
def stage_package(ctx, out: Path) -> StageResult:
    from edgeus.deploy import package, verify

    cfg = ctx.cfg
    own = out / "bundle"
    bundle_dir = Path(cfg.package.out) if cfg.package.out else own
    if bundle_dir == own:
        # the stage's own bundle inside the run directory: a re-run of this stage replaces it
        shutil.rmtree(own, ignore_errors=True)
        Path(str(own) + ".tar.gz").unlink(missing_ok=True)
    metrics = {"student": ctx.state_metrics("final"), "teacher": ctx.state_metrics("teacher")}
    path = package(ctx.run_dir, bundle_dir, cfg.package, target=cfg.target, build_cfg=cfg.build,
                   data=ctx.bundle if cfg.package.golden_data else None,
                   data_preprocessing={k: list(cfg.data[k]) for k in ("mean", "std")}, seed=cfg.seed,
                   recipe=cfg.recipe.name,
                   fp32_onnx=ctx.artifacts.get("fp32_onnx"), int8_onnx=ctx.artifacts.get("int8_onnx"),
                   build_dir=ctx.artifacts.get("build_dir"), metrics=metrics)
    check = verify(path)
    ok = check.get("ok", True) if isinstance(check, dict) else bool(check)
    if not ok:
        raise EdgeusError(f"the bundle just written does not verify: {check}")
    return StageResult(report={"bundle": str(path), "verify": check}, artifacts={"bundle": str(path)})


def preflight_package(cfg, run_dir: Path) -> None:
    """Before anything runs: a bundle never replaces a user's folder or archive without
    package.overwrite=true (the bundle writer refuses too; this says so before hours of training)."""
    from edgeus.errors import UsageError

    if not cfg.package.out or cfg.package.overwrite:
        return
    out = Path(cfg.package.out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UsageError(f"package.out={cfg.package.out} exists and is not an empty directory; choose a new "
                         "package.out= or set package.overwrite=true to replace a bundle written there before")
    tar = out.with_name(out.name + ".tar.gz")
    if cfg.package.tar and tar.exists():
        raise UsageError(f"{tar} exists; choose a new package.out= or set package.overwrite=true")


def check_teacher_checkpoint(cfg, ckpt: dict, classes: list[str] | None = None) -> None:
    """A loaded teacher must see images as it was trained (size, channels, mean, std) and name the
    data's classes; a mismatch is an error that says which setting to change (never a silent resize)."""
    from edgeus.errors import CheckpointError

    path = cfg.teacher.checkpoint
    pre = ckpt.get("preprocessing") or {}
    want = {"image_size": int(cfg.data.image_size), "in_chans": int(cfg.data.in_chans),
            "mean": [float(v) for v in cfg.data.mean], "std": [float(v) for v in cfg.data.std]}
    diff = []
    for key, value in want.items():
        have = pre.get(key)
        if have is None:
            continue
        have = [float(v) for v in have] if isinstance(value, list) else int(have)
        if have != value:
            diff.append((key, have, value))
    if diff:
        raise CheckpointError(
            f"teacher.checkpoint={path} was trained with " + ", ".join(f"{k}={h}" for k, h, _ in diff)
            + "; this run prepares " + ", ".join(f"{k}={w}" for k, _, w in diff) + ": set "
            + " ".join(f"data.{k}={h}".replace(" ", "") for k, h, _ in diff) + " to use it, or train a new teacher")
    names = list(ckpt.get("classes") or [])
    if classes is not None and names and names != list(classes):
        raise CheckpointError(f"teacher.checkpoint={path} predicts {names}, the data has {list(classes)}")
    k = (ckpt.get("arch") or {}).get("num_classes")
    if k is not None and names and int(k) != len(names):
        raise CheckpointError(f"teacher.checkpoint={path}: its head has {k} outputs but it names {len(names)} "
                              f"classes {names}; the file is inconsistent")


def preflight_teacher(cfg, run_dir: Path) -> None:
    """A teacher checkpoint that does not fit the run is refused before any data loads."""
    if not cfg.teacher.checkpoint:
        return
    from edgeus.train.checkpoint import read_checkpoint

    ckpt = read_checkpoint(cfg.teacher.checkpoint)
    check_teacher_checkpoint(cfg, ckpt, list(cfg.data.classes) if cfg.data.classes else None)


# checks a stage makes before the run starts (and before a run directory is created)
PREFLIGHT: dict[str, Callable] = {"teacher": preflight_teacher, "package": preflight_package}

# the config sections a stage's result depends on: a resume that changes one runs that stage again
SETTINGS: dict[str, tuple] = {
    "teacher": ("teacher", "train", "model", "data"), "prune": ("prune",), "distill": ("distill",),
    "decompose": ("decompose",), "export": ("export",), "quantize": ("quantize",), "build": ("build",),
    "bench": ("bench",), "package": ("package",),
}

STAGES: dict[str, Callable] = {
    "teacher": stage_teacher, "prune": stage_prune, "distill": stage_distill, "decompose": stage_decompose,
    "export": stage_export, "quantize": stage_quantize, "build": stage_build, "bench": stage_bench,
    "package": stage_package,
}


def _brief(m: dict | None) -> dict:
    if not m:
        return {}
    return {k: m[k] for k in ("accuracy", "macro_f1", "auc", "ece", "recall") if k in m}
