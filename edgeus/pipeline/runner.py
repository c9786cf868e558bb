"""``compress``: run a recipe's stages in order over one run directory.

    runs/<recipe>-<time>/
        config.yaml            the resolved configuration
        state.json             finished stages, their artifacts and ledger rows (for resume)
        ledger.json, ledger.md one row per stage: params, MACs, bytes, latency, clinical metrics, time
        00-teacher/ 01-prune/ ...  each stage's artifacts (model.pt, model.onnx, report.json, ...)
        robustness.json, report.md, report.html, figures/

Every file is written under a temporary name and renamed, so a run killed at any moment can be
resumed with ``resume=<run dir>``: finished stages are not redone, an interrupted stage restarts
(training inside it continues from its last epoch).
"""
from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch.nn as nn
from omegaconf import OmegaConf

from edgeus import config as C
from edgeus.errors import EdgeusError, GateError
from edgeus.pipeline import gates as G
from edgeus.pipeline.ledger import markdown, write_json
from edgeus.pipeline.stages import ORDER, STAGES, TORCH_STAGES

log = logging.getLogger("edgeus.compress")
GATED = ("prune", "distill", "decompose", "quantize")


@dataclass
class Context:
    cfg: object
    run_dir: Path
    bundle: object
    device: str
    state: dict
    teacher: nn.Module | None = None
    model: nn.Module | None = None
    artifacts: dict = field(default_factory=dict)

    def set_model(self, model: nn.Module) -> None:
        self.model = model

    def need(self, key: str, stage: str) -> str:
        if not self.artifacts.get(key):
            raise EdgeusError(f"this stage needs the output of the '{stage}' stage ({key}); run it first "
                              f"(stages=[...] or resume=<run>)")
        return self.artifacts[key]

    def teacher_onnx(self) -> str:
        return self.need("teacher_onnx", "teacher")

    def state_metrics(self, which: str) -> dict:
        rows = [r for r in self.state["rows"] if r.get("metrics")]
        if not rows:
            return {}
        if which == "teacher":
            return next((r["metrics"] for r in rows if r["stage"] == "teacher"), {})
        return [r for r in rows if not r["stage"].startswith("baseline")][-1]["metrics"]


def _stage_dir(run_dir: Path, stages: list[str], name: str) -> Path:
    return run_dir / f"{stages.index(name):02d}-{name}"


def _file_bytes(path) -> int | None:
    p = Path(path) if path else None
    return p.stat().st_size if p and p.is_file() else None


def _metrics(model_or_onnx, ctx) -> dict:
    from edgeus.data import build_loaders
    from edgeus.evaluate import evaluate_model

    loader = build_loaders(ctx.bundle, ctx.cfg.data)["test"]
    m = evaluate_model(model_or_onnx, loader, ctx.bundle.classes, ctx.device if isinstance(model_or_onnx, nn.Module) else "cpu")
    return {k: m[k] for k in ("accuracy", "macro_f1", "recall", "auc", "ece", "confusion", "n")}


def measure_latency(cfg, models: dict[str, str], iters: int, warmup: int, batch_sizes=(1,), out=None) -> dict:
    """ONNX Runtime CPU latency of ``models`` ({label: onnx path}) with ``edgeus.deploy.bench``:
    interleaved in one process, the first model the baseline. Returns {batch: {label: stats}}, each
    stats dict with median_ms, p90_ms, speedup (first model's median / this one's) and bytes."""
    import copy

    from edgeus.deploy import bench

    bcfg = copy.deepcopy(cfg)
    bcfg.bench.backend, bcfg.bench.device, bcfg.bench.providers = "onnxruntime", "cpu", None
    bcfg.bench.iters, bcfg.bench.warmup = int(iters), int(warmup)
    bcfg.bench.batch_sizes = [int(b) for b in batch_sizes]
    bcfg.bench.threads = cfg.compress.latency_threads
    bcfg.bench.compare = len(models) > 1
    res = bench(list(models.values()), bcfg, out=out)
    labels = list(models)
    table: dict = {}
    for label, m in zip(labels, res["models"]):
        for b, st in m["batches"].items():
            base = res["models"][0]["batches"][b]["p50_ms"]
            table.setdefault(f"batch {b}", {})[label] = {
                "median_ms": st["p50_ms"], "p90_ms": st["p90_ms"], "p99_ms": st["p99_ms"],
                "speedup": base / st["p50_ms"], "bytes": Path(models[label]).stat().st_size}
    return table


def _latency(ctx, onnx_path) -> tuple[float | None, float | None]:
    teacher = ctx.artifacts.get("teacher_onnx")
    models = {"teacher": teacher, "model": str(onnx_path)} if teacher and teacher != str(onnx_path) else \
        {"model": str(onnx_path)}
    c = ctx.cfg.compress
    lat = measure_latency(ctx.cfg, models, c.latency_iters, c.latency_warmup)["batch 1"]["model"]
    return lat["median_ms"], lat["speedup"]


def _torch_row(ctx, name: str, out: Path, wall: float) -> dict:
    from edgeus.models.profile import count_macs, count_params
    from edgeus.quantize import export_onnx
    from edgeus.train.checkpoint import save_checkpoint

    pre = ctx.bundle.preprocessing
    ckpt = out / "model.pt"
    if name != "teacher" or not ckpt.is_file():
        save_checkpoint(ckpt, ctx.model, classes=ctx.bundle.classes, preprocessing=pre, config=C.to_yaml(ctx.cfg),
                        extra={"stage": name, "recipe": ctx.cfg.recipe.name})
    onnx_path = out / "model.onnx"
    exp = export_onnx(ctx.model, onnx_path, ctx.cfg, bundle=ctx.bundle)
    if name == "teacher":
        ctx.artifacts["teacher_onnx"] = str(onnx_path)
    ms, speed = _latency(ctx, onnx_path)
    return {"stage": name, "kind": "torch", "artifact": str(ckpt), "onnx": str(onnx_path),
            "params": count_params(ctx.model), "macs": count_macs(ctx.model, pre["image_size"], pre["in_chans"]),
            "bytes": _file_bytes(onnx_path), "checkpoint_bytes": _file_bytes(ckpt), "latency_ms": ms, "speedup": speed,
            "metrics": _metrics(ctx.model, ctx), "wall_s": wall, "export": _brief_export(exp)}


def _brief_export(exp: dict) -> dict:
    return {k: exp[k] for k in ("max_abs_diff", "top1_agreement", "opset", "exporter") if isinstance(exp, dict) and k in exp}


def _onnx_row(ctx, name: str, path: str, wall: float, like: dict | None) -> dict:
    ms, speed = _latency(ctx, path)
    return {"stage": name, "kind": "onnx", "artifact": str(path), "params": (like or {}).get("params"),
            "macs": (like or {}).get("macs"), "bytes": _file_bytes(path), "latency_ms": ms, "speedup": speed,
            "metrics": _metrics(str(path), ctx), "wall_s": wall}


def _last_torch_row(state) -> dict | None:
    rows = [r for r in state["rows"] if r["kind"] == "torch"]
    return rows[-1] if rows else None


def _save_state(ctx) -> None:
    ctx.state["artifacts"] = ctx.artifacts
    write_json(ctx.run_dir / "state.json", ctx.state)
    rows = ctx.state["rows"]
    write_json(ctx.run_dir / "ledger.json", {"recipe": ctx.cfg.recipe.name, "data": ctx.bundle.name,
                                             "classes": ctx.bundle.classes, "rows": rows,
                                             "gates": ctx.state.get("gates", [])})
    (ctx.run_dir / "ledger.md").write_text(markdown(rows, ctx.bundle.classes, ctx.cfg.gates.critical_class))


def _open_run(cfg) -> tuple[object, Path, dict]:
    import json

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


def compress(cfg) -> dict:
    """Run (or resume) a recipe. Returns {"run_dir", "ledger", "report", "bundle", "gates"}.

    Raises :class:`GateError` after writing the ledger and report when a clinical gate fails.
    """
    from edgeus.data import build_datasets
    from edgeus.train.checkpoint import load_checkpoint
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
                  artifacts=dict(state.get("artifacts", {})))
    if "teacher" in state["done"]:
        ctx.teacher, _ = load_checkpoint(_stage_dir(run_dir, recipe_stages, "teacher") / "model.pt")
        last = _last_torch_row(state)
        ctx.model = load_checkpoint(last["artifact"])[0] if last and last["stage"] != "teacher" else ctx.teacher
    gate_failures = []
    for i, name in enumerate(recipe_stages):
        if name not in selected:
            continue
        if name in state["done"] and not cfg.stages:
            print(f"[{i + 1}/{len(recipe_stages)}] {name}: done (resumed)", flush=True)
            continue
        if name != "teacher" and ctx.teacher is None:
            raise EdgeusError(f"stage {name} needs the teacher; run the teacher stage first")
        out = _stage_dir(run_dir, recipe_stages, name)
        out.mkdir(parents=True, exist_ok=True)
        print(f"[{i + 1}/{len(recipe_stages)}] {name} ...", flush=True)
        t0 = time.time()
        report = STAGES[name](ctx, out)
        wall = time.time() - t0
        if name == "teacher":
            ctx.teacher = ctx.model
        write_json(out / "report.json", report)
        state["rows"] = [r for r in state["rows"] if r["stage"] not in (name, f"baseline: {name}")]
        rows = []
        if name in TORCH_STAGES:
            rows.append(_torch_row(ctx, name, out, wall))
        elif name == "export":
            rows.append(_onnx_row(ctx, name, ctx.artifacts["fp32_onnx"], wall, _last_torch_row(state)))
        elif name == "quantize":
            rows.append(_onnx_row(ctx, name, ctx.artifacts["int8_onnx"], wall, _last_torch_row(state)))
            if ctx.artifacts.get("teacher_int8_onnx"):
                teacher_row = next(r for r in state["rows"] if r["stage"] == "teacher")
                rows.append(_onnx_row(ctx, "baseline: teacher int8 (ORT)", ctx.artifacts["teacher_int8_onnx"], 0.0,
                                      teacher_row))
        else:
            rows.append({"stage": name, "kind": "deploy", "wall_s": wall, "artifact": str(out)})
        state["rows"].extend(rows)
        if name in GATED and rows[0].get("metrics"):
            teacher_m = ctx.state_metrics("teacher")
            results = G.check(name, teacher_m, rows[0]["metrics"], cfg.gates, bundle.classes)
            state["gates"] = [g for g in state.get("gates", []) if g["stage"] != name] + results
            gate_failures = G.failures(results)
        if name not in state["done"]:
            state["done"].append(name)
        _save_state(ctx)
        r0 = rows[0]
        if r0.get("metrics"):
            m = r0["metrics"]
            print(f"    {name}: acc {m['accuracy']:.3f}  macro-F1 {m['macro_f1']:.3f}  "
                  f"{'params %.2fM  ' % (r0['params'] / 1e6) if r0.get('params') else ''}"
                  f"{'MACs %.1fM  ' % (r0['macs'] / 1e6) if r0.get('macs') else ''}"
                  f"{'%.2f ms (%.2fx vs teacher)  ' % (r0['latency_ms'], r0['speedup']) if r0.get('latency_ms') else ''}"
                  f"[{wall:.0f} s]", flush=True)
        if gate_failures and cfg.gates.enforce:
            break
    result = {"run_dir": str(run_dir), "ledger": str(run_dir / "ledger.md"), "bundle": ctx.artifacts.get("bundle"),
              "gates": state.get("gates", [])}
    _finish(ctx, result)
    if gate_failures and cfg.gates.enforce:
        raise GateError("clinical gate failed — " + "; ".join(G.describe(g) for g in gate_failures) +
                        f". Artifacts kept in {run_dir}")
    return result


def _finish(ctx, result: dict) -> None:
    cfg = ctx.cfg
    if cfg.compress.robustness and ctx.teacher is not None:
        from edgeus.data import build_loaders
        from edgeus.pipeline.robustness import evaluate_robustness, fragility

        student = ctx.artifacts.get("int8_onnx") or ctx.model
        if student is not None and student is not ctx.teacher:
            print("robustness: teacher and student under speckle / gain / blur / shadow ...", flush=True)
            rob = evaluate_robustness({"teacher": ctx.teacher, "student": student},
                                      build_loaders(ctx.bundle, cfg.data)["test"], ctx.bundle.classes,
                                      ctx.bundle.preprocessing, list(cfg.robustness.corruptions),
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
