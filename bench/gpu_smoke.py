"""GPU smoke test: what edgeus's GPU paths measure on a machine with an NVIDIA GPU (issue 18.9).

    bash bench/gpu_smoke.sh            # runs this as  python -m bench.gpu_smoke  with PYTHONPATH=<repo>

Parts (each prints a SKIP line, with the reason, when it cannot run here):

1. ``torch-cuda``: torch CUDA latency of the RSMAS-Net teacher (width 1.0) and a pruned student, FP32
   and FP16, batch 1 and 8, timed with CUDA events (GPU time) beside host wall-clock time, warm-up and
   measurement by time as ``trtexec`` does; FP16 vs FP32 output difference.
2. ``tensorrt``: when ``tensorrt`` (and ``cuda-python``) import: FP32 and INT8 engines built from the
   student and a small teacher (ONNX exported here; INT8 from a TensorRT-layout Q/DQ model quantised
   with ONNX Runtime), each engine's outputs compared with ONNX Runtime on the same ONNX file, the
   per-layer precision read from the engine inspector, and host end-to-end vs GPU (CUDA events) time
   through ``edgeus.deploy.runners.trt.TrtRunner``.

Needs: numpy and torch (CUDA) for part 1; onnx, onnxruntime, tensorrt >= 10 and cuda-python for part 2.
Not needed: omegaconf, tqdm, tensorly, matplotlib, pillow, onnxslim (edgeus modules that import them
are not imported). The student is pruned with torch-pruning through ``edgeus.prune`` when that imports;
otherwise RSMAS-Net at a reduced width (uniform channel pruning) stands in, and the results say so.
Weights are seeded and untrained: latency and engine/ONNX agreement do not depend on their values.

Writes bench/results/gpu_smoke.json and .md when at least one part ran (a run where every part was
skipped leaves earlier results in place). Whole run: under 10 minutes (a time budget skips what is left).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "results"
BUDGET_S = 540.0
T0 = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T0


class Results:
    def __init__(self):
        self.data = {"schema": "edgeus-gpu-smoke/1", "created": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
                     "command": "bash bench/gpu_smoke.sh " + " ".join(sys.argv[1:]), "env": {}, "skipped": {},
                     "torch_cuda": None, "tensorrt": None, "notes": []}

    def skip(self, part: str, why: str) -> None:
        print(f"SKIP {part}: {why}", flush=True)
        self.data["skipped"][part] = why


# ---------------------------------------------------------------------------------------------- models
def make_models(torch, quick: bool, notes: list) -> dict:
    """The teacher (RSMAS-Net width 1.0) and the pruned student, on the CPU, eval mode, seeded."""
    from edgeus.models import create_model

    torch.manual_seed(0)
    teacher = create_model("rsmas", num_classes=3, in_chans=1, width=1.0).eval()
    student, how = None, None
    try:
        import torch_pruning  # noqa: F401

        from edgeus.prune.api import prune_model
        from edgeus.prune.config import PruneConfig

        pcfg = PruneConfig(method="structured", importance="l2", target_macs=0.1, finetune_epochs=0)
        student, rep = prune_model(teacher, pcfg, example_inputs=torch.randn(1, 1, 112, 112))
        how = "edgeus.prune structured (l2) to 0.1 of the teacher's MACs, untrained"
    except Exception as e:   # torch-pruning absent on the GPU machine, or the pruning API moved: say so
        torch.manual_seed(1)
        student = create_model("rsmas", num_classes=3, in_chans=1, width=0.35).eval()
        how = (f"RSMAS-Net width 0.35 (uniform channel pruning) standing in for the pruned student: "
               f"edgeus.prune unavailable here ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
        notes.append(how)
    print(f"student: {how}", flush=True)
    return {"teacher": teacher, "student": student.eval(), "student_how": how}


def _macs(model, torch) -> int | None:
    try:
        from edgeus.models.profile import count_macs

        return count_macs(model, 112, 1)
    except Exception:   # torch-pruning (the op counter) absent: MACs not reported
        return None


# ---------------------------------------------------------------------------------------------- part 1
def torch_cuda(res: Results, models: dict, quick: bool) -> None:
    import numpy as np
    import torch

    from edgeus.deploy.runners.trt import TimePlan, percentile_if_enough, run_plan

    plan = TimePlan(warmup_s=0.2, duration_s=1.0 if quick else 2.0, enough_runs=1000, max_s=3.0 if quick else 5.0)
    dev = torch.device("cuda")
    rows, agree = [], {}
    for name in ("teacher", "student"):
        m32 = models[name].to(dev).eval()
        for prec in ("fp32", "fp16"):
            m = m32 if prec == "fp32" else __import__("copy").deepcopy(m32).half()
            for b in (1, 8):
                x = torch.randn(b, 1, 112, 112, device=dev, generator=torch.Generator(device=dev).manual_seed(b))
                x = x.half() if prec == "fp16" else x
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                gpu_ms: list[float] = []

                def call():
                    t = time.perf_counter()
                    start.record()
                    with torch.inference_mode():
                        m(x)
                    end.record()
                    end.synchronize()
                    host = time.perf_counter() - t
                    gpu_ms.append(start.elapsed_time(end))
                    return host * 1e3

                host_ms = run_plan(call, plan)
                gpu = gpu_ms[-len(host_ms):]
                p99, why = percentile_if_enough(gpu, 99)
                rows.append({"model": name, "precision": prec, "batch": b, "n": len(host_ms),
                             "host_p50_ms": float(np.median(host_ms)), "gpu_p50_ms": float(np.median(gpu)),
                             "gpu_p99_ms": p99, "p99_note": why,
                             "throughput_ips_sync": b * 1e3 / float(np.mean(host_ms))})
                print(f"  torch {name} {prec} batch {b}: GPU p50 {rows[-1]['gpu_p50_ms']:.3f} ms, host p50 "
                      f"{rows[-1]['host_p50_ms']:.3f} ms ({len(host_ms)} runs)", flush=True)
            if prec == "fp16":
                x = torch.randn(8, 1, 112, 112, device=dev, generator=torch.Generator(device=dev).manual_seed(0))
                with torch.inference_mode():
                    a, h = m32(x).float(), m(x.half()).float()
                agree[name] = {"max_abs_diff": float((a - h).abs().max()), "max_abs_logit": float(a.abs().max()),
                               "top1_agreement": float((a.argmax(1) == h.argmax(1)).float().mean())}
            del m
        models[name] = m32.cpu()
        torch.cuda.empty_cache()
    speed = {}
    for prec in ("fp32", "fp16"):
        for b in (1, 8):
            t = next(r for r in rows if r["model"] == "teacher" and r["precision"] == prec and r["batch"] == b)
            s = next(r for r in rows if r["model"] == "student" and r["precision"] == prec and r["batch"] == b)
            speed[f"{prec} batch {b}"] = t["gpu_p50_ms"] / s["gpu_p50_ms"]
    res.data["torch_cuda"] = {"gpu": torch.cuda.get_device_name(), "rows": rows, "fp16_vs_fp32": agree,
                              "student_speedup_gpu_p50": speed, "input": [1, 112, 112],
                              "timing": "CUDA events around the forward (GPU time) and host wall clock around "
                                        "forward + synchronize; warm-up 200 ms, then by time (TimePlan)"}


# ---------------------------------------------------------------------------------------------- part 2
def export(torch, model, path: Path) -> Path:
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.cpu().eval(), (torch.randn(1, 1, 112, 112),), str(path), input_names=["input"],
                          output_names=["logits"], opset_version=17, dynamo=False, do_constant_folding=True,
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}})
    return path


def quantize_qdq(fp32: Path, out: Path, n: int = 32) -> Path:
    """A TensorRT-layout Q/DQ model (symmetric int8 activations and per-channel weights, no bias Q/DQ)."""
    import numpy as np
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    class Reader(CalibrationDataReader):
        def __init__(self):
            rng = np.random.default_rng(0)
            self.items = iter([{"input": rng.standard_normal((1, 1, 112, 112)).astype(np.float32)} for _ in range(n)])

        def get_next(self):
            return next(self.items, None)

    import logging

    logging.getLogger().setLevel(logging.ERROR)   # onnxruntime.quantization logs every bias it leaves in float
    src = fp32
    try:   # ONNX Runtime's recommended pre-processing (shape inference, folding), as edgeus.quantize does
        from onnxruntime.quantization.shape_inference import quant_pre_process

        src = out.with_name(out.stem + ".pre.onnx")
        quant_pre_process(str(fp32), str(src), skip_symbolic_shape=True)
    except Exception as e:   # noqa: BLE001  the plain export still quantises; say so
        print(f"  note: quant_pre_process failed ({type(e).__name__}); quantising the plain export", flush=True)
        src = fp32
    quantize_static(str(src), str(out), Reader(), quant_format=QuantFormat.QDQ, activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8, per_channel=True, calibrate_method=CalibrationMethod.MinMax,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                                   "AddQDQPairToWeight": True, "DedicatedQDQPair": True})
    return out


def build_engine(trt, onnx_path: Path, out: Path, int8: bool) -> dict:
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    strongly = int8 and hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED")
    flags = (1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)) if strongly else 0
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse(onnx_path.read_bytes()):
        raise RuntimeError("; ".join(str(parser.get_error(i)) for i in range(parser.num_errors)))
    config = builder.create_builder_config()
    config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    profile = builder.create_optimization_profile()
    profile.set_shape("input", (1, 1, 112, 112), (8, 1, 112, 112), (32, 1, 112, 112))
    config.add_optimization_profile(profile)
    mode = "fp32"
    if int8 and not strongly:
        config.set_flag(trt.BuilderFlag.INT8)   # TensorRT < 10 without strongly typed networks: Q/DQ + INT8 flag
        mode = "int8 (Q/DQ, INT8 flag)"
    elif int8:
        mode = "int8 (Q/DQ, strongly typed network)"
    t = time.perf_counter()
    blob = builder.build_serialized_network(network, config)
    if blob is None:
        raise RuntimeError("build_serialized_network returned None (see the TensorRT log above)")
    out.write_bytes(bytes(blob))
    return {"engine": str(out), "mode": mode, "build_s": round(time.perf_counter() - t, 1), "bytes": out.stat().st_size}


def layer_precisions(trt, engine_path: Path) -> dict:
    """Per-layer output precision from the engine inspector (detailed profiling verbosity)."""
    runtime = trt.Runtime(trt.Logger(trt.Logger.WARNING))
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    info = json.loads(engine.create_engine_inspector().get_engine_information(trt.LayerInformationFormat.JSON))
    layers, counts = [], {}
    for layer in info.get("Layers", []):
        if not isinstance(layer, dict):
            continue
        outs = layer.get("Outputs") or []
        fmt = " ".join(str(o.get("Format/Datatype", "")) for o in outs if isinstance(o, dict))
        f = fmt.lower()
        prec = ("int8" if "int8" in f else "fp16" if ("fp16" in f or "half" in f) else
                "fp32" if ("fp32" in f or "float" in f) else "other")
        counts[prec] = counts.get(prec, 0) + 1
        layers.append({"name": layer.get("Name"), "type": layer.get("LayerType"), "precision": prec, "format": fmt})
    return {"counts": counts, "layers": layers}


def tensorrt_part(res: Results, models: dict, quick: bool) -> None:
    import numpy as np
    import tensorrt as trt
    import torch

    from edgeus.deploy.runners.trt import TimePlan, TrtRunner, import_cudart, percentile_if_enough, run_plan
    from edgeus.onnx.session import run_logits

    import_cudart()   # MissingDependencyError (a SKIP) when cuda-python is absent
    plan = TimePlan(warmup_s=0.2, duration_s=1.0 if quick else 2.0, enough_runs=1000, max_s=3.0 if quick else 5.0)
    torch.manual_seed(2)
    from edgeus.models import create_model

    small = {"student": models["student"],
             "teacher (width 0.5)": create_model("rsmas", num_classes=3, in_chans=1, width=0.5).eval()}
    out = {"tensorrt": trt.__version__, "models": {}}
    x = np.random.default_rng(0).standard_normal((8, 1, 112, 112)).astype(np.float32)
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        for name, model in small.items():
            key = name.split()[0]
            fp32 = export(torch, model, d / f"{key}.fp32.onnx")
            onnx_files = {"fp32": fp32, "int8": quantize_qdq(fp32, d / f"{key}.int8.onnx")}
            rows = {}
            for prec, onnx_path in onnx_files.items():
                if elapsed() > BUDGET_S:
                    res.skip(f"tensorrt {name} {prec}", f"time budget ({BUDGET_S:.0f} s) spent")
                    continue
                eng = d / f"{key}.{prec}.engine"
                row = build_engine(trt, onnx_path, eng, int8=prec == "int8")
                ref = run_logits(onnx_path, x, batch=None)            # ONNX Runtime CPU on the same ONNX file
                with TrtRunner(eng, check_compat=False) as r:
                    got = r.infer({"input": x})["logits"]
                    row["vs_onnxruntime"] = {"max_abs_diff": float(np.abs(got - ref).max()),
                                             "max_abs_logit": float(np.abs(ref).max()),
                                             "top1_agreement": float((got.argmax(1) == ref.argmax(1)).mean()), "n": 8}
                    timing = {}
                    for b in (1, 8):
                        xb = np.ascontiguousarray(x[:b])
                        gpu: list[float] = []

                        def call():
                            r.infer({"input": xb}, check_inputs=False)
                            gpu.append(r.last_gpu_time * 1e3)
                            return r.last_inference_time * 1e3

                        host = run_plan(call, plan)
                        g = gpu[-len(host):]
                        p99, why = percentile_if_enough(g, 99)
                        timing[f"batch {b}"] = {"n": len(host), "host_p50_ms": float(np.median(host)),
                                                "gpu_p50_ms": float(np.median(g)), "gpu_p99_ms": p99,
                                                "p99_note": why, "throughput_ips_sync": b * 1e3 / float(np.mean(host))}
                    row["timing"] = timing
                    row["memory"] = r.memory()
                row["layers"] = layer_precisions(trt, eng)
                rows[prec] = row
                v = row["vs_onnxruntime"]
                print(f"  tensorrt {name} {prec}: built in {row['build_s']} s, vs ORT max |diff| {v['max_abs_diff']:.3g} "
                      f"(max |logit| {v['max_abs_logit']:.3g}), top-1 {v['top1_agreement']:.3f}; layers "
                      f"{row['layers']['counts']}; batch 1 GPU p50 {timing['batch 1']['gpu_p50_ms']:.3f} ms, host "
                      f"{timing['batch 1']['host_p50_ms']:.3f} ms", flush=True)
            out["models"][name] = rows
    res.data["tensorrt"] = out


# ---------------------------------------------------------------------------------------------- report
def to_markdown(data: dict) -> str:
    env = data["env"]
    L = ["# GPU smoke (bench/gpu_smoke.sh)", "",
         f"Run {data['created']} on {env.get('gpu', 'no GPU')} (torch {env.get('torch')}, CUDA {env.get('cuda')}, "
         f"TensorRT {env.get('tensorrt') or 'absent'}, onnxruntime {env.get('onnxruntime') or 'absent'}); "
         f"{data.get('seconds', 0):.0f} s. Weights seeded and untrained (latency and engine/ONNX agreement do not "
         "depend on them); input 1x112x112.", ""]
    for part, why in data["skipped"].items():
        L.append(f"- SKIP {part}: {why}")
    for n in data["notes"]:
        L.append(f"- note: {n}")
    tc = data.get("torch_cuda")
    if tc:
        L += ["", "## torch CUDA: teacher vs pruned student (CUDA events)", "",
              "| model | precision | batch | GPU p50 ms | GPU p99 ms | host p50 ms | img/s (sync) | runs |",
              "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in tc["rows"]:
            p99 = "-" if r["gpu_p99_ms"] is None else f"{r['gpu_p99_ms']:.3f}"
            L.append(f"| {r['model']} | {r['precision']} | {r['batch']} | {r['gpu_p50_ms']:.3f} | {p99} | "
                     f"{r['host_p50_ms']:.3f} | {r['throughput_ips_sync']:.0f} | {r['n']} |")
        scale = {}
        for r in tc["rows"]:
            scale.setdefault((r["model"], r["precision"]), {})[r["batch"]] = r["gpu_p50_ms"]
        flat = [k for k, v in scale.items() if 1 in v and 8 in v and v[8] < 1.5 * v[1]]
        if flat:
            L += ["", "Launch-bound: " + ", ".join(f"{m} {p}" for m, p in flat) + " take about as long at batch 8 as at "
                  "batch 1, so these eager-mode timings measure per-kernel launch overhead (Python dispatch of "
                  "hundreds of small kernels), not the GPU's arithmetic; a smaller model is then no faster. "
                  "TensorRT engines (part 2) or CUDA graphs measure the compute."]
        L += ["", "Student speed-up (teacher / student GPU p50): " +
              ", ".join(f"{k} {v:.2f}x" for k, v in tc["student_speedup_gpu_p50"].items()) + ".",
              "FP16 vs FP32 (batch 8): " + ", ".join(
                  f"{k} max |diff| {v['max_abs_diff']:.3g} of max |logit| {v['max_abs_logit']:.3g}, top-1 "
                  f"{v['top1_agreement']:.3f}" for k, v in tc["fp16_vs_fp32"].items()) + "."]
    tr = data.get("tensorrt")
    if tr:
        L += ["", f"## TensorRT {tr['tensorrt']}: engines vs ONNX Runtime, layer precision, host vs GPU time", "",
              "| model | engine | build s | vs ORT max abs diff | top-1 agreement | layers by precision | "
              "b1 GPU p50 ms | b1 host p50 ms | b8 GPU p50 ms | b8 host p50 ms |",
              "|---|---|---:|---:|---:|---|---:|---:|---:|---:|"]
        for name, rows in tr["models"].items():
            for prec, r in rows.items():
                t1, t8 = r["timing"]["batch 1"], r["timing"]["batch 8"]
                L.append(f"| {name} | {r['mode']} | {r['build_s']} | {r['vs_onnxruntime']['max_abs_diff']:.3g} | "
                         f"{r['vs_onnxruntime']['top1_agreement']:.3f} | {r['layers']['counts']} | "
                         f"{t1['gpu_p50_ms']:.3f} | {t1['host_p50_ms']:.3f} | {t8['gpu_p50_ms']:.3f} | "
                         f"{t8['host_p50_ms']:.3f} |")
    L += ["", "Throughput is synchronous (one inference in flight); p99 only from >= 1000 samples."]
    return "\n".join(L) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="shorter timing windows")
    ap.add_argument("--out", default=str(OUT / "gpu_smoke"), help="results path without suffix")
    args = ap.parse_args(argv)
    res = Results()
    env = res.data["env"]
    env.update({"python": platform.python_version(), "machine": platform.machine(), "host": platform.node()})
    try:
        import numpy  # noqa: F401
        import torch
    except ImportError as e:
        res.skip("torch-cuda", f"{e.name} is not installed")
        res.skip("tensorrt", "needs torch to export the models")
        print("nothing measured; bench/results/gpu_smoke.* left as they are")
        return 0
    env["torch"] = torch.__version__
    env["cuda"] = torch.version.cuda
    try:
        import onnxruntime

        env["onnxruntime"] = onnxruntime.__version__
    except ImportError:
        env["onnxruntime"] = None
    try:
        import tensorrt

        env["tensorrt"] = tensorrt.__version__
    except ImportError:
        env["tensorrt"] = None
    cuda = torch.cuda.is_available()
    if cuda:
        env["gpu"] = torch.cuda.get_device_name()
        env["compute_capability"] = ".".join(map(str, torch.cuda.get_device_capability()))
    ran = False
    models = None
    if not cuda:
        res.skip("torch-cuda", "torch sees no CUDA GPU here")
    else:
        models = make_models(torch, args.quick, res.data["notes"])
        models_macs = {k: _macs(models[k], torch) for k in ("teacher", "student")}
        res.data["models"] = {"student": models["student_how"], "macs": models_macs,
                              "params": {k: sum(p.numel() for p in models[k].parameters()) for k in ("teacher", "student")}}
        torch_cuda(res, models, args.quick)
        ran = True
    if env["tensorrt"] is None:
        res.skip("tensorrt", "tensorrt is not importable here (FP32/INT8 engines, ORT comparison, layer precision, "
                             "host vs GPU time not measured)")
    elif not cuda:
        res.skip("tensorrt", "TensorRT is installed but there is no CUDA GPU")
    elif env["onnxruntime"] is None:
        res.skip("tensorrt", "onnxruntime is not installed (needed for the INT8 Q/DQ model and the comparison)")
    else:
        from edgeus.errors import MissingDependencyError

        try:
            tensorrt_part(res, models, args.quick)
            ran = True
        except MissingDependencyError as e:
            res.skip("tensorrt", str(e))
    res.data["seconds"] = round(elapsed(), 1)
    if not ran:
        print("nothing measured; bench/results/gpu_smoke.* left as they are")
        return 0
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(res.data, indent=1, default=str) + "\n")
    out.with_suffix(".md").write_text(to_markdown(res.data))
    print(f"wrote {out.with_suffix('.json')} and {out.with_suffix('.md')} ({res.data['seconds']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
