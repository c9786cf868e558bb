"""Lazy package faces (PEP 562): ``from edgeus.quantize import quantize_onnx`` imports the submodule
that defines it on first use, so that importing a package (``edgeus.config`` imports the stages'
settings schemas) never pulls in torch, onnx or onnxruntime."""
from __future__ import annotations

import importlib
from typing import Callable


def lazy_exports(package: str, table: dict[str, str], *, first: tuple[str, ...] = ()) -> Callable[[str], object]:
    """A module ``__getattr__`` serving ``name`` from module ``table[name]``; the modules in ``first``
    are imported before (e.g. those that register themselves in a table the name refers to)."""
    def __getattr__(name: str):
        if name in table:
            for mod in first:
                importlib.import_module(mod)
            return getattr(importlib.import_module(table[name]), name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return __getattr__
