"""Pruning functions for blocks torch-pruning cannot trace through (SCConv, MDTA, CBAM's spatial gate).

torch-pruning builds its dependency graph from autograd. Inside RSMAS-Net's SCConv (split, cross
reconstruction, group-norm gating, channel-softmax fusion) and MDTA (channel attention with
reshapes into heads) the traced graph is wrong or explodes (see DESIGN.md). We register such a block
as a *customised layer* (``customized_pruners={Block: BlockPruner()}``, the pattern of torch-pruning's
``tests/test_customized_layer.py``), and make it opaque while the graph is traced: its forward is
swapped for :meth:`BlockPruner.surrogate`, one 1x1 convolution from the block's input channels to
its output channels, so the graph sees a single node with the right channel counts. The block's
own ``prune_in_channels`` / ``prune_out_channels`` then cut every internal tensor consistently, and
``prune_internal`` cuts the channels that live only inside the block (bottlenecks, attention dims).

Adding a block: subclass :class:`BlockPruner`, decorate with ``@block_pruner("module.path", "Class")``.
The class is looked up lazily, so a model file that does not exist yet costs nothing.
"""
from __future__ import annotations

import importlib
import math
from typing import Callable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

class BlockCutError(ValueError):
    """A block cannot take this cut (it would lose every channel of a kind it needs): the ratio is too deep."""


# (module path, class name) -> pruner class
_BLOCK_PRUNERS: dict[tuple[str, str], type] = {}


def block_pruner(module_path: str, class_name: str):
    def deco(cls):
        _BLOCK_PRUNERS[(module_path, class_name)] = cls
        return cls
    return deco


def known_block_pruners() -> dict[type, "BlockPruner"]:
    """{block class: pruner instance} for every registered block whose model file imports."""
    out = {}
    for (mod, name), pcls in _BLOCK_PRUNERS.items():
        try:
            cls = getattr(importlib.import_module(mod), name)
        except (ModuleNotFoundError, AttributeError):
            continue
        out[cls] = pcls()
    return out


def block_pruners_for(model: nn.Module) -> dict[type, "BlockPruner"]:
    known = known_block_pruners()
    present = {type(m) for m in model.modules()}
    return {cls: p for cls, p in known.items() if cls in present}


# ---------------------------------------------------------------------------------------------
# helpers that cut one tensor / one standard layer along a dimension


def keep_from(n: int, idxs: Sequence[int]) -> list[int]:
    drop = set(int(i) for i in idxs)
    return [i for i in range(n) if i not in drop]


def _sel(t: torch.Tensor, keep: Sequence[int], dim: int) -> torch.Tensor:
    return torch.index_select(t.data, dim, torch.as_tensor(list(keep), dtype=torch.long, device=t.device)).contiguous()


def cut_param(module: nn.Module, name: str, keep: Sequence[int], dim: int = 0) -> None:
    p = getattr(module, name, None)
    if p is None:
        return
    if isinstance(p, nn.Parameter):
        setattr(module, name, nn.Parameter(_sel(p, keep, dim), requires_grad=p.requires_grad))
    else:
        module._buffers[name] = _sel(p, keep, dim)


def conv_keep_out(conv: nn.Conv2d, keep: Sequence[int]) -> None:
    """Keep these output channels of a (non-depthwise) conv; for grouped convs the caller keeps
    the same number per group."""
    cut_param(conv, "weight", keep, 0)
    cut_param(conv, "bias", keep, 0)
    conv.out_channels = len(keep)


def conv_keep_in(conv: nn.Conv2d, keep: Sequence[int]) -> None:
    """Keep these input channels. Grouped convs: ``keep`` indexes the full input; it must keep the
    same count in every group, and the weight's per-group input slice is cut accordingly."""
    g = conv.groups
    if g == 1:
        cut_param(conv, "weight", keep, 1)
    else:
        per = conv.in_channels // g
        # each group's output block sees only its own input slice: cut per group and re-stack
        w = conv.weight.data
        out_per = conv.out_channels // g
        blocks = []
        new_per = None
        for gi in range(g):
            loc = [k - gi * per for k in keep if gi * per <= k < (gi + 1) * per]
            new_per = len(loc) if new_per is None else new_per
            if len(loc) != new_per:
                raise ValueError("grouped conv input pruning must keep the same count in every group")
            blocks.append(w[gi * out_per:(gi + 1) * out_per][:, loc])
        conv.weight = nn.Parameter(torch.cat(blocks, 0).contiguous(), requires_grad=conv.weight.requires_grad)
    conv.in_channels = len(keep)


def dwconv_keep(conv: nn.Conv2d, keep: Sequence[int]) -> None:
    """Depth-wise conv (groups == channels): channels in = out = groups."""
    cut_param(conv, "weight", keep, 0)
    cut_param(conv, "bias", keep, 0)
    conv.in_channels = conv.out_channels = conv.groups = len(keep)


def norm_keep(norm: nn.Module, keep: Sequence[int]) -> None:
    if isinstance(norm, nn.modules.batchnorm._BatchNorm):
        for n in ("weight", "bias", "running_mean", "running_var"):
            cut_param(norm, n, keep, 0)
        norm.num_features = len(keep)
    elif isinstance(norm, nn.GroupNorm):
        for n in ("weight", "bias"):
            cut_param(norm, n, keep, 0)
        norm.num_channels = len(keep)
    elif isinstance(norm, nn.LayerNorm):
        for n in ("weight", "bias"):
            cut_param(norm, n, keep, 0)
        norm.normalized_shape = (len(keep),)
    else:
        raise TypeError(f"norm_keep: unsupported {type(norm).__name__}")


def group_uniform_drop(scores: torch.Tensor, groups: int, n_drop_per_group: int) -> list[int]:
    """Indices to drop: the n lowest-scoring positions of each of ``groups`` contiguous blocks."""
    per = scores.numel() // groups
    drop = []
    for g in range(groups):
        s = scores[g * per:(g + 1) * per]
        drop += (torch.argsort(s)[:n_drop_per_group] + g * per).tolist()
    return sorted(drop)


def per_group_multiple(multiple: int, groups: int) -> int:
    """The per-group channel step that keeps a layer of ``groups`` equal groups at a total channel
    count that is a multiple of ``multiple``."""
    multiple, groups = max(1, int(multiple)), max(1, int(groups))
    return math.lcm(multiple, groups) // groups


def rounded_keep(n: int, keep: float, multiple: int = 1) -> int:
    """Channels to keep of ``n`` when ``keep`` are wanted and counts come in steps of ``multiple``:
    the nearest multiple, never below ``multiple`` (a floor that keeps a layer from going degenerate)
    and never above ``n``; a layer of at most ``multiple`` channels keeps them all."""
    multiple = max(1, int(multiple))
    if multiple == 1:
        return max(1, min(n, int(keep)))
    if n <= multiple:
        return n
    return min(n, max(multiple, int(round(keep / multiple)) * multiple))


def n_to_drop(n: int, ratio: float, multiple: int = 1, min_keep: int = 1) -> int:
    """How many of n channels to drop at ``ratio``, keeping a multiple of ``multiple`` (>= min_keep)."""
    keep = max(min_keep, int(math.ceil(n * (1.0 - ratio))))
    keep = max(multiple, int(math.ceil(keep / multiple)) * multiple) if multiple > 1 else keep
    return max(0, n - min(n, keep))


def l2_scores(*tensors_dim: tuple[torch.Tensor, int]) -> torch.Tensor:
    """Sum of squared weights per index along the given dims (each tensor contributes)."""
    total = None
    for t, dim in tensors_dim:
        s = t.detach().float().pow(2).transpose(0, dim).reshape(t.shape[dim], -1).sum(1)
        total = s if total is None else total + s
    return total


# ---------------------------------------------------------------------------------------------


class BlockPruner(tp.pruner.BasePruningFunc):
    """A block the dependency graph sees as one node from ``in_channels`` to ``out_channels``."""

    TARGET_MODULES = None  # checked by the registry instead

    #: parts of the block left whole, with the reason (goes into the report)
    whole_parts: tuple[tuple[str, str], ...] = ()
    #: ``prune_internal`` cuts attention dims (skipped when ``prune.prune_attention_dims=false``)
    cuts_attention_dims: bool = False

    def stride(self, block: nn.Module) -> int:
        return 1

    def surrogate(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """Stand-in forward used only while tracing: input channels -> output channels."""
        w = torch.randn(self.get_out_channels(block), self.get_in_channels(block), 1, 1,
                        device=x.device, dtype=x.dtype) * 0.01
        w.requires_grad_(True)
        return F.conv2d(x, w, stride=self.stride(block))

    def prune_internal(self, block: nn.Module, ratio: float, multiple: int = 1) -> dict:
        """Cut channels that live only inside the block at ``ratio``, keeping each internal channel
        count a multiple of ``multiple`` (at least ``multiple``); returns what was cut."""
        return {}


# classes whose output carries no per-channel structure of its input (CBAM's spatial gate reduces
# channels to their mean and max): during tracing they run without autograd, so the graph does not
# see a false channel coupling through them; they need no pruning (their weights do not depend on C).
_TRANSPARENT: list[tuple[str, str, str]] = [
    ("edgeus.models.layers", "SpatialAttention",
     "CBAM spatial gate: a 2->1 conv over the channel mean/max, independent of the channel count"),
]


def transparent_blocks() -> dict[type, str]:
    out = {}
    for mod, name, why in _TRANSPARENT:
        try:
            out[getattr(importlib.import_module(mod), name)] = why
        except (ModuleNotFoundError, AttributeError):
            continue
    return out


def make_forward_fn(pruners: dict[type, BlockPruner], transparent: dict[type, str] | None = None) -> Callable:
    """A torch-pruning ``forward_fn``: registered blocks run as their surrogate, transparent ones
    without autograd."""
    transparent = transparent or {}

    def forward_fn(model: nn.Module, example):
        patched = []
        for m in model.modules():
            p = pruners.get(type(m))
            if p is not None:
                m.forward = (lambda x, _m=m, _p=p: _p.surrogate(_m, x))
                patched.append(m)
            elif type(m) in transparent:
                def _fwd(*a, _m=m, **k):
                    with torch.no_grad():
                        return type(_m).forward(_m, *a, **k)
                m.forward = _fwd
                patched.append(m)
        # frozen parameters (two_stage_published's U-Net and backbone) take part in the trace like the
        # others: autograd records no op whose inputs all lack requires_grad
        frozen = [p for p in model.parameters() if not p.requires_grad]
        for p in frozen:
            p.requires_grad_(True)
        try:
            out = model(example)
            # heads whose output the model caches for an auxiliary loss (two_stage's segmentation
            # logits, detached before the classifier) are outputs too: trace them so they get pruned
            aux = [v for k, v in vars(model).items() if k.startswith("last_") and torch.is_tensor(v)
                   and v.grad_fn is not None]
            return (out, *aux) if aux else out
        finally:
            for p in frozen:
                p.requires_grad_(False)
            for m in patched:
                del m.forward

    return forward_fn


# ---------------------------------------------------------------------------------------------
# RSMAS-Net: SCConv (SRU + CRU) and MDTA (edgeus/models/rsmas.py documents the channel layouts)


@block_pruner("edgeus.models.rsmas", "SCConv")
class SCConvPruner(BlockPruner):
    """SCConv = CRU(SRU(x)); in and out channels are independent (no residual inside).

    Input side: the SRU adds channel i to channel (i + C/2) mod C, so channels go in pairs, and its
    GroupNorm needs the same count per group: ``get_in_channel_groups`` = gn groups (even, so the
    repeated indices are pair-closed). The CRU's split sizes follow the kept channels.
    Output side: output j fuses gwc[j] + pwc1[j] with pwc2[j] (j < C - low_squeezed) or with the
    squeezed lower channel j - (C - low_squeezed); the grouped gwc needs the same count per group.
    Internal: the squeezed upper channels (squeeze1 out = gwc / pwc1 in) are cut by ``prune_internal``.
    """

    whole_parts = (
        ("cru.squeeze2 (out)", "the squeezed lower channels are reused as CRU output channels; they are cut "
                               "only together with those outputs"),
    )

    # -- sizes
    def get_in_channels(self, layer):
        return layer.sru.gn.num_channels

    def get_out_channels(self, layer):
        return layer.cru.gwc.out_channels

    def get_in_channel_groups(self, layer):
        g = layer.sru.gn.num_groups
        return g if g % 2 == 0 else 2 * g

    def get_out_channel_groups(self, layer):
        return layer.cru.gwc.groups

    # -- cuts
    def prune_in_channels(self, layer, idxs):
        sru, cru = layer.sru, layer.cru
        c = sru.gn.num_channels
        half = c // 2
        drop = sorted(set(int(i) for i in idxs))
        if set((i + half) % c for i in drop) != set(drop):
            raise ValueError("SCConv input pruning must remove channel pairs (i, i + C/2) together")
        keep = keep_from(c, drop)
        g = sru.gn.num_groups
        if len(keep) % g:
            raise ValueError(f"SCConv input pruning must keep a multiple of the GroupNorm groups ({g})")
        norm_keep(sru.gn, keep)
        # the SRU output keeps the same channel indices (pairs map to pairs)
        up = cru.up_channels
        keep_up = [k for k in keep if k < up]
        keep_low = [k - up for k in keep if k >= up]
        conv_keep_in(cru.squeeze1, keep_up)
        conv_keep_in(cru.squeeze2, keep_low)
        cru.up_channels, cru.low_channels = len(keep_up), len(keep_low)
        cru.channels = len(keep)
        return layer

    def prune_out_channels(self, layer, idxs):
        cru = layer.cru
        c_out = cru.gwc.out_channels
        keep = keep_from(c_out, idxs)
        head = c_out - cru.low_squeezed      # outputs fused with pwc2
        keep_pwc2 = [k for k in keep if k < head]
        keep_low_sq = [k - head for k in keep if k >= head]
        if not keep_low_sq:                  # checked before anything is cut: the block stays intact
            raise BlockCutError("SCConv output pruning would remove every reused lower channel "
                                "(its CRU needs at least one)")
        conv_keep_out(cru.gwc, keep)
        conv_keep_out(cru.pwc1, keep)
        conv_keep_out(cru.pwc2, keep_pwc2)
        if len(keep_low_sq) != cru.low_squeezed:
            conv_keep_out(cru.squeeze2, keep_low_sq)
            conv_keep_in(cru.pwc2, keep_low_sq)
            cru.low_squeezed = len(keep_low_sq)
        return layer

    def prune_internal(self, layer, ratio, multiple=1):
        cru = layer.cru
        n, g = cru.up_squeezed, cru.gwc.groups
        per = n // g
        step = per_group_multiple(multiple, g)
        n_drop = n_to_drop(per, ratio, min_keep=1) if step == 1 else (per - rounded_keep(per, per * (1 - ratio), step))
        if n_drop <= 0:
            return {}
        scores = l2_scores((cru.squeeze1.weight, 0), (cru.pwc1.weight, 1))
        # gwc sees each group's slice of the squeezed channels: add its per-input-channel norm
        gw = cru.gwc.weight.detach().float().pow(2)       # [out, per_in, k, k]
        out_per = gw.shape[0] // g
        scores = scores + torch.cat([gw[i * out_per:(i + 1) * out_per].sum((0, 2, 3)) for i in range(g)])
        drop = group_uniform_drop(scores, g, n_drop)
        keep = keep_from(n, drop)
        conv_keep_out(cru.squeeze1, keep)
        conv_keep_in(cru.gwc, keep)
        conv_keep_in(cru.pwc1, keep)
        cru.up_squeezed = len(keep)
        return {"cru.up_squeezed": [n, len(keep)]}


@block_pruner("edgeus.models.rsmas", "MDTA")
class MDTAPruner(BlockPruner):
    """MDTA = x + project_out(attention(LN(x))): in and out share indices (the residual), so
    ``prune_in_channels is prune_out_channels`` (torch-pruning's intra-layer dependency).

    Internal: q/k/v have ``num_heads`` heads of equal size and ``chunk(3)`` needs equal thirds, so
    ``prune_internal`` removes the same number of dims from every head of Q, K and V. A Q row indexes
    the attention output row (and project_out's input); a K row pairs with the V row of the same
    index, so Q and (K, V) are ranked separately. Heads themselves are kept (``temperature`` whole).
    """

    whole_parts = (
        ("temperature / num_heads", "heads are kept; dims inside every head are cut uniformly instead"),
    )
    cuts_attention_dims = True

    def get_in_channels(self, layer):
        return layer.qkv.in_channels

    def get_out_channels(self, layer):
        return layer.project_out.out_channels

    def prune_out_channels(self, layer, idxs):
        keep = keep_from(layer.qkv.in_channels, idxs)
        cut_param(layer.norm, "weight", keep, 0)
        cut_param(layer.norm, "bias", keep, 0)
        conv_keep_in(layer.qkv, keep)
        conv_keep_out(layer.project_out, keep)
        return layer

    prune_in_channels = prune_out_channels

    def prune_internal(self, layer, ratio, multiple=1):
        d = layer.project_out.in_channels     # attention dim = Q = K = V channels
        h = layer.num_heads
        per = d // h
        step = per_group_multiple(multiple, h)
        n_drop = n_to_drop(per, ratio, min_keep=1) if step == 1 else (per - rounded_keep(per, per * (1 - ratio), step))
        if n_drop <= 0:
            return {}
        w_qkv = layer.qkv.weight.detach().float().pow(2).flatten(1).sum(1)       # [3d]
        w_dw = layer.qkv_dwconv.weight.detach().float().pow(2).flatten(1).sum(1)  # [3d]
        s = w_qkv + w_dw
        s_q = s[:d] + layer.project_out.weight.detach().float().pow(2).sum((0, 2, 3))
        s_kv = s[d:2 * d] + s[2 * d:]
        drop_q = group_uniform_drop(s_q, h, n_drop)
        drop_kv = group_uniform_drop(s_kv, h, n_drop)
        keep_q = keep_from(d, drop_q)
        keep_kv = keep_from(d, drop_kv)
        keep3 = keep_q + [d + k for k in keep_kv] + [2 * d + k for k in keep_kv]
        conv_keep_out(layer.qkv, keep3)
        dwconv_keep(layer.qkv_dwconv, keep3)
        conv_keep_in(layer.project_out, keep_q)
        return {"attention_dim": [d, len(keep_q)], "num_heads": h}
