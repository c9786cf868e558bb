"""``decompose_model``: the decomposition stage as one function over (model, the ``decompose`` section,
injected pieces: example inputs, a calibration loader, a fine-tuning callable)."""
from __future__ import annotations

import copy
import logging
import time
from pathlib import Path

import torch
import torch.nn as nn

from edgeus.decompose.cp import cp_layer
from edgeus.decompose.layers import find_layers
from edgeus.decompose.ranks import RANK_MODES, select_ranks
from edgeus.decompose.structure import set_module
from edgeus.decompose.svd import svd_linear_decompose, svd_pointwise_decompose
from edgeus.decompose.tucker import METHODS, tucker2_decompose
from edgeus.errors import EdgeusError
from edgeus.models.profile import count_macs, count_params
from edgeus.models.structure import record_transform

log = logging.getLogger(__name__)


def _params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def check_config(dcfg) -> None:
    if dcfg.method not in (*METHODS, "cp"):
        raise EdgeusError(f"decompose.method={dcfg.method!r}: use one of {', '.join(METHODS)}, cp")
    if dcfg.rank_mode not in RANK_MODES:
        raise EdgeusError(f"decompose.rank_mode={dcfg.rank_mode!r}: use one of {', '.join(RANK_MODES)}")
    if dcfg.rank_mode == "budget" and not 0.0 < float(dcfg.target_macs) <= 1.0:
        raise EdgeusError(f"decompose.target_macs={dcfg.target_macs}: a fraction of the model's MACs in (0, 1]")
    if dcfg.rank_mode == "ratio" and not 0.0 < float(dcfg.ratio) <= 1.0:
        raise EdgeusError(f"decompose.ratio={dcfg.ratio}: a fraction of the channels in (0, 1]")
    if dcfg.rank_mode == "energy" and not 0.0 < float(dcfg.energy) <= 1.0:
        raise EdgeusError(f"decompose.energy={dcfg.energy}: a fraction of the energy in (0, 1]")


class _RankRules:
    """The decompose section seen with a target's channel multiple (read by ``Layer.allowed_ranks``)."""

    def __init__(self, dcfg, channel_multiple: int | None):
        self._dcfg = dcfg
        self.channel_multiple = int(channel_multiple) if channel_multiple else None

    def __getattr__(self, name):
        return getattr(self._dcfg, name)


def decompose_layers(model: nn.Module, cfg, *, image_size: int, in_chans: int,
                     channel_multiple: int | None = None) -> tuple[nn.Module, dict]:
    """Decompose ``model`` in place (``cfg`` = the decompose section). Returns (model, report).
    ``channel_multiple``: ranks are multiples of it (a target's INT8 channel alignment)."""
    check_config(cfg)
    if channel_multiple and int(channel_multiple) > 1:
        cfg = _RankRules(cfg, channel_multiple)
    t0 = time.time()
    macs_before = count_macs(model, image_size, in_chans)
    params_before = count_params(model)
    layers, skipped = find_layers(model, image_size, in_chans, cfg)
    fixed = macs_before - sum(l.macs for l in layers)
    plan, info = select_ranks(layers, cfg, fixed_macs=fixed, total_macs=macs_before)

    entries, specs = [], {}
    for layer in layers:
        ranks = plan.get(layer.name)
        if ranks is None:
            why = ("kept whole: the budget is met at less error elsewhere" if cfg.rank_mode == "budget"
                   else f"{cfg.rank_mode} ranks would not save MACs")
            skipped.append({"name": layer.name, "type": type(layer.module).__name__, "shape": layer.shape,
                            "reason": why})
            continue
        if layer.kind == "tucker2" and cfg.method == "cp":   # CP at the MACs of the planned Tucker-2 ranks
            new, info_l = cp_layer(layer, ranks, cfg)
            if new is None:
                skipped.append({"name": layer.name, "type": type(layer.module).__name__, "shape": layer.shape,
                                "reason": info_l["reason"]})
                continue
            spec = info_l["spec"]
        elif layer.kind == "tucker2":
            new, info_l = tucker2_decompose(layer.module, ranks, cfg.method, iters=int(cfg.hooi_iters))
            spec = {"type": "tucker2", "ranks": info_l["ranks"], "first": info_l["first"], "last": info_l["last"]}
        elif layer.kind == "svd_conv":
            new, info_l = svd_pointwise_decompose(layer.module, ranks[0])
            spec = {"type": "svd_conv", "ranks": info_l["ranks"]}
        else:
            new, info_l = svd_linear_decompose(layer.module, ranks[0])
            spec = {"type": "svd_linear", "ranks": info_l["ranks"]}
        macs_after = info_l["macs"] if spec["type"] == "cp" else layer.macs_at(ranks)
        entries.append({
            "name": layer.name, "type": spec["type"], "shape": layer.shape, "ranks": list(spec["ranks"]),
            "full_ranks": list(layer.modes), "in_hw": list(layer.in_hw), "out_hw": list(layer.out_hw),
            "macs_before": int(layer.macs), "macs_after": int(macs_after),
            "params_before": _params(layer.module), "params_after": _params(new),
            "rel_error": float(info_l["rel_error"]),
        })
        specs[layer.name] = spec
        set_module(model, layer.name, new)

    if specs:
        record_transform(model, {"kind": "decompose", "method": cfg.method, "rank_mode": cfg.rank_mode,
                                 "layers": specs})
    macs_after = count_macs(model, image_size, in_chans)
    params_after = count_params(model)
    expected = macs_before - sum(e["macs_before"] for e in entries) + sum(e["macs_after"] for e in entries)
    report = {
        "stage": "decompose",
        "method": cfg.method,
        "rank_mode": cfg.rank_mode,
        "input_size": int(image_size),
        "in_chans": int(in_chans),
        "macs_before": int(macs_before),
        "macs_after": int(macs_after),
        "macs_ratio": macs_after / max(macs_before, 1),
        "macs_formula": int(expected),
        "params_before": int(params_before),
        "params_after": int(params_after),
        "params_ratio": params_after / max(params_before, 1),
        "layers": entries,
        "skipped": skipped,
        "n_decomposed": len(entries),
        "channel_multiple": getattr(cfg, "channel_multiple", None),
        "min_rank": int(getattr(cfg, "min_rank", 1) or 1),
        "seconds": round(time.time() - t0, 3),
    }
    if cfg.rank_mode == "budget":
        target = info["target_macs"]
        report["budget"] = {"target_fraction": float(cfg.target_macs), "target_macs": int(target),
                            "feasible": bool(info["feasible"]),
                            "met": bool(macs_after <= target * 1.0 + 0.5),
                            "achieved_fraction": macs_after / max(macs_before, 1)}
        if not info["feasible"]:
            log.warning("decompose: budget %.3f of MACs not reachable; got %.3f", cfg.target_macs,
                        report["macs_ratio"])
    elif cfg.rank_mode == "ratio":
        report["ratio"] = float(cfg.ratio)
    elif cfg.rank_mode == "energy":
        report["energy"] = float(cfg.energy)
    if expected != macs_after:  # the formula and the op counter disagree: say so, do not hide it
        log.warning("decompose: MACs by formula %d != counted %d", expected, macs_after)
    return model, report


@torch.no_grad()
def recalibrate_batchnorm(model: nn.Module, loader, batches: int, device: str = "cpu") -> int:
    """Re-estimate every BatchNorm's running mean and variance from ``batches`` batches (the
    decomposed layers feed them slightly different activations than the ones they were fitted to).
    Everything else stays in eval mode; weights do not change. Returns the number of batches used."""
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    if not bns or batches <= 0:
        return 0
    was_training = model.training
    saved = [(m, m.momentum) for m in bns]
    model.eval()
    for m in bns:
        m.reset_running_stats()
        m.momentum = None            # cumulative average over the batches seen
        m.train()
    n = 0
    try:
        for batch in loader:
            if n >= batches:
                break
            model(batch["image"].to(device))
            n += 1
    finally:
        for m, mom in saved:
            m.momentum = mom
        model.train(was_training)
    return n


def _input_shape(example_inputs, image_size, in_chans) -> tuple[int, int]:
    if example_inputs is not None:
        return int(example_inputs.shape[-1]), int(example_inputs.shape[1])
    if image_size is None or in_chans is None:
        raise EdgeusError("decompose_model needs example_inputs, or image_size and in_chans, to count MACs")
    return int(image_size), int(in_chans)


def decompose_model(model: nn.Module, dcfg, *, example_inputs: torch.Tensor | None = None,
                    image_size: int | None = None, in_chans: int | None = None, finetune=None,
                    calib_loader=None, device: str = "cpu", out_dir: str | Path | None = None,
                    channel_multiple: int | None = None) -> tuple[nn.Module, dict]:
    """The decompose stage: Tucker-2 / SVD with ranks by ``dcfg.rank_mode``, then fine-tuning.

    ``dcfg`` is the ``decompose`` section. MACs are counted at the size of ``example_inputs`` (or
    ``image_size`` x ``image_size`` with ``in_chans`` channels). The input model is not modified;
    the decomposed copy carries a ``decompose`` structure record, so its checkpoints reload with
    ``load_checkpoint``. ``calib_loader`` (batches with an ``image``): BatchNorm statistics are
    re-estimated on ``dcfg.recalibrate_bn`` of its batches. ``finetune`` (from
    :func:`edgeus.finetune.make_finetuner`, with or without a teacher): ``dcfg.finetune_epochs``
    of fine-tuning at ``dcfg.lr``. ``channel_multiple`` (a target's INT8 channel alignment): every
    rank a multiple of it and at least it, so no decomposed layer is narrower than the kernels want.
    """
    if not dcfg.enabled:
        return model, {"stage": "decompose", "enabled": False}
    check_config(dcfg)
    size, chans = _input_shape(example_inputs, image_size, in_chans)
    model = copy.deepcopy(model).cpu()
    model, report = decompose_layers(model, dcfg, image_size=size, in_chans=chans, channel_multiple=channel_multiple)
    report["enabled"] = True
    report["bn_recalibrated_batches"] = 0
    if calib_loader is not None and report["n_decomposed"] and int(dcfg.recalibrate_bn) > 0:
        model.to(device)
        report["bn_recalibrated_batches"] = recalibrate_batchnorm(model, calib_loader, int(dcfg.recalibrate_bn),
                                                                  device)
    epochs = int(dcfg.finetune_epochs)
    if epochs > 0 and finetune is not None and report["n_decomposed"]:
        ft_dir = Path(out_dir) / "decompose_finetune" if out_dir else None
        model, result = finetune(model, epochs=epochs, out_dir=ft_dir, desc="decompose-finetune",
                                 lr=float(dcfg.lr) if dcfg.lr is not None else None)
        report["finetune"] = {"epochs": epochs, "lr": dcfg.lr, "teacher": bool(result["with_teacher"]),
                              "best_epoch": int(result["best_epoch"]),
                              "best_metrics": _jsonable(result["best_metrics"])}
        if result.get("signals"):   # the kept epoch's pick (train.select), each epoch's val metric and teacher agreement
            report["finetune"].update(select=result.get("select"), signals=_jsonable(result["signals"]))
    else:
        report["finetune"] = None
    model.to(device)
    return model, report


def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "item") and callable(x.item):
        try:
            return x.item()
        except (ValueError, RuntimeError):
            return x.tolist() if hasattr(x, "tolist") else str(x)
    if hasattr(x, "tolist"):
        return x.tolist()
    return x


def format_table(report: dict, max_rows: int | None = None) -> str:
    """The per-layer table (markdown) with the totals, for the CLI, the bench and the ledger."""
    if not report.get("enabled", True):
        return "decompose: disabled"
    rows = ["| layer | type | shape | ranks | MACs before | MACs after | rel. error |",
            "|---|---|---|---|---:|---:|---:|"]
    layers = report["layers"]
    shown = layers if max_rows is None else layers[:max_rows]
    for e in shown:
        rows.append(f"| {e['name']} | {e['type']} | {'x'.join(map(str, e['shape']))} | "
                    f"{'/'.join(map(str, e['ranks']))} of {'/'.join(map(str, e['full_ranks']))} | "
                    f"{e['macs_before'] / 1e6:.2f} M | {e['macs_after'] / 1e6:.2f} M | {e['rel_error']:.4f} |")
    if len(shown) < len(layers):
        rows.append(f"| ... {len(layers) - len(shown)} more | | | | | | |")
    out = "\n".join(rows)
    out += (f"\n\nMACs {report['macs_before'] / 1e6:.1f} M -> {report['macs_after'] / 1e6:.1f} M "
            f"({report['macs_ratio']:.3f}x); params {report['params_before'] / 1e6:.2f} M -> "
            f"{report['params_after'] / 1e6:.2f} M ({report['params_ratio']:.3f}x); "
            f"{report['n_decomposed']} layers decomposed, {len(report['skipped'])} left alone")
    if report.get("budget"):
        b = report["budget"]
        out += f"\nbudget: {b['target_fraction']:.3f} of MACs -> {b['achieved_fraction']:.4f}" + (
            "" if b["feasible"] else " (NOT reachable with the allowed ranks)")
    if report["skipped"]:
        reasons: dict[str, int] = {}
        for s in report["skipped"]:
            reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
        out += "\nleft alone: " + "; ".join(f"{n} x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1]))
    return out
