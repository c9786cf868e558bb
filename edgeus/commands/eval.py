"""Evaluate a checkpoint (.pt) or ONNX model on a split of a dataset.

    edgeus eval runs/train-x/best.pt [data=phantom] [eval.split=test] [eval.out=metrics.json]
    edgeus eval runs/<run>/student.int8.onnx data=busi data.root=/data/BUSI

Prints accuracy, per-class precision / recall / F1, macro-F1, one-vs-rest AUC, the confusion
matrix and the expected calibration error, and writes them as JSON (eval.out, default beside the
model). The data settings (size, channels, normalisation) default to the ones stored in the
checkpoint, so the model sees what it was trained on.
"""
import json
from pathlib import Path

from edgeus.errors import EdgeusError

USAGE = "<checkpoint.pt | model.onnx> [data=...] [eval.split=test] [eval.out=FILE]"


def run(cfg, args):
    from edgeus.data import build_datasets, build_loaders
    from edgeus.evaluate import evaluate_model, format_metrics
    from edgeus.train.checkpoint import load_checkpoint
    from edgeus.train.run import resolve_device

    path = args[0] if args else cfg.eval.checkpoint
    if not path:
        raise EdgeusError("give the model to evaluate: edgeus eval <checkpoint.pt | model.onnx>")
    path = Path(path)
    if not path.is_file():
        raise EdgeusError(f"model file not found: {path}")
    model, classes, pre = str(path), None, None
    if path.suffix in (".pt", ".pth"):
        model, ckpt = load_checkpoint(path)
        classes, pre = ckpt["classes"], ckpt["preprocessing"]
    else:
        import onnx

        meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
        classes = json.loads(meta["classes"]) if "classes" in meta else None
        pre = json.loads(meta["preprocessing"]) if "preprocessing" in meta else None
    if pre:  # the model's own preprocessing wins over the defaults
        cfg.data.image_size, cfg.data.in_chans = int(pre["image_size"]), int(pre["in_chans"])
        cfg.data.mean, cfg.data.std = list(pre["mean"]), list(pre["std"])
    bundle = build_datasets(cfg.data)
    if classes is not None and list(classes) != bundle.classes:
        raise EdgeusError(f"{path} predicts classes {list(classes)}, the data has {bundle.classes}")
    loader = build_loaders(bundle, cfg.data)[cfg.eval.split if cfg.eval.split != "train" else "train_plain"]
    metrics = evaluate_model(model, loader, bundle.classes, resolve_device(cfg.device), int(cfg.eval.ece_bins))
    print(format_metrics(metrics, f"{path.name} on the {cfg.eval.split} split of {bundle.name}:"))
    out = Path(cfg.eval.out or cfg.out or path.with_suffix(f".{cfg.eval.split}.metrics.json"))
    out.write_text(json.dumps(metrics, indent=1))
    print(f"metrics written to {out}")
    return 0
