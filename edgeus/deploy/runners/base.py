"""One runner interface over every backend (the Polygraphy pattern).

``activate`` / ``infer`` / ``deactivate`` are public and do the checks and the timing; a backend
overrides only ``activate_impl``, ``input_metadata_impl``, ``infer_impl`` and ``deactivate_impl``.
Nothing touches a GPU (or even imports its library) before ``activate``.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

import numpy as np

from edgeus.errors import EdgeusError

log = logging.getLogger(__name__)


class TensorMeta(OrderedDict):
    """``{name: (numpy dtype, shape)}``; shape entries are ints or None (dynamic)."""


def rss_mb() -> float | None:
    """Resident memory of this process now (Linux /proc), in MiB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
        import os

        return pages * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return None


def peak_rss_mb() -> float | None:
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux
    except Exception:  # pragma: no cover
        return None


SETTLE_S = 0.05   # CPU runners in compare mode: pause before each block (ONNX Runtime's threads spin ~ms after a call)


class BaseRunner:
    backend = "base"
    settle_s: float = SETTLE_S   # edgeus bench pauses this long before a timed block (0 for GPU runners)
    time_plan = None             # a TimePlan: edgeus bench warms up and measures by time (GPU runners)
    last_gpu_time: float | None = None   # seconds of device time of the last infer(), where the backend knows it

    def __init__(self, name: str | None = None):
        self.name = name or self.backend
        self.is_active = False
        self.last_inference_time: float | None = None   # seconds, of the last infer()
        self._rss_before: float | None = None
        self._rss_peak: float | None = None

    # ------------------------------------------------------------------ lifecycle
    def __enter__(self):
        self.activate()
        return self

    def __exit__(self, *exc):
        self.deactivate()

    def activate(self) -> None:
        if self.is_active:
            log.warning("%s: already active", self.name)
            return
        self._rss_before = rss_mb()
        self.activate_impl()
        self._rss_peak = rss_mb()
        self.is_active = True

    def deactivate(self) -> None:
        if not self.is_active:
            return
        self.deactivate_impl()
        self.is_active = False
        self.last_inference_time = None

    # ------------------------------------------------------------------ metadata / inference
    def input_metadata(self) -> TensorMeta:
        self._require_active("input_metadata")
        return self.input_metadata_impl()

    def infer(self, feed: dict[str, np.ndarray], check_inputs: bool = True) -> "OrderedDict[str, np.ndarray]":
        """Run one inference; sets ``last_inference_time`` (seconds, wall clock, synchronised)."""
        self._require_active("infer")
        if check_inputs:
            self._check(feed)
        t0 = time.perf_counter()
        out = self.infer_impl(feed)
        self.last_inference_time = time.perf_counter() - t0
        return out

    def memory(self) -> dict[str, Any]:
        """Memory the backend holds: process RSS growth for CPU backends; overridden for GPUs."""
        now = rss_mb()
        if now is not None and self._rss_peak is not None:
            self._rss_peak = max(self._rss_peak, now)
        return {"kind": "host_rss",
                "rss_delta_mb": (None if self._rss_before is None or self._rss_peak is None
                                 else round(self._rss_peak - self._rss_before, 2)),
                "process_peak_rss_mb": peak_rss_mb()}

    def sample_memory(self) -> None:
        now = rss_mb()
        if now is not None:
            self._rss_peak = now if self._rss_peak is None else max(self._rss_peak, now)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "backend": self.backend}

    def batch_problem(self, feed_shapes: dict) -> str | None:
        """Why inputs of these shapes cannot run on this model (e.g. outside an engine's profile), or None."""
        return None

    # ------------------------------------------------------------------ to override
    def activate_impl(self) -> None:
        pass

    def input_metadata_impl(self) -> TensorMeta:
        raise NotImplementedError

    def infer_impl(self, feed: dict[str, np.ndarray]) -> "OrderedDict[str, np.ndarray]":
        raise NotImplementedError

    def deactivate_impl(self) -> None:
        pass

    # ------------------------------------------------------------------ helpers
    def _require_active(self, what: str) -> None:
        if not self.is_active:
            raise EdgeusError(f"{self.name}: activate() the runner before {what}()")

    def _check(self, feed: dict[str, np.ndarray]) -> None:
        meta = self.input_metadata()
        missing = [k for k in meta if k not in feed]
        extra = [k for k in feed if k not in meta]
        if missing or extra:
            raise EdgeusError(f"{self.name}: inputs {sorted(feed)} do not match the model's {list(meta)}")
        for k, (dtype, shape) in meta.items():
            a = feed[k]
            if dtype is not None and a.dtype != np.dtype(dtype):
                raise EdgeusError(f"{self.name}: input {k} has dtype {a.dtype}, the model takes {np.dtype(dtype)}")
            if shape is not None and len(shape) != a.ndim:
                raise EdgeusError(f"{self.name}: input {k} has shape {a.shape}, the model takes {shape}")
            for i, (want, got) in enumerate(zip(shape or [], a.shape)):
                if isinstance(want, int) and want > 0 and want != got:
                    raise EdgeusError(f"{self.name}: input {k} dimension {i} is {got}, the model takes {want} "
                                      f"(shape {shape})")
