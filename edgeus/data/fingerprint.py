"""Data fingerprints: which images a model was trained, validated, calibrated and tested on.

    fp = data_fingerprint(bundle, cfg.data)                  # stored in checkpoints ("data") and ONNX ("edgeus.data")
    fp = with_calibration(fp, calibration_ids)               # the quantiser adds its calibration list
    problems = verify_split(bundle, fp)                      # [] when ``bundle`` reproduces the model's split
    shared = overlap(eval_ids, model_bundle, ("train", "val"))

A fingerprint holds the dataset, its root, the split seed and ratios, the settings that rebuild the
split (``source``: a ``data`` section's keys) and the sha256 of each sorted file list. Files are
named relative to the dataset root, so a dataset that moved keeps its fingerprint; the phantom's
"files" are its generated sample ids (``phantom:<seed>:<class>:<i>``). Lists are hashed, never
stored: a model file stays small, and a split is checked by rebuilding it.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

SCHEMA = "edgeus-data-fingerprint/1"
SPLITS = ("train", "val", "test")
# the data-section keys that decide which image lands in which split (preprocessing is stored apart)
SOURCE_KEYS = ("name", "root", "seed", "split", "classes", "n_per_class", "phantom_size", "csv", "scheme", "views")


def plain(v):
    if v is None or isinstance(v, (str, int, float, bool)):
        return v
    try:
        return [plain(x) for x in v]
    except TypeError:
        return str(v)


def relative_id(file_id: str, root: str | None) -> str:
    """A file's name relative to the dataset root (posix), or the id itself (phantom ids, outside root)."""
    if not root or file_id.startswith("phantom:"):
        return file_id
    try:
        return Path(file_id).resolve().relative_to(Path(root).resolve()).as_posix()
    except ValueError:
        return file_id


def identity(file_id: str) -> str:
    """What makes two ids the same image: the resolved path for files, the id itself otherwise."""
    if file_id.startswith("phantom:"):
        return file_id
    if os.path.isabs(file_id) or os.path.exists(file_id):
        return str(Path(file_id).resolve())
    return file_id


def list_sha256(ids) -> str:
    """sha256 of the sorted list (one id per line)."""
    return hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()


def data_fingerprint(bundle, data_cfg, calibration_ids=None) -> dict:
    """The fingerprint of ``bundle`` (built from the ``data`` section ``data_cfg``)."""
    root = getattr(data_cfg, "root", None)
    source = {k: plain(getattr(data_cfg, k, None)) for k in SOURCE_KEYS}
    source["classes"] = list(bundle.classes)   # the classes read, in logit order
    if root:
        source["root"] = str(Path(root).resolve())
    fp = {"schema": SCHEMA, "dataset": bundle.name, "root": source["root"], "seed": int(data_cfg.seed),
          "split": [float(x) for x in data_cfg.split], "classes": list(bundle.classes), "source": source,
          "n": {s: len(bundle.split(s)) for s in SPLITS},
          "sha256": {s: list_sha256(relative_id(i, root) for i in bundle.ids(s)) for s in SPLITS}}
    return with_calibration(fp, calibration_ids) if calibration_ids is not None else fp


def with_calibration(fp: dict, calibration_ids, root: str | None = None) -> dict:
    """A copy of ``fp`` with the calibration file list's hash and size."""
    root = root if root is not None else fp.get("root")
    ids = list(calibration_ids)
    out = {**fp, "n": {**fp.get("n", {}), "calibration": len(ids)},
           "sha256": {**fp.get("sha256", {}), "calibration": list_sha256(relative_id(i, root) for i in ids)}}
    return out


def verify_split(bundle, fp: dict, splits=SPLITS, root: str | None = None) -> list[str]:
    """The splits of ``bundle`` whose file lists differ from the fingerprint's ([] = the same split).

    ``root``: where ``bundle`` was read from (default: the fingerprint's root; a moved dataset keeps
    its relative names)."""
    root = root if root is not None else fp.get("root")
    bad = []
    for s in splits:
        want = (fp.get("sha256") or {}).get(s)
        if want is None or list_sha256(relative_id(i, root) for i in bundle.ids(s)) != want:
            bad.append(s)
    return bad


def overlap(ids, model_bundle, splits=("train", "val")) -> list[str]:
    """The ids among ``ids`` that are images of ``model_bundle``'s ``splits``."""
    seen = {identity(i) for s in splits for i in model_bundle.ids(s)}
    return [i for i in ids if identity(i) in seen]


def source_overrides(fp: dict) -> dict:
    """The ``data`` section values that rebuild the fingerprint's split."""
    return {k: v for k, v in (fp.get("source") or {}).items() if k in SOURCE_KEYS}


__all__ = ["data_fingerprint", "with_calibration", "verify_split", "overlap", "list_sha256", "relative_id",
           "identity", "source_overrides", "plain", "SOURCE_KEYS", "SCHEMA"]
