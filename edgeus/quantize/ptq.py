"""The quantize stage: calibrate, quantise for the target, check accuracy, fall back, QAT.

    from edgeus.quantize import QDQLayout, inputs_from_bundle, quantize_onnx
    report = quantize_onnx("student.onnx", "student.int8.onnx", cfg.quantize,
                           layout=QDQLayout.from_target(cfg.target), target=cfg.target.name,
                           **inputs_from_bundle(bundle, cfg.quantize), qat=None)

``quantize_onnx`` takes its own section (:class:`~edgeus.quantize.config.QuantizeConfig`) and what it
needs injected — the Q/DQ layout (the target's), the calibration set (train split), the evaluation
set (val), the optional QAT setup (:class:`~edgeus.quantize.qat.QATSetup`) — never the root config.

1. ONNX Runtime's ``quant_pre_process`` (shape inference, graph optimisation) on the FP32 model.
2. Ranges computed once on the calibration set (min-max / entropy / percentile); the file list and
   hash of the set are written next to the output.
3. Q/DQ for the target's layout (TensorRT: weighted-op inputs and residual-add skips only,
   :mod:`edgeus.quantize.placement`; CPU: the layout the target's ISA needs, :mod:`edgeus.quantize.isa`);
   optionally bias correction of the weight rounding (``bias_correction``, :mod:`edgeus.quantize.recovery`).
4. FP32 vs INT8, measured the way the target computes (:func:`edgeus.quantize.isa.evaluation_plan`):
   accuracy and every class's recall on the evaluation set (val) against ``max_accuracy_drop`` /
   ``max_recall_drop``, and top-1 agreement / flips per class on every non-test image (the fidelity
   set) against ``min_agreement`` / ``max_class_flip_rate``.
5. Outside tolerance: sensitivity fallback (:mod:`edgeus.quantize.fallback`); still outside and
   ``qat`` is auto/true with a QAT setup given: QAT (:mod:`edgeus.quantize.qat`). Both are recovery
   of last resort: the report says which one (``method``: ptq | ptq+fallback | qat).
6. A TensorRT-bound model is checked with :func:`check_tensorrt_qdq` (including the placement
   rules); a TensorRT calibration cache is written for implicit-quantisation users. The host and
   target ISA go into the report and the model's ``edgeus.quantization`` metadata.

The INT8 model is written under a temporary name beside ``out_path`` and renamed at the very end,
so a failed quantise leaves nothing under the final name.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from edgeus.errors import EdgeusError
from edgeus.onnx.metadata import add_calibration
from edgeus.quantize import calibration as calib_mod
from edgeus.quantize import fallback as fb
from edgeus.quantize import isa as isa_mod
from edgeus.quantize import qdq
from edgeus.quantize.checker import check_tensorrt_qdq
from edgeus.quantize.evalset import EvalSet, FidelitySet, brief
from edgeus.quantize.prepare import copy_meta, preprocess

log = logging.getLogger("edgeus.quantize")
FALLBACKS = ("sensitivity", "none")


def parse_qat(v) -> str:
    s = str(v).strip().lower()
    if s in ("auto",):
        return "auto"
    if s in ("true", "1", "yes", "on"):
        return "true"
    if s in ("false", "0", "no", "off", "none"):
        return "false"
    raise EdgeusError(f"quantize.qat={v!r}; expected auto, true or false")


def check_settings(qcfg) -> str:
    """Validate the section's choices; returns the QAT mode (auto | true | false)."""
    qat_mode = parse_qat(qcfg.qat)
    if str(qcfg.fallback) == "inc":
        raise EdgeusError("quantize.fallback=inc is not available: neural-compressor 3.x has no ONNX Runtime "
                          "adaptor and its ONNX successor (onnx-neural-compressor) pins numpy 1.x; use "
                          "quantize.fallback=sensitivity (see README, Quantisation)")
    if str(qcfg.fallback) not in FALLBACKS:
        raise EdgeusError(f"quantize.fallback={qcfg.fallback!r}; expected sensitivity or none")
    return qat_mode


def inputs_from_bundle(bundle, qcfg) -> dict:
    """``calibration`` (train split, by the spec ``qcfg.calibration``) and ``evaluation``
    (``qcfg.eval_split``) for :func:`quantize_onnx`, drawn from a data bundle."""
    if bundle is None:
        raise EdgeusError("quantize needs data: the calibration set comes from the train split")
    if qcfg.eval_split not in ("val", "test"):
        raise EdgeusError(f"quantize.eval_split={qcfg.eval_split!r}; expected val (or test)")
    spec = calib_mod.load_spec(str(qcfg.calibration), qcfg)
    return {"calibration": calib_mod.build_calibration_set(bundle, spec),
            "evaluation": EvalSet(bundle.split(str(qcfg.eval_split)), list(bundle.classes), name=str(qcfg.eval_split)),
            "fidelity": FidelitySet.from_bundle(bundle, views=int(qcfg.fidelity_views))}


class Judge:
    """Evaluates a candidate INT8 model the way the target computes it and checks it against the tolerance:
    accuracy and per-class recall drops on the evaluation set, agreement and per-class flips on the
    fidelity set (every non-test image)."""

    def __init__(self, fp32_onnx: Path, ev: EvalSet, fid: FidelitySet | None, qcfg, optimization: str | None):
        self.fp32_onnx, self.ev, self.fid, self.optimization = fp32_onnx, ev, fid, optimization
        self.limits = {"max_accuracy_drop": float(qcfg.max_accuracy_drop), "max_recall_drop": float(qcfg.max_recall_drop)}
        self.fid_limits = ({"min_agreement": float(qcfg.min_agreement),
                            "max_class_flip_rate": float(qcfg.max_class_flip_rate)} if fid is not None else {})
        self.fp32 = ev.metrics(fp32_onnx)

    def metrics(self, path) -> dict:
        m = self.ev.metrics(path, self.optimization)
        if self.fid is not None:
            m["fidelity"] = self.fid.compare(self.fp32_onnx, path, self.optimization)
        return m

    def check(self, m: dict) -> dict:
        return fb.tolerance_check(self.fp32, m, self.limits["max_accuracy_drop"], self.limits["max_recall_drop"],
                                  **self.fid_limits)

    def tolerance(self) -> dict:
        return {**self.limits, **self.fid_limits}


def _brief(m: dict) -> dict:
    out = brief(m)
    if "fidelity" in m:
        f = m["fidelity"]
        out["fidelity"] = {k: f[k] for k in ("n", "agreement", "flips", "by_source", "worst_class", "worst_flip_rate")}
        out["fidelity"]["flips_per_class"] = {c: v["flips"] for c, v in f["per_class"].items()}
    return out


def _tmp_name(out_path: Path) -> Path:
    """A sibling of ``out_path`` (same directory, so the final rename is atomic)."""
    return out_path.with_name(f".{out_path.name}.{os.getpid()}.partial")


def calibrate(pre: Path, calib, layout: qdq.QDQLayout, qcfg, work: Path) -> dict:
    """Ranges on the calibration set (ORT JSON cache), the file list, and the TensorRT cache where useful."""
    files = calib.write_file_list(work / "calibration_files.txt")
    ranges_json = work / "ranges.json"
    symmetric = layout.activation_symmetric and calib.spec.method != "minmax"
    ranges = calib_mod.compute_ranges(pre, calib, ranges_json, symmetric=symmetric)
    trt_cache = None
    if layout.layout == "tensorrt":
        trt_cache = calib_mod.write_tensorrt_cache(ranges, work / "calibration.cache", str(qcfg.trt_cache_version))
    return {"ranges": ranges, "ranges_json": ranges_json, "file_list": files, "tensorrt_cache": trt_cache}


def sensitivity_fallback(quantiser: fb.Quantiser, out_path: Path, calib, judge: Judge, full_m: dict,
                         qcfg, work: Path) -> dict:
    """Keep the most sensitive nodes in float until within tolerance; writes the chosen model to ``out_path``."""
    cands = qdq.fallback_candidates(out_path)
    x_rank = calib.images[: min(len(calib.images), 64)]
    t0 = time.perf_counter()
    ranking = fb.rank_sensitivity(quantiser, cands, x_rank, work, str(qcfg.sensitivity), full_model=out_path,
                                  optimization=judge.optimization)
    res = fb.greedy_fallback(quantiser, ranking, judge.metrics, judge.fp32, full_m, out_path, work,
                             int(qcfg.max_fallback_nodes), float(qcfg.max_accuracy_drop), float(qcfg.max_recall_drop),
                             **judge.fid_limits)
    report = {"method": f"sensitivity/{qcfg.sensitivity}", "candidates": len(cands),
              "ranking": ranking[: max(int(qcfg.max_fallback_nodes) * 2, 10)],
              "steps": res["steps"], "seconds": round(time.perf_counter() - t0, 2)}
    excluded = [{k: s[k] for k in ("node", "op_type", "sensitivity", "accuracy_gain", "worst_recall_drop", "bytes_cost")}
                for s in res["steps"] if s["node"] in res["excluded"]]
    return {"report": report, "excluded": excluded, "metrics": res["metrics"], "check": res["check"]}


def run_qat(qat, qcfg, layout: qdq.QDQLayout, calib, judge: Judge, work: Path) -> tuple[dict, dict]:
    """QAT into ``work``; returns (its report with tolerance check, its metrics); the caller decides to ship it."""
    from edgeus.quantize.qat import qat_quantize

    qat_path = work / "qat.int8.onnx"
    qrep = qat_quantize(qat, qat_path, qcfg, layout, calib, work)
    qm = judge.metrics(qat_path)
    qchk = judge.check(qm)
    qrep.update({"metrics": _brief(qm), "check": qchk, "path": str(qat_path)})
    return qrep, qm


def quantize_onnx(fp32_onnx, out_path, qcfg, *, layout: qdq.QDQLayout, calibration, evaluation: EvalSet,
                  fidelity: FidelitySet | None = None, qat=None, recovery: bool = True, teacher_onnx=None,
                  out_dir=None, target: str = "", host: dict | None = None) -> dict:
    """INT8 Q/DQ model of ``fp32_onnx`` in ``layout``, calibrated on ``calibration``.

    ``qcfg``: the ``quantize`` section. ``calibration``: a :class:`CalibrationSet` (train split);
    ``evaluation``: the :class:`EvalSet` INT8 is compared with FP32 on (val); ``fidelity``: the
    :class:`FidelitySet` (every non-test image) whose FP32/INT8 agreement the tolerance also needs
    (None: accuracy and recall only); ``host``: this machine's ISA (default: detected,
    :func:`edgeus.quantize.isa.detect_host`); ``qat``: a
    :class:`~edgeus.quantize.qat.QATSetup` (the torch model and how to fine-tune and export it),
    enabling QAT; ``recovery=False``: PTQ alone (no fallback, no QAT, whatever ``qcfg`` says);
    ``teacher_onnx`` is evaluated for the ledger when given; ``target``: the
    target's name, for the report. Returns the ledger report.
    """
    t_start = time.perf_counter()
    fp32_onnx, out_path = Path(fp32_onnx), Path(out_path)
    if not fp32_onnx.is_file():
        raise EdgeusError(f"ONNX model not found: {fp32_onnx}")
    if calibration is None or evaluation is None:
        raise EdgeusError("quantize needs data: a calibration set (train split) and an evaluation set (val)")
    qat_mode = check_settings(qcfg)
    fallback = str(qcfg.fallback)
    if not recovery:
        qat, qat_mode, fallback = None, "false", "none"
    calib = calibration
    work = Path(out_dir) if out_dir else out_path.with_name(out_path.stem.replace(".int8", "") + ".quant")
    work.mkdir(parents=True, exist_ok=True)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.unlink(missing_ok=True)          # never leave an older model under the final name if this run fails
    tmp = _tmp_name(out_path)
    try:
        report = _quantize(fp32_onnx, out_path, tmp, qcfg, layout, calib, evaluation, fidelity, qat, qat_mode,
                           fallback, teacher_onnx, work, target, host, t_start)
        os.replace(tmp, out_path)
    finally:
        tmp.unlink(missing_ok=True)
    (work / "report.json").write_text(json.dumps(report, indent=2, default=str))
    return report


def isa_report(plan: dict) -> dict:
    """The host / target ISA facts of an evaluation plan, for the report and the model's metadata."""
    host = plan["host"]
    return {"host_isa": host["isa"], "host_int8_dot": host.get("int8_dot"), "host_flags": host.get("flags", []),
            "host_kernels": isa_mod.kernels(host["isa"]), "target_isa": plan["target_isa"],
            "target_kernels": isa_mod.kernels(plan["target_isa"]), "accuracy_mode": plan["mode"],
            "warnings": list(plan["warnings"]), "notes": list(plan.get("notes", []))}


def _quantize(fp32_onnx: Path, out_path: Path, tmp: Path, qcfg, layout, calib, ev: EvalSet, fid, qat, qat_mode: str,
              fallback: str, teacher_onnx, work: Path, target: str, host, t_start: float) -> dict:
    plan = isa_mod.evaluation_plan(layout, host)
    for w in plan["warnings"]:
        log.warning("quantize (%s): %s", target or layout.layout, w)
    pre = preprocess(fp32_onnx, work / "fp32.pre.onnx")
    cal = calibrate(pre, calib, layout, qcfg, work)
    quantiser = fb.Quantiser(pre, layout, cal["ranges_json"], calib.spec.method)
    quantiser(tmp)
    bias_corr = None
    if bool(getattr(qcfg, "bias_correction", False)):
        from edgeus.quantize.recovery import bias_correct

        corrected, bias_corr = bias_correct(pre, tmp, calib, work / "fp32.biascorr.onnx")
        quantiser = fb.Quantiser(corrected, layout, cal["ranges_json"], calib.spec.method)
        quantiser(tmp)

    classes = list(ev.classes)
    judge = Judge(fp32_onnx, ev, fid, qcfg, plan["optimization"])
    fp32_m = judge.fp32
    full_m = judge.metrics(tmp)
    chk = judge.check(full_m)
    report: dict = {
        "stage": "quantize", "input": str(fp32_onnx), "path": str(out_path), "target": str(target),
        "layout": layout.to_dict(), "isa": isa_report(plan),
        "calibration": {**calib.describe(classes), "file_list": str(cal["file_list"]), "ranges": str(cal["ranges_json"]),
                        "tensorrt_cache": str(cal["tensorrt_cache"]) if cal["tensorrt_cache"] else None,
                        "tensors_calibrated": len(cal["ranges"])},
        "eval_split": ev.name,
        "metrics": {"fp32": brief(fp32_m), "int8_ptq": _brief(full_m)},
        "tolerance": judge.tolerance(),
        "ptq_check": chk, "bias_correction": bias_corr, "fallback": None, "qat": None, "excluded_nodes": [],
    }
    final_m, final_chk, method_used = full_m, chk, "ptq"

    if not chk["ok"] and fallback == "sensitivity" and int(qcfg.max_fallback_nodes) > 0:
        fbr = sensitivity_fallback(quantiser, tmp, calib, judge, full_m, qcfg, work)
        report["fallback"], report["excluded_nodes"] = fbr["report"], fbr["excluded"]
        final_m, final_chk, method_used = fbr["metrics"], fbr["check"], "ptq+fallback"
        report["metrics"]["int8_fallback"] = _brief(final_m)

    if qat_mode == "true" or (qat_mode == "auto" and not final_chk["ok"]):
        if qat is None:
            report["qat"] = {"skipped": "no torch model given (model= / quantize.checkpoint=), so QAT could not run"}
        else:
            qrep, qm = run_qat(qat, qcfg, layout, calib, judge, work)
            report["qat"] = qrep
            report["metrics"]["int8_qat"] = qrep["metrics"]
            # QAT ships when asked for, or when it is closer to the tolerance than PTQ (+ fallback)
            if qat_mode == "true" or qrep["check"]["violation"] < final_chk["violation"]:
                shutil.copyfile(qrep["path"], tmp)
                final_m, final_chk, method_used = qm, qrep["check"], "qat"
                report["excluded_nodes"] = []
                qrep["chosen"] = True

    isa_meta = {k: report["isa"][k] for k in ("host_isa", "host_int8_dot", "target_isa", "accuracy_mode", "warnings")}
    copy_meta(pre, tmp, {"edgeus.quantization": {"method": method_used, "layout": layout.layout,
                                                 "reduce_range": bool(layout.reduce_range), "isa": isa_meta,
                                                 "calibration_sha256": calib.sha256,
                                                 "excluded_nodes": [e["node"] for e in report["excluded_nodes"]]}})
    add_calibration(tmp, calib.ids)   # the data fingerprint (edgeus.data) gains the calibration file list
    problems = check_tensorrt_qdq(tmp, require_qdq=True, placement=True) if layout.layout == "tensorrt" else []
    if teacher_onnx is not None:
        report["metrics"]["teacher"] = brief(ev.metrics(teacher_onnx))
    report.update({
        "method": method_used, "metrics_final": _brief(final_m), "within_tolerance": bool(final_chk["ok"]),
        "final_check": final_chk, "tensorrt_check": problems if layout.layout == "tensorrt" else "n/a (onnxruntime layout)",
        "qdq": qdq.summary(tmp),
        "bytes": {"fp32": fp32_onnx.stat().st_size, "int8": tmp.stat().st_size,
                  "ratio": round(fp32_onnx.stat().st_size / max(tmp.stat().st_size, 1), 3)},
        "seconds": round(time.perf_counter() - t_start, 2),
    })
    if problems:
        (work / "report.json").write_text(json.dumps(report, indent=2, default=str))
        raise EdgeusError(f"the {layout.layout} INT8 model breaks TensorRT's Q/DQ rules ({len(problems)}): "
                          + "; ".join(problems[:3]) + f" (nothing written to {out_path}; report in {work / 'report.json'})")
    log.info("quantised %s -> %s (%s): accuracy %.4f -> %.4f, agreement %s, within tolerance: %s", fp32_onnx, out_path,
             method_used, fp32_m["accuracy"], final_m["accuracy"], final_chk.get("agreement", "n/a"), final_chk["ok"])
    return report


__all__ = ["quantize_onnx", "inputs_from_bundle", "check_settings", "calibrate", "sensitivity_fallback", "run_qat",
           "Judge", "isa_report", "EvalSet", "FidelitySet", "preprocess"]
