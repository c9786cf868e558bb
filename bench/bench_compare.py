"""Teacher vs student latency on the CPU with ONNX Runtime, in edgeus bench's compare mode.

    python bench/bench_compare.py [--iters 60] [--size 112] [--student-width 0.5]

Teacher: full-width RSMAS-Net, FP32 ONNX at 112x112 (2 classes, grayscale).
Student: RSMAS-Net at --student-width (the channel count a 50 % structured prune leaves), FP32
ONNX, and its INT8 Q/DQ model for the ``cpu`` target (uint8 activations, int8 per-channel
weights) made by ``edgeus.quantize.quantize_onnx`` calibrated on a small phantom set. The weights
are untrained: latency does not depend on them. All three run interleaved in one process; the
ratios (speedup against the teacher) are what to read, the milliseconds depend on the machine.

Writes bench/results/bench_compare.json and bench/results/bench_compare.md.

    python bench/bench_compare.py --cuda

On a machine with an NVIDIA GPU: teacher vs student with torch on CUDA, FP32 and FP16, batch 1
and 32, written to bench/results/bench_compare_cuda_<gpu>.{json,md} (the GPU's name in the file).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def export(model, path: Path, cfg, size: int) -> str:
    import torch

    from edgeus.onnx.export import ExportParityError, export_onnx, target_opset

    pre = {"image_size": size, "in_chans": 1, "mean": list(cfg.data.mean), "std": list(cfg.data.std)}
    try:
        export_onnx(model, path, cfg.export, preprocessing=pre, sample=torch.randn(2, 1, size, size),
                    target_opset=target_opset(cfg.target), seed=int(cfg.seed))
        return "edgeus.onnx.export_onnx"
    except ExportParityError as e:  # the parity gate on untrained weights; the file is still written
        if path.is_file():
            return f"edgeus.onnx.export_onnx (parity gate failed on untrained weights: {str(e)[:120]})"
        raise


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=60)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--size", type=int, default=112)
    ap.add_argument("--student-width", type=float, default=0.5)
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "bench_compare.json"))
    ap.add_argument("--cuda", action="store_true", help="torch on CUDA, FP32 and FP16, batch 1 and 32")
    a = ap.parse_args()
    if a.cuda:
        return cuda_main(a)

    import torch

    from edgeus.config import compose
    from edgeus.deploy.benchmark import bench, to_markdown
    from edgeus.models import create_model
    from edgeus.models.profile import count_macs, count_params

    torch.manual_seed(0)
    bs = [int(b) for b in a.batch_sizes.split(",")]
    cfg = compose(["target=cpu", f"data.image_size={a.size}", "data.n_per_class=8", f"data.phantom_size={a.size}",
                   "data.classes=[normal,benign]", "quantize.fallback=none",
                   f"bench.iters={a.iters}", f"bench.warmup={a.warmup}", f"bench.batch_sizes=[{','.join(map(str, bs))}]",
                   f"bench.threads={a.threads}"])
    notes = []
    with tempfile.TemporaryDirectory(prefix="bench_compare-") as tmp:
        tmp = Path(tmp)
        teacher = create_model("rsmas", num_classes=2, in_chans=1, width=1.0).eval()
        student = create_model("rsmas", num_classes=2, in_chans=1, width=a.student_width).eval()
        info = {}
        for name, m in (("teacher", teacher), ("student", student)):
            info[name] = {"arch": "rsmas", "width": m.edgeus_arch.get("width"), "params": count_params(m),
                          "macs": count_macs(m, a.size, 1)}
        paths = {"teacher": tmp / "teacher.fp32.onnx", "student": tmp / "student.fp32.onnx"}
        how = {k: export(m, paths[k], cfg, a.size) for k, m in (("teacher", teacher), ("student", student))}
        notes += [f"{k} export: {v}" for k, v in how.items()]
        paths["student_int8"] = tmp / "student.int8.onnx"
        t0 = time.perf_counter()
        try:
            from edgeus.data import build_datasets
            from edgeus.quantize import QDQLayout, inputs_from_bundle, quantize_onnx

            data = build_datasets(cfg.data)
            quantize_onnx(paths["student"], paths["student_int8"], cfg.quantize, layout=QDQLayout.from_target(cfg.target),
                          target=cfg.target.name, **inputs_from_bundle(data, cfg.quantize))
            notes.append(f"student INT8: edgeus.quantize.quantize_onnx, cpu target layout, phantom calibration "
                         f"({time.perf_counter() - t0:.0f} s)")
        except Exception as e:  # keep the benchmark useful while the quantiser changes
            notes.append(f"student INT8 skipped: quantize_onnx failed ({type(e).__name__}: {str(e)[:200]})")
            del paths["student_int8"]
        order = [paths["teacher"], paths["student"]] + ([paths["student_int8"]] if "student_int8" in paths else [])
        res = bench(order, cfg)
    res["models_info"] = info
    res["notes"] = notes + ["teacher = full-width RSMAS-Net FP32; student = RSMAS-Net at width "
                            f"{a.student_width} (stand-in for the pruned/decomposed student), FP32 and INT8; "
                            "untrained weights (latency does not depend on them)"]
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2, default=float) + "\n")
    md = to_markdown(res)
    md += "\n## Models\n\n| model | width | params | MACs |\n|---|---:|---:|---:|\n"
    for k, v in info.items():
        md += f"| {k} | {v['width']} | {v['params'] / 1e6:.2f} M | {v['macs'] / 1e9:.3f} G |\n"
    md += "\n" + "\n".join(f"- {n}" for n in res["notes"]) + "\n"
    out.with_suffix(".md").write_text(md)
    print(md)
    return 0


def cuda_main(a) -> int:
    """Teacher vs student with torch on CUDA (FP32 and FP16, batch 1 and 32), interleaved."""
    import re

    import torch

    from edgeus.config import compose
    from edgeus.deploy.benchmark import bench, to_markdown
    from edgeus.models import create_model
    from edgeus.train.checkpoint import save_checkpoint

    if not torch.cuda.is_available():
        print("no CUDA GPU visible to torch: nothing to measure", file=sys.stderr)
        return 1
    gpu = torch.cuda.get_device_name()
    slug = re.sub(r"[^a-z0-9]+", "_", gpu.lower()).strip("_")
    torch.manual_seed(0)
    prep = {"image_size": a.size, "in_chans": 1, "mean": [0.5], "std": [0.25]}
    results = {"gpu": gpu, "runs": {}}
    md = [f"# teacher vs student, torch on CUDA ({gpu})", ""]
    with tempfile.TemporaryDirectory(prefix="bench_compare_cuda-") as tmp:
        paths = []
        for name, width in (("teacher", 1.0), ("student", a.student_width)):
            m = create_model("rsmas", num_classes=2, in_chans=1, width=width).eval()
            paths.append(save_checkpoint(Path(tmp) / f"{name}.pt", m, classes=["no_AS", "AS"], preprocessing=prep))
        for fp16 in (False, True):
            cfg = compose(["bench.backend=torch", "bench.device=cuda", f"bench.fp16={str(fp16).lower()}",
                           f"bench.iters={a.iters}", f"bench.warmup={a.warmup}", "bench.batch_sizes=[1,32]"])
            res = bench(paths, cfg)
            key = "fp16" if fp16 else "fp32"
            results["runs"][key] = res
            md += [f"## {key.upper()}", "", to_markdown(res)]
    out = ROOT / "bench" / "results" / f"bench_compare_cuda_{slug}.json"
    out.write_text(json.dumps(results, indent=2, default=float) + "\n")
    out.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
