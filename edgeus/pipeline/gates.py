"""Clinical gates of a recipe: a student may not lose more than the recipe allows against its
teacher — overall accuracy, the recall of any class (the critical one named first), calibration.

Two modes (``gates.mode``):

* ``point`` — the student's point estimate against the teacher's (the quick profile's default);
* ``noninferiority`` — the paired bootstrap interval of *student − teacher* (:mod:`edgeus.stats`)
  must lie within the margin: a gate **passes** when the interval's worst end is within the
  allowed loss, **fails** when it is not and the split is large enough to tell, and is
  **underpowered** when the split is too small to show non-inferiority at that margin (it says
  how many images would be needed) — instead of passing or failing by which images landed in test.

A model that segments (the two-stage models: its ledger metrics carry ``dice``) is also gated on the
mean Dice of its lesion mask (``gates.max_dice_drop``) when teacher and student both segment; Dice is
judged on the point estimates in both modes (the paired intervals cover the classification metrics).

Sign convention everywhere: ``change = student − teacher``; ``limit`` is the loss allowed (accuracy,
recall, Dice) or the rise allowed (ECE), a positive number.

The critical class follows the dataset: ``gates.critical_class=auto`` (the recipes' setting) is the
dataset's own (:data:`DATASET_CRITICAL`: ``malignant`` for the phantom and BUSI, ``AS`` / ``Severe_AS``
for TMED-2's schemes, none for CAMUS views), resolved when the configuration is composed
(:func:`resolve_critical_class`); a name that is not a class of the data is refused before a run starts
(:func:`check_critical_class`), and again by :func:`check`.
"""
from __future__ import annotations

# the dataset facts behind gates.critical_class live with the data; gates re-exports them
from edgeus.data.critical import (AUTO, DATASET_CRITICAL, check_critical_class, known_classes,  # noqa: F401
                                  resolve_critical_class)
from edgeus.errors import EdgeusError

MODES = ("point", "noninferiority")


def _order(classes: list[str], critical: str | None) -> list[str]:
    order = list(classes)
    if critical is not None:
        if critical not in order:
            raise EdgeusError(f"gates.critical_class={critical!r} is not a class of this data; "
                              f"classes: {', '.join(classes)}")
        order.remove(critical)
        order.insert(0, critical)
    return order


def check(stage: str, teacher: dict, student: dict, gates, classes: list[str], comparison: dict | None = None) -> list[dict]:
    """All gate results for one stage.

    ``teacher`` / ``student`` are metric dicts (:func:`edgeus.evaluate.compute_metrics`);
    ``comparison`` is :func:`edgeus.stats.compare` of the two on the same images (needed for
    ``noninferiority``, shown beside the point estimates otherwise). Each result:
    {stage, metric, teacher, student, change, limit, lo, hi, status, passed, n, needed, note}.
    """
    mode = str(getattr(gates, "mode", "point") or "point")
    if mode not in MODES:
        raise EdgeusError(f"gates.mode={mode!r}; expected one of {', '.join(MODES)}")
    if mode == "noninferiority" and comparison is None:
        raise EdgeusError("gates.mode=noninferiority needs per-image predictions of teacher and student")
    intervals = (comparison or {}).get("intervals", {})
    disc = (comparison or {}).get("discordance", {})
    out = []

    def add(metric, key, t, s, limit, lower_is_better=False, n=None, disc_rate=None, point_only=False):
        from edgeus.stats import images_needed

        change = None if t is None or s is None else s - t
        loss = None if change is None else (change if lower_is_better else -change)
        iv = intervals.get(key, {})
        lo, hi = iv.get("lo"), iv.get("hi")
        worst = None if lo is None else (hi if lower_is_better else -lo)   # the interval's worst end, as a loss
        best = None if lo is None else (lo if lower_is_better else -hi)
        needed = images_needed(disc_rate, limit, n) if (n is not None and disc_rate is not None) else None
        note = ""
        if n == 0:
            status, note = "fail", "no test images of this class: nothing shows it is kept"
        elif point_only:
            status = "pass" if loss is not None and loss <= limit + 1e-9 else "fail"
            if mode != "point":
                note = "point estimates (the paired intervals cover the classification metrics)"
        elif mode == "point":
            status = "pass" if loss is not None and loss <= limit + 1e-9 else "fail"
        elif worst is not None and worst <= limit + 1e-9:
            status = "pass"
        elif best is not None and best > limit + 1e-9:
            status = "fail"      # even the interval's best end loses more than allowed
        elif needed is not None and n is not None and n < needed:
            status, note = "underpowered", f"n = {n}, about {needed} images needed at this margin"
        else:
            status = "fail"
        out.append({"stage": stage, "metric": metric, "mode": mode, "teacher": t, "student": s, "change": change,
                    "limit": float(limit), "lower_is_better": lower_is_better, "lo": lo, "hi": hi,
                    "status": status, "passed": status == "pass", "n": n, "needed": needed, "note": note})

    n_all = (comparison or {}).get("n", student.get("n"))
    add("accuracy", "accuracy", teacher["accuracy"], student["accuracy"], float(gates.max_accuracy_drop),
        n=n_all, disc_rate=disc.get("all"))
    support = {c: v.get("support") for c, v in (student.get("per_class") or {}).items()}
    for c in _order(classes, gates.critical_class):
        add(f"recall ({c})", f"recall/{c}", teacher["recall"][c], student["recall"][c], float(gates.max_recall_drop),
            n=support.get(c), disc_rate=disc.get(c))
    add("ECE", "ece", teacher["ece"], student["ece"], float(gates.max_ece_rise), lower_is_better=True,
        n=n_all, disc_rate=None)
    if teacher.get("dice") is not None and student.get("dice") is not None:   # both segment (two-stage)
        limit = getattr(gates, "max_dice_drop", None)
        add("Dice (mask)", "dice", teacher["dice"], student["dice"], float(0.02 if limit is None else limit),
            n=(student.get("segmentation") or {}).get("n"), point_only=True)
    return out


def failures(results: list[dict]) -> list[dict]:
    return [r for r in results if r.get("status", "pass" if r["passed"] else "fail") == "fail"]


def underpowered(results: list[dict]) -> list[dict]:
    return [r for r in results if r.get("status") == "underpowered"]


def describe(r: dict) -> str:
    """One line: ``prune: accuracy −1.6 pt [−4.1, +0.8] (teacher 0.967, student 0.951); may lose 1.0 pt: fail``."""
    pts = lambda v: "?" if v is None else f"{v * 100:+.1f}"
    change = "n/a" if r.get("change") is None else f"{r['change'] * 100:+.1f} pt"
    iv = f" [{pts(r['lo'])}, {pts(r['hi'])}]" if r.get("lo") is not None else ""
    allowed = "rise" if r.get("lower_is_better") else "lose"
    t = "?" if r.get("teacher") is None else f"{r['teacher']:.3f}"
    s = "?" if r.get("student") is None else f"{r['student']:.3f}"
    status = r.get("status", "pass" if r["passed"] else "fail")
    extra = f" ({r['note']})" if r.get("note") else ""
    return (f"{r['stage']}: {r['metric']} {change}{iv} (teacher {t}, student {s}); "
            f"may {allowed} {r['limit'] * 100:.1f} pt: {status}{extra}")
