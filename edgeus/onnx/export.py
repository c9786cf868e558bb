"""Export a torch model to ONNX: simplified, checked, parity-tested, with its metadata inside.

    sample, source = parity_sample(bundle.val, cfg.export.parity_samples)
    report = export_onnx(model, "student.onnx", cfg.export, preprocessing=bundle.preprocessing,
                         classes=bundle.classes, sample=sample, sample_source=source,
                         target_opset=target_opset(cfg.target), data=fingerprint)

``export_onnx`` takes its own section (:class:`edgeus.quantize.config.ExportConfig`) and what it
needs injected; it never reads the root config.

* ``torch.onnx.export`` at ``ecfg.opset`` (17 default; raised to ``target_opset`` — the target's
  ``quant.opset`` — when that is higher), input ``input`` [batch, C, H, W], output ``logits`` [batch, K],
  dynamic batch. Exporter: the TorchScript exporter where this torch still has it (``exporter=auto``): on
  torch 2.13 it honours the requested opset, keeps GlobalAveragePool (which ONNX Runtime's
  quantiser handles) and takes a fraction of a second; the dynamo exporter needs ``onnxscript``
  and emitted opset 18 for an opset-17 request here. ``exporter=dynamo`` selects it explicitly.
* simplified with onnxslim, then ``onnx.checker.check_model(full_check=True)``;
* parity against torch on real inputs (the ``sample`` batch — callers pass the val split's first
  images, see :func:`parity_sample` — else seeded noise): max |logit difference| and top-1 agreement,
  the ``mask`` output (when there is one) is held to ``atol`` too (probabilities in [0, 1]);
  raising :class:`ExportParityError` when the difference exceeds ``atol + rtol * max|logit| + 2 * d64``
  (d64: how far torch's own float64 result is from its float32 one, non-zero for models with hard
  thresholds such as SCConv's SRU gate) or the agreement is below ``min_top1_agreement``;
* ``metadata_props`` (:mod:`edgeus.onnx.metadata`): classes, preprocessing (JSON), architecture, data
  fingerprint, edgeus version, opset.
"""
from __future__ import annotations

import copy
import io
import logging
import time
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import torch

from edgeus.errors import EdgeusError, InputError, MissingDependencyError

log = logging.getLogger("edgeus.export")
INPUT_NAME, OUTPUT_NAME = "input", "logits"
MASK_NAME = "mask"     # the second output of a model with a segmenter (two-stage): lesion probabilities


def has_segmenter(model) -> bool:
    """Whether ``model`` segments (``segmenter`` is not None and it has ``segment``): its ONNX gets a mask output."""
    return getattr(model, "segmenter", None) is not None and callable(getattr(model, "segment", None))


def output_names(model) -> list[str]:
    return [OUTPUT_NAME, MASK_NAME] if has_segmenter(model) else [OUTPUT_NAME]


class ExportParityError(EdgeusError):
    """The exported ONNX model does not reproduce the torch model within tolerance."""


def target_opset(target) -> int | None:
    """The opset a target's quantisation asks for (``target.quant.opset``), or None when it sets none.

    A value that is not an integer is an error in the target, reported as such (never ignored).
    """
    quant = getattr(target, "quant", None) if target is not None else None
    if not quant:
        return None
    v = quant.get("opset")
    if v is None:
        return None
    try:
        return int(v)
    except (TypeError, ValueError):
        name = getattr(target, "name", None) or "the target"
        raise EdgeusError(f"{name}: quant.opset={v!r} is not an integer ONNX opset") from None


def _has_torchscript_exporter() -> bool:
    try:
        import torch.onnx.utils as u  # noqa: F401

        return hasattr(u, "export")
    except ImportError:  # pragma: no cover - a future torch without the TorchScript exporter
        return False


def _export_raw(model: torch.nn.Module, example: torch.Tensor, opset: int, exporter: str, dynamic: bool) -> onnx.ModelProto:
    outputs = output_names(model)
    if len(outputs) > 1:
        from edgeus.models.two_stage import WithMask

        model = WithMask(model).eval()     # (logits, mask) from one pass
    if exporter == "auto":
        exporter = "torchscript" if _has_torchscript_exporter() else "dynamo"
    buf = io.BytesIO()
    if exporter == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation notice
            torch.onnx.export(
                model, (example,), buf, input_names=[INPUT_NAME], output_names=outputs,
                opset_version=opset, dynamo=False, do_constant_folding=True,
                dynamic_axes=({INPUT_NAME: {0: "batch"}, **{o: {0: "batch"} for o in outputs}} if dynamic else None),
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
        prog = torch.onnx.export(model, (example,), input_names=[INPUT_NAME], output_names=outputs,
                                 opset_version=opset, dynamo=True, dynamic_shapes=shapes, verbose=False)
        return prog.model_proto
    raise EdgeusError(f"export.exporter={exporter!r}; expected auto, torchscript or dynamo")


def _simplify(model: onnx.ModelProto) -> onnx.ModelProto:
    import onnxslim

    return onnxslim.slim(model)


def _float64_sensitivity(model: torch.nn.Module, sample: torch.Tensor, ref: np.ndarray) -> tuple[float, str | None]:
    """max |logits(float64) - logits(float32)| of torch itself: how much rounding alone moves this model.

    Models with hard thresholds (SCConv's SRU gate ``R >= 0.5``) flip gates on rounding, so no
    export can be held to a tighter standard than torch's own float32 result. Returns
    ``(difference, None)``, or ``(0.0, reason)`` when torch has no float64 kernel for one of the
    model's ops (then the parity tolerance gets no rounding allowance, and the report says why).
    """
    try:
        m64 = copy.deepcopy(model).double().eval()
        with torch.no_grad():
            return float(np.abs(m64(sample.double()).float().numpy() - ref).max()), None
    except (RuntimeError, NotImplementedError, TypeError) as e:   # an op without float64 kernels
        why = f"no float64 estimate ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
        log.warning("export parity: %s; the tolerance gets no rounding allowance", why)
        return 0.0, why


def parity(model: torch.nn.Module, onnx_model: onnx.ModelProto, sample: torch.Tensor) -> dict:
    from edgeus.onnx.session import run_logits

    model.eval()
    if has_segmenter(model):      # both outputs of the (logits, mask) graph
        from edgeus.models.two_stage import WithMask
        from edgeus.onnx.session import session

        with torch.no_grad():
            ref_t, ref_mask = WithMask(model).eval()(sample)
        ref = ref_t.float().numpy()
        sess = session(onnx_model)
        names = [o.name for o in sess.get_outputs()]
        res = dict(zip(names, sess.run(None, {sess.get_inputs()[0].name: sample.numpy().astype(np.float32)})))
        got = res[OUTPUT_NAME]
        mask_got = res.get(MASK_NAME)
    else:
        with torch.no_grad():
            ref = model(sample).float().numpy()
        got = run_logits(onnx_model, sample.numpy(), batch=None)
    diff = np.abs(ref - got)
    d64, why = _float64_sensitivity(model, sample, ref)
    out = {"n": int(len(sample)), "max_abs_diff": float(diff.max()), "mean_abs_diff": float(diff.mean()),
           "max_abs_logit": float(np.abs(ref).max()), "torch_float64_diff": d64,
           "top1_agreement": float((ref.argmax(1) == got.argmax(1)).mean())}
    if has_segmenter(model):
        if mask_got is None:
            out["mask_max_abs_diff"] = None
        else:
            md = np.abs(ref_mask.float().numpy() - mask_got)
            out["mask_max_abs_diff"] = float(md.max())
            out["mask_agreement"] = float(((ref_mask.float().numpy() > 0.5) == (mask_got > 0.5)).mean())
    if why:
        out["torch_float64_note"] = why
    return out


def parity_sample(dataset, n: int) -> tuple[torch.Tensor, str]:
    """The first ``n`` images of a split (callers pass the val split) and a description for the report."""
    k = min(int(n), len(dataset))
    return torch.stack([dataset[i]["image"] for i in range(k)]), f"val split ({k} images)"


def _noise_sample(seed: int, n: int, in_chans: int, size: int) -> tuple[torch.Tensor, str]:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(n, in_chans, size, size, generator=g), f"seeded normal noise ({n} inputs; no data given)"


def export_plain(model: torch.nn.Module, example: torch.Tensor, path: str | Path, opset: int = 17,
                 input_name: str = "image") -> Path:
    """Plain TorchScript export at ``example``'s (static) shape, no simplification, checks or metadata:
    for timing experiments (``edgeus.prune.measure``). Models to ship go through :func:`export_onnx`."""
    model = model.eval()
    with torch.no_grad():   # a two-stage model: logits only (timing the classifier path with its U-Net)
        torch.onnx.export(model, (example,), str(path), input_names=[input_name], output_names=[OUTPUT_NAME],
                          opset_version=opset, dynamo=False)
    return Path(path)


def _opset(ecfg, t_opset: int | None) -> int:
    try:
        opset = int(ecfg.opset)
    except (TypeError, ValueError):
        raise EdgeusError(f"export.opset={ecfg.opset!r} is not an integer ONNX opset") from None
    if t_opset and t_opset > opset:
        opset = t_opset
    if opset < 13:
        raise EdgeusError(f"export.opset={opset}: edgeus needs opset >= 13 (per-channel Q/DQ)")
    return opset


def export_onnx(model: torch.nn.Module, path: str | Path, ecfg, *, preprocessing: dict,
                classes: list[str] | None = None, sample=None, sample_source: str | None = None,
                target_opset: int | None = None, seed: int = 0, data: dict | None = None) -> dict:
    """Export ``model`` to ``path``; return the ledger report.

    ``ecfg``: the ``export`` section. ``preprocessing``: ``{"image_size", "in_chans", "mean", "std"}``
    the model takes (stored in the file; sizes the noise sample). ``classes``: logit names (default
    "0".."K-1"). ``sample``: the parity batch (tensor or array; default ``ecfg.parity_samples`` seeded
    noise images from ``seed``), ``sample_source`` its description. ``target_opset``: the target's
    ``quant.opset`` (:func:`target_opset`), which wins when higher. ``data``: the data fingerprint
    (:func:`edgeus.data.fingerprint.data_fingerprint`) stored as ``edgeus.data``.
    """
    from edgeus import __version__
    from edgeus.onnx.metadata import write_metadata

    if not preprocessing or "image_size" not in preprocessing:
        raise EdgeusError("export_onnx needs the model's preprocessing (image_size, in_chans, mean, std)")
    arch = dict(getattr(model, "edgeus_arch", {}) or {})
    in_chans = int(preprocessing.get("in_chans") or arch.get("in_chans") or 1)
    size = int(preprocessing["image_size"])
    opset = _opset(ecfg, target_opset)

    bad = [k for k, v in model.state_dict().items()
           if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:   # NaN compares False with everything: the parity check below would pass it
        raise InputError(f"the model has NaN or Inf weights (in {bad[0]}"
                         f"{f' and {len(bad) - 1} more tensor(s)' if len(bad) > 1 else ''}); nothing exported")
    t0 = time.perf_counter()
    src = sample_source or "given sample"
    if sample is None:
        sample, src = _noise_sample(seed, int(ecfg.parity_samples), in_chans, size)
    sample = torch.as_tensor(sample).detach().float().cpu()
    m = copy.deepcopy(model).cpu().eval()
    raw = _export_raw(m, sample[:1] if len(sample) > 1 else sample, opset, str(ecfg.exporter), bool(ecfg.dynamic_batch))
    n_raw = len(raw.graph.node)
    slim = _simplify(raw) if ecfg.simplify else raw
    if not classes:
        classes = [str(i) for i in range(int(arch.get("num_classes") or 0))]
    meta = {"edgeus.version": __version__, "edgeus.classes": list(classes),
            "edgeus.preprocessing": dict(preprocessing), "edgeus.arch": arch, "edgeus.opset": str(opset)}
    if data:
        meta["edgeus.data"] = dict(data)
    write_metadata(slim, meta)
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
        "outputs": output_names(m),
        "parity": {**par, "source": src, "atol": float(ecfg.atol), "rtol": float(ecfg.rtol),
                   "allowed_diff": float(ecfg.atol) + float(ecfg.rtol) * par["max_abs_logit"] + 2 * par["torch_float64_diff"],
                   "min_top1_agreement": float(ecfg.min_top1_agreement)},
        "seconds": round(time.perf_counter() - t0, 3),
    }
    mask_bad = "mask_max_abs_diff" in par and (par["mask_max_abs_diff"] is None
                                               or par["mask_max_abs_diff"] > float(ecfg.atol) + 2 * par["torch_float64_diff"])
    if mask_bad:
        report["parity"]["passed"] = False
        raise ExportParityError(
            f"ONNX/torch parity lost on the mask output: max |diff| {par['mask_max_abs_diff']} (allowed "
            f"{float(ecfg.atol) + 2 * par['torch_float64_diff']:.3g}) on {src}; the ONNX file is at {path} for inspection")
    if not (par["max_abs_diff"] <= report["parity"]["allowed_diff"]) or par["top1_agreement"] < float(ecfg.min_top1_agreement):
        report["parity"]["passed"] = False
        raise ExportParityError(
            f"ONNX/torch parity lost: max |diff| {par['max_abs_diff']:.3g} (allowed {report['parity']['allowed_diff']:.3g} = "
            f"atol {ecfg.atol} + rtol {ecfg.rtol} x max |logit| {par['max_abs_logit']:.3g} + 2 x torch's own float64/float32 "
            f"difference {par['torch_float64_diff']:.3g}), top-1 agreement "
            f"{par['top1_agreement']:.3f} (min {ecfg.min_top1_agreement}) on {src}; the ONNX file is at {path} for inspection")
    report["parity"]["passed"] = True
    log.info("exported %s (opset %d, %d nodes, max |diff| %.2g)", path, opset, len(slim.graph.node), par["max_abs_diff"])
    return report


def export_with_data(model: torch.nn.Module, path: str | Path, ecfg, bundle, *, target_opset: int | None = None,
                     seed: int = 0, data: dict | None = None) -> dict:
    """:func:`export_onnx` with a data bundle's classes and preprocessing and its val split's first
    ``ecfg.parity_samples`` images as the parity sample."""
    sample, source = parity_sample(bundle.val, int(ecfg.parity_samples))
    return export_onnx(model, path, ecfg, preprocessing=dict(bundle.preprocessing), classes=list(bundle.classes),
                       sample=sample, sample_source=source, target_opset=target_opset, seed=seed, data=data)


__all__ = ["export_onnx", "export_plain", "has_segmenter", "output_names", "MASK_NAME", "export_with_data", "parity", "parity_sample", "target_opset", "ExportParityError", "INPUT_NAME",
           "OUTPUT_NAME"]
