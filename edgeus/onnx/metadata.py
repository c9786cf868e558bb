"""The ``edgeus.*`` metadata an exported ONNX model carries (``ModelProto.metadata_props``).

Keys (values are JSON unless noted):

* ``edgeus.classes``        — class names, in logit order;
* ``edgeus.preprocessing``  — ``{"image_size", "in_chans", "mean", "std"}`` the model was trained with;
* ``edgeus.arch``           — the architecture record (``edgeus_arch``);
* ``edgeus.data``           — the data fingerprint (:func:`edgeus.data.fingerprint.data_fingerprint`):
  dataset, root, split seed and ratios, sha256 of the train / val / test / calibration file lists;
* ``edgeus.quantization``   — what the quantiser did (written by ``edgeus.quantize``);
* ``edgeus.version``, ``edgeus.opset`` — plain strings.

Older files stored ``classes`` / ``preprocessing`` without the prefix: :func:`model_info` reads both.
"""
from __future__ import annotations

import json
from pathlib import Path

PREFIX = "edgeus."
CLASSES, PREPROCESSING, ARCH, DATA = "edgeus.classes", "edgeus.preprocessing", "edgeus.arch", "edgeus.data"
QUANTIZATION, VERSION, OPSET = "edgeus.quantization", "edgeus.version", "edgeus.opset"


def _load(path_or_model):
    import onnx

    if isinstance(path_or_model, onnx.ModelProto):
        return path_or_model
    from pathlib import Path

    from edgeus.errors import InputError

    if not Path(str(path_or_model)).is_file():
        raise InputError(f"ONNX model not found: {path_or_model}")
    try:
        return onnx.load(str(path_or_model), load_external_data=False)
    except Exception as e:   # protobuf's DecodeError and friends: a truncated or foreign file
        raise InputError(f"{path_or_model} is not a readable ONNX model (truncated or corrupt?): "
                         f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def write_metadata(model, meta: dict) -> None:
    """Set ``meta`` ({key: value}) in ``model.metadata_props`` in place; non-strings are stored as JSON."""
    existing = {p.key: p for p in model.metadata_props}
    for k, v in meta.items():
        v = v if isinstance(v, str) else json.dumps(v, sort_keys=True)
        if k in existing:
            existing[k].value = v
        else:
            model.metadata_props.add(key=k, value=v)


def read_metadata(path_or_model) -> dict:
    """All metadata_props of an ONNX file or ModelProto, JSON values decoded."""
    out = {}
    for p in _load(path_or_model).metadata_props:
        try:
            out[p.key] = json.loads(p.value)
        except ValueError:
            out[p.key] = p.value
    return out


def model_info(path_or_model) -> dict:
    """``{"classes", "preprocessing", "arch", "data"}`` of a model (None where it does not say)."""
    raw = read_metadata(path_or_model)
    return {k: raw.get(PREFIX + k, raw.get(k)) for k in ("classes", "preprocessing", "arch", "data")}


def copy_metadata(src: str | Path, dst: str | Path, extra: dict | None = None) -> None:
    """Copy ``src``'s metadata into the ONNX file ``dst`` where ``dst`` lacks a key, then set ``extra``."""
    import onnx

    s = _load(src)
    d = onnx.load(str(dst))
    have = {p.key for p in d.metadata_props}
    write_metadata(d, {p.key: p.value for p in s.metadata_props if p.key not in have})
    write_metadata(d, extra or {})
    onnx.save(d, str(dst))


def add_calibration(path: str | Path, calibration_ids) -> bool:
    """Add the calibration file list's hash to the data fingerprint (``edgeus.data``) of the ONNX file at
    ``path``; False (file untouched) when the file carries no fingerprint."""
    import onnx

    from edgeus.data.fingerprint import with_calibration

    m = onnx.load(str(path))
    fp = read_metadata(m).get(DATA)
    if not isinstance(fp, dict):
        return False
    write_metadata(m, {DATA: with_calibration(fp, calibration_ids)})
    onnx.save(m, str(path))
    return True


__all__ = ["write_metadata", "read_metadata", "model_info", "copy_metadata", "add_calibration", "CLASSES", "PREPROCESSING", "ARCH",
           "DATA", "QUANTIZATION", "VERSION", "OPSET"]
