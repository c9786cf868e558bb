"""CP vs Tucker-2 on one model at the same MACs budget: MACs, ONNX Runtime CPU latency, accuracy after a
short fine-tuning on the phantom (issue 20.6).

The model is DSC-STA (seed 004's student; 88 % of its MACs are in its four 3x3 conventional convs),
trained here on the phantom. It is decomposed twice with the same ``decompose`` settings
(``rank_mode=budget``, ``target_macs``; only the k x k convolutions: ``decompose.pointwise=false``,
``decompose.linear=false``, so the two methods differ in nothing else): ``decompose.method=hooi``
(Tucker-2) and ``decompose.method=cp`` (CP at the MACs of the Tucker-2 ranks the budget planner picks).
Each is scored with BatchNorm statistics re-estimated and no fine-tuning, then after the same short
fine-tuning (plain CE); a control fine-tunes the undecomposed model the same way. Latency: the three
models exported to ONNX (batch 1), timed block-interleaved in one process by edgeus's latency API
(``edgeus.deploy.benchmark.latency_table``), at the training size and at a larger input.

    python bench/cp_vs_tucker.py            # ~3-5 min on 2 cores
    python bench/cp_vs_tucker.py --quick    # smoke run (~1 min)

Writes bench/results/cp_vs_tucker.json and .md (``--out`` to write elsewhere).
"""
from __future__ import annotations

import argparse
import os
import sys

_THREADS = "1"
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
from edgeus.models.profile import count_macs, count_params  # noqa: E402
from edgeus.onnx.export import export_plain  # noqa: E402
from edgeus.onnx.session import run_logits  # noqa: E402

NAME = "cp_vs_tucker"
METHODS = {"tucker2": "hooi", "cp": "cp"}


def _metrics(model, loaders, classes) -> dict:
    from edgeus.evaluate import evaluate_model

    out = {}
    for split in ("val", "test"):
        r = evaluate_model(model.eval(), loaders[split], classes)
        out[split] = {"accuracy": r["accuracy"], "macro_f1": r["macro_f1"], "recall": r["recall"], "n": r["n"]}
    return out


def _latency(models: dict, size: int, runs: int, d: Path) -> dict:
    from edgeus.deploy.benchmark import latency_table
    from edgeus.deploy.config import BenchConfig

    x = torch.randn(1, 1, size, size, generator=torch.Generator().manual_seed(1))
    paths, parity = {}, {}
    for k, m in models.items():
        paths[k] = export_plain(m.eval(), x, d / f"{k}_{size}.onnx")
        with torch.no_grad():
            ref = m(x).numpy()
        parity[k] = float(np.abs(run_logits(paths[k], x.numpy(), threads=1) - ref).max())
    bcfg = BenchConfig(backend="onnxruntime", device="cpu", iters=runs, warmup=5, batch_sizes=[1], threads=1,
                       compare=True, markdown=False)
    table = latency_table(paths, bcfg, seed=0)["batch 1"]
    return {"input": [1, 1, size, size], "runs": runs, "ort_threads": 1, "onnx_parity_max_abs": parity,
            "macs": {k: count_macs(m, size, 1) for k, m in models.items()},
            "median_ms": {k: v["median_ms"] for k, v in table.items()},
            "p90_ms": {k: v["p90_ms"] for k, v in table.items()},
            "speedup_vs_original": {k: v["speedup"] for k, v in table.items()},
            "onnx_bytes": {k: v["bytes"] for k, v in table.items()}}


def run(args) -> dict:
    from edgeus.data import build_loaders
    from edgeus.train.run import train_from_config

    common = [f"model.name={args.model}", f"model.width={args.width}", f"data.image_size={args.size}",
              f"data.n_per_class={args.n_per_class}", "data.split=[0.5,0.15,0.35]", "seed=0",
              f"train.epochs={args.epochs}", f"train.lr={args.lr}", "train.warmup_epochs=1",
              "decompose.rank_mode=budget", f"decompose.target_macs={args.target_macs}",
              "decompose.pointwise=false", "decompose.linear=false", f"decompose.cp_iters={args.cp_iters}",
              "decompose.finetune_epochs=0"]
    res: dict = {"model": args.model, "width": args.width, "input": [1, 1, args.size, args.size],
                 "n_per_class": args.n_per_class, "target_macs": args.target_macs, "cp_iters": args.cp_iters,
                 "finetune_epochs": args.ft_epochs, "finetune_lr": args.ft_lr, "seconds": {}}
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        t0 = time.time()
        cfg = compose(common)
        result, bundle = train_from_config(cfg, out_dir=d / "teacher")
        teacher = result.model.eval()
        res["seconds"]["train"] = round(time.time() - t0, 1)
        res["teacher_epochs"], res["teacher_best_epoch"] = args.epochs, result.best_epoch
        loaders = build_loaders(bundle, cfg.data)
        classes = bundle.classes
        res["split"] = {"train": len(bundle.train), "val": len(bundle.val), "test": len(bundle.test)}
        res["undecomposed"] = {"macs": count_macs(teacher, args.size, 1), "params": count_params(teacher),
                               "metrics": _metrics(teacher, loaders, classes)}
        # the decomposed models get their BatchNorm statistics re-estimated on the un-augmented train split;
        # the same for the undecomposed model is the fair baseline (training augments, evaluation does not)
        from edgeus.decompose.api import recalibrate_batchnorm

        base_bn = copy.deepcopy(teacher)
        recalibrate_batchnorm(base_bn, loaders["train_plain"], int(cfg.decompose.recalibrate_bn))
        res["undecomposed_bn_reestimated"] = _metrics(base_bn, loaders, classes)
        models = {"original": teacher}
        res["methods"] = {}
        for label, method in METHODS.items():
            cfg_m = compose(common + [f"decompose.method={method}"])
            t1 = time.time()
            dec, rep = decompose_model(teacher, cfg_m.decompose, image_size=args.size, in_chans=1,
                                       calib_loader=loaders["train_plain"])
            dec_s = time.time() - t1
            no_ft = _metrics(dec, loaders, classes)
            t2 = time.time()
            ft = make_finetuner(cfg_m, bundle)
            tuned, ft_res = ft(copy.deepcopy(dec), epochs=args.ft_epochs, lr=args.ft_lr, out_dir=d / label,
                               desc=f"{label}-finetune")
            tuned = tuned.cpu().eval()
            res["methods"][label] = {
                "decompose.method": method, "macs": rep["macs_after"], "macs_ratio": rep["macs_ratio"],
                "params": rep["params_after"], "macs_formula_equals_counted": rep["macs_after"] == rep["macs_formula"],
                "budget": rep.get("budget"), "layers": rep["layers"], "skipped": rep["skipped"],
                "mean_rel_error": float(np.mean([e["rel_error"] for e in rep["layers"]])) if rep["layers"] else None,
                "decompose_seconds": round(dec_s, 1), "finetune_seconds": round(time.time() - t2, 1),
                "finetune_best_epoch": int(ft_res["best_epoch"]),
                "no_finetune": no_ft, "finetuned": _metrics(tuned, loaders, classes),
                "table": format_table(rep),
            }
            models[label] = tuned
        t3 = time.time()
        ctrl, _ = make_finetuner(cfg, bundle)(copy.deepcopy(teacher), epochs=args.ft_epochs, lr=args.ft_lr,
                                              out_dir=d / "control", desc="control")
        res["control_undecomposed_same_finetuning"] = _metrics(ctrl.cpu(), loaders, classes)
        res["seconds"]["control"] = round(time.time() - t3, 1)
        t4 = time.time()
        res["latency"] = [_latency(models, s, args.runs, d) for s in (args.size, args.latency_size)]
        res["seconds"]["latency"] = round(time.time() - t4, 1)
    return res


def write_md(res: dict, path: Path) -> None:
    u = res["undecomposed"]
    L = [f"# {NAME}: CP vs Tucker-2 on {res['model']} (width {res['width']}) at {res['target_macs']} of its MACs", "",
         f"Run {res['date']} on {res['machine']}, {res['mode']} mode, {res['seconds']['all']:.0f} s in all; load "
         f"average at the start {res['load_average_start']}, at the end {res['load_average_end']}.", "",
         f"Phantom, {res['n_per_class']} images per class, input {res['input'][2]}x{res['input'][3]}, split "
         f"train/val/test {res['split']['train']}/{res['split']['val']}/{res['split']['test']}; the undecomposed "
         f"model trained {res['teacher_epochs']} epochs (best val epoch {res['teacher_best_epoch']}). Both methods: "
         f"`decompose.rank_mode=budget decompose.target_macs={res['target_macs']} decompose.pointwise=false "
         f"decompose.linear=false` (only the k x k convolutions), BatchNorm statistics re-estimated on the train "
         f"split, then {res['finetune_epochs']} epochs of fine-tuning (plain CE, lr {res['finetune_lr']}). CP takes, "
         f"per layer, the largest rank whose MACs fit the Tucker-2 ranks the budget planner chose "
         f"(`decompose.cp_iters={res['cp_iters']}` ALS iterations).", "",
         "| model | MACs | MACs ratio | params | mean kernel rel. error | test acc, no FT | test acc, FT | "
         "val acc, FT | test macro-F1, FT | decompose s |",
         "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
         f"| undecomposed | {u['macs'] / 1e6:.2f} M | 1.000 | {u['params'] / 1e3:.1f} k | | "
         f"{u['metrics']['test']['accuracy']:.4f} | | {u['metrics']['val']['accuracy']:.4f} | "
         f"{u['metrics']['test']['macro_f1']:.4f} | |"]
    ubn = res["undecomposed_bn_reestimated"]
    L.append(f"| undecomposed, BN statistics re-estimated (the baseline of the rows below) | {u['macs'] / 1e6:.2f} M | "
             f"1.000 | {u['params'] / 1e3:.1f} k | | {ubn['test']['accuracy']:.4f} | | {ubn['val']['accuracy']:.4f} | "
             f"{ubn['test']['macro_f1']:.4f} | |")
    ctl = res["control_undecomposed_same_finetuning"]
    L.append(f"| control: undecomposed + the same fine-tuning | {u['macs'] / 1e6:.2f} M | 1.000 | "
             f"{u['params'] / 1e3:.1f} k | | | {ctl['test']['accuracy']:.4f} | {ctl['val']['accuracy']:.4f} | "
             f"{ctl['test']['macro_f1']:.4f} | |")
    for label, m in res["methods"].items():
        L.append(f"| {label} (`decompose.method={m['decompose.method']}`) | {m['macs'] / 1e6:.2f} M | "
                 f"{m['macs_ratio']:.3f} | {m['params'] / 1e3:.1f} k | {m['mean_rel_error']:.3f} | "
                 f"{m['no_finetune']['test']['accuracy']:.4f} | {m['finetuned']['test']['accuracy']:.4f} | "
                 f"{m['finetuned']['val']['accuracy']:.4f} | {m['finetuned']['test']['macro_f1']:.4f} | "
                 f"{m['decompose_seconds']:.1f} |")
    n_test = res["split"]["test"]
    L += ["", f"One test image is {100 / n_test:.2f} points of accuracy ({n_test} test images).", "",
          "## ONNX Runtime CPU latency (FP32, batch 1, 1 intra-op thread, block-interleaved)", "",
          "| input | model | MACs | median ms | p90 ms | speedup vs original | ONNX parity (max abs) |",
          "|---|---|---:|---:|---:|---:|---:|"]
    for lat in res["latency"]:
        for k in lat["median_ms"]:
            L.append(f"| {lat['input'][2]}x{lat['input'][3]} | {k} | {lat['macs'][k] / 1e6:.2f} M | "
                     f"{lat['median_ms'][k]:.3f} | {lat['p90_ms'][k]:.3f} | {lat['speedup_vs_original'][k]:.2f}x | "
                     f"{lat['onnx_parity_max_abs'][k]:.1e} |")
    L += ["", f"Median of {res['latency'][0]['runs']} timed runs per model (edgeus.deploy.benchmark.latency_table). "
          "The larger input runs the same trained models (fully convolutional, global pooling).", ""]
    for label, m in res["methods"].items():
        L += [f"### {label}: per layer", "", m["table"], ""]
    L += [f"Command: `{res['command']}`", ""]
    path.write_text("\n".join(L))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", default=os.environ.get("EDGEUS_BENCH_QUICK", "") not in ("", "0"))
    ap.add_argument("--model", default="dsc_sta")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--latency-size", type=int, default=224)
    ap.add_argument("--target-macs", type=float, default=0.5)
    ap.add_argument("--cp-iters", type=int, default=25)
    ap.add_argument("--n-per-class", type=int, default=None)
    ap.add_argument("--epochs", type=int, default=None)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--ft-epochs", type=int, default=None)
    ap.add_argument("--ft-lr", type=float, default=1e-3)
    ap.add_argument("--runs", type=int, default=None)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results"))
    args = ap.parse_args()
    q = args.quick
    args.n_per_class = args.n_per_class or (30 if q else 80)
    args.epochs = args.epochs or (2 if q else 20)
    args.ft_epochs = args.ft_epochs or (1 if q else 4)
    args.runs = args.runs or (10 if q else 50)
    if q:
        args.width, args.latency_size = min(args.width, 0.5), min(args.latency_size, 96)
    torch.set_num_threads(1)
    logging.basicConfig(level=logging.WARNING)
    t0 = time.time()
    load0 = [round(v, 2) for v in os.getloadavg()]
    res = run(args)
    res.update({"name": NAME, "mode": "quick" if q else "full",
                "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                "command": " ".join(["python"] + sys.argv), "load_average_start": load0,
                "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
                           f"onnxruntime {__import__('onnxruntime').__version__}, tensorly "
                           f"{__import__('tensorly').__version__}, math threads 1"})
    res["seconds"]["all"] = round(time.time() - t0, 1)
    res["load_average_end"] = [round(v, 2) for v in os.getloadavg()]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{NAME}.json").write_text(json.dumps(res, indent=1, default=float))
    write_md(res, out / f"{NAME}.md")
    for label, m in res["methods"].items():
        print(f"{label}: MACs ratio {m['macs_ratio']:.3f}, test acc no-FT {m['no_finetune']['test']['accuracy']:.4f}, "
              f"FT {m['finetuned']['test']['accuracy']:.4f}")
    print(f"wrote {out / (NAME + '.json')} and .md ({res['seconds']['all']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
