"""FP32 vs INT8 (ONNX Runtime CPU layout) vs INT8 (TensorRT layout) for RSMAS-Net.

For each dataset (the built-in phantom; the BUSI developer split when it exists):
a narrow RSMAS-Net is trained for a few epochs, exported (edgeus.onnx.export_onnx) and
quantised for both targets (edgeus.quantize.quantize_onnx: calibration on the train split,
accuracy check + sensitivity fallback on val); then accuracy and per-class recall on the TEST
split, file sizes, and ONNX Runtime CPU latency at batch 1 (edgeus.deploy.benchmark: block-interleaved
runs in one process, medians, ratios from one run). A full-width RSMAS-Net at 112x112 (untrained weights: latency does not depend on
them; calibrated on phantom images) gives the latency ratios at the real model size.

    python bench/quantize_rsmas.py [--quick]

Writes bench/results/quantize_rsmas.json and .md. BUSI: W. Al-Dhabyani, M. Gomaa, H. Khaled,
A. Fahmy, "Dataset of breast ultrasound images", Data in Brief 28 (2020) 104863.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeus.config import compose  # noqa: E402
from edgeus.data import build_datasets, build_loaders  # noqa: E402
from edgeus.evaluate import compute_metrics  # noqa: E402
from edgeus.models import create_model  # noqa: E402
from edgeus.models.profile import count_params  # noqa: E402
from edgeus.deploy.benchmark import latency_table  # noqa: E402
from edgeus.deploy.config import BenchConfig  # noqa: E402
from edgeus.onnx.export import export_with_data, target_opset  # noqa: E402
from edgeus.onnx.session import run_logits  # noqa: E402
from edgeus.quantize import QDQLayout, check_tensorrt_qdq, inputs_from_bundle, quantize_onnx  # noqa: E402
from edgeus.quantize.fallback import softmax  # noqa: E402

OUT = ROOT / "bench" / "results"
WORK = ROOT / "runs" / "bench_quantize_rsmas"
BUSI = ROOT.parent / "shared" / "data" / "busi"
TARGETS = {"int8_cpu": "cpu", "int8_tensorrt": "jetson_orin_nano"}


def train(model, bundle, cfg, epochs: int, lr: float) -> None:
    """The project's own training loop (weighted CE, cosine, best on validation macro-F1)."""
    from edgeus.train import Supervised, fit

    fit(Supervised(model, bundle.class_weights()), build_loaders(bundle, cfg.data), cfg.train, None,
        classes=bundle.classes, preprocessing=bundle.preprocessing, seed=0, epochs=epochs, lr=lr)


def latency(paths: dict[str, Path], shape, iters: int, threads: int = 1) -> dict:
    """edgeus's one latency API (block-rotated, interleaved in this process; the first model the baseline)."""
    bcfg = BenchConfig(backend="onnxruntime", device="cpu", iters=iters, warmup=5, batch_sizes=[shape[0]],
                       in_chans=shape[1], image_size=shape[-1], threads=threads)
    table = latency_table({k: str(p) for k, p in paths.items()}, bcfg, seed=0)[f"batch {shape[0]}"]
    med = {k: v["median_ms"] for k, v in table.items()}
    return {"median_ms": med, "speedup_vs_fp32": {k: med["fp32"] / v for k, v in med.items()},
            "iters": iters, "threads": threads, "batch": shape[0], "input": list(shape)}


def test_metrics(path, bundle) -> dict:
    x = np.stack([bundle.test[i]["image"].numpy() for i in range(len(bundle.test))])
    y = np.asarray([int(bundle.test[i]["label"]) for i in range(len(bundle.test))])
    logits = run_logits(path, x)
    m = compute_metrics(y, softmax(logits.astype(np.float64)), bundle.classes)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "recall": m["recall"], "n": m["n"]}, logits


def run_dataset(name: str, overrides: list[str], width: float, epochs: int, lr: float, iters: int) -> dict:
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    cfg = compose(overrides)
    t0 = time.perf_counter()
    bundle = build_datasets(cfg.data)
    torch.manual_seed(0)
    model = create_model("rsmas", num_classes=len(bundle.classes), in_chans=cfg.data.in_chans, width=width)
    train(model, bundle, cfg, epochs, lr)
    t_train = time.perf_counter() - t0
    fp32 = work / "rsmas.onnx"
    exp = export_with_data(model, fp32, cfg.export, bundle, target_opset=target_opset(cfg.target), seed=cfg.seed)
    paths = {"fp32": fp32}
    res = {"data": bundle.summary(), "width": width, "params": count_params(model), "epochs": epochs,
           "train_seconds": round(t_train, 1), "export_parity": exp["parity"], "models": {}}
    m, ref_logits = test_metrics(fp32, bundle)
    res["models"]["fp32"] = {**m, "bytes": fp32.stat().st_size}
    for key, target in TARGETS.items():
        qcfg = compose(overrides + [f"target={target}", "quantize.qat=false", "quantize.max_fallback_nodes=4"])
        out = work / f"rsmas.{key}.onnx"
        r = quantize_onnx(fp32, out, qcfg.quantize, layout=QDQLayout.from_target(qcfg.target), target=target,
                          **inputs_from_bundle(bundle, qcfg.quantize), out_dir=work / f"{key}.quant")
        m, logits = test_metrics(out, bundle)
        res["models"][key] = {
            **m, "bytes": out.stat().st_size, "top1_agreement_with_fp32": float((logits.argmax(1) == ref_logits.argmax(1)).mean()),
            "val_within_tolerance": r["within_tolerance"], "method": r["method"],
            "excluded_nodes": [e["node"] for e in r["excluded_nodes"]], "val": {k: r["metrics"][k]["accuracy"] for k in r["metrics"]},
            "calibration": {"n": r["calibration"]["n"], "method": r["calibration"]["spec"]["method"],
                            "sha256": r["calibration"]["sha256"]},
            "tensorrt_checker_problems": len(check_tensorrt_qdq(out, require_qdq=True)),
            "quantize_seconds": r["seconds"],
        }
        paths[key] = out
    size = int(cfg.data.image_size)
    res["latency"] = latency(paths, (1, int(cfg.data.in_chans), size, size), iters)
    return res


def full_width_latency(iters: int) -> dict:
    work = WORK / "full"
    work.mkdir(parents=True, exist_ok=True)
    ov = ["data.n_per_class=12", "data.image_size=112", "quantize.num_images=32"]
    cfg = compose(ov)
    bundle = build_datasets(cfg.data)
    torch.manual_seed(0)
    model = create_model("rsmas", num_classes=3, width=1.0).eval()
    fp32 = work / "rsmas.onnx"
    export_with_data(model, fp32, cfg.export, bundle, target_opset=target_opset(cfg.target), seed=cfg.seed)
    paths = {"fp32": fp32}
    for key, target in TARGETS.items():
        out = work / f"rsmas.{key}.onnx"
        qcfg = compose(ov + [f"target={target}"])
        quantize_onnx(fp32, out, qcfg.quantize, layout=QDQLayout.from_target(qcfg.target), target=target,
                      **inputs_from_bundle(bundle, qcfg.quantize), recovery=False, out_dir=work / f"{key}.quant")
        paths[key] = out
    return {"params": count_params(model), "bytes": {k: p.stat().st_size for k, p in paths.items()},
            "weights": "untrained (latency does not depend on the weight values); calibrated on 32 phantom images",
            "latency": latency(paths, (1, 1, 112, 112), iters)}


def markdown(res: dict) -> str:
    lines = ["# quantize_rsmas: FP32 vs INT8 (ONNX Runtime CPU layout) vs INT8 (TensorRT layout)", "",
             f"Machine: {res['machine']}. ONNX Runtime {res['onnxruntime']}, CPU, batch 1, "
             f"{res['threads']} thread(s), interleaved runs, medians; ratios are from one run.", ""]
    for name, d in res["datasets"].items():
        lines += [f"## {name}: RSMAS-Net width {d['width']} ({d['params'] / 1e6:.2f} M params), {d['epochs']} epochs", "",
                  f"{d['data']}", "",
                  "| model | test acc | macro-F1 | recall per class | top-1 agree w/ FP32 | MB | latency ms | speed-up | val within tol. | kept FP |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        lat = d["latency"]
        for k, m in d["models"].items():
            rec = ", ".join(f"{c} {v:.2f}" for c, v in m["recall"].items())
            lines.append(f"| {k} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | {rec} | {m.get('top1_agreement_with_fp32', 1.0):.3f} | "
                         f"{m['bytes'] / 1e6:.2f} | {lat['median_ms'][k]:.2f} | {lat['speedup_vs_fp32'][k]:.2f}x | "
                         f"{m.get('val_within_tolerance', '-')} | {len(m.get('excluded_nodes', []))} |")
        lines.append("")
    f = res["full_width"]
    lat = f["latency"]
    lines += [f"## Full-width RSMAS-Net at 112x112 ({f['params'] / 1e6:.1f} M params; {f['weights']})", "",
              "| model | MB | latency ms | speed-up vs FP32 |", "|---|---|---|---|"]
    for k in lat["median_ms"]:
        lines.append(f"| {k} | {f['bytes'][k] / 1e6:.1f} | {lat['median_ms'][k]:.2f} | {lat['speedup_vs_fp32'][k]:.2f}x |")
    lines += ["", "The TensorRT-layout file keeps float weights behind Q/DQ pairs (AddQDQPairToWeight: TensorRT "
              "quantises them at build time), so it is not smaller on disk and ONNX Runtime gains nothing from it on "
              "this CPU; it is the artefact for `edgeus build`, checked by `check_tensorrt_qdq`.", "",
              "BUSI: Al-Dhabyani et al., Dataset of breast ultrasound images, Data in Brief 28 (2020) 104863 "
              "(developer split of the public images, no masks used).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="tiny settings for a smoke run")
    a = ap.parse_args()
    import onnxruntime

    iters = 10 if a.quick else 40
    threads = 1
    res = {"script": "bench/quantize_rsmas.py", "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
           "onnxruntime": onnxruntime.__version__, "torch": torch.__version__, "threads": threads, "datasets": {}}
    t0 = time.perf_counter()
    res["datasets"]["phantom"] = run_dataset(
        "phantom", ["data.n_per_class=200" if not a.quick else "data.n_per_class=12", "data.image_size=64",
                    "quantize.num_images=64"], 0.25, 3 if a.quick else 30, 2e-3, iters)
    if BUSI.is_dir():
        res["datasets"]["busi"] = run_dataset(
            "busi", ["data=busi", f"data.root={BUSI}", "data.image_size=64", "quantize.num_images=128"],
            0.25, 2 if a.quick else 30, 2e-3, iters)
    res["full_width"] = full_width_latency(iters)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "quantize_rsmas.json").write_text(json.dumps(res, indent=2, default=str))
    (OUT / "quantize_rsmas.md").write_text(markdown(res))
    print(markdown(res))


if __name__ == "__main__":
    main()
