"""Does a 2-teacher ensemble help the distilled student? (issue 16.1, ``teacher.ensemble=N``)

On BUSI (``--root``, default ``../shared/data/busi``) at a small, fast setting (RSMAS-Net width 0.25,
96 px, 20 teacher epochs, one seed): two teachers are trained (seeds ``seed`` and ``seed+1``;
member 0 is exactly the single teacher of ``seed``). The same student budget is then spent twice:
member 0 is pruned (``prune.target_macs``) and fine-tuned with KD, once from member 0 alone (the
single teacher) and once from the ensemble (averaged logits). Both students start from the same
pruned weights, train on the same batches and differ only in the teacher's logits.

Reported on the test split (never used for training or selection): each teacher's and student's
accuracy and malignant recall, and paired bootstrap 95 % intervals (``edgeus.stats.compare``) of
student(ensemble) minus student(single), and of each student against its own teacher.

    OMP_NUM_THREADS=2 python bench/ensemble_teacher.py          # writes bench/results/ensemble_teacher.{json,md}
    python bench/ensemble_teacher.py --seeds 0,1,2 --work /tmp/ens   # pooled over seeds; teachers kept in --work
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

SETTINGS = ["recipe=rsmas_int8", "data=busi", "model.name=rsmas", "model.width=0.25", "data.image_size=96",
            "train.epochs=20", "train.lr=0.002", "train.warmup_epochs=1", "prune.target_macs=0.1",
            "prune.finetune_epochs=20", "distill.losses=[ce,kd]", "teacher.ensemble=2"]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", default=str(HERE.parent.parent / "shared" / "data" / "busi"))
    ap.add_argument("--seeds", default="0", help="comma-separated training seeds (pooled at the end)")
    ap.add_argument("--set", action="append", default=[], help="extra key=value overrides")
    ap.add_argument("--critical", default="malignant")
    ap.add_argument("--results", default=str(HERE / "results" / "ensemble_teacher"))
    ap.add_argument("--work", default=None, help="checkpoint folder (default: a temporary one)")
    args = ap.parse_args(argv)
    if not Path(args.root).is_dir():
        print(f"BUSI not found at {args.root}; pass --root", file=sys.stderr)
        return 2

    import logging

    import torch

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from edgeus.config import compose
    from edgeus.data import build_datasets, build_loaders
    from edgeus.evaluate import predict_torch
    from edgeus.finetune import make_finetuner
    from edgeus.models.ensemble import student_member
    from edgeus.prune import example_input, prune_model
    from edgeus.stats import compare, fmt_interval
    from edgeus.train.ensemble import train_ensemble

    t_start = time.time()
    seeds = [int(x) for x in str(args.seeds).split(",")]
    base = [*SETTINGS, f"data.root={args.root}", *args.set]
    tmp = tempfile.TemporaryDirectory() if args.work is None else None
    work = Path(args.work or tmp.name)
    per_seed, pooled = [], {k: [] for k in ("y", "single", "m1", "ens", "s_single", "s_ens")}
    classes = crit = None
    for seed in seeds:
        cfg = compose([*base, f"seed={seed}"])
        bundle = build_datasets(cfg.data)
        classes = bundle.classes
        crit = args.critical if args.critical in classes else classes[-1]
        test = build_loaders(bundle, cfg.data)["test"]
        t0 = time.time()
        ens, ens_report = train_ensemble(cfg.teacher, cfg.model, cfg.data, cfg.train, seed=seed,
                                         out_dir=work / f"seed{seed}" / "teacher", bundle=bundle)
        teacher_s = time.time() - t0
        single = ens.members[0].eval()
        y, p_single = predict_torch(single, test)
        _, p_ens = predict_torch(ens, test)
        _, p_m1 = predict_torch(ens.members[1].eval(), test)
        students, timings = {}, {}
        for name, teacher in (("single", single), ("ensemble", ens)):
            t0 = time.time()
            ft = make_finetuner(cfg, bundle, teacher=teacher)
            start = student_member(ens, 0)                   # the same start for both students
            student, rep = prune_model(start, cfg.prune, finetune=ft, loaders=ft.loaders,
                                       example_inputs=example_input(start, cfg.data.image_size, cfg.data.in_chans),
                                       channel_multiple=cfg.target.channel_multiple)
            ys, ps = predict_torch(student, test)
            assert np.array_equal(ys, y)
            students[name] = {"prob": ps, "prune": _jsonable(rep.get("after")),
                              "finetune": _jsonable((rep.get("structured") or {}).get("finetune"))}
            timings[name] = round(time.time() - t0, 1)
            print(f"seed {seed}: student from {name} teacher: test acc {(ps.argmax(1) == y).mean():.3f} "
                  f"({timings[name]} s)", flush=True)
        for k, v in (("y", y), ("single", p_single), ("m1", p_m1), ("ens", p_ens),
                     ("s_single", students["single"]["prob"]), ("s_ens", students["ensemble"]["prob"])):
            pooled[k].append(v)
        probs = {"single": p_single, "m1": p_m1, "ens": p_ens, "s_single": students["single"]["prob"],
                 "s_ens": students["ensemble"]["prob"]}
        per_seed.append({"_files": [str(i) for i in bundle.ids("test")],
                         "seed": seed, "teacher_seconds": round(teacher_s, 1), "student_seconds": timings,
                         "n": {"train": len(bundle.train), "val": len(bundle.val), "test": len(bundle.test)},
                         "models": {MODELS[k]: _brief(y, p, classes, crit) for k, p in probs.items()},
                         "comparisons": {name: compare(y, probs[a], probs[b], classes) for name, (a, b) in PAIRS.items()},
                         "ensemble_report": _jsonable(ens_report),
                         "students": {k: {kk: vv for kk, vv in v.items() if kk != "prob"} for k, v in students.items()}})
    y = np.concatenate(pooled["y"])
    pooled_ids = [f for r in per_seed for f in r.pop("_files")]
    cat = {k: np.concatenate(v) for k, v in pooled.items() if k != "y"}
    pooled_models = {MODELS[k]: _brief(y, p, classes, crit) for k, p in cat.items()}
    pooled_cmp = {name: compare(y, cat[a], cat[b], classes) for name, (a, b) in PAIRS.items()}
    result = {"settings": base, "seeds": seeds, "seconds": round(time.time() - t_start, 1), "critical": crit,
              "per_seed": per_seed, "pooled": {"n": int(len(y)), "models": pooled_models, "comparisons": pooled_cmp},
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(_jsonable(result), indent=1))
    n = per_seed[0]["n"]
    lines = ["# Ensemble teacher vs single teacher for the distilled student (BUSI)", "",
             f"Written by `bench/ensemble_teacher.py` in {result['seconds']:.0f} s ({torch.get_num_threads()} thread(s)), "
             f"seeds {seeds}. Settings: `{' '.join(o for o in base if not o.startswith('data.root'))}`. "
             f"Split: {n['train']} train / {n['val']} val / {n['test']} test images.", "",
             "Per seed: two teachers (seeds s and s+1; member 0 is the single teacher of seed s). Both students: "
             "member 0 pruned to the same MACs, same batches, KD from member 0 alone or from the 2-member ensemble "
             "(averaged logits); the same single-model cost. Test images are never used to train or select.", ""]
    for models, comparisons, title in ([(r["models"], r["comparisons"], f"Seed {r['seed']}") for r in per_seed]
                                       + [(pooled_models, pooled_cmp,
                                           f"Pooled over seeds {seeds} ({len(y)} seed-image pairs)")]):
        if title.startswith("Pooled") and len(set(pooled_ids)) < len(y):
            title += (" (the split does not depend on the training seed: the same test images recur, so these "
                      "intervals treat correlated pairs as independent and are somewhat too narrow)")
        lines += [f"## {title}", "", f"| model | test accuracy | macro-F1 | {crit} recall |", "|---|---|---|---|"]
        for name, m in models.items():
            lines.append(f"| {name} | {m['accuracy']:.3f} | {m['macro_f1']:.3f} | {m[f'recall_{crit}']:.3f} "
                         f"({m[f'{crit}_found']}/{m[f'{crit}_n']}) |")
        lines += ["", "Paired bootstrap 95 % intervals (second minus first model named; same test images), exact McNemar:",
                  "", f"| comparison | accuracy | macro-F1 | {crit} recall | McNemar p | {crit} lost / gained |",
                  "|---|---|---|---|---|---|"]
        for name, c in comparisons.items():
            iv = c["intervals"]
            fl = c["flips"][crit]
            lines.append(f"| {name} | {fmt_interval(iv['accuracy'])} | {fmt_interval(iv['macro_f1'])} | "
                         f"{fmt_interval(iv[f'recall/{crit}'])} | {c['mcnemar']['p_value']:.3g} | "
                         f"{fl['lost']} / {fl['gained']} |")
        lines.append("")
    out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    if tmp is not None:
        tmp.cleanup()
    return 0


MODELS = {"single": "teacher member 0 (single)", "m1": "teacher member 1", "ens": "teacher ensemble (2)",
          "s_single": "student from single", "s_ens": "student from ensemble"}
PAIRS = {"student(ensemble) - student(single)": ("s_single", "s_ens"),
         "ensemble teacher - single teacher": ("single", "ens"),
         "student(single) - single teacher": ("single", "s_single"),
         "student(ensemble) - ensemble teacher": ("ens", "s_ens")}


def _brief(y, p, classes, crit) -> dict:
    from edgeus.evaluate import compute_metrics

    m = compute_metrics(y, p, classes)
    c = classes.index(crit)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], f"recall_{crit}": m["recall"][crit],
            f"{crit}_found": int(((p.argmax(1) == c) & (y == c)).sum()), f"{crit}_n": int((y == c).sum())}


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if hasattr(x, "item") and callable(x.item):
        try:
            return x.item()
        except (ValueError, RuntimeError):
            return str(x)
    return x


if __name__ == "__main__":
    sys.exit(main())
