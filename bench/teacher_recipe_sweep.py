"""Which teacher recipe is worth compressing on BUSI? A sweep of training choices, measured.

    python bench/teacher_recipe_sweep.py --root /path/to/BUSI            # GPU if present, else CPU
    python bench/teacher_recipe_sweep.py --root ... --quick              # 2 configs x 1 seed, 1 epoch
    python bench/teacher_recipe_sweep.py --render-only                   # re-write the .md from the .json

Each configuration is trained with 3 seeds on edgeus's own BUSI split (``data.seed=0``, 60/20/20,
stratified) and scored on val (for choosing) and test (reported, never used to choose). Every run
reports four read-outs of the same training: last-epoch weights or their EMA, each with and without
horizontal-flip test-time augmentation, so those choices cost no extra runs.

Augmentation and mixup run batched on the device (GPU) so that a sweep of 33 runs fits in about three
minutes; GPU seconds are reported as measured, and say nothing about the 2-core CPU where ``profile=full``
trains. Results: ``bench/results/teacher_recipe_sweep.{json,md}``, written by this script.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
OUT = REPO / "bench" / "results"


BASE = dict(model="resnet50", width=0.25, size=128, epochs=60, lr=2e-3, wd=0.05, warmup=3, batch=32,
            aug="edgeus", label_smoothing=0.0, mixup=0.0, ema=0.998, refit=False)
CONFIGS = {
    "rsmas w1.0 112px (profile=full today)": dict(model="rsmas", width=1.0, size=112, lr=1e-3, wd=1e-4, warmup=2),
    "resnet50 w0.25 128px, edgeus aug": {},
    "+ strong US aug": dict(aug="strong"),
    "+ strong aug + label smoothing 0.1": dict(aug="strong", label_smoothing=0.1),
    "+ strong aug + mixup 0.2": dict(aug="strong", mixup=0.2),
    "+ strong aug + LS + mixup": dict(aug="strong", label_smoothing=0.1, mixup=0.2),
    "strong+LS 160px": dict(aug="strong", label_smoothing=0.1, size=160),
    "strong+LS width 0.5": dict(aug="strong", label_smoothing=0.1, width=0.5),
    "strong+LS 100 epochs": dict(aug="strong", label_smoothing=0.1, epochs=100),
    "strong+LS rsmas w0.5 128px": dict(aug="strong", label_smoothing=0.1, model="rsmas", width=0.5),
    "strong+LS refit on train+val": dict(aug="strong", label_smoothing=0.1, refit=True),
}


def _load(root: str, size: int):
    from edgeus.config import compose
    from edgeus.data import build_datasets

    cfg = compose(["data=busi", f"data.root={root}", f"data.image_size={size}", "data.augment=false"])
    b = build_datasets(cfg.data)
    imgs = b.train.images
    split = {s: getattr(b, s).indices for s in ("train", "val", "test")}
    return imgs.pixels, imgs.labels, split, b.classes


def _augment(x, cfg, g):
    """Batched augmentation on the device. x: [B,1,H,W] in [0,1]."""
    import torch
    import torch.nn.functional as F

    B = x.shape[0]
    dev = x.device
    u = lambda *s: torch.rand(*s, generator=g, device=dev)
    if cfg["aug"] == "edgeus":      # edgeus.data.transforms.Augment: rotation 15, flip, brightness 0.15, scale 0.1
        ang = (u(B) * 2 - 1) * math.radians(15)
        s = 1 + (u(B) * 2 - 1) * 0.1
        tx = ty = torch.zeros(B, device=dev)
    else:                           # strong: rotation 20, zoom 0.8-1.25, shift 10 %
        ang = (u(B) * 2 - 1) * math.radians(20)
        s = torch.exp((u(B) * 2 - 1) * math.log(1.25))
        tx, ty = (u(B) * 2 - 1) * 0.1, (u(B) * 2 - 1) * 0.1
    flip = torch.where(u(B) < 0.5, -1.0, 1.0)
    cos, sin = torch.cos(ang) / s, torch.sin(ang) / s
    theta = torch.stack([torch.stack([cos * flip, -sin, tx], 1), torch.stack([sin * flip, cos, ty], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    if cfg["aug"] == "edgeus":
        x = x * (1 + (u(B, 1, 1, 1) * 2 - 1) * 0.15)
    else:                           # brightness, contrast, gamma (TGC / gain), multiplicative speckle
        x = x * (1 + (u(B, 1, 1, 1) * 2 - 1) * 0.2)
        m = x.mean((2, 3), keepdim=True)
        x = (x - m) * (1 + (u(B, 1, 1, 1) * 2 - 1) * 0.2) + m
        x = x.clamp(0, 1) ** torch.exp((u(B, 1, 1, 1) * 2 - 1) * math.log(1.4))
        sp = torch.randn(x.shape, generator=g, device=dev) * (u(B, 1, 1, 1) * 0.15)
        x = x * (1 + sp)
    return x.clamp(0, 1)


def run_one(job: dict) -> dict:
    try:
        return _run_one(job)
    except Exception as e:  # one failed run must not lose the others' results
        import traceback

        return {"name": job["name"], "seed": job["seed"], "error": f"{type(e).__name__}: {e}",
                "traceback": traceback.format_exc()}


def _run_one(job: dict) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    from edgeus.models import create_model
    from edgeus.models.profile import count_macs

    cfg, seed, root = job["cfg"], job["seed"], job["root"]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // max(1, job["workers"])))
    pix, labels, split, classes = _load(root, cfg["size"])
    mean, std = 0.5, 0.25                                    # edgeus's defaults (data.mean / data.std)
    X = torch.from_numpy(pix.astype(np.float32) / 255.0)[:, None].to(dev)
    Y = torch.from_numpy(labels).to(dev)
    tr = np.concatenate([split["train"], split["val"]]) if cfg["refit"] else split["train"]
    k = len(classes)
    counts = np.bincount(labels[tr], minlength=k).astype(float)
    w = counts.sum() / (k * counts)
    w = torch.tensor(w / w.mean(), dtype=torch.float32, device=dev)
    torch.manual_seed(seed)
    model = create_model(cfg["model"], num_classes=k, in_chans=1, width=cfg["width"]).to(dev)
    macs = count_macs(copy.deepcopy(model).cpu(), cfg["size"], 1)
    ema = torch.optim.swa_utils.AveragedModel(model, multi_avg_fn=torch.optim.swa_utils.get_ema_multi_avg_fn(cfg["ema"]))
    opt = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["wd"])
    steps_per_epoch = max(1, len(tr) // cfg["batch"])
    total = steps_per_epoch * cfg["epochs"]
    warm = cfg["warmup"] * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / max(1, warm) if s < warm else 0.5 * (1 + math.cos(math.pi * (s - warm) / max(1, total - warm))))
    g = torch.Generator(device=dev).manual_seed(seed)
    rng = np.random.default_rng(seed)
    t0 = time.time()
    model.train()
    for _ in range(cfg["epochs"]):
        order = rng.permutation(tr)
        for b in range(steps_per_epoch):
            idx = torch.from_numpy(order[b * cfg["batch"]:(b + 1) * cfg["batch"]]).to(dev)
            x = (_augment(X[idx], cfg, g) - mean) / std
            y = F.one_hot(Y[idx], k).float()
            if cfg["label_smoothing"]:
                y = y * (1 - cfg["label_smoothing"]) + cfg["label_smoothing"] / k
            if cfg["mixup"] and rng.random() < 0.5:
                lam = float(rng.beta(cfg["mixup"], cfg["mixup"]))
                perm = torch.randperm(len(idx), generator=g, device=dev)
                x, y = lam * x + (1 - lam) * x[perm], lam * y + (1 - lam) * y[perm]
            logp = F.log_softmax(model(x), 1)
            # class-weighted soft-target cross-entropy (edgeus's data.balance=weights)
            loss = (-(y * logp) * w).sum(1).sum() / (y * w).sum()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            ema.update_parameters(model)
    train_s = time.time() - t0
    # BN statistics of the EMA copy from the (un-augmented) training images
    ema_model = ema.module
    with torch.no_grad():
        ema_model.train()
        for mod in ema_model.modules():
            if isinstance(mod, torch.nn.modules.batchnorm._BatchNorm):
                mod.reset_running_stats()
                mod.momentum = None
        for b in range(0, len(tr), 64):
            ema_model((X[torch.from_numpy(tr[b:b + 64]).to(dev)] - mean) / std)

    @torch.no_grad()
    def probs(m, s, tta):
        m.eval()
        idx = torch.from_numpy(split[s]).to(dev)
        x = (X[idx] - mean) / std
        p = torch.softmax(m(x), 1)
        if tta:
            p = (p + torch.softmax(m(torch.flip(x, dims=[3])), 1)) / 2
        return p.cpu().numpy()

    out = {"name": job["name"], "seed": seed, "classes": list(classes), "train_s": round(train_s, 1), "macs": int(macs),
           "n_train": int(len(tr)), "epochs": cfg["epochs"], "readouts": {}}
    for which, m in (("last", model), ("ema", ema_model)):
        for tta in (False, True):
            r = {}
            for s in ("val", "test"):
                p = probs(m, s, tta)
                y = labels[split[s]]
                pred = p.argmax(1)
                rec = {c: float((pred[y == i] == i).mean()) for i, c in enumerate(classes)}
                r[s] = {"accuracy": float((pred == y).mean()), "recall": rec,
                        "macro_recall": float(np.mean(list(rec.values()))), "n": int(len(y)),
                        "probs": p.round(5).tolist(), "labels": y.tolist()}
            out["readouts"][f"{which}{'+tta' if tta else ''}"] = r
    return out


def render(doc: dict, path: Path) -> None:
    """The markdown table of a sweep's JSON (``--render-only`` re-renders a stored sweep)."""
    table = doc["table"]
    n_test = table[0]["readouts"]["last"]["test"]["n"]
    seeds = doc.get("seeds") or table[0]["runs"]
    gpu = doc["device"] != "cpu"
    lines = [f"# Teacher recipe sweep on BUSI (developer split, split seed 0, {seeds} training seeds)", "",
             f"Trained on {doc['device']}; {round(doc['seconds'])} s for {sum(r['runs'] for r in table)} runs. "
             f"Test images: {n_test} (one image = {100 / max(1, n_test):.1f} points). Choose on val; test is "
             "reported, never used to choose. Refit rows train on train+val, so their val column is not a hold-out.",
             ("GPU seconds are per training run on this GPU, with several runs sharing it; they say nothing about the "
              "2-core CPU, where `profile=full` must train (a MACs-based CPU estimate was tried and dropped: it put the "
              "full-width RSMAS-Net at 98 min against 10-19 min measured)." if gpu else
              f"CPU seconds are per training run with one thread, {doc.get('workers', 1)} runs side by side on "
              f"{os.cpu_count()} cores."), "",
             f"| config | {'GPU' if gpu else 'CPU'} s / run | read-out | val acc | test acc (mean / min) | test malignant recall | "
             "ensemble of seeds: test acc / malignant |", "|---|---|---|---|---|---|---|"]
    for row in table:
        for ro, agg in row["readouts"].items():
            v, t = agg["val"], agg["test"]
            em = t["ensemble_malignant_recall"]
            lines.append(f"| {row['name']} | {row['gpu_train_s']} | {ro} | {v['accuracy_mean']:.3f} | "
                         f"{t['accuracy_mean']:.3f} / {t['accuracy_min']:.3f} | {t['malignant_recall_mean']:.3f} | "
                         f"{t['ensemble_accuracy']:.3f} / {'–' if em is None else f'{em:.3f}'} |")
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default="/work/shared/data/busi")
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--workers", type=int, default=0, help="parallel runs (default: 8 on a GPU, 1 on a CPU)")
    ap.add_argument("--quick", action="store_true", help="2 configs, 1 seed, 1 epoch at 64 px: a smoke test")
    ap.add_argument("--only", nargs="*", help="config names to run (default: all)")
    ap.add_argument("--render-only", action="store_true", help="re-write the .md from the stored .json")
    ap.add_argument("--stem", default="teacher_recipe_sweep", help="results file name under bench/results "
                    "(a second sweep beside the first: --stem <name> --only ...)")
    args = ap.parse_args(argv)
    if args.render_only:
        render(json.loads((OUT / f"{args.stem}.json").read_text()), OUT / f"{args.stem}.md")
        return 0
    if not Path(args.root).is_dir():
        print(f"SKIP: no BUSI folder at {args.root}")
        return 0
    import numpy as np
    import torch

    configs = {n: {**BASE, **c} for n, c in CONFIGS.items() if not args.only or n in args.only}
    seeds = list(range(1 if args.quick else args.seeds))
    if args.quick:
        configs = {n: {**c, "epochs": 1, "size": 64} for n, c in list(configs.items())[1:3]}
    workers = args.workers or (8 if torch.cuda.is_available() else 1)
    jobs = [{"name": n, "cfg": c, "seed": s, "root": args.root, "workers": workers} for n, c in configs.items() for s in seeds]
    t0 = time.time()
    if workers > 1:
        with mp.get_context("spawn").Pool(workers) as pool:
            results = pool.map(run_one, jobs)
    else:
        results = [run_one(j) for j in jobs]
    failed = [r for r in results if "error" in r]
    for r in failed:
        print(f"FAILED {r['name']} seed {r['seed']}: {r['error']}\n{r['traceback']}", file=sys.stderr)
    results = [r for r in results if "error" not in r]
    configs = {n: c for n, c in configs.items() if any(r["name"] == n for r in results)}
    device = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    table = []
    for name, c in configs.items():
        rs = [r for r in results if r["name"] == name]
        row = {"name": name, "config": c, "runs": len(rs),
               "gpu_train_s": round(float(np.mean([r["train_s"] for r in rs])), 1), "readouts": {}}
        for ro in rs[0]["readouts"]:
            agg = {}
            for s in ("val", "test"):
                acc = [r["readouts"][ro][s]["accuracy"] for r in rs]
                mal = [r["readouts"][ro][s]["recall"].get("malignant", float("nan")) for r in rs]
                agg[s] = {"accuracy_mean": float(np.mean(acc)), "accuracy_min": float(np.min(acc)),
                          "malignant_recall_mean": float(np.mean(mal)), "n": rs[0]["readouts"][ro][s]["n"]}
            # ensemble of the seeds (averaged probabilities): what teacher.ensemble=N would give
            for s in ("val", "test"):
                p = np.mean([np.asarray(r["readouts"][ro][s]["probs"]) for r in rs], 0)
                y = np.asarray(rs[0]["readouts"][ro][s]["labels"])
                pred = p.argmax(1)
                agg[s]["ensemble_accuracy"] = float((pred == y).mean())
                mi = rs[0]["classes"].index("malignant") if "malignant" in rs[0]["classes"] else None
                agg[s]["ensemble_malignant_recall"] = None if mi is None else float((pred[y == mi] == mi).mean())
            row["readouts"][ro] = agg
        table.append(row)
    for r in results:
        for ro in r["readouts"].values():
            for s in ro.values():
                s.pop("probs"), s.pop("labels")
    OUT.mkdir(parents=True, exist_ok=True)
    stem = args.stem + ("_quick" if args.quick else "")
    doc = {"device": device, "seconds": round(time.time() - t0, 1), "seeds": len(seeds), "workers": workers,
           "table": table, "runs": results}
    (OUT / f"{stem}.json").write_text(json.dumps(doc, indent=1))
    render(doc, OUT / f"{stem}.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
