"""Export a torch model to ONNX: simplified, checked, parity-tested, with its metadata inside.

    report = export_onnx(model, "student.onnx", cfg, sample=None, classes=..., preprocessing=..., bundle=...)

* ``torch.onnx.export`` at ``cfg.export.opset`` (17 default; raised to the target's ``quant.opset``
  when that is higher), input ``input`` [batch, C, H, W], output ``logits`` [batch, K], dynamic batch.
  Exporter: the TorchScript exporter where this torch still has it (``exporter=auto``): on
  torch 2.13 it honours the requested opset, keeps GlobalAveragePool (which ONNX Runtime's
  quantiser handles) and takes a fraction of a second; the dynamo exporter needs ``onnxscript``
  and emitted opset 18 for an opset-17 request here. ``exporter=dynamo`` selects it explicitly.
* simplified with onnxslim, then ``onnx.checker.check_model(full_check=True)``;
* parity against torch on real inputs (the val split when ``bundle`` is given, else the
  ``sample`` batch, else seeded noise): max |logit difference| and top-1 agreement, raising
  :class:`ExportParityError` when the difference exceeds ``atol + rtol * max|logit| + 2 * d64``
  (d64: how far torch's own float64 result is from its float32 one, non-zero for models with hard
  thresholds such as SCConv's SRU gate) or the agreement is below ``min_top1_agreement``;
* ``metadata_props``: classes, preprocessing (JSON), architecture, edgeus version, opset.
"""
from __future__ import annotations

import copy
import io
import json
import logging
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch

from edgeus.errors import EdgeusError, MissingDependencyError

log = logging.getLogger("edgeus.export")
INPUT_NAME, OUTPUT_NAME = "input", "logits"


class ExportParityError(EdgeusError):
    """The exported ONNX model does not reproduce the torch model within tolerance."""


def _section(cfg, name: str):
    return getattr(cfg, name) if hasattr(cfg, name) else cfg


def _target_opset(cfg) -> int | None:
    try:
        quant = cfg.target.quant or {}
        return int(quant.get("opset")) if quant.get("opset") is not None else None
    except Exception:
        return None


def _has_torchscript_exporter() -> bool:
    try:
        import torch.onnx.utils as u  # noqa: F401

        return hasattr(u, "export")
    except Exception:  # pragma: no cover - future torch without the TorchScript exporter
        return False


def _export_raw(model: torch.nn.Module, example: torch.Tensor, opset: int, exporter: str, dynamic: bool) -> onnx.ModelProto:
    if exporter == "auto":
        exporter = "torchscript" if _has_torchscript_exporter() else "dynamo"
    buf = io.BytesIO()
    if exporter == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                model, (example,), buf, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                opset_version=opset, dynamo=False, do_constant_folding=True,
                dynamic_axes=({INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}} if dynamic else None),
            )
        return onnx.load_model_from_string(buf.getvalue())
    if exporter == "dynamo":
        try:
            import onnxscript  # noqa: F401
        except ImportError:
            raise MissingDependencyError("export.exporter=dynamo needs onnxscript (pip install onnxscript); "
                                         "or use export.exporter=torchscript") from None
        shapes = None
        if dynamic:
            arg = next(iter(__import__("inspect").signature(model.forward).parameters))
            shapes = {arg: {0: torch.export.Dim("batch", min=1, max=4096)}}
        prog = torch.onnx.export(model, (example,), input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                                 opset_version=opset, dynamo=True, dynamic_shapes=shapes, verbose=False)
        return prog.model_proto
    raise EdgeusError(f"export.exporter={exporter!r}; expected auto, torchscript or dynamo")


def _simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(model)


def _ort_logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {INPUT_NAME: x.astype(np.float32)})[0]


def _float64_sensitivity(model: torch.nn.Module, sample: torch.Tensor, ref: np.ndarray) -> float:
    """max |logits(float64) - logits(float32)| of torch itself: how much rounding alone moves this model.

    Models with hard thresholds (SCConv's SRU gate ``R >= 0.5``) flip gates on rounding, so no
    export can be held to a tighter standard than torch's own float32 result.
    """
    try:
        m64 = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            return float(np.abs(m64(sample.double()).float().numpy() - ref).max())
    except Exception:  # an op without float64 kernels: no estimate
        return 0.0


def parity(model: torch.nn.Module, onnx_model: onnx.ModelProto, sample: torch.Tensor) -> dict:
    model.eval()
    with torch.no_grad():
        ref = model(sample).float().numpy()
    got = _ort_logits(onnx_model, sample.numpy())
    diff = np.abs(ref - got)
    return {"n": int(len(sample)), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
            "max_abs_logit": float(np.abs(ref).max()), "torch_float64_diff": _float64_sensitivity(model, sample, ref),
            "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean())}


def _default_sample(cfg, bundle, n: int, in_chans: int, size: int) -> tuple[torch.Tensor, str]:
    if bundle is not None:
        ds = bundle.val
        k = min(n, len(ds))
        return torch.stack([ds[i]["image"] for i in range(k)]), f"val split ({k} images)"
    g = torch.Generator().manual_seed(int(getattr(cfg, "seed", 0)))
    return torch.randn(n, in_chans, size, size, generator=g), f"seeded normal noise ({n} inputs; no data given)"


def _set_meta(model: onnx.ModelProto, meta: dict) -> None:
    existing = {p.key: p for p in model.metadata_props}
    for k, v in meta.items():
        v = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        if k in existing:
            existing[k].value = v
        else:
            model.metadata_props.add(key=k, value=v)


def read_metadata(path_or_model) -> dict:
    m = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model), load_external_data=False)
    out = {}
    for p in m.metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except ValueError:
            out[p.key] = p.value
    return out


def export_onnx(model: torch.nn.Module, path: str | Path, cfg, sample: torch.Tensor | None = None, *,
                classes: list[str] | None = None, preprocessing: dict | None = None, bundle=None) -> dict:
    """Export ``model`` to ``path``; return the ledger report. ``cfg`` is the root config."""
    from edgeus import __version__

    ecfg = _section(cfg, "export")
    data = getattr(cfg, "data", None)
    if bundle is not None:
        classes = classes or list(bundle.classes)
        preprocessing = preprocessing or dict(bundle.preprocessing)
    arch = dict(getattr(model, "edgeus_arch", {}) or {})
    in_chans = int((preprocessing or {}).get("in_chans") or arch.get("in_chans") or getattr(data, "in_chans", 1))
    size = int((preprocessing or {}).get("image_size") or getattr(data, "image_size", 64))
    opset = int(ecfg.opset)
    t_opset = _target_opset(cfg)
    if t_opset and t_opset > opset:
        opset = t_opset
    if opset < 13:
        raise EdgeusError(f"export.opset={opset}: edgeus needs opset >= 13 (per-channel Q/DQ)")

    t0 = time.perf_counter()
    src = "given sample"
    if sample is None:
        sample, src = _default_sample(cfg, bundle, int(ecfg.parity_samples), in_chans, size)
    sample = sample.detach().float().cpu()
    m = copy.deepcopy(model).cpu().eval()
    raw = _export_raw(m, sample[:1] if len(sample) > 1 else sample, opset, str(ecfg.exporter), bool(ecfg.dynamic_batch))
    n_raw = len(raw.graph.node)
    slim = _simplify(raw) if ecfg.simplify else raw
    if classes is None:
        k = int(arch.get("num_classes") or 0)
        classes = list(getattr(data, "classes", None) or []) or [str(i) for i in range(k)]
    _set_meta(slim, {
        "edgeus.version": __version__, "edgeus.classes": list(classes or []),
        "edgeus.preprocessing": preprocessing or {"image_size": size, "in_chans": in_chans,
                                                  "mean": list(getattr(data, "mean", [0.5])),
                                                  "std": list(getattr(data, "std", [0.25]))},
        "edgeus.arch": arch, "edgeus.opset": str(opset),
    })
    slim.producer_name = "edgeus"
    try:
        onnx.checker.check_model(slim, full_check=True)
    except onnx.checker.ValidationError as e:
        raise EdgeusError(f"exported ONNX fails onnx.checker: {str(e).splitlines()[0]}") from None
    par = parity(m, slim, sample)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(slim, str(path))
    ops = Counter(n.op_type for n in slim.graph.node)
    report = {
        "stage": "export", "path": str(path), "bytes": path.stat().st_size, "opset": opset,
        "exporter": str(ecfg.exporter) if ecfg.exporter != "auto" else ("torchscript" if _has_torchscript_exporter() else "dynamo"),
        "simplifier": "onnxslim" if ecfg.simplify else None, "nodes_raw": n_raw, "nodes": len(slim.graph.node),
        "ops": dict(sorted(ops.items())), "checker": "onnx.checker full_check passed",
        "dynamic_batch": bool(ecfg.dynamic_batch), "input": [INPUT_NAME, ["batch", in_chans, size, size]],
        "parity": {**par, "source": src, "atol": float(ecfg.atol), "rtol": float(ecfg.rtol),
                   "allowed_diff": float(ecfg.atol) + float(ecfg.rtol) * par["max_abs_logit"] + 2 * par["torch_float64_diff"],
                   "min_top1_agreement": float(ecfg.min_top1_agreement)},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    if par["max_abs_diff"] > report["parity"]["allowed_diff"] or par["top1_agreement"] < float(ecfg.min_top1_agreement):
        report["parity"]["passed"] = False
        raise ExportParityError(
            f"ONNX/torch parity lost: max |diff| {par['max_abs_diff']:.3g} (allowed {report['parity']['allowed_diff']:.3g} = "
            f"atol {ecfg.atol} + rtol {ecfg.rtol} x max |logit| {par['max_abs_logit']:.3g} + 2 x torch's own float64/float32 "
            f"difference {par['torch_float64_diff']:.3g}), top-1 agreement "
            f"{par['top1_agreement']:.3f} (min {ecfg.min_top1_agreement}) on {src}; the ONNX file is at {path} for inspection")
    report["parity"]["passed"] = True
    log.info("exported %s (opset %d, %d nodes, max |diff| %.2g)", path, opset, len(slim.graph.node), par["max_abs_diff"])
    return report


__all__ = ["export_onnx", "parity", "read_metadata", "ExportParityError", "INPUT_NAME", "OUTPUT_NAME"]
