"""RSMAS-Net (full width, 112x112, 1 channel, 2 classes) pruned to a 0.3 MACs budget.

Measures, in one run: MACs and parameters before/after, ONNX export of both (with torch parity),
ONNX Runtime CPU latency of both timed in one process (edgeus bench, rotated blocks; medians and the ratio), and the unstructured-sparsity
check (50 % global magnitude sparsity: dense latency ratio ~1.0, smaller gzip file). Weights are
seeded random (untrained): latency and MACs do not depend on the values; accuracy is not measured here
(tests/test_prune.py checks recovery after fine-tuning on the phantom).

    python bench/prune_rsmas.py            # 50 timed runs per model
    python bench/prune_rsmas.py --quick    # 15 runs

Writes bench/results/prune_rsmas.json and .md.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeus.config import compose  # noqa: E402
from edgeus.models import create_model  # noqa: E402
from edgeus.prune import example_input, prune_model  # noqa: E402
from edgeus.prune.measure import export, latency_ratio  # noqa: E402

OUT = ROOT / "bench" / "results"


def parity(path, model, x) -> float:
    from edgeus.onnx.session import run_logits

    with torch.no_grad():
        ref = model(x).numpy()
    return float(np.abs(run_logits(path, x.numpy(), batch=None) - ref).max())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--target-macs", type=float, default=0.3)
    ap.add_argument("--size", type=int, default=112)
    args = ap.parse_args()
    runs = 15 if args.quick else 50
    torch.manual_seed(0)
    cfg = compose([f"data.image_size={args.size}", "data.in_chans=1", f"prune.target_macs={args.target_macs}",
                   "prune.measure_latency=false"])
    model = create_model("rsmas", num_classes=2, in_chans=1, width=1.0).eval()
    dense = copy.deepcopy(model)
    t0 = time.time()
    x0 = example_input(model, args.size, 1)
    pruned, rep = prune_model(copy.deepcopy(model), cfg.prune, example_inputs=x0)
    prune_s = time.time() - t0
    pruned.eval()

    # unstructured 50 % on the unpruned model: dense runtimes see no gain
    ucfg = compose([f"data.image_size={args.size}", "prune.method=unstructured", "prune.sparsity=0.5",
                    "prune.measure_latency=false"])
    sparse, urep = prune_model(copy.deepcopy(model), ucfg.prune, example_inputs=x0)
    sparse.eval()

    x = torch.randn(1, 1, args.size, args.size, generator=torch.Generator().manual_seed(1))
    with tempfile.TemporaryDirectory() as d:
        paths = {"dense": export(dense, x, Path(d) / "dense.onnx"),
                 "pruned": export(pruned, x, Path(d) / "pruned.onnx"),
                 "sparse50": export(sparse, x, Path(d) / "sparse50.onnx")}
        sizes = {k: p.stat().st_size for k, p in paths.items()}
        par = {"pruned": parity(paths["pruned"], pruned, x), "dense": parity(paths["dense"], dense, x)}
        lat = latency_ratio(paths, x, runs=runs, warmup=5)
    ms = lat["ms"]
    s = rep["structured"]
    result = {
        "bench": "prune_rsmas",
        "model": "rsmas width 1.0, 2 classes, 1x%dx%d, seeded random weights (untrained)" % (args.size, args.size),
        "target_macs_fraction": args.target_macs,
        "macs": {"before": rep["before"]["macs"], "after": rep["after"]["macs"], "ratio": rep["macs_ratio"]},
        "params": {"before": rep["before"]["params"], "after": rep["after"]["params"], "ratio": rep["params_ratio"]},
        "budget_met": s["budget_met"],
        "channel_ratio_found": s["steps_detail"][-1]["ratio"],
        "block_pruners": s["block_pruners"],
        "internal_cuts": s["steps_detail"][-1]["internal_cuts"],
        "layers_left_whole": s["layers_left_whole"],
        "prune_seconds": round(prune_s, 1),
        "onnx_bytes": sizes,
        "onnx_parity_max_abs_diff": par,
        "onnxruntime_cpu_ms_median": ms,
        "latency_ratio_pruned_over_dense": round(ms["pruned"] / ms["dense"], 4),
        "speedup_pruned": round(ms["dense"] / ms["pruned"], 3),
        "unstructured_50": {
            "achieved_sparsity": urep["unstructured"]["achieved_sparsity"],
            "dense_latency_ratio": round(ms["sparse50"] / ms["dense"], 4),
            "state_dict_bytes": urep["unstructured"]["file_bytes"],
            "note": urep["unstructured"]["note"],
        },
        "runs": runs, "interleaved": True,
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "onnxruntime": __import__("onnxruntime").__version__,
                    "loadavg": list(os.getloadavg()) if hasattr(os, "getloadavg") else None},
        "quick": args.quick,
    }
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "prune_rsmas.json").write_text(json.dumps(result, indent=2))
    u = result["unstructured_50"]
    md = [
        "# prune_rsmas: RSMAS-Net pruned to a %.2f MACs budget" % args.target_macs,
        "",
        f"{result['model']}; ONNX Runtime CPU, batch 1, {runs} runs per model in rotated blocks (edgeus bench), medians "
        f"(load average at the end: {result['machine']['loadavg']}).",
        "",
        "| | dense | pruned | ratio |",
        "|---|---|---|---|",
        f"| MACs | {rep['before']['macs'] / 1e9:.3f} G | {rep['after']['macs'] / 1e9:.3f} G | {rep['macs_ratio']:.3f} |",
        f"| params | {rep['before']['params'] / 1e6:.2f} M | {rep['after']['params'] / 1e6:.2f} M | {rep['params_ratio']:.3f} |",
        f"| ONNX bytes | {sizes['dense'] / 1e6:.1f} MB | {sizes['pruned'] / 1e6:.1f} MB | {sizes['pruned'] / sizes['dense']:.3f} |",
        f"| ORT latency | {ms['dense']:.2f} ms | {ms['pruned']:.2f} ms | {result['latency_ratio_pruned_over_dense']:.3f} "
        f"({result['speedup_pruned']:.2f}x faster) |",
        "",
        f"Channel ratio found by the MACs-budget search: {result['channel_ratio_found']}; budget met: "
        f"{result['budget_met']}. SCConv and MDTA pruned by edgeus' block pruners ({', '.join(s['block_pruners'])}); "
        f"ONNX parity (max |diff| vs torch): {par['pruned']:.2e}.",
        "",
        "Layers left whole:",
        "",
        *[f"- `{w['layer']}`: {w['reason']}" for w in s["layers_left_whole"]],
        "",
        "## Unstructured sparsity (honest check)",
        "",
        f"50 % global magnitude sparsity (achieved {u['achieved_sparsity']:.3f}) on the unpruned model: dense ONNX "
        f"Runtime latency ratio {u['dense_latency_ratio']:.3f} (dense kernels do the same work with zeros; any difference from 1.0 is measurement noise); state dict "
        f"{u['state_dict_bytes']['before']['gzip_bytes'] / 1e6:.1f} MB -> "
        f"{u['state_dict_bytes']['after']['gzip_bytes'] / 1e6:.1f} MB gzip "
        f"(dense {u['state_dict_bytes']['after']['dense_bytes'] / 1e6:.1f} MB either way). {u['note']}.",
        "",
    ]
    (OUT / "prune_rsmas.md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
