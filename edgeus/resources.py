"""Find the YAML files that ship with edgeus (recipes, targets, calibration specs).

In a source checkout they sit at the top of the repository (``recipes/``, ``targets/``,
``calibration/``); after ``pip install .`` the same files are package data inside
``edgeus.recipes`` and friends. Both places are searched, the installed package first.
"""
from __future__ import annotations

import importlib.resources
from pathlib import Path

GROUPS = ("recipes", "targets", "calibration")
_CHECKOUT = Path(__file__).resolve().parent.parent


def group_dirs(group: str) -> list[Path]:
    if group not in GROUPS:
        raise ValueError(f"unknown resource group {group!r}; expected one of {GROUPS}")
    dirs: list[Path] = []
    try:
        pkg = importlib.resources.files(f"edgeus.{group}")
        for p in getattr(pkg, "_paths", None) or [Path(str(pkg))]:
            dirs.append(Path(p))
    except (ModuleNotFoundError, TypeError):
        pass
    local = _CHECKOUT / group
    if local.is_dir() and local not in dirs:
        dirs.append(local)
    return [d for d in dirs if d.is_dir()]


def list_options(group: str) -> list[str]:
    names = set()
    for d in group_dirs(group):
        names.update(p.stem for p in d.glob("*.yaml"))
    return sorted(names)


def find(group: str, name: str) -> Path:
    """Path of ``<group>/<name>.yaml``; a user may also pass a path to a YAML file of their own."""
    as_path = Path(name)
    if as_path.suffix in (".yaml", ".yml") and as_path.is_file():
        return as_path
    for d in group_dirs(group):
        p = d / f"{name}.yaml"
        if p.is_file():
            return p
    import difflib

    options = list_options(group)
    close = difflib.get_close_matches(name, options, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    raise KeyError(
        f"no {group[:-1] if group != 'calibration' else 'calibration spec'} named {name!r}.{hint} "
        f"Available: {', '.join(options) or '(none)'}"
    )
