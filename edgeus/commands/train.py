"""Train a classifier on a dataset and keep the best checkpoint by a validation metric.

    edgeus train data=phantom model.name=simple_cnn train.epochs=8
    edgeus train data=busi data.root=/data/BUSI model.name=rsmas model.pretrained=/w/resnet50.pth
    torchrun --nproc_per_node=2 -m edgeus.cli train ...      (data-parallel, same arguments)

AdamW (train.lr=1e-4 by default, as in the RSMAS-Net paper), class-weighted cross-entropy
(data.balance=weights | sampler | none), cosine schedule, best checkpoint on train.metric
(macro_f1 by default), seeded (seed=0). Re-running the same command with the same train.out
resumes from its last epoch. Writes <out>/best.pt, last.pt, config.yaml, history.json.
"""
from edgeus.evaluate import compute_metrics, format_metrics, predict_torch
from edgeus.train import distributed as D

USAGE = "[data=...] [model.name=...] [train.epochs=N] [train.out=DIR] [key=value ...]"


def run(cfg, args):
    from edgeus.data import build_loaders
    from edgeus.train.run import resolve_device, train_from_config

    if args:
        raise SystemExit(f"edgeus train takes no positional arguments (got {args}); use key=value")
    result, bundle = train_from_config(cfg)
    if D.is_main():
        loaders = build_loaders(bundle, cfg.data)
        y, p = predict_torch(result.model, loaders["test"], resolve_device(cfg.device))
        test = compute_metrics(y, p, bundle.classes)
        print(format_metrics(test, f"test split of {bundle.name} (best epoch {result.best_epoch}):"))
        print(f"checkpoint: {result.best_path}")
    D.barrier()          # every rank leaves together: no rank tears the process group down under another
    D.cleanup()
    return 0
