"""Does distillation help? The same student trained with plain cross-entropy vs with KD, DKD and
KD + FitNets from the same teacher, same epochs, several seeds, on the phantom and on BUSI.

    python bench/distill_compare.py                      # phantom + BUSI (if present), 3 seeds
    python bench/distill_compare.py --datasets phantom --seeds 3 --epochs 12
    python bench/distill_compare.py --quick              # smoke test (tiny, seconds)

For each dataset a teacher (``--teacher``, default ``simple_cnn`` at width 1.0, 0.29 M params) is
trained once with class-weighted cross-entropy and augmentation, and cached under ``--cache``
(reused on re-runs with the same settings). Then, seed by seed, every method trains a fresh student
(``--student``, default ``dsc_sta`` at width 0.25, 0.056 M params) from the same initialisation (``torch.manual_seed(seed)``) for the same
number of epochs at the same learning rate, keeping the best epoch by validation macro-F1 (as
``edgeus.train.fit`` does), and is scored on the held-out test split: accuracy, macro-F1 and the
recall of the positive class (``malignant``). Methods run interleaved (all methods of seed 0,
then of seed 1, ...) so that load on the shared machine hits them alike.

The train split is not augmented here (``data.augment=false``): every method sees the same images,
and the teacher's outputs are computed once per image (``distill.cache_teacher=true``) — without
that the teacher's forward pass would dominate the run time on 2 CPU cores. The loss weights are
edgeus's defaults (nothing tuned on these data).

Why not an RSMAS teacher by default: on this 2-core CPU, from scratch at 64 px, ``rsmas`` at width
0.125 trained 12 epochs reached 0.44 test accuracy on BUSI (below the majority class) in ~4 min, and
``resnet50`` at width 0.25 trained 10 epochs 0.39 in ~10 min, while ``simple_cnn`` at width 1.0
reached 0.67 in 40 epochs and ~2 min: a teacher that has not learnt the task has nothing to
distil. ``--teacher rsmas:0.25 --teacher-epochs 60`` runs the same comparison with RSMAS where
there is time (or a GPU).

Writes bench/results/distill_compare.json and .md (mean, sample std, paired difference to CE).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgeus.config import compose  # noqa: E402
from edgeus.data import build_datasets, build_loaders  # noqa: E402
from edgeus.distill import distill  # noqa: E402
from edgeus.evaluate import compute_metrics, predict_torch  # noqa: E402
from edgeus.models import create_model  # noqa: E402
from edgeus.models.profile import count_params  # noqa: E402
from edgeus.train import Supervised, fit  # noqa: E402
from edgeus.train.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

RESULTS = ROOT / "bench" / "results"
NAME = "distill_compare"
POSITIVE = "malignant"
METHODS = {
    "ce": None,
    "kd": ["ce", "kd"],
    "dkd": ["ce", "dkd"],
    "kd+fitnet": ["ce", "kd", "fitnet"],
}
METRICS = ("accuracy", "macro_f1", f"recall_{POSITIVE}")


def _per_ds(value: str, ds: str) -> int:
    """'8' or 'busi=8,phantom=15' -> the number for ``ds``."""
    if "=" not in value:
        return int(value)
    table = dict(item.split("=", 1) for item in value.split(","))
    return int(table[ds])


def _spec(s: str) -> tuple[str, float]:
    name, _, width = s.partition(":")
    return name, float(width or 1.0)


def _scores(model, loader, classes) -> dict:
    y, p = predict_torch(model, loader, "cpu")
    m = compute_metrics(y, p, classes)
    return {"accuracy": m["accuracy"], "macro_f1": m["macro_f1"], f"recall_{POSITIVE}": m["recall"][POSITIVE],
            "recall": m["recall"], "confusion": m["confusion"]}


def _overrides(ds: str, a) -> list[str]:
    o = [f"data={ds}", f"data.image_size={a.image_size}", "data.augment=false", f"data.batch_size={a.batch_size}",
         f"train.lr={a.lr}", "train.resume=false", "train.metric=macro_f1", "data.seed=0"]
    if ds == "busi":
        o.append(f"data.root={a.busi_root}")
    if ds == "phantom":
        o += [f"data.n_per_class={a.phantom_n}", f"data.phantom_size={a.phantom_size}"]
    if a.max_steps:
        o.append(f"train.max_steps_per_epoch={a.max_steps}")
    return o


def _teacher(ds, over, cfg, bundle, a, log) -> tuple[torch.nn.Module, dict]:
    name, width = _spec(a.teacher)
    epochs = _per_ds(a.teacher_epochs, ds)
    key = f"teacher-{ds}-{name}-w{width:g}-{a.image_size}px-e{epochs}-lr{a.teacher_lr:g}-bs{a.batch_size}-aug-{bundle.fingerprint()}"
    path = Path(a.cache) / f"{key}.pt"
    t0 = time.time()
    if path.is_file():
        model, ckpt = load_checkpoint(path)
        info = dict(ckpt["extra"])
        info["cached"] = str(path)
        log(f"  teacher {name}:{width:g} loaded from {path}")
    else:
        torch.manual_seed(1000)
        model = create_model(name, num_classes=len(bundle.classes), in_chans=bundle.preprocessing["in_chans"],
                             width=width)
        # the teacher is trained once, with augmentation (the students' comparison is without)
        tcfg = compose(list(over) + ["data.augment=true"])
        tbundle = build_datasets(tcfg.data)
        assert tbundle.fingerprint() == bundle.fingerprint()
        tloaders = build_loaders(tbundle, tcfg.data)
        res = fit(Supervised(model, bundle.class_weights()), tloaders, cfg.train, None, classes=bundle.classes,
                  preprocessing=bundle.preprocessing, desc=f"teacher {ds}", seed=1000,
                  epochs=epochs, lr=a.teacher_lr)
        model = res.model
        info = {"train_seconds": round(time.time() - t0, 1), "best_epoch": res.best_epoch}
        save_checkpoint(path, model, classes=bundle.classes, preprocessing=bundle.preprocessing, extra=info)
        info = dict(info, cached=None)
        log(f"  teacher {name}:{width:g} trained in {time.time() - t0:.0f}s (best epoch {res.best_epoch})")
    model.eval()
    info.update({"name": name, "width": width, "params": count_params(model), "epochs": epochs,
                 "lr": a.teacher_lr})
    plain = build_loaders(bundle, cfg.data)
    info.update({"test": _scores(model, plain["test"], bundle.classes), "val": _scores(model, plain["val"], bundle.classes)})
    return model, info


def _run_one(method, seed, teacher, cfg_over, bundle, loaders, a, epochs, caches) -> dict:
    name, width = _spec(a.student)
    torch.manual_seed(seed)
    student = create_model(name, num_classes=len(bundle.classes), in_chans=bundle.preprocessing["in_chans"],
                           width=width)
    t0 = time.time()
    if METHODS[method] is None:
        cfg = compose(cfg_over + [f"seed={seed}"])
        res = fit(Supervised(student, bundle.class_weights()), loaders, cfg.train, None, classes=bundle.classes,
                  preprocessing=bundle.preprocessing, desc=f"ce s{seed}", seed=seed, epochs=epochs)
        student, extra = res.model, {"best_epoch": res.best_epoch}
    else:
        losses = "[" + ",".join(METHODS[method]) + "]"
        cfg = compose(cfg_over + [f"seed={seed}", f"distill.losses={losses}", f"distill.epochs={epochs}",
                                  "distill.cache_teacher=true"])
        # the teacher's outputs are computed once per image and shared by the runs that tap the same layers
        cache = caches.setdefault("features" if "fitnet" in METHODS[method] else "logits", {})
        student, report = distill(student, teacher, cfg.distill, loaders=loaders, train_cfg=cfg.train,
                                  classes=bundle.classes, preprocessing=bundle.preprocessing,
                                  class_weights=bundle.class_weights() if cfg.data.balance == "weights" else None,
                                  seed=int(cfg.seed), teacher_cache=cache, evaluate=False)
        extra = {"best_epoch": report["best_epoch"], "weights": report["weights"], "pairs": report["pairs"],
                 "notes": report["notes"], "final_losses": report["history"][-1]["loss"]}
    out = {"method": method, "seed": seed, "seconds": round(time.time() - t0, 1), **extra,
           "test": _scores(student, loaders["test"], bundle.classes),
           "val": _scores(student, loaders["val"], bundle.classes)}
    return out


def _stats(vals: list[float]) -> dict:
    return {"mean": statistics.fmean(vals), "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
            "min": min(vals), "max": max(vals), "n": len(vals)}


def _summarise(runs: list[dict]) -> dict:
    summary = {}
    ce = {r["seed"]: r for r in runs if r["method"] == "ce"}
    for method in METHODS:
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        s = {m: _stats([r["test"][m] for r in rs]) for m in METRICS}
        if method != "ce":
            for m in METRICS:
                diffs = [r["test"][m] - ce[r["seed"]]["test"][m] for r in rs if r["seed"] in ce]
                if diffs:
                    s[m]["paired_diff_vs_ce"] = _stats(diffs)
                    s[m]["seeds_better_than_ce"] = sum(d > 0 for d in diffs)
                    s[m]["seeds_worse_than_ce"] = sum(d < 0 for d in diffs)
        s["seconds_per_run"] = statistics.fmean(r["seconds"] for r in rs)
        summary[method] = s
    return summary


def _fmt(s: dict) -> str:
    return f"{s['mean']:.3f} ± {s['std']:.3f}"


def _markdown(result: dict) -> str:
    a = result["settings"]
    L = [f"# Knowledge distillation vs plain training ({NAME}.py)", "",
         f"Student `{a['student']}` trained with plain class-weighted cross-entropy (CE) "
         f"and with the teacher `{a['teacher']}` through Hinton KD (ce + kd), decoupled KD (ce + dkd) and "
         "KD + FitNets hints (ce + kd + fitnet), several seeds per method, all methods from the same "
         "initialisation per seed; best epoch by validation macro-F1; scores on the held-out test split "
         f"(mean ± sample std over seeds). Images at {a['image_size']} px, train split not augmented, "
         "teacher outputs computed once per image; default edgeus loss weights (nothing tuned on these data). "
         f"Positive class: {POSITIVE}. Machine: {result['machine']['cpu_count']} shared CPU cores "
         f"(load average at start {result['machine']['load_start']:.1f}, at end {result['machine']['load_end']:.1f}); "
         f"run time of the last invocation {result['total_seconds'] / 60:.1f} min (per-run seconds in the tables).", ""]
    for ds, d in result["datasets"].items():
        t = d["teacher"]
        ds_set = d.get("settings", a)
        L += [f"## {ds}", "", d["description"], "",
              f"Settings: batch {ds_set['batch_size']}, student lr {ds_set['lr']:g}, teacher lr {ds_set['teacher_lr']:g}, "
              f"{ds_set['seeds']} seeds.", "",
              f"Teacher `{t['name']}` width {t['width']:g} ({t['params'] / 1e6:.2f} M params), {t['epochs']} epochs: "
              f"test accuracy {t['test']['accuracy']:.3f}, macro-F1 {t['test']['macro_f1']:.3f}, "
              f"{POSITIVE} recall {t['test'][f'recall_{POSITIVE}']:.3f}. "
              f"Student: {d['student_params'] / 1e6:.3f} M params, {d['epochs']} epochs per run.", "",
              "| method | accuracy | macro-F1 | " + f"{POSITIVE} recall | Δ macro-F1 vs CE (paired) | seeds better / worse (macro-F1) | s/run |",
              "|---|---|---|---|---|---|---|"]
        for method, s in d["summary"].items():
            pd = s["macro_f1"].get("paired_diff_vs_ce")
            delta = f"{pd['mean']:+.3f} ± {pd['std']:.3f}" if pd else "—"
            wins = f"{s['macro_f1']['seeds_better_than_ce']} / {s['macro_f1']['seeds_worse_than_ce']}" if pd else "—"
            L.append(f"| {method} | {_fmt(s['accuracy'])} | {_fmt(s['macro_f1'])} | {_fmt(s[f'recall_{POSITIVE}'])} "
                     f"| {delta} | {wins} | {s['seconds_per_run']:.0f} |")
        L += ["", "Verdict (from the numbers above):", ""]
        for line in d["verdict"] + _observations(d):
            L.append(f"- {line}")
        L.append("")
    L += ["## Caveats", "",
          "- Few seeds and small test splits: a difference smaller than the spread is not evidence either way.",
          "- Short schedules from scratch at low resolution; the teacher itself is small and far from the published "
          "RSMAS-Net accuracy, so these numbers say whether distillation helps *this* student under *this* budget, "
          "not what it does at full scale.",
          "- No augmentation (so the teacher's outputs could be cached); with augmentation every method would "
          "train on different views each epoch.",
          "", "## Data", "",
          "- phantom: edgeus's built-in B-mode simulator (normal / benign / malignant, simulated speckle).",
          "- BUSI: W. Al-Dhabyani, M. Gomaa, H. Khaled, A. Fahmy, \"Dataset of breast ultrasound images\", "
          "Data in Brief 28 (2020) 104863. The developer split here holds 611 of its images (benign, malignant, "
          "normal; masks not used), split 60/20/20 stratified with data.seed=0.", ""]
    return "\n".join(L)


def _observations(d: dict) -> list[str]:
    """Conditions that weaken the comparison, read from the results themselves."""
    out, summ, t = [], d["summary"], d["teacher"]
    conf = t["test"]["confusion"]
    majority = max(sum(row) for row in conf) / max(1, sum(sum(row) for row in conf))
    ce = summ.get("ce")
    if ce and ce["accuracy"]["mean"] < majority:
        out.append(f"Plain CE's mean accuracy ({ce['accuracy']['mean']:.3f}) is below the majority-class rate of the "
                   f"test split ({majority:.3f}): the students are under-trained at this budget, so this comparison "
                   "is weak evidence either way.")
    rec = f"recall_{POSITIVE}"
    fell = [m for m, s in summ.items() if m != "ce" and ce and s[rec]["mean"] < ce[rec]["mean"]]
    if fell and t["test"][rec] < 0.5:
        out.append(f"{', '.join(fell)} lost {POSITIVE} recall against class-weighted CE while the teacher's own "
                   f"{POSITIVE} recall is {t['test'][rec]:.3f}: the KD/DKD terms (class-weighted like the CE) still "
                   "pull the student toward the teacher's own bias; a better teacher is the remedy to try.")
    return out


def _verdict(summary: dict) -> list[str]:
    out = []
    ce = summary.get("ce")
    if not ce:
        return ["no CE baseline was run"]
    for method, s in summary.items():
        if method == "ce":
            continue
        parts = []
        for m, label in (("accuracy", "accuracy"), ("macro_f1", "macro-F1"), (f"recall_{POSITIVE}", f"{POSITIVE} recall")):
            d = s[m]["mean"] - ce[m]["mean"]
            spread = max(s[m]["std"], ce[m]["std"])
            word = "beats" if d > 0 else ("ties" if d == 0 else "falls behind")
            size = "within the seed spread" if abs(d) <= spread else "beyond the seed spread"
            parts.append(f"{word} CE on {label} by {d:+.3f} ({size})")
        out.append(f"**{method}** " + "; ".join(parts) + ".")
    better = [m for m, s in summary.items() if m != "ce" and s["macro_f1"]["mean"] > ce["macro_f1"]["mean"]]
    if better:
        out.append(f"On average macro-F1, distillation beats plain training with: {', '.join(better)}.")
    else:
        out.append("On average macro-F1, **no distillation method beats plain training here**.")
    worse = [m for m, s in summary.items() if m != "ce" and s["macro_f1"]["mean"] <= ce["macro_f1"]["mean"]]
    if worse and better:
        out.append(f"Not better than plain training on macro-F1: {', '.join(worse)}.")
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--datasets", default="phantom,busi")
    p.add_argument("--busi-root", default=str(ROOT.parent / "shared" / "data" / "busi"))
    p.add_argument("--teacher", default="simple_cnn:1.0", help="name:width (see the module docstring on rsmas)")
    p.add_argument("--student", default="dsc_sta:0.25", help="name:width")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--epochs", default="busi=8,phantom=20", help="student epochs: N or busi=N,phantom=M")
    p.add_argument("--teacher-epochs", default="40")
    p.add_argument("--lr", type=float, default=2e-3, help="student learning rate (AdamW, from scratch)")
    p.add_argument("--teacher-lr", type=float, default=1e-3)
    p.add_argument("--image-size", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--phantom-n", type=int, default=60, help="phantom images per class")
    p.add_argument("--phantom-size", type=int, default=128)
    p.add_argument("--max-steps", type=int, default=0, help="cap on steps per epoch (0: none)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--cache", default=os.environ.get("EDGEUS_BENCH_CACHE", "/tmp/edgeus-bench-cache"))
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="tiny smoke run; results go to /tmp, not bench/results")
    p.add_argument("--out", default=str(RESULTS))
    p.add_argument("--render-only", action="store_true", help="rewrite the .md from the .json and exit")
    p.add_argument("--keep-other", action="store_true",
                   help="keep the results of datasets not run now from an earlier results file")
    a = p.parse_args(argv)
    if a.quick:
        a.datasets, a.seeds, a.epochs, a.teacher_epochs = "phantom", 2, "1", "1"
        a.image_size, a.phantom_n, a.phantom_size, a.max_steps = 32, 12, 48, 2
        a.teacher, a.student, a.out = "simple_cnn:0.25", "simple_cnn:0.125", "/tmp/edgeus-distill-compare-quick"
    torch.set_num_threads(a.threads)
    import logging
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    methods = [m for m in a.methods.split(",") if m]
    bad = [m for m in methods if m not in METHODS]
    if bad:
        p.error(f"unknown methods {bad}; use {', '.join(METHODS)}")
    out_dir = Path(a.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    if a.render_only:
        result = json.loads((out_dir / f"{NAME}.json").read_text())
        (out_dir / f"{NAME}.md").write_text(_markdown({**result, "datasets": {
            k: v for k, v in result["datasets"].items() if "skipped" not in v}}))
        return 0
    t_start = time.time()

    def log(msg):
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    kept = {}
    previous = out_dir / f"{NAME}.json"
    if a.keep_other and previous.is_file():  # a run over some datasets keeps the others' results
        kept = {k: v for k, v in json.loads(previous.read_text()).get("datasets", {}).items()
                if k not in a.datasets.split(",")}
    result = {"settings": {k: v for k, v in vars(a).items() if k not in ("out", "cache")}, "datasets": kept,
              "machine": {"cpu_count": os.cpu_count(), "threads": a.threads, "torch": torch.__version__,
                          "python": platform.python_version(), "load_start": load0}}
    for ds in [d for d in a.datasets.split(",") if d]:
        if ds == "busi" and not Path(a.busi_root).is_dir():
            log(f"skip busi: {a.busi_root} not found")
            result["datasets"]["busi"] = {"skipped": f"{a.busi_root} not found"}
            continue
        over = _overrides(ds, a)
        cfg = compose(over)
        bundle = build_datasets(cfg.data)
        loaders = build_loaders(bundle, cfg.data)
        log(f"{ds}: {bundle.summary()}")
        teacher, tinfo = _teacher(ds, over, cfg, bundle, a, log)
        log(f"  teacher test: acc {tinfo['test']['accuracy']:.3f} macro-F1 {tinfo['test']['macro_f1']:.3f}")
        runs, caches, epochs = [], {}, _per_ds(a.epochs, ds)
        for seed in range(a.seeds):
            for method in methods:
                r = _run_one(method, seed, teacher, over, bundle, loaders, a, epochs, caches)
                runs.append(r)
                log(f"  seed {seed} {method:10s} acc {r['test']['accuracy']:.3f} macro-F1 {r['test']['macro_f1']:.3f} "
                    f"{POSITIVE} recall {r['test'][f'recall_{POSITIVE}']:.3f} ({r['seconds']:.0f}s)")
        name, width = _spec(a.student)
        summary = _summarise(runs)
        desc = (f"{bundle.summary()}." if ds != "phantom" else
                f"{bundle.summary()}; {a.phantom_n} simulated images per class at {a.phantom_size} px, resized.")
        result["datasets"][ds] = {
            "description": desc, "epochs": epochs, "teacher": tinfo,
            "settings": {k: v for k, v in vars(a).items() if k not in ("out", "cache")}, "runs": runs, "summary": summary, "verdict": _verdict(summary),
            "student_params": count_params(create_model(name, num_classes=len(bundle.classes),
                                                        in_chans=bundle.preprocessing["in_chans"], width=width)),
        }
        for line in result["datasets"][ds]["verdict"]:
            log(f"  {line}")
        _write(result, out_dir, t_start)  # after each dataset, so a long run leaves what it finished
    _write(result, out_dir, t_start)
    log(f"wrote {out_dir / (NAME + '.json')} and .md")
    return 0


def _write(result: dict, out_dir: Path, t_start: float) -> None:
    result["total_seconds"] = round(time.time() - t_start, 1)
    result["machine"]["load_end"] = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    (out_dir / f"{NAME}.json").write_text(json.dumps(result, indent=1, default=float))
    (out_dir / f"{NAME}.md").write_text(_markdown({**result, "datasets": {k: v for k, v in result["datasets"].items()
                                                                          if "skipped" not in v}}))


if __name__ == "__main__":
    sys.exit(main())
