"""Which fine-tuning epoch to keep (issue 16.5): val metric alone, agreement with the teacher on all
non-test images, or both (``train.select=val|agreement|val+agreement``)?

On the built-in phantom, for each seed: a teacher is trained, then pruned (``prune.target_macs``) and
fine-tuned with KD from it, once per selection rule. Selection never changes the training
trajectory (the same seed gives the same epochs), so the three students differ only in which epoch
is kept. Reported: each rule's kept epoch and test accuracy / macro-F1 / recall per class per seed,
and, pooled over seeds (same test images), paired bootstrap 95 % intervals of each rule minus ``val``
from :func:`edgeus.stats.compare`. A small val split (``--split``) is the case the rule is for.

    OMP_NUM_THREADS=1 python bench/select_agreement.py            # writes bench/results/select_agreement.{json,md}
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeus.config import compose  # noqa: E402

RULES = ("val", "agreement", "val+agreement")


def settings(args, seed: int, select: str = "val") -> list[str]:
    return [f"data.n_per_class={args.n_per_class}", f"data.image_size={args.image_size}", "data.phantom_size=64",
            f"data.split={args.split}", "data.batch_size=16", f"model.name={args.model}", f"model.width={args.width}",
            f"train.epochs={args.teacher_epochs}", f"train.lr={args.lr}", f"prune.target_macs={args.target_macs}",
            f"prune.finetune_epochs={args.epochs}", "distill.losses=[ce,kd]", f"train.select={select}", f"seed={seed}"]


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--n-per-class", type=int, default=60)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--split", default="[0.6,0.1,0.3]", help="train/val/test fractions (a small val split)")
    ap.add_argument("--model", default="simple_cnn")
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--teacher-epochs", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=10, help="fine-tuning epochs after pruning")
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--target-macs", type=float, default=0.3)
    ap.add_argument("--out", default=str(ROOT / "bench" / "results" / "select_agreement"))
    args = ap.parse_args(argv)

    import torch

    from edgeus.data import build_datasets, build_loaders
    from edgeus.evaluate import compute_metrics, predict_torch
    from edgeus.finetune import make_finetuner
    from edgeus.prune import example_input, prune_model
    from edgeus.stats import compare, fmt_interval
    from edgeus.train.run import train_model

    torch.set_num_threads(1)
    t_start = time.time()
    seeds = [int(s) for s in args.seeds.split(",")]
    runs, pooled = [], {r: [] for r in RULES}
    pooled_y, pooled_t = [], []
    classes = None
    for seed in seeds:
        cfg = compose(settings(args, seed))
        bundle = build_datasets(cfg.data)
        classes = bundle.classes
        test = build_loaders(bundle, cfg.data)["test"]
        with tempfile.TemporaryDirectory() as tmp:
            res, _ = train_model(cfg.model, cfg.data, cfg.train, seed=seed, out_dir=Path(tmp) / "teacher",
                                 bundle=bundle)
        teacher = res.model.eval()
        y, pt = predict_torch(teacher, test)
        pooled_y.append(y)
        pooled_t.append(pt)
        row = {"seed": seed, "n": {"train": len(bundle.train), "val": len(bundle.val), "test": len(bundle.test)},
               "teacher": {"test": _brief(compute_metrics(y, pt, classes)), "val_epoch": res.best_epoch}}
        for rule in RULES:
            c = compose(settings(args, seed, rule))
            ft = make_finetuner(c, bundle, teacher=teacher)
            fin: dict = {}

            def finetune(*a, **k):      # keep the last (final) fine-tuning's full report
                model, rep = ft(*a, **k)
                fin.clear()
                fin.update(rep)
                return model, rep

            t0 = time.time()
            student, _ = prune_model(teacher, c.prune, finetune=finetune, loaders=ft.loaders,
                                     example_inputs=example_input(teacher, args.image_size, 1))
            ys, ps = predict_torch(student, test)
            assert np.array_equal(ys, y)
            pooled[rule].append(ps)
            row[rule] = {"test": _brief(compute_metrics(ys, ps, classes)), "kept_epoch": fin.get("best_epoch"),
                         "kept_val": _brief(fin.get("best_metrics") or {}),
                         "kept_agreement": (fin.get("best_agreement") or {}).get("balanced"),
                         "history": [{"epoch": h["epoch"], "val_macro_f1": h["val"]["macro_f1"],
                                      "val_accuracy": h["val"]["accuracy"],
                                      "agreement": (h.get("agreement") or {}).get("balanced")}
                                     for h in fin.get("history", [])],
                         "seconds": round(time.time() - t0, 1)}
            print(f"seed {seed} {rule:14s} kept epoch {row[rule]['kept_epoch']}  test acc "
                  f"{row[rule]['test']['accuracy']:.3f}  macro-F1 {row[rule]['test']['macro_f1']:.3f}", flush=True)
        runs.append(row)
    y = np.concatenate(pooled_y)
    cmp = {}
    for rule in RULES[1:]:
        cmp[rule] = compare(y, np.concatenate(pooled["val"]), np.concatenate(pooled[rule]), classes, n_boot=2000)
    summary = {rule: {"mean_test_accuracy": float(np.mean([r[rule]["test"]["accuracy"] for r in runs])),
                      "mean_test_macro_f1": float(np.mean([r[rule]["test"]["macro_f1"] for r in runs]))}
               for rule in RULES}
    result = {"settings": vars(args), "seconds": round(time.time() - t_start, 1), "runs": runs, "summary": summary,
              "pooled_vs_val": cmp, "n_pooled": int(len(y)), "torch": torch.__version__}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(result, indent=1, default=float))
    lines = ["# Fine-tuning checkpoint selection: val vs agreement with the teacher (phantom)", "",
             f"Written by `bench/select_agreement.py` ({result['seconds']:.0f} s). Settings: "
             + ", ".join(f"{k}={v}" for k, v in vars(args).items() if k != "out"), "",
             "Each seed: teacher trained, pruned, fine-tuned with KD; the three rules share one training "
             "trajectory and differ only in the kept epoch. Test = the seed's test split (never used to select).", "",
             "| seed | n val | teacher acc | " + " | ".join(f"{r}: epoch, acc, F1" for r in RULES) + " |",
             "|---|---|---|" + "---|" * len(RULES)]
    for r in runs:
        lines.append(f"| {r['seed']} | {r['n']['val']} | {r['teacher']['test']['accuracy']:.3f} | "
                     + " | ".join(f"{r[k]['kept_epoch']}, {r[k]['test']['accuracy']:.3f}, {r[k]['test']['macro_f1']:.3f}"
                                  for k in RULES) + " |")
    lines += ["", "| rule | mean test accuracy | mean test macro-F1 |", "|---|---|---|"]
    for k in RULES:
        lines.append(f"| {k} | {summary[k]['mean_test_accuracy']:.3f} | {summary[k]['mean_test_macro_f1']:.3f} |")
    lines += ["", f"Pooled over seeds ({len(y)} test images), rule minus `val`, paired bootstrap 95 % intervals:", "",
              "| rule | accuracy | macro-F1 | McNemar p | images val right → rule wrong / reverse |", "|---|---|---|---|---|"]
    for k, c in cmp.items():
        iv = c["intervals"]
        lost = sum(v["lost"] for v in c["flips"].values())
        gained = sum(v["gained"] for v in c["flips"].values())
        lines.append(f"| {k} | {fmt_interval(iv['accuracy'])} | {fmt_interval(iv['macro_f1'])} | "
                     f"{c['mcnemar']['p_value']:.3g} | {lost} / {gained} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return result


def _brief(m: dict) -> dict:
    return {k: m[k] for k in ("accuracy", "macro_f1", "recall") if k in m}


if __name__ == "__main__":
    main()
