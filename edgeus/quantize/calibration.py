"""Calibration sets and activation ranges.

A calibration *spec* (``calibration/<name>.yaml``) says how to draw the set: from the TRAIN split
only (never val/test), N images (0 = all), class-balanced or not, seed, batch size, and the range
method (min-max, entropy/KL, percentile, MSE). The set is drawn from ``bundle.train_plain`` — the train
split without augmentation, preprocessed exactly as at inference — and fingerprinted (file list +
preprocessing + the bytes of the input tensors) so the same scales can be reproduced.

Ranges are computed once per (model, set, method) with ONNX Runtime's calibrators and kept as
ONNX Runtime's JSON range cache; from it we also write a TensorRT calibration cache
(``TRT-<version>-EntropyCalibration2`` + one ``tensor: <hex of big-endian float32 scale>`` line
per tensor, scale = amax / 127) for users of implicit quantisation on older JetPack releases.
"""
from __future__ import annotations

import hashlib
import json
import logging
import struct
import tempfile
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from edgeus.errors import EdgeusError

log = logging.getLogger("edgeus.quantize")
METHODS = ("minmax", "entropy", "percentile", "mse")
ENTROPY_BINS = 2048


@dataclass
class CalibrationSpec:
    name: str = "default"
    description: str = ""
    split: str = "train"
    num_images: int = 256       # 0 = the whole split
    balanced: bool = True
    seed: int = 0
    batch_size: int = 16
    method: str = "minmax"
    percentile: float = 99.99
    moving_average: bool = False

    def validate(self) -> "CalibrationSpec":
        if self.split not in ("train", "train_plain"):
            raise EdgeusError(f"calibration spec {self.name!r}: split={self.split!r}; calibration data must come "
                              "from the train split only (never val/test)")
        if self.method not in METHODS:
            raise EdgeusError(f"calibration spec {self.name!r}: method={self.method!r}; expected one of {', '.join(METHODS)}")
        if self.num_images < 0 or self.batch_size < 1:
            raise EdgeusError(f"calibration spec {self.name!r}: num_images must be >= 0 and batch_size >= 1")
        if not 0 < self.percentile <= 100:
            raise EdgeusError(f"calibration spec {self.name!r}: percentile must be in (0, 100]")
        return self


def load_spec(name: str = "default", overrides=None) -> CalibrationSpec:
    """Read ``calibration/<name>.yaml`` (or a YAML path); ``overrides`` is ``cfg.quantize`` or a dict."""
    from omegaconf import OmegaConf

    from edgeus import resources

    try:
        path = resources.find("calibration", name)
    except KeyError as e:
        raise EdgeusError(str(e.args[0])) from None
    raw = OmegaConf.to_container(OmegaConf.load(path)) or {}
    known = {f.name for f in fields(CalibrationSpec)}
    unknown = sorted(set(raw) - known)
    if unknown:
        raise EdgeusError(f"{path}: unknown key(s) {unknown}; valid: {sorted(known)}")
    spec = CalibrationSpec(**{**raw, "name": Path(path).stem})
    if overrides is not None:
        get = overrides.get if hasattr(overrides, "get") else (lambda k, d=None: getattr(overrides, k, d))
        if get("method", None):
            spec.method = str(get("method"))
        if get("num_images", None) is not None:
            spec.num_images = int(get("num_images"))
        if get("percentile", None) is not None:
            spec.percentile = float(get("percentile"))
    return spec.validate()


def select_indices(labels: np.ndarray, n: int, balanced: bool, seed: int) -> np.ndarray:
    """Indices into ``labels``: n of them (0 or >= len = all), class-balanced by round robin."""
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    if n <= 0 or n >= len(labels):
        return np.arange(len(labels))
    if not balanced:
        return np.sort(rng.choice(len(labels), size=n, replace=False))
    pools = [list(rng.permutation(np.flatnonzero(labels == k))) for k in np.unique(labels)]
    chosen: list[int] = []
    while len(chosen) < n:
        progressed = False
        for pool in pools:
            if pool and len(chosen) < n:
                chosen.append(int(pool.pop(0)))
                progressed = True
        if not progressed:
            break
    return np.sort(np.asarray(chosen, np.int64))


@dataclass
class CalibrationSet:
    images: np.ndarray          # float32 [N, C, H, W], preprocessed as at inference
    labels: np.ndarray
    ids: list[str]
    spec: CalibrationSpec
    sha256: str

    def batch_size(self, uniform: bool = False) -> int:
        """The spec's batch size; ``uniform``: the largest one <= it that divides the set (ONNX Runtime's
        histogram calibrators stack every batch's outputs and fail on a shorter last batch)."""
        bs = max(1, min(self.spec.batch_size, len(self.images)))
        if uniform:
            while len(self.images) % bs:
                bs -= 1
        return bs

    def batches(self, uniform: bool = False):
        bs = self.batch_size(uniform)
        for i in range(0, len(self.images), bs):
            yield self.images[i:i + bs]

    def reader(self, input_name: str = "input", uniform: bool = False):
        from onnxruntime.quantization import CalibrationDataReader

        outer = self

        class _Reader(CalibrationDataReader):
            def __init__(self):
                self._it = iter(outer.batches(uniform))

            def get_next(self):
                batch = next(self._it, None)
                return None if batch is None else {input_name: batch}

            def __len__(self):
                return -(-len(outer.images) // outer.batch_size(uniform))

        return _Reader()

    def counts(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).tolist()

    def write_file_list(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        header = [f"# edgeus calibration set: spec {self.spec.name} {json.dumps(asdict(self.spec), sort_keys=True)}",
                  f"# sha256 {self.sha256}", "# id\tlabel"]
        path.write_text("\n".join(header + [f"{i}\t{int(y)}" for i, y in zip(self.ids, self.labels)]) + "\n")
        return path

    def describe(self, classes: list[str] | None = None) -> dict:
        return {"spec": asdict(self.spec), "n": int(len(self.images)), "sha256": self.sha256,
                "per_class": (dict(zip(classes, self.counts(len(classes)))) if classes else self.counts(int(self.labels.max()) + 1))}


def build_calibration_set(bundle, spec: CalibrationSpec) -> CalibrationSet:
    """Draw the calibration set from ``bundle.train_plain`` (train split, no augmentation)."""
    spec.validate()
    ds = bundle.train_plain
    if getattr(ds, "augment", None) is not None:
        raise EdgeusError("bundle.train_plain is augmented; calibration needs inference preprocessing")
    ids_all = list(bundle.ids("train_plain"))
    held_out = set(bundle.ids("val")) | set(bundle.ids("test"))
    leaked = [i for i in ids_all if i in held_out]
    if leaked:  # the data layer promises disjoint splits; calibration refuses to rely on it blindly
        raise EdgeusError(f"{len(leaked)} train image(s) also in val/test (e.g. {leaked[0]}); refusing to calibrate")
    labels_all = np.asarray(getattr(ds, "labels", None) if getattr(ds, "labels", None) is not None
                            else [int(ds[i]["label"]) for i in range(len(ds))])
    idx = select_indices(labels_all, spec.num_images, spec.balanced, spec.seed)
    images = np.stack([ds[int(i)]["image"].numpy().astype(np.float32) for i in idx])
    ids = [ids_all[int(i)] for i in idx]
    h = hashlib.sha256()
    h.update(json.dumps({k: v for k, v in asdict(spec).items() if k not in ("name", "description")},
                        sort_keys=True).encode())
    h.update(json.dumps(getattr(bundle, "preprocessing", {}), sort_keys=True).encode())
    h.update("\n".join(ids).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    return CalibrationSet(images, labels_all[idx], ids, spec, h.hexdigest())


# ---------------------------------------------------------------------------------------------
# ranges


def compute_ranges(model_path: str | Path, calib: CalibrationSet, cache_path: str | Path, *,
                   symmetric: bool = False, input_name: str | None = None) -> dict[str, tuple[float, float]]:
    """Run ONNX Runtime's calibrator over the set; save its JSON range cache; return {tensor: (lo, hi)}."""
    import onnx
    from onnxruntime.quantization.calibrate import create_calibrator, save_tensors_data

    from edgeus.quantize.qdq import calibration_method

    spec = calib.spec
    if input_name is None:
        m = onnx.load(str(model_path), load_external_data=False)
        inits = {t.name for t in m.graph.initializer}
        input_name = next(i.name for i in m.graph.input if i.name not in inits)
    options: dict = {"symmetric": bool(symmetric)}
    if spec.method == "minmax":
        options["moving_average"] = bool(spec.moving_average)
    if spec.method == "percentile":
        options["percentile"] = float(spec.percentile)
    if spec.method == "mse":
        options["num_bins"] = ENTROPY_BINS       # histogram of each tensor; the clip is chosen by mse_range
    if spec.method == "entropy":
        # ONNX Runtime's default histogram (128 bins) equals its 128 quantised bins, which leaves the KL
        # search a single candidate - the full min-max range. 2048 bins is TensorRT's entropy calibrator's.
        options["num_bins"] = ENTROPY_BINS
        options["num_quantized_bins"] = 128
    with tempfile.TemporaryDirectory(prefix="edgeus-calib-") as tmp:
        calibrator = create_calibrator(Path(model_path), None, augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                                       calibrate_method=calibration_method(spec.method), extra_options=options)
        calibrator.collect_data(calib.reader(input_name, uniform=spec.method != "minmax"))
        data = calibrator.compute_data()
        if spec.method == "mse":
            data = _mse_data(calibrator.collector.histogram_dict, data, bool(symmetric))
        del calibrator
    save_tensors_data(data, cache_path)
    return {k: (float(np.asarray(v.range_value[0]).min()), float(np.asarray(v.range_value[1]).max()))
            for k, v in data.data.items()}


def mse_range(hist: np.ndarray, edges: np.ndarray, lo: float, hi: float, symmetric: bool = False,
              steps: int = 81) -> tuple[float, float]:
    """The clipping range whose 8-bit quantisation (255 levels asymmetric, 254 symmetric) of the histogram has
    the least squared error (rounding + clipping): symmetric, ``[-f a, f a]`` with ``a`` = max |min|, |max|;
    asymmetric, first the upper end ``f hi`` with the lower end at ``lo``, then the lower end ``f lo`` with
    that upper end (each end kept on its side of 0), ``f`` in [0.2, 1]."""
    c = (edges[:-1] + edges[1:]) / 2
    h = np.asarray(hist, np.float64)
    levels = 254 if symmetric else 255

    def err(a: float, b: float) -> float:
        if b - a <= 0:
            return np.inf
        st = (b - a) / levels
        q = np.clip(np.round((c - a) / st), 0, levels) * st + a
        return float((h * (c - q) ** 2).sum())

    fs = np.linspace(1.0, 0.2, steps)              # from no clipping down: ties keep the wider range
    if symmetric:
        amax = max(abs(lo), abs(hi))
        f = min(fs, key=lambda f: err(-amax * f, amax * f))
        return float(-amax * f), float(amax * f)
    lo, hi = min(0.0, lo), max(0.0, hi)
    b = hi * min(fs, key=lambda f: err(lo, hi * f)) if hi > 0 else 0.0
    a = lo * min(fs, key=lambda f: err(lo * f, b)) if lo < 0 else 0.0
    return float(a), float(b)


def _mse_data(histograms: dict, data, symmetric: bool):
    """ONNX Runtime ranges (``TensorsData``) with each tensor's range replaced by :func:`mse_range`."""
    from onnxruntime.quantization.calibrate import TensorData, TensorsData

    out = {}
    for name, td in data.data.items():
        if name not in histograms:
            out[name] = td
            continue
        hist, edges, lo, hi = histograms[name][:4]
        a, b = mse_range(hist, edges, float(lo), float(hi), symmetric)
        out[name] = TensorData(lowest=np.array(a, np.float32), highest=np.array(b, np.float32))
    return TensorsData(data.calibration_method, out)    # quantize_static checks the cache's method


def write_tensorrt_cache(ranges: dict[str, tuple[float, float]], path: str | Path, version: str = "8602",
                         tensors: list[str] | None = None) -> Path:
    """TensorRT calibration cache (text): header, then ``name: <big-endian float32 hex of amax/127>``."""
    path = Path(path)
    lines = [f"TRT-{version}-EntropyCalibration2"]
    for name in (tensors if tensors is not None else sorted(ranges)):
        if name not in ranges:
            continue
        lo, hi = ranges[name]
        amax = max(abs(lo), abs(hi))
        scale = amax / 127.0 if amax > 0 else 1.0 / 127.0
        lines.append(f"{name}: {struct.pack('>f', scale).hex()}")
    path.write_text("\n".join(lines) + "\n")
    return path


def read_tensorrt_cache(path: str | Path) -> tuple[str, dict[str, float]]:
    """(header, {tensor: scale}) of a TensorRT calibration cache."""
    text = Path(path).read_text().splitlines()
    out = {}
    for line in text[1:]:
        if not line.strip():
            continue
        name, _, hexval = line.rpartition(":")
        out[name.strip()] = struct.unpack(">f", bytes.fromhex(hexval.strip()))[0]
    return text[0], out


__all__ = ["CalibrationSpec", "CalibrationSet", "load_spec", "select_indices", "build_calibration_set",
           "compute_ranges", "write_tensorrt_cache", "read_tensorrt_cache", "METHODS"]
