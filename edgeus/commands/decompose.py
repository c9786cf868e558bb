"""Low-rank decomposition of a checkpoint: Tucker-2 of k x k convolutions, SVD of linears and 1x1
convolutions, ranks by ratio / energy / VBMF / a global MACs budget, then fine-tuning.

    edgeus decompose runs/train/best.pt                                   # budget: 0.5 of the MACs
    edgeus decompose best.pt decompose.target_macs=0.6 out=student.pt
    edgeus decompose best.pt decompose.rank_mode=vbmf decompose.finetune_epochs=0
    edgeus decompose best.pt decompose.rank_mode=energy decompose.energy=0.9 decompose.method=hosvd
    edgeus decompose best.pt target=jetson_orin_nano       # ranks in the target's channel multiples

Each k x k convolution becomes 1x1 (C_in->R_in), k x k (R_in->R_out, same stride/padding/dilation),
1x1 (R_out->C_out): plain convolutions that ONNX and TensorRT run as such. Depth-wise, grouped and
tiny layers are left alone and listed. MACs are counted at the checkpoint's input size. With
decompose.finetune_epochs > 0 the model is fine-tuned on data=... (default: the phantom) with
decompose.lr (default train.lr). Writes the checkpoint (default <checkpoint>.decomposed.pt) and
<out>.decompose.json with the per-layer table: ranks, MACs before/after, relative error.
"""
from __future__ import annotations

import json
from pathlib import Path

USAGE = "<checkpoint.pt> [decompose.rank_mode=budget] [decompose.target_macs=0.5] [out=PATH] [key=value ...]"


def run(cfg, args):
    from edgeus.commands.common import checkpoint_argument, new_output
    from edgeus.config import to_yaml
    from edgeus.decompose.api import decompose_model, format_table
    from edgeus.errors import EdgeusError
    from edgeus.train.checkpoint import save_checkpoint
    from edgeus.train.run import resolve_device

    src, model, ckpt = checkpoint_argument(cfg, args, "decompose")
    out = new_output(cfg.out or src.with_name(f"{src.stem}.decomposed.pt"), cfg, "decomposed checkpoint")
    device = resolve_device(cfg.device)

    bundle = None
    if cfg.decompose.enabled and int(cfg.decompose.finetune_epochs) > 0:
        from edgeus.data import build_datasets

        bundle = build_datasets(cfg.data)
        if list(bundle.classes) != list(ckpt["classes"]):
            raise EdgeusError(f"the data's classes {bundle.classes} differ from the checkpoint's {ckpt['classes']}")

    ft = None
    if bundle is not None:
        from edgeus.finetune import make_finetuner

        ft = make_finetuner(cfg, bundle, device=device)
    new, report = decompose_model(model, cfg.decompose, image_size=cfg.data.image_size, in_chans=cfg.data.in_chans,
                                  finetune=ft, calib_loader=ft.loaders["train_plain"] if ft is not None else None,
                                  device=device, out_dir=out.parent / f"{out.stem}-work",
                                  channel_multiple=cfg.target.channel_multiple)
    metrics = {}
    if report.get("finetune"):
        metrics = report["finetune"].get("best_metrics") or {}
    from edgeus.data.fingerprint import data_fingerprint

    save_checkpoint(out, new.cpu(), classes=ckpt["classes"], preprocessing=ckpt["preprocessing"], config=to_yaml(cfg),
                    metrics=metrics, extra={"decompose": json.loads(json.dumps(report)), "source": str(src)},
                    data=data_fingerprint(bundle, cfg.data) if bundle is not None else ckpt.get("data"))
    report_path = out.with_suffix(".decompose.json")
    report_path.write_text(json.dumps(report, indent=2))
    print(format_table(report))
    if report.get("finetune"):
        m = report["finetune"]["best_metrics"]
        acc = m.get("accuracy")
        print(f"fine-tuned {report['finetune']['epochs']} epochs: val accuracy "
              f"{acc:.4f}" if isinstance(acc, float) else f"fine-tuned: {m}")
    print(f"checkpoint: {out}\nreport: {report_path}")
    return 0
