"""The quantize stage: calibrate, quantise for the target, check accuracy, fall back, QAT.

    report = quantize_onnx("student.onnx", "student.int8.onnx", cfg, bundle, model=student)

1. ONNX Runtime's ``quant_pre_process`` (shape inference, graph optimisation) on the FP32 model.
2. Calibration set from ``bundle.train_plain`` by the spec ``cfg.quantize.calibration``; file list
   and hash written next to the output; ranges computed once (min-max / entropy / percentile).
3. Q/DQ for the target's layout (``cfg.target.quant``; empty = the cpu layout).
4. FP32 vs INT8 on ``cfg.quantize.eval_split`` (val): accuracy and every class's recall against
   ``max_accuracy_drop`` / ``max_recall_drop``.
5. Outside tolerance: sensitivity fallback (:mod:`edgeus.quantize.fallback`); still outside and
   ``qat`` is auto/true with the torch model given: QAT (:mod:`edgeus.quantize.qat`).
6. A TensorRT-bound model is checked with :func:`check_tensorrt_qdq`; a TensorRT calibration cache
   is written for implicit-quantisation users.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

import numpy as np
import onnx

from edgeus.errors import EdgeusError
from edgeus.quantize import calibration as calib_mod
from edgeus.quantize import fallback as fb
from edgeus.quantize import qdq
from edgeus.quantize.checker import check_tensorrt_qdq

log = logging.getLogger("edgeus.quantize")


class EvalSet:
    """A split held as arrays once, so each candidate model is evaluated quickly and identically."""

    def __init__(self, dataset, classes: list[str], ece_bins: int = 15):
        self.x = np.stack([dataset[i]["image"].numpy().astype(np.float32) for i in range(len(dataset))])
        self.y = np.asarray([int(dataset[i]["label"]) for i in range(len(dataset))], np.int64)
        self.classes, self.ece_bins = list(classes), ece_bins

    def logits(self, path) -> np.ndarray:
        return fb.run_logits(path, self.x)

    def metrics(self, path) -> dict:
        from edgeus.evaluate import compute_metrics

        return compute_metrics(self.y, fb.softmax(self.logits(path).astype(np.float64)), self.classes, self.ece_bins)


def _parse_qat(v) -> str:
    s = str(v).strip().lower()
    if s in ("auto",):
        return "auto"
    if s in ("true", "1", "yes", "on"):
        return "true"
    if s in ("false", "0", "no", "off", "none"):
        return "false"
    raise EdgeusError(f"quantize.qat={v!r}; expected auto, true or false")


def preprocess(fp32: Path, out: Path) -> Path:
    """ONNX Runtime's recommended pre-processing; falls back to a plain copy when it cannot run."""
    from onnxruntime.quantization.shape_inference import quant_pre_process

    try:
        quant_pre_process(str(fp32), str(out), skip_symbolic_shape=True)
        m = onnx.load(str(out))
        src = onnx.load(str(fp32), load_external_data=False)
        have = {p.key for p in m.metadata_props}
        for p in src.metadata_props:
            if p.key not in have:
                m.metadata_props.add(key=p.key, value=p.value)
        onnx.save(m, str(out))
    except Exception as e:  # pragma: no cover - depends on the graph
        log.warning("quant_pre_process failed (%s); quantising the model as exported", str(e).splitlines()[0])
        shutil.copyfile(fp32, out)
    return out


def _copy_meta(src: Path, dst: Path, extra: dict) -> None:
    from edgeus.quantize.export import _set_meta

    s = onnx.load(str(src), load_external_data=False)
    d = onnx.load(str(dst))
    have = {p.key for p in d.metadata_props}
    _set_meta(d, {p.key: p.value for p in s.metadata_props if p.key not in have})  # the source's, where missing
    _set_meta(d, extra)
    onnx.save(d, str(dst))


def _brief(m: dict) -> dict:
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], "recall": m["recall"], "ece": m["ece"], "n": m["n"]}


def quantize_onnx(fp32_onnx, out_path, cfg, bundle, teacher_onnx=None, *, model=None, out_dir=None,
                  device: str = "cpu") -> dict:
    """INT8 Q/DQ model of ``fp32_onnx`` for ``cfg.target``, calibrated on ``bundle``'s train split.

    ``model`` (the torch model ``fp32_onnx`` was exported from) enables QAT; ``teacher_onnx`` is
    evaluated for the ledger when given. Returns the ledger report.
    """
    qcfg = cfg.quantize
    t_start = time.perf_counter()
    fp32_onnx, out_path = Path(fp32_onnx), Path(out_path)
    if not fp32_onnx.is_file():
        raise EdgeusError(f"ONNX model not found: {fp32_onnx}")
    if bundle is None:
        raise EdgeusError("quantize needs data: the calibration set comes from the train split")
    layout = qdq.QDQLayout.from_target(cfg.target)
    spec = calib_mod.load_spec(str(qcfg.calibration), qcfg)
    qat_mode = _parse_qat(qcfg.qat)
    if str(qcfg.fallback) not in ("sensitivity", "none", "inc"):
        raise EdgeusError(f"quantize.fallback={qcfg.fallback!r}; expected sensitivity or none")
    if str(qcfg.fallback) == "inc":
        raise EdgeusError("quantize.fallback=inc is not available: neural-compressor 3.x has no ONNX Runtime "
                          "adaptor and its ONNX successor (onnx-neural-compressor) pins numpy 1.x; use "
                          "quantize.fallback=sensitivity (see README, Quantisation)")
    if qcfg.eval_split not in ("val", "test"):
        raise EdgeusError(f"quantize.eval_split={qcfg.eval_split!r}; expected val (or test)")
    work = Path(out_dir) if out_dir else out_path.with_name(out_path.stem.replace(".int8", "") + ".quant")
    work.mkdir(parents=True, exist_ok=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)

    pre = preprocess(fp32_onnx, work / "fp32.pre.onnx")
    calib = calib_mod.build_calibration_set(bundle, spec)
    files = calib.write_file_list(work / "calibration_files.txt")
    ranges_json = work / "ranges.json"
    symmetric = layout.activation_symmetric and spec.method != "minmax"
    ranges = calib_mod.compute_ranges(pre, calib, ranges_json, symmetric=symmetric)
    trt_cache = None
    if layout.layout == "tensorrt":
        trt_cache = calib_mod.write_tensorrt_cache(ranges, work / "calibration.cache", str(qcfg.trt_cache_version))
    quantiser = fb.Quantiser(pre, layout, ranges_json, spec.method)
    quantiser(out_path)

    classes = list(bundle.classes)
    ev = EvalSet(bundle.split(str(qcfg.eval_split)), classes)
    fp32_m = ev.metrics(fp32_onnx)
    full_m = ev.metrics(out_path)
    chk = fb.tolerance_check(fp32_m, full_m, float(qcfg.max_accuracy_drop), float(qcfg.max_recall_drop))
    report: dict = {
        "stage": "quantize", "input": str(fp32_onnx), "path": str(out_path), "target": str(cfg.target.name),
        "layout": layout.to_dict(),
        "calibration": {**calib.describe(classes), "file_list": str(files), "ranges": str(ranges_json),
                        "tensorrt_cache": str(trt_cache) if trt_cache else None,
                        "tensors_calibrated": len(ranges)},
        "eval_split": str(qcfg.eval_split),
        "metrics": {"fp32": _brief(fp32_m), "int8_ptq": _brief(full_m)},
        "tolerance": {"max_accuracy_drop": float(qcfg.max_accuracy_drop), "max_recall_drop": float(qcfg.max_recall_drop)},
        "ptq_check": chk, "fallback": None, "qat": None, "excluded_nodes": [],
    }
    final_m, final_chk, method_used = full_m, chk, "ptq"

    if not chk["ok"] and str(qcfg.fallback) == "sensitivity" and int(qcfg.max_fallback_nodes) > 0:
        cands = qdq.fallback_candidates(out_path)
        x_rank = calib.images[: min(len(calib.images), 64)]
        t0 = time.perf_counter()
        ranking = fb.rank_sensitivity(quantiser, cands, x_rank, work, str(qcfg.sensitivity), full_model=out_path)
        res = fb.greedy_fallback(quantiser, ranking, ev.metrics, fp32_m, full_m, out_path, work,
                                 int(qcfg.max_fallback_nodes), float(qcfg.max_accuracy_drop), float(qcfg.max_recall_drop))
        report["fallback"] = {"method": f"sensitivity/{qcfg.sensitivity}", "candidates": len(cands),
                              "ranking": ranking[: max(int(qcfg.max_fallback_nodes) * 2, 10)],
                              "steps": res["steps"], "seconds": round(time.perf_counter() - t0, 2)}
        report["excluded_nodes"] = [{k: s[k] for k in ("node", "op_type", "sensitivity", "accuracy_gain",
                                                       "worst_recall_drop", "bytes_cost")}
                                    for s in res["steps"] if s["node"] in res["excluded"]]
        final_m, final_chk, method_used = res["metrics"], res["check"], "ptq+fallback"
        report["metrics"]["int8_fallback"] = _brief(final_m)

    if qat_mode == "true" or (qat_mode == "auto" and not final_chk["ok"]):
        if model is None:
            report["qat"] = {"skipped": "no torch model given (model= / quantize.checkpoint=), so QAT could not run"}
        else:
            from edgeus.quantize.qat import qat_quantize

            qat_path = work / "qat.int8.onnx"
            qrep = qat_quantize(model, qat_path, cfg, bundle, layout, calib, spec, work, device=device)
            qm = ev.metrics(qat_path)
            qchk = fb.tolerance_check(fp32_m, qm, float(qcfg.max_accuracy_drop), float(qcfg.max_recall_drop))
            qrep.update({"metrics": _brief(qm), "check": qchk})
            report["qat"] = qrep
            report["metrics"]["int8_qat"] = _brief(qm)
            # QAT ships when asked for, or when it is closer to the tolerance than PTQ (+ fallback)
            if qat_mode == "true" or qchk["violation"] < final_chk["violation"]:
                shutil.copyfile(qat_path, out_path)
                final_m, final_chk, method_used = qm, qchk, "qat"
                report["excluded_nodes"] = []
                qrep["chosen"] = True

    _copy_meta(pre, out_path, {"edgeus.quantization": {"method": method_used, "layout": layout.layout,
                                                       "calibration_sha256": calib.sha256,
                                                       "excluded_nodes": [e["node"] for e in report["excluded_nodes"]]}})
    problems = check_tensorrt_qdq(out_path, require_qdq=True) if layout.layout == "tensorrt" else []
    if teacher_onnx is not None:
        report["metrics"]["teacher"] = _brief(ev.metrics(teacher_onnx))
    report.update({
        "method": method_used, "metrics_final": _brief(final_m), "within_tolerance": bool(final_chk["ok"]),
        "final_check": final_chk, "tensorrt_check": problems if layout.layout == "tensorrt" else "n/a (onnxruntime layout)",
        "qdq": qdq.summary(out_path),
        "bytes": {"fp32": fp32_onnx.stat().st_size, "int8": out_path.stat().st_size,
                  "ratio": round(fp32_onnx.stat().st_size / max(out_path.stat().st_size, 1), 3)},
        "seconds": round(time.perf_counter() - t_start, 2),
    })
    (work / "report.json").write_text(json.dumps(report, indent=2, default=str))
    if problems:
        raise EdgeusError(f"the {layout.layout} INT8 model breaks TensorRT's Q/DQ rules ({len(problems)}): "
                          + "; ".join(problems[:3]))
    log.info("quantised %s -> %s (%s): accuracy %.4f -> %.4f, within tolerance: %s", fp32_onnx, out_path, method_used,
             fp32_m["accuracy"], final_m["accuracy"], final_chk["ok"])
    return report


__all__ = ["quantize_onnx", "EvalSet", "preprocess"]
