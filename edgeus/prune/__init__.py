"""Pruning: structured channel pruning on the dependency graph, unstructured and 2:4 sparsity.

    from edgeus.prune import example_input, prune_model
    ft = make_finetuner(cfg, bundle, teacher=teacher)                    # edgeus.finetune (optional)
    model, report = prune_model(model, cfg.prune, example_inputs=example_input(model, 64), finetune=ft)

``prune.method`` is ``structured`` (a genuinely smaller dense model: fewer MACs, faster on every
runtime; :mod:`edgeus.prune.structured`), ``unstructured`` (global magnitude sparsity: a smaller
compressed file, no dense speed-up; :mod:`edgeus.prune.unstructured`) or ``semi_structured`` (the
2:4 pattern that sparse tensor cores and TensorRT's sparse-weights flag accelerate;
:mod:`edgeus.prune.semi_structured`), or several joined with ``+``. The report is JSON-able and
says what was cut, what was left whole and why, and what was measured.

Imports are lazy: ``edgeus.config`` imports ``edgeus.prune.config`` and must not pull in torch.
"""
from __future__ import annotations

from edgeus.lazy import lazy_exports

_API = {
    "PruneConfig": "edgeus.prune.config",
    "prune_model": "edgeus.prune.api",
    "example_input": "edgeus.prune.api",
    "parse_methods": "edgeus.prune.common",
    "METHODS": "edgeus.prune.common",
}
__all__ = sorted(_API)


__getattr__ = lazy_exports(__name__, _API)
