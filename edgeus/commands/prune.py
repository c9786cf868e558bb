"""Prune a checkpoint: structured channels (smaller, faster dense model), unstructured or 2:4 sparsity.

    edgeus prune runs/x/teacher.pt prune.target_macs=0.3 out=runs/x/pruned.pt
    edgeus prune teacher.pt prune.ratio=0.5 prune.steps=3 prune.step_epochs=2 prune.finetune_epochs=5
    edgeus prune teacher.pt prune.importance=bn_scale prune.slimming_epochs=3
    edgeus prune teacher.pt prune.method=unstructured prune.sparsity=0.8 prune.sparsity_steps=4
    edgeus prune teacher.pt prune.method=semi_structured prune.finetune_epochs=3   # 2:4 for TensorRT
    edgeus prune teacher.pt prune.target_macs=0.3 target=jetson_orin_nano   # channels in the target's multiples

Structured pruning runs on torch-pruning's dependency graph (residuals, concatenations, depth-wise
and grouped convs, SE/CBAM gates, RSMAS-Net's SCConv and MDTA blocks cut consistently). A target is
a channel ratio (``prune.ratio``) or a fraction of the MACs to keep (``prune.target_macs``).
Fine-tuning (``prune.step_epochs`` between steps, ``prune.finetune_epochs`` at the end) uses the
data the checkpoint was trained on (``data=...``, its classes and preprocessing). The pruned
checkpoint records its new channel counts, so it reloads anywhere with weights_only=True. A JSON
report is written next to it (``<out>.prune.json``).
"""
from __future__ import annotations

import json
from pathlib import Path

USAGE = "<checkpoint.pt> [prune.target_macs=0.3 | prune.ratio=0.5] [prune.method=structured] [out=pruned.pt] [key=value ...]"


def _fmt(n: float) -> str:
    for unit, d in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= d:
            return f"{n / d:.2f}{unit}"
    return str(int(n))


def run(cfg, args):
    from edgeus.commands.common import checkpoint_argument, new_output
    from omegaconf import OmegaConf

    from edgeus.finetune import make_finetuner
    from edgeus.prune import example_input, parse_methods, prune_model
    from edgeus.train.checkpoint import load_checkpoint, save_checkpoint

    src, model, ckpt = checkpoint_argument(cfg, args, "prune")
    pre, classes = ckpt.get("preprocessing") or {}, list(ckpt.get("classes") or [])
    methods = parse_methods(cfg.prune.method)
    needs_data = (cfg.prune.finetune_epochs > 0 or cfg.prune.step_epochs > 0 or cfg.prune.importance == "taylor"
                  or (cfg.prune.importance == "bn_scale" and cfg.prune.slimming_epochs > 0))
    bundle = None
    if needs_data:
        from edgeus.data import build_datasets

        bundle = build_datasets(cfg.data)
    out = new_output(cfg.out or src.with_name(src.stem + ".pruned.pt"), cfg, "pruned checkpoint")
    teacher = None
    if cfg.teacher.checkpoint and cfg.prune.use_teacher:
        teacher, _ = load_checkpoint(cfg.teacher.checkpoint)
    device = cfg.device if cfg.device != "auto" else "cpu"
    ft = make_finetuner(cfg, bundle, teacher=teacher, device=device) if bundle is not None else None
    model, report = prune_model(model, cfg.prune, example_inputs=example_input(model, cfg.data.image_size, cfg.data.in_chans),
                                finetune=ft, loaders=ft.loaders if ft is not None else None, device=device,
                                out_dir=out.parent / (out.stem + "_work"), channel_multiple=cfg.target.channel_multiple)
    from edgeus.data.fingerprint import data_fingerprint

    save_checkpoint(out, model, classes=classes or ["class"], preprocessing=pre, config=OmegaConf.to_yaml(cfg),
                    metrics=ckpt.get("metrics") or {}, extra={"prune": {"methods": methods, "source": str(src)}},
                    data=data_fingerprint(bundle, cfg.data) if bundle is not None else ckpt.get("data"))
    rep_path = out.with_suffix(".prune.json")
    rep_path.write_text(json.dumps(report, indent=2, default=str))

    b, a = report["before"], report["after"]
    print(f"{'':12s} {'before':>10s} {'after':>10s} {'ratio':>7s}")
    print(f"{'MACs':12s} {_fmt(b['macs']):>10s} {_fmt(a['macs']):>10s} {report['macs_ratio']:7.3f}")
    print(f"{'params':12s} {_fmt(b['params']):>10s} {_fmt(a['params']):>10s} {report['params_ratio']:7.3f}")
    s = report.get("structured")
    if s:
        whole = s.get("layers_left_whole", [])
        print(f"structured: {s['importance']} importance, {s['steps']} step(s); {len(whole)} layer(s) left whole "
              f"(see {rep_path.name})")
        if "budget_met" in s and not s["budget_met"]:
            print(f"warning: MACs budget not met: {s.get('budget_note', '')}")
    u = report.get("unstructured")
    if u:
        lat = u.get("onnxruntime_dense_latency", {}).get("ratio")
        print(f"unstructured: sparsity {u['achieved_sparsity']:.3f}; gzip size x{u['file_bytes']['gzip_ratio']:.2f}"
              + (f"; dense ONNX Runtime latency x{lat:.2f} (no dense speed-up, as expected)" if lat else ""))
    ss = report.get("semi_structured")
    if ss:
        print(f"2:4: {len(ss['layers_2_4'])} layers, pattern holds: {ss['pattern_holds']}, "
              f"{len(ss['layers_left_dense'])} left dense (see {rep_path.name})")
    print(f"wrote {out}")
    return 0
