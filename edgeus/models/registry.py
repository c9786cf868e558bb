"""One registry for every architecture, in the style of timm.

Each architecture lives in its own file and registers a builder::

    @register_model
    def resnet50(num_classes=3, in_chans=1, width=1.0, **kwargs) -> nn.Module: ...

``create_model(name, ...)`` raises on unknown names and on unknown keyword arguments, and
attaches ``model.edgeus_arch = {"name": ..., "num_classes": ..., "in_chans": ..., "width": ..., "kwargs": {...}}``
so that checkpoints can rebuild the same architecture.
"""
from __future__ import annotations

import difflib
import importlib
import inspect
from typing import Callable

import torch.nn as nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}

# modules that hold architectures; imported lazily on first use of the registry
_ARCH_MODULES = (
    "simple_cnn", "resnet50", "rsmas", "efficientnet_b0_cbam", "dsc_sta", "mobilenetv2", "two_stage",
    "densenet201",
)
_loaded = False


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    name = fn.__name__
    if name in _MODELS and _MODELS[name] is not fn:
        raise ValueError(f"model {name!r} registered twice")
    _MODELS[name] = fn
    return fn


def _load_all() -> None:
    global _loaded
    if _loaded:
        return
    for mod in _ARCH_MODULES:
        try:
            importlib.import_module(f"edgeus.models.{mod}")
        except ModuleNotFoundError as e:
            if e.name != f"edgeus.models.{mod}":
                raise
    _loaded = True


def list_models() -> list[str]:
    _load_all()
    return sorted(_MODELS)


def get_builder(name: str) -> Callable[..., nn.Module]:
    _load_all()
    if name not in _MODELS:
        close = difflib.get_close_matches(name, list(_MODELS), n=3)
        raise KeyError(
            f"unknown model {name!r}." + (f" Did you mean {', '.join(close)}?" if close else "")
            + f" Available: {', '.join(sorted(_MODELS))}"
        )
    return _MODELS[name]


def _plain(value):
    """OmegaConf lists/dicts (from ``model.kwargs``) as plain Python containers, so that
    ``edgeus_arch`` pickles into checkpoints that load with ``weights_only=True``."""
    if type(value).__module__.startswith("omegaconf"):
        from omegaconf import OmegaConf

        return OmegaConf.to_container(value, resolve=True)
    return value


def create_model(name: str, num_classes: int = 3, in_chans: int = 1, width: float = 1.0, **kwargs) -> nn.Module:
    builder = get_builder(name)
    params = inspect.signature(builder).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = sorted(set(kwargs) - set(params))
        if unknown:
            valid = sorted(k for k in params if k not in ("num_classes", "in_chans", "width"))
            raise TypeError(
                f"model {name!r} got unknown argument(s) {unknown}; it takes: {', '.join(valid) or '(none)'}"
            )
    kwargs = {k: _plain(v) for k, v in kwargs.items()}
    model = builder(num_classes=num_classes, in_chans=in_chans, width=width, **kwargs)
    model.edgeus_arch = {
        "name": name, "num_classes": int(num_classes), "in_chans": int(in_chans),
        "width": float(width), "kwargs": dict(kwargs),
    }
    return model
