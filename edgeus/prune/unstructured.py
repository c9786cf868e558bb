"""Unstructured sparsity: global magnitude pruning of conv / linear weights, gradual and permanent.

Masks come from ``torch.nn.utils.prune.global_unstructured`` (L1 magnitude ranked across every
layer), applied at sparsities that follow the cubic schedule of Zhu & Gupta (2017,
"To prune, or not to prune") over ``prune.sparsity_steps`` steps, with fine-tuning between them.
Each mask is made permanent at once (``prune.remove``: no ``weight_orig`` / ``weight_mask`` left in the
state dict) and kept in force during fine-tuning by a forward pre-hook (:class:`MaskKeeper`), so
checkpoints saved mid-way are ordinary dense state dicts.

Honest note: zeros in a dense tensor do not make dense kernels (ONNX Runtime, TensorRT without its
sparse flag) faster. They shrink a *compressed* file (zip / gzip) and are the starting point for
sparse kernels. :func:`file_sizes` measures the first; the bench measures the second.
"""
from __future__ import annotations

import gzip
import io

import torch
import torch.nn as nn
import torch.nn.utils.prune as tprune

HONEST_NOTE = ("unstructured sparsity keeps every tensor dense: it shrinks the compressed (gzip) file "
               "but does not speed up dense runtimes such as ONNX Runtime on CPU or TensorRT without "
               "sparse kernels; the dense latency ratio measured here is expected to be about 1.0")


def cubic_schedule(final: float, steps: int) -> list[float]:
    """Sparsity after each of ``steps`` steps: s_k = s_f * (1 - (1 - k/N)^3) (Zhu & Gupta 2017)."""
    steps = max(1, int(steps))
    return [float(final) * (1.0 - (1.0 - k / steps) ** 3) for k in range(1, steps + 1)]


def weight_layers(model: nn.Module, exclude: set[str] = frozenset()) -> dict[str, nn.Module]:
    """Conv / linear layers whose weights are sparsified, by name."""
    return {n: m for n, m in model.named_modules()
            if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)) and n not in exclude}


def global_magnitude_masks(layers: dict[str, nn.Module], sparsity: float) -> dict[str, torch.Tensor]:
    """Global L1 masks at ``sparsity`` (torch's global_unstructured), made permanent at once."""
    params = [(m, "weight") for m in layers.values()]
    tprune.global_unstructured(params, pruning_method=tprune.L1Unstructured, amount=float(sparsity))
    masks = {}
    for name, m in layers.items():
        masks[name] = m.weight_mask.detach().clone()
        tprune.remove(m, "weight")
    return masks


def apply_masks(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for name, mask in masks.items():
            w = model.get_submodule(name).weight
            w.mul_(mask.to(w.device, w.dtype))


class MaskKeeper:
    """Re-applies masks before every forward (during fine-tuning the optimiser moves zeros)."""

    def __init__(self, model: nn.Module, masks: dict[str, torch.Tensor]):
        self.handles = []
        for name, mask in masks.items():
            m = model.get_submodule(name)

            def hook(mod, args, _mask=mask):
                with torch.no_grad():
                    mod.weight.mul_(_mask.to(mod.weight.device, mod.weight.dtype))
            self.handles.append(m.register_forward_pre_hook(hook))

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def sparsity_of(layers: dict[str, nn.Module]) -> dict:
    zeros = total = 0
    per = {}
    for name, m in layers.items():
        w = m.weight.detach()
        z = int((w == 0).sum())
        per[name] = round(z / max(1, w.numel()), 4)
        zeros += z
        total += w.numel()
    return {"sparsity": zeros / max(1, total), "zeros": zeros, "weights": total, "per_layer": per}


def file_sizes(model: nn.Module) -> dict:
    """Bytes of the state dict as saved (dense) and gzip-compressed."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    dense = buf.getvalue()
    return {"dense_bytes": len(dense), "gzip_bytes": len(gzip.compress(dense, compresslevel=6))}


def has_mask_leftovers(model: nn.Module) -> bool:
    return any(k.endswith(("_orig", "_mask")) for k in model.state_dict())


def sparse_layers(model: nn.Module, pcfg, example: torch.Tensor) -> tuple[dict, list[dict]]:
    """The conv / linear layers unstructured or 2:4 sparsity may touch, and those it leaves dense (why)."""
    from edgeus.prune.structured import analyse

    exclude = set()
    reasons = []
    if not pcfg.include_classifier:
        info = analyse(model, example)
        exclude |= set(info.output_layers)
        reasons += [{"layer": n, "reason": "output layer kept dense (prune.include_classifier=false)"}
                    for n in info.output_layers]
    for n in pcfg.ignore:
        exclude.add(n)
        reasons.append({"layer": n, "reason": "listed in prune.ignore"})
    return weight_layers(model, exclude), reasons


def prune_unstructured(model: nn.Module, pcfg, example: torch.Tensor, *, finetune=None,
                       out_dir=None) -> tuple[nn.Module, dict]:
    """Global magnitude sparsity on the cubic schedule, fine-tuning (through ``finetune``) with the
    masks held between steps (``prune.step_epochs``) and after the last (``prune.finetune_epochs``)."""
    import copy

    from edgeus.errors import EdgeusError
    from edgeus.models.structure import record_transform
    from edgeus.prune.common import run_finetune

    if not 0 <= pcfg.sparsity < 1:
        raise EdgeusError(f"prune.sparsity={pcfg.sparsity}: give the fraction of weights to zero, in [0, 1)")
    dense = copy.deepcopy(model) if pcfg.measure_latency else None
    size0 = file_sizes(model)
    layers, whole = sparse_layers(model, pcfg, example)
    sched = cubic_schedule(pcfg.sparsity, pcfg.sparsity_steps)
    rows, masks = [], {}
    for k, s in enumerate(sched, 1):
        masks = global_magnitude_masks(layers, s)
        row = {"step": k, "target_sparsity": round(s, 4), "sparsity": round(sparsity_of(layers)["sparsity"], 4)}
        epochs = pcfg.step_epochs if k < len(sched) else pcfg.finetune_epochs
        if epochs > 0:
            with MaskKeeper(model, masks):
                model, ft = run_finetune(model, finetune, epochs, out_dir, f"sparse-step{k}", lr=pcfg.lr,
                                         use_teacher=bool(pcfg.use_teacher))
            layers = {n: model.get_submodule(n) for n in layers}
            apply_masks(model, masks)
            if ft:
                row["finetune"] = ft
        rows.append(row)
    sp = sparsity_of(layers)
    size1 = file_sizes(model)
    rep = {"target_sparsity": pcfg.sparsity, "schedule": "cubic (Zhu & Gupta 2017)", "steps_detail": rows,
           "achieved_sparsity": round(sp["sparsity"], 4), "zeros": sp["zeros"], "weights_considered": sp["weights"],
           "per_layer_sparsity": sp["per_layer"], "layers_left_dense": whole,
           "file_bytes": {"before": size0, "after": size1,
                          "gzip_ratio": round(size1["gzip_bytes"] / max(1, size0["gzip_bytes"]), 4)},
           "masks_left_in_state_dict": has_mask_leftovers(model), "note": HONEST_NOTE}
    if dense is not None:
        from edgeus.prune.measure import dense_latency_ratio

        rep["onnxruntime_dense_latency"] = dense_latency_ratio(dense, model, example)
    record_transform(model, {"kind": "sparsity", "pattern": "unstructured", "sparsity": rep["achieved_sparsity"],
                             "layers": sorted(layers)})
    return model, rep
