"""What every pruning method shares: the method names, the profile (MACs, parameters) a report
shows, and fine-tuning through the injected callable."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from edgeus.errors import EdgeusError

log = logging.getLogger("edgeus.prune")

METHODS = ("structured", "unstructured", "semi_structured")
_ALIASES = {"2:4": "semi_structured", "semi-structured": "semi_structured", "semistructured": "semi_structured",
            "channel": "structured", "magnitude": "unstructured"}


def parse_methods(method) -> list[str]:
    """``prune.method`` as a list of canonical method names (``+`` or ``,`` joins several)."""
    if isinstance(method, str):
        parts = [p.strip() for p in method.replace(",", "+").split("+") if p.strip()]
    else:
        parts = [str(p).strip() for p in method]
    out = []
    for p in parts:
        p = _ALIASES.get(p.lower(), p.lower())
        if p not in METHODS:
            raise EdgeusError(f"unknown prune.method {p!r}; choose from {', '.join(METHODS)} (join with '+')")
        if p not in out:
            out.append(p)
    if not out:
        raise EdgeusError("prune.method is empty")
    return out


def count_macs(model: nn.Module, example: torch.Tensor) -> int:
    """MACs at ``example``'s shape: edgeus's one MACs counter, :func:`edgeus.models.profile.count_macs`."""
    from edgeus.models.profile import count_macs as _count

    return _count(model, example=example)


def profile(model: nn.Module, example: torch.Tensor) -> dict:
    return {"macs": count_macs(model, example), "params": sum(p.numel() for p in model.parameters())}


def summary(metrics: dict | None) -> dict | None:
    if not metrics:
        return None
    keep = ("accuracy", "macro_f1", "recall", "auc", "ece")
    return {k: metrics[k] for k in keep if k in metrics}


def run_finetune(model: nn.Module, finetune: Callable | None, epochs: int, out_dir, desc: str, *,
                 lr: float | None = None, use_teacher: bool = True) -> tuple[nn.Module, dict | None]:
    """Fine-tune through the injected ``finetune`` callable (see :mod:`edgeus.finetune`); returns
    (model on the CPU, the report row or None when no epochs were asked for)."""
    if epochs <= 0:
        return model, None
    if finetune is None:
        return model, {"epochs": 0, "skipped": "no data given (finetune=None)"}
    sub = Path(out_dir) / desc if out_dir else None
    extra = {} if use_teacher else {"use_teacher": False}   # the contract's keywords, plus this one only when needed
    model, res = finetune(model, epochs=int(epochs), out_dir=sub, desc=desc, lr=lr, **extra)
    model.to("cpu")
    row = {"epochs": int(epochs), "with_teacher": bool(res.get("with_teacher")), "best_epoch": res.get("best_epoch"),
           "val": summary(res.get("best_metrics"))}
    if res.get("signals"):   # the kept epoch's pick (train.select) and each epoch's val metric and teacher agreement
        row.update(select=res.get("select"), signals=res.get("signals"))
    return model, row
