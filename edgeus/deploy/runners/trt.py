"""TensorRT runner: a serialized engine, pycuda device buffers and a CUDA stream (TensorRT 10 API).

``tensorrt`` and ``pycuda`` are imported in ``activate`` only. Before deserialising, the runner
reads what the engine was built with (``manifest.json`` or ``engine.json`` beside it) and refuses
a mismatched engine with a message saying so, rather than TensorRT's "version tag does not match".
"""
from __future__ import annotations

import json
from collections import OrderedDict
from pathlib import Path

import numpy as np

from edgeus.deploy.runners.base import BaseRunner, TensorMeta
from edgeus.errors import EdgeusError, MissingDependencyError


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


class TrtRunner(BaseRunner):
    backend = "tensorrt"

    def __init__(self, engine_path: str | Path, *, name: str | None = None, check_compat: bool = True):
        super().__init__(name or Path(engine_path).name)
        self.path = Path(engine_path)
        self.check_compat = check_compat
        self._dev: dict = {}

    def activate_impl(self) -> None:
        try:
            import tensorrt as trt
        except ImportError:
            raise MissingDependencyError("tensorrt not installed (needs an NVIDIA GPU): cannot run "
                                         f"{self.path.name}; use the bundled ONNX with onnxruntime") from None
        try:
            import pycuda.autoinit  # noqa: F401  (creates the CUDA context)
            import pycuda.driver as cuda
        except ImportError:
            raise MissingDependencyError("pycuda not installed: pip install pycuda (needs the CUDA toolkit)") from None
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
        self._trt, self._cuda = trt, cuda
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.engine = self.runtime.deserialize_cuda_engine(self.path.read_bytes())
        if self.engine is None:
            raise EdgeusError(f"TensorRT {trt.__version__} could not deserialize {self.path.name}: it was built by "
                              "another TensorRT version or for another GPU; rebuild it on this device")
        self.context = self.engine.create_execution_context()
        self.stream = cuda.Stream()
        self.names = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        self.inputs = [n for n in self.names if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        self.outputs = [n for n in self.names if n not in self.inputs]
        self._dev = {}   # name -> (device allocation, nbytes)
        self._free_before = cuda.mem_get_info()[0]

    def input_metadata_impl(self) -> TensorMeta:
        trt = self._trt
        meta = TensorMeta()
        for n in self.inputs:
            shape = [d if d >= 0 else None for d in self.engine.get_tensor_shape(n)]
            meta[n] = (np.dtype(trt.nptype(self.engine.get_tensor_dtype(n))), shape)
        return meta

    def _buffer(self, name: str, nbytes: int):
        buf = self._dev.get(name)
        if buf is None or buf[1] < nbytes:
            if buf is not None:
                buf[0].free()
            buf = (self._cuda.mem_alloc(max(nbytes, 1)), nbytes)
            self._dev[name] = buf
        return buf[0]

    def infer_impl(self, feed):
        trt, cuda = self._trt, self._cuda
        for n in self.inputs:
            host = np.ascontiguousarray(feed[n])
            self.context.set_input_shape(n, host.shape)
            dptr = self._buffer(n, host.nbytes)
            cuda.memcpy_htod_async(dptr, host, self.stream)
            self.context.set_tensor_address(n, int(dptr))
        results = OrderedDict()
        for n in self.outputs:
            shape = tuple(self.context.get_tensor_shape(n))
            host = cuda.pagelocked_empty(shape, dtype=trt.nptype(self.engine.get_tensor_dtype(n)))
            dptr = self._buffer(n, host.nbytes)
            self.context.set_tensor_address(n, int(dptr))
            results[n] = (host, dptr)
        if not self.context.execute_async_v3(stream_handle=self.stream.handle):
            raise EdgeusError(f"{self.path.name}: TensorRT execution failed")
        for n, (host, dptr) in results.items():
            cuda.memcpy_dtoh_async(host, dptr, self.stream)
        self.stream.synchronize()
        return OrderedDict((n, np.array(h)) for n, (h, _) in results.items())

    def memory(self):
        free_now = self._cuda.mem_get_info()[0]
        dev_mem = getattr(self.engine, "device_memory_size_v2", None) or self.engine.device_memory_size
        return {"kind": "cuda", "engine_device_memory_mb": round(dev_mem / 2**20, 2),
                "device_used_delta_mb": round((self._free_before - free_now) / 2**20, 2)}

    def deactivate_impl(self) -> None:
        for buf, _ in self._dev.values():
            buf.free()
        self._dev = {}
        del self.context, self.engine, self.runtime, self.stream

    def describe(self):
        d = {**super().describe(), "path": str(self.path)}
        if getattr(self, "_trt", None) is not None:
            d["tensorrt"] = self._trt.__version__
        return d
