"""Deployment: targets, TensorRT compatibility, offline build, runners, bench, package and verify."""
from __future__ import annotations

import json
import shutil
import subprocess
import tarfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from edgeus.config import ConfigError, compose
from edgeus.errors import EdgeusError

TRT_TARGETS = ["jetson_orin_nano", "jetson_orin_nx", "jetson_agx_orin", "jetson_xavier_nx",
               "desktop_ampere", "desktop_ada"]

try:
    import tensorrt  # noqa: F401
    HAVE_TRT = True
except Exception:
    HAVE_TRT = False
needs_trt = pytest.mark.skipif(not HAVE_TRT, reason="tensorrt not installed (needs an NVIDIA GPU)")


# ----------------------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory like compress writes: student.fp32.onnx, student.int8.onnx (TensorRT Q/DQ), metrics."""
    import torch
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from edgeus.models import create_model

    d = tmp_path_factory.mktemp("run")
    torch.manual_seed(0)
    m = create_model("simple_cnn", num_classes=3, in_chans=1, width=0.25).eval()
    fp32 = d / "student.fp32.onnx"
    torch.onnx.export(m, (torch.randn(1, 1, 32, 32),), str(fp32), input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, opset_version=17, dynamo=False)
    mo = onnx.load(str(fp32))
    for k, v in {"edgeus.classes": ["normal", "benign", "malignant"],
                 "edgeus.preprocessing": {"image_size": 32, "in_chans": 1, "mean": [0.5], "std": [0.25]}}.items():
        mo.metadata_props.add(key=k, value=json.dumps(v))
    onnx.save(mo, str(fp32))

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": np.random.default_rng(i).standard_normal((1, 1, 32, 32)).astype(np.float32)}
                            for i in range(4)])

        def get_next(self):
            return next(self.it, None)

    quantize_static(str(fp32), str(d / "student.int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, per_channel=True,
                    extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                                   "AddQDQPairToWeight": True, "DedicatedQDQPair": True})
    (d / "metrics.json").write_text(json.dumps({"accuracy": 0.9, "recall": {"malignant": 0.95}}))
    (d / "config.yaml").write_text("recipe:\n  name: test_recipe\n")
    return d


# a machine without TensorRT: what build() sees on these CPUs, and the same on a GPU machine
NO_GPU = {"tensorrt": None, "gpu": None, "compute_capability": None, "builder": False}


def _build(onnx_path, overrides, out, here=NO_GPU):
    """``edgeus.deploy.build`` with the target and build sections of ``compose(overrides)``."""
    from edgeus.deploy import build

    cfg = compose(list(overrides))
    return build(onnx_path, cfg.target, cfg.build, out, here=here)


def _tiny_graph(*, op="Relu", domain="", shape=("batch", 1, 8, 8), opset=17, attrs=None):
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, list(shape))
    y = helper.make_tensor_value_info("out", TensorProto.FLOAT, list(shape))
    node = helper.make_node(op, ["input"], ["out"], name="n0", domain=domain, **(attrs or {}))
    imports = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    return helper.make_model(helper.make_graph([node], "g", [x], [y]), opset_imports=imports)


# ----------------------------------------------------------------------------------------- targets

def test_all_targets_load_with_a_quantiser_layout():
    from edgeus import resources

    assert set(TRT_TARGETS + ["cpu"]) <= set(resources.list_options("targets"))
    for name in TRT_TARGETS:
        t = compose([f"target={name}"]).target
        assert t.name == name and t.backend == "tensorrt" and t.compute_capability
        q = t.quant
        assert q.layout == "tensorrt" and q.activation_type == "int8" and q.weight_type == "int8"
        assert q.activation_symmetric and q.weight_symmetric and q.per_channel and not q.quantize_bias
        assert t.batch.min <= t.batch.opt <= t.batch.max
    cpu = compose(["target=cpu"]).target
    assert cpu.quant.activation_type == "uint8" and not cpu.quant.activation_symmetric and cpu.quant.quantize_bias
    assert compose(["target=jetson_orin_nano"]).target.dla_cores == 0
    assert compose(["target=jetson_agx_orin"]).target.dla_cores == 2
    assert compose(["target=jetson_orin_nx"]).target.dla_cores == 2


def test_target_typo_fails(tmp_path):
    with pytest.raises(ConfigError, match="dla_cores"):
        compose(["target.dla_core=1"])
    bad = tmp_path / "mine.yaml"
    bad.write_text("name: mine\nworkspce_mb: 10\n")
    with pytest.raises(ConfigError, match="workspce_mb"):
        compose([f"target={bad}"])


def test_version_ranges():
    from edgeus.deploy.versions import in_range, lower_bound, same_engine_version

    assert in_range("10.3.0.26", ">=10.3,<11") and not in_range("10.2.0", ">=10.3,<11")
    assert not in_range("11.0", ">=10.3,<11") and in_range("8.5.2-1+cuda11.4", ">=8.5,<8.6")
    assert lower_bound(">=10.3,<11") == (10, 3)
    assert same_engine_version("10.3.0.26", "10.3.0.30") and not same_engine_version("10.3.0", "10.4.0")


# ----------------------------------------------------------------------------------------- compatibility

def test_compat_accepts_the_tensorrt_qdq_model(run_dir):
    from edgeus.deploy.trt_compat import check_onnx

    r = check_onnx(run_dir / "student.int8.onnx", compose(["target=jetson_orin_nano"]).target)
    assert r.ok, r.errors
    assert r.qdq_nodes > 0 and r.qdq_checked
    assert r.inputs[0]["shape"][1:] == [1, 32, 32]


def test_compat_rejects_dynamic_spatial_dims_contrib_ops_and_new_opsets():
    from edgeus.deploy.trt_compat import check_onnx

    t = compose(["target=jetson_orin_nano"]).target
    r = check_onnx(_tiny_graph(shape=("batch", 1, "h", 8)), t)
    assert not r.ok and any("dynamic" in e and "input" in e for e in r.errors)
    r = check_onnx(_tiny_graph(op="FusedConv", domain="com.microsoft"), t)
    assert not r.ok and any("com.microsoft" in e for e in r.errors)
    r = check_onnx(_tiny_graph(op="Unique"), t)
    assert not r.ok and any("Unique" in e for e in r.errors)
    r = check_onnx(_tiny_graph(opset=21), t)
    assert not r.ok and any("opset 21" in e for e in r.errors)
    # TensorRT 8.5 (Xavier NX) stops at opset 17
    r = check_onnx(_tiny_graph(opset=18), compose(["target=jetson_xavier_nx"]).target)
    assert not r.ok and any("opset 18" in e for e in r.errors)
    assert check_onnx(_tiny_graph(), t).ok


def test_compat_rejects_the_cpu_qdq_layout(run_dir, tmp_path):
    """uint8 / asymmetric Q/DQ (ONNX Runtime's layout) is not TensorRT's: the quantiser's rules say so."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    from edgeus.deploy.trt_compat import check_onnx

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.it = iter([{"input": np.random.default_rng(0).standard_normal((1, 1, 32, 32)).astype(np.float32)}])

        def get_next(self):
            return next(self.it, None)

    out = tmp_path / "cpu.int8.onnx"
    quantize_static(str(run_dir / "student.fp32.onnx"), str(out), Reader(), quant_format=QuantFormat.QDQ,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, per_channel=True)
    r = check_onnx(out, compose(["target=jetson_orin_nano"]).target)
    assert not r.ok and any(e.startswith("Q/DQ:") for e in r.errors)


# ----------------------------------------------------------------------------------------- offline build

def test_offline_build_writes_trtexec_script_and_manifest(run_dir, tmp_path):
    from edgeus.deploy import build

    cfg = compose(["target=jetson_orin_nano"])
    r = build(run_dir / "student.int8.onnx", cfg.target, cfg.build, tmp_path / "b", here=NO_GPU)
    b = tmp_path / "b"
    assert r["status"] == "device-build-required" and "TensorRT is not installed" in r["reason"]
    cmd = r["trtexec"]
    assert "--onnx=student.int8.onnx" in cmd and "--saveEngine=student.int8.engine" in cmd
    assert "--stronglyTyped" in cmd and "--int8" not in cmd and "--fp16" not in cmd  # strongly typed: no flags
    assert "--minShapes=input:1x1x32x32" in cmd and "--maxShapes=input:4x1x32x32" in cmd
    assert "--sparsity=enable" in cmd and "--memPoolSize=workspace:1024 " in cmd
    assert "--builderOptimizationLevel=3" in cmd and "--timingCacheFile=timing.cache" in cmd
    assert "--useDLACore" not in cmd
    for f in ("student.int8.onnx", "build_engine.sh", "trtexec.txt", "device_probe.py", "compat.json", "manifest.json"):
        assert (b / f).is_file(), f
    script = (b / "build_engine.sh").read_text()
    from edgeus.deploy.manifest import sha256_file

    assert sha256_file(b / "student.int8.onnx") in script and "--stronglyTyped" in script
    if shutil.which("bash"):
        assert subprocess.run(["bash", "-n", str(b / "build_engine.sh")]).returncode == 0
    m = json.loads((b / "manifest.json").read_text())
    assert m["schema_version"] == 1 and m["kind"] == "build"
    assert m["model"]["classes"] == ["normal", "benign", "malignant"]
    assert m["model"]["inputs"][0]["name"] == "input"
    assert set(m["files"]) >= {"student.int8.onnx", "build_engine.sh", "device_probe.py"}
    assert m["build"]["status"] == "device-build-required" and m["tensorrt"] is None
    assert m["build"]["reason"] and "must be built on the" in r["message"]
    assert m["build"]["trtexec_args"] == r["trtexec"].split()[1:]


def test_build_flags_follow_the_target(run_dir, tmp_path):
    # TensorRT 8.5 (Xavier NX): no strong typing, no builder optimisation level, --buildOnly; no sparsity on
    # Volta. The flags follow the target even where a newer TensorRT is installed (here: 10.8 on an SM 8.6 GPU)
    newer_here = {"tensorrt": "10.8.0.43", "builder": True, "gpu": "NVIDIA RTX A4000", "compute_capability": "8.6"}
    xr = _build(run_dir / "student.int8.onnx", ["target=jetson_xavier_nx"], tmp_path / "x", here=newer_here)
    xav = xr["trtexec"]
    assert "--int8" in xav and "--fp16" in xav and "--stronglyTyped" not in xav
    assert "--builderOptimizationLevel" not in xav and "--sparsity" not in xav
    assert xav.endswith("--buildOnly") and "--skipInference" not in xav
    assert xr["status"] == "device-build-required" and "TensorRT 10.8.0.43" in xr["reason"]
    # DLA: one static profile (min = opt = max at the target's opt batch), GPU fallback on
    dla = _build(run_dir / "student.int8.onnx", ["target=jetson_agx_orin", "build.dla_core=1"],
                 tmp_path / "d")["trtexec"]
    assert "--useDLACore=1" in dla and "--allowGPUFallback" in dla
    assert all(f"--{k}Shapes=input:4x1x32x32" in dla for k in ("min", "opt", "max"))
    with pytest.raises(EdgeusError, match="DLA"):
        _build(run_dir / "student.int8.onnx", ["target=jetson_orin_nano", "build.dla_core=0"], tmp_path / "n")


def test_build_refuses_an_incompatible_model(tmp_path):
    bad = tmp_path / "bad.onnx"
    onnx.save(_tiny_graph(shape=("batch", 1, "h", "w")), str(bad))
    with pytest.raises(EdgeusError, match="not ready for TensorRT"):
        _build(bad, ["target=desktop_ada"], tmp_path / "out")
    assert json.loads((tmp_path / "out" / "compat.json").read_text())["ok"] is False


# trtexec options each TensorRT release accepts, read from NVIDIA/TensorRT samples/common/sampleOptions.cpp
# (release/8.5, release/8.6, v10.0.0 .. v10.16): 8.5 knows --buildOnly only, 8.6 adds --skipInference and
# --builderOptimizationLevel (and deprecates --buildOnly), 10.0 removes --buildOnly and has --stronglyTyped.
_TRTEXEC_85 = {"--onnx", "--saveEngine", "--int8", "--fp16", "--minShapes", "--optShapes", "--maxShapes",
               "--sparsity", "--useDLACore", "--allowGPUFallback", "--memPoolSize", "--timingCacheFile",
               "--buildOnly"}
TRTEXEC_OPTIONS = {
    (8, 5): _TRTEXEC_85,
    (8, 6): _TRTEXEC_85 - {"--buildOnly"} | {"--skipInference", "--builderOptimizationLevel"},
    (10, 0): _TRTEXEC_85 - {"--buildOnly"} | {"--skipInference", "--builderOptimizationLevel", "--stronglyTyped"},
}


def _trt_targets():
    from edgeus import resources

    names = [n for n in resources.list_options("targets") if compose([f"target={n}"]).target.backend == "tensorrt"]
    assert set(TRT_TARGETS) <= set(names)
    return names


@pytest.mark.parametrize("target", _trt_targets())
def test_trtexec_options_exist_in_the_targets_lowest_tensorrt(target, run_dir, tmp_path):
    """Every target in targets/: each trtexec option is one the lowest TensorRT of its range accepts."""
    from edgeus.deploy.versions import lower_bound

    t = compose([f"target={target}"]).target
    low = lower_bound(t.tensorrt)
    assert low, f"{target}: a TensorRT target needs a version range with a lower bound"
    known = TRTEXEC_OPTIONS[max(v for v in TRTEXEC_OPTIONS if v <= low[:2])]
    variants = [[]] + ([["build.dla_core=0"]] if t.dla_cores else [])
    for i, extra in enumerate(variants):
        r = _build(run_dir / "student.int8.onnx", [f"target={target}", *extra], tmp_path / f"b{i}")
        args = r["trtexec"].split()
        assert args[0] == "trtexec"
        used = {a.split("=", 1)[0] for a in args[1:]}
        assert used <= known, f"{target} (TensorRT {t.tensorrt}): {sorted(used - known)} unknown to that trtexec"
        assert args[-1] == ("--skipInference" if low >= (8, 6) else "--buildOnly")
        assert ("--builderOptimizationLevel=3" in args) == (low >= (8, 6))
        assert ("--stronglyTyped" in args) == (low >= (10,))          # a Q/DQ model: strongly typed from 10
        assert ("--int8" in args) == (low < (10,))
        script = (tmp_path / f"b{i}" / "build_engine.sh").read_text()
        assert args[-1] in script and ("--stronglyTyped" in script) == (low >= (10,))
        if shutil.which("bash"):
            assert subprocess.run(["bash", "-n", str(tmp_path / f"b{i}" / "build_engine.sh")]).returncode == 0
        if extra:   # DLA: static shapes, GPU fallback
            b = t.batch.opt
            assert "--useDLACore=0" in args and "--allowGPUFallback" in args
            assert all(f"--{k}Shapes=input:{b}x1x32x32" in args for k in ("min", "opt", "max"))


def test_features_by_tensorrt_version():
    from edgeus.deploy.builder import trt_features

    assert trt_features("8.5.2")["skip_inference_flag"] == "--buildOnly"
    assert trt_features((8, 6))["skip_inference_flag"] == "--skipInference"
    assert not trt_features("8.5")["builder_optimization_level"] and trt_features("8.6.1")["builder_optimization_level"]
    assert not trt_features("9.3")["strongly_typed"] and trt_features("10.3")["strongly_typed"]
    assert trt_features("10.16")["precision_flags"] and not trt_features("11.0")["precision_flags"]


@pytest.mark.parametrize("here,expect", [
    ({}, "TensorRT is not installed"),
    ({"tensorrt": "10.3.0", "builder": False,
      "builder_error": "TensorRT 10.3.0 imports but cannot create a builder (nullptr)"}, "cannot create a builder"),
    ({"tensorrt": "10.0.1.6", "builder": True, "compute_capability": "8.7"}, "needs TensorRT >=10.3,<11"),
    ({"tensorrt": "11.0.0", "builder": True, "compute_capability": "8.7"}, "needs TensorRT >=10.3,<11"),
    ({"tensorrt": "10.3.0.30", "builder": True, "compute_capability": "8.6", "gpu": "RTX A4000"},
     "compute capability 8.6"),
    ({"tensorrt": "10.3.0.30", "builder": True, "compute_capability": None}, "no CUDA GPU"),
    ({"tensorrt": "10.3.0.30", "builder": True, "compute_capability": "8.7", "gpu": "Orin"}, None),
])
def test_local_build_only_where_the_target_runs(here, expect):
    from edgeus.deploy.builder import local_build_blocker

    why = local_build_blocker(compose(["target=jetson_orin_nano"]).target, here)
    assert (why is None) if expect is None else (expect in why), why


def test_device_build_required_says_why(run_dir, tmp_path):
    here = {"tensorrt": "10.3.0.30", "builder": True, "compute_capability": "8.9", "gpu": "RTX 4090"}
    r = _build(run_dir / "student.int8.onnx", ["target=jetson_orin_nano"], tmp_path / "b", here=here)
    assert r["status"] == "device-build-required" and "compute capability 8.9" in r["reason"]
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["build"]["status"] == "device-build-required" and m["build"]["reason"] == r["reason"]
    assert r["reason"] in r["message"]


def test_tensorrt_without_a_cuda_device_is_not_available(monkeypatch):
    """``trt.Builder`` without a CUDA device raises pybind11's nullptr error: unavailable, not a crash."""
    import sys
    import types

    from edgeus.deploy.builder import tensorrt_available, tensorrt_status

    fake = types.ModuleType("tensorrt")
    fake.__version__ = "10.3.0"

    class Logger:
        ERROR = WARNING = 0

        def __init__(self, *a):
            pass

    def builder(logger):
        raise TypeError("pybind11::init(): factory function returned nullptr")

    fake.Logger, fake.Builder = Logger, builder
    monkeypatch.setitem(sys.modules, "tensorrt", fake)
    ok, why = tensorrt_status()
    assert not ok and "nullptr" in why and "10.3.0" in why
    assert not tensorrt_available()


def test_dla_core_checks():
    from edgeus.deploy.builder import check_dla_core

    check_dla_core(None, 0)
    check_dla_core(1, 2)
    with pytest.raises(EdgeusError, match="no DLA"):
        check_dla_core(0, 0)          # an Orin Nano, a desktop GPU
    with pytest.raises(EdgeusError, match="1 DLA core"):
        check_dla_core(1, 1)          # an 8 GB Orin NX


@pytest.mark.skipif(not shutil.which("bash") or not shutil.which("sha256sum"), reason="needs bash and sha256sum")
@pytest.mark.parametrize("hostile", ["m$(touch INJ).int8.onnx", "m`touch INJ`.int8.onnx", "m'; touch INJ; '.onnx",
                                     'm"$(touch INJ)".onnx', "-m --x;touch INJ.onnx"])
def test_build_script_quotes_hostile_file_names(run_dir, tmp_path, hostile):
    """A model file named to run a command runs nothing: the script passes it as one literal argument."""
    import shlex

    src = tmp_path / "in" / hostile
    src.parent.mkdir()
    shutil.copyfile(run_dir / "student.int8.onnx", src)
    out = tmp_path / "b"
    r = _build(src, ["target=jetson_orin_nano"], out)
    assert (out / hostile).is_file()
    assert shlex.split((out / "trtexec.txt").read_text())[1] == f"--onnx={hostile}"
    fake = tmp_path / "fake_trtexec"
    fake.write_text('#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$FAKE_ARGS"\n'
                    'for a in "$@"; do case "$a" in --saveEngine=*) printf engine > "${a#--saveEngine=}";; esac; done\n')
    fake.chmod(0o755)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    env = {"PATH": "/usr/bin:/bin", "TRTEXEC": str(fake), "FAKE_ARGS": str(tmp_path / "args.txt")}
    p = subprocess.run(["bash", str(out / "build_engine.sh")], cwd=cwd, env=env, capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    assert not list(tmp_path.rglob("INJ*")), "a file name ran a command"
    args = (tmp_path / "args.txt").read_text().splitlines()
    assert f"--onnx={hostile}" in args and args == shlex.split(r["trtexec"])[1:]
    engine = json.loads((out / "engine.json").read_text())
    assert engine["engine"] == hostile[:-5] + ".engine" and (out / engine["engine"]).is_file()
    # a modified model is refused before trtexec runs
    (out / hostile).write_bytes(b"tampered")
    (tmp_path / "args.txt").unlink()
    p = subprocess.run(["bash", str(out / "build_engine.sh")], cwd=cwd, env=env, capture_output=True, text=True)
    assert p.returncode != 0 and "refusing to build" in p.stderr and not (tmp_path / "args.txt").exists()
    assert not list(tmp_path.rglob("INJ*"))


# ----------------------------------------------------------------------------------------- runners and bench

def test_onnxruntime_runner_checks_inputs(run_dir):
    from edgeus.deploy.runners import make_runner

    r = make_runner(run_dir / "student.fp32.onnx")
    with pytest.raises(EdgeusError, match="activate"):
        r.infer({"input": np.zeros((1, 1, 32, 32), np.float32)})
    with r:
        out = r.infer({"input": np.zeros((2, 1, 32, 32), np.float32)})
        assert next(iter(out.values())).shape == (2, 3) and r.last_inference_time > 0
        with pytest.raises(EdgeusError, match="dimension 2"):
            r.infer({"input": np.zeros((1, 1, 16, 32), np.float32)})
        with pytest.raises(EdgeusError, match="dtype"):
            r.infer({"input": np.zeros((1, 1, 32, 32), np.float64)})
    assert r.providers == ["CPUExecutionProvider"]
    with pytest.raises(EdgeusError, match="bench.backend=torch"):
        make_runner(run_dir / "student.fp32.onnx", backend="torch")


def test_torch_runner_matches_onnxruntime(tmp_path):
    import torch

    from edgeus.deploy.runners import make_runner
    from edgeus.models import create_model
    from edgeus.train.checkpoint import save_checkpoint

    torch.manual_seed(0)
    m = create_model("simple_cnn", num_classes=3, in_chans=1, width=0.25).eval()
    ck = save_checkpoint(tmp_path / "s.pt", m, classes=["a", "b", "c"],
                         preprocessing={"image_size": 32, "in_chans": 1, "mean": [0.5], "std": [0.25]})
    onnx_path = tmp_path / "s.onnx"
    torch.onnx.export(m, (torch.randn(1, 1, 32, 32),), str(onnx_path), input_names=["input"],
                      dynamic_axes={"input": {0: "b"}}, opset_version=17, dynamo=False)
    x = np.random.default_rng(0).standard_normal((2, 1, 32, 32)).astype(np.float32)
    with make_runner(ck) as tr, make_runner(onnx_path) as orr:
        assert tr.backend == "torch" and tr.input_metadata()["input"][1] == [None, 1, 32, 32]
        a = tr.infer({"input": x})["logits"]
        b = next(iter(orr.infer({"input": x}).values()))
    np.testing.assert_allclose(a, b, atol=1e-4)


def test_bench_compare_interleaves_and_writes_ratios(run_dir, tmp_path):
    from edgeus.deploy import bench

    # blocks of 3 timed calls: 3 + 3 + 2 per model and batch size, the last block cut short
    cfg = compose(["bench.iters=8", "bench.warmup=1", "bench.batch_sizes=[1,2]", "bench.block=3"])
    out = tmp_path / "res.json"
    res = bench([run_dir / "student.fp32.onnx", run_dir / "student.int8.onnx"], cfg, out=out)
    assert res["mode"] == "compare" and res["settings"]["interleaved"] and res["settings"]["block"] == 3
    for m in res["models"]:
        for b in ("1", "2"):
            st = m["batches"][b]
            assert st["n"] == 8 and 0 < st["p50_ms"] <= st["p90_ms"]
            assert st["p99_ms"] is None and "1000" in st["p99_note"]     # p99 only from >= 1000 samples
            assert st["throughput_ips"] > 0
        assert m["memory"]["kind"] == "host_rss"
    rows = res["compare"]["ratios"]
    assert res["compare"]["baseline"] == "student.fp32.onnx" and {r["batch"] for r in rows} == {1, 2}
    assert all(r["speedup_p50"] > 0 and r["paired_median_speedup"] > 0 for r in rows)
    saved = json.loads(out.read_text())
    assert saved["compare"]["ratios"] == json.loads(json.dumps(rows))
    md = out.with_suffix(".md").read_text()
    assert "speedup" in md and "student.int8.onnx" in md


def test_bench_single_model_has_no_compare(run_dir):
    from edgeus.deploy import bench

    res = bench([run_dir / "student.fp32.onnx"], compose(["bench.iters=3", "bench.warmup=0"]))
    assert res["mode"] == "single" and "compare" not in res
    with pytest.raises(EdgeusError, match="two or more"):
        bench([run_dir / "student.fp32.onnx"], compose(["bench.compare=true"]))


def test_tegrastats_and_clock_parsers():
    from edgeus.deploy.tegrastats import parse_clocks, parse_line

    orin = ("RAM 2364/7620MB (lfb 2x4MB) SWAP 0/3810MB CPU [2%@729,1%@729] GR3D_FREQ 45% cpu@47.5C "
            "VDD_IN 5112mW/4980mW VDD_CPU_GPU_CV 1438mW/1400mW VDD_SOC 1520mW/1500mW")
    s = parse_line(orin)
    assert s["total_mw"] == 5112 and s["power_mw"]["VDD_SOC"] == 1520 and s["gpu_util"] == 45
    assert s["ram_used_mb"] == 2364 and "RAM" not in s["power_mw"]
    xavier = "RAM 3000/7772MB GR3D_FREQ 0%@114 VDD_IN 4375/4375 VDD_CPU_GPU_CV 1076/1076 VDD_SOC 1353/1353"
    assert parse_line(xavier)["total_mw"] == 4375
    pinned = ("GPU MinFreq=918000000 MaxFreq=918000000 CurrentFreq=918000000\n"
              "cpu0: Online=1 Governor=schedutil MinFreq=1510400 MaxFreq=1510400 CurrentFreq=1510400")
    assert parse_clocks(pinned)["fixed"]
    assert not parse_clocks("GPU MinFreq=306000000 MaxFreq=918000000 CurrentFreq=306000000")["fixed"]


# ----------------------------------------------------------------------------------------- package / verify

@pytest.fixture()
def bundle(run_dir, tmp_path, small_bundle):
    """build (offline) -> package, as compress leaves it: the run's build/ directory is packaged; golden
    images from the phantom's test split (32 px, 1 channel, the run model's preprocessing)."""
    from edgeus.deploy import build, package

    cfg = compose(["target=jetson_orin_nano", "package.golden=3"])
    build(run_dir / "student.int8.onnx", cfg.target, cfg.build, tmp_path / "run_build", here=NO_GPU)
    return package(run_dir, tmp_path / "fw", cfg.package, target=cfg.target, build_dir=tmp_path / "run_build",
                   data=small_bundle)


def test_package_verify_round_trip(bundle, small_bundle):
    from edgeus.deploy import verify

    m = json.loads((bundle / "manifest.json").read_text())
    assert m["schema_version"] == 1 and m["kind"] == "bundle"
    assert m["model"]["classes"] == ["normal", "benign", "malignant"]
    assert m["model"]["preprocessing"]["image_size"] == 32
    assert m["source"]["recipe"] == "test_recipe" and m["metrics"]["accuracy"] == 0.9
    for rel in ("model/model.int8.onnx", "model/model.fp32.onnx", "build/build_engine.sh", "build/manifest.json",
                "golden/inputs.npy", "golden/raw.npy", "golden/expected.int8.npy", "golden/expected.fp32.npy",
                "labels.json", "preprocessing.json", "metrics.json", "source/config.yaml", "tools/edgeus_device.py"):
        assert rel in m["files"], rel
    assert np.load(bundle / "golden" / "inputs.npy").shape == (3, 1, 32, 32)
    assert {g["precision"] for g in m["golden"]["outputs"]} == {"int8", "fp32"}
    outputs = m["golden"]["outputs"]
    for target in (bundle, bundle.with_name("fw.tar.gz")):
        r = verify(target)
        assert r["ok"], r["errors"]
        # an engine in the bundle adds a golden entry; it runs only where TensorRT and the GPU match the build
        engine_ran = any("match the build" in c for c in r["checks"])
        ran_here = [e for e in outputs if engine_ran or not e["model"].endswith(".engine")]
        assert r["backend"] in ("onnxruntime", "tensorrt") and len(r["golden"]) == len(ran_here)
        assert all(g["ok"] for g in r["golden"])


def test_golden_inputs_are_real_images_of_every_class(bundle, small_bundle):
    """Golden inputs: test-split images, one per class here, with raw pixels and expected top-1, so that a
    wrong preprocessing or a constant answer on the device fails."""
    from edgeus.deploy.bundle import device_tool

    dev = device_tool()
    m = json.loads((bundle / "manifest.json").read_text())
    g = m["golden"]
    assert g["source"].startswith("test split") and sorted(g["labels"]) == [0, 1, 2]
    assert set(g["ids"]) <= set(small_bundle.ids("test"))
    raw = np.load(bundle / g["raw"])
    x = np.load(bundle / g["inputs"])
    assert raw.dtype == np.uint8 and raw.shape == (3, 32, 32)
    np.testing.assert_allclose(dev.preprocess(raw, m["model"]["preprocessing"]), x, atol=1e-6)
    test = small_bundle.test
    pos = [small_bundle.ids("test").index(i) for i in g["ids"]]
    np.testing.assert_allclose(x, np.stack([test[i]["image"].numpy() for i in pos]), atol=1e-6)
    # a wrong preprocessing (no mean/std) is caught
    wrong = dict(m["model"]["preprocessing"], mean=[0.0], std=[1.0])
    assert np.abs(dev.preprocess(raw, wrong) - x).max() > 0.1
    # the device's comparison: the expected logits pass, a constant answer and swapped logits fail
    entry = next(e for e in g["outputs"] if e["precision"] == "fp32")
    exp = np.load(bundle / entry["expected"])
    assert entry["top1"] == exp.argmax(-1).tolist()
    assert dev.compare_golden(exp, exp, entry)[0] == []
    if len(set(entry["top1"])) > 1:
        const = np.tile(exp[:1], (len(exp), 1))
        assert dev.compare_golden(const, exp, entry)[0]
    assert dev.compare_golden(exp[:, ::-1].copy(), exp, entry)[0]


def test_package_never_replaces_a_users_files(run_dir, tmp_path, capsys):
    from edgeus.cli import main
    from edgeus.deploy import package

    cfg = compose(["target=cpu", "package.golden_data=false"])
    kw = dict(target=cfg.target)
    a_file = tmp_path / "notes.txt"
    a_file.write_text("mine")
    with pytest.raises(EdgeusError, match="not a directory"):
        package(run_dir, a_file, cfg.package, **kw)
    assert a_file.read_text() == "mine"
    assert main(["package", str(run_dir), f"out={a_file}", "package.golden_data=false"]) == 2
    assert "not a directory" in capsys.readouterr().err
    user = tmp_path / "mydir"
    (user / "sub").mkdir(parents=True)
    (user / "sub" / "keep.txt").write_text("mine")
    with pytest.raises(EdgeusError, match="not empty"):
        package(run_dir, user, cfg.package, **kw)
    with pytest.raises(EdgeusError, match="not an edgeus bundle"):
        package(run_dir, user, cfg.package, overwrite=True, **kw)
    assert (user / "sub" / "keep.txt").read_text() == "mine"
    out = package(run_dir, tmp_path / "fw", cfg.package, **kw)
    tar = out.with_name("fw.tar.gz")
    tar_bytes = tar.read_bytes()
    (out / "manifest.json").unlink()          # an empty-looking dir is not the point: the tar is refused too
    import shutil as _sh

    _sh.rmtree(out)
    with pytest.raises(EdgeusError, match="fw.tar.gz exists"):
        package(run_dir, tmp_path / "fw", cfg.package, **kw)
    assert tar.read_bytes() == tar_bytes
    out = package(run_dir, tmp_path / "fw", cfg.package, overwrite=True, **kw)   # a bundle: replaced on request
    out = package(run_dir, tmp_path / "fw", cfg.package, overwrite=True, **kw)
    assert (out / "manifest.json").is_file() and not list(tmp_path.glob(".fw.*"))


# ----------------------------------------------------------------------------------------- bundle trust (21.3)

def _rehash(bundle_dir, edit=None):
    """Rewrite the manifest after ``edit(manifest)`` with fresh checksums of every listed file: what an
    attacker who can rewrite the manifest does."""
    from edgeus.deploy import manifest as mf

    m = json.loads((bundle_dir / "manifest.json").read_text())
    if edit:
        edit(m)
    m["files"] = {rel: {"sha256": mf.sha256_file(bundle_dir / rel), "bytes": (bundle_dir / rel).stat().st_size}
                  for rel in m["files"] if (bundle_dir / rel).is_file()} if m.get("files") else m.get("files")
    (bundle_dir / "manifest.json").write_text(json.dumps(m))


def _refused(r, *words):
    msg = " | ".join(r["errors"])
    return (not r["ok"]) and all(w in msg for w in words)


def test_verify_refuses_an_empty_files_table(bundle):
    from edgeus.deploy import verify

    _rehash(bundle, lambda m: m.update(files={}))
    assert _refused(verify(bundle), "'files' table is empty")


def test_verify_refuses_a_tampered_and_delisted_model(bundle):
    from edgeus.deploy import verify

    p = bundle / "model" / "model.int8.onnx"
    p.write_bytes(p.read_bytes()[:-3] + b"xyz")

    def delist(m):
        del m["files"]["model/model.int8.onnx"]
        m["golden"]["outputs"] = [e for e in m["golden"]["outputs"] if e["precision"] != "int8"]
        del m["files"]["golden/expected.int8.npy"]

    _rehash(bundle, delist)
    (bundle / "golden" / "expected.int8.npy").unlink()
    r = verify(bundle)
    assert _refused(r, "model/model.int8.onnx") and r["golden"] == []   # refused, and nothing was run


def test_verify_refuses_an_unlisted_runtime_model(bundle):
    from edgeus.deploy import verify

    shutil.copyfile(bundle / "model" / "model.fp32.onnx", bundle / "model" / "other.onnx")
    _rehash(bundle, lambda m: m["runtime_order"].insert(0, "model/other.onnx"))
    assert _refused(verify(bundle), "model/other.onnx", "runtime_order[0] is not listed")
    assert _refused(verify(bundle, allow_extra=True), "runtime_order[0] is not listed")


def test_verify_refuses_a_golden_model_outside_the_bundle(bundle, tmp_path):
    from edgeus.deploy import verify

    outside = tmp_path / "evil.onnx"
    shutil.copyfile(bundle / "model" / "model.fp32.onnx", outside)
    for path in ("../evil.onnx", str(outside)):
        _rehash(bundle, lambda m: m["golden"]["outputs"][0].update(model=path))
        r = verify(bundle)
        assert _refused(r, "golden.outputs[0].model points outside the bundle") and r["golden"] == []
    # a symbolic link inside the bundle that leads out is refused too
    (bundle / "model" / "link.onnx").symlink_to(outside)
    assert _refused(verify(bundle, allow_extra=True), "model/link.onnx", "symbolic link")


def test_verify_refuses_an_extra_file_unless_allowed(bundle):
    from edgeus.cli import main
    from edgeus.deploy import verify

    (bundle / "golden" / "extra.npy").write_bytes(b"x")
    assert _refused(verify(bundle), "golden/extra.npy", "not listed")
    r = verify(bundle, allow_extra=True)
    assert r["ok"], r["errors"]
    assert any("golden/extra.npy" in w for w in r["warnings"])
    assert main(["verify", str(bundle)]) == 5 and main(["verify", str(bundle), "--allow-extra"]) == 0


def test_verify_refuses_oversized_archives(tmp_path):
    import io

    from edgeus.deploy import verify

    bomb = tmp_path / "bomb.tar.gz"
    with tarfile.open(bomb, "w:gz") as t:      # 64 MiB of zeros: 64 KiB on disk
        info = tarfile.TarInfo("fw/golden/inputs.npy")
        info.size = 64 << 20

        class Zeros(io.RawIOBase):
            def __init__(self, n):
                self.n = n

            def readable(self):
                return True

            def readinto(self, b):
                k = min(len(b), self.n)
                b[:k] = bytes(k)
                self.n -= k
                return k

        t.addfile(info, io.BufferedReader(Zeros(info.size)))
    assert bomb.stat().st_size < 1 << 20
    r = verify(bomb, max_bytes=32 << 20)
    assert _refused(r, "bomb.tar.gz", "expands to more than")
    many = tmp_path / "many.tar.gz"
    with tarfile.open(many, "w:gz") as t:
        for i in range(30):
            info = tarfile.TarInfo(f"fw/f{i}")
            t.addfile(info, io.BytesIO(b""))
    assert _refused(verify(many, max_members=20), "more than 20 members")


def test_signed_bundles(run_dir, tmp_path, capsys):
    """keygen -> package.sign_key -> verify --key: unsigned, wrongly signed or edited bundles are refused."""
    from edgeus.cli import main
    from edgeus.deploy import package, verify

    assert main(["keygen", f"out={tmp_path / 'k' / 'edgeus'}"]) == 0
    priv, pub = tmp_path / "k" / "edgeus", tmp_path / "k" / "edgeus.pub"
    assert priv.stat().st_mode & 0o077 == 0 and b"PUBLIC KEY" in pub.read_bytes()
    assert main(["keygen", f"out={priv}"]) == 2                      # never overwrites a key
    main(["keygen", f"out={tmp_path / 'other'}"])
    cfg = compose(["target=cpu", "package.golden_data=false"])
    signed = package(run_dir, tmp_path / "signed", compose(["target=cpu", "package.golden_data=false",
                                                             f"package.sign_key={priv}"]).package, target=cfg.target)
    unsigned = package(run_dir, tmp_path / "unsigned", cfg.package, target=cfg.target)
    assert (signed / "manifest.json.sig").is_file()
    for b in (signed, signed.with_name("signed.tar.gz")):
        r = verify(b, key=pub)
        assert r["ok"], r["errors"]
        assert any("Ed25519 signature valid" in c for c in r["checks"])
    assert any("no --key given" in w for w in verify(signed)["warnings"])
    assert _refused(verify(unsigned, key=pub), "not signed")
    assert _refused(verify(signed, key=tmp_path / "other.pub"), "does not match")
    assert main(["verify", str(signed), "--key", str(pub)]) == 0
    assert main(["verify", str(unsigned), "--key", str(pub)]) == 5
    # an attacker who swaps two class names and rewrites the manifest's checksums breaks the signature
    p = signed / "labels.json"
    p.write_text(p.read_text().replace("benign", "TMP").replace("malignant", "benign").replace("TMP", "malignant"))
    _rehash(signed)
    assert verify(signed)["ok"]                                       # integrity alone cannot tell
    assert _refused(verify(signed, key=pub), "does not match")        # authenticity can


def test_on_device_tool_decides_like_verify(bundle, tmp_path):
    """The bundle's own tools/edgeus_device.py (stdlib only for verify) accepts the bundle and refuses a tampered one."""
    import sys

    tool = bundle / "tools" / "edgeus_device.py"
    p = subprocess.run([sys.executable, str(tool), "verify"], capture_output=True, text=True)
    assert p.returncode == 0 and "verified" in p.stdout, p.stdout + p.stderr
    import glob

    # JetPack 5's Python 3.8, where this machine has one (stdlib only: no numpy, no cryptography needed)
    for py38 in [shutil.which("python3.8"), *glob.glob(str(Path.home() / ".pyenv/versions/3.8*/bin/python3.8"))]:
        if py38 and subprocess.run([py38, "-c", "import sys; assert sys.version_info[:2] == (3, 8)"],
                                   capture_output=True).returncode == 0:
            p = subprocess.run([py38, str(tool), "verify"], capture_output=True, text=True)
            assert p.returncode == 0 and "verified" in p.stdout, p.stdout + p.stderr
            break
    p = subprocess.run([sys.executable, str(tool), "verify", "--bundle", str(bundle.with_name("fw.tar.gz"))],
                       capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    (bundle / "golden" / "extra.npy").write_bytes(b"x")
    p = subprocess.run([sys.executable, str(tool), "verify"], capture_output=True, text=True)
    assert p.returncode == 1 and "golden/extra.npy" in p.stdout
    p = subprocess.run([sys.executable, str(tool), "verify", "--key", str(tmp_path / "nokey.pub")],
                       capture_output=True, text=True)
    assert p.returncode == 1 and "not signed" in p.stdout
    # build without trtexec: a clear message, exit 2
    (bundle / "golden" / "extra.npy").unlink()
    p = subprocess.run([sys.executable, str(tool), "build"], capture_output=True, text=True,
                       env={"PATH": "/nonexistent"})
    assert p.returncode == 2 and "trtexec not found" in p.stdout


def test_on_device_tool_builds_without_a_shell_and_times_from_trtexec_records(bundle, tmp_path):
    """build runs trtexec with the manifest's arguments (no shell) outside the bundle; bench summarises
    trtexec --exportTimes records (p99 only from >= 1000 runs)."""
    import sys

    from edgeus.deploy.bundle import device_tool

    fake = tmp_path / "trtexec"
    fake.write_text("#!/usr/bin/env python3\nimport json, sys\nargs = sys.argv[1:]\n"
                    "open('args.json', 'w').write(json.dumps(args))\n"
                    "for a in args:\n"
                    "    if a.startswith('--saveEngine='): open(a.split('=', 1)[1], 'wb').write(b'engine')\n"
                    "    if a.startswith('--exportTimes='):\n"
                    "        json.dump([{'latencyMs': 1.0 + i / 1000, 'computeMs': 0.5} for i in range(1200)],"
                    " open(a.split('=', 1)[1], 'w'))\n")
    fake.chmod(0o755)
    tool = bundle / "tools" / "edgeus_device.py"
    p = subprocess.run([sys.executable, str(tool), "build", "--trtexec", str(fake)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    out = bundle.with_name("fw-engine")
    args = json.loads((out / "args.json").read_text())
    assert args[0] == "--onnx=" + str((bundle / "build" / "student.int8.onnx").resolve())
    assert args[-1] == "--skipInference" and "--stronglyTyped" in args
    assert json.loads((out / "engine.json").read_text())["engine"] == "student.int8.engine"
    p = subprocess.run([sys.executable, str(tool), "verify"], capture_output=True, text=True)
    assert p.returncode == 0, "the engine is built outside the signed bundle"
    p = subprocess.run([sys.executable, str(tool), "bench", "--trtexec", str(fake)], capture_output=True, text=True)
    assert p.returncode == 0, p.stdout + p.stderr
    args = json.loads((out / "args.json").read_text())
    assert any(a.startswith("--loadEngine=") for a in args) and any(a.startswith("--exportTimes=") for a in args)
    assert "--shapes=input:1x1x32x32" in args
    s = json.loads((out / "bench.json").read_text())
    assert s["n"] == 1200 and "p99" in s["latencyMs"] and s["computeMs"]["median"] == 0.5
    assert "p99" not in device_tool().summarize_times([{"latencyMs": 1.0}] * 999)["latencyMs"]


def test_on_device_files_parse_as_python_38():
    """JetPack 5 ships Python 3.8: every file that runs on the device must parse as 3.8."""
    import ast

    root = Path(__file__).resolve().parent.parent / "edgeus" / "deploy"
    files = sorted((root / "ondevice").glob("*.py")) + [root / "device_probe.py"]
    assert any(f.name == "edgeus_device.py" for f in files)
    for f in files:
        ast.parse(f.read_text(), filename=str(f), feature_version=(3, 8))


def test_verify_fails_on_a_tampered_file(bundle):
    from edgeus.cli import main
    from edgeus.deploy import verify

    p = bundle / "model" / "model.int8.onnx"
    data = bytearray(p.read_bytes())
    data[len(data) // 2] ^= 0xFF
    p.write_bytes(bytes(data))
    r = verify(bundle)
    assert not r["ok"] and any(e.startswith("model/model.int8.onnx:") and "SHA-256" in e for e in r["errors"])
    assert main(["verify", str(bundle)]) == 5


def test_verify_fails_on_truncation_and_on_a_truncated_archive(bundle):
    from edgeus.deploy import verify

    p = bundle / "golden" / "expected.fp32.npy"
    p.write_bytes(p.read_bytes()[:-7])
    r = verify(bundle)
    assert not r["ok"] and any(e.startswith("golden/expected.fp32.npy:") and "truncated" in e for e in r["errors"])
    tar = bundle.with_name("fw.tar.gz")
    tar.write_bytes(tar.read_bytes()[: tar.stat().st_size // 2])
    r = verify(tar)
    assert not r["ok"] and "fw.tar.gz" in r["errors"][0]


def test_verify_fails_on_a_wrong_schema_version(bundle):
    from edgeus.deploy import verify

    mp = bundle / "manifest.json"
    m = json.loads(mp.read_text())
    m["schema_version"] = 99
    mp.write_text(json.dumps(m))
    r = verify(bundle)
    assert not r["ok"] and "manifest.json" in r["errors"][0] and "schema_version 99" in r["errors"][0]


def test_verify_refuses_an_engine_built_elsewhere(bundle):
    """A manifest saying TensorRT 10.3 / SM 8.7 against a machine with 10.0 / SM 8.6: clear refusal."""
    from edgeus.deploy import manifest as mf
    from edgeus.deploy import verify

    (bundle / "build" / "model.engine").write_bytes(b"not really an engine")
    m = json.loads((bundle / "manifest.json").read_text())
    m["tensorrt"] = {"version": "10.3.0.26", "compute_capability": "8.7", "gpu": "Orin", "jetpack": "6.1",
                     "engine": "build/model.engine"}
    mf.write_manifest(bundle, m)
    r = verify(bundle, here={"tensorrt": "10.0.1.6", "compute_capability": "8.6", "gpu": "NVIDIA RTX A4000"})
    assert not r["ok"]
    msg = " ".join(r["errors"])
    assert "build/model.engine" in msg and "TensorRT 10.3.0.26" in msg and "10.0.1.6" in msg
    assert "compute capability 8.7" in msg and "8.6" in msg
    r = verify(bundle, here={"tensorrt": None})   # no TensorRT here: cannot check, ONNX fallback verified
    assert r["ok"], r["errors"]
    assert any("cannot be checked here" in w for w in r["warnings"])


def test_archive_members_stay_inside(tmp_path):
    from edgeus.deploy import verify

    evil = tmp_path / "evil.tar.gz"
    src = tmp_path / "x.txt"
    src.write_text("x")
    with tarfile.open(evil, "w:gz") as t:
        t.add(src, arcname="../escape.txt")
    r = verify(evil)
    assert not r["ok"] and "unsafe" in r["errors"][0]


def test_package_needs_artifacts(tmp_path):
    from edgeus.deploy import package

    (tmp_path / "empty_run").mkdir()
    with pytest.raises(EdgeusError, match="nothing to package"):
        package(tmp_path / "empty_run", tmp_path / "fw", compose([]).package, target=compose([]).target)


def test_cli_targets_and_build(run_dir, tmp_path, capsys):
    from edgeus.cli import main

    assert main(["targets"]) == 0
    assert "jetson_orin_nano" in capsys.readouterr().out
    assert main(["build", str(run_dir / "student.int8.onnx"), "target=desktop_ada", f"out={tmp_path / 'b'}"]) == 0
    out = capsys.readouterr().out
    assert "trtexec --onnx=" in out and ("must be built on the" in out or "built student.int8.engine" in out)


# ----------------------------------------------------------------------------------------- TensorRT (GPU only)

@needs_trt
def test_tensorrt_engine_build_and_run(run_dir, tmp_path):
    from edgeus.deploy import build
    from edgeus.deploy.builder import local_build_blocker, local_environment
    from edgeus.deploy.runners import make_runner

    here = local_environment()
    cc = here.get("compute_capability") or "8.6"
    cfg = compose(["target=desktop_ampere", "target.sparse_weights=false", f"target.compute_capability={cc}"])
    why = local_build_blocker(cfg.target, here)
    if why:
        pytest.skip(f"no local TensorRT build: {why}")
    r = build(run_dir / "student.int8.onnx", cfg.target, cfg.build, tmp_path / "b")
    assert r["status"] == "engine" and Path(r["engine"]).is_file()
    assert (tmp_path / "b" / "timing.cache").is_file()
    m = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert m["tensorrt"]["version"] and m["tensorrt"]["compute_capability"]
    x = np.random.default_rng(0).standard_normal((2, 1, 32, 32)).astype(np.float32)
    with make_runner(r["engine"]) as trt_r, make_runner(run_dir / "student.int8.onnx") as ort_r:
        a = next(iter(trt_r.infer({"input": x}).values()))
        b = next(iter(ort_r.infer({"input": x}).values()))
    assert a.shape == b.shape

    def softmax(v):
        e = np.exp(v - v.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    np.testing.assert_allclose(softmax(a), softmax(b), atol=0.05)   # the bundle's INT8 golden tolerance


def test_manifest_of_a_bundle_given_by_a_relative_path(tmp_path, monkeypatch):
    from edgeus.deploy.manifest import file_entries

    (tmp_path / "b" / "golden").mkdir(parents=True)
    (tmp_path / "b" / "golden" / "x.npy").write_bytes(b"123")
    monkeypatch.chdir(tmp_path)
    assert list(file_entries("b")) == ["golden/x.npy"]
