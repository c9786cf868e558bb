"""Manifests: what a build directory or firmware bundle holds, and whether it can be trusted here.

A manifest is ``manifest.json`` at the root of the directory it describes::

    {"schema_version": 1, "kind": "bundle" | "build", "created": "...", "edgeus": "0.1.0",
     "model": {"name", "classes", "preprocessing", "inputs", "outputs"},
     "files": {"relative/path": {"sha256": "...", "bytes": 123}, ...},
     "tensorrt": {"version", "compute_capability", "gpu", "jetpack", "engine"} | null,
     "target": {...}, "source": {"recipe", "run"}, "metrics": {...}, ...}

An engine only deserialises on the TensorRT version (and GPU architecture) that built it; the
``tensorrt`` section lets a device refuse a mismatched engine with a message that says what was
built where (``check_engine_compat``) instead of TensorRT's "version tag does not match".
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Iterable

from edgeus.errors import EdgeusError

SCHEMA_VERSION = 1
SUPPORTED_SCHEMAS = (1,)
MANIFEST = "manifest.json"


class ManifestError(EdgeusError):
    """A manifest is missing, unreadable, or of a schema this edgeus cannot read."""


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def file_entries(root: str | Path, paths: Iterable[str | Path] | None = None) -> dict[str, dict]:
    """``{relpath: {sha256, bytes}}`` for the given files (default: every file under root but the manifest)."""
    root = Path(root).resolve()   # rglob of a relative root yields root-prefixed relative paths
    if paths is None:
        paths = sorted(p for p in root.rglob("*") if p.is_file() and p != root / MANIFEST)
    out = {}
    for p in paths:
        p = Path(p)
        full = p if p.is_absolute() else root / p
        rel = full.relative_to(root).as_posix()
        if rel == MANIFEST:
            continue
        out[rel] = {"sha256": sha256_file(full), "bytes": full.stat().st_size}
    return dict(sorted(out.items()))


def now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).replace(microsecond=0).isoformat()


def new_manifest(kind: str, **sections: Any) -> dict:
    from edgeus import __version__

    m = {"schema_version": SCHEMA_VERSION, "kind": kind, "created": now(), "edgeus": __version__}
    m.update(sections)
    return m


def write_manifest(root: str | Path, manifest: dict, *, hash_files: bool = True) -> Path:
    """Write ``root/manifest.json`` (atomically), listing every file under ``root`` with its SHA-256."""
    root = Path(root)
    if hash_files:
        manifest["files"] = file_entries(root)
    path = root / MANIFEST
    tmp = path.with_name(f".{MANIFEST}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n")
    os.replace(tmp, path)
    return path


def read_manifest(root_or_path: str | Path) -> dict:
    p = Path(root_or_path)
    if p.is_dir():
        p = p / MANIFEST
    if not p.is_file():
        raise ManifestError(f"{p}: manifest not found")
    try:
        m = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ManifestError(f"{p}: not a readable JSON manifest ({str(e).splitlines()[0]})") from None
    if not isinstance(m, dict):
        raise ManifestError(f"{p}: manifest is not a JSON object")
    v = m.get("schema_version")
    if v not in SUPPORTED_SCHEMAS:
        from edgeus import __version__

        raise ManifestError(f"{p}: schema_version {v!r} is not supported by edgeus {__version__} "
                            f"(supported: {', '.join(map(str, SUPPORTED_SCHEMAS))})")
    if not isinstance(m.get("files"), dict):
        raise ManifestError(f"{p}: manifest has no 'files' table")
    return m


def check_files(root: str | Path, manifest: dict) -> tuple[list[str], list[str]]:
    """Errors (missing, truncated, resized, modified files) and warnings (unlisted files)."""
    root = Path(root)
    errors: list[str] = []
    for rel, entry in manifest.get("files", {}).items():
        if Path(rel).is_absolute() or ".." in Path(rel).parts:
            errors.append(f"{rel}: unsafe path in manifest")
            continue
        p = root / rel
        if not p.is_file():
            errors.append(f"{rel}: missing (listed in {MANIFEST})")
            continue
        size = p.stat().st_size
        want = int(entry.get("bytes", -1))
        if size < want:
            errors.append(f"{rel}: truncated ({size} of {want} bytes)")
            continue
        if size != want:
            errors.append(f"{rel}: size {size} bytes, manifest says {want}")
            continue
        if sha256_file(p) != entry.get("sha256"):
            errors.append(f"{rel}: SHA-256 mismatch (the file was modified after packaging)")
    listed = set(manifest.get("files", {}))
    warnings = [f"{p.relative_to(root).as_posix()}: not listed in {MANIFEST} (ignored)"
                for p in sorted(root.rglob("*")) if p.is_file()
                and p.relative_to(root).as_posix() not in listed and p.relative_to(root).as_posix() != MANIFEST]
    return errors, warnings


def check_engine_compat(built: dict | None, here: dict | None, engine: str = "engine") -> list[str]:
    """Why the engine described by ``built`` (a manifest's ``tensorrt`` section) cannot run ``here``.

    ``here`` is ``device_probe.probe()`` (or the same keys). Empty list: compatible.
    """
    from edgeus.deploy.versions import parse_version, same_engine_version

    if not built or not built.get("version"):
        return []
    here = here or {}
    problems = []
    where = f"{built.get('gpu') or 'GPU'} (compute capability {built.get('compute_capability') or '?'})"
    if not here.get("tensorrt"):
        problems.append(f"{engine}: built with TensorRT {built['version']} on {where}; TensorRT is not installed here")
        return problems
    if not same_engine_version(built["version"], here["tensorrt"]):
        problems.append(
            f"{engine}: built with TensorRT {built['version']}, this machine has TensorRT {here['tensorrt']}; "
            "an engine only loads on the TensorRT version that built it: rebuild it here from the bundled ONNX "
            "(build/build_engine.sh or edgeus build)")
    cc_b, cc_h = built.get("compute_capability"), here.get("compute_capability")
    if cc_b and cc_h and parse_version(cc_b)[:2] != parse_version(cc_h)[:2] and not built.get("hardware_compatible"):
        problems.append(
            f"{engine}: built for compute capability {cc_b} ({built.get('gpu') or 'unknown GPU'}), this GPU is "
            f"{here.get('gpu') or 'unknown'} with compute capability {cc_h}: rebuild it on this device")
    elif cc_b and not cc_h:
        problems.append(f"{engine}: built for compute capability {cc_b}; no CUDA GPU found here")
    return problems
