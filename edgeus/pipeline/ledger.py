"""The run ledger: one row per stage (size, MACs, latency, clinical metrics, wall time), as JSON
and as a markdown table."""
from __future__ import annotations

import json
import os
from pathlib import Path

from edgeus.stats import fmt_interval


def write_json(path: Path, obj) -> None:
    """Write to a temporary name, then rename: a killed process never leaves half a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(json.dumps(obj, indent=1, default=_default))
        os.replace(tmp, path)
    except BaseException:          # disk full, interrupted: no temporary file is left behind
        tmp.unlink(missing_ok=True)
        raise


def _default(o):
    try:
        import numpy as np

        if isinstance(o, np.generic):
            return o.item()
        if isinstance(o, np.ndarray):
            return o.tolist()
    except ImportError:  # pragma: no cover
        pass
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _fmt(v, spec=".3f", none="–"):
    return none if v is None else format(v, spec)


def _size(b):
    if b is None:
        return "–"
    for unit in ("B", "KB", "MB", "GB"):
        if b < 1024 or unit == "GB":
            return f"{b:.0f} {unit}" if unit == "B" else f"{b:.2f} {unit}"
        b /= 1024


def markdown(rows: list[dict], classes: list[str], critical: str | None = None) -> str:
    """The ledger as a markdown table; the interval column is student − teacher on the same test images
    (paired bootstrap, edgeus.stats), in points."""
    rec = [critical] + [c for c in classes if c != critical] if critical in classes else list(classes)
    head = ["stage", "params", "MACs", "bytes", "ORT ms", "speed-up", "acc", "macro-F1", "AUC", "ECE"] + \
        [f"recall {c}" for c in rec] + ["acc vs teacher [95 % CI]", "McNemar p", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        m = r.get("metrics") or {}
        stage = f"{r['stage']} (skipped: {r['skipped']})" if r.get("skipped") else r["stage"]
        cells = [stage, f"{r['params'] / 1e6:.3f} M" if r.get("params") is not None else "–",
                 f"{r['macs'] / 1e6:.1f} M" if r.get("macs") is not None else "–", _size(r.get("bytes")),
                 _fmt(r.get("latency_ms"), ".2f"), _fmt(r.get("speedup"), ".2f") + ("×" if r.get("speedup") else ""),
                 _fmt(m.get("accuracy")), _fmt(m.get("macro_f1")), _fmt(m.get("auc")), _fmt(m.get("ece"))]
        cells += [_fmt((m.get("recall") or {}).get(c)) for c in rec]
        vs = r.get("vs_teacher") or {}
        cells.append(fmt_interval(vs["intervals"]["accuracy"]) if vs else "–")   # student − teacher, paired
        cells.append(_fmt((vs.get("mcnemar") or {}).get("p_value"), ".3g"))
        cells.append(_fmt(r.get("wall_s"), ".1f"))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
