"""``compress``: run a recipe's stages in order over one run directory.

    runs/<recipe>-<time>-<suffix>/
        config.yaml            the resolved configuration
        state.json             finished stages, their artifacts and ledger rows (for resume)
        ledger.json, ledger.md one row per stage: params, MACs, bytes, latency, clinical metrics, time
        00-teacher/ 01-prune/ ...  each stage's artifacts (model.pt, model.onnx, report.json, ...)
        robustness.json, report.md, report.html, figures/

Every file is written under a temporary name and renamed, so a run killed at any moment can be
resumed with ``resume=<run dir>``: finished stages are not redone, an interrupted stage restarts
(training inside it continues from its last epoch).

The runner knows no stage by name: each stage returns a :class:`~edgeus.pipeline.stages.StageResult`
and its kind (torch model, ONNX file, deploy step, skipped) decides the ledger row.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from edgeus.errors import EdgeusError, GateError
from edgeus.pipeline import gates as G
from edgeus.pipeline.ledger import markdown, write_json
from edgeus.pipeline.stages import ORDER, STAGES, StageResult

log = logging.getLogger("edgeus.compress")


@dataclass
class Context:
    cfg: object
    run_dir: Path
    bundle: object
    device: str
    state: dict
    teacher: object = None
    model: object = None
    artifacts: dict = field(default_factory=dict)    # what the stages before the current one produced
    outputs: dict = field(default_factory=dict)      # {stage: its artifacts} of every finished stage
    teacher_path: str | None = None
    model_path: str | None = None
    _eval_loader: object = None

    def all_artifacts(self) -> dict:
        arts: dict = {}
        for s in self.cfg.recipe.stages:
            arts.update(self.outputs.get(s, {}))
        return arts

    def need(self, key: str, stage: str) -> str:
        if not self.artifacts.get(key):
            raise EdgeusError(f"this stage needs the output of the '{stage}' stage ({key}); run it first "
                              f"(stages=[...] or resume=<run>)")
        return self.artifacts[key]

    def eval_loader(self):
        """The test split's loader, built once per run (building a loader draws no random numbers;
        each pass over it draws one, as before)."""
        if self._eval_loader is None:
            from edgeus.data import build_loaders

            self._eval_loader = build_loaders(self.bundle, self.cfg.data)["test"]
        return self._eval_loader

    def train_loaders(self) -> dict:
        """Fresh loaders for a training stage: the train loader's shuffling generator is seeded when it
        is built, so each stage gets its own (sharing one would change every later stage's order)."""
        from edgeus.data import build_loaders

        return build_loaders(self.bundle, self.cfg.data)

    def state_metrics(self, which: str) -> dict:
        rows = [r for r in self.state["rows"] if r.get("metrics")]
        if not rows:
            return {}
        if which == "teacher":
            return next((r["metrics"] for r in rows if r["stage"] == self.state.get("teacher_stage")), {})
        return [r for r in rows if not r.get("of")][-1]["metrics"]


def _stage_dir(run_dir: Path, stages: list[str], name: str) -> Path:
    return run_dir / f"{stages.index(name):02d}-{name}"


def _file_bytes(path) -> int | None:
    p = Path(path) if path else None
    return p.stat().st_size if p and p.is_file() else None


def _metrics(model_or_onnx, ctx, save: Path | None = None) -> dict:
    """Test-split metrics (one pass over the test loader, as edgeus.evaluate.evaluate_model makes);
    the per-image labels and probabilities go to ``save`` (.npz) for the gates' paired comparison."""
    import numpy as np

    from edgeus.evaluate import compute_metrics, predict_onnx, predict_torch

    if isinstance(model_or_onnx, (str, Path)):
        y, p = predict_onnx(str(model_or_onnx), ctx.eval_loader())
    else:
        y, p = predict_torch(model_or_onnx, ctx.eval_loader(), ctx.device)
    if save is not None:
        tmp = save.with_name(f".{save.stem}.tmp-{os.getpid()}.npz")
        np.savez(tmp, labels=y, probs=p)
        os.replace(tmp, save)
    m = compute_metrics(y, p, ctx.bundle.classes)
    out = {k: m[k] for k in ("accuracy", "macro_f1", "recall", "auc", "ece", "confusion", "n", "per_class")}
    from edgeus.segmentation import brief, segmentation_metrics

    seg = segmentation_metrics(model_or_onnx, ctx.eval_loader(), ctx.device)   # two-stage: Dice / IoU of its mask
    if seg:
        out.update(brief(seg))
        if save is not None:
            write_json(save.with_name("segmentation.json"), seg)     # per image
    return out


def brief_comparison(cmp: dict) -> dict:
    """What a ledger row keeps of :func:`edgeus.stats.compare`: intervals of student − teacher (accuracy,
    macro-F1, AUC, each class's recall), the exact McNemar test and the flips per class."""
    keep = {k: v for k, v in cmp["intervals"].items() if k == "accuracy" or k == "macro_f1" or k == "auc"
            or k.startswith("recall/")}
    return {"n": cmp["n"], "intervals": keep, "mcnemar": cmp["mcnemar"], "flips": cmp["flips"],
            "agreement": cmp["agreement"], "confidence": cmp["intervals"]["_meta"]["confidence"]}


def _comparison(ctx, row: dict) -> dict | None:
    """stats.compare of the teacher's and this row's test predictions (same images), for the gates."""
    import numpy as np

    from edgeus.stats import compare

    teacher = next((r for r in ctx.state["rows"] if r["stage"] == ctx.state.get("teacher_stage")), None)
    paths = [ctx.run_dir / r["predictions"] for r in (teacher, row) if r and r.get("predictions")]
    if len(paths) != 2 or not all(p.is_file() for p in paths):
        return None
    (t, s) = [np.load(p) for p in paths]
    if not np.array_equal(t["labels"], s["labels"]):
        return None
    g = ctx.cfg.gates
    return compare(t["labels"], t["probs"], s["probs"], ctx.bundle.classes, n_boot=int(g.n_boot),
                   seed=int(ctx.cfg.seed))


def _latency(ctx, onnx_path) -> tuple[float | None, float | None]:
    from edgeus.pipeline.latency import measure_latency

    teacher = ctx.artifacts.get("teacher_onnx")
    models = {"teacher": teacher, "model": str(onnx_path)} if teacher and teacher != str(onnx_path) else \
        {"model": str(onnx_path)}
    c = ctx.cfg.compress
    lat = measure_latency(ctx.cfg, models, c.latency_iters, c.latency_warmup, threads=c.latency_threads)
    lat = lat["batch 1"]["model"]
    return lat["median_ms"], lat["speedup"]


def _rel(ctx, path) -> str | None:
    """A path inside the run directory as relative to it (a copied run directory still works)."""
    if not path:
        return path
    p = Path(path)
    try:
        return p.absolute().relative_to(ctx.run_dir).as_posix()
    except ValueError:
        return str(path)


def _torch_row(ctx, name: str, res: StageResult, out: Path, wall: float) -> dict:
    from edgeus.models.profile import count_macs, count_params

    pre = ctx.bundle.preprocessing
    ms, speed = _latency(ctx, res.onnx)
    pred = out / "predictions.npz"
    return {"stage": name, "kind": "torch", "artifact": _rel(ctx, res.checkpoint), "onnx": _rel(ctx, res.onnx),
            "params": count_params(res.model), "macs": count_macs(res.model, pre["image_size"], pre["in_chans"]),
            "bytes": _file_bytes(res.onnx), "checkpoint_bytes": _file_bytes(res.checkpoint), "latency_ms": ms,
            "speedup": speed, "metrics": _metrics(res.model, ctx, pred), "predictions": _rel(ctx, pred),
            "wall_s": wall, "export": _brief_export(res.export)}


def _brief_export(exp: dict | None) -> dict:
    return {k: exp[k] for k in ("max_abs_diff", "top1_agreement", "opset", "exporter") if isinstance(exp, dict) and k in exp}


def _onnx_row(ctx, name: str, path: str, wall: float, like: dict | None, of: str | None = None,
              pred: Path | None = None) -> dict:
    ms, speed = _latency(ctx, path)
    row = {"stage": name, "kind": "onnx", "artifact": _rel(ctx, path), "params": (like or {}).get("params"),
           "macs": (like or {}).get("macs"), "bytes": _file_bytes(path), "latency_ms": ms, "speedup": speed,
           "metrics": _metrics(str(path), ctx, pred), "wall_s": wall}
    if pred is not None:
        row["predictions"] = _rel(ctx, pred)
    if of:
        row["of"] = of          # a baseline row measured by stage ``of``
    return row


def _last_torch_row(state) -> dict | None:
    rows = [r for r in state["rows"] if r["kind"] == "torch"]
    return rows[-1] if rows else None


def _rows(ctx, name: str, res: StageResult, out: Path, wall: float) -> list[dict]:
    """The ledger rows of one stage's result, by its kind."""
    state = ctx.state
    if res.kind == "skipped":
        rows = [{"stage": name, "kind": "skipped", "skipped": res.skipped, "wall_s": wall}]
    elif res.kind == "torch":
        rows = [_torch_row(ctx, name, res, out, wall)]
    elif res.kind == "onnx":
        rows = [_onnx_row(ctx, name, res.onnx, wall, _last_torch_row(state), pred=out / "predictions.npz")]
    else:
        rows = [{"stage": name, "kind": "deploy", "wall_s": wall, "artifact": _rel(ctx, out)}]
    for b in res.baselines:
        like = next((r for r in state["rows"] if r["stage"] == (state.get("teacher_stage") if b.like == "teacher"
                                                                    else b.like)), None)
        slug = "".join(c if c.isalnum() else "_" for c in b.label).strip("_")
        rows.append(_onnx_row(ctx, b.label, b.onnx, 0.0, like, of=name, pred=out / f"predictions.{slug}.npz"))
    return rows


def _save_state(ctx) -> None:
    ctx.state["outputs"] = {s: {k: _rel(ctx, v) for k, v in a.items()} for s, a in ctx.outputs.items()}
    ctx.state["artifacts"] = {k: _rel(ctx, v) for k, v in ctx.all_artifacts().items()}
    write_json(ctx.run_dir / "state.json", ctx.state)
    rows = ctx.state["rows"]
    write_json(ctx.run_dir / "ledger.json", {"recipe": ctx.cfg.recipe.name, "data": ctx.bundle.name,
                                             "classes": ctx.bundle.classes, "rows": rows,
                                             "gates": ctx.state.get("gates", [])})
    (ctx.run_dir / "ledger.md").write_text(markdown(rows, ctx.bundle.classes, ctx.cfg.gates.critical_class))
    write_json(ctx.run_dir / "metrics.json", {"student": ctx.state_metrics("final"),
                                              "teacher": ctx.state_metrics("teacher")})


def _resolve(run_dir: Path, artifacts: dict) -> dict:
    out = {}
    for k, v in artifacts.items():
        p = Path(v) if isinstance(v, str) else None
        out[k] = str(run_dir / p) if p is not None and not p.is_absolute() else v
    return out


def _publish(ctx, res: StageResult) -> None:
    """The files a user (and ``edgeus package runs/<run>``) looks for at the top of the run directory
    (``student.fp32.onnx``, ``student.int8.onnx``): hard links to the stage's files (copies where
    links are not possible)."""
    import os
    import shutil

    for name, src in res.publish.items():
        dst = ctx.run_dir / name
        tmp = dst.with_name(f".{name}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


def _fresh_state(cfg) -> dict:
    return {"version": 2, "done": [], "rows": [], "outputs": {}, "artifacts": {}, "gates": [], "settings": {},
            "changes": [], "commands": []}


def _data_fingerprint(bundle) -> str:
    """What the run was trained on: image ids, labels and pixels of every split (sha256, 16 hex digits)."""
    import hashlib

    import numpy as np

    h = hashlib.sha256(bundle.fingerprint().encode())
    images = bundle.train.images
    h.update(np.ascontiguousarray(images.labels).tobytes())
    h.update(np.ascontiguousarray(images.pixels).tobytes())
    h.update(repr(sorted(bundle.preprocessing.items())).encode())
    return h.hexdigest()[:16]


def _fresh_run_dir(cfg) -> tuple[Path, bool]:
    """(run directory, whether it must still be created). Never a directory with someone else's files."""
    import secrets

    from edgeus.errors import UsageError

    if cfg.out:
        run_dir = Path(cfg.out).absolute()
        if (run_dir / "state.json").exists() or (run_dir / "config.yaml").exists():
            raise UsageError(f"out={cfg.out} already holds a run; continue it with resume={cfg.out}, "
                             "or choose a new out=")
        if run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())):
            raise UsageError(f"out={cfg.out} exists and is not an empty directory; compress never writes into "
                             "(or deletes) a folder of yours: choose a new out=")
        return run_dir, True
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return Path(cfg.out_dir).absolute() / f"{cfg.recipe.name}-{stamp}-{secrets.token_hex(3)}", True


def _create_run_dir(run_dir: Path, cfg) -> None:
    """Create the run directory exclusively: two runs never share one (same second, same out=)."""
    from edgeus import config as C
    from edgeus.errors import UsageError

    run_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        run_dir.mkdir(exist_ok=bool(cfg.out))
        fd = os.open(run_dir / "state.json", os.O_CREAT | os.O_EXCL | os.O_WRONLY)   # the claim on the directory
    except FileExistsError:
        raise UsageError(f"{run_dir} was just taken by another run; choose a new out=") from None
    os.write(fd, json.dumps(_fresh_state(cfg)).encode())
    os.close(fd)
    C.save(cfg, run_dir / "config.yaml")


# what a resume may change: settings that only measure or report (applied, nothing re-runs), and the
# settings of a stage after the teacher (applied: that stage and every later one run again)
SAFE_ON_RESUME = ("resume", "stages", "device", "compress.latency_iters", "compress.latency_warmup",
                  "compress.latency_threads", "compress.report", "compress.robustness", "robustness")


def _override_key(item: str) -> str:
    return item.partition("=")[0].strip().lstrip("+")


def _resume_overrides(cfg, saved) -> tuple[object, list[str]]:
    """Apply the resume command's key=value arguments to the saved config: the safe ones and those of
    stage settings; refuse every other by name. Returns (config, applied keys)."""
    from omegaconf import OmegaConf

    from edgeus.config import ConfigError
    from edgeus.pipeline.stages import SETTINGS

    stage_sections = {sec for name, secs in SETTINGS.items() if name in saved.recipe.stages
                      for sec in secs if name != saved.recipe.stages[0]}
    applied, refused = [], []
    for item in list(cfg.command_line or []):
        key = _override_key(item)
        top = key.split(".")[0]
        if key in ("resume", "stages"):
            continue
        if any(key == k or key.startswith(k + ".") for k in SAFE_ON_RESUME) or top in stage_sections:
            applied.append(key)
        else:
            refused.append(key)
    if refused:
        raise ConfigError(
            f"resume= cannot change {', '.join(refused)}: the run's finished stages were made with the saved "
            f"values (a resume may change only the settings of the stages after the teacher: "
            f"{', '.join(sorted(stage_sections)) or 'none'}, and {', '.join(SAFE_ON_RESUME[2:])}). "
            "Start a new run for the others.")
    for key in applied:
        OmegaConf.update(saved, key, OmegaConf.select(cfg, key), merge=False)
    return saved, applied


def _open_resume(cfg) -> tuple[object, Path, dict, list[str]]:
    from omegaconf import OmegaConf

    from edgeus import config as C
    from edgeus.errors import InputError

    run_dir = Path(cfg.resume).absolute()
    if not run_dir.is_dir():
        raise InputError(f"resume={cfg.resume}: no such directory")
    if not (run_dir / "state.json").is_file() or not (run_dir / "config.yaml").is_file():
        trained = any((run_dir / n).is_file() for n in ("last.pt", "best.pt"))
        raise InputError(f"resume={cfg.resume}: not a compress run directory (no state.json)"
                         + ("; it is a train output folder: continue it with edgeus train train.out="
                            f"{cfg.resume}" if trained else ""))
    try:
        saved = OmegaConf.merge(OmegaConf.structured(C.EdgeusConfig), OmegaConf.load(run_dir / "config.yaml"))
        state = json.loads((run_dir / "state.json").read_text())
    except Exception as e:
        raise InputError(f"resume={cfg.resume}: its config.yaml or state.json cannot be read "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    saved, applied = _resume_overrides(cfg, saved)
    saved.resume = str(run_dir)
    saved.stages = list(cfg.stages) if cfg.stages else None
    saved.command_line = list(cfg.command_line or [])
    if "outputs" not in state:     # a state.json of an earlier version: every artifact belongs to its last stage
        state["outputs"] = {state["done"][-1]: state.get("artifacts", {})} if state.get("done") else {}
    for k, v in _fresh_state(saved).items():
        state.setdefault(k, v)
    return saved, run_dir, state, applied


def _invalidate(ctx, recipe_stages: list[str], applied: list[str]) -> list[str]:
    """Stages whose recorded settings differ from the (resumed) config: they and every later stage run
    again. Returns the stages invalidated; the change is recorded in state["changes"]."""
    from edgeus.pipeline.stages import SETTINGS

    state, first = ctx.state, None
    for name in recipe_stages:
        rec = state["settings"].get(name)
        if name in state["done"] and rec is not None and rec != _settings(ctx.cfg, name):
            first = name
            break
    if first is None:
        return []
    again = recipe_stages[recipe_stages.index(first):]
    state["changes"].append({"time": time.strftime("%Y-%m-%d %H:%M:%S"), "keys": applied, "stage": first,
                             "from": state["settings"].get(first), "to": _settings(ctx.cfg, first),
                             "runs_again": again})
    state["done"] = [s for s in state["done"] if s not in again]
    state["rows"] = [r for r in state["rows"] if r["stage"] not in again and r.get("of") not in again]
    state["gates"] = [g for g in state.get("gates", []) if g["stage"] not in again]
    for s in again:
        ctx.outputs.pop(s, None)
    return again


def _settings(cfg, name: str) -> dict:
    from omegaconf import OmegaConf

    from edgeus.pipeline.stages import SETTINGS

    return {sec: OmegaConf.to_container(cfg[sec], resolve=True) for sec in SETTINGS.get(name, ())
            if sec in cfg}


def failed_gates(run_dir) -> list[dict]:
    """The enforced clinical gates a compress run directory failed ([] when none, or not enforced).
    Commands that ship a run's models (``edgeus package runs/<run>``) refuse a run with any."""
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    state_path, cfg_path = run_dir / "state.json", run_dir / "config.yaml"
    if not state_path.is_file():
        return []
    state = json.loads(state_path.read_text())
    enforce = OmegaConf.select(OmegaConf.load(cfg_path), "gates.enforce", default=True) if cfg_path.is_file() else True
    return G.failures(state.get("gates", [])) if enforce else []


def _failed_gates(state, cfg) -> list[dict]:
    return G.failures(state.get("gates", [])) if cfg.gates.enforce else []


def _load_model(ctx, path: str | None):
    from edgeus.train.checkpoint import load_checkpoint

    if not path:
        return None
    if ctx.teacher is not None and ctx.teacher_path and Path(path) == Path(ctx.teacher_path):
        return ctx.teacher
    return load_checkpoint(path)[0]


def _enter_stage(ctx, recipe_stages: list[str], name: str | None) -> None:
    """Artifacts (and models) as the finished stages before ``name`` left them (all of them: None)."""
    arts: dict = {}
    for s in recipe_stages[:recipe_stages.index(name) if name else len(recipe_stages)]:
        arts.update(ctx.outputs.get(s, {}))
    ctx.artifacts = arts
    if arts.get("teacher_model") and arts["teacher_model"] != ctx.teacher_path:
        ctx.teacher, ctx.teacher_path = None, None
        ctx.teacher = _load_model(ctx, arts["teacher_model"])
        ctx.teacher_path = arts["teacher_model"]
    if arts.get("model") != ctx.model_path:
        ctx.model, ctx.model_path = _load_model(ctx, arts.get("model")), arts.get("model")


def compress(cfg) -> dict:
    """Run (or resume) a recipe. Returns {"run_dir", "ledger", "report", "bundle", "gates", "headline"}.

    A new run gets a new directory (``out=`` must not exist or be empty); ``resume=<run dir>`` continues
    one, with the same data, applying only safe overrides and stage settings (the changed stage and
    every later one run again). Raises :class:`GateError` (exit code 3) after writing the ledger and
    report when a clinical gate fails, and again on every resume that does not change the failed
    stage's settings; no bundle is written for such a run.
    """
    from edgeus.config import validate
    from edgeus.data import build_datasets
    from edgeus.errors import UsageError
    from edgeus.pipeline.stages import PREFLIGHT
    from edgeus.train.run import resolve_device

    applied: list[str] = []
    if cfg.resume:
        cfg, run_dir, state, applied = _open_resume(cfg)
        create = False
    else:
        validate(cfg)
        if not cfg.recipe.stages:
            raise UsageError("no stages to run: pick a recipe (recipe=rsmas_int8; see `edgeus recipes`)")
        run_dir, create = _fresh_run_dir(cfg)
        state = _fresh_state(cfg)
    validate(cfg)
    G.check_critical_class(cfg.gates, cfg.data)    # an unknown critical class: refused before anything runs
    recipe_stages = list(cfg.recipe.stages)
    unknown = [s for s in recipe_stages if s not in STAGES]
    if unknown:
        raise UsageError(f"recipe {cfg.recipe.name}: unknown stage(s) {unknown}; stages are {list(ORDER)}")
    selected = list(cfg.stages) if cfg.stages else recipe_stages
    bad = [s for s in selected if s not in recipe_stages]
    if bad:
        raise UsageError(f"stages={selected}: {bad} not in recipe {cfg.recipe.name} ({recipe_stages})")
    for name in selected:
        if name in PREFLIGHT:
            PREFLIGHT[name](cfg, run_dir)
    device = resolve_device(cfg.device)
    bundle = build_datasets(cfg.data)
    fingerprint = _data_fingerprint(bundle)
    if state.get("data_fingerprint") and state["data_fingerprint"] != fingerprint:
        from edgeus.errors import InputError

        raise InputError(f"resume={cfg.resume}: the data differs from the run's (fingerprint {fingerprint}, the run "
                         f"was made with {state['data_fingerprint']}): a run continues only on its own data; "
                         "start a new run")
    state["data_fingerprint"] = fingerprint
    if create:
        _create_run_dir(run_dir, cfg)
    log_handler = _start_log(run_dir)
    try:
        return _run(cfg, run_dir, state, bundle, device, recipe_stages, selected, applied)
    except KeyboardInterrupt:
        _runlog.info("interrupted")
        print(f"\ninterrupted: finished stages are kept; continue with: edgeus compress resume={run_dir}",
              file=sys.stderr, flush=True)
        raise
    finally:
        logging.getLogger().removeHandler(log_handler)
        log_handler.close()


def _run(cfg, run_dir, state, bundle, device, recipe_stages, selected, applied) -> dict:
    state["commands"].append({"time": time.strftime("%Y-%m-%d %H:%M:%S"),
                              "command": " ".join(["edgeus", "compress", *cfg.command_line])})
    with open(run_dir / "command.txt", "a") as f:
        f.write(state["commands"][-1]["command"] + "\n")
    say(f"edgeus compress: recipe {cfg.recipe.name} -> {run_dir}")
    say(f"  data {bundle.summary()}")
    ctx = Context(cfg=cfg, run_dir=run_dir, bundle=bundle, device=device, state=state,
                  outputs={s: _resolve(run_dir, a) for s, a in state.get("outputs", {}).items()})
    again = _invalidate(ctx, recipe_stages, applied) if cfg.resume else []
    if again:
        say(f"  resume: {', '.join(applied)} changed; stages {', '.join(again)} run again")
    elif applied:
        say(f"  resume: {', '.join(applied)} applied")
    failed = _failed_gates(state, cfg)
    if failed:
        _save_state(ctx)
        stages = sorted({g["stage"] for g in failed})
        raise GateError(
            f"this run failed its clinical gates at {', '.join(stages)} and the resume does not change "
            f"{'that stage' if len(stages) == 1 else 'those stages'}' settings ("
            + ", ".join(f"{s}.*" for s in stages) + "): nothing more runs and no bundle is written. "
            "Failed: " + "; ".join(G.describe(g) for g in failed))
    gate_failures = []
    for i, name in enumerate(recipe_stages):
        if name not in selected:
            continue
        if name in state["done"] and not cfg.stages:
            say(f"[{i + 1}/{len(recipe_stages)}] {name}: done (resumed)")
            continue
        _enter_stage(ctx, recipe_stages, name)
        out = _stage_dir(run_dir, recipe_stages, name)
        out.mkdir(parents=True, exist_ok=True)
        say(f"[{i + 1}/{len(recipe_stages)}] {name} ...")
        t0 = time.time()
        res = STAGES[name](ctx, out)
        wall = time.time() - t0
        if res.role == "teacher":
            ctx.teacher, ctx.teacher_path = res.model, res.artifacts.get("teacher_model")
            state["teacher_stage"] = name
        if res.model is not None:
            ctx.model, ctx.model_path = res.model, res.artifacts.get("model")
        ctx.outputs[name] = dict(res.artifacts)
        ctx.artifacts.update(res.artifacts)
        _publish(ctx, res)
        write_json(out / "report.json", res.report)
        state["rows"] = [r for r in state["rows"] if r["stage"] != name and r.get("of") != name]
        rows = _rows(ctx, name, res, out, wall)
        comparisons = {}
        for r in rows:       # every model row against the teacher on the same images (edgeus.stats)
            if r.get("predictions") and res.role != "teacher":
                comparisons[r["stage"]] = _comparison(ctx, r)
                if comparisons[r["stage"]] is not None:
                    r["vs_teacher"] = brief_comparison(comparisons[r["stage"]])
        state["rows"].extend(rows)
        state["settings"][name] = _settings(cfg, name)
        if res.gated and rows[0].get("metrics"):
            teacher_m = ctx.state_metrics("teacher")
            results = G.check(name, teacher_m, rows[0]["metrics"], cfg.gates, bundle.classes,
                              comparison=comparisons.get(rows[0]["stage"]))
            state["gates"] = [g for g in state.get("gates", []) if g["stage"] != name] + results
            gate_failures = G.failures(results)
        if name not in state["done"]:
            state["done"].append(name)
        _save_state(ctx)
        _print_row(name, rows[0], wall)
        if gate_failures and cfg.gates.enforce:
            break
    _enter_stage(ctx, recipe_stages, None)      # robustness and report see every finished stage's outputs
    result = {"run_dir": str(run_dir), "ledger": str(run_dir / "ledger.md"),
              "bundle": ctx.all_artifacts().get("bundle"), "gates": state.get("gates", []),
              "enforced": bool(cfg.gates.enforce)}
    _finish(ctx, result)
    result["headline"] = headline(state["rows"], bundle.classes, cfg.gates.critical_class)
    if gate_failures and cfg.gates.enforce:
        err = GateError("clinical gate failed — " + "; ".join(G.describe(g) for g in gate_failures) +
                        f". Artifacts kept in {run_dir}; no bundle is written. Change the stage's settings "
                        f"and continue with resume={run_dir} <stage>.<key>=<value>")
        err.result = result
        raise err
    return result


def say(msg: str) -> None:
    """A progress line: on stdout (unless -q) and in the run's run.log."""
    import os

    if not os.environ.get("EDGEUS_QUIET"):
        print(msg, flush=True)
    _runlog.info(msg)


_runlog = logging.getLogger("edgeus.run")
_runlog.propagate = False
_runlog.setLevel(logging.INFO)


def _start_log(run_dir: Path) -> logging.Handler:
    """run.log in the run directory: the progress lines and every library log record (appended on resume)."""
    h = logging.FileHandler(run_dir / "run.log", encoding="utf-8")
    h.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    h.setLevel(logging.INFO)
    logging.getLogger().addHandler(h)
    _runlog.handlers = [h]
    return h


def headline(rows: list[dict], classes: list[str], critical: str | None = None) -> dict:
    """Teacher against the final student (the last model row that is not a baseline): size, speed, accuracy."""
    models = [r for r in rows if r.get("metrics")]
    teacher = models[0] if models else None
    students = [r for r in models[1:] if not r.get("of")]
    if not teacher or not students:
        return {}
    s = students[-1]
    crit = critical if critical in classes else None
    out = {"teacher": teacher["stage"], "student": s["stage"],
           "bytes": [teacher.get("bytes"), s.get("bytes")], "params": [teacher.get("params"), s.get("params")],
           # both latencies from the student row's own timing block (the teacher timed beside it)
           "latency_ms": [s["latency_ms"] * s["speedup"] if s.get("latency_ms") and s.get("speedup") else None,
                          s.get("latency_ms")], "speedup": s.get("speedup"),
           "accuracy": [teacher["metrics"]["accuracy"], s["metrics"]["accuracy"]]}
    if crit:
        out["critical"] = {"class": crit, "recall": [teacher["metrics"]["recall"][crit], s["metrics"]["recall"][crit]]}
    return out


def headline_text(h: dict) -> str:
    if not h:
        return ""
    tb, sb = h["bytes"]
    size = (f"size:     {tb / 2**20:.2f} MB -> {sb / 2**20:.2f} MB ({tb / sb:.1f}x smaller, {h['student']} vs teacher)"
            if tb and sb else "size:     n/a")
    tl, sl = h["latency_ms"]
    speed = (f"speed:    {tl:.2f} ms -> {sl:.2f} ms per image ({h['speedup']:.2f}x{', slower' if h['speedup'] < 1 else ''};"
             f" ONNX Runtime CPU, batch 1, timed with the teacher)" if tl and sl and h.get("speedup") else "speed:    n/a")
    ta, sa = h["accuracy"]
    acc = f"accuracy: {ta:.3f} -> {sa:.3f} test ({(sa - ta) * 100:+.1f} pt)"
    if h.get("critical"):
        c = h["critical"]
        acc += f"; {c['class']} recall {c['recall'][0]:.3f} -> {c['recall'][1]:.3f} ({(c['recall'][1] - c['recall'][0]) * 100:+.1f} pt)"
    return "\n".join([size, speed, acc])


def _print_row(name: str, r0: dict, wall: float) -> None:
    if r0.get("skipped"):
        say(f"    {name}: skipped ({r0['skipped']})")
    if not r0.get("metrics"):
        return
    m = r0["metrics"]
    say(f"    {name}: acc {m['accuracy']:.3f}  macro-F1 {m['macro_f1']:.3f}  "
          f"{'params %.2fM  ' % (r0['params'] / 1e6) if r0.get('params') else ''}"
          f"{'MACs %.1fM  ' % (r0['macs'] / 1e6) if r0.get('macs') else ''}"
          f"{'%.2f ms (%.2fx vs teacher)  ' % (r0['latency_ms'], r0['speedup']) if r0.get('latency_ms') else ''}"
          f"[{wall:.0f} s]")


def _finish(ctx, result: dict) -> None:
    cfg = ctx.cfg
    if cfg.compress.robustness and ctx.teacher is not None:
        from edgeus.pipeline.robustness import evaluate_robustness, fragility

        student = ctx.artifacts.get("int8_onnx") or ctx.model
        if student is not None and student is not ctx.teacher:
            say("robustness: teacher and student under speckle / gain / blur / shadow ...")
            rob = evaluate_robustness({"teacher": ctx.teacher, "student": student}, ctx.eval_loader(),
                                      ctx.bundle.classes, ctx.bundle.preprocessing, list(cfg.robustness.corruptions),
                                      list(cfg.robustness.strengths), seed=int(cfg.seed))
            rob["summary"] = fragility(rob, "teacher", "student")
            write_json(ctx.run_dir / "robustness.json", rob)
    if cfg.compress.report:
        from edgeus.pipeline.report import write_report

        paths = write_report(ctx.run_dir, bundle=ctx.bundle)
        result["report"] = str(paths["html"])


def main_summary(result: dict) -> str:
    lines = [f"run:     {result['run_dir']}", f"ledger:  {result['ledger']}"]
    if result.get("report"):
        lines.append(f"report:  {result['report']}")
    if result.get("bundle"):
        lines.append(f"bundle:  {result['bundle']}   (check it: edgeus verify {result['bundle']})")
    gates = result.get("gates", [])
    failed, weak = G.failures(gates), G.underpowered(gates)
    text = ("not evaluated" if not gates else f"{len(failed)} failed" if failed else
            "all passed" if not weak else f"none failed, {len(weak)} underpowered (the test split is too small to tell)")
    if failed and not result.get("enforced", True):
        text += " (not enforced)"
    lines.append("gates:   " + text)
    head = headline_text(result.get("headline") or {})
    return "\n".join(lines) + ("\n\n" + head if head else "")


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: edgeus compress recipe=<name>")
