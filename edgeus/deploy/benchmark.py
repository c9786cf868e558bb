"""``edgeus bench``: latency, throughput and memory of models on a backend; ``compare`` gives ratios.

Machines are noisy, so the numbers we trust are ratios measured in one process: in compare mode
the models run interleaved in blocks (``bench.block`` timed iterations of A, then of B, ..., the
order rotated every block, each block after a short pause and one untimed call) and each model's latency is
reported with its ratio to the first model (the baseline), both as a ratio of medians and as the
median of per-iteration paired ratios.

Why blocks and not single iterations: interleaving call by call measured models that never run
that way. ONNX Runtime's intra-op threads keep spinning for a while after a call returns, so the
next session's threads found the cores busy (on 2 cores a full-width RSMAS-Net took 21 ms
interleaved call by call against 9.3 ms alone), and a large model between two calls of a small one
evicts the small one's weights from the caches. A block runs each model as a device would, back to
back, and the rotation still spreads slow drifts of the machine over all models.

GPU runners (TensorRT; ``runner.time_plan`` set) are timed as ``trtexec`` times: warm-up by time
(>= 200 ms) and, in single mode, measurement by time (>= 3 s, continued up to 1000 runs); no pause
before their blocks (a pause lets a GPU, a Jetson's above all, clock down); the engine's GPU time
from CUDA events is reported beside the host end-to-end time. Everywhere: p99 only from >= 1000
samples (else None with a note); throughput is synchronous (batch / mean latency).

:func:`latency_table` is edgeus's one latency API for the ledger, the bench stage and bench/*.py.
"""
from __future__ import annotations

import datetime as _dt
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

from edgeus.deploy.runners import make_runner
from edgeus.deploy.runners.base import SETTLE_S as BASE_SETTLE_S
from edgeus.deploy.runners.base import BaseRunner
from edgeus.deploy.runners.trt import percentile_if_enough, run_plan
from edgeus.errors import EdgeusError

log = logging.getLogger(__name__)
SCHEMA = "edgeus-bench/1"
SETTLE_S = BASE_SETTLE_S   # compare mode, CPU runners: pause before each block (a runner's settle_s; 0 on GPUs)


def latency_stats(seconds: list[float], batch: int) -> dict[str, Any]:
    """p50 / p90 / mean / std / min in ms and throughput; p99 only from >= 1000 samples (else None and a note).

    Throughput is synchronous: batch / mean latency with one inference in flight (not a pipelined
    throughput such as trtexec's, which overlaps copies and enqueues).
    """
    ms = np.asarray(seconds, dtype=np.float64) * 1e3
    mean = float(ms.mean())
    p99, why = percentile_if_enough(ms, 99)
    out = {"n": int(ms.size), "p50_ms": float(np.percentile(ms, 50)), "p90_ms": float(np.percentile(ms, 90)),
           "p99_ms": p99, "mean_ms": mean, "std_ms": float(ms.std()),
           "min_ms": float(ms.min()), "throughput_ips": float(batch * 1e3 / mean) if mean > 0 else float("nan"),
           "throughput_kind": "synchronous"}
    if why:
        out["p99_note"] = why
    return out


def environment() -> dict[str, Any]:
    from edgeus import __version__
    from edgeus.deploy import tegrastats
    from edgeus.deploy.device_probe import cuda_device, jetson_info

    env: dict[str, Any] = {"edgeus": __version__, "python": platform.python_version(),
                           "platform": platform.platform(), "machine": platform.machine(),
                           "cpu_count": os.cpu_count()}
    try:
        import onnxruntime as ort

        env["onnxruntime"] = ort.__version__
        env["onnxruntime_providers"] = ort.get_available_providers()
    except ImportError:  # pragma: no cover
        pass
    if "torch" in sys.modules:
        env["torch"] = sys.modules["torch"].__version__
    dev = cuda_device()
    if dev:
        env.update(dev)
    jet = jetson_info()
    if jet:
        env["jetson"] = jet
        env["clock_state"] = tegrastats.clock_state()
    return env


def _label(paths: list[Path]) -> list[str]:
    names = [p.name for p in paths]
    out = []
    for p, n in zip(paths, names):
        out.append(f"{p.parent.name}/{n}" if names.count(n) > 1 else n)
    if len(set(out)) < len(out):
        out = [f"{i}:{n}" for i, n in enumerate(out)]
    return out


def _input_for(runner: BaseRunner, batch: int, bcfg, rng) -> tuple[dict[str, np.ndarray] | None, str | None]:
    feed = {}
    for name, (dtype, shape) in runner.input_metadata().items():
        shape = list(shape or [])
        if not shape:
            raise EdgeusError(f"{runner.name}: input {name} has no shape")
        if isinstance(shape[0], int) and shape[0] > 0 and shape[0] != batch:
            return None, f"{runner.name}: static batch {shape[0]}, batch {batch} skipped"
        dims = [batch]
        for i, d in enumerate(shape[1:], start=1):
            if isinstance(d, int) and d > 0:
                dims.append(d)
            elif i == 1 and bcfg.in_chans:
                dims.append(int(bcfg.in_chans))
            elif i >= 2 and bcfg.image_size:
                dims.append(int(bcfg.image_size))
            else:
                raise EdgeusError(f"{runner.name}: input {name} dimension {i} is dynamic; set bench.image_size "
                                  "and bench.in_chans")
        feed[name] = rng.standard_normal(dims).astype(dtype or np.float32)
    why = runner.batch_problem({k: v.shape for k, v in feed.items()})
    if why:
        return None, f"batch {batch} skipped: {why}"
    return feed, None


def _section(cfg, seed: int | None) -> tuple[Any, int]:
    """(bench section, seed) from a bench section, or from an object with ``.bench`` (and ``.seed``)."""
    if hasattr(cfg, "bench") and not hasattr(cfg, "iters"):
        return cfg.bench, int(seed if seed is not None else (getattr(cfg, "seed", 0) or 0))
    return cfg, int(seed or 0)


def bench(paths: list, cfg, *, out: str | Path | None = None, seed: int | None = None) -> dict[str, Any]:
    """Benchmark the models at ``paths``; compare (ratios) when 2+ models are given.

    ``cfg``: the ``bench`` section (:class:`edgeus.deploy.config.BenchConfig`), or an object holding it
    as ``.bench`` and the seed as ``.seed``; ``seed`` draws the random inputs. Writes ``out`` (JSON) and
    ``out`` with suffix ``.md`` when ``out`` is given. Returns the results.
    """
    bcfg, seed = _section(cfg, seed)
    paths = [Path(p) for p in paths]
    if not paths:
        raise EdgeusError("bench needs at least one model path (.onnx, .pt or .engine)")
    for p in paths:
        if not p.exists():
            raise EdgeusError(f"model not found: {p}")
    compare = bool(bcfg.compare) if bcfg.compare is not None else len(paths) > 1
    if compare and len(paths) < 2:
        raise EdgeusError("bench.compare=true needs two or more models")
    if bcfg.iters < 1 or bcfg.warmup < 0:
        raise EdgeusError("bench.iters must be >= 1 and bench.warmup >= 0")
    batch_sizes = [int(b) for b in bcfg.batch_sizes] or [1]

    labels = _label(paths)
    runners = [make_runner(p, bcfg, name=n) for p, n in zip(paths, labels)]
    warnings: list[str] = []
    env = environment()
    cs = env.get("clock_state")
    if cs and cs.get("warning"):
        warnings.append(cs["warning"])
    rng = np.random.default_rng(seed)
    models = [{"name": r.name, "path": str(p), "batches": {}} for r, p in zip(runners, paths)]
    paired: dict[tuple[int, int], list[float]] = {}

    try:
        for r in runners:
            r.activate()
        for m, r in zip(models, runners):
            m.update(r.describe())
        for b in batch_sizes:
            feeds = []
            for r in runners:
                feed, why = _input_for(r, b, bcfg, rng)
                if why:
                    warnings.append(why)
                feeds.append(feed)
            active = [i for i, f in enumerate(feeds) if f is not None]
            if not active:
                continue
            for i in active:
                r, f = runners[i], feeds[i]
                if r.time_plan is not None:   # GPU runners: warm up by time, as trtexec does
                    run_plan(lambda: r.infer(f, check_inputs=False), r.time_plan)
                else:
                    for _ in range(int(bcfg.warmup)):
                        r.infer(f, check_inputs=False)
                r.infer(f, check_inputs=True)   # one checked call
            times: dict[int, list[float]] = {i: [] for i in active}
            gpu: dict[int, list[float]] = {i: [] for i in active}

            def timed(i: int) -> float:
                runners[i].infer(feeds[i], check_inputs=False)
                times[i].append(runners[i].last_inference_time)
                if runners[i].last_gpu_time is not None:
                    gpu[i].append(runners[i].last_gpu_time)
                return runners[i].last_inference_time

            if compare:
                block = max(1, int(bcfg.block))
                for j, start in enumerate(range(0, int(bcfg.iters), block)):
                    k = j % len(active)
                    for i in active[k:] + active[:k]:       # rotate the order every block
                        if runners[i].settle_s:
                            time.sleep(runners[i].settle_s)  # the last model's spinning threads go idle
                        runners[i].infer(feeds[i], check_inputs=False)   # and its caches warm: not timed
                        for _ in range(min(block, int(bcfg.iters) - start)):
                            timed(i)
                        runners[i].sample_memory()
            else:
                for i in active:
                    if runners[i].time_plan is not None:    # measured by time (>= 3 s, up to 1000 runs)
                        run_plan(lambda i=i: timed(i), runners[i].time_plan)
                        runners[i].sample_memory()
                        continue
                    for it in range(int(bcfg.iters)):
                        timed(i)
                        if it % 10 == 0:
                            runners[i].sample_memory()
            for i in active:
                models[i]["batches"][str(b)] = latency_stats(times[i], b)
                if gpu[i]:   # device time of the engine alone (CUDA events), beside host end-to-end time
                    models[i]["batches"][str(b)]["gpu"] = latency_stats(gpu[i], b)
            if compare and active and active[0] == 0:
                base = np.asarray(times[0])
                for i in active[1:]:
                    paired[(i, b)] = list(base / np.asarray(times[i]))
            _power(runners, feeds, active, b, bcfg, models)
        for m, r in zip(models, runners):
            m["memory"] = r.memory()
    finally:
        for r in runners:
            r.deactivate()

    results: dict[str, Any] = {
        "schema": SCHEMA, "created": _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat(),
        "mode": "compare" if compare else "single",
        "settings": {"backend": bcfg.backend, "device": bcfg.device, "warmup": int(bcfg.warmup),
                     "iters": int(bcfg.iters), "batch_sizes": batch_sizes, "threads": bcfg.threads,
                     "fp16": bool(bcfg.fp16), "interleaved": compare, "block": int(bcfg.block) if compare else None},
        "env": env, "models": models, "warnings": warnings,
    }
    if compare:
        results["compare"] = ratios(models, paired)
    if out:
        write_results(results, out, markdown=bool(getattr(bcfg, "markdown", True)))
    return results


def latency_table(models: dict[str, str | Path], cfg, *, seed: int | None = None,
                  out: str | Path | None = None) -> dict[str, dict[str, dict]]:
    """Latency of ``models`` ({label: path}) with :func:`bench`, block-interleaved in one process (compare
    mode when two or more), the first model the baseline. ``cfg``: as for :func:`bench`.

    Returns ``{"batch N": {label: {median_ms, p90_ms, p99_ms, speedup, bytes}}}``; ``speedup`` is the
    first model's median over this one's. The ledger, the bench stage and the bench scripts use this.
    """
    res = bench(list(models.values()), cfg, out=out, seed=seed)
    table: dict = {}
    for label, m in zip(models, res["models"]):
        for b, st in m["batches"].items():
            base = res["models"][0]["batches"][b]["p50_ms"]
            table.setdefault(f"batch {b}", {})[label] = {
                "median_ms": st["p50_ms"], "p90_ms": st["p90_ms"], "p99_ms": st["p99_ms"],
                "speedup": base / st["p50_ms"], "bytes": Path(models[label]).stat().st_size}
    return table


def _power(runners, feeds, active, b, bcfg, models) -> None:
    from edgeus.deploy import tegrastats

    if not tegrastats.available():
        return

    for i in active:
        n, t_end = 0, time.perf_counter() + max(2.0, 5 * bcfg.tegrastats_interval_ms / 1e3)
        with tegrastats.Tegrastats(bcfg.tegrastats_interval_ms) as ts:
            while time.perf_counter() < t_end or n < int(bcfg.iters):
                runners[i].infer(feeds[i], check_inputs=False)
                n += 1
        s = ts.summary(n * b)
        if s:
            models[i]["batches"][str(b)]["power"] = s


def ratios(models: list[dict], paired: dict[tuple[int, int], list[float]]) -> dict[str, Any]:
    base = models[0]
    rows = []
    for i, m in enumerate(models[1:], start=1):
        for b, st in m["batches"].items():
            bs = base["batches"].get(b)
            if not bs:
                continue
            pr = paired.get((i, int(b)))
            rows.append({"model": m["name"], "batch": int(b),
                         "speedup_p50": bs["p50_ms"] / st["p50_ms"],
                         "speedup_mean": bs["mean_ms"] / st["mean_ms"],
                         "paired_median_speedup": float(np.median(pr)) if pr else None,
                         "throughput_ratio": st["throughput_ips"] / bs["throughput_ips"]})
    return {"baseline": base["name"], "note": "speedup = baseline latency / model latency (>1: faster than baseline)",
            "ratios": rows}


def to_markdown(results: dict[str, Any]) -> str:
    env = results.get("env", {})
    lines = [f"# edgeus bench ({results['mode']})", "",
             f"- created: {results['created']}",
             f"- machine: {env.get('platform')} ({env.get('cpu_count')} CPUs)"
             + (f", GPU {env['gpu']} (SM {env.get('compute_capability')})" if env.get("gpu") else ""),
             f"- onnxruntime {env.get('onnxruntime', '-')}" + (f", torch {env['torch']}" if env.get("torch") else ""),
             "- settings: " + ", ".join(f"{k}={v}" for k, v in results["settings"].items()), ""]
    comp = {(r["model"], r["batch"]): r for r in results.get("compare", {}).get("ratios", [])}
    head = "| model | backend | batch | p50 ms | p90 ms | p99 ms | mean ms | img/s (sync) |"
    sep = "|---|---|---:|---:|---:|---:|---:|---:|"
    if comp or results["mode"] == "compare":
        head += " speedup (p50) | paired speedup |"
        sep += "---:|---:|"
    lines += [head, sep]
    for m in results["models"]:
        for b, st in m["batches"].items():
            row = (f"| {m['name']} | {m.get('backend', '')} | {b} | {st['p50_ms']:.3f} | {st['p90_ms']:.3f} | "
                   f"{_ms(st['p99_ms'])} | {st['mean_ms']:.3f} | {st['throughput_ips']:.1f} |")
            if results["mode"] == "compare":
                r = comp.get((m["name"], int(b)))
                if r:
                    ps = r["paired_median_speedup"]
                    row += f" {r['speedup_p50']:.2f}x | {ps:.2f}x |" if ps else f" {r['speedup_p50']:.2f}x | - |"
                else:
                    row += " 1.00x (baseline) | - |"
            lines.append(row)
    gpu = [(m["name"], b, st["p50_ms"], st["gpu"]) for m in results["models"] for b, st in m["batches"].items()
           if st.get("gpu")]
    if gpu:
        lines += ["", "| model | batch | host end-to-end p50 ms | GPU (CUDA events) p50 ms | GPU p99 ms | samples |",
                  "|---|---:|---:|---:|---:|---:|"]
        lines += [f"| {n} | {b} | {h:.3f} | {g['p50_ms']:.3f} | {_ms(g['p99_ms'])} | {g['n']} |" for n, b, h, g in gpu]
    notes = sorted({st["p99_note"] for m in results["models"] for st in m["batches"].values() if st.get("p99_note")})
    lines += ["", "Throughput is synchronous: batch / mean latency with one inference in flight."
              + (" p99 is reported only from >= 1000 samples (" + "; ".join(notes) + ")." if notes else "")]
    mem = [(m["name"], m.get("memory", {})) for m in results["models"]]
    if any(v for _, v in mem):
        lines += ["", "| model | memory |", "|---|---|"]
        lines += [f"| {n} | " + ", ".join(f"{k}={v}" for k, v in v.items()) + " |" for n, v in mem]
    power = [(m["name"], b, st["power"]) for m in results["models"] for b, st in m["batches"].items() if "power" in st]
    if power:
        lines += ["", "| model | batch | mean power mW | energy/inference mJ |", "|---|---:|---:|---:|"]
        lines += [f"| {n} | {b} | {p['mean_power_mw']} | {p.get('energy_per_inference_mj', '-')} |" for n, b, p in power]
    if results.get("warnings"):
        lines += [""] + [f"> warning: {w}" for w in results["warnings"]]
    return "\n".join(lines) + "\n"


def _ms(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def write_results(results: dict[str, Any], out: str | Path, *, markdown: bool = True) -> tuple[Path, Path | None]:
    out = Path(out)
    if out.suffix != ".json":
        out = out.with_suffix(out.suffix + ".json") if out.suffix else out.with_suffix(".json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    md = None
    if markdown:
        md = out.with_suffix(".md")
        md.write_text(to_markdown(results))
    return out, md
