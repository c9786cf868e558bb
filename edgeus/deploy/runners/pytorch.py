"""PyTorch runner: an edgeus checkpoint (or a module) on CPU or CUDA, FP32 or FP16."""
from __future__ import annotations

from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np

from edgeus.deploy.runners.base import BaseRunner, TensorMeta
from edgeus.errors import EdgeusError


class TorchRunner(BaseRunner):
    backend = "torch"

    def __init__(self, model_or_path: Any, *, device: str = "cpu", fp16: bool = False,
                 input_shape: list[int] | None = None, threads: int | None = None, name: str | None = None):
        """``input_shape``: [C, H, W] (default: the checkpoint's preprocessing)."""
        is_path = isinstance(model_or_path, (str, Path))
        super().__init__(name or (Path(model_or_path).name if is_path else type(model_or_path).__name__))
        self.source = model_or_path
        self.device = device
        self.settle_s = 0.0 if device.startswith("cuda") else self.settle_s   # no pause that lets a GPU clock down
        self.fp16 = fp16
        self.input_shape = list(input_shape) if input_shape else None
        self.threads = threads
        self.model = None
        self.classes: list[str] | None = None

    def activate_impl(self) -> None:
        import torch

        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise EdgeusError("bench.device=cuda but torch sees no CUDA GPU here")
        if self.fp16 and not self.device.startswith("cuda"):
            raise EdgeusError("bench.fp16=true needs bench.device=cuda (half precision on CPU is not a deployment path)")
        if self.threads:
            torch.set_num_threads(int(self.threads))
        if isinstance(self.source, (str, Path)):
            from edgeus.train.checkpoint import load_checkpoint

            model, ckpt = load_checkpoint(self.source)
            prep = ckpt.get("preprocessing") or {}
            self.classes = ckpt.get("classes")
            if self.input_shape is None and prep.get("image_size"):
                s = prep["image_size"]
                hw = [s, s] if isinstance(s, int) else list(s)
                self.input_shape = [int(prep.get("in_chans", 1)), *hw]
        else:
            model = self.source
        if self.input_shape is None:
            arch = getattr(model, "edgeus_arch", {}) or {}
            raise EdgeusError(f"{self.name}: input shape unknown; set bench.image_size (in_chans "
                              f"{arch.get('in_chans', '?')})")
        model = model.eval().to(self.device)
        if self.fp16:
            model = model.half()
        self.model = model
        if self.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()

    def input_metadata_impl(self) -> TensorMeta:
        return TensorMeta(input=(np.float16 if self.fp16 else np.float32, [None, *self.input_shape]))

    def infer_impl(self, feed):
        import torch

        x = torch.from_numpy(np.ascontiguousarray(feed["input"])).to(self.device)
        with torch.inference_mode():
            y = self.model(x)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return OrderedDict(logits=y.float().cpu().numpy())

    def memory(self):
        if self.device.startswith("cuda"):
            import torch

            return {"kind": "cuda", "max_memory_allocated_mb": round(torch.cuda.max_memory_allocated() / 2**20, 2)}
        return super().memory()

    def deactivate_impl(self) -> None:
        self.model = None
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()

    def describe(self):
        import torch

        d = {**super().describe(), "device": self.device, "fp16": self.fp16, "torch": torch.__version__}
        if self.device.startswith("cuda") and torch.cuda.is_available():
            d["gpu"] = torch.cuda.get_device_name()
        return d
