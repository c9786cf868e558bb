"""The run report: ``report.md`` (figures beside it), a self-contained ``report.html`` (figures
embedded) and ``ledger.csv``, written from the run directory.

One story, told in this order:

1. **Summary** — what was compressed, for which target, on which machine (CPU, ISA), with which
   versions, when; teacher against the deployed student: bytes, MACs, latency (one timing block),
   accuracy and the critical class's recall with paired 95 % intervals; gates and every warning
   (a tolerance miss, a failed or underpowered gate, INT8 slower than FP32 here).
2. **Teacher vs student** on the test split (:func:`edgeus.stats.compare`): intervals, McNemar,
   images lost and gained per class. One sign convention everywhere: *student − teacher*, in
   points (×100) and in images.
3. **Timing**: the bench stage's table (every deployed model and the teacher interleaved in one
   timing block); the per-stage ledger latencies are labelled as what they are (each row against
   its own re-timing of the teacher).
4. Ledger, gates, quantisation tolerance, saliency (Grad-CAM inside the lesion, teacher vs student),
   a gallery of test images the student gets wrong and the teacher right, robustness per class with
   example corrupted images, figures.

Per-image predictions come from the ledger rows (``metrics["probs"]`` / ``metrics["labels"]``)
when they carry them; otherwise the report runs the run's teacher and deployed student on the
test split itself. A section that cannot be made says why instead of breaking the report.
"""
from __future__ import annotations

import base64
import csv
import html
import io
import json
import logging
import platform
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


log = logging.getLogger("edgeus.report")
TEACHER_C, STUDENT_C, OTHER_C, BASE_C = "#4c72b0", "#dd8452", "#55a868", "#8c8c8c"
DPI = 100          # figures are drawn at their display size for a 900 px page: 8.6 in x 100 dpi


# ----------------------------------------------------------------------------------------------- reading the run
def _read_json(p: Path):
    try:
        return json.loads(p.read_text()) if p.is_file() else None
    except ValueError:
        return None


def _stage_file(run_dir: Path, stage: str, name: str) -> Path | None:
    hits = sorted(run_dir.glob(f"[0-9][0-9]-{stage}/{name}"))
    return hits[-1] if hits else None


def _resolve(run_dir: Path, p) -> Path | None:
    if not p:
        return None
    p = Path(p)
    return p if p.is_absolute() else run_dir / p


def _config(run_dir: Path):
    try:
        from omegaconf import OmegaConf

        return OmegaConf.load(run_dir / "config.yaml")
    except Exception:  # noqa: BLE001 - the report works without it
        return None


def _get(cfg, dotted: str, default=None):
    node = cfg
    for k in dotted.split("."):
        if node is None:
            return default
        try:
            node = node.get(k) if hasattr(node, "get") else getattr(node, k, None)
        except Exception:  # noqa: BLE001
            return default
    return default if node is None else node


def _model_rows(rows):
    return [r for r in rows if r.get("metrics")]


def _teacher_row(rows):
    return next((r for r in _model_rows(rows) if r["stage"] == "teacher"), None) or \
        next(iter(_model_rows(rows)), None)


def _student_row(rows):
    """The deployed student: the last row with metrics that is not a baseline."""
    own = [r for r in _model_rows(rows) if not r.get("of") and not r["stage"].startswith("baseline")]
    return own[-1] if own else None


# ----------------------------------------------------------------------------------------------- machine
def machine_info() -> dict:
    """CPU model, usable cores, ISA (AVX2 / VNNI / Arm dot product) and versions of this machine."""
    import os

    info = {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version()}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        text = ""
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                  if ln.lower().startswith(("model name", "hardware", "cpu model"))), None)
    info["cpu"] = model or platform.processor() or "unknown CPU"
    try:
        info["cores"] = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover
        info["cores"] = os.cpu_count()
    try:
        from edgeus.quantize.isa import detect_host

        host = detect_host()
        info["isa"], info["int8_dot"], info["flags"] = host.get("isa"), host.get("int8_dot"), host.get("flags", [])
    except Exception:  # noqa: BLE001 - fall back to reading the flags ourselves
        flags = set()
        for ln in text.splitlines():
            if ln.lower().startswith(("flags", "features")):
                flags |= set(ln.split(":", 1)[1].split())
        dot = next((f for f in ("avx512_vnni", "avx_vnni", "amx_int8", "asimddp") if f in flags), None)
        info["isa"], info["int8_dot"] = ("int8 dot product" if dot else "no int8 dot product"), dot
        info["flags"] = sorted(f for f in flags if f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8",
                                                         "asimd", "asimddp"))
    versions = {}
    for mod in ("edgeus", "torch", "onnxruntime", "onnx", "numpy"):
        try:
            versions[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001
            pass
    info["versions"] = versions
    return info


# ----------------------------------------------------------------------------------------------- predictions
def _predictions(run_dir: Path, ledger: dict, state: dict, cfg, bundle=None) -> dict | None:
    """Per-image test predictions of teacher and deployed student: from the ledger rows when they
    carry them, else by running the run's models on the test split. Adds the split (raw images,
    masks) when the data could be rebuilt."""
    rows = ledger["rows"]
    t, s = _teacher_row(rows), _student_row(rows)
    if t is None or s is None or t is s:
        return None
    out = {"teacher_stage": t["stage"], "student_stage": s["stage"]}
    tm, sm = t["metrics"], s["metrics"]
    if tm.get("probs") is not None and sm.get("probs") is not None and tm.get("labels") is not None:
        out.update(y=np.asarray(tm["labels"]), pt=np.asarray(tm["probs"]), ps=np.asarray(sm["probs"]),
                   source="stored in the ledger rows")
    else:      # the runner keeps each row's test predictions beside it (NN-<stage>/predictions*.npz)
        tp, sp = _resolve(run_dir, t.get("predictions")), _resolve(run_dir, s.get("predictions"))
        if tp is not None and sp is not None and tp.is_file() and sp.is_file():
            with np.load(tp) as a, np.load(sp) as b:
                if np.array_equal(a["labels"], b["labels"]):
                    out.update(y=a["labels"], pt=a["probs"], ps=b["probs"],
                               source="the runner's stored test predictions of both rows")
    if bundle is not None:
        out["bundle"] = bundle
    elif cfg is not None:
        try:
            from edgeus.data import build_datasets

            bundle = build_datasets(cfg.data)
            out["bundle"] = bundle
        except Exception as e:  # noqa: BLE001
            out["data_error"] = f"{type(e).__name__}: {e}"
    if "y" not in out:
        if bundle is None:
            return out if "y" in out else None
        from torch.utils.data import DataLoader

        from edgeus.evaluate import predict_onnx, predict_torch
        from edgeus.train.checkpoint import load_checkpoint

        arts = state.get("artifacts", {})
        loader = DataLoader(bundle.test, batch_size=64, shuffle=False)
        teacher = load_checkpoint(_resolve(run_dir, arts.get("teacher_model")))[0]
        y, pt = predict_torch(teacher, loader)
        spath = _resolve(run_dir, s.get("artifact"))
        if spath is not None and spath.suffix == ".onnx":
            _, ps = predict_onnx(str(spath), loader)
        else:
            _, ps = predict_torch(load_checkpoint(spath)[0], loader)
        out.update(y=y, pt=pt, ps=ps, source="recomputed for this report from the run's teacher checkpoint and "
                   f"the deployed student ({s.get('artifact')}) on the test split")
    return out


def _torch_models(run_dir: Path, state: dict):
    from edgeus.train.checkpoint import load_checkpoint

    arts = state.get("artifacts", {})
    tp, sp = _resolve(run_dir, arts.get("teacher_model")), _resolve(run_dir, arts.get("model"))
    if not tp or not sp or not tp.is_file() or not sp.is_file() or tp == sp:
        return None
    return load_checkpoint(tp)[0], load_checkpoint(sp)[0], sp.parent.name


# ----------------------------------------------------------------------------------------------- figures
def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _acc_limits(values, pad=0.02):
    v = [x for x in values if x is not None]
    lo, hi = (min(v), max(v)) if v else (0.0, 1.0)
    span = max(hi - lo, 0.04)
    return max(0.0, lo - span * 0.25 - pad), min(1.0, hi + span * 0.25 + pad)


def fig_headline(teacher: dict, student: dict, path: Path) -> Path:
    """Teacher vs deployed student: size, MACs, latency (same timing block), accuracy with its
    interval. Bars are relative to the teacher (= 1) so one axis reads all four."""
    fig, axes = plt.subplots(1, 4, figsize=(8.6, 2.9))
    items = [("size on disk (KB)", teacher.get("bytes"), student.get("bytes"), 1 / 1024, "{:.1f}"),
             ("MACs (M)", teacher.get("macs"), student.get("macs"), 1e-6, "{:.2f}"),
             ("latency, batch 1 (ms)", teacher.get("ms"), student.get("ms"), 1.0, "{:.3f}"),
             ("test accuracy", teacher.get("acc"), student.get("acc"), 1.0, "{:.3f}")]
    for ax, (title, t, s, scale, fmt) in zip(axes, items):
        ax.set_title(title, fontsize=9)
        if t is None or s is None:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes, fontsize=9)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        vals = [t * scale, s * scale]
        bars = ax.bar([0, 1], vals, color=[TEACHER_C, STUDENT_C], width=0.6)
        ax.set_xticks([0, 1], ["teacher", "student"], fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        for b, v in zip(bars, vals):   # accuracy: the label left of the interval's whisker
            acc = title == "test accuracy"
            ax.annotate(fmt.format(v), (b.get_x() + (0.05 if acc else 0.5) * b.get_width(), b.get_height()),
                        ha="left" if acc else "center", va="bottom", fontsize=8)
        if title == "test accuracy":
            lo, hi = _acc_limits(vals)
            if student.get("acc_lo") is not None:   # teacher + the interval of (student - teacher)
                lo_s, hi_s = t + student["acc_lo"], t + student["acc_hi"]
                ax.errorbar([1], [s], yerr=[[max(0.0, s - lo_s)], [max(0.0, hi_s - s)]], fmt="none", ecolor="black",
                            capsize=4, lw=1)
                lo, hi = _acc_limits(vals + [lo_s, hi_s])
            ax.set_ylim(lo, hi + (hi - lo) * 0.1)
        else:
            ax.set_ylim(0, max(vals) * 1.25)
    fig.suptitle("Teacher (FP32) vs deployed student — accuracy bar: paired 95 % interval of the difference",
                 fontsize=9)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    return _save(fig, path)


def fig_stages(rows, path: Path) -> Path:
    """Per stage: bytes, MACs and test accuracy (latency lives in the timing table: the ledger's
    per-row times come from separate timing blocks)."""
    rows = [r for r in _model_rows(rows) if not r.get("of")]
    names = [r["stage"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(8.6, 3.2))
    series = [("size on disk (KB)", [(r.get("bytes") or 0) / 1024 for r in rows]),
              ("MACs (M)", [(r.get("macs") or 0) / 1e6 for r in rows]),
              ("test accuracy", [r["metrics"]["accuracy"] for r in rows])]
    colors = [TEACHER_C] + [OTHER_C] * (len(rows) - 2) + [STUDENT_C] if len(rows) > 1 else [TEACHER_C]
    for ax, (title, vals) in zip(axes, series):
        bars = ax.bar(range(len(vals)), vals, color=colors)
        ax.set_xticks(range(len(vals)), names, rotation=30, ha="right", fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
        ax.set_title(title, fontsize=9)
        for b, v in zip(bars, vals):
            ax.annotate(f"{v:.3g}", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom",
                        fontsize=7)
        if title == "test accuracy":
            lo, hi = _acc_limits(vals)
            ax.set_ylim(lo, hi + (hi - lo) * 0.1)
        else:
            ax.set_ylim(0, max(vals + [1e-9]) * 1.2)
    from matplotlib.patches import Patch

    fig.legend(handles=[Patch(color=TEACHER_C, label="teacher"), Patch(color=OTHER_C, label="intermediate stage"),
                        Patch(color=STUDENT_C, label="deployed student")], loc="upper center", ncol=3, fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return _save(fig, path)


def fig_bench(bench_rows: list[dict], path: Path) -> Path:
    """Median latency (with p90 whiskers) of every model timed in the bench stage's one block."""
    fig, ax = plt.subplots(figsize=(8.6, 0.5 + 0.45 * len(bench_rows)))
    names = [r["label"] for r in bench_rows][::-1]
    med = [r["p50_ms"] for r in bench_rows][::-1]
    p90 = [r.get("p90_ms") or r["p50_ms"] for r in bench_rows][::-1]
    colors = [TEACHER_C if r["label"].startswith("teacher fp32") else STUDENT_C if r["label"].startswith("student int8")
              else BASE_C for r in bench_rows][::-1]
    ax.barh(range(len(names)), med, color=colors, xerr=[[0] * len(med), [max(0, a - b) for a, b in zip(p90, med)]],
            capsize=3)
    ax.set_yticks(range(len(names)), names, fontsize=8)
    for i, (m, q, r) in enumerate(zip(med, p90, bench_rows[::-1])):
        ax.annotate(f"{m:.3f} ms  ({r['speedup']:.2f}× vs teacher fp32)", (max(m, q), i), xytext=(6, -3),
                    textcoords="offset points", fontsize=8)
    ax.set_xlim(0, max(p90 + med) * 1.9)
    ax.set_xlabel("median latency, batch 1 (ms); whisker to p90 — lower is better", fontsize=8)
    ax.tick_params(axis="x", labelsize=7)
    ax.set_title("Bench stage: all models interleaved in one timing block", fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def fig_confusion(cm_t, cm_s, classes, student_name: str, path: Path) -> Path:
    fig, axes = plt.subplots(1, 2, figsize=(8.6, 3.6))
    for ax, (title, cm) in zip(axes, (("teacher", cm_t), (f"deployed student ({student_name})", cm_s))):
        cm = np.asarray(cm)
        ax.imshow(cm, cmap="Blues")
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=9,
                        color="white" if cm[i, j] > cm.max() / 2 else "black")
        ax.set_xticks(range(len(classes)), classes, rotation=20, fontsize=8)
        ax.set_yticks(range(len(classes)), classes, fontsize=8)
        ax.set_xlabel("predicted", fontsize=8)
        ax.set_ylabel("true", fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return _save(fig, path)


def fig_curves(y, pt, ps, classes, student_name: str, path: Path) -> Path:
    """ROC and precision-recall curves per class (one-vs-rest), teacher solid, student dashed."""
    from edgeus.curves import class_curves

    ct, cs = class_curves(y, pt, classes), class_curves(y, ps, classes)
    fig, axes = plt.subplots(1, 2, figsize=(8.6, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, c in enumerate(classes):
        col = colors[i % len(colors)]
        for cur, style, who in ((ct[c], "-", "teacher"), (cs[c], "--", student_name)):
            auc = "n/a" if cur["auc"] is None else f"{cur['auc']:.3f}"
            ap = "n/a" if cur["ap"] is None else f"{cur['ap']:.3f}"
            axes[0].plot(cur["roc"]["fpr"], cur["roc"]["tpr"], style, color=col, lw=1.3, label=f"{c}, {who}: AUC {auc}")
            rec, prec = cur["pr"]["recall"], cur["pr"]["precision"]   # its closing point (0, 1) goes first
            axes[1].plot([rec[-1], *rec[:-1]], [prec[-1], *prec[:-1]], style, color=col, lw=1.3,
                         label=f"{c}, {who}: AP {ap}")
    axes[0].plot([0, 1], [0, 1], ":", color="grey", lw=0.8)
    axes[0].set(xlabel="false positive rate", ylabel="true positive rate", title="ROC (one class vs the rest)")
    axes[1].set(xlabel="recall", ylabel="precision", title="Precision-recall")
    for ax in axes:
        ax.set_xlim(-0.02, 1.02)
        ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="lower right" if ax is axes[0] else "lower left")
        ax.title.set_fontsize(9)
    fig.tight_layout()
    return _save(fig, path)


def fig_robustness(rob: dict, path: Path) -> Path:
    kinds = [k for k in rob["teacher"] if k != "clean"]
    cols = min(4, len(kinds))
    nrows = int(np.ceil(len(kinds) / cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(8.6, 2.7 * nrows + 0.4), squeeze=False)
    allv = []
    for name in ("teacher", "student"):
        allv.append(rob[name]["clean"]["accuracy"])
        allv += [p["accuracy"] for k in kinds for p in rob[name][k]]
    lo, hi = _acc_limits(allv)
    for ax, kind in zip(axes.flat, kinds):
        for name, style, c in (("teacher", "-o", TEACHER_C), ("student", "--s", STUDENT_C)):
            pts = [(0.0, rob[name]["clean"]["accuracy"])] + [(p["strength"], p["accuracy"]) for p in rob[name][kind]]
            ax.plot(*zip(*pts), style, label=name, color=c, ms=4)
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("strength (0 = clean)", fontsize=8)
        ax.set_ylim(lo, hi)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    axes.flat[0].set_ylabel("test accuracy", fontsize=8)
    for ax in list(axes.flat)[len(kinds):]:
        ax.axis("off")
    h, lab = axes.flat[0].get_legend_handles_labels()
    fig.legend(h, lab, loc="upper center", ncol=2, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.92))
    return _save(fig, path)


def fig_corruption_examples(img01: np.ndarray, corruptions, strengths, path: Path, seed: int = 0) -> Path:
    import torch

    from edgeus.pipeline.robustness import corrupt

    fig, axes = plt.subplots(len(corruptions), len(strengths) + 1,
                             figsize=(min(8.6, 1.5 * (len(strengths) + 1)), 1.5 * len(corruptions) + 0.2),
                             squeeze=False)
    x = torch.from_numpy(np.asarray(img01, np.float32))[None, None]
    for i, kind in enumerate(corruptions):
        for j, s in enumerate([0.0] + list(strengths)):
            y = corrupt(x, kind, float(s), seed)[0, 0].numpy()
            ax = axes[i, j]
            ax.imshow(y, cmap="gray", vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title("clean" if s == 0 else f"strength {s:g}", fontsize=8)
            if j == 0:
                ax.set_ylabel(kind, fontsize=8)
    fig.tight_layout()
    return _save(fig, path)


def fig_gallery(items: list[dict], classes, path: Path) -> Path:
    """One row per image: the image, the teacher's Grad-CAM, the student's (lesion outlined)."""
    from edgeus.explain import mask_outline, overlay

    n = len(items)
    with_cam = any(it.get("cam_t") is not None for it in items)
    ncol = 3 if with_cam else 1
    per_row = 1 if with_cam else min(6, n)
    nrows = n if with_cam else int(np.ceil(n / per_row))
    fig, axes = plt.subplots(nrows, ncol * per_row, figsize=(min(8.6, 2.2 * ncol * per_row), 2.3 * nrows),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for k, it in enumerate(items):
        r, c0 = (k, 0) if with_cam else (k // per_row, k % per_row)
        panels = [("image", None), ("teacher", it.get("cam_t")), ("student", it.get("cam_s"))][:ncol]
        for j, (name, cam) in enumerate(panels):
            rgb = overlay(it["img"], cam)
            if it.get("mask") is not None and it["mask"].any():
                rgb = rgb.copy()
                rgb[mask_outline(it["mask"])] = (255, 255, 255)
            ax = axes[r, c0 + j]
            ax.imshow(rgb, interpolation="nearest")
            if name == "image":
                ax.set_title(f"#{it['index']} true {classes[it['y']]}", fontsize=8)
            elif name == "teacher":
                ax.set_title(f"teacher: {classes[it['t']]} (right)", fontsize=8, color="#2a7a2a")
            else:
                ax.set_title(f"student: {classes[it['s']]} (wrong)", fontsize=8, color="#b22222")
    fig.tight_layout()
    return _save(fig, path)


# ----------------------------------------------------------------------------------------------- formatting
def _pts(v, digits=1):
    return "n/a" if v is None else f"{round(v * 100, digits) + 0.0:+.{digits}f} pt"   # + 0.0: no "-0.0"


def _iv(iv: dict | None) -> str:
    from edgeus.stats import fmt_interval

    return "n/a" if not iv else fmt_interval(iv)


def _size(b):
    if b is None:
        return "–"
    return f"{b / 2**20:.2f} MB" if b >= 2**20 else f"{b / 1024:.1f} KB"


def _ratio(a, b, fmt="{:.1f}×"):
    return "–" if not a or not b else fmt.format(a / b)


def bench_rows(bench: dict | None) -> list[dict]:
    """The bench stage's models at batch 1, the first (teacher fp32) the baseline."""
    if not bench or not bench.get("models"):
        return []
    out = []
    for m in bench["models"]:
        b = (m.get("batches") or {}).get("1") or next(iter((m.get("batches") or {}).values()), None)
        if not b or b.get("p50_ms") is None:
            continue
        out.append({"name": m.get("name"), "path": m.get("path"), "p50_ms": b["p50_ms"], "p90_ms": b.get("p90_ms"),
                    "n": b.get("n")})
    if not out:
        return []
    base = out[0]["p50_ms"]
    for r in out:
        r["speedup"] = base / r["p50_ms"] if r["p50_ms"] else None
    return out


def _label_bench(rows: list[dict], latency_md: Path | None) -> None:
    """Give the bench rows the stage's own labels (teacher fp32, student int8, ...) from latency.md."""
    labels = []
    if latency_md is not None and latency_md.is_file():
        for ln in latency_md.read_text().splitlines()[2:]:
            cells = [c.strip() for c in ln.strip().strip("|").split("|")]
            if cells and cells[0]:
                labels.append(cells[0])
    for i, r in enumerate(rows):
        r["label"] = labels[i] if i < len(labels) else r["name"]


def _int8_slower_reason(info: dict, bench: list[dict], student_row: dict | None) -> str:
    dot = info.get("int8_dot")
    macs = (student_row or {}).get("macs")
    why = []
    if not dot:
        why.append(f"this CPU ({info.get('cpu')}) has no int8 dot-product instruction (no AVX512-VNNI / AVX-VNNI "
                   "/ AMX), so ONNX Runtime's INT8 convolutions use the slower widening VPMADDUBSW path and gain "
                   "little over FP32 AVX2/AVX-512 kernels")
    if macs is not None and macs < 50e6:
        why.append(f"the model is small ({macs / 1e6:.1f} M MACs): at batch 1 its time is per-node overhead, and "
                   "INT8 adds QuantizeLinear / DequantizeLinear nodes and requantisation between layers")
    if not why:
        why.append("INT8 adds quantise / dequantise work between layers that this model's arithmetic savings do "
                   "not pay for on this CPU")
    return "; ".join(why) + ". The target device (with int8 dot products or TensorRT) is where INT8 pays; time it there."


# ----------------------------------------------------------------------------------------------- the report
def write_report(run_dir: str | Path, bundle=None) -> dict:
    """Write report.md, report.html and ledger.csv of a run directory. ``bundle``: the run's
    :class:`~edgeus.data.DataBundle` when the caller has it (the runner does; otherwise the test split
    is rebuilt from the run's config.yaml for the comparison, saliency and examples)."""
    run_dir = Path(run_dir)
    ledger = json.loads((run_dir / "ledger.json").read_text())
    state = json.loads((run_dir / "state.json").read_text())
    rob = _read_json(run_dir / "robustness.json")
    cfg = _config(run_dir)
    rows, classes, gates = ledger["rows"], ledger["classes"], ledger.get("gates", [])
    figs = run_dir / "figures"
    figs.mkdir(exist_ok=True)
    write_csv(rows, classes, run_dir / "ledger.csv")
    info = machine_info()
    critical = _get(cfg, "gates.critical_class") or (classes[-1] if classes else None)
    teacher, student = _teacher_row(rows), _student_row(rows)
    warnings: list[str] = []
    notes: list[str] = []
    sections: list[tuple[str, list[str]]] = []
    images: dict[str, Path] = {}

    # --- bench (one timing block)
    bench_path = _stage_file(run_dir, "bench", "bench.json")
    bench = bench_rows(_read_json(bench_path) if bench_path else None)
    _label_bench(bench, _stage_file(run_dir, "bench", "latency.md"))
    b_teacher = next((r for r in bench if r["label"].startswith("teacher fp32")), bench[0] if bench else None)
    b_student = next((r for r in bench if r["label"].startswith("student int8")), None)
    b_fp32 = next((r for r in bench if r["label"].startswith("student fp32")), None)

    # --- predictions and the paired comparison
    comp, pred = None, None
    try:
        pred = _predictions(run_dir, ledger, state, cfg, bundle)
        if pred and "y" in pred:
            from edgeus.stats import compare

            comp = compare(pred["y"], pred["pt"], pred["ps"], classes, seed=int(_get(cfg, "seed", 0) or 0))
    except Exception as e:  # noqa: BLE001
        log.warning("report: teacher-vs-student comparison not made: %s", e)
        notes.append(f"The paired teacher-vs-student comparison could not be made: {type(e).__name__}: {e}")

    # --- quantisation tolerance
    qrep = _read_json(_stage_file(run_dir, "quantize", "report.json") or run_dir / "-")
    if qrep is not None and qrep.get("within_tolerance") is False:
        warnings.append(f"**INT8 outside its tolerance** (the quantize stage, INT8 against its own FP32 model on the "
                        f"{qrep.get('eval_split', 'evaluation')} split): " + "; ".join(tolerance_misses(qrep)) + ".")

    # --- gates
    from edgeus.pipeline.gates import describe

    status = lambda g: g.get("status", "pass" if g["passed"] else "fail")  # noqa: E731
    failed = [g for g in gates if status(g) == "fail"]
    under = [g for g in gates if status(g) == "underpowered"]
    for g in failed:
        warnings.append("**Gate failed** — " + describe(g))
    for g in under:
        warnings.append("**Gate underpowered** — " + describe(g))
    gate_line = ("not evaluated" if not gates else
                 f"{len(gates) - len(failed) - len(under)} of {len(gates)} passed" +
                 (f", **{len(failed)} failed**" if failed else "") + (f", {len(under)} underpowered" if under else ""))

    # --- INT8 vs FP32 on this machine
    if b_student and b_fp32 and b_student["p50_ms"] > b_fp32["p50_ms"]:
        warnings.append(f"**INT8 is slower than FP32 on this machine**: student int8 {b_student['p50_ms']:.3f} ms vs "
                        f"student fp32 {b_fp32['p50_ms']:.3f} ms (median, batch 1, same timing block) — "
                        + _int8_slower_reason(info, bench, student))
    if b_student and b_teacher and b_student["p50_ms"] > b_teacher["p50_ms"]:
        warnings.append(f"**The deployed student is slower than the FP32 teacher here**: {b_student['p50_ms']:.3f} ms vs "
                        f"{b_teacher['p50_ms']:.3f} ms ({b_student['speedup']:.2f}× — below 1 is slower).")

    # --- summary
    arch = _get(cfg, "model.name", "?")
    width = _get(cfg, "model.width")
    target = _get(cfg, "target.name", "?")
    data_name = ledger.get("data", "?")
    n_test = comp["n"] if comp else (student or {}).get("metrics", {}).get("n")
    created = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime((run_dir / "ledger.json").stat().st_mtime))
    summary = [
        f"- **What**: {arch}" + (f" (width {width})" if width is not None else "") +
        f", recipe `{ledger.get('recipe')}`, data {data_name} ({', '.join(classes)}; {n_test} test images), "
        f"teacher → deployed student `{(student or {}).get('stage', '?')}` (`{(student or {}).get('artifact', '?')}`)",
        f"- **Target**: {target} · **Machine**: {info['cpu']}, {info['cores']} usable core(s), {info['machine']}; "
        f"ISA {info.get('isa')}" + (f" (int8 dot product: {info['int8_dot']})" if info.get("int8_dot") else
                                     " (no int8 dot product)"),
        "- **Versions**: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()) + f", python {info['python']}"
        + f" · **Date**: {created}",
    ]
    head = ["| | teacher | deployed student | student vs teacher |", "|---|---|---|---|"]
    if teacher and student:
        head.append(f"| size on disk | {_size(teacher.get('bytes'))} | {_size(student.get('bytes'))} | "
                    f"{_ratio(teacher.get('bytes'), student.get('bytes'))} smaller |")
        head.append(f"| MACs | {(teacher.get('macs') or 0) / 1e6:.2f} M | "
                    f"{(student.get('macs') or 0) / 1e6:.2f} M | {_ratio(teacher.get('macs'), student.get('macs'))} fewer |")
        if b_teacher and b_student:
            head.append(f"| latency, batch 1, median (bench block) | {b_teacher['p50_ms']:.3f} ms | "
                        f"{b_student['p50_ms']:.3f} ms | {b_student['speedup']:.2f}× speed-up "
                        f"({'faster' if b_student['speedup'] >= 1 else '**slower**'}) |")
        else:
            head.append(f"| latency, batch 1, median (ledger row) | – | {student.get('latency_ms') or 0:.3f} ms | "
                        f"{student.get('speedup') or 0:.2f}× vs a re-timing of the teacher in the same block |")
        iv = (comp or {}).get("intervals", {})
        tm, sm = teacher["metrics"], student["metrics"]
        head.append(f"| test accuracy | {tm['accuracy']:.3f} | {sm['accuracy']:.3f} | {_iv(iv.get('accuracy')) if comp else _pts(sm['accuracy'] - tm['accuracy'])} |")
        if critical in (tm.get("recall") or {}):
            fl = (comp or {}).get("flips", {}).get(critical)
            imgs = f"; {fl['gained'] - fl['lost']:+d} of {fl['n']} images" if fl else ""
            head.append(f"| recall {critical} | {tm['recall'][critical]:.3f} | {sm['recall'][critical]:.3f} | "
                        f"{_iv(iv.get(f'recall/{critical}')) if comp else _pts(sm['recall'][critical] - tm['recall'][critical])}{imgs} |")
        head.append(f"| ECE (lower is better) | {tm['ece']:.3f} | {sm['ece']:.3f} | "
                    f"{_iv(iv.get('ece')) if comp else _pts(sm['ece'] - tm['ece'])} |")
        if tm.get("dice") is not None and sm.get("dice") is not None:   # two-stage: the U-Net's lesion mask
            head.append(f"| mask Dice (IoU) | {tm['dice']:.3f} ({tm['iou']:.3f}) | {sm['dice']:.3f} ({sm['iou']:.3f}) | "
                        f"{_pts(sm['dice'] - tm['dice'])} |")
    summary += ["", *head, "",
                "Sign convention everywhere in this report: **student − teacher**, in points (×100) with the paired "
                "95 % bootstrap interval in brackets, and in test images; a loss is negative (for ECE a rise is worse).",
                "", f"**Gates**: {gate_line}" + (f" · **Bundle**: `{_rel(run_dir, state.get('artifacts', {}).get('bundle'))}`"
                                                  if state.get("artifacts", {}).get("bundle") else ""), ""]
    if warnings:
        summary += ["**Warnings**:", ""] + [f"- {w}" for w in warnings] + [""]
    else:
        summary += ["No warnings: every gate passed and the INT8 model met its tolerance.", ""]
    if teacher and student:
        hd = {"bytes": teacher.get("bytes"), "macs": teacher.get("macs"), "acc": teacher["metrics"]["accuracy"],
              "ms": b_teacher["p50_ms"] if b_teacher and b_student else None}
        sd = {"bytes": student.get("bytes"), "macs": student.get("macs"), "acc": student["metrics"]["accuracy"],
              "ms": b_student["p50_ms"] if b_teacher and b_student else None}
        if comp and comp["intervals"]["accuracy"].get("lo") is not None:
            sd["acc_lo"], sd["acc_hi"] = comp["intervals"]["accuracy"]["lo"], comp["intervals"]["accuracy"]["hi"]
        images["headline"] = fig_headline(hd, sd, figs / "headline.png")
        summary += ["![Teacher vs deployed student](figures/headline.png)", ""]
    sections.append(("Summary", summary))

    # --- teacher vs student
    if comp:
        iv, mc = comp["intervals"], comp["mcnemar"]
        sec = [f"{comp['n']} test images; predictions {pred.get('source')}. Paired percentile bootstrap over images "
               f"({iv['_meta']['n_boot']} resamples); McNemar exact test on the images where exactly one model is right.",
               "", "| metric | teacher | student | student − teacher [95 % interval] |", "|---|---|---|---|"]
        names = ["accuracy", "macro_f1", "auc", "ece"] + [f"recall/{c}" for c in ([critical] if critical in classes else []) +
                                                          [c for c in classes if c != critical]]
        for k in names:
            e = iv.get(k)
            if not e:
                continue
            f = lambda v: "n/a" if v is None else f"{v:.3f}"  # noqa: E731
            sec.append(f"| {k.replace('/', ' ')}{' (lower is better)' if k == 'ece' else ''} | {f(e['teacher'])} | "
                       f"{f(e['student'])} | {_iv(e)} |")
        sec += ["", f"Images: the teacher alone is right on **{mc['teacher_only_right']}**, the student alone on "
                f"**{mc['student_only_right']}** (net {mc['student_only_right'] - mc['teacher_only_right']:+d} images "
                f"for the student; McNemar p = {mc['p_value']:.3g}); the two agree on "
                f"{comp['agreement'] * 100:.1f} % of the images.", "",
                "| class | test images | lost (teacher right, student wrong) | gained (teacher wrong, student right) | net |",
                "|---|---|---|---|---|"]
        for c, fl in comp["flips"].items():
            sec.append(f"| {c} | {fl['n']} | {fl['lost']} | {fl['gained']} | {fl['gained'] - fl['lost']:+d} |")
        sec.append("")
        tm, sm = teacher["metrics"], student["metrics"]
        if tm.get("confusion") and sm.get("confusion"):
            images["confusion"] = fig_confusion(tm["confusion"], sm["confusion"], classes, student["stage"],
                                                figs / "confusion.png")
            sec += ["![Confusion matrices](figures/confusion.png)", ""]
        images["curves"] = fig_curves(pred["y"], pred["pt"], pred["ps"], classes, student["stage"],
                                      figs / "curves.png")
        sec += ["Per class, one against the rest: ROC-AUC and average precision (PR-AP, as seed 000 reports "
                "for both of its classes), teacher solid, student dashed.", "", "![ROC and PR curves](figures/curves.png)",
                ""]
        sections.append(("Teacher vs student on the test split", sec))

    # --- timing
    sec = []
    if bench:
        sec += [f"The bench stage timed every model below **interleaved in one timing block** (ONNX Runtime, this "
                f"machine's CPU, batch 1, {bench[0].get('n')} timed runs each): these speed-ups are comparable with "
                "each other. Speed-up = teacher fp32 median / model median (below 1× is slower).", "",
                "| model | median ms | p90 ms | speed-up vs teacher fp32 (same block) |", "|---|---|---|---|"]
        for r in bench:
            sec.append(f"| {r['label']} | {r['p50_ms']:.3f} | {(r.get('p90_ms') or 0):.3f} | {r['speedup']:.2f}× |")
        images["bench"] = fig_bench(bench, figs / "bench.png")
        sec += ["", "![Bench timing block](figures/bench.png)", ""]
    else:
        sec += ["The run has no bench stage result (`NN-bench/bench.json`): only the ledger's per-row times below.", ""]
    sec += ["The ledger's **ORT ms** and **speed-up** columns are per-row measurements: each stage's model was timed "
            "together with its **own re-timing of the teacher** (interleaved, the same process), and its speed-up is "
            "that re-timed teacher's median / the row's median. Rows come from different timing blocks, minutes "
            "apart: compare them with each other only to within the machine's noise; the bench table above is the "
            "comparison to quote.", ""]
    sections.append(("Timing", sec))

    # --- ledger
    sec = ["One row per stage, on the test split; bytes = the ONNX file, MACs of the torch model behind it; "
           "speed-up against that row's own re-timing of the teacher (see Timing). Every column (parameters, every "
           "class's recall, wall time) is in `ledger.md`, `ledger.json` and [`ledger.csv`](ledger.csv).", "",
           compact_ledger(rows, critical), ""]
    sec += [f"- `{r['stage']}` skipped: {r['skipped']}" for r in rows if r.get("skipped")] + [""]
    images["stages"] = fig_stages(rows, figs / "stages.png")
    sec += ["![Per-stage size, MACs and accuracy](figures/stages.png)", ""]
    sections.append(("Ledger", sec))

    # --- gates and tolerance
    sec = []
    if gates:
        sec += ["change = student − teacher; limit = the loss allowed (the rise allowed, for ECE); status pass / "
                "fail / underpowered (too few test images to show non-inferiority at that margin).", "",
                "| stage | metric | teacher | student | change [95 % interval] | limit | status | note |",
                "|---|---|---|---|---|---|---|---|"]
        for g in gates:
            ivs = "" if g.get("lo") is None else f" [{g['lo'] * 100:+.1f}, {g['hi'] * 100:+.1f}]"
            st = status(g)
            f = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
            sec.append(f"| {g['stage']} | {g['metric']} | {f(g.get('teacher'))} | {f(g.get('student'))} | "
                       f"{_pts(g.get('change'))}{ivs} | {'+' if g.get('lower_is_better') else '-'}"
                       f"{g['limit'] * 100:.1f} pt | {'**FAIL**' if st == 'fail' else st} | {g.get('note') or ''} |")
        sec.append("")
    else:
        sec += ["No gate was evaluated in this run.", ""]
    if qrep is not None:
        missed = qrep.get("within_tolerance") is False
        sec += [f"**INT8 tolerance** (the quantize stage, INT8 against its own FP32 model on the "
                f"{qrep.get('eval_split', 'evaluation')} split, method {qrep.get('method', '?')}): "
                + ("**MISSED** — " + "; ".join(tolerance_misses(qrep)) if missed else "within tolerance — "
                   + "; ".join(tolerance_misses(qrep, all_checks=True))) + ".", ""]
    sections.append(("Gates and tolerances", sec))

    # --- saliency and gallery (torch models)
    try:
        sal_sec, gal_sec, sal = _saliency_sections(run_dir, state, pred, classes, figs, images,
                                                   int(_get(cfg, "seed", 0) or 0))
        if sal is not None:
            (run_dir / "saliency.json").write_text(json.dumps(sal, indent=1))
        if sal_sec:
            sections.append(("Where the models look (Grad-CAM)", sal_sec))
        if gal_sec:
            sections.append(("Images the student gets wrong and the teacher right", gal_sec))
    except Exception as e:  # noqa: BLE001
        log.warning("report: saliency not made: %s", e)
        sections.append(("Where the models look (Grad-CAM)", [f"Not made: {type(e).__name__}: {e}", ""]))

    # --- robustness
    if rob:
        sec = _robustness_section(rob, classes, figs, images, pred, cfg)
        sections.append(("Robustness", sec))
    seg_rows = [r for r in rows if (r.get("metrics") or {}).get("dice") is not None]
    if seg_rows:   # two-stage models: the segmentation their classifier sees (the bundle's 'mask' output)
        sec = ["Lesion mask of each model (the second ONNX output `mask`, thresholded at 0.5) against the test "
               "images' ground-truth masks; per-image values in each stage's `segmentation.json`.", "",
               "| stage | images with a mask | Dice mean | Dice median | IoU mean | IoU median |", "|---|---|---|---|---|---|"]
        for r in seg_rows:
            sg = r["metrics"].get("segmentation") or {}
            f = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
            sec.append(f"| {r['stage']} | {sg.get('n', '–')} | {f(sg.get('dice_mean'))} | {f(sg.get('dice_median'))} | "
                       f"{f(sg.get('iou_mean'))} | {f(sg.get('iou_median'))} |")
        sections.append(("Segmentation (two-stage mask)", sec + [""]))
    if notes:
        sections.append(("Notes", [f"- {n}" for n in notes] + [""]))

    title = f"# edgeus report — {ledger['recipe']} on {data_name}"
    md = [title, "", f"Run directory: `{run_dir.name}` · figures in `figures/` · ledger also in `ledger.csv`", ""]
    for name, body in sections:
        md += [f"## {name}", "", *body]
    (run_dir / "report.md").write_text("\n".join(md))
    (run_dir / "report.html").write_text(_html(md, run_dir))
    return {"md": run_dir / "report.md", "html": run_dir / "report.html", "csv": run_dir / "ledger.csv",
            "figures": list(images.values()), "comparison": comp, "warnings": warnings}


def compact_ledger(rows: list[dict], critical: str | None) -> str:
    """The ledger's key columns, narrow enough for a 900 px page."""
    f = lambda v, spec=".3f": "–" if v is None else format(v, spec)  # noqa: E731
    head = ["stage", "MACs", "bytes", "ORT ms", "speed-up", "acc", "macro-F1", "AUC", "ECE"] + \
        ([f"recall {critical}"] if critical else [])
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m = r.get("metrics") or {}
        name = f"{r['stage']} (skipped)" if r.get("skipped") else r["stage"]
        cells = [name, "–" if r.get("macs") is None else f"{r['macs'] / 1e6:.2f} M", _size(r.get("bytes")),
                 f(r.get("latency_ms"), ".2f"), "–" if not r.get("speedup") else f"{r['speedup']:.2f}×",
                 f(m.get("accuracy")), f(m.get("macro_f1")), f(m.get("auc")), f(m.get("ece"))]
        if critical:
            cells.append(f((m.get("recall") or {}).get(critical)))
        out.append("| " + " | ".join(cells) + " |")
    return "\n".join(out) + "\n"


def tolerance_misses(qrep: dict, all_checks: bool = False) -> list[str]:
    """The quantize stage's tolerance checks (INT8 vs its FP32 model) as text, student − teacher
    sign: each check that missed (or, with ``all_checks``, every check)."""
    fc = qrep.get("final_check") or {}
    tol = {**(qrep.get("tolerance") or {}), **{k: v for k, v in fc.items() if k.startswith(("max_", "min_"))}}
    out = []

    def add(miss, text):
        if miss or all_checks:
            out.append(text + (" (**missed**)" if miss and all_checks else ""))

    if fc.get("accuracy_drop") is not None and tol.get("max_accuracy_drop") is not None:
        add(fc["accuracy_drop"] > tol["max_accuracy_drop"] + 1e-12,
            f"accuracy change {_pts(-fc['accuracy_drop'])} (allowed -{tol['max_accuracy_drop'] * 100:.1f} pt)")
    if fc.get("worst_recall_drop") is not None and tol.get("max_recall_drop") is not None:
        add(fc["worst_recall_drop"] > tol["max_recall_drop"] + 1e-12,
            f"{fc.get('worst_class', '?')} recall change {_pts(-fc['worst_recall_drop'])} (allowed "
            f"-{tol['max_recall_drop'] * 100:.1f} pt)")
    if fc.get("agreement") is not None and tol.get("min_agreement") is not None:
        n = fc.get("fidelity_images")
        add(fc["agreement"] < tol["min_agreement"] - 1e-12,
            f"top-1 agreement with FP32 {fc['agreement'] * 100:.1f} %" + (f" of {n} images" if n else "")
            + f" (required {tol['min_agreement'] * 100:.1f} %)")
    if fc.get("worst_flip_rate") is not None and tol.get("max_class_flip_rate") is not None:
        add(fc["worst_flip_rate"] > tol["max_class_flip_rate"] + 1e-12,
            f"{fc.get('worst_flip_class', '?')} images whose class flipped {fc['worst_flip_rate'] * 100:.1f} % "
            f"(allowed {tol['max_class_flip_rate'] * 100:.1f} %)")
    if not out and not all_checks:
        out.append("the stage reports within_tolerance = false (see its report.json)")
    return out


def _rel(run_dir: Path, p) -> str:
    if not p:
        return ""
    q = Path(p)
    try:
        return (q if not q.is_absolute() else q.relative_to(run_dir)).as_posix()
    except ValueError:
        return str(p)


def _saliency_sections(run_dir, state, pred, classes, figs, images, seed, max_images: int = 160):
    """Grad-CAM of teacher and student torch models on the test split: lesion fraction, pointing game,
    correlation; the gallery of student-wrong / teacher-right images with their maps."""
    import importlib.util

    pair = _torch_models(run_dir, state)
    bundle = (pred or {}).get("bundle")
    if pair is None or bundle is None:
        return None, None, None
    teacher, student, sname = pair
    ds = bundle.test
    n = min(len(ds), max_images)
    raw = [ds.raw(i) for i in range(n)]
    img01 = np.stack([r[0][0].numpy() for r in raw]) if n else np.zeros((0, 1, 1))
    masks = np.stack([r[1][0].numpy() > 0.5 for r in raw]) if n else np.zeros((0, 1, 1), bool)
    has = np.asarray([bool(ds.images.has_mask[ds.indices[i]]) for i in range(n)])
    x = np.stack([ds[i]["image"].numpy() for i in range(n)]).astype(np.float32) if n else None
    have_captum = importlib.util.find_spec("captum") is not None
    sal, sec = None, []
    if have_captum and n:
        from edgeus.explain import saliency_agreement

        sal = saliency_agreement(teacher, student, img01, x, masks, has, bundle.preprocessing)
        cams = sal.pop("cams")
        t, s = sal["teacher"], sal["student"]
        f = lambda v: "n/a" if v is None else f"{v:.2f}"  # noqa: E731
        sec = [f"Grad-CAM (captum `LayerGradCam`) of the teacher and of the student's torch model (`{sname}`, the "
               f"model the INT8 file was made from), each for its own predicted class, on {sal['n_images']} test "
               f"images; {sal['n_lesion']} have a lesion mask.", ""]
        if sal["n_lesion"]:
            d = lambda a, b: "n/a" if a is None or b is None else f"{(b - a) * 100:+.1f} pt"  # noqa: E731
            sec += ["| | teacher | student | student − teacher |", "|---|---|---|---|",
                    f"| CAM mass inside the lesion (mean) | {f(t['lesion_fraction'])} | {f(s['lesion_fraction'])} | "
                    f"{d(t['lesion_fraction'], s['lesion_fraction'])} |",
                    f"| pointing game: CAM peak inside the lesion | {f(t['pointing_game'])} | {f(s['pointing_game'])} | "
                    f"{d(t['pointing_game'], s['pointing_game'])} |",
                    f"| a uniform map would score | {f(sal['area_fraction'])} | {f(sal['area_fraction'])} | |", "",
                    f"Teacher and student maps correlate at r = {f(sal['cam_correlation'])} (mean Pearson over images). "
                    + ("**The student looks inside the lesion less than the teacher.**"
                       if (t["lesion_fraction"] or 0) - (s["lesion_fraction"] or 0) > 0.05 else
                       "The student still looks where the teacher looks (within 5 points of lesion mass)."), ""]
        else:
            sec += ["No test image has a lesion mask: no in-lesion score.", ""]
    elif not have_captum:
        sec = ["Grad-CAM needs captum (`pip install captum`): not installed, no saliency section.", ""]
        cams = None
    gal = []
    if pred and "y" in pred and n:
        y, pt, ps = pred["y"][:n], pred["pt"][:n].argmax(1), pred["ps"][:n].argmax(1)
        idx = [int(i) for i in np.flatnonzero((pt == y) & (ps != y))]
        gal = [f"{len(idx)} test image(s) the deployed student gets wrong and the teacher right"
               + (" (the first 8 shown; Grad-CAM of the teacher and of the student's torch model, lesion outlined)"
                  if idx else "."), ""]
        if idx:
            items = [{"index": i, "img": img01[i], "mask": masks[i] if has[i] else None, "y": int(y[i]), "t": int(pt[i]),
                      "s": int(ps[i]), "cam_t": cams["teacher"][i] if cams else None,
                      "cam_s": cams["student"][i] if cams else None} for i in idx[:8]]
            images["gallery"] = fig_gallery(items, classes, figs / "gallery.png")
            gal += ["![Student wrong, teacher right](figures/gallery.png)", ""]
        if cams is not None and n:
            k = next((i for i in range(n) if has[i] and masks[i].any()), 0)
            from edgeus.explain import save_panels

            images["saliency"] = save_panels(figs / "saliency_example.png", img01[k],
                                             [(f"teacher: {classes[int(pt[k])]}", cams["teacher"][k]),
                                              (f"student: {classes[int(ps[k])]}", cams["student"][k])],
                                             masks[k] if has[k] else None, title=f"test image #{k}, true {classes[int(y[k])]}")
            sec += ["![Grad-CAM example](figures/saliency_example.png)", ""]
    return sec, gal, sal


def _robustness_section(rob, classes, figs, images, pred, cfg) -> list[str]:
    s = rob.get("summary", {})
    sec = [f"Mean accuracy change under corruption (corrupted − clean, over every kind and strength): teacher "
           f"{_pts(-s.get('teacher_mean_drop', 0))}, student {_pts(-s.get('student_mean_drop', 0))} — compression "
           + ("**made the model more fragile** (student loses over 2 points more)." if s.get("more_fragile") else
              "did not make it more fragile (within 2 points)."), ""]
    kinds = [k for k in rob["teacher"] if k != "clean"]
    from edgeus.pipeline.robustness import collapses

    found = collapses({k: rob[k] for k in ("teacher", "student") if k in rob})
    collapse = []
    for name in ("teacher", "student"):
        mine = [c for c in found if c["model"] == name]
        if mine:
            by_kind: dict = {}
            for c in mine:
                by_kind.setdefault(c["corruption"], []).append(f"{c['strength']:g}")
            onto = sorted({c["class"] for c in mine})
            collapse.append(f"the {name} calls nearly every image {' / '.join(onto)} under "
                            + "; ".join(f"{k} {', '.join(v)}" for k, v in by_kind.items()))
    if collapse:
        sec += ["**Collapse**: " + "; ".join(collapse) + " (strengths listed). Its accuracy there is that class's "
                "share of the test split, not skill.", ""]
    sec += ["Recall per class at each corruption's strongest setting (student − teacher in points):", "",
            "| corruption | " + " | ".join(f"{c} teacher | {c} student" for c in classes) + " |",
            "|---|" + "---|" * (2 * len(classes))]
    for k in ["clean"] + kinds:
        def rec(name):
            e = rob[name][k] if k == "clean" else rob[name][k][-1]
            return e.get("recall") or {}
        rt, rs = rec("teacher"), rec("student")
        strength = "" if k == "clean" else f" {rob['teacher'][k][-1]['strength']:g}"
        cells = []
        for c in classes:
            a, b = rt.get(c), rs.get(c)
            cells += ["–" if a is None else f"{a:.2f}",
                      "–" if b is None else f"{b:.2f}" + ("" if a is None else f" ({(b - a) * 100:+.0f})")]
        sec.append(f"| {k}{strength} | " + " | ".join(cells) + " |")
    sec.append("")
    images["robustness"] = fig_robustness(rob, figs / "robustness.png")
    sec += ["![Robustness](figures/robustness.png)", ""]
    bundle = (pred or {}).get("bundle")
    if bundle is not None and len(bundle.test):
        try:
            k = next((i for i in range(len(bundle.test)) if bundle.test.labels[i] != 0), 0)
            img = bundle.test.raw(k)[0][0].numpy()
            strengths = list(rob["teacher"][kinds[0]][i]["strength"] for i in range(len(rob["teacher"][kinds[0]])))
            images["corruptions"] = fig_corruption_examples(img, kinds, strengths, figs / "corruptions.png",
                                                            int(_get(cfg, "seed", 0) or 0))
            sec += [f"Example: test image #{k} under each corruption:", "",
                    "![Corrupted examples](figures/corruptions.png)", ""]
        except Exception as e:  # noqa: BLE001
            log.warning("report: corruption examples not drawn: %s", e)
    return sec


def write_csv(rows: list[dict], classes: list[str], path: Path) -> Path:
    """The ledger as CSV: one row per ledger row, recall per class as columns."""
    head = ["stage", "kind", "of", "artifact", "params", "macs", "bytes", "latency_ms", "speedup_vs_teacher_retimed_with_row",
            "accuracy", "macro_f1", "auc", "ece", *[f"recall_{c}" for c in classes], "n", "wall_s", "skipped"]
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(head)
    for r in rows:
        m = r.get("metrics") or {}
        w.writerow([r.get("stage"), r.get("kind"), r.get("of") or "", r.get("artifact") or "", r.get("params"),
                    r.get("macs"), r.get("bytes"), r.get("latency_ms"), r.get("speedup"), m.get("accuracy"),
                    m.get("macro_f1"), m.get("auc"), m.get("ece"), *[(m.get("recall") or {}).get(c) for c in classes],
                    m.get("n"), r.get("wall_s"), r.get("skipped") or ""])
    path.write_text(buf.getvalue())   # csv writes None as an empty cell
    return path


# ----------------------------------------------------------------------------------------------- HTML
CSS = ("body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:880px;margin:1.2em auto;padding:0 10px;"
       "color:#222;font-size:14px;line-height:1.4}h1{font-size:20px}h2{font-size:17px;border-bottom:1px solid #ddd;"
       "padding-bottom:3px;margin-top:1.6em}table{border-collapse:collapse;font-size:12px;margin:6px 0;display:block;"
       "overflow-x:auto;max-width:100%}td,th{border:1px solid #ccc;padding:2px 6px;text-align:right;white-space:nowrap}"
       "td:first-child,th:first-child{text-align:left}th{background:#f4f4f4}img{max-width:100%;height:auto}"
       "code{background:#f3f3f3;padding:1px 3px;font-size:12px;word-break:break-all}ul{padding-left:1.3em}"
       "li{margin:3px 0}.warn li{color:#8a1f11}")


def _html(md: list[str], run_dir: Path) -> str:
    body = []
    for line in md:
        if line.startswith("!["):
            alt = line[2:line.index("]")]
            name = line[line.index("(") + 1:-1]
            data = base64.b64encode((run_dir / name).read_bytes()).decode()
            body.append(f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">')
        else:
            body.append(line)
    return ("<!doctype html><html><head><meta charset='utf-8'><meta name='viewport' content='width=device-width'>"
            "<title>edgeus report</title><style>" + CSS + "</style></head><body>" + _md_to_html("\n".join(body)) +
            "</body></html>")


def _md_to_html(text: str) -> str:
    """Just enough markdown for our own report: headings, tables, lists, bold, code, links, paragraphs."""
    import re

    out, table, items = [], [], []

    def inline(s):
        s = html.escape(s, quote=False)
        s = re.sub(r"\*\*(.+?)\*\*", r"<b>\1</b>", s)
        s = re.sub(r"\[`(.+?)`\]\((.+?)\)", r'<a href="\2"><code>\1</code></a>', s)
        s = re.sub(r"\[(.+?)\]\((.+?)\)", r'<a href="\2">\1</a>', s)
        return re.sub(r"`(.+?)`", r"<code>\1</code>", s)

    def flush():
        if table:
            cells = [[c.strip() for c in r.strip().strip("|").split("|")] for r in table if not set(r) <= set("|-: ")]
            out.append("<table><tr>" + "".join(f"<th>{inline(c)}</th>" for c in cells[0]) + "</tr>" +
                       "".join("<tr>" + "".join(f"<td>{inline(c)}</td>" for c in r) + "</tr>" for r in cells[1:]) +
                       "</table>")
            table.clear()
        if items:
            warn = any(o.startswith("<p><b>Warnings") for o in out[-1:])
            cls = ' class="warn"' if warn else ""
            out.append(f"<ul{cls}>" + "".join(f"<li>{inline(i)}</li>" for i in items) + "</ul>")
            items.clear()

    for line in text.splitlines():
        if line.startswith("|"):
            table.append(line)
            continue
        if line.startswith("- "):
            if table:
                flush()
            items.append(line[2:])
            continue
        flush()
        if line.startswith("<img"):
            out.append(line)
        elif line.startswith("#"):
            level = len(line) - len(line.lstrip("#"))
            out.append(f"<h{level}>{inline(line[level:].strip())}</h{level}>")
        elif line.strip():
            out.append(f"<p>{inline(line)}</p>")
    flush()
    return "\n".join(out)
