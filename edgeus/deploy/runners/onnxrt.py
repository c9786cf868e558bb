"""ONNX Runtime runner: CPU, and the CUDA / TensorRT execution providers when installed.

The session comes from :func:`edgeus.onnx.session.session` (the one place that constructs one).
"""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import numpy as np

from edgeus.deploy.runners.base import BaseRunner, TensorMeta
from edgeus.errors import EdgeusError

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(double)": np.float64,
              "tensor(int64)": np.int64, "tensor(int32)": np.int32, "tensor(int8)": np.int8,
              "tensor(uint8)": np.uint8, "tensor(bool)": np.bool_}


def choose_providers(device: str = "cpu", requested: list[str] | None = None) -> list[str]:
    """The providers to ask for, best first, among those this onnxruntime build has."""
    import onnxruntime as ort

    available = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in available]
        if missing:
            raise EdgeusError(f"onnxruntime providers {missing} are not available here; available: {available}")
        return list(requested)
    if device.startswith("cuda"):
        order = ["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"]
    else:
        order = ["CPUExecutionProvider"]
    chosen = [p for p in order if p in available]
    return chosen or ["CPUExecutionProvider"]


class OnnxrtRunner(BaseRunner):
    backend = "onnxruntime"

    def __init__(self, path: str | Path, *, device: str = "cpu", providers: list[str] | None = None,
                 threads: int | None = None, name: str | None = None):
        super().__init__(name or Path(path).name)
        self.path = Path(path)
        self.device = device
        self.settle_s = 0.0 if device.startswith("cuda") else self.settle_s   # no pause that lets a GPU clock down
        self.requested_providers = providers
        self.threads = threads
        self.session = None
        self.providers: list[str] = []

    def activate_impl(self) -> None:
        from edgeus.onnx.session import session

        if not self.path.is_file():
            raise EdgeusError(f"ONNX model not found: {self.path}")
        providers = choose_providers(self.device, self.requested_providers)
        self.session = session(self.path, threads=self.threads, inter_threads=1 if self.threads else None,
                               providers=providers)
        self.providers = self.session.get_providers()

    def input_metadata_impl(self) -> TensorMeta:
        meta = TensorMeta()
        for i in self.session.get_inputs():
            shape = [d if isinstance(d, int) else None for d in i.shape]
            meta[i.name] = (_ORT_TYPES.get(i.type, np.float32), shape)
        return meta

    def output_names(self) -> list[str]:
        return [o.name for o in self.session.get_outputs()]

    def infer_impl(self, feed):
        names = self.output_names()
        outs = self.session.run(names, feed)
        return OrderedDict(zip(names, outs))

    def deactivate_impl(self) -> None:
        self.session = None

    def describe(self):
        return {**super().describe(), "path": str(self.path), "providers": self.providers, "device": self.device,
                "threads": self.threads}
