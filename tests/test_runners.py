"""The TensorRT runner's pure logic and its wiring, on the CPU: profile bounds, the time-based
iteration plan, p99 only from enough samples, and TrtRunner driven through fake ``tensorrt`` and
``cuda-python`` modules that implement the documented calls (no GPU here)."""
from __future__ import annotations

import ctypes
import subprocess
import sys
import types

import numpy as np
import pytest

from edgeus.deploy.runners.trt import (P99_MIN_SAMPLES, ProfileError, TimePlan, TrtRunner, percentile_if_enough,
                                       profile_violation, run_plan)
from edgeus.errors import EdgeusError, MissingDependencyError

PROFILE = [(1, 1, 8, 8), (4, 1, 8, 8), (8, 1, 8, 8)]


def test_import_needs_neither_tensorrt_nor_cuda_python():
    code = ("import sys\nfor m in ('tensorrt', 'cuda', 'cuda.bindings', 'pycuda'): sys.modules[m] = None\n"
            "import edgeus.deploy.runners.trt as t\nr = t.TrtRunner('x.engine')\n"
            "try:\n    r.activate()\nexcept t.MissingDependencyError as e:\n    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "refused: tensorrt not installed" in out.stdout


def test_profile_bounds():
    assert profile_violation("input", (4, 1, 8, 8), PROFILE) is None
    assert profile_violation("input", (1, 1, 8, 8), PROFILE) is None and profile_violation("input", (8, 1, 8, 8), PROFILE) is None
    why = profile_violation("input", (16, 1, 8, 8), PROFILE)
    assert "batch 16 is outside the engine's optimisation profile (batch 1..8" in why
    assert "outside" in profile_violation("input", (2, 1, 16, 16), PROFILE)
    assert "dimensions" in profile_violation("input", (2, 8, 8), PROFILE)


def test_time_plan_is_trtexec_like():
    plan = TimePlan()
    assert plan.warmup_s == 0.2 and plan.duration_s == 3.0 and plan.enough_runs == 1000
    assert not plan.warmup_done(0.1, 50) and plan.warmup_done(0.2, 1)
    assert not plan.done(2.9, 5000)               # at least 3 s, however fast
    assert not plan.done(3.5, 999)                # and on to 1000 samples for a p99 ...
    assert plan.done(3.0, 1000)
    assert plan.done(10.0, 50) and not plan.done(10.0, 5)   # ... up to max_s, never below min_runs
    assert plan.expected_runs(0.001) == 3000      # 1 ms: 3 s of runs
    assert plan.expected_runs(0.005) == 1000      # 5 ms: 1000 runs take 5 s
    assert plan.expected_runs(0.05) == 200        # 50 ms: 10 s cap, no p99
    assert plan.expected_runs(5.0) == 10          # min_runs


def test_run_plan_with_a_fake_clock():
    now = [0.0]

    def clock():
        return now[0]

    def call():
        now[0] += 0.004
        return 0.004

    samples = run_plan(call, TimePlan(), clock=clock)
    assert len(samples) == TimePlan().expected_runs(0.004) == 1000


def test_percentile_only_from_enough_samples():
    v, why = percentile_if_enough(list(range(999)), 99)
    assert v is None and "1000" in why and "999" in why
    v, why = percentile_if_enough(np.arange(P99_MIN_SAMPLES, dtype=float), 99)
    assert why is None and v == pytest.approx(np.percentile(np.arange(1000.0), 99))


def test_latency_stats_label_sync_throughput_and_withhold_p99():
    from edgeus.deploy.benchmark import latency_stats

    st = latency_stats([0.002] * 100, 4)
    assert st["p99_ms"] is None and st["p99_note"] and st["throughput_kind"] == "synchronous"
    assert st["throughput_ips"] == pytest.approx(2000.0)
    st = latency_stats([0.002] * 1000, 1)
    assert st["p99_ms"] == pytest.approx(2.0) and "p99_note" not in st


# ---------------------------------------------------------------------------------------------- fakes
class _Ok:
    value = 0
    name = "cudaSuccess"


class FakeCudart(types.SimpleNamespace):
    """The cuda-python runtime calls TrtRunner makes, over host memory (``(err, *values)`` results)."""

    def __init__(self):
        super().__init__(cudaMemcpyKind=types.SimpleNamespace(cudaMemcpyHostToDevice=1, cudaMemcpyDeviceToHost=2))
        self.blocks, self.pinned, self.freed, self.device = {}, 0, 0, None

    def _alloc(self, n):
        buf = ctypes.create_string_buffer(n)
        self.blocks[ctypes.addressof(buf)] = buf
        return ctypes.addressof(buf)

    def cudaSetDevice(self, d):
        self.device = d
        return (_Ok(),)

    def cudaMemGetInfo(self):
        return (_Ok(), 1 << 30, 2 << 30)

    def cudaStreamCreate(self):
        return (_Ok(), 7)

    def cudaEventCreate(self):
        return (_Ok(), object())

    def cudaEventRecord(self, ev, stream):
        return (_Ok(),)

    def cudaEventElapsedTime(self, a, b):
        return (_Ok(), 0.25)

    def cudaMallocHost(self, n):
        self.pinned += 1
        return (_Ok(), self._alloc(n))

    def cudaMalloc(self, n):
        return (_Ok(), self._alloc(n))

    def cudaFree(self, p):
        self.freed += 1
        return (_Ok(),)

    cudaFreeHost = cudaFree

    def cudaMemcpyAsync(self, dst, src, n, kind, stream):
        ctypes.memmove(int(dst), int(src), n)
        return (_Ok(),)

    def cudaStreamSynchronize(self, s):
        return (_Ok(),)

    def cudaEventDestroy(self, e):
        return (_Ok(),)

    def cudaStreamDestroy(self, s):
        return (_Ok(),)


def _fake_trt():
    trt = types.SimpleNamespace(__version__="10.3.0")
    trt.TensorIOMode = types.SimpleNamespace(INPUT="in", OUTPUT="out")
    trt.Logger = type("Logger", (), {"WARNING": 2, "__init__": lambda self, level=2: None})
    trt.nptype = lambda dt: np.float32

    class Context:
        active_optimization_profile = 0

        def __init__(self):
            self.shapes, self.addr, self.set_calls = {}, {}, 0

        def set_input_shape(self, name, shape):
            self.set_calls += 1
            if profile_violation(name, shape, PROFILE):
                return False
            self.shapes[name] = tuple(shape)
            return True

        def get_tensor_shape(self, name):
            return (self.shapes["input"][0], 3)

        def set_tensor_address(self, name, ptr):
            self.addr[name] = ptr

        def execute_async_v3(self, stream_handle):
            b = self.shapes["input"][0]
            x = np.frombuffer((ctypes.c_float * (b * 64)).from_address(self.addr["input"]), np.float32).reshape(b, 64)
            y = np.frombuffer((ctypes.c_float * (b * 3)).from_address(self.addr["logits"]), np.float32).reshape(b, 3)
            y[:] = x.sum(1, keepdims=True) * np.array([1, 2, 3], np.float32)
            return True

    class Engine:
        num_io_tensors = 2
        device_memory_size_v2 = 1 << 20

        def get_tensor_name(self, i):
            return ["input", "logits"][i]

        def get_tensor_mode(self, n):
            return "in" if n == "input" else "out"

        def get_tensor_shape(self, n):
            return (-1, 1, 8, 8) if n == "input" else (-1, 3)

        def get_tensor_dtype(self, n):
            return "float"

        def get_tensor_profile_shape(self, n, idx):
            return PROFILE

        def create_execution_context(self):
            self.context = Context()
            return self.context

    class Runtime:
        def __init__(self, logger):
            pass

        def deserialize_cuda_engine(self, blob):
            return Engine() if blob == b"engine" else None

    trt.Runtime = Runtime
    return trt


@pytest.fixture
def fake_gpu(monkeypatch):
    cudart = FakeCudart()
    trt = _fake_trt()
    bindings = types.ModuleType("cuda.bindings")
    bindings.runtime = cudart
    cuda = types.ModuleType("cuda")
    cuda.bindings = bindings
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "cuda", cuda)
    monkeypatch.setitem(sys.modules, "cuda.bindings", bindings)
    monkeypatch.setitem(sys.modules, "cuda.bindings.runtime", cudart)
    return cudart


def test_trt_runner_with_fake_tensorrt_and_cuda_python(fake_gpu, tmp_path):
    eng = tmp_path / "m.engine"
    eng.write_bytes(b"engine")
    r = TrtRunner(eng, check_compat=False)
    with r:
        assert fake_gpu.device == 0                                   # cudaSetDevice: the primary context
        x = np.arange(2 * 64, dtype=np.float32).reshape(2, 1, 8, 8)
        out = r.infer({"input": x})["logits"]
        np.testing.assert_allclose(out, x.reshape(2, 64).sum(1, keepdims=True) * [1, 2, 3])
        assert r.last_gpu_time == pytest.approx(0.25e-3) and r.last_inference_time > 0
        pinned, shape_calls = fake_gpu.pinned, r.context.set_calls
        for _ in range(3):
            r.infer({"input": x})                                     # same shape: no new buffers
        assert fake_gpu.pinned == pinned == 2                         # input + output, pinned once
        assert r.context.set_calls == shape_calls                     # and the shape is not set again
        y4 = r.infer({"input": np.ones((4, 1, 8, 8), np.float32)})["logits"]   # a new shape: its own buffers
        assert fake_gpu.pinned == 4 and y4.shape == (4, 3) and np.allclose(y4, [64, 128, 192])
        np.testing.assert_allclose(r.infer({"input": x})["logits"], out)       # back to the first shape
        with pytest.raises(ProfileError, match="batch 16 is outside"):
            r.infer({"input": np.ones((16, 1, 8, 8), np.float32)})
        assert "batch 16" in r.batch_problem({"input": (16, 1, 8, 8)})
        assert r.memory()["kind"] == "cuda" and r.settle_s == 0.0 and r.time_plan is not None
    assert fake_gpu.freed == 8                                        # every host and device buffer freed


def test_trt_runner_refuses_without_cuda_python(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "tensorrt", _fake_trt())
    monkeypatch.setitem(sys.modules, "cuda", None)
    monkeypatch.setitem(sys.modules, "cuda.bindings", None)
    with pytest.raises(MissingDependencyError, match="cuda-python"):
        TrtRunner(tmp_path / "m.engine", check_compat=False).activate()


def test_bad_engine_is_a_clear_error(fake_gpu, tmp_path):
    eng = tmp_path / "m.engine"
    eng.write_bytes(b"other")
    with pytest.raises(EdgeusError, match="could not deserialize"):
        TrtRunner(eng, check_compat=False).activate()


def test_bench_times_a_gpu_runner_by_time_and_skips_batches_outside_the_profile(fake_gpu, tmp_path, monkeypatch):
    from edgeus.deploy import benchmark
    from edgeus.deploy.config import BenchConfig

    eng = tmp_path / "m.engine"
    eng.write_bytes(b"engine")
    monkeypatch.setattr(TrtRunner, "time_plan", TimePlan(warmup_s=0.01, duration_s=0.05, enough_runs=20, max_s=0.2))
    monkeypatch.setattr(benchmark, "make_runner", lambda p, bcfg, name=None: TrtRunner(p, name=name, check_compat=False))
    res = benchmark.bench([eng], BenchConfig(batch_sizes=[2, 16], iters=3))
    st = res["models"][0]["batches"]["2"]
    assert st["n"] >= 20 and st["gpu"]["p50_ms"] == pytest.approx(0.25)
    assert (st["p99_ms"] is None) == (st["n"] < P99_MIN_SAMPLES)
    assert "16" not in res["models"][0]["batches"]
    assert any("batch 16 skipped" in w and "outside the engine's optimisation profile" in w for w in res["warnings"])
    md = benchmark.to_markdown(res)
    assert "GPU (CUDA events)" in md and "synchronous" in md
