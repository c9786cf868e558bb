"""Structured (channel) pruning on torch-pruning's dependency graph.

Three concerns in three places, as in torch-pruning: the graph (what is coupled: torch-pruning's
``DependencyGraph`` plus the block pruners registered in :mod:`edgeus.prune.custom_pruners`), the
scoring (:mod:`edgeus.prune.importance`), and the policy here (:func:`prune_structured`): how much
(a channel ratio, or a MACs budget found by bisection over the ratio on a copy), when (N iterative
steps with fine-tuning between them), what is left whole (the layers that produce the model's
output, ``prune.ignore``), and a record of the new shapes so that a checkpoint rebuilds the pruned
model (:mod:`edgeus.prune.structure`). Nothing here names a model's blocks: what a block needs
comes from its registered pruner.
"""
from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from edgeus.errors import EdgeusError
from edgeus.prune import custom_pruners as cp
from edgeus.prune import seed_pruners  # noqa: F401  (registers the Ghost module's pruner; custom_pruners holds the registry)
from edgeus.prune.common import count_macs, parse_methods, profile, run_finetune, summary
from edgeus.prune.importance import build_importance
from edgeus.prune.structure import diff, snapshot

log = logging.getLogger("edgeus.prune")

OUTPUT_REASON = "produces the model output (class logits or another head); cutting it would change the output"


@dataclass
class GraphInfo:
    """Facts about a model's graph that do not change while it is pruned (found once)."""
    pruners: dict
    transparent: dict
    output_layers: list[str]
    ignored: dict[str, str] = field(default_factory=dict)   # name -> reason


def block_names(info: GraphInfo) -> list[str]:
    """Type names of the blocks in the model that have a registered pruner."""
    return sorted(c.__name__ for c in info.pruners)


def _trace_kwargs(info: GraphInfo) -> dict:
    return {"customized_pruners": dict(info.pruners) or None,
            "forward_fn": cp.make_forward_fn(info.pruners, info.transparent)}


def analyse(model: nn.Module, example: torch.Tensor, ignore: list[str] = ()) -> GraphInfo:
    """Find the block pruners a model needs, the layers feeding its output, and the ignore list."""
    import torch_pruning as tp

    pruners = cp.block_pruners_for(model)
    transparent = {c: why for c, why in cp.transparent_blocks().items() if any(type(m) is c for m in model.modules())}
    info = GraphInfo(pruners=pruners, transparent=transparent, output_layers=[])
    was = model.training
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, verbose=False, **_trace_kwargs(info))
    model.train(was)
    names = {m: n for n, m in model.named_modules()}
    roots = (nn.Conv2d, nn.Linear, *pruners.keys())
    outs, seen = set(), set()
    # sinks of the graph: the module producing the output maps to it directly, or an _OutputOp does
    sinks = [n for n in dg.module2node.values() if not n.outputs or isinstance(n.module, tp.ops._OutputOp)]
    stack = []
    for n in sinks:
        if isinstance(n.module, roots):
            outs.add(names.get(n.module, ""))
        else:
            stack.append(n)
    while stack:
        node = stack.pop()
        if node in seen:
            continue
        seen.add(node)
        for inp in node.inputs:
            if isinstance(inp.module, roots):
                outs.add(names.get(inp.module, ""))
            else:
                stack.append(inp)
    info.output_layers = sorted(o for o in outs if o)
    for n in info.output_layers:
        info.ignored[n] = OUTPUT_REASON
    for n in ignore:
        try:
            model.get_submodule(n)
        except AttributeError:
            raise EdgeusError(f"prune.ignore names {n!r}, which the model does not have") from None
        info.ignored[n] = "listed in prune.ignore"
    return info


_PRUNER = None


def _pruner_class():
    """torch-pruning's ``BasePruner`` with ``round_to`` that can be trusted by a budget search.

    torch-pruning rounds the channels a layer keeps *down* to a multiple of ``round_to``; a layer
    that would keep fewer than ``round_to`` rounds to zero, and a cut that removes every channel is
    dropped, so the layer stays whole. Under a deep cut the smallest layers (an RSMAS stem and its
    first stage) then kept all their channels and the MACs budget was missed, while a slightly
    smaller ratio pruned them. Here a layer keeps the nearest multiple, never fewer than
    ``round_to`` (a floor: no 1-channel bottleneck), and a layer of at most ``round_to`` channels is
    left as it is, so MACs fall steadily with the ratio. For a layer of ``g`` channel groups the
    per-group count moves in steps that keep the total a multiple of ``round_to``.
    """
    global _PRUNER
    if _PRUNER is not None:
        return _PRUNER
    import sys

    import torch_pruning as tp

    class RoundingPruner(tp.pruner.BasePruner):
        def _round_to(self, n_pruned, current_channels, round_to):
            # torch-pruning passes the per-group count of channels to cut and the layer's total; the
            # number of groups is a local of its caller (read defensively: 1 when absent)
            groups = int(sys._getframe(1).f_locals.get("ch_groups", 1) or 1)
            if groups < 1 or current_channels % groups:
                groups = 1
            size = current_channels // groups
            step = cp.per_group_multiple(round_to, groups)
            keep = cp.rounded_keep(size, size - n_pruned, step)
            return max(0, size - keep)

    _PRUNER = RoundingPruner
    return _PRUNER


def prune_once(model: nn.Module, example: torch.Tensor, info: GraphInfo, *, ratio: float, importance: str,
               global_pruning: bool = False, max_layer_ratio: float = 0.9, round_to: int | None = None,
               internal: bool = True, attention_dims: bool = True) -> dict:
    """One pruning step in place at channel ``ratio`` (relative to the current model)."""
    import torch_pruning as tp

    if ratio <= 0:
        return {}
    ignored = [model.get_submodule(n) for n in info.ignored]
    was = model.training
    pruner = _pruner_class()(
        model, example, importance=build_importance(importance), global_pruning=global_pruning,
        pruning_ratio=float(ratio), max_pruning_ratio=float(max_layer_ratio), round_to=round_to,
        ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear, *info.pruners.keys()],
        **_trace_kwargs(info),
    )
    pruner.DG.verbose = False
    pruner.step()
    model.train(was)
    inner = {}
    if internal:
        ignored_set = set(ignored)
        for name, m in model.named_modules():
            p = info.pruners.get(type(m))
            if p is not None and m not in ignored_set and (attention_dims or not p.cuts_attention_dims):
                cut = p.prune_internal(m, min(float(ratio), float(max_layer_ratio)), multiple=int(round_to or 1))
                if cut:
                    inner[name] = cut
    return inner


def _copy_with_grads(model: nn.Module) -> nn.Module:
    c = copy.deepcopy(model)
    for pc, p in zip(c.parameters(), model.parameters()):
        if p.grad is not None:
            pc.grad = p.grad.detach().clone()
    return c


def search_ratio(model: nn.Module, example: torch.Tensor, info: GraphInfo, target_macs: float, *,
                 tolerance: float = 0.03, iters: int = 10, **kw):
    """Bisection over the channel ratio: the smallest ratio whose pruned copy has MACs <= target.

    Returns ``(pruned_copy, ratio, macs, internal_cuts, met)``; ``met`` is False when even the
    largest ratio allowed (``max_layer_ratio``) stays above the target (the copy at that ratio is
    returned). A ratio at which a block cannot be cut (:class:`~edgeus.prune.custom_pruners.BlockCutError`,
    e.g. SCConv would lose every reused lower channel) counts as too deep: the search moves below it,
    and when no ratio that can be cut meets the target, the deepest one that can is returned (not met).
    """
    hi = float(kw.get("max_layer_ratio", 0.9))
    lo = 0.0
    best = None
    deepest = None          # the deepest ratio that could be cut, while above the target

    def trial(r):
        c = _copy_with_grads(model)
        try:
            inner = prune_once(c, example, info, ratio=r, **kw)
        except cp.BlockCutError as e:
            log.info("prune: ratio %.4f cannot be cut (%s); trying less", r, e)
            return None
        return c, count_macs(c, example), inner

    first = trial(hi)
    if first is not None:
        c, macs, inner = first
        if macs > target_macs:
            return c, hi, macs, inner, False
        best = (c, hi, macs, inner)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        res = trial(mid)
        if res is None:
            hi = mid
            continue
        c, macs, inner = res
        if macs <= target_macs:
            hi, best = mid, (c, mid, macs, inner)
            if macs >= target_macs * (1 - tolerance):
                break
        else:
            lo, deepest = mid, (c, mid, macs, inner)
    if best is None:
        if deepest is None:
            raise EdgeusError(f"no channel ratio up to {float(kw.get('max_layer_ratio', 0.9))} can be cut: "
                              "a block would lose every channel of a kind it needs; lower prune.max_layer_ratio")
        c, r, macs, inner = deepest
        return c, r, macs, inner, False
    c, r, macs, inner = best
    return c, r, macs, inner, True


LAYER_TYPES = {"Conv1d", "Conv2d", "Conv3d", "Linear"}


def channel_table(before: dict, after: dict, block_types=()) -> dict[str, list]:
    """{module: [out channels before, after]} for every conv / linear, and every block whose type
    name is in ``block_types`` (the blocks with a registered pruner)."""
    types = LAYER_TYPES | set(block_types)
    table = {}
    for name, a in after.items():
        if a["type"] not in types:
            continue
        attrs_a, attrs_b = a["attrs"], before[name]["attrs"]
        for key in ("out_channels", "out_features"):
            if key in attrs_a and key in attrs_b:
                table[name] = [attrs_b[key], attrs_a[key]]
                break
    return table


def left_whole(model: nn.Module, info: GraphInfo, before: dict, after: dict) -> list[dict]:
    """Layers whose output channels did not change, each with the reason."""
    rows = []
    for name, why in info.ignored.items():
        rows.append({"layer": name, "reason": why})
    for name, m in model.named_modules():
        p = info.pruners.get(type(m))
        if p is not None:
            for part, why in p.whole_parts:
                rows.append({"layer": f"{name}.{part}", "reason": why})
        if type(m) in info.transparent:
            rows.append({"layer": name, "reason": f"not pruned: {info.transparent[type(m)]}"})
    ignored = set(info.ignored)
    for name, (b, a) in channel_table(before, after, block_names(info)).items():
        if b == a and not any(name == i or name.startswith(i + ".") for i in ignored):
            m = model.get_submodule(name)
            if isinstance(m, nn.Conv2d) and m.groups == m.out_channels and m.groups > 1:
                why = "depth-wise conv whose channels follow a layer left whole"
            else:
                why = ("output channels coupled (residual add, concatenation or a gate) to a layer left whole, "
                       "or already at the per-layer limit")
            inside_block = any(name.startswith(n + ".") for n, mm in model.named_modules()
                               if type(mm) in info.pruners or type(mm) in info.transparent)
            if not inside_block:
                rows.append({"layer": name, "reason": why})
    return rows


# ---------------------------------------------------------------------------------------------
# the policy: prune_structured and its named parts


def _check_target(pcfg) -> None:
    if pcfg.target_macs is not None and not 0 < pcfg.target_macs <= 1:
        raise EdgeusError(f"prune.target_macs={pcfg.target_macs}: give the fraction of MACs to keep, in (0, 1]")
    if pcfg.target_macs is None and not 0 <= pcfg.ratio < 1:
        raise EdgeusError(f"prune.ratio={pcfg.ratio}: give the fraction of channels to remove, in [0, 1)")


def _slimming(model: nn.Module, pcfg, finetune: Callable | None, out_dir) -> tuple[nn.Module, dict]:
    """Network slimming's sparsity training (L1 on BN gammas) before BN-scale importance."""
    if not (pcfg.slimming_epochs > 0 and finetune is not None):
        return model, {"epochs": 0, "note": "BN-scale importance without sparsity training "
                                            "(set prune.slimming_epochs and give data for network slimming)"}
    from edgeus.prune.importance import SlimmingTrainable
    from edgeus.train.trainer import Supervised

    reg = pcfg.slimming_reg
    sub = Path(out_dir) / "slimming" if out_dir else None
    model, res = finetune(model, epochs=int(pcfg.slimming_epochs), lr=pcfg.lr, out_dir=sub, desc="prune-slimming",
                          trainable=lambda m, w: SlimmingTrainable(Supervised(m, w), reg=reg))
    model.to("cpu")
    return model, {"epochs": int(pcfg.slimming_epochs), "reg": pcfg.slimming_reg, "val": summary(res["best_metrics"])}


def effective_round_to(pcfg, methods=(), channel_multiple: int | None = None) -> int | None:
    """``prune.round_to``, made a multiple of a target's ``channel_multiple`` (its INT8 kernels'
    channel alignment) and of 4 when 2:4 sparsity follows (its groups run along input channels)."""
    round_to = pcfg.round_to
    if channel_multiple and int(channel_multiple) > 1:
        round_to = math.lcm(int(round_to or 1), int(channel_multiple))
    if "semi_structured" in methods:
        round_to = 4 if not round_to else (round_to * 4 // math.gcd(round_to, 4))
    return round_to


def _step(model: nn.Module, example: torch.Tensor, info: GraphInfo, pcfg, k: int, steps: int, macs0: int,
          loaders: dict | None, kw: dict) -> tuple[nn.Module, float, dict]:
    """Pruning step ``k`` of ``steps``: to the step's share of the MACs budget, or of the channel ratio."""
    from edgeus.models.structure import record_transform
    from edgeus.prune import importance as imp_mod

    t0 = time.time()
    before = snapshot(model)
    if kw["importance"] == "taylor":
        imp_mod.accumulate_taylor_grads(model, loaders["train_plain"], "cpu", pcfg.taylor_batches)
    if pcfg.target_macs is not None:
        step_target = macs0 * (1.0 - (1.0 - float(pcfg.target_macs)) * k / steps)
        model, r, _, inner, _ = search_ratio(model, example, info, step_target,
                                             tolerance=float(pcfg.macs_tolerance), **kw)
    else:
        keep_prev = 1.0 - float(pcfg.ratio) * (k - 1) / steps
        keep_k = 1.0 - float(pcfg.ratio) * k / steps
        r = 1.0 - keep_k / keep_prev
        try:
            inner = prune_once(model, example, info, ratio=r, **kw)
        except cp.BlockCutError as e:
            raise EdgeusError(f"prune.ratio={pcfg.ratio} cannot be cut at step {k}: {e}; lower prune.ratio or "
                              "prune.max_layer_ratio, or give prune.target_macs (its search steps around it)") from None
    model.zero_grad(set_to_none=True)
    changes = diff(before, snapshot(model))
    record_transform(model, {"kind": "prune", "method": "structured", "step": k, "modules": changes})
    row = {"step": k, "ratio": round(float(r), 4), **profile(model, example), "internal_cuts": inner,
           "seconds": round(time.time() - t0, 2)}
    return model, r, row


def _outcome(model: nn.Module, pcfg, info: GraphInfo, example: torch.Tensor, snap0: dict, prof0: dict,
             round_to: int | None = None) -> dict:
    """What changed overall: channels per layer, what was left whole and why, the budget, the fractions."""
    snap1 = snapshot(model)
    rep: dict = {"channels": {n: v for n, v in channel_table(snap0, snap1, block_names(info)).items()},
                 "layers_left_whole": left_whole(model, info, snap0, snap1)}
    prof1 = profile(model, example)
    if pcfg.target_macs is not None:
        rep["budget_met"] = bool(prof1["macs"] <= prof0["macs"] * float(pcfg.target_macs) * (1 + float(pcfg.macs_tolerance)))
        if not rep["budget_met"]:
            rep["budget_note"] = (f"max_layer_ratio={pcfg.max_layer_ratio} (and the layers left whole) stop "
                                  "the search above the MACs target")
            if round_to:
                rep["budget_note"] += (f"; channel counts are kept at multiples of {round_to} (at least "
                                       f"{round_to} per layer), which this model's narrow layers cannot go below")
    if round_to:
        # a block's internal split that follows its kept outputs (SCConv's CRU: which outputs fuse with the
        # squeezed lower channels) cannot be rounded without changing which outputs are kept: say so
        odd = {n: v for n, v in rep["channels"].items() if v[1] != v[0] and v[1] % int(round_to)}
        if odd:
            rep["not_rounded"] = {"layers": odd, "reason": f"channels inside a block that follow its kept outputs; "
                                                           f"not a multiple of {round_to}"}
    rep["macs_fraction"] = round(prof1["macs"] / max(1, prof0["macs"]), 4)
    rep["params_fraction"] = round(prof1["params"] / max(1, prof0["params"]), 4)
    return rep


def prune_structured(model: nn.Module, pcfg, example: torch.Tensor, *, finetune: Callable | None = None,
                     loaders: dict | None = None, device: str = "cpu", out_dir=None,
                     methods=None, channel_multiple: int | None = None) -> tuple[nn.Module, dict]:
    """Channel pruning as ``pcfg`` (the ``prune`` section) says, in ``prune.steps`` steps with
    ``prune.step_epochs`` of fine-tuning (through ``finetune``) between them. ``methods``: every
    method of the run (2:4 sparsity after this step needs channel counts in multiples of 4)."""
    from edgeus.prune import importance as imp_mod

    methods = parse_methods(pcfg.method) if methods is None else list(methods)
    imp = pcfg.importance.lower()
    imp_mod.build_importance(imp)  # fail early on a bad name
    steps = max(1, int(pcfg.steps))
    info = analyse(model, example, list(pcfg.ignore))
    snap0 = snapshot(model)
    prof0 = profile(model, example)
    rep: dict = {"importance": imp, "global_pruning": bool(pcfg.global_pruning), "steps": steps,
                 "round_to": pcfg.round_to, "max_layer_ratio": pcfg.max_layer_ratio,
                 "block_pruners": block_names(info),
                 "target": ({"macs_fraction": pcfg.target_macs} if pcfg.target_macs is not None
                            else {"channel_ratio": pcfg.ratio})}
    _check_target(pcfg)
    if imp == "taylor" and loaders is None:
        raise EdgeusError("prune.importance=taylor needs data (first-order Taylor uses loss gradients)")
    if imp == "bn_scale":
        model, rep["slimming"] = _slimming(model, pcfg, finetune, out_dir)
    round_to = effective_round_to(pcfg, methods, channel_multiple)
    if round_to != pcfg.round_to:
        rep["round_to"] = round_to
    if channel_multiple:
        rep["channel_multiple"] = int(channel_multiple)
    kw = dict(importance=imp, global_pruning=bool(pcfg.global_pruning), max_layer_ratio=float(pcfg.max_layer_ratio),
              round_to=round_to, attention_dims=bool(pcfg.prune_attention_dims))
    rows = []
    for k in range(1, steps + 1):
        model, r, row = _step(model, example, info, pcfg, k, steps, prof0["macs"], loaders, kw)
        if k < steps:
            model, ft = run_finetune(model, finetune, pcfg.step_epochs, out_dir, f"prune-step{k}", lr=pcfg.lr,
                                     use_teacher=bool(pcfg.use_teacher))
            if ft:
                row["finetune"] = ft
        rows.append(row)
        log.info("prune step %d/%d: ratio %.3f, MACs %d", k, steps, r, row["macs"])
    rep["steps_detail"] = rows
    rep.update(_outcome(model, pcfg, info, example, snap0, prof0, round_to))
    return model, rep
