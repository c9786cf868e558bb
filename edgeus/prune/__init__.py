"""Pruning: structured channel pruning on the dependency graph, unstructured and 2:4 sparsity.

    from edgeus.prune import prune_model
    model, report = prune_model(model, cfg, bundle=bundle, teacher=teacher)   # cfg = root config

``cfg.prune.method`` is ``structured`` (a genuinely smaller dense model: fewer MACs, faster on
every runtime), ``unstructured`` (global magnitude sparsity: a smaller compressed file, no dense
speed-up) or ``semi_structured`` (the 2:4 pattern that sparse tensor cores and TensorRT's
sparse-weights flag accelerate), or several joined with ``+``. The report is JSON-able and says
what was cut, what was left whole and why, and what was measured.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from pathlib import Path

import torch
import torch.nn as nn

from edgeus.errors import EdgeusError
from edgeus.prune.config import PruneConfig

log = logging.getLogger("edgeus.prune")

METHODS = ("structured", "unstructured", "semi_structured")
_ALIASES = {"2:4": "semi_structured", "semi-structured": "semi_structured", "semistructured": "semi_structured",
            "channel": "structured", "magnitude": "unstructured"}

__all__ = ["PruneConfig", "prune_model", "parse_methods", "example_input", "METHODS"]


def parse_methods(method) -> list[str]:
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


def example_input(model: nn.Module, cfg) -> torch.Tensor:
    arch = getattr(model, "edgeus_arch", {}) or {}
    in_chans = int(arch.get("in_chans", cfg.data.in_chans))
    size = int(cfg.data.image_size)
    g = torch.Generator().manual_seed(0)
    return torch.randn(1, in_chans, size, size, generator=g)


def _profile(model: nn.Module, example: torch.Tensor) -> dict:
    from edgeus.prune.structured import _count_macs

    return {"macs": _count_macs(model, example), "params": sum(p.numel() for p in model.parameters())}


def _summary(metrics: dict | None) -> dict | None:
    if not metrics:
        return None
    keep = ("accuracy", "macro_f1", "recall", "auc", "ece")
    return {k: metrics[k] for k in keep if k in metrics}


def _finetune(model, cfg, bundle, teacher, epochs, out_dir, device, desc):
    """Fine-tune in place; returns (model, row or None)."""
    if epochs <= 0:
        return model, None
    if bundle is None:
        return model, {"epochs": 0, "skipped": "no data given (bundle=None)"}
    from edgeus.train import finetune

    pcfg = cfg.prune
    t = teacher if pcfg.use_teacher else None
    sub = Path(out_dir) / desc if out_dir else None
    note = None
    try:
        model, res = finetune(model, bundle, cfg, teacher=t, epochs=int(epochs), out_dir=sub, device=device,
                              desc=desc, lr=pcfg.lr)
    except ImportError as e:   # distillation not available: plain CE
        if t is None:
            raise
        note = f"teacher not used ({e}); plain cross-entropy"
        model, res = finetune(model, bundle, cfg, teacher=None, epochs=int(epochs), out_dir=sub, device=device,
                              desc=desc, lr=pcfg.lr)
    model.to("cpu")
    row = {"epochs": int(epochs), "with_teacher": t is not None and note is None, "best_epoch": res.best_epoch,
           "val": _summary(res.best_metrics)}
    if note:
        row["note"] = note
    return model, row


# ---------------------------------------------------------------------------------------------


def _structured(model, cfg, bundle, teacher, device, out_dir, example) -> tuple[nn.Module, dict]:
    from edgeus.models.structure import record_transform
    from edgeus.prune import importance as imp_mod
    from edgeus.prune.structure import diff, snapshot
    from edgeus.prune.structured import analyse, channel_table, left_whole, prune_once, search_ratio

    pcfg = cfg.prune
    imp = pcfg.importance.lower()
    imp_mod.build_importance(imp)  # fail early on a bad name
    steps = max(1, int(pcfg.steps))
    info = analyse(model, example, list(pcfg.ignore))
    snap0 = snapshot(model)
    prof0 = _profile(model, example)
    rep: dict = {"importance": imp, "global_pruning": bool(pcfg.global_pruning), "steps": steps,
                 "round_to": pcfg.round_to, "max_layer_ratio": pcfg.max_layer_ratio,
                 "block_pruners": sorted(c.__name__ for c in info.pruners),
                 "target": ({"macs_fraction": pcfg.target_macs} if pcfg.target_macs is not None
                            else {"channel_ratio": pcfg.ratio})}
    if pcfg.target_macs is not None and not 0 < pcfg.target_macs <= 1:
        raise EdgeusError(f"prune.target_macs={pcfg.target_macs}: give the fraction of MACs to keep, in (0, 1]")
    if pcfg.target_macs is None and not 0 <= pcfg.ratio < 1:
        raise EdgeusError(f"prune.ratio={pcfg.ratio}: give the fraction of channels to remove, in [0, 1)")

    loaders = None
    if bundle is not None and (imp == "taylor" or (imp == "bn_scale" and pcfg.slimming_epochs > 0)):
        from edgeus.data import build_loaders

        loaders = build_loaders(bundle, cfg.data)
    if imp == "taylor" and loaders is None:
        raise EdgeusError("prune.importance=taylor needs data (first-order Taylor uses loss gradients)")

    if imp == "bn_scale":
        if pcfg.slimming_epochs > 0 and loaders is not None:
            from edgeus.train import Supervised, fit

            w = bundle.class_weights() if cfg.data.balance == "weights" else None
            trainable = imp_mod.SlimmingTrainable(Supervised(model, w), reg=pcfg.slimming_reg)
            sub = Path(out_dir) / "slimming" if out_dir else None
            res = fit(trainable, loaders, cfg.train, sub, classes=bundle.classes, preprocessing=bundle.preprocessing,
                      device=device, desc="prune-slimming", seed=int(cfg.seed), epochs=int(pcfg.slimming_epochs),
                      lr=pcfg.lr)
            model.to("cpu")
            rep["slimming"] = {"epochs": int(pcfg.slimming_epochs), "reg": pcfg.slimming_reg,
                               "val": _summary(res.best_metrics)}
        else:
            rep["slimming"] = {"epochs": 0, "note": "BN-scale importance without sparsity training "
                                                    "(set prune.slimming_epochs and give data for network slimming)"}

    round_to = pcfg.round_to
    if "semi_structured" in parse_methods(pcfg.method):
        # keep input channels multiples of 4 so that 2:4 sparsity can follow on every layer
        round_to = 4 if not round_to else (round_to * 4 // math.gcd(round_to, 4))
        rep["round_to"] = round_to
    kw = dict(importance=imp, global_pruning=bool(pcfg.global_pruning), max_layer_ratio=float(pcfg.max_layer_ratio),
              round_to=round_to, attention_dims=bool(pcfg.prune_attention_dims))
    rows, met = [], True
    for k in range(1, steps + 1):
        t0 = time.time()
        before = snapshot(model)
        if imp == "taylor":
            imp_mod.accumulate_taylor_grads(model, loaders["train_plain"], "cpu", pcfg.taylor_batches)
        if pcfg.target_macs is not None:
            step_target = prof0["macs"] * (1.0 - (1.0 - float(pcfg.target_macs)) * k / steps)
            model, r, macs, inner, ok = search_ratio(model, example, info, step_target,
                                                     tolerance=float(pcfg.macs_tolerance), **kw)
            met = met and ok if k == steps else met
        else:
            keep_prev = 1.0 - float(pcfg.ratio) * (k - 1) / steps
            keep_k = 1.0 - float(pcfg.ratio) * k / steps
            r = 1.0 - keep_k / keep_prev
            inner = prune_once(model, example, info, ratio=r, **kw)
        model.zero_grad(set_to_none=True)
        changes = diff(before, snapshot(model))
        record_transform(model, {"kind": "prune", "method": "structured", "step": k, "modules": changes})
        row = {"step": k, "ratio": round(float(r), 4), **_profile(model, example), "internal_cuts": inner,
               "seconds": round(time.time() - t0, 2)}
        if k < steps:
            model, ft = _finetune(model, cfg, bundle, teacher, pcfg.step_epochs, out_dir, device, f"prune-step{k}")
            if ft:
                row["finetune"] = ft
        rows.append(row)
        log.info("prune step %d/%d: ratio %.3f, MACs %d", k, steps, r, row["macs"])
    snap1 = snapshot(model)
    rep["steps_detail"] = rows
    rep["channels"] = {n: v for n, v in channel_table(snap0, snap1).items()}
    rep["layers_left_whole"] = left_whole(model, info, snap0, snap1)
    prof1 = _profile(model, example)
    if pcfg.target_macs is not None:
        rep["budget_met"] = bool(prof1["macs"] <= prof0["macs"] * float(pcfg.target_macs) * (1 + float(pcfg.macs_tolerance)))
        if not rep["budget_met"]:
            rep["budget_note"] = (f"max_layer_ratio={pcfg.max_layer_ratio} (and the layers left whole) stop "
                                  "the search above the MACs target")
    rep["macs_fraction"] = round(prof1["macs"] / max(1, prof0["macs"]), 4)
    rep["params_fraction"] = round(prof1["params"] / max(1, prof0["params"]), 4)
    return model, rep


def _sparse_layers(model, cfg, example):
    from edgeus.prune.structured import analyse
    from edgeus.prune.unstructured import weight_layers

    exclude = set()
    reasons = []
    if not cfg.prune.include_classifier:
        info = analyse(model, example)
        exclude |= set(info.output_layers)
        reasons += [{"layer": n, "reason": "output layer kept dense (prune.include_classifier=false)"}
                    for n in info.output_layers]
    for n in cfg.prune.ignore:
        exclude.add(n)
        reasons.append({"layer": n, "reason": "listed in prune.ignore"})
    return weight_layers(model, exclude), reasons


def _unstructured(model, cfg, bundle, teacher, device, out_dir, example) -> tuple[nn.Module, dict]:
    from edgeus.models.structure import record_transform
    from edgeus.prune import unstructured as U

    pcfg = cfg.prune
    if not 0 <= pcfg.sparsity < 1:
        raise EdgeusError(f"prune.sparsity={pcfg.sparsity}: give the fraction of weights to zero, in [0, 1)")
    dense = copy.deepcopy(model) if pcfg.measure_latency else None
    size0 = U.file_sizes(model)
    layers, whole = _sparse_layers(model, cfg, example)
    sched = U.cubic_schedule(pcfg.sparsity, pcfg.sparsity_steps)
    rows, masks = [], {}
    for k, s in enumerate(sched, 1):
        masks = U.global_magnitude_masks(layers, s)
        row = {"step": k, "target_sparsity": round(s, 4), "sparsity": round(U.sparsity_of(layers)["sparsity"], 4)}
        epochs = pcfg.step_epochs if k < len(sched) else pcfg.finetune_epochs
        if epochs > 0:
            with U.MaskKeeper(model, masks):
                model, ft = _finetune(model, cfg, bundle, teacher, epochs, out_dir, device, f"sparse-step{k}")
            layers = {n: model.get_submodule(n) for n in layers}
            U.apply_masks(model, masks)
            if ft:
                row["finetune"] = ft
        rows.append(row)
    sp = U.sparsity_of(layers)
    size1 = U.file_sizes(model)
    rep = {"target_sparsity": pcfg.sparsity, "schedule": "cubic (Zhu & Gupta 2017)", "steps_detail": rows,
           "achieved_sparsity": round(sp["sparsity"], 4), "zeros": sp["zeros"], "weights_considered": sp["weights"],
           "per_layer_sparsity": sp["per_layer"], "layers_left_dense": whole,
           "file_bytes": {"before": size0, "after": size1,
                          "gzip_ratio": round(size1["gzip_bytes"] / max(1, size0["gzip_bytes"]), 4)},
           "masks_left_in_state_dict": U.has_mask_leftovers(model), "note": U.HONEST_NOTE}
    if dense is not None:
        from edgeus.prune.measure import dense_latency_ratio

        rep["onnxruntime_dense_latency"] = dense_latency_ratio(dense, model, example)
    record_transform(model, {"kind": "sparsity", "pattern": "unstructured", "sparsity": rep["achieved_sparsity"],
                             "layers": sorted(layers)})
    return model, rep


def _semi_structured(model, cfg, bundle, teacher, device, out_dir, example) -> tuple[nn.Module, dict]:
    from edgeus.models.structure import record_transform
    from edgeus.prune import semi_structured as S
    from edgeus.prune import unstructured as U

    pcfg = cfg.prune
    dense = copy.deepcopy(model) if pcfg.measure_latency else None
    size0 = U.file_sizes(model)
    layers, whole = _sparse_layers(model, cfg, example)
    masks, skipped = S.masks_2_4(layers)
    U.apply_masks(model, masks)
    row = {}
    if pcfg.finetune_epochs > 0:
        with U.MaskKeeper(model, masks):
            model, ft = _finetune(model, cfg, bundle, teacher, pcfg.finetune_epochs, out_dir, device, "sparse-2of4")
        U.apply_masks(model, masks)
        row = ft or {}
    sparse_layers = {n: model.get_submodule(n) for n in masks}
    sp = U.sparsity_of(sparse_layers)
    all_w = sum(model.get_submodule(n).weight.numel() for n in layers)
    rep = {"pattern": "2:4 along input channels (TensorRT / sparse tensor cores)",
           "layers_2_4": sorted(masks), "pattern_holds": all(S.check_2_4(m.weight) for m in sparse_layers.values()),
           "sparsity_in_2_4_layers": round(sp["sparsity"], 4),
           "fraction_of_weights_in_2_4_layers": round(sp["weights"] / max(1, all_w), 4),
           "layers_left_dense": whole + skipped,
           "file_bytes": {"before": size0, "after": U.file_sizes(model)},
           "note": ("2:4 sparsity speeds up only sparse tensor cores (Ampere and later, Jetson Orin) when the "
                    "TensorRT engine is built with the sparse-weights flag; dense runtimes see no gain")}
    if row:
        rep["finetune"] = row
    if dense is not None:
        from edgeus.prune.measure import dense_latency_ratio

        rep["onnxruntime_dense_latency"] = dense_latency_ratio(dense, model, example)
    record_transform(model, {"kind": "sparsity", "pattern": "2:4", "layers": sorted(masks)})
    return model, rep


def prune_model(model: nn.Module, cfg, bundle=None, teacher: nn.Module | None = None, device: str = "cpu",
                out_dir: str | Path | None = None) -> tuple[nn.Module, dict]:
    """Prune ``model`` as ``cfg.prune`` says; fine-tune on ``bundle`` (with ``teacher`` when given).

    Returns the pruned model (on the CPU, in eval mode; possibly a new object) and a JSON-able report.
    """
    pcfg = cfg.prune
    methods = parse_methods(pcfg.method)
    model = model.to("cpu")
    if teacher is not None:
        teacher.eval()
    example = example_input(model, cfg)
    t0 = time.time()
    report: dict = {"stage": "prune", "methods": methods, "before": _profile(model, example),
                    "input": list(example.shape)}
    fns = {"structured": _structured, "unstructured": _unstructured, "semi_structured": _semi_structured}
    for i, m in enumerate(methods):
        if m == "structured":
            # the final fine-tune runs after the last method only
            model, rep = fns[m](model, cfg, bundle, teacher, device, out_dir, example)
            if i == len(methods) - 1:
                model, ft = _finetune(model, cfg, bundle, teacher, pcfg.finetune_epochs, out_dir, device, "prune-final")
                if ft:
                    rep["finetune"] = ft
        else:
            model, rep = fns[m](model, cfg, bundle, teacher, device, out_dir, example)
        report[m] = rep
    model.eval()
    report["after"] = _profile(model, example)
    report["macs_ratio"] = round(report["after"]["macs"] / max(1, report["before"]["macs"]), 4)
    report["params_ratio"] = round(report["after"]["params"] / max(1, report["before"]["params"]), 4)
    report["seconds"] = round(time.time() - t0, 1)
    return model, report
