"""Is compression worth it? The rsmas_int8 student of a BUSI run against what a user would train
instead at the same ONNX Runtime CPU latency: MobileNetV2, DSC-STA and EfficientNet-B0-CBAM at the
widths that match the student's latency, and the pruned student's own architecture retrained from
scratch (Liu et al., *Rethinking the value of network pruning*, ICLR 2019). Writes
bench/results/alternatives_busi.{json,md}.

    python bench/compress_busi.py --out runs/busi-s0                 # the student (profile=full)
    python bench/alternatives_busi.py --run runs/busi-s0             # the alternatives beside it
    python bench/alternatives_busi.py --run runs/busi-s0 --seeds 0 1 2 --epochs 60

What is measured, all in this one run:
- **Latency match.** The student's deployed model (its INT8 ONNX) and each candidate width of each
  alternative, FP32 and INT8 (PTQ, the run's target layout), are timed block-interleaved by
  ``edgeus.deploy.benchmark.latency_table`` at one thread (the setting least disturbed by a shared
  machine). A candidate's deployed latency is the faster of its FP32 and INT8 forms (on CPUs without
  VNNI depth-wise INT8 is often the slower one); the width whose deployed latency is nearest the
  student's (in ratio) is trained. All four are timed again together, at one thread and all cores.
- **Training.** Each alternative trains from scratch with the run's teacher recipe (``train`` with
  ``teacher.train``), for the student's whole epoch budget by default (teacher epochs + pruning
  fine-tuning epochs: what the student's weights went through), on the run's own split.
- **Scores.** Test accuracy, macro-F1 and malignant recall of each deployed model with percentile
  bootstrap 95 % intervals (2000 resamples of the test images), and the paired interval of its
  difference from the student with an exact McNemar p-value (``edgeus.stats.compare``).

BUSI: Al-Dhabyani W, Gomaa M, Khaled H, Fahmy A. Dataset of breast ultrasound images. Data in Brief 28
(2020) 104863.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
ALTERNATIVES = ("mobilenetv2", "dsc_sta", "efficientnet_b0_cbam")
WIDTHS = (0.25, 0.35, 0.5, 0.75, 1.0, 1.4, 2.0)
SCRATCH = "pruned architecture from scratch"


def load_run(run: Path):
    from omegaconf import OmegaConf

    from edgeus import config as C

    cfg = OmegaConf.merge(OmegaConf.structured(C.EdgeusConfig), OmegaConf.load(run / "config.yaml"))
    rows = {r["stage"]: r for r in json.loads((run / "ledger.json").read_text())["rows"]}
    torch_rows = [r for s, r in rows.items() if s in ("prune", "decompose", "distill") and r.get("artifact")
                  and str(r["artifact"]).endswith(".pt")]
    if not torch_rows or "quantize" not in rows:
        raise SystemExit(f"{run}: no pruned student or no quantize row in its ledger (a compress run of rsmas_int8?)")
    return cfg, rows, run / torch_rows[-1]["artifact"], run / rows["quantize"]["artifact"], \
        run / rows["quantize"]["predictions"]


def ptq(fp32: Path, out: Path, cfg, data: dict, layout) -> Path:
    from edgeus.quantize import quantize_onnx

    quantize_onnx(fp32, out, cfg.quantize, layout=layout, recovery=False, out_dir=out.with_suffix(".quant"),
                  target=str(cfg.target.name), **data)
    return out


def export(model, path: Path, cfg, bundle) -> Path:
    from edgeus.onnx.export import export_with_data, target_opset

    export_with_data(model.eval(), path, cfg.export, bundle, target_opset=target_opset(cfg.target))
    return path


def match_widths(arches, cfg, bundle, data, layout, student_int8: Path, work: Path, iters: int) -> dict:
    """For each architecture, every width's FP32 and INT8 latency at one thread beside the student's."""
    import torch

    from edgeus.deploy.benchmark import latency_table
    from edgeus.models import create_model

    from edgeus.config import compose

    bcfg = compose(["bench.backend=onnxruntime", "bench.device=cpu", f"bench.iters={iters}", "bench.threads=1"])
    found = {}
    for arch in arches:
        models = {"student int8": student_int8}
        for w in WIDTHS:
            torch.manual_seed(0)
            m = create_model(arch, num_classes=len(bundle.classes), in_chans=int(cfg.data.in_chans), width=w)
            fp = export(m, work / f"{arch}-w{w}.fp32.onnx", cfg, bundle)
            models[f"w{w} fp32"] = fp
            # latency only: no fidelity pass over every non-test image for an untrained model
            models[f"w{w} int8"] = ptq(fp, work / f"{arch}-w{w}.int8.onnx", cfg, {**data, "fidelity": None}, layout)
        table = latency_table(models, bcfg)["batch 1"]
        s = table["student int8"]["median_ms"]
        cands = []
        for w in WIDTHS:
            f, q = table[f"w{w} fp32"]["median_ms"], table[f"w{w} int8"]["median_ms"]
            cands.append({"width": w, "fp32_ms": f, "int8_ms": q, "deployed": "int8" if q < f else "fp32",
                          "deployed_ms": min(f, q), "ratio_to_student": min(f, q) / s})
        best = min(cands, key=lambda c: abs(math.log(c["ratio_to_student"])))
        found[arch] = {"student_ms": s, "candidates": cands, "chosen": best}
        print(f"{arch}: width {best['width']} ({best['deployed']}, {best['deployed_ms']:.3f} ms vs student {s:.3f} ms)",
              flush=True)
    return found


def scratch_checkpoint(student_ckpt: Path, out: Path, seed: int) -> Path:
    """The pruned student's architecture with fresh weights (every module's own initialisation)."""
    import torch

    from edgeus.train.checkpoint import load_checkpoint, save_checkpoint

    model, ckpt = load_checkpoint(student_ckpt)
    torch.manual_seed(seed)
    for m in model.modules():
        if hasattr(m, "reset_parameters"):
            m.reset_parameters()
    save_checkpoint(out, model, classes=ckpt["classes"], preprocessing=ckpt["preprocessing"])
    return out


def train_one(name: str, arch: str | None, width: float | None, cfg, bundle, seed: int, epochs: int, work: Path,
              student_ckpt: Path):
    from omegaconf import OmegaConf

    from edgeus.train.run import train_model

    over = {**dict(cfg.teacher.train or {}), "epochs": epochs, "out": str(work / f"train-{name}-s{seed}"),
            "resume": True}
    model_cfg = cfg.model
    if arch is None:             # the pruned student's architecture, re-initialised
        over["checkpoint"] = str(scratch_checkpoint(student_ckpt, work / f"scratch-init-s{seed}.pt", seed))
    else:
        model_cfg = OmegaConf.merge(cfg.model, {"name": arch, "width": float(width), "pretrained": None, "kwargs": {}})
    train_cfg = OmegaConf.merge(cfg.train, over)
    t0 = time.time()
    result, _ = train_model(model_cfg, cfg.data, train_cfg, seed=seed, out_dir=work / f"train-{name}-s{seed}",
                            bundle=bundle)
    return result.model, time.time() - t0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a compress run of rsmas_int8 on BUSI (bench/compress_busi.py --out)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="training seeds of the alternatives")
    ap.add_argument("--epochs", type=int, default=None, help="epochs per alternative (default: the student's "
                    "budget, teacher epochs + pruning fine-tuning epochs)")
    ap.add_argument("--only", nargs="*", default=None, help=f"a subset of {', '.join(ALTERNATIVES)}, scratch")
    ap.add_argument("--iters", type=int, default=200, help="timed batch-1 calls per model and thread setting")
    ap.add_argument("--work", default=None, help="folder for the alternatives' ONNX and training (default: a temp dir)")
    ap.add_argument("--results", default=str(RESULTS / "alternatives_busi"), help="results path without suffix")
    ap.add_argument("--render-only", action="store_true", help="re-write the .md from the stored .json")
    args = ap.parse_args(argv)
    if args.render_only:
        res = Path(args.results)
        res.with_suffix(".md").write_text(render(json.loads(res.with_suffix(".json").read_text())))
        return 0
    run = Path(args.run or "")
    if not args.run or not (run / "ledger.json").is_file():
        print(f"{run}: not a compress run (no ledger.json)", file=sys.stderr)
        return 2
    from edgeus.config import compose
    from edgeus.data import build_datasets, build_loaders
    from edgeus.deploy.benchmark import latency_table
    from edgeus.evaluate import predict
    from edgeus.quantize import QDQLayout, inputs_from_bundle
    from edgeus.stats import bootstrap_metrics, compare

    t_start, load_start = time.time(), os.getloadavg()[0]
    cfg, rows, student_ckpt, student_int8, student_pred = load_run(run)
    bundle = build_datasets(cfg.data)
    classes = list(bundle.classes)
    test_loader = build_loaders(bundle, cfg.data)["test"]
    saved = np.load(student_pred)
    y, p_student = saved["labels"], saved["probs"]
    if not np.array_equal(y, bundle.test.labels):
        raise SystemExit("the run's test predictions do not match its test split as rebuilt here")
    data = inputs_from_bundle(bundle, cfg.quantize)
    layout = QDQLayout.from_target(cfg.target)
    budget = int((cfg.teacher.train or {}).get("epochs", cfg.train.epochs)) + int(cfg.prune.finetune_epochs)
    epochs = args.epochs or budget
    arches = [a for a in ALTERNATIVES if args.only is None or a in args.only]
    work = Path(args.work or tempfile.mkdtemp(prefix="edgeus-alternatives-"))
    work.mkdir(parents=True, exist_ok=True)
    matched = match_widths(arches, cfg, bundle, data, layout, student_int8, work, args.iters)

    entries = {"rsmas_int8 student": {"arch": "rsmas (pruned)", "width": None, "deployed": "int8",
                                      "path": str(student_int8), "probs": {None: p_student}, "train_s": None}}
    jobs = [(a, a, matched[a]["chosen"]["width"]) for a in arches]
    if args.only is None or "scratch" in args.only:
        jobs.append((SCRATCH, None, None))
    for name, arch, width in jobs:
        e = entries.setdefault(name, {"arch": arch or "rsmas (pruned), re-initialised", "width": width,
                                      "deployed": matched[arch]["chosen"]["deployed"] if arch else "int8",
                                      "probs": {}, "train_s": []})
        for seed in args.seeds:
            model, secs = train_one(name, arch, width, cfg, bundle, seed, epochs, work, student_ckpt)
            fp = export(model, work / f"{name.replace(' ', '_')}-s{seed}.fp32.onnx", cfg, bundle)
            path = ptq(fp, fp.with_name(fp.name.replace(".fp32", ".int8")), cfg, data, layout) \
                if e["deployed"] == "int8" else fp
            e["path"] = str(path)
            e["probs"][seed] = predict(str(path), test_loader)[1]
            e["train_s"].append(round(secs, 1))
            print(f"{name} seed {seed}: test accuracy {(e['probs'][seed].argmax(1) == y).mean():.3f} "
                  f"({secs / 60:.1f} min)", flush=True)

    # deployed latency of the four, block-interleaved together, one thread and all cores
    latency = {}
    for label, extra in (("1 thread", ["bench.threads=1"]), ("all cores", [])):
        bcfg = compose(["bench.backend=onnxruntime", "bench.device=cpu", f"bench.iters={args.iters}", *extra])
        t = latency_table({n: e["path"] for n, e in entries.items()}, bcfg)["batch 1"]
        latency[label] = {n: t[n]["median_ms"] for n in entries}

    mal = classes.index("malignant") if "malignant" in classes else None
    out_models = {}
    for name, e in entries.items():
        per_seed = {}
        for seed, p in e["probs"].items():
            ci = bootstrap_metrics(y, p, classes)
            cmp = compare(y, p_student, p, classes)
            per_seed["student" if seed is None else str(seed)] = {
                "accuracy": ci["accuracy"], "macro_f1": ci["macro_f1"],
                "malignant_recall": ci.get(f"recall/{classes[mal]}") if mal is not None else None,
                "malignant_found": int(((p.argmax(1) == y) & (y == mal)).sum()) if mal is not None else None,
                "vs_student": {"accuracy": cmp["intervals"]["accuracy"], "macro_f1": cmp["intervals"]["macro_f1"],
                               "mcnemar_p": cmp["mcnemar"]["p_value"],
                               "flips": cmp["flips"]}}
        out_models[name] = {"arch": e["arch"], "width": e["width"], "deployed": e["deployed"],
                            "params": _params(e["path"]), "bytes": Path(e["path"]).stat().st_size,
                            "latency_ms": {k: v[name] for k, v in latency.items()}, "train_s": e["train_s"],
                            "seeds": per_seed}
    doc = {"script": "bench/alternatives_busi.py", "date": time.strftime("%Y-%m-%d %H:%M"), "run": str(run),
           "run_overrides": list(cfg.command_line or []), "epochs": epochs, "budget_epochs": budget, "seeds": args.seeds,
           "test_n": int(len(y)), "classes": classes, "dataset": str(cfg.data.name), "matched": matched, "models": out_models,
           "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform()},
           "wall_s": round(time.time() - t_start, 1), "load_average": {"start": load_start, "end": os.getloadavg()[0]}}
    res = Path(args.results)
    res.parent.mkdir(parents=True, exist_ok=True)
    res.with_suffix(".json").write_text(json.dumps(doc, indent=1, default=float))
    res.with_suffix(".md").write_text(render(doc))
    print(render(doc))
    return 0


def _params(onnx_path: str) -> int:
    import onnx
    from onnx import numpy_helper

    m = onnx.load(onnx_path)
    return int(sum(numpy_helper.to_array(t).size for t in m.graph.initializer if t.data_type != onnx.TensorProto.INT64))


def _ci(e: dict | None, scale: float = 1.0) -> str:
    if not e or e.get("value") is None:
        return "–"
    lo, hi = e.get("lo"), e.get("hi")
    return f"{e['value'] * scale:.3f} [{lo * scale:.3f}, {hi * scale:.3f}]" if lo is not None else f"{e['value']:.3f}"


def render(doc: dict) -> str:
    from edgeus.stats import fmt_interval

    n = doc["test_n"]
    lines = [f"# Is compression worth it? The rsmas_int8 student against alternatives at its latency "
             f"({doc.get('dataset', 'busi').upper()}, test n={n})", "",
             f"Student: the INT8 model of `{doc['run']}` ({' '.join(doc['run_overrides'])}). Alternatives trained from "
             f"scratch for {doc['epochs']} epochs each"
             + (f" (the student's budget: {doc['budget_epochs']}, teacher + pruning fine-tuning)"
                if doc.get("budget_epochs") == doc["epochs"] else
                f" (the student's weights went through {doc['budget_epochs']}: teacher + pruning fine-tuning)"
                if doc.get("budget_epochs") else "")
             + f" with the run's teacher recipe, seeds {doc['seeds']}, on the same split; {doc['wall_s'] / 60:.1f} min on "
             f"{doc['machine']['cpu_count']} CPU cores, {doc['date']} (load average {doc['load_average']['start']:.1f} "
             f"at start, {doc['load_average']['end']:.1f} at end).", "",
             "Intervals: percentile bootstrap 95 % over the test images; 'vs student' is the paired interval of "
             "(alternative − student) with an exact McNemar p-value. One test image is "
             f"{100 / n:.1f} points.", "",
             "| model | width | deployed | params | ORT ms, 1 thread | ORT ms, all cores | seed | accuracy [95 % CI] | "
             "macro-F1 [95 % CI] | malignant recall [95 % CI] | accuracy vs student [paired 95 % CI] | McNemar p |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, m in doc["models"].items():
        for seed, s in m["seeds"].items():
            vs = "–" if seed == "student" else fmt_interval(s["vs_student"]["accuracy"])
            pv = "–" if seed == "student" else f"{s['vs_student']['mcnemar_p']:.3f}"
            lines.append(f"| {name} | {m['width'] if m['width'] is not None else '–'} | {m['deployed']} | "
                         f"{m['params'] / 1e6:.2f} M | {m['latency_ms']['1 thread']:.3f} | {m['latency_ms']['all cores']:.3f} | "
                         f"{seed} | {_ci(s['accuracy'])} | {_ci(s['macro_f1'])} | {_ci(s['malignant_recall'])} | {vs} | {pv} |")
    lines += ["", "## The latency match (one thread, untrained weights: latency does not depend on them)", "",
              "| architecture | width | FP32 ms | INT8 ms | deployed | ratio to the student |", "|---|---|---|---|---|---|"]
    for arch, mt in doc["matched"].items():
        edge = mt["chosen"]["width"] in (WIDTHS[0], WIDTHS[-1]) and abs(math.log(mt["chosen"]["ratio_to_student"])) > 0.1
        for c in mt["candidates"]:
            mark = (" **(trained; the grid's edge)**" if edge else " **(trained)**") if c["width"] == mt["chosen"]["width"] else ""
            lines.append(f"| {arch} | {c['width']}{mark} | {c['fp32_ms']:.3f} | {c['int8_ms']:.3f} | {c['deployed']} | "
                         f"{c['ratio_to_student']:.2f}× |")
    lines += ["", "Data: Al-Dhabyani W, Gomaa M, Khaled H, Fahmy A. Dataset of breast ultrasound images. "
              "Data in Brief 28 (2020) 104863."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
