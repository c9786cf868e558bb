"""TensorRT runner: a serialized engine run with NVIDIA's ``cuda-python`` (TensorRT 10 name-based API).

    with TrtRunner("model.engine") as r:
        out = r.infer({"input": x})            # host end-to-end: H2D + enqueue + D2H, synchronised
        r.last_inference_time, r.last_gpu_time  # seconds: host wall clock, CUDA-event time of the enqueue

How it runs, following TensorRT 10's Python samples (``samples/python/common_runtime.py``):

* CUDA through ``cuda-python``'s runtime bindings (``from cuda.bindings import runtime as cudart``;
  ``from cuda import cudart`` on cuda-python < 12.8), on the device's *primary* context
  (``cudaSetDevice``), the one torch and TensorRT themselves use; never ``pycuda.autoinit``'s own context.
* Pinned (page-locked) host buffers and device buffers for every input and output, allocated once per
  input shape (``cudaMallocHost`` / ``cudaMalloc``) and reused; nothing is allocated inside a timed call.
* ``context.set_input_shape`` is checked; a batch outside the engine's optimisation profile
  (``get_tensor_profile_shape``) is refused with a message naming the profile (:class:`ProfileError`),
  which ``edgeus bench`` turns into a skipped batch.
* Two CUDA events around ``execute_async_v3`` give the GPU time of the engine beside the host
  end-to-end time (copies, launch and synchronisation included).
* ``edgeus bench`` times a GPU runner as ``trtexec`` does: warm-up and measurement by time
  (:class:`TimePlan`: ≥ 200 ms warm-up, ≥ 3 s of measurement continued up to 1000 runs), no settle sleep;
  p99 only from ≥ 1000 samples (:func:`percentile_if_enough`); throughput is *synchronous*
  (one inference in flight, batch / mean latency), not trtexec's pipelined throughput.

``tensorrt`` and ``cuda-python`` are imported in ``activate`` only: importing this module needs
neither. Before deserialising, the runner reads what the engine was built with (``manifest.json`` or
``engine.json`` beside it) and refuses a mismatched engine with a message saying so, rather than
TensorRT's "version tag does not match".
"""
from __future__ import annotations

import json
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from edgeus.deploy.runners.base import BaseRunner, TensorMeta
from edgeus.errors import EdgeusError, MissingDependencyError

P99_MIN_SAMPLES = 1000


class ProfileError(EdgeusError):
    """An input shape outside the engine's optimisation profile."""


# ---------------------------------------------------------------------------------------------- pure logic
def profile_violation(name: str, shape, profile) -> str | None:
    """Why ``shape`` is outside ``profile`` = (min, opt, max) shapes of input ``name``, or None when inside."""
    lo, _opt, hi = (tuple(int(d) for d in s) for s in profile)
    shape = tuple(int(d) for d in shape)
    if len(shape) != len(lo):
        return f"input {name}: shape {shape} has {len(shape)} dimensions, the engine's profile has {len(lo)}"
    bad = [i for i, (d, a, b) in enumerate(zip(shape, lo, hi)) if not a <= d <= b]
    if not bad:
        return None
    if bad == [0]:
        return (f"input {name}: batch {shape[0]} is outside the engine's optimisation profile "
                f"(batch {lo[0]}..{hi[0]}; min {lo}, max {hi}); rebuild the engine with a wider profile "
                f"(build.max_batch) or bench a batch in range")
    return f"input {name}: shape {shape} is outside the engine's optimisation profile (min {lo}, max {hi})"


@dataclass(frozen=True)
class TimePlan:
    """Warm-up and measurement by time, as ``trtexec`` does (``--warmUp=200 --duration=3``).

    Warm up for ``warmup_s``; then measure for at least ``duration_s`` and ``min_runs`` runs, and keep
    measuring (up to ``max_s``) until ``enough_runs`` samples are in, so that a p99 can be reported.
    """
    warmup_s: float = 0.2
    duration_s: float = 3.0
    min_runs: int = 10
    enough_runs: int = P99_MIN_SAMPLES
    max_s: float = 10.0

    def warmup_done(self, elapsed_s: float, runs: int) -> bool:
        return elapsed_s >= self.warmup_s and runs >= 1

    def done(self, elapsed_s: float, runs: int) -> bool:
        if runs < self.min_runs:
            return False
        return (elapsed_s >= self.duration_s and runs >= self.enough_runs) or elapsed_s >= self.max_s

    def expected_runs(self, call_s: float) -> int:
        """How many measured runs a call of ``call_s`` seconds gets under this plan."""
        if call_s <= 0:
            return self.enough_runs
        in_duration = int(np.ceil(self.duration_s / call_s))
        if in_duration >= self.enough_runs:
            return max(in_duration, self.min_runs)
        return max(self.min_runs, min(self.enough_runs, int(np.ceil(self.max_s / call_s))))


def run_plan(call, plan: TimePlan, clock=time.perf_counter) -> list:
    """Warm up, then measure by ``plan``; ``call()`` runs once and returns its sample (e.g. seconds)."""
    t0, n = clock(), 0
    while not plan.warmup_done(clock() - t0, n):
        call()
        n += 1
    samples, t0 = [], clock()
    while not plan.done(clock() - t0, len(samples)):
        samples.append(call())
    return samples


def percentile_if_enough(samples, q: float, min_n: int = P99_MIN_SAMPLES) -> tuple[float | None, str | None]:
    """``np.percentile(samples, q)`` when there are at least ``min_n`` samples; else (None, why)."""
    n = len(samples)
    if n < min_n:
        return None, f"p{q:g} needs >= {min_n} samples, got {n}"
    return float(np.percentile(np.asarray(samples, np.float64), q)), None


# ---------------------------------------------------------------------------------------------- CUDA
def import_cudart():
    """``cuda-python``'s runtime module: ``cuda.bindings.runtime`` (>= 12.8), else ``cuda.cudart``."""
    try:
        from cuda.bindings import runtime as cudart
    except ImportError:
        try:
            from cuda import cudart
        except ImportError:
            raise MissingDependencyError("cuda-python not installed: pip install 'cuda-python>=12' (NVIDIA's CUDA "
                                         "bindings, as TensorRT's samples use; on a Jetson it comes with JetPack's "
                                         "Python packages)") from None
    return cudart


def cuda_check(result, what: str = "CUDA call"):
    """Unpack a cuda-python result tuple ``(err, *values)``; raise :class:`EdgeusError` on an error."""
    err, rest = result[0], result[1:]
    if int(getattr(err, "value", err)):
        raise EdgeusError(f"{what} failed: {getattr(err, 'name', err)}")
    if not rest:
        return None
    return rest[0] if len(rest) == 1 else rest


def engine_build_info(engine_path: Path) -> dict | None:
    """The ``tensorrt`` record of an engine: from the manifest beside it, or build_engine.sh's engine.json."""
    d = engine_path.parent
    for cand in (d / "manifest.json", d / "engine.json"):
        if not cand.is_file():
            continue
        try:
            data = json.loads(cand.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if cand.name == "engine.json":
            if data.get("engine") == engine_path.name:
                return {"version": data.get("tensorrt"), "gpu": data.get("gpu"),
                        "compute_capability": data.get("compute_capability"), "jetpack": data.get("jetpack")}
        else:
            t = data.get("tensorrt") or {}
            if t.get("version") and t.get("engine", engine_path.name) in (engine_path.name, str(engine_path.name)):
                return t
    return None


class _Pinned:
    """A pinned host array and a device buffer of the same size (freed explicitly)."""

    def __init__(self, cudart, shape, dtype):
        import ctypes

        self.cudart, self.shape, self.dtype = cudart, tuple(int(d) for d in shape), np.dtype(dtype)
        self.nbytes = max(int(np.prod(self.shape)) * self.dtype.itemsize, 1)
        self.host_ptr = cuda_check(cudart.cudaMallocHost(self.nbytes), "cudaMallocHost")
        self.device_ptr = cuda_check(cudart.cudaMalloc(self.nbytes), "cudaMalloc")
        buf = (ctypes.c_byte * self.nbytes).from_address(int(self.host_ptr))
        self.host = np.frombuffer(buf, dtype=self.dtype, count=int(np.prod(self.shape))).reshape(self.shape)

    def free(self) -> None:
        if self.device_ptr is not None:
            self.cudart.cudaFree(self.device_ptr)
            self.device_ptr = None
        if self.host_ptr is not None:
            self.host = None
            self.cudart.cudaFreeHost(self.host_ptr)
            self.host_ptr = None


class TrtRunner(BaseRunner):
    backend = "tensorrt"
    settle_s = 0.0          # no pause before a timed block: a GPU (a Jetson's above all) would clock down
    time_plan = TimePlan()  # edgeus bench warms up and measures this runner by time

    def __init__(self, engine_path: str | Path, *, name: str | None = None, check_compat: bool = True,
                 device: int = 0):
        super().__init__(name or Path(engine_path).name)
        self.path = Path(engine_path)
        self.check_compat = check_compat
        self.device_index = int(device)
        self.last_gpu_time: float | None = None   # seconds, CUDA events around execute_async_v3
        self._buffers: dict = {}                   # input shapes -> {tensor name: _Pinned}

    # ------------------------------------------------------------------ lifecycle
    def activate_impl(self) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            raise MissingDependencyError("tensorrt not installed (needs an NVIDIA GPU; on a Jetson it comes with "
                                         f"JetPack): cannot run {self.path.name}; use the bundled ONNX with "
                                         "onnxruntime") from None
        cudart = import_cudart()
        if not self.path.is_file():
            raise EdgeusError(f"engine not found: {self.path}")
        if self.check_compat:
            from edgeus.deploy.device_probe import probe
            from edgeus.deploy.manifest import check_engine_compat

            here = probe()
            here["tensorrt"] = trt.__version__
            problems = check_engine_compat(engine_build_info(self.path), here, self.path.name)
            if problems:
                raise EdgeusError("; ".join(problems))
        self._trt, self._cudart = trt, cudart
        cuda_check(cudart.cudaSetDevice(self.device_index), f"cudaSetDevice({self.device_index})")  # primary context
        self._free_before = cuda_check(cudart.cudaMemGetInfo(), "cudaMemGetInfo")[0]
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EdgeusError(f"TensorRT {trt.__version__} could not deserialize {self.path.name}: it was built by "
                              "another TensorRT version or for another GPU; rebuild it on this device")
        self.context = self.engine.create_execution_context()
        if self.context is None:
            raise EdgeusError(f"{self.path.name}: TensorRT could not create an execution context (out of GPU memory?)")
        self.stream = cuda_check(cudart.cudaStreamCreate(), "cudaStreamCreate")
        self._start = cuda_check(cudart.cudaEventCreate(), "cudaEventCreate")
        self._end = cuda_check(cudart.cudaEventCreate(), "cudaEventCreate")
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        self._buffers = {}
        self._active = None   # the buffers whose shapes and addresses the context holds

    def deactivate_impl(self) -> None:
        for bufs in self._buffers.values():
            for b in bufs.values():
                b.free()
        self._buffers = {}
        self._active = None
        cudart = self._cudart
        for ev in (getattr(self, "_start", None), getattr(self, "_end", None)):
            if ev is not None:
                cudart.cudaEventDestroy(ev)
        if getattr(self, "stream", None) is not None:
            cudart.cudaStreamDestroy(self.stream)
        self._start = self._end = self.stream = None
        del self.context, self.engine, self.runtime

    # ------------------------------------------------------------------ shapes
    def input_metadata_impl(self) -> TensorMeta:
        trt = self._trt
        meta = TensorMeta()
        for n in self.inputs:
            shape = [d if d >= 0 else None for d in self.engine.get_tensor_shape(n)]
            meta[n] = (np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))), shape)
        return meta

    def profile(self, name: str, index: int | None = None):
        """(min, opt, max) shapes of input ``name`` in the context's optimisation profile."""
        idx = self.context.active_optimization_profile if index is None else index
        return [tuple(s) for s in self.engine.get_tensor_profile_shape(name, idx)]

    def check_shape(self, name: str, shape) -> str | None:
        if any(d < 0 for d in self.engine.get_tensor_shape(name)):   # dynamic: the profile bounds it
            return profile_violation(name, shape, self.profile(name))
        fixed = tuple(self.engine.get_tensor_shape(name))
        return None if tuple(shape) == fixed else f"input {name}: shape {tuple(shape)}, the engine takes {fixed}"

    def batch_problem(self, feed_shapes: dict) -> str | None:
        """Why these input shapes cannot run (outside the profile), or None."""
        for n, shape in feed_shapes.items():
            why = self.check_shape(n, shape)
            if why:
                return f"{self.name}: {why}"
        return None

    def _buffers_for(self, feed) -> dict:
        key = tuple((n, tuple(feed[n].shape)) for n in self.inputs)
        bufs = self._buffers.get(key)
        if bufs is not None:
            return bufs
        trt, cudart = self._trt, self._cudart
        bufs = {}
        for n in self.inputs:
            shape = tuple(feed[n].shape)
            if not self.context.set_input_shape(n, shape):
                raise ProfileError(f"{self.name}: TensorRT refused input {n} shape {shape} "
                                   f"(profile {self.profile(n)})")
            bufs[n] = _Pinned(cudart, shape, trt.nptype(self.engine.get_tensor_dtype(n)))
        for n in self.outputs:
            shape = tuple(self.context.get_tensor_shape(n))
            if any(d < 0 for d in shape):
                raise EdgeusError(f"{self.name}: output {n} shape {shape} is not determined by the inputs")
            bufs[n] = _Pinned(cudart, shape, trt.nptype(self.engine.get_tensor_dtype(n)))
        self._buffers[key] = bufs
        return bufs

    # ------------------------------------------------------------------ inference
    def infer_impl(self, feed):
        cudart = self._cudart
        why = self.batch_problem({n: feed[n].shape for n in self.inputs})
        if why:
            raise ProfileError(why)
        bufs = self._buffers_for(feed)
        key = id(bufs)
        if key != self._active:   # another shape since the last call: its shapes and buffers, set once
            for n in self.inputs:
                if not self.context.set_input_shape(n, bufs[n].shape):
                    raise ProfileError(f"{self.name}: TensorRT refused input {n} shape {bufs[n].shape}")
            for n in self.names:
                self.context.set_tensor_address(n, int(bufs[n].device_ptr))
            self._active = key
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        for n in self.inputs:
            b = bufs[n]
            np.copyto(b.host, feed[n], casting="same_kind")
            cuda_check(cudart.cudaMemcpyAsync(b.device_ptr, b.host_ptr, b.nbytes, h2d, self.stream), "cudaMemcpyAsync")
        cuda_check(cudart.cudaEventRecord(self._start, self.stream), "cudaEventRecord")
        if not self.context.execute_async_v3(stream_handle=int(self.stream)):
            raise EdgeusError(f"{self.path.name}: TensorRT execution failed")
        cuda_check(cudart.cudaEventRecord(self._end, self.stream), "cudaEventRecord")
        for n in self.outputs:
            b = bufs[n]
            cuda_check(cudart.cudaMemcpyAsync(b.host_ptr, b.device_ptr, b.nbytes, d2h, self.stream), "cudaMemcpyAsync")
        cuda_check(cudart.cudaStreamSynchronize(self.stream), "cudaStreamSynchronize")
        self.last_gpu_time = cuda_check(cudart.cudaEventElapsedTime(self._start, self._end), "cudaEventElapsedTime") / 1e3
        return OrderedDict((n, bufs[n].host.copy()) for n in self.outputs)

    def memory(self):
        free_now = cuda_check(self._cudart.cudaMemGetInfo(), "cudaMemGetInfo")[0]
        dev_mem = getattr(self.engine, "device_memory_size_v2", None)
        if dev_mem is None:
            dev_mem = getattr(self.engine, "device_memory_size", 0)
        return {"kind": "cuda", "engine_device_memory_mb": round(dev_mem / 2**20, 2),
                "device_used_delta_mb": round((self._free_before - free_now) / 2**20, 2)}

    def describe(self):
        d = {**super().describe(), "path": str(self.path), "timing": "trtexec-style: warm-up and measurement by time",
             "throughput": "synchronous (one inference in flight)"}
        if getattr(self, "_trt", None) is not None:
            d["tensorrt"] = self._trt.__version__
        return d


__all__ = ["TrtRunner", "TimePlan", "ProfileError", "profile_violation", "run_plan", "percentile_if_enough",
           "import_cudart", "cuda_check", "engine_build_info", "P99_MIN_SAMPLES"]
