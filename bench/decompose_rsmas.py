"""RSMAS-Net decomposed to 0.5 of its MACs (budget mode): errors, MACs, ONNX Runtime latency, accuracy.

Part 1, full width (rsmas width 1.0, 3 classes, 1x112x112, seeded random weights: MACs and latency
do not depend on the values): the per-layer table (ranks, MACs before/after, relative
reconstruction error), MACs and parameters, ONNX export of both with torch parity, and the ONNX
Runtime CPU FP32 latency of both, block-interleaved in one process by edgeus.deploy.benchmark (medians
of N and their ratio).

Part 2, accuracy on the phantom at a small width: train a small rsmas briefly on the phantom,
decompose it to 0.5 of its MACs with the same budget mode, re-estimate BatchNorm statistics,
fine-tune (plain CE; and with the undecomposed model as teacher through edgeus.distill, KD), and
compare test accuracy with the undecomposed model. A control fine-tunes the undecomposed model the
same way, to show how much of the result is extra training rather than decomposition. The result
is stated as measured, whichever way it falls.

    python bench/decompose_rsmas.py             # ~10 min on 2 cores
    python bench/decompose_rsmas.py --quick     # or EDGEUS_BENCH_QUICK=1: a smoke run (~3 min)

Writes bench/results/decompose_rsmas.json and .md (``--out`` to write elsewhere).
Math libraries run single-threaded by default (``--threads``): on this shared 2-core machine that is
several times faster and steadier than two threads competing with other processes.
"""
from __future__ import annotations

import argparse
import os
import sys

# set before numpy / torch load their thread pools
_THREADS = "1"
for _i, _a in enumerate(sys.argv):
    if _a == "--threads" and _i + 1 < len(sys.argv):
        _THREADS = sys.argv[_i + 1]
    elif _a.startswith("--threads="):
        _THREADS = _a.split("=", 1)[1]
for _v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_v, _THREADS)

import copy  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import platform  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeus.config import compose  # noqa: E402
from edgeus.decompose import decompose_model, format_table  # noqa: E402
from edgeus.finetune import make_finetuner  # noqa: E402
from edgeus.models import create_model  # noqa: E402
from edgeus.onnx.export import export_plain  # noqa: E402
from edgeus.onnx.session import run_logits  # noqa: E402

NAME = "decompose_rsmas"



def _decompose(model, cfg, bundle=None, teacher=None, out_dir=None):
    """``decompose_model`` as ``edgeus compress`` composes it: the decompose section, BN recalibration on
    the train split and fine-tuning (with ``teacher``: by distillation) when data is given."""
    ft = make_finetuner(cfg, bundle, teacher=teacher) if bundle is not None else None
    return decompose_model(model, cfg.decompose, image_size=cfg.data.image_size, in_chans=cfg.data.in_chans,
                           finetune=ft, calib_loader=ft.loaders["train_plain"] if ft is not None else None,
                           out_dir=out_dir)

def interleaved_latency(paths: dict, x: np.ndarray, runs: int, threads: int, warmup: int = 5) -> dict:
    """edgeus's one latency API (``edgeus.deploy.benchmark``): block-rotated runs in one process, medians,
    and the median of the paired per-iteration ratios (decomposed / original)."""
    from edgeus.deploy.benchmark import bench
    from edgeus.deploy.config import BenchConfig

    bcfg = BenchConfig(backend="onnxruntime", device="cpu", iters=runs, warmup=warmup, batch_sizes=[x.shape[0]],
                       in_chans=x.shape[1], image_size=x.shape[-1], threads=threads, compare=True)
    res = bench(list(paths.values()), bcfg, seed=0)
    b = str(x.shape[0])
    stats = {n: m["batches"][b] for n, m in zip(paths, res["models"])}
    paired = res["compare"]["ratios"][0]["paired_median_speedup"]   # median of original / decomposed
    return {"ms_median": {n: st["p50_ms"] for n, st in stats.items()},
            "ms_min": {n: st["min_ms"] for n, st in stats.items()}, "runs": runs,
            "block": int(bcfg.block), "median_of_round_ratios": 1.0 / paired if paired else None}


def full_width(args) -> dict:
    torch.manual_seed(0)
    size = args.size
    cfg = compose([f"data.image_size={size}", "data.in_chans=1", "decompose.rank_mode=budget",
                   f"decompose.target_macs={args.target_macs}", f"decompose.method={args.method}",
                   "decompose.finetune_epochs=0"])
    model = create_model("rsmas", num_classes=3, in_chans=1, width=1.0).eval()
    t0 = time.time()
    dec, rep = _decompose(model, cfg)
    seconds = time.time() - t0
    dec.eval()
    x = torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as d:
        paths = {"original": export_plain(model, x, Path(d) / "original.onnx"),
                 "decomposed": export_plain(dec, x, Path(d) / "decomposed.onnx")}
        sizes = {k: p.stat().st_size for k, p in paths.items()}
        parity = {}
        for k, m in (("original", model), ("decomposed", dec)):
            with torch.no_grad():
                ref = m(x).numpy()
            got = run_logits(paths[k], x.numpy(), threads=args.threads)
            parity[k] = float(np.abs(got - ref).max())
        lat = interleaved_latency(paths, x.numpy(), args.runs, args.threads)
    # the float rounding floor: the same torch model in float64 (RSMAS's SRU has a hard 0/1 gate, so
    # rounding can flip gate elements of an untrained network and move its logits visibly)
    fp64 = {}
    for k, m in (("original", model), ("decomposed", dec)):
        with torch.no_grad():
            fp64[k] = float((m(x).double() - copy.deepcopy(m).double()(x.double())).abs().max())
    med = lat["ms_median"]
    return {
        "model": "rsmas", "width": 1.0, "num_classes": 3, "input": [1, 1, size, size],
        "weights": "seeded random (untrained): MACs and latency do not depend on the values; the "
                   "reconstruction errors of untrained kernels (flat spectra) are larger than a trained "
                   "network's (see part 2 for a trained one)",
        "decompose_seconds": round(seconds, 1),
        "report": rep,
        "onnx_bytes": sizes,
        "onnx_parity_max_abs": parity,
        "torch_fp32_vs_fp64_max_abs": fp64,
        "latency": {**lat, "ratio_of_medians": med["decomposed"] / med["original"],
                    "speedup": med["original"] / med["decomposed"], "ort_threads": args.threads},
    }


def phantom_accuracy(args) -> dict:
    from edgeus.data import build_loaders
    from edgeus.evaluate import evaluate_model
    from edgeus.train.run import train_from_config

    w, size, n = args.small_width, args.small_size, args.n_per_class
    common = ["model.name=rsmas", f"model.width={w}", f"data.image_size={size}", f"data.n_per_class={n}",
              "data.split=[0.5,0.15,0.35]", "seed=0", f"train.epochs={args.epochs}", f"train.lr={args.lr}",
              "train.warmup_epochs=1", "decompose.rank_mode=budget", f"decompose.target_macs={args.target_macs}",
              f"decompose.method={args.method}", f"decompose.lr={args.ft_lr}"]
    cfg = compose(common + [f"decompose.finetune_epochs={args.ft_epochs}"])
    t0 = time.time()
    with tempfile.TemporaryDirectory() as d:
        result, bundle = train_from_config(cfg, out_dir=Path(d) / "teacher")
        teacher = result.model.eval()
        train_s = time.time() - t0
        loaders = build_loaders(bundle, cfg.data)
        classes = bundle.classes

        def metrics(m) -> dict:
            out = {}
            for split in ("val", "test"):
                r = evaluate_model(m.eval(), loaders[split], classes)
                out[split] = {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"],
                              "recall": r["recall"], "n": r["n"]}
            return out

        base = metrics(teacher)
        cfg0 = compose(common + ["decompose.finetune_epochs=0"])
        dec0, rep0 = _decompose(teacher, cfg0)                  # no data: no BN recalibration
        no_ft = metrics(dec0)
        dec_bn, _ = _decompose(teacher, cfg0, bundle=bundle)    # BN statistics re-estimated
        bn_only = metrics(dec_bn)
        t1 = time.time()
        dec_ce, rep_ce = _decompose(teacher, cfg, bundle=bundle, out_dir=Path(d) / "ce")
        ce_s = time.time() - t1
        ce = metrics(dec_ce)
        variants = {"decomposed, no fine-tuning": no_ft, "decomposed + BN recalibrated, no fine-tuning": bn_only,
                    "decomposed + BN recalibrated + fine-tuned (CE)": ce}
        seconds = {"teacher_training": round(train_s, 1), "finetune_ce": round(ce_s, 1)}
        if not args.no_kd:
            t2 = time.time()
            dec_kd, _ = _decompose(teacher, cfg, bundle=bundle, teacher=copy.deepcopy(teacher),
                                        out_dir=Path(d) / "kd")
            seconds["finetune_kd"] = round(time.time() - t2, 1)
            variants["decomposed + BN recalibrated + fine-tuned (KD from the undecomposed model)"] = metrics(dec_kd)
        if not args.no_control:
            t3 = time.time()
            ctrl, _ = make_finetuner(cfg, bundle)(copy.deepcopy(teacher), epochs=args.ft_epochs, lr=args.ft_lr,
                                                  out_dir=Path(d) / "control", desc="control")
            seconds["control"] = round(time.time() - t3, 1)
            control = metrics(ctrl)
    if args.no_control:
        control = None
    test_base = base["test"]["accuracy"]
    comparison = {k: {"test_accuracy": v["test"]["accuracy"],
                      "drop_points": round(100 * (test_base - v["test"]["accuracy"]), 2),
                      "within_2_points": bool(100 * (test_base - v["test"]["accuracy"]) <= 2.0 + 1e-9)}
                  for k, v in variants.items()}
    return {
        "model": "rsmas", "width": w, "input": [1, 1, size, size], "n_per_class": n,
        "split": {"train": len(bundle.train), "val": len(bundle.val), "test": len(bundle.test)},
        "teacher_epochs": args.epochs, "teacher_lr": args.lr, "teacher_best_epoch": result.best_epoch,
        "finetune_epochs": args.ft_epochs, "finetune_lr": args.ft_lr,
        "undecomposed": base, "variants": variants, "comparison": comparison,
        "control_undecomposed_same_finetuning": control,
        "report": {k: v for k, v in rep_ce.items() if k != "finetune"} | {"finetune": rep_ce.get("finetune")},
        "report_no_ft_macs_ratio": rep0["macs_ratio"],
        "seconds": seconds,
    }


def write_md(res: dict, path: Path) -> None:
    fw = res["full_width"]
    rep = fw["report"]
    lat = fw["latency"]
    L = [f"# {NAME}: RSMAS-Net decomposed to {res['target_macs']:.2f} of its MACs (Tucker-2 + SVD, budget mode)", ""]
    L.append(f"Run {res['date']} on {res['machine']}, {res['mode']} mode, {res['seconds']:.0f} s in all; "
             f"load average at the end {res['load_average_end']}.")
    L += ["", "## Full width: MACs, parameters, ONNX Runtime latency", "",
          f"rsmas width 1.0, 3 classes, input 1x1x{fw['input'][2]}x{fw['input'][3]}; {fw['weights']}.", "",
          "| | original | decomposed | ratio |", "|---|---:|---:|---:|",
          f"| MACs | {rep['macs_before'] / 1e9:.3f} G | {rep['macs_after'] / 1e9:.3f} G | {rep['macs_ratio']:.3f} |",
          f"| params | {rep['params_before'] / 1e6:.2f} M | {rep['params_after'] / 1e6:.2f} M | {rep['params_ratio']:.3f} |",
          f"| ONNX bytes | {fw['onnx_bytes']['original'] / 1e6:.1f} MB | {fw['onnx_bytes']['decomposed'] / 1e6:.1f} MB | "
          f"{fw['onnx_bytes']['decomposed'] / fw['onnx_bytes']['original']:.3f} |",
          f"| ORT CPU FP32 latency (median of {lat['runs']}) | {lat['ms_median']['original']:.2f} ms | "
          f"{lat['ms_median']['decomposed']:.2f} ms | {lat['ratio_of_medians']:.3f} ({lat['speedup']:.2f}x faster) |",
          "",
          f"Block-interleaved runs in one process (edgeus.deploy.benchmark), ONNX Runtime intra-op threads = {lat['ort_threads']}; median of the "
          f"per-round ratios {lat['median_of_round_ratios']:.3f}. ONNX parity (max |ORT - torch|): original "
          f"{fw['onnx_parity_max_abs']['original']:.2e}, decomposed {fw['onnx_parity_max_abs']['decomposed']:.2e} "
          f"(for scale, torch float32 vs float64 of the same model: {fw['torch_fp32_vs_fp64_max_abs']['original']:.2e} and "
          f"{fw['torch_fp32_vs_fp64_max_abs']['decomposed']:.2e}; untrained logits are tens in size and the SRU's hard "
          f"gate can flip under rounding). "
          f"MACs by formula = MACs counted: {rep['macs_formula'] == rep['macs_after']}. "
          f"Budget {rep['budget']['target_fraction']} -> achieved {rep['budget']['achieved_fraction']:.4f}. "
          f"Decomposition took {fw['decompose_seconds']} s ({rep['method']}).", "",
          "### Per-layer table (full width, untrained weights)", "", format_table(rep), ""]
    L += ["", "Layers left alone:", ""]
    for s in rep["skipped"]:
        L.append(f"- `{s['name']}` {'x'.join(map(str, s['shape']))}: {s['reason']}")
    ph = res.get("phantom")
    if ph:
        L += ["", f"## Accuracy on the phantom (rsmas width {ph['width']}, {ph['input'][2]}x{ph['input'][3]}, trained here)", "",
              f"Phantom with {ph['n_per_class']} images per class, split train/val/test "
              f"{ph['split']['train']}/{ph['split']['val']}/{ph['split']['test']}; the undecomposed model trained "
              f"{ph['teacher_epochs']} epochs (lr {ph['teacher_lr']}, best val epoch {ph['teacher_best_epoch']}); "
              f"decomposed to {res['target_macs']} of its MACs (achieved {ph['report']['macs_ratio']:.3f}), "
              f"then fine-tuned {ph['finetune_epochs']} epochs (lr {ph['finetune_lr']}).", "",
              "| model | MACs ratio | val acc | test acc | test macro-F1 | val drop (points) | test drop (points) | "
              "test within 2 points |",
              "|---|---:|---:|---:|---:|---:|---:|---|",
              f"| undecomposed | 1.000 | {ph['undecomposed']['val']['accuracy']:.4f} | "
              f"{ph['undecomposed']['test']['accuracy']:.4f} | {ph['undecomposed']['test']['macro_f1']:.4f} | | | |"]
        val_base = ph["undecomposed"]["val"]["accuracy"]
        ctl = ph.get("control_undecomposed_same_finetuning")
        if ctl:
            L.append(f"| control: undecomposed + the same fine-tuning (CE) | 1.000 | {ctl['val']['accuracy']:.4f} | "
                     f"{ctl['test']['accuracy']:.4f} | {ctl['test']['macro_f1']:.4f} | "
                     f"{100 * (val_base - ctl['val']['accuracy']):+.2f} | "
                     f"{100 * (ph['undecomposed']['test']['accuracy'] - ctl['test']['accuracy']):+.2f} | |")
        for k, v in ph["variants"].items():
            c = ph["comparison"][k]
            L.append(f"| {k} | {ph['report']['macs_ratio']:.3f} | {v['val']['accuracy']:.4f} | {v['test']['accuracy']:.4f} | "
                     f"{v['test']['macro_f1']:.4f} | {100 * (val_base - v['val']['accuracy']):+.2f} | "
                     f"{c['drop_points']:+.2f} | {'yes' if c['within_2_points'] else 'NO'} |")
        n_test = ph["split"]["test"]
        L += ["", f"One test image is {100 / n_test:.2f} points of accuracy here ({n_test} test images), one "
              f"validation image {100 / ph['split']['val']:.2f} points ({ph['split']['val']} images): differences of "
              "a point or two are within the noise of splits this size, so read the val and test columns together."]
        if ph["undecomposed"]["test"]["accuracy"] <= 1 / 3 + 0.05:
            L += ["", "**The undecomposed model is at chance level in this run (too little training, e.g. "
                  "--quick): the comparison above says nothing about the decomposition.**"]
        L += ["",
              "### Per-layer table (phantom model, trained weights)", "", format_table(ph["report"]), ""]
    L += ["", f"Command: `{res['command']}`", ""]
    path.write_text("\n".join(L))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", default=os.environ.get("EDGEUS_BENCH_QUICK", "") not in ("", "0"))
    ap.add_argument("--target-macs", type=float, default=0.5)
    ap.add_argument("--method", default="hooi")
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--threads", type=int, default=int(_THREADS))
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--small-width", type=float, default=0.25)
    ap.add_argument("--small-size", type=int, default=64)
    ap.add_argument("--n-per-class", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ft-epochs", type=int, default=None)
    ap.add_argument("--ft-lr", type=float, default=2e-3)
    ap.add_argument("--no-kd", action="store_true")
    ap.add_argument("--no-control", action="store_true", help="skip fine-tuning the undecomposed model the same way")
    ap.add_argument("--skip-phantom", action="store_true")
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    q = args.quick
    args.runs = args.runs or (10 if q else 40)
    args.n_per_class = args.n_per_class or (40 if q else 160)
    args.epochs = args.epochs or (3 if q else 60)
    args.ft_epochs = args.ft_epochs or (2 if q else 20)
    if q:
        args.small_width = min(args.small_width, 0.125)
        args.small_size = min(args.small_size, 48)
    torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.time()
    res = {"name": NAME, "mode": "quick" if q else "full", "target_macs": args.target_macs,
           "date": time.strftime("%Y-%m-%d %H:%M"), "command": " ".join(["python"] + sys.argv),
           "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                      f"onnxruntime {__import__('onnxruntime').__version__}, math threads {args.threads}"}
    print("part 1: full-width RSMAS, decomposition + ONNX Runtime latency ...", flush=True)
    res["full_width"] = full_width(args)
    fw = res["full_width"]
    print(format_table(fw["report"], max_rows=8))
    print(f"latency ratio (decomposed / original): {fw['latency']['ratio_of_medians']:.3f}", flush=True)
    if not args.skip_phantom:
        print("part 2: phantom accuracy at a small width ...", flush=True)
        res["phantom"] = phantom_accuracy(args)
        for k, v in res["phantom"]["comparison"].items():
            print(f"  {k}: test acc {v['test_accuracy']:.4f} (drop {v['drop_points']:+.2f} points)")
    res["seconds"] = time.time() - t0
    res["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(res, indent=1, default=float))
    write_md(res, out / f"{NAME}.md")
    print(f"wrote {out / (NAME + '.json')} and .md ({res['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
