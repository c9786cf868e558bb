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

import logging
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
    artifacts: dict = field(default_factory=dict)
    _eval_loader: object = None

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


def _metrics(model_or_onnx, ctx) -> dict:
    from edgeus.evaluate import evaluate_model

    torch_model = not isinstance(model_or_onnx, (str, Path))
    m = evaluate_model(model_or_onnx, ctx.eval_loader(), ctx.bundle.classes, ctx.device if torch_model else "cpu")
    return {k: m[k] for k in ("accuracy", "macro_f1", "recall", "auc", "ece", "confusion", "n")}


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


def _torch_row(ctx, name: str, res: StageResult, wall: float) -> dict:
    from edgeus.models.profile import count_macs, count_params

    pre = ctx.bundle.preprocessing
    ms, speed = _latency(ctx, res.onnx)
    return {"stage": name, "kind": "torch", "artifact": _rel(ctx, res.checkpoint), "onnx": _rel(ctx, res.onnx),
            "params": count_params(res.model), "macs": count_macs(res.model, pre["image_size"], pre["in_chans"]),
            "bytes": _file_bytes(res.onnx), "checkpoint_bytes": _file_bytes(res.checkpoint), "latency_ms": ms,
            "speedup": speed, "metrics": _metrics(res.model, ctx), "wall_s": wall, "export": _brief_export(res.export)}


def _brief_export(exp: dict | None) -> dict:
    return {k: exp[k] for k in ("max_abs_diff", "top1_agreement", "opset", "exporter") if isinstance(exp, dict) and k in exp}


def _onnx_row(ctx, name: str, path: str, wall: float, like: dict | None, of: str | None = None) -> dict:
    ms, speed = _latency(ctx, path)
    row = {"stage": name, "kind": "onnx", "artifact": _rel(ctx, path), "params": (like or {}).get("params"),
           "macs": (like or {}).get("macs"), "bytes": _file_bytes(path), "latency_ms": ms, "speedup": speed,
           "metrics": _metrics(str(path), ctx), "wall_s": wall}
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
        rows = [_torch_row(ctx, name, res, wall)]
    elif res.kind == "onnx":
        rows = [_onnx_row(ctx, name, res.onnx, wall, _last_torch_row(state))]
    else:
        rows = [{"stage": name, "kind": "deploy", "wall_s": wall, "artifact": _rel(ctx, out)}]
    for b in res.baselines:
        like = next((r for r in state["rows"] if r["stage"] == (state.get("teacher_stage") if b.like == "teacher"
                                                                    else b.like)), None)
        rows.append(_onnx_row(ctx, b.label, b.onnx, 0.0, like, of=name))
    return rows


def _save_state(ctx) -> None:
    ctx.state["artifacts"] = {k: _rel(ctx, v) for k, v in ctx.artifacts.items()}
    write_json(ctx.run_dir / "state.json", ctx.state)
    rows = ctx.state["rows"]
    write_json(ctx.run_dir / "ledger.json", {"recipe": ctx.cfg.recipe.name, "data": ctx.bundle.name,
                                             "classes": ctx.bundle.classes, "rows": rows,
                                             "gates": ctx.state.get("gates", [])})
    (ctx.run_dir / "ledger.md").write_text(markdown(rows, ctx.bundle.classes, ctx.cfg.gates.critical_class))


def _resolve(run_dir: Path, artifacts: dict) -> dict:
    out = {}
    for k, v in artifacts.items():
        p = Path(v) if isinstance(v, str) else None
        out[k] = str(run_dir / p) if p is not None and not p.is_absolute() else v
    return out


def _open_run(cfg) -> tuple[object, Path, dict]:
    import json

    from omegaconf import OmegaConf

    from edgeus import config as C

    if cfg.resume:
        run_dir = Path(cfg.resume).absolute()
        if not (run_dir / "config.yaml").is_file():
            raise EdgeusError(f"resume={run_dir}: not a compress run directory (no config.yaml)")
        saved = OmegaConf.merge(OmegaConf.structured(C.EdgeusConfig), OmegaConf.load(run_dir / "config.yaml"))
        saved.resume = str(run_dir)
        if cfg.stages:
            saved.stages = list(cfg.stages)
        state = json.loads((run_dir / "state.json").read_text()) if (run_dir / "state.json").is_file() else \
            {"done": [], "rows": [], "artifacts": {}, "gates": []}
        return saved, run_dir, state
    if not cfg.recipe.stages:
        raise EdgeusError("no stages to run: pick a recipe (recipe=rsmas_int8; see `edgeus recipes`)")
    run_dir = Path(cfg.out or Path(cfg.out_dir) / f"{cfg.recipe.name}-{time.strftime('%Y%m%d-%H%M%S')}").absolute()
    if (run_dir / "state.json").exists():
        raise EdgeusError(f"{run_dir} already holds a run; use resume={run_dir} or another out=")
    run_dir.mkdir(parents=True, exist_ok=True)
    C.save(cfg, run_dir / "config.yaml")
    return cfg, run_dir, {"done": [], "rows": [], "artifacts": {}, "gates": []}


def _restore_models(ctx) -> None:
    """On resume: the teacher and the current model from the artifacts of the finished stages."""
    from edgeus.train.checkpoint import load_checkpoint

    a = ctx.artifacts
    if a.get("teacher_model"):
        ctx.teacher, _ = load_checkpoint(a["teacher_model"])
    if a.get("model"):
        same = a.get("teacher_model") and Path(a["model"]) == Path(a["teacher_model"])
        ctx.model = ctx.teacher if same else load_checkpoint(a["model"])[0]


def compress(cfg) -> dict:
    """Run (or resume) a recipe. Returns {"run_dir", "ledger", "report", "bundle", "gates"}.

    Raises :class:`GateError` after writing the ledger and report when a clinical gate fails.
    """
    from edgeus.data import build_datasets
    from edgeus.train.run import resolve_device

    cfg, run_dir, state = _open_run(cfg)
    recipe_stages = list(cfg.recipe.stages)
    unknown = [s for s in recipe_stages if s not in STAGES]
    if unknown:
        raise EdgeusError(f"recipe {cfg.recipe.name}: unknown stage(s) {unknown}; stages are {list(ORDER)}")
    selected = list(cfg.stages) if cfg.stages else recipe_stages
    bad = [s for s in selected if s not in recipe_stages]
    if bad:
        raise EdgeusError(f"stages={selected}: {bad} not in recipe {cfg.recipe.name} ({recipe_stages})")
    device = resolve_device(cfg.device)
    print(f"edgeus compress: recipe {cfg.recipe.name} -> {run_dir}", flush=True)
    bundle = build_datasets(cfg.data)
    print(f"  data {bundle.summary()}", flush=True)
    ctx = Context(cfg=cfg, run_dir=run_dir, bundle=bundle, device=device, state=state,
                  artifacts=_resolve(run_dir, state.get("artifacts", {})))
    _restore_models(ctx)
    gate_failures = []
    for i, name in enumerate(recipe_stages):
        if name not in selected:
            continue
        if name in state["done"] and not cfg.stages:
            print(f"[{i + 1}/{len(recipe_stages)}] {name}: done (resumed)", flush=True)
            continue
        out = _stage_dir(run_dir, recipe_stages, name)
        out.mkdir(parents=True, exist_ok=True)
        print(f"[{i + 1}/{len(recipe_stages)}] {name} ...", flush=True)
        t0 = time.time()
        res = STAGES[name](ctx, out)
        wall = time.time() - t0
        if res.role == "teacher":
            ctx.teacher = res.model
            state["teacher_stage"] = name
        if res.model is not None:
            ctx.model = res.model
        ctx.artifacts.update(res.artifacts)
        write_json(out / "report.json", res.report)
        state["rows"] = [r for r in state["rows"] if r["stage"] != name and r.get("of") != name]
        rows = _rows(ctx, name, res, out, wall)
        state["rows"].extend(rows)
        if res.gated and rows[0].get("metrics"):
            teacher_m = ctx.state_metrics("teacher")
            results = G.check(name, teacher_m, rows[0]["metrics"], cfg.gates, bundle.classes)
            state["gates"] = [g for g in state.get("gates", []) if g["stage"] != name] + results
            gate_failures = G.failures(results)
        if name not in state["done"]:
            state["done"].append(name)
        _save_state(ctx)
        _print_row(name, rows[0], wall)
        if gate_failures and cfg.gates.enforce:
            break
    result = {"run_dir": str(run_dir), "ledger": str(run_dir / "ledger.md"), "bundle": ctx.artifacts.get("bundle"),
              "gates": state.get("gates", [])}
    _finish(ctx, result)
    if gate_failures and cfg.gates.enforce:
        raise GateError("clinical gate failed — " + "; ".join(G.describe(g) for g in gate_failures) +
                        f". Artifacts kept in {run_dir}")
    return result


def _print_row(name: str, r0: dict, wall: float) -> None:
    if r0.get("skipped"):
        print(f"    {name}: skipped ({r0['skipped']})", flush=True)
    if not r0.get("metrics"):
        return
    m = r0["metrics"]
    print(f"    {name}: acc {m['accuracy']:.3f}  macro-F1 {m['macro_f1']:.3f}  "
          f"{'params %.2fM  ' % (r0['params'] / 1e6) if r0.get('params') else ''}"
          f"{'MACs %.1fM  ' % (r0['macs'] / 1e6) if r0.get('macs') else ''}"
          f"{'%.2f ms (%.2fx vs teacher)  ' % (r0['latency_ms'], r0['speedup']) if r0.get('latency_ms') else ''}"
          f"[{wall:.0f} s]", flush=True)


def _finish(ctx, result: dict) -> None:
    cfg = ctx.cfg
    if cfg.compress.robustness and ctx.teacher is not None:
        from edgeus.pipeline.robustness import evaluate_robustness, fragility

        student = ctx.artifacts.get("int8_onnx") or ctx.model
        if student is not None and student is not ctx.teacher:
            print("robustness: teacher and student under speckle / gain / blur / shadow ...", flush=True)
            rob = evaluate_robustness({"teacher": ctx.teacher, "student": student}, ctx.eval_loader(),
                                      ctx.bundle.classes, ctx.bundle.preprocessing, list(cfg.robustness.corruptions),
                                      list(cfg.robustness.strengths), seed=int(cfg.seed))
            rob["summary"] = fragility(rob, "teacher", "student")
            write_json(ctx.run_dir / "robustness.json", rob)
    if cfg.compress.report:
        from edgeus.pipeline.report import write_report

        paths = write_report(ctx.run_dir)
        result["report"] = str(paths["html"])


def main_summary(result: dict) -> str:
    lines = [f"run:     {result['run_dir']}", f"ledger:  {result['ledger']}"]
    if result.get("report"):
        lines.append(f"report:  {result['report']}")
    if result.get("bundle"):
        lines.append(f"bundle:  {result['bundle']}   (check it: edgeus verify {result['bundle']})")
    failed = [g for g in result.get("gates", []) if not g["passed"]]
    lines.append("gates:   " + ("all passed" if result.get("gates") and not failed else
                                 "not evaluated" if not result.get("gates") else f"{len(failed)} failed"))
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: edgeus compress recipe=<name>")
