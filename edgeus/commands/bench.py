"""Latency / throughput benchmark of one or more models; with two or more, a compare (ratios).

    edgeus bench student.int8.onnx bench.iters=200 bench.batch_sizes=[1,8]
    edgeus bench teacher.onnx student.int8.onnx out=bench/results/teacher_vs_student.json
    edgeus bench student.pt bench.backend=torch bench.device=cuda bench.fp16=true

Backends by file: .onnx -> onnxruntime (CPU; CUDA/TensorRT providers with bench.device=cuda),
.pt (edgeus checkpoint) -> torch (bench.device=cpu|cuda, bench.fp16), .engine -> TensorRT (cuda-python).
Warm-up, bench.iters timed iterations (TensorRT engines: by time, as trtexec: >= 200 ms warm-up, >= 3 s
and up to 1000 runs, with the engine's GPU time from CUDA events beside the host time),
p50/p90/mean latency (p99 only from >= 1000 samples) and synchronous throughput per batch size,
memory; on a Jetson, power and energy per inference from tegrastats and the nvpmodel/clock state.
A batch outside an engine's optimisation profile is skipped with a warning saying so.
Compare mode runs the models in rotated blocks of bench.block calls in one process and reports speedups against the
first model. out=<file.json> writes JSON and a markdown table (<file>.md).
"""
from __future__ import annotations

from edgeus.errors import EdgeusError

USAGE = "<model> [model ...] [bench.iters=100] [bench.batch_sizes=[1,8]] [bench.compare=true] [out=results.json]"


def run(cfg, args):
    from edgeus.deploy.benchmark import bench, to_markdown

    if not args:
        raise EdgeusError(f"no model given; usage: edgeus bench {USAGE}")
    res = bench(args, cfg, out=cfg.out)
    print(to_markdown(res), end="")
    if cfg.out:
        print(f"\nwrote {cfg.out} (+ .md)")
    return 0
