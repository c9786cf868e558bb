"""Clinical gates of a recipe: a student may not lose more than the recipe allows against its
teacher — overall accuracy, the recall of any class (the critical one named first), calibration."""
from __future__ import annotations


def check(stage: str, teacher: dict, student: dict, gates, classes: list[str]) -> list[dict]:
    """All gate results for one stage: [{stage, metric, teacher, student, change, limit, passed}]."""
    out = []

    def add(metric, t, s, change, limit):
        out.append({"stage": stage, "metric": metric, "teacher": t, "student": s, "change": change,
                    "limit": limit, "passed": bool(change <= limit + 1e-9)})

    add("accuracy drop", teacher["accuracy"], student["accuracy"], teacher["accuracy"] - student["accuracy"],
        float(gates.max_accuracy_drop))
    order = list(classes)
    if gates.critical_class in order:
        order.remove(gates.critical_class)
        order.insert(0, gates.critical_class)
    for c in order:
        t, s = teacher["recall"][c], student["recall"][c]
        add(f"recall drop ({c})", t, s, t - s, float(gates.max_recall_drop))
    add("ECE rise", teacher["ece"], student["ece"], student["ece"] - teacher["ece"], float(gates.max_ece_rise))
    return out


def failures(results: list[dict]) -> list[dict]:
    return [r for r in results if not r["passed"]]


def describe(r: dict) -> str:
    return (f"stage {r['stage']}: {r['metric']} {r['change'] * 100:+.1f} points "
            f"(teacher {r['teacher']:.3f}, student {r['student']:.3f}; limit {r['limit'] * 100:.1f} points)")
