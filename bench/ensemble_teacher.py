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
    python bench/ensemble_teacher.py --set train.epochs=30 --seed 1
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
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="extra key=value overrides")
    ap.add_argument("--critical", default="malignant")
    ap.add_argument("--results", default=str(HERE / "results" / "ensemble_teacher"))
    ap.add_argument("--work", default=None, help="checkpoint folder (default: a temporary one)")
    args = ap.parse_args(argv)
    if not Path(args.root).is_dir():
        print(f"BUSI not found at {args.root}; pass --root", file=sys.stderr)
        return 2

    import torch

    from edgeus.config import compose
    from edgeus.data import build_datasets, build_loaders
    from edgeus.evaluate import compute_metrics, predict_torch
    from edgeus.finetune import make_finetuner
    from edgeus.models.ensemble import student_member
    from edgeus.prune import example_input, prune_model
    from edgeus.stats import compare, fmt_interval
    from edgeus.train.ensemble import train_ensemble

    t_start = time.time()
    overrides = [*SETTINGS, f"data.root={args.root}", f"seed={args.seed}", *args.set]
    cfg = compose(overrides)
    bundle = build_datasets(cfg.data)
    classes = bundle.classes
    crit = args.critical if args.critical in classes else classes[-1]
    test = build_loaders(bundle, cfg.data)["test"]
    tmp = tempfile.TemporaryDirectory() if args.work is None else None
    work = Path(args.work or tmp.name)
    t0 = time.time()
    ens, ens_report = train_ensemble(cfg.teacher, cfg.model, cfg.data, cfg.train, seed=int(cfg.seed),
                                     out_dir=work / "teacher", bundle=bundle)
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
        print(f"student from {name} teacher: test acc {(ps.argmax(1) == y).mean():.3f} ({timings[name]} s)", flush=True)

    def brief(p):
        m = compute_metrics(y, p, classes)
        return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], f"recall_{crit}": m["recall"][crit],
                f"{crit}_found": int(((p.argmax(1) == classes.index(crit)) & (y == classes.index(crit))).sum()),
                f"{crit}_n": int((y == classes.index(crit)).sum())}

    models = {"teacher member 0 (single)": brief(p_single), "teacher member 1": brief(p_m1),
              "teacher ensemble (2)": brief(p_ens), "student from single": brief(students["single"]["prob"]),
              "student from ensemble": brief(students["ensemble"]["prob"])}
    comparisons = {
        "student(ensemble) - student(single)": compare(y, students["single"]["prob"], students["ensemble"]["prob"],
                                                       classes),
        "ensemble teacher - single teacher": compare(y, p_single, p_ens, classes),
        "student(single) - single teacher": compare(y, p_single, students["single"]["prob"], classes),
        "student(ensemble) - ensemble teacher": compare(y, p_ens, students["ensemble"]["prob"], classes),
    }
    result = {"settings": overrides, "seconds": round(time.time() - t_start, 1), "teacher_seconds": round(teacher_s, 1),
              "student_seconds": timings, "n": {"train": len(bundle.train), "val": len(bundle.val),
                                                "test": len(bundle.test)},
              "critical": crit, "models": models, "ensemble_report": _jsonable(ens_report),
              "students": {k: {kk: vv for kk, vv in v.items() if kk != "prob"} for k, v in students.items()},
              "comparisons": comparisons, "torch": torch.__version__, "threads": torch.get_num_threads()}
    out = Path(args.results)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps(_jsonable(result), indent=1))
    lines = ["# Ensemble teacher vs single teacher for the distilled student (BUSI)", "",
             f"Written by `bench/ensemble_teacher.py` in {result['seconds']:.0f} s ({torch.get_num_threads()} threads). "
             f"Settings: `{' '.join(o for o in overrides if not o.startswith('data.root'))}`. "
             f"Split: {result['n']['train']} train / {result['n']['val']} val / {result['n']['test']} test images.", "",
             "Both students: member 0 pruned to the same MACs, same batches, KD from member 0 alone or from the "
             "2-member ensemble (averaged logits); same single-model cost.", "",
             f"| model | test accuracy | macro-F1 | {crit} recall |", "|---|---|---|---|"]
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
                     f"{fmt_interval(iv[f'recall/{crit}'])} | {c['mcnemar']['p_value']:.3g} | {fl['lost']} / {fl['gained']} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    if tmp is not None:
        tmp.cleanup()
    return 0


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
