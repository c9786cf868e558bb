"""Version strings and ranges (``">=10.3,<11"``) without a dependency on ``packaging``."""
from __future__ import annotations

import operator
import re

_OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq, "!=": operator.ne,
        ">": operator.gt, "<": operator.lt}


def parse_version(v: str | int | float) -> tuple[int, ...]:
    """``"10.3.0.26"`` -> ``(10, 3, 0, 26)``; trailing text (``"8.5.2-1+cuda11.4"``) is ignored."""
    parts = re.findall(r"\d+", str(v).split("-")[0].split("+")[0])
    if not parts:
        raise ValueError(f"not a version: {v!r}")
    return tuple(int(p) for p in parts)


def _cmp(a: tuple[int, ...], b: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    n = max(len(a), len(b))
    return a + (0,) * (n - len(a)), b + (0,) * (n - len(b))


def in_range(version: str, spec: str | None) -> bool:
    """Whether ``version`` satisfies every comma-separated clause of ``spec`` (None: any)."""
    if not spec:
        return True
    v = parse_version(version)
    for clause in str(spec).split(","):
        clause = clause.strip()
        if not clause:
            continue
        m = re.match(r"(>=|<=|==|!=|>|<)?\s*(.+)", clause)
        op, ref = (m.group(1) or "=="), m.group(2)
        r = parse_version(ref)
        if op == "==" and len(r) < len(v):  # "==10.3" matches 10.3.x
            a, b = v[: len(r)], r
        else:
            a, b = _cmp(v, r)
        if not _OPS[op](a, b):
            return False
    return True


def lower_bound(spec: str | None) -> tuple[int, ...] | None:
    """The smallest version a spec admits, when it names one (``>=10.3,<11`` -> ``(10, 3)``)."""
    if not spec:
        return None
    for clause in str(spec).split(","):
        m = re.match(r"\s*(>=|==|>)\s*(.+)", clause)
        if m:
            return parse_version(m.group(2))
    return None


def same_engine_version(built: str, here: str) -> bool:
    """A serialized engine only loads on the TensorRT version that built it (major.minor.patch)."""
    return parse_version(built)[:3] == parse_version(here)[:3]
