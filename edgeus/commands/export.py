"""Export a checkpoint to ONNX: simplified (onnxslim), onnx.checker-clean, parity-tested against torch.

    edgeus export runs/x/student.pt                       # -> runs/x/student.onnx
    edgeus export student.pt export.path=out/student.onnx export.opset=18

Input "input" [batch, C, H, W], output "logits" [batch, K], dynamic batch axis. Parity (max |logit
difference| <= export.atol and top-1 agreement >= export.min_top1_agreement) is measured on images
of the val split read with the checkpoint's own classes and preprocessing; a miss fails the command.
The classes, preprocessing and architecture are written into the ONNX metadata.
"""
from __future__ import annotations

import json
from pathlib import Path

USAGE = "<checkpoint.pt> [export.path=out.onnx] [export.opset=17] [key=value ...]"


def run(cfg, args):
    from edgeus.commands.common import checkpoint_argument, new_output
    from edgeus.errors import EdgeusError
    from edgeus.onnx.export import export_onnx, parity_sample, target_opset

    ckpt_path, model, ckpt = checkpoint_argument(cfg, args, "export")
    pre, classes = dict(ckpt.get("preprocessing") or {}), list(ckpt.get("classes") or [])
    bundle = None
    try:  # real inputs for the parity check; export still works without data
        from edgeus.data import build_datasets

        bundle = build_datasets(cfg.data)
    except EdgeusError as e:
        print(f"edgeus export: no data for the parity check ({e}); using seeded noise")
    if bundle is not None:
        classes, pre = classes or list(bundle.classes), pre or dict(bundle.preprocessing)
    if not pre:
        arch = getattr(model, "edgeus_arch", {}) or {}
        pre = {"image_size": int(cfg.data.image_size), "in_chans": int(arch.get("in_chans") or cfg.data.in_chans),
               "mean": [float(v) for v in cfg.data.mean], "std": [float(v) for v in cfg.data.std]}
    sample, source = parity_sample(bundle.val, int(cfg.export.parity_samples)) if bundle is not None else (None, None)
    out = new_output(cfg.export.path or cfg.out or ckpt_path.with_suffix(".onnx"), cfg, "ONNX export")
    report = export_onnx(model, out, cfg.export, preprocessing=pre, classes=classes or None, sample=sample,
                         sample_source=source, target_opset=target_opset(cfg.target), seed=int(cfg.seed),
                         data=ckpt.get("data"))
    out.with_suffix(".export.json").write_text(json.dumps(report, indent=2))
    p = report["parity"]
    print(f"wrote {out} ({report['bytes'] / 1e6:.2f} MB, opset {report['opset']}, {report['nodes']} nodes, "
          f"{report['exporter']} exporter, onnxslim {report['nodes_raw']} -> {report['nodes']} nodes)")
    print(f"parity vs torch on {p['source']}: max |diff| {p['max_abs_diff']:.2e} (atol {p['atol']}), "
          f"top-1 agreement {p['top1_agreement']:.3f}")
    return 0
