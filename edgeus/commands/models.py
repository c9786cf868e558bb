"""List the model zoo with parameter counts and MACs, or show one model.

    edgeus models                                  # every model, 112x112, width 1, 1 channel
    edgeus models data.image_size=224 model.width=0.5 data.in_chans=3
    edgeus models rsmas --classes 2                # one model: its arguments and numbers

MACs are torch-pruning's count for one image (batch 1). The class count is ``--classes <n>``
(default: the length of data.classes, else 3); ``model.kwargs`` apply when the model shown is
``model.name``.
"""
from __future__ import annotations

import inspect

from omegaconf import DictConfig, OmegaConf

from edgeus.errors import EdgeusError

USAGE = "[name] [--classes <n>] [data.image_size=112] [data.in_chans=1] [model.width=1.0]"
DEFAULTS = {"data": {"image_size": 112}}


def _summary(builder) -> str:
    doc = (builder.__doc__ or inspect.getmodule(builder).__doc__ or "").strip().splitlines()
    return doc[0] if doc else ""


def profile_models(names: list[str], *, image_size: int, in_chans: int, width: float, num_classes: int,
                   kwargs: dict | None = None) -> list[dict]:
    """Build each model and measure it: ``[{"name", "params", "macs", "summary"}]``."""
    from edgeus.models.profile import count_macs, count_params
    from edgeus.models.registry import create_model, get_builder

    rows = []
    for name in names:
        model = create_model(name, num_classes=num_classes, in_chans=in_chans, width=width, **(kwargs or {}))
        rows.append({"name": name, "params": count_params(model),
                     "macs": count_macs(model, image_size, in_chans), "summary": _summary(get_builder(name))})
    return rows


def _fmt_count(n: int) -> str:
    return f"{n / 1e9:.3f} G" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n / 1e3:.1f} K"


def run(cfg: DictConfig, args: list[str]) -> int:
    from edgeus.models.registry import get_builder, list_models

    num_classes = len(cfg.data.classes) if cfg.data.classes else 3
    rest, it = [], iter(args)
    for a in it:
        if a in ("--classes", "-c"):
            value = next(it, None)
            if value is None or not value.isdigit() or int(value) < 1:
                raise EdgeusError(f"{a} needs a positive class count, got {value!r}")
            num_classes = int(value)
        else:
            rest.append(a)
    if len(rest) > 1:
        raise EdgeusError(f"give at most one model name, got {rest}")
    image_size, in_chans, width = int(cfg.data.image_size), int(cfg.data.in_chans), float(cfg.model.width)

    if rest:
        name = rest[0]
        try:
            builder = get_builder(name)
        except KeyError as e:
            raise EdgeusError(str(e.args[0])) from None
        kwargs = dict(OmegaConf.to_container(cfg.model.kwargs)) if cfg.model.name == name else {}
        try:
            (row,) = profile_models([name], image_size=image_size, in_chans=in_chans, width=width,
                                    num_classes=num_classes, kwargs=kwargs)
        except (TypeError, ValueError) as e:
            raise EdgeusError(str(e)) from None
        print(f"{name}: {row['summary']}")
        print(f"  params  {row['params']:,} ({_fmt_count(row['params'])})")
        print(f"  MACs    {row['macs']:,} ({_fmt_count(row['macs'])}) at {in_chans}x{image_size}x{image_size}, "
              f"width {width}, {num_classes} classes")
        print("  arguments (model.kwargs.<name>=...):")
        for p in inspect.signature(builder).parameters.values():
            if p.name in ("num_classes", "in_chans", "width") or p.kind is p.VAR_KEYWORD:
                continue
            value = kwargs.get(p.name, p.default)
            print(f"    {p.name} = {value!r}")
        doc = inspect.getmodule(builder).__doc__
        if doc:
            print("\n" + doc.strip())
        return 0

    rows = profile_models(list_models(), image_size=image_size, in_chans=in_chans, width=width,
                          num_classes=num_classes)
    w = max(len(r["name"]) for r in rows)
    print(f"{'model'.ljust(w)}  {'params':>12}  {'MACs':>14}  description")
    for r in rows:
        print(f"{r['name'].ljust(w)}  {r['params']:>12,}  {r['macs']:>14,}  {r['summary']}")
    print(f"\n{in_chans}x{image_size}x{image_size} input, width {width}, {num_classes} classes "
          "(edgeus models <name> for one model's arguments)")
    return 0
