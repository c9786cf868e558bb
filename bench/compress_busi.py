"""rsmas_int8 on the real BUSI developer split, against the alternative a user tries first
(ONNX Runtime INT8 of the uncompressed teacher). Writes bench/results/compress_busi.{json,md}.

    python bench/compress_busi.py                       # profile=full on ../shared/data/busi
    python bench/compress_busi.py --set train.epochs=20 --set model.width=0.5   # a cheaper run

Everything in the result file is measured by this script in one run: the teacher, the student
and the INT8-only teacher are evaluated on the same test split, and their ONNX Runtime CPU
latencies come from the bench stage, which times them interleaved in one process.
BUSI: Al-Dhabyani W, Gomaa M, Khaled H, Fahmy A. Dataset of breast ultrasound images.
Data in Brief 28 (2020) 104863.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
GOALS = {"bytes_ratio": 20.0, "latency_ratio_vs_fp32": 8.0, "latency_ratio_vs_int8_teacher": 3.0,
         "max_accuracy_drop": 0.01, "max_malignant_recall_drop": 0.02}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(HERE.parent.parent / "shared" / "data" / "busi"))
    ap.add_argument("--profile", default="full")
    ap.add_argument("--set", action="append", default=[], help="extra key=value overrides")
    ap.add_argument("--out", default=None, help="run directory (default runs/bench-busi-<time>)")
    ap.add_argument("--resume", action="store_true", help="continue the run in --out after an interruption")
    ap.add_argument("--results", default=str(HERE / "results" / "compress_busi"))
    args = ap.parse_args(argv)
    if not Path(args.root).is_dir():
        print(f"BUSI not found at {args.root}; pass --root", file=sys.stderr)
        return 2
    from edgeus.config import compose
    from edgeus.pipeline import compress

    run_dir = Path(args.out or f"runs/bench-busi-{time.strftime('%Y%m%d-%H%M%S')}")
    overrides = ["recipe=rsmas_int8", "data=busi", f"data.root={args.root}", f"profile={args.profile}",
                 "gates.enforce=false", f"out={run_dir}", *args.set]
    t0 = time.time()
    result = compress(compose([f"resume={run_dir}"] if args.resume else overrides))
    wall = time.time() - t0
    ledger = json.loads((run_dir / "ledger.json").read_text())
    rows = {r["stage"]: r for r in ledger["rows"]}
    bench = json.loads((next(run_dir.glob("*-bench")) / "report.json").read_text())["latency"]["batch 1"]
    teacher, student, base = rows["teacher"], rows["quantize"], rows["baseline: teacher int8 (ORT)"]

    def entry(row, bench_name):
        m = row["metrics"]
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "malignant_recall": m["recall"]["malignant"],
                "auc": m["auc"], "ece": m["ece"], "bytes": bench[bench_name]["bytes"], "macs": row["macs"],
                "params": row["params"], "ort_cpu_median_ms": bench[bench_name]["median_ms"]}

    models = {"teacher fp32": entry(teacher, "teacher fp32"),
              "teacher int8 (ORT only)": entry(base, "teacher int8 (ORT only)"),
              "student int8 (rsmas_int8)": entry(student, "student int8")}
    t, s, b = models["teacher fp32"], models["student int8 (rsmas_int8)"], models["teacher int8 (ORT only)"]
    achieved = {
        "bytes_ratio": t["bytes"] / s["bytes"],
        "latency_ratio_vs_fp32": t["ort_cpu_median_ms"] / s["ort_cpu_median_ms"],
        "latency_ratio_vs_int8_teacher": b["ort_cpu_median_ms"] / s["ort_cpu_median_ms"],
        "accuracy_drop": t["accuracy"] - s["accuracy"],
        "malignant_recall_drop": t["malignant_recall"] - s["malignant_recall"],
    }
    verdict = {
        "bytes_ratio": achieved["bytes_ratio"] >= GOALS["bytes_ratio"],
        "latency_ratio_vs_fp32": achieved["latency_ratio_vs_fp32"] >= GOALS["latency_ratio_vs_fp32"],
        "latency_ratio_vs_int8_teacher": achieved["latency_ratio_vs_int8_teacher"] >= GOALS["latency_ratio_vs_int8_teacher"],
        "accuracy_drop": achieved["accuracy_drop"] <= GOALS["max_accuracy_drop"],
        "malignant_recall_drop": achieved["malignant_recall_drop"] <= GOALS["max_malignant_recall_drop"],
    }
    out = {"script": "bench/compress_busi.py", "date": time.strftime("%Y-%m-%d %H:%M"), "overrides": overrides,
           "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
           "wall_s": wall, "resumed": bool(args.resume), "run_dir": str(run_dir), "models": models, "goals": GOALS, "achieved": achieved,
           "met": verdict, "test_n": teacher["metrics"]["n"]}
    res = Path(args.results)
    res.parent.mkdir(parents=True, exist_ok=True)
    res.with_suffix(".json").write_text(json.dumps(out, indent=1))
    lines = [f"# rsmas_int8 on BUSI (developer split, test n={out['test_n']})", "",
             f"Run: `{' '.join(overrides)}` — {wall / 60:.1f} min on {os.cpu_count()} CPU cores"
             + (" for this invocation, which resumed an interrupted run (the stage wall times are in the run's ledger)"
                if args.resume else "") + f", {out['date']}. Teacher trained from scratch (no pretrained weights "
             "exist on this machine); gates not enforced here so that every number is recorded.", "",
             "| model | accuracy | macro-F1 | malignant recall | AUC | bytes | MACs | ORT CPU ms (batch 1) |",
             "|---|---|---|---|---|---|---|---|"]
    for n, e in models.items():
        lines.append(f"| {n} | {e['accuracy']:.3f} | {e['macro_f1']:.3f} | {e['malignant_recall']:.3f} | "
                     f"{e['auc']:.3f} | {e['bytes']:,} | {e['macs'] / 1e6:.0f} M | {e['ort_cpu_median_ms']:.2f} |")
    lines += ["", "| goal | target | achieved | met |", "|---|---|---|---|",
              f"| bytes, teacher / student | ≥ {GOALS['bytes_ratio']:.0f}× | {achieved['bytes_ratio']:.1f}× | {verdict['bytes_ratio']} |",
              f"| latency, FP32 teacher / student | ≥ {GOALS['latency_ratio_vs_fp32']:.0f}× | {achieved['latency_ratio_vs_fp32']:.1f}× | {verdict['latency_ratio_vs_fp32']} |",
              f"| latency, INT8-only teacher / student | ≥ {GOALS['latency_ratio_vs_int8_teacher']:.0f}× | {achieved['latency_ratio_vs_int8_teacher']:.1f}× | {verdict['latency_ratio_vs_int8_teacher']} |",
              f"| accuracy lost | ≤ {GOALS['max_accuracy_drop'] * 100:.0f} pt | {achieved['accuracy_drop'] * 100:+.1f} pt | {verdict['accuracy_drop']} |",
              f"| malignant recall lost | ≤ {GOALS['max_malignant_recall_drop'] * 100:.0f} pt | {achieved['malignant_recall_drop'] * 100:+.1f} pt | {verdict['malignant_recall_drop']} |",
              "", "Data: Al-Dhabyani W, Gomaa M, Khaled H, Fahmy A. Dataset of breast ultrasound images. "
              "Data in Brief 28 (2020) 104863."]
    res.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
