"""Quantisation-aware training (QAT) when PTQ with fallback cannot meet the tolerance.

Fake quantisation in torch that mirrors the target's Q/DQ layout, fine-tuned with a distillation
loss from the FP32 model (the teacher), then exported to the *same* Q/DQ layout as PTQ:

1. Conv + BatchNorm are folded first (``torch.fx.experimental.optimization.fuse``) so the weights
   that are fake-quantised are the weights ONNX will hold; models fx cannot trace keep BN frozen.
2. Every Conv2d / Linear gets fake quantisation (straight-through estimator, torch's
   ``fake_quantize_per_*_affine``): weights symmetric int8 per output channel (axis 0); inputs per
   tensor, uint8 asymmetric or int8 symmetric as the layout says, ranges tracked by an
   exponential moving average (initialised on the calibration set).
3. Training: :func:`edgeus.train.fit` through the injected fine-tuner (``QATSetup.finetune``, see
   :func:`edgeus.finetune.make_finetuner`) with the FP32 model as the teacher and the run's
   distillation settings (``distill.losses``); ``quantize.qat_epochs`` / ``qat_lr`` set its length
   and rate. A distiller that cannot be built for the fake-quantised student raises.
4. Export: the fine-tuned float model goes through the injected export (parity-checked) and the
   PTQ quantiser with the same layout; the learned input ranges of each Conv/Gemm override the
   calibrated ones (``TensorQuantOverrides``, matched by module path), so the output has exactly the
   PTQ layout (same checker, same node set) with QAT's weights and scales. Ranges are observed in
   training mode only: the validation passes of ``fit`` never move them.
"""
from __future__ import annotations

import copy
import logging
import time
import types
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeus.quantize import qdq
from edgeus.quantize.prepare import preprocess

log = logging.getLogger("edgeus.quantize")


class FakeQuant(nn.Module):
    """Fake-quantised Conv2d/Linear: per-channel symmetric int8 weights, per-tensor input."""

    def __init__(self, layer: nn.Module, unsigned: bool, symmetric: bool, momentum: float = 0.05):
        super().__init__()
        self.layer = layer
        self.unsigned, self.symmetric, self.momentum = unsigned, symmetric, momentum
        self.register_buffer("lo", torch.tensor(0.0))
        self.register_buffer("hi", torch.tensor(0.0))
        self.register_buffer("seen", torch.tensor(False))
        self.observe = True
        self.enabled = True

    def _act_qparams(self):
        lo, hi = torch.minimum(self.lo, torch.tensor(0.0)), torch.maximum(self.hi, torch.tensor(0.0))
        if self.symmetric:
            amax = torch.maximum(lo.abs(), hi).clamp_min(1e-8)
            return float(amax / 127.0), 0, -128, 127
        scale = float(((hi - lo) / 255.0).clamp_min(1e-8))
        zp = int(torch.clamp(torch.round(-lo / scale), 0, 255))
        return (scale, zp, 0, 255) if self.unsigned else (scale, zp - 128, -128, 127)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observe and self.training:
            with torch.no_grad():
                lo, hi = x.detach().min(), x.detach().max()
                if not bool(self.seen):
                    self.lo.copy_(lo), self.hi.copy_(hi), self.seen.fill_(True)
                else:
                    self.lo.mul_(1 - self.momentum).add_(self.momentum * lo)
                    self.hi.mul_(1 - self.momentum).add_(self.momentum * hi)
        if not self.enabled:
            return self.layer(x)
        s, z, qmin, qmax = self._act_qparams()
        xq = torch.fake_quantize_per_tensor_affine(x, s, z, qmin, qmax)
        w = self.layer.weight
        amax = w.detach().abs().flatten(1).amax(1).clamp_min(1e-8)
        wq = torch.fake_quantize_per_channel_affine(w, amax / 127.0, torch.zeros_like(amax, dtype=torch.int32), 0,
                                                    -127, 127)
        if isinstance(self.layer, nn.Conv2d):
            return self.layer._conv_forward(xq, wq, self.layer.bias)
        return F.linear(xq, wq, self.layer.bias)


def _fold_bn(model: nn.Module) -> tuple[nn.Module, bool]:
    from torch.fx.experimental.optimization import fuse

    try:
        return fuse(copy.deepcopy(model).eval()), True
    except Exception as e:  # noqa: BLE001 - torch.fx raises many types on an untraceable forward; handled on purpose
        log.warning("QAT: conv+BN folding skipped, BatchNorm kept frozen instead (torch.fx: %s)",
                    str(e).splitlines()[0][:120] if str(e) else type(e).__name__)
        return copy.deepcopy(model).eval(), False


def _wrap(model: nn.Module, layout: qdq.QDQLayout) -> dict[str, FakeQuant]:
    wrapped = {}
    targets = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for name, mod in targets:
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        fq = FakeQuant(mod, unsigned=layout.activation_type == "uint8", symmetric=bool(layout.activation_symmetric))
        setattr(parent, name.rsplit(".", 1)[-1], fq)
        wrapped[name] = fq
    return wrapped


def _unwrap(model: nn.Module, wrapped: dict[str, FakeQuant]) -> None:
    for name, fq in wrapped.items():
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], fq.layer)


def _freeze_bn(model: nn.Module) -> int:
    """Keep every BatchNorm in eval mode for good, whatever ``.train()`` the training loop calls."""
    n = 0
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()
            m.train = types.MethodType(lambda self, mode=True: nn.Module.train(self, False), m)
            n += 1
    return n


def module_path(node_name: str) -> str:
    """The torch module path in a TorchScript-exported ONNX node name.

    ``/layer1/layer1.0/conv1/Conv`` -> ``layer1.0.conv1`` (each scope is either the full path so far
    or one more attribute name); ``/features.3/Conv`` -> ``features.3``.
    """
    path = ""
    for part in node_name.strip("/").split("/")[:-1]:
        path = part if (not path or part.startswith(path + ".")) else f"{path}.{part}"
    return path


def _overrides(pre_path: Path, wrapped: dict[str, FakeQuant]) -> tuple[dict, list[str]]:
    """TensorQuantOverrides {input tensor of Conv/Gemm: [{rmin, rmax}]} for the fake-quantised layers.

    Matched structurally, by the module path: the ONNX weight initializer ``<module path>.weight``
    (the exporter names parameters by their ``state_dict`` key), else the module path in the node's
    scope name (:func:`module_path`); a match whose weight shape differs from the layer's is refused.
    Returns (overrides, module paths matched).
    """
    import onnx

    m = onnx.load(str(pre_path))
    shapes = {t.name: tuple(t.dims) for t in m.graph.initializer}
    out, matched = {}, []
    for n in m.graph.node:
        if n.op_type not in ("Conv", "Gemm") or len(n.input) < 2 or n.input[0] in shapes:
            continue
        w = n.input[1]
        path = w[: -len(".weight")] if w.endswith(".weight") and w[: -len(".weight")] in wrapped else module_path(n.name)
        fq = wrapped.get(path)
        if fq is None or path in matched:
            continue
        want = tuple(fq.layer.weight.shape)
        got = shapes.get(w)
        if n.op_type == "Gemm" and got is not None and not any(a.name == "transB" and a.i for a in n.attribute):
            got = tuple(reversed(got))
        if got != want:
            log.warning("QAT: ONNX node %s (weight %s) names layer %s but its weight is %s, not %s; calibrated range kept",
                        n.name, w, path, got, want)
            continue
        out[n.input[0]] = [{"rmin": np.float32(min(float(fq.lo), 0.0)), "rmax": np.float32(max(float(fq.hi), 0.0))}]
        matched.append(path)
    return out, matched


@dataclass
class QATSetup:
    """What QAT needs from outside the quantize section, injected by the caller.

    ``model``: the torch model the FP32 ONNX was exported from (left untouched).
    ``finetune``: ``finetune(teacher) -> ft``, a fine-tuner (:func:`edgeus.finetune.make_finetuner`)
    whose teacher is the FP32 model; ``ft(student, epochs=, lr=, desc=) -> (student, report)`` trains
    through :func:`edgeus.train.fit` (with the run's distillation settings).
    ``export``: ``export(model, path) -> report``, the run's torch -> ONNX export (parity-checked).
    """
    model: nn.Module
    finetune: Callable
    export: Callable
    device: str = "cpu"


def qat_finetune(setup: QATSetup, qcfg, layout: qdq.QDQLayout, calib=None):
    """Fine-tune a fake-quantised copy of ``setup.model``; returns (float model, wrapped dict, report)."""
    teacher = copy.deepcopy(setup.model).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    student, folded = _fold_bn(setup.model)
    frozen = 0 if folded else _freeze_bn(student)
    wrapped = _wrap(student, layout)
    # initialise the activation ranges on the calibration images (train split)
    if calib is not None:
        student.eval()
        with torch.no_grad():
            for fq in wrapped.values():
                fq.enabled = False
                fq.train()              # observe (FakeQuant observes in training mode only); BN stays in eval
            for xb in calib.batches():
                student(torch.from_numpy(xb).to(next(student.parameters()).device))
            for fq in wrapped.values():
                fq.enabled = True
                fq.eval()
    t0 = time.perf_counter()
    ft = setup.finetune(teacher)
    student, ft_report = ft(student, epochs=int(qcfg.qat_epochs), lr=float(qcfg.qat_lr), desc="qat")
    student.eval()
    report = {"epochs": int(qcfg.qat_epochs), "lr": float(qcfg.qat_lr), "trainer": "edgeus.train.fit via finetune",
              "with_teacher": ft_report.get("with_teacher"), "best_epoch": ft_report.get("best_epoch"),
              "history": [{k: r[k] for k in ("epoch", "loss", "train_acc") if k in r}
                          | ({"val_accuracy": r["val"]["accuracy"]} if "val" in r else {})
                          for r in ft_report.get("history", [])],
              "bn_folded": folded, "bn_frozen": frozen, "fake_quant_layers": len(wrapped),
              "seconds": round(time.perf_counter() - t0, 2)}
    return student, wrapped, report


def qat_quantize(setup: QATSetup, out_path, qcfg, layout: qdq.QDQLayout, calib, work: Path) -> dict:
    """QAT, then export to ONNX and quantise with the PTQ layout and the learned ranges."""
    from edgeus.quantize import calibration as calib_mod
    from edgeus.quantize.fallback import Quantiser

    work = Path(work)
    student, wrapped, report = qat_finetune(setup, qcfg, layout, calib)
    for fq in wrapped.values():
        fq.observe = False
    _unwrap(student, wrapped)
    student = student.cpu().eval()
    fp32 = work / "qat.fp32.onnx"
    exp = setup.export(student, fp32)
    pre = preprocess(fp32, work / "qat.fp32.pre.onnx")
    ranges_json = work / "qat.ranges.json"
    symmetric = layout.activation_symmetric and calib.spec.method != "minmax"
    calib_mod.compute_ranges(pre, calib, ranges_json, symmetric=symmetric)
    overrides, matched = _overrides(pre, wrapped)
    unmatched = sorted(set(wrapped) - set(matched))
    if unmatched:
        log.warning("QAT: %d fake-quantised layer(s) not found in the exported ONNX (calibrated ranges kept): %s",
                    len(unmatched), ", ".join(unmatched[:5]))
    Quantiser(pre, layout, ranges_json, calib.spec.method, overrides or None)(out_path)
    report.update({"path": str(out_path), "fp32_export": {"path": str(fp32), "parity": exp.get("parity")},
                   "learned_ranges": len(wrapped), "ranges_applied": len(matched), "ranges_unmatched": unmatched,
                   "note": "the fine-tuned float model is exported; learned input ranges of Conv/Gemm override "
                           "the calibrated ones (matched by module path); the Q/DQ layout is the PTQ layout of the target"})
    return report


__all__ = ["FakeQuant", "QATSetup", "qat_finetune", "qat_quantize", "module_path"]
