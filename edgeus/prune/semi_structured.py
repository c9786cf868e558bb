"""2:4 semi-structured sparsity for the sparse tensor cores of Ampere-class GPUs (A100, RTX 30xx,
Jetson Orin) and TensorRT's sparse-weights build flag.

The pattern TensorRT accelerates (its "Structured Sparsity" section): for a convolution kernel
[K, C, R, S], for each output channel k and each spatial position (r, s), every four consecutive
*input channels* hold at least two zeros; for a fully connected layer [out, in], every four
consecutive inputs of each output. We keep the two largest-magnitude weights of every such group
of four (the m4n2_1d rule of NVIDIA's ASP). Layers whose input channels per group are not a
multiple of four (the 1-channel stem, depth-wise convolutions) cannot take the pattern and are
reported as left dense.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def _as_groups(w: torch.Tensor) -> tuple[torch.Tensor, tuple]:
    """View weights as [..., C/4, 4] with C (input channels) last; returns the view and the permuted
    shape needed to map a mask back."""
    if w.dim() == 2:                       # [out, in]
        return w.reshape(w.shape[0], -1, 4), (w.shape, None)
    perm = (0, *range(2, w.dim()), 1)      # [K, C, R, S] -> [K, R, S, C]
    wp = w.permute(*perm)
    return wp.reshape(*wp.shape[:-1], -1, 4), (wp.shape, perm)


def _back(mask_g: torch.Tensor, shape_info: tuple) -> torch.Tensor:
    shape, perm = shape_info
    m = mask_g.reshape(shape)
    if perm is None:
        return m
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return m.permute(*inv).contiguous()


def eligible(m: nn.Module) -> tuple[bool, str]:
    if isinstance(m, nn.Linear):
        return (m.in_features % 4 == 0, "in_features not a multiple of 4")
    if isinstance(m, nn.Conv2d):
        per_group = m.in_channels // m.groups
        if per_group % 4:
            if m.groups > 1 and per_group == 1:
                return False, "depth-wise convolution (1 input channel per group)"
            return False, f"{per_group} input channel(s) per group, not a multiple of 4"
        return True, ""
    return False, "not a conv / linear layer"


def mask_2_4(w: torch.Tensor) -> torch.Tensor:
    """Mask keeping the 2 largest |w| of every 4 consecutive input channels."""
    g, info = _as_groups(w.detach().abs())
    top = torch.topk(g, 2, dim=-1).indices
    mask = torch.zeros_like(g).scatter_(-1, top, 1.0)
    return _back(mask, info).to(w.dtype)


def masks_2_4(layers: dict[str, nn.Module]) -> tuple[dict[str, torch.Tensor], list[dict]]:
    masks, skipped = {}, []
    for name, m in layers.items():
        ok, why = eligible(m)
        if ok:
            masks[name] = mask_2_4(m.weight)
        else:
            skipped.append({"layer": name, "reason": f"left dense for 2:4: {why}"})
    return masks, skipped


def check_2_4(w: torch.Tensor) -> bool:
    """True when every group of 4 consecutive input channels has at most 2 non-zeros."""
    g, _ = _as_groups(w.detach())
    return bool(((g != 0).sum(-1) <= 2).all())


def prune_semi_structured(model: nn.Module, pcfg, example: torch.Tensor, *, finetune=None,
                          out_dir=None) -> tuple[nn.Module, dict]:
    """2:4 masks on every eligible layer, then ``prune.finetune_epochs`` of fine-tuning (through
    ``finetune``) with the masks held."""
    import copy

    from edgeus.models.structure import record_transform
    from edgeus.prune import unstructured as U
    from edgeus.prune.common import run_finetune

    dense = copy.deepcopy(model) if pcfg.measure_latency else None
    size0 = U.file_sizes(model)
    layers, whole = U.sparse_layers(model, pcfg, example)
    masks, skipped = masks_2_4(layers)
    U.apply_masks(model, masks)
    row = {}
    if pcfg.finetune_epochs > 0:
        with U.MaskKeeper(model, masks):
            model, ft = run_finetune(model, finetune, pcfg.finetune_epochs, out_dir, "sparse-2of4", lr=pcfg.lr,
                                     use_teacher=bool(pcfg.use_teacher))
        U.apply_masks(model, masks)
        row = ft or {}
    sparse = {n: model.get_submodule(n) for n in masks}
    sp = U.sparsity_of(sparse)
    all_w = sum(model.get_submodule(n).weight.numel() for n in layers)
    rep = {"pattern": "2:4 along input channels (TensorRT / sparse tensor cores)",
           "layers_2_4": sorted(masks), "pattern_holds": all(check_2_4(m.weight) for m in sparse.values()),
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
