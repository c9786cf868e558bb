"""INT8 quantisation of an ONNX model for a target: calibrated Q/DQ, accuracy-checked, with fallback.

    edgeus quantize student.onnx target=cpu                      # uint8/int8 Q/DQ for ONNX Runtime
    edgeus quantize student.onnx target=jetson_orin_nano         # symmetric int8 Q/DQ for TensorRT
    edgeus quantize student.onnx quantize.calibration=balanced_256 quantize.method=percentile
    edgeus quantize student.onnx quantize.checkpoint=student.pt quantize.qat=auto

The Q/DQ layout comes from the target file (targets/<name>.yaml, quant:), never the recipe; the target
states the ISA it runs on (quant.isa): target=cpu (any x86/Arm; 7-bit weights so ONNX Runtime's AVX2
kernel cannot saturate), target=cpu_vnni (full-range U8S8, VNNI servers), TensorRT targets (Q/DQ on
weighted-op inputs and residual-add skips only). The host's ISA is detected and recorded; accuracy is
measured the way the target computes it, with a warning where this host cannot run the target's kernels.
Besides val accuracy and every class's recall, INT8 must agree with FP32 on every non-test image
(quantize.min_agreement, quantize.max_class_flip_rate).
Calibration images come from the train split only (calibration/<spec>.yaml: size, balance, seed,
method); their file list and hash are written next to the output. INT8 is compared with FP32 on the
val split; when accuracy drops more than quantize.max_accuracy_drop or any class's recall more than
quantize.max_recall_drop, the most sensitive nodes are kept in floating point (fallback), then
QAT runs (quantize.qat=auto|true|false, needs quantize.checkpoint=). A TensorRT-bound model is
checked against TensorRT's Q/DQ rules and gets a calibration.cache for implicit-quantisation users.
Data: the checkpoint's classes/preprocessing when given, else the ONNX metadata.
"""
from __future__ import annotations

import json
from pathlib import Path

USAGE = "<model.onnx> [target=<name>] [quantize.out=...] [quantize.checkpoint=student.pt] [key=value ...]"


def run(cfg, args):
    from edgeus.commands.common import new_output
    from edgeus.data import build_datasets
    from edgeus.errors import EdgeusError
    from edgeus.onnx.metadata import read_metadata
    from edgeus.quantize import QDQLayout, inputs_from_bundle, quantize_onnx

    if len(args) != 1:
        raise EdgeusError(f"edgeus quantize takes one ONNX model, got {len(args)}: {args}")
    src = Path(args[0])
    if not src.is_file():
        raise EdgeusError(f"ONNX model not found: {src}")
    model = None
    meta = read_metadata(src)
    pre, classes = meta.get("edgeus.preprocessing") or {}, meta.get("edgeus.classes") or []
    if cfg.quantize.checkpoint:
        from edgeus.train.checkpoint import load_checkpoint

        model, ckpt = load_checkpoint(cfg.quantize.checkpoint)
        pre, classes = ckpt.get("preprocessing") or pre, ckpt.get("classes") or classes
    if pre:
        cfg.data.image_size, cfg.data.in_chans = int(pre["image_size"]), int(pre["in_chans"])
        cfg.data.mean, cfg.data.std = list(pre["mean"]), list(pre["std"])
    if classes:
        cfg.data.classes = list(classes)
    bundle = build_datasets(cfg.data)
    out = new_output(cfg.quantize.out or cfg.out or src.with_name(src.stem + ".int8.onnx"), cfg, "INT8 model")
    r = quantize_onnx(src, out, cfg.quantize, layout=QDQLayout.from_target(cfg.target), target=cfg.target.name,
                      **inputs_from_bundle(bundle, cfg.quantize), qat=_qat_setup(cfg, bundle, model))
    out.with_suffix(".quantize.json").write_text(json.dumps(r, indent=2, default=str))
    f, q = r["metrics"]["fp32"], r["metrics_final"]
    print(f"wrote {out} ({r['layout']['layout']} layout, {r['method']}; {r['bytes']['fp32'] / 1e6:.2f} MB -> "
          f"{r['bytes']['int8'] / 1e6:.2f} MB)")
    print(f"calibration: {r['calibration']['n']} train images ({r['calibration']['spec']['method']}), "
          f"sha256 {r['calibration']['sha256'][:16]}, list {r['calibration']['file_list']}")
    print(f"{r['eval_split']}: accuracy {f['accuracy']:.4f} -> {q['accuracy']:.4f}; recall "
          + ", ".join(f"{c} {f['recall'][c]:.3f} -> {q['recall'][c]:.3f}" for c in f["recall"]))
    if r["excluded_nodes"]:
        print("kept in floating point: " + ", ".join(f"{e['node']} ({e['op_type']})" for e in r["excluded_nodes"]))
    print("within tolerance" if r["within_tolerance"] else
          f"OUTSIDE tolerance (accuracy drop {r['final_check']['accuracy_drop']:.4f}, worst recall drop "
          f"{r['final_check']['worst_recall_drop']:.4f} on {r['final_check']['worst_class']})")
    isa = r["isa"]
    print(f"ISA: host {isa['host_isa']} ({isa['host_int8_dot'] or 'no int8 dot product'}), target {isa['target_isa']}; "
          f"accuracy measured {'with the INT8 kernels' if isa['accuracy_mode'] == 'native' else 'by Q/DQ simulation'}")
    for w in isa["warnings"]:
        print(f"WARNING: {w}")
    fid = r["final_check"]
    if "agreement" in fid:
        print(f"agreement with FP32 on {fid['fidelity_images']} non-test images: {fid['agreement']:.4f} "
              f"(min {fid['min_agreement']}); most flips: {fid['worst_flip_class']} {fid['worst_flip_rate']:.4f} "
              f"(max {fid['max_class_flip_rate']})")
    if r["layout"]["layout"] == "tensorrt":
        print(f"TensorRT Q/DQ check: OK; calibration cache {r['calibration']['tensorrt_cache']}")
    return 0 if r["within_tolerance"] else 1


def _qat_setup(cfg, bundle, model):
    """QAT's injected pieces (fine-tuning through edgeus.train.fit, the run's export) when a checkpoint is given."""
    if model is None:
        return None
    from edgeus.finetune import make_finetuner
    from edgeus.onnx.export import export_onnx, parity_sample, target_opset
    from edgeus.quantize import QATSetup

    def export(m, onnx_path):
        sample, source = parity_sample(bundle.val, int(cfg.export.parity_samples))
        return export_onnx(m, onnx_path, cfg.export, preprocessing=dict(bundle.preprocessing),
                           classes=list(bundle.classes), sample=sample, sample_source=source,
                           target_opset=target_opset(cfg.target), seed=int(cfg.seed))

    return QATSetup(model, finetune=lambda fp32_model: make_finetuner(cfg, bundle, teacher=fp32_model), export=export)
