"""Quantisation-aware training (QAT) when PTQ with fallback cannot meet the tolerance.

Fake quantisation in torch that mirrors the target's Q/DQ layout, fine-tuned with a distillation
loss from the FP32 model (the teacher), then exported to the *same* Q/DQ layout as PTQ:

1. Conv + BatchNorm are folded first (``torch.fx.experimental.optimization.fuse``) so the weights
   that are fake-quantised are the weights ONNX will hold; models fx cannot trace keep BN frozen.
2. Every Conv2d / Linear gets fake quantisation (straight-through estimator, torch's
   ``fake_quantize_per_*_affine``): weights symmetric int8 per output channel (axis 0); inputs per
   tensor, uint8 asymmetric or int8 symmetric as the layout says, ranges tracked by an
   exponential moving average (initialised on the calibration set).
3. Loss: cross-entropy + ``qat_kd_weight`` * T^2 * KL(teacher/T || student/T) (Hinton KD), or the
   distiller of ``cfg.distill`` when :func:`edgeus.distill.build_distiller` accepts the pair.
4. Export: the fine-tuned float model goes through :func:`export_onnx` (parity-checked) and the
   PTQ quantiser with the same layout; the learned input ranges of each Conv/Gemm override the
   calibrated ones (``TensorQuantOverrides``, matched by weight), so the output has exactly the
   PTQ layout (same checker, same node set) with QAT's weights and scales.
"""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from edgeus.quantize import qdq

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
        if self.observe:
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
    except Exception as e:  # untraceable forward: keep BN, frozen during QAT
        log.info("QAT: conv+BN folding skipped (%s)", str(e).splitlines()[0][:120])
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


def _freeze_bn(model: nn.Module) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.eval()


def _kd_loss(student_logits, teacher_logits, labels, weight: float, t: float, class_weights=None):
    from edgeus.distill.kd import kd_loss

    ce = F.cross_entropy(student_logits, labels, weight=class_weights)
    kd = kd_loss(student_logits, teacher_logits, t, None if class_weights is None else class_weights[labels])
    return ce + weight * kd, {"ce": float(ce), "kd": float(kd)}


def _weight_key(w: np.ndarray) -> tuple:
    w = np.asarray(w, np.float32)
    return (tuple(w.shape), round(float(w.sum()), 3), round(float(np.abs(w).sum()), 3))


def _overrides(pre_path: Path, wrapped: dict[str, FakeQuant]) -> tuple[dict, int]:
    """TensorQuantOverrides {input tensor of Conv/Gemm: [{rmin, rmax}]} matched by weight values."""
    import onnx
    from onnx import numpy_helper

    m = onnx.load(str(pre_path))
    inits = {t.name: t for t in m.graph.initializer}
    by_key = {}
    for fq in wrapped.values():
        w = fq.layer.weight.detach().cpu().numpy()
        by_key[_weight_key(w)] = (float(fq.lo), float(fq.hi))
    out = {}
    for n in m.graph.node:
        if n.op_type in ("Conv", "Gemm") and len(n.input) > 1 and n.input[1] in inits:
            w = numpy_helper.to_array(inits[n.input[1]])
            if n.op_type == "Gemm" and not any(a.name == "transB" and a.i for a in n.attribute):
                w = w.T
            hit = by_key.get(_weight_key(w))
            if hit is not None and n.input[0] not in inits:
                lo, hi = min(hit[0], 0.0), max(hit[1], 0.0)
                out[n.input[0]] = [{"rmin": np.float32(lo), "rmax": np.float32(hi)}]
    return out, len(out)


def qat_finetune(model: nn.Module, bundle, cfg, layout: qdq.QDQLayout, calib=None, device: str = "cpu"):
    """Fine-tune a fake-quantised copy of ``model``; returns (float model, wrapped dict, report)."""
    from torch.utils.data import DataLoader

    qcfg = cfg.quantize
    teacher = copy.deepcopy(model).eval().to(device)
    for p in teacher.parameters():
        p.requires_grad_(False)
    student, folded = _fold_bn(model)
    student = student.to(device)
    wrapped = _wrap(student, layout)
    # initialise the activation ranges on the calibration images (train split)
    if calib is not None:
        student.eval()
        with torch.no_grad():
            for fq in wrapped.values():
                fq.enabled = False
            for xb in calib.batches():
                student(torch.from_numpy(xb).to(device))
            for fq in wrapped.values():
                fq.enabled = True
    distiller, kd_name = None, "kd(inline)"
    # the same class weights as every other training step of the run (data.balance=weights)
    cw = bundle.class_weights() if cfg.data.balance == "weights" else None
    cw = None if cw is None else torch.as_tensor(cw, dtype=torch.float32, device=device)
    try:
        from edgeus.distill import build_distiller

        distiller = build_distiller(student, teacher, cfg.distill, class_weights=cw)
        probe = next(iter(DataLoader(bundle.train, batch_size=2)))
        distiller.forward_train({k: (v.to(device) if torch.is_tensor(v) else v) for k, v in probe.items()})
        kd_name = f"edgeus.distill:{type(distiller).__name__}"
    except Exception as e:  # not available or not applicable to the wrapped student
        log.info("QAT: inline KD loss (%s)", str(e).splitlines()[0][:100] if str(e) else type(e).__name__)
        distiller = None
    params = [p for p in (distiller.parameters() if distiller is not None else student.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=float(qcfg.qat_lr), weight_decay=0.0)
    g = torch.Generator().manual_seed(int(getattr(cfg, "seed", 0)))
    loader = DataLoader(bundle.train, batch_size=int(cfg.data.batch_size), shuffle=True, generator=g,
                        drop_last=len(bundle.train) > int(cfg.data.batch_size))
    history, t0 = [], time.perf_counter()
    max_steps = qcfg.qat_max_steps_per_epoch
    for epoch in range(int(qcfg.qat_epochs)):
        if hasattr(bundle.train, "set_epoch"):
            bundle.train.set_epoch(epoch)
        (distiller or student).train()
        _freeze_bn(student)
        teacher.eval()
        tot, n = 0.0, 0
        for step, batch in enumerate(loader):
            if max_steps and step >= int(max_steps):
                break
            batch = {k: (v.to(device) if torch.is_tensor(v) else v) for k, v in batch.items()}
            if distiller is not None:
                _, losses = distiller.forward_train(batch)
                loss = sum(losses.values())
            else:
                with torch.no_grad():
                    t_logits = teacher(batch["image"])
                loss, _ = _kd_loss(student(batch["image"]), t_logits, batch["label"], float(qcfg.qat_kd_weight),
                                   float(qcfg.qat_kd_temperature), cw)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tot, n = tot + loss.item(), n + 1
        history.append({"epoch": epoch + 1, "loss": tot / max(n, 1), "steps": n})
        log.info("QAT epoch %d: loss %.4f", epoch + 1, tot / max(n, 1))
    student.eval()
    report = {"epochs": int(qcfg.qat_epochs), "history": history, "bn_folded": folded, "loss": kd_name,
              "fake_quant_layers": len(wrapped), "seconds": round(time.perf_counter() - t0, 2)}
    return student, wrapped, report


def qat_quantize(model: nn.Module, out_path, cfg, bundle, layout: qdq.QDQLayout, calib, spec, work: Path,
                 device: str = "cpu") -> dict:
    """QAT, then export to ONNX and quantise with the PTQ layout and the learned ranges."""
    from edgeus.quantize import calibration as calib_mod
    from edgeus.quantize.export import export_onnx
    from edgeus.quantize.fallback import Quantiser
    from edgeus.quantize.ptq import preprocess

    work = Path(work)
    student, wrapped, report = qat_finetune(model, bundle, cfg, layout, calib, device)
    for fq in wrapped.values():
        fq.observe = False
    learned = {n: (float(fq.lo), float(fq.hi)) for n, fq in wrapped.items()}
    _unwrap(student, wrapped)
    student = student.cpu().eval()
    fp32 = work / "qat.fp32.onnx"
    exp = export_onnx(student, fp32, cfg, bundle=bundle)
    pre = preprocess(fp32, work / "qat.fp32.pre.onnx")
    ranges_json = work / "qat.ranges.json"
    symmetric = layout.activation_symmetric and spec.method != "minmax"
    calib_mod.compute_ranges(pre, calib, ranges_json, symmetric=symmetric)
    overrides, mapped = _overrides(pre, wrapped)
    Quantiser(pre, layout, ranges_json, spec.method, overrides or None)(out_path)
    report.update({"path": str(out_path), "fp32_export": {"path": str(fp32), "parity": exp["parity"]},
                   "learned_ranges": len(learned), "ranges_applied": mapped,
                   "note": "the fine-tuned float model is exported; learned input ranges of Conv/Gemm override "
                           "the calibrated ones; the Q/DQ layout is the PTQ layout of the target"})
    return report


__all__ = ["FakeQuant", "qat_finetune", "qat_quantize"]
