"""``prune_model``: the prune stage as one function over (model, the ``prune`` section, injected pieces)."""
from __future__ import annotations

import copy
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from edgeus.prune.common import METHODS, parse_methods, profile, run_finetune

__all__ = ["METHODS", "example_input", "parse_methods", "prune_model"]


def example_input(model: nn.Module, image_size: int, in_chans: int | None = None) -> torch.Tensor:
    """A fixed (seeded, not from the global generator) input of one image at ``image_size``;
    the channels are the model's own (``edgeus_arch``) when it records them, else ``in_chans``."""
    arch = getattr(model, "edgeus_arch", {}) or {}
    in_chans = int(arch.get("in_chans", 1 if in_chans is None else in_chans))
    size = int(image_size)
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, in_chans, size, size, generator=g)


def prune_model(model: nn.Module, pcfg, *, example_inputs: torch.Tensor, finetune: Callable | None = None,
                loaders: dict | None = None, device: str = "cpu", out_dir: str | Path | None = None,
                channel_multiple: int | None = None) -> tuple[nn.Module, dict]:
    """Prune ``model`` as ``pcfg`` (the ``prune`` section) says.

    ``example_inputs``: one input batch (see :func:`example_input`) for tracing and counting MACs.
    ``finetune``: a callable from :func:`edgeus.finetune.make_finetuner` (with or without a teacher);
    without it no fine-tuning happens (the report says so). ``loaders``: the data loaders, needed
    only by data-driven importance (``taylor`` reads ``train_plain``). ``channel_multiple``: the
    channel multiple the target's INT8 kernels want (``target.channel_multiple``); structured pruning
    keeps every channel count a multiple of it (and of ``prune.round_to``), at least one multiple,
    while the MACs budget search accounts for the rounding. Returns the pruned model
    (on the CPU, in eval mode; always a new object) and a JSON-able report. ``model`` itself is never
    modified, whatever the method or target (``prune.ratio`` prunes a copy, as ``prune.target_macs``
    does), so the model passed in can be the teacher that ``finetune`` distils from.
    """
    from edgeus.prune.semi_structured import prune_semi_structured
    from edgeus.prune.structured import prune_structured
    from edgeus.prune.unstructured import prune_unstructured

    from edgeus.models.ensemble import is_ensemble

    if is_ensemble(model):
        from edgeus.errors import EdgeusError

        raise EdgeusError("pruning an ensemble teacher makes no sense (the student must keep one model's cost): "
                          "prune one member (edgeus.models.ensemble.student_member, teacher.student_from=<index>)")
    methods = parse_methods(pcfg.method)
    model = copy.deepcopy(model).to("cpu")
    example = example_inputs
    t0 = time.time()
    report: dict = {"stage": "prune", "methods": methods, "before": profile(model, example),
                    "input": list(example.shape)}
    for i, m in enumerate(methods):
        if m == "structured":
            model, rep = prune_structured(model, pcfg, example, finetune=finetune, loaders=loaders, device=device,
                                          out_dir=out_dir, methods=methods, channel_multiple=channel_multiple)
            if i == len(methods) - 1:   # the final fine-tune runs after the last method only
                model, ft = run_finetune(model, finetune, pcfg.finetune_epochs, out_dir, "prune-final", lr=pcfg.lr,
                                         use_teacher=bool(pcfg.use_teacher))
                if ft:
                    rep["finetune"] = ft
        elif m == "unstructured":
            model, rep = prune_unstructured(model, pcfg, example, finetune=finetune, out_dir=out_dir)
        else:
            model, rep = prune_semi_structured(model, pcfg, example, finetune=finetune, out_dir=out_dir)
        report[m] = rep
    model.eval()
    report["after"] = profile(model, example)
    report["macs_ratio"] = round(report["after"]["macs"] / max(1, report["before"]["macs"]), 4)
    report["params_ratio"] = round(report["after"]["params"] / max(1, report["before"]["params"]), 4)
    report["seconds"] = round(time.time() - t0, 1)
    return model, report
