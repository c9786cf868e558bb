"""Structured (channel) pruning on torch-pruning's dependency graph.

Three concerns in three places, as in torch-pruning: the graph (what is coupled: torch-pruning's
``DependencyGraph`` plus our block pruners in :mod:`edgeus.prune.custom_pruners`), the scoring
(:mod:`edgeus.prune.importance`), and the policy here: how much (a channel ratio, or a MACs budget
found by bisection over the ratio on a copy), when (N iterative steps), what is left whole (the
layers that produce the model's output, ``prune.ignore``), and a record of the new shapes so that a
checkpoint rebuilds the pruned model (:mod:`edgeus.prune.structure`).
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn

from edgeus.errors import EdgeusError
from edgeus.prune import custom_pruners as cp
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


def _count_macs(model: nn.Module, example: torch.Tensor) -> int:
    import torch_pruning as tp

    was = model.training
    model.eval()
    with torch.no_grad():
        macs, _ = tp.utils.count_ops_and_params(model, example)
    model.train(was)
    return int(macs)


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


def prune_once(model: nn.Module, example: torch.Tensor, info: GraphInfo, *, ratio: float, importance: str,
               global_pruning: bool = False, max_layer_ratio: float = 0.9, round_to: int | None = None,
               internal: bool = True, attention_dims: bool = True) -> dict:
    """One pruning step in place at channel ``ratio`` (relative to the current model)."""
    import torch_pruning as tp

    if ratio <= 0:
        return {}
    ignored = [model.get_submodule(n) for n in info.ignored]
    was = model.training
    pruner = tp.pruner.BasePruner(
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
            if p is not None and m not in ignored_set and (attention_dims or not isinstance(p, cp.MDTAPruner)):
                cut = p.prune_internal(m, min(float(ratio), float(max_layer_ratio)))
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
                 tolerance: float = 0.03, iters: int = 10, grads_fn: Callable | None = None, **kw):
    """Bisection over the channel ratio: the smallest ratio whose pruned copy has MACs <= target.

    Returns ``(pruned_copy, ratio, macs, internal_cuts, met)``; ``met`` is False when even the
    largest ratio allowed (``max_layer_ratio``) stays above the target (the copy at that ratio is
    returned).
    """
    hi = float(kw.get("max_layer_ratio", 0.9))
    lo = 0.0
    best = None

    def trial(r):
        c = _copy_with_grads(model)
        if grads_fn is not None:
            grads_fn(c)
        inner = prune_once(c, example, info, ratio=r, **kw)
        return c, _count_macs(c, example), inner

    c, macs, inner = trial(hi)
    if macs > target_macs:
        return c, hi, macs, inner, False
    best = (c, hi, macs, inner)
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        c, macs, inner = trial(mid)
        if macs <= target_macs:
            hi, best = mid, (c, mid, macs, inner)
            if macs >= target_macs * (1 - tolerance):
                break
        else:
            lo = mid
    c, r, macs, inner = best
    return c, r, macs, inner, True


LAYER_TYPES = {"Conv1d", "Conv2d", "Conv3d", "Linear", "SCConv", "MDTA"}


def channel_table(before: dict, after: dict) -> dict[str, list]:
    """{module: [out channels before, after]} for every conv / linear / block."""
    table = {}
    for name, a in after.items():
        if a["type"] not in LAYER_TYPES:
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
    for name, (b, a) in channel_table(before, after).items():
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


def structural_diff(before: dict, model: nn.Module) -> dict:
    return diff(before, snapshot(model))
