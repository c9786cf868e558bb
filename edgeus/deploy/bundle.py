"""Firmware bundles: ``package`` writes one from a run, ``verify`` decides whether to trust one.

Bundle layout (a directory, and the same tree as ``<dir>.tar.gz``)::

    manifest.json            schema_version, model (classes, preprocessing, I/O), files + SHA-256,
                             tensorrt (when an engine is inside), golden (inputs, expected, tolerance),
                             target, source (recipe, run), metrics
    model/model.int8.onnx    the Q/DQ model for the target (ONNX Runtime fallback / device build input)
    model/model.fp32.onnx    the FP32 student (last-resort fallback, reference)
    build/                   the engine, or the ONNX + build_engine.sh + trtexec.txt (+ build manifest)
    golden/inputs.npy        golden inputs (normalised, NCHW float32): real test-split images, a few per class
    golden/raw.npy           the same images before normalisation (uint8 [N, H, W] at the model's size)
    golden/expected.*.npy    logits of each model on them (ONNX Runtime, CPU); their top-1 in the manifest
    tools/edgeus_device.py   the on-device tool: verify, build with trtexec, golden check, timing
    labels.json, preprocessing.json, metrics.json, source/config.yaml, source/ledger.json
    manifest.json.sig        Ed25519 signature of manifest.json (with package.sign_key=)

``verify`` trusts nothing the manifest does not prove: every file present must be listed with its
SHA-256 (``allow_extra`` to accept others), every path the manifest refers to must be listed and
inside the bundle, archives are size- and member-limited before extraction, and with ``key`` the
manifest's Ed25519 signature must be valid. These trust checks are the on-device tool's own
(``edgeus/deploy/ondevice/edgeus_device.py``), so host and device decide alike.
"""
from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgeus.deploy import manifest as mf
from edgeus.deploy.config import BuildConfig, section
from edgeus.errors import EdgeusError

log = logging.getLogger(__name__)

RUN_NAMES = {"fp32_onnx": "student.fp32.onnx", "int8_onnx": "student.int8.onnx", "build_dir": "build",
             "metrics": "metrics.json"}


# ------------------------------------------------------------------------------------------ package

def _pick(explicit, cfg_value, run_dir: Path | None, default_name: str) -> Path | None:
    for v in (explicit, cfg_value):
        if v:
            p = Path(v)
            if not p.exists():
                raise EdgeusError(f"{p}: not found")
            return p
    if run_dir is not None and (run_dir / default_name).exists():
        return run_dir / default_name
    return None


def _softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim == 1:
        x = x[None]
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


DEVICE_TOOL = Path(__file__).with_name("ondevice") / "edgeus_device.py"


def device_tool():
    """The on-device tool (``ondevice/edgeus_device.py``) as a module: the one implementation of the
    bundle trust checks (files, references, archive limits, signatures), used by host and device."""
    mod = sys.modules.get("edgeus._device_tool")
    if mod is None:
        spec = importlib.util.spec_from_file_location("edgeus._device_tool", DEVICE_TOOL)
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        sys.modules["edgeus._device_tool"] = mod
    return mod


def _ort_outputs(onnx_path: Path, inputs: np.ndarray) -> np.ndarray:
    """Logits of an ONNX model on ``inputs`` (ONNX Runtime, CPU), in the model's static batch if it has one."""
    from edgeus.onnx.session import run_logits, session

    sess = session(onnx_path)
    shape = sess.get_inputs()[0].shape
    static_b = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None
    if static_b and static_b != len(inputs):
        return run_logits(sess, inputs, batch=static_b)
    return run_logits(sess, inputs, batch=None)


def _ort_mask(onnx_path: Path, inputs: np.ndarray) -> np.ndarray | None:
    """The ``mask`` output (a two-stage model's lesion probabilities) on ``inputs``, or None without one."""
    from edgeus.onnx.export import MASK_NAME
    from edgeus.onnx.session import session

    sess = session(onnx_path)
    if MASK_NAME not in [o.name for o in sess.get_outputs()]:
        return None
    name = sess.get_inputs()[0].name
    shape = sess.get_inputs()[0].shape
    step = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else len(inputs)
    x = inputs.astype(np.float32)
    return np.concatenate([sess.run([MASK_NAME], {name: x[i:i + step]})[0] for i in range(0, len(x), step)])


def _engine_logits(outputs: dict) -> np.ndarray:
    """The logits among an engine's outputs (by name; a two-stage engine also returns ``mask``)."""
    return outputs["logits"] if "logits" in outputs else next(iter(outputs.values()))


def _run_meta(run_dir: Path | None) -> dict:
    """recipe/run/config of a run directory (config.yaml, ledger.json), when present."""
    if run_dir is None:
        return {}
    out: dict[str, Any] = {"run": run_dir.name}
    cfg_file = run_dir / "config.yaml"
    if cfg_file.is_file():
        from omegaconf import OmegaConf

        try:
            rc = OmegaConf.load(cfg_file)
            out["recipe"] = OmegaConf.select(rc, "recipe.name")
            out["data"] = OmegaConf.to_container(rc.data, resolve=True) if "data" in rc else None
        except Exception as e:  # a broken config should not stop packaging, but say so
            log.warning("cannot read %s: %s", cfg_file, e)
    return out


@dataclass
class _Golden:
    inputs: np.ndarray                 # float32 [N, C, H, W], normalised
    raw: np.ndarray | None             # uint8 [N, H, W] before normalisation (None: noise)
    ids: list
    labels: list                       # true class index per image (None: noise)
    source: str


def _pick_golden(labels: np.ndarray, n: int) -> list[int]:
    """``n`` positions, round-robin over the classes (first images of each class first), so that every
    class is represented and a model answering one class for everything fails."""
    by_class = [list(np.nonzero(labels == c)[0]) for c in np.unique(labels)]
    out: list[int] = []
    while len(out) < n and any(by_class):
        for lst in by_class:
            if lst and len(out) < n:
                out.append(int(lst.pop(0)))
    return sorted(out)


def _golden_inputs(shape: list, n: int, data, seed) -> _Golden:
    """Golden images from the test split of ``data`` (a DataBundle or a split), a few of every class;
    seeded noise when no data is given."""
    c, h, w = (int(d) for d in shape[1:4])
    if data is not None:
        ds = getattr(data, "test", data)
        labels = np.asarray(getattr(ds, "labels", np.zeros(len(ds), np.int64)))
        idx = _pick_golden(labels, min(n, len(ds)))
        imgs = np.stack([np.asarray(ds[i]["image"], dtype=np.float32) for i in idx])
        if tuple(imgs.shape[1:]) != (c, h, w):
            raise EdgeusError(f"golden inputs from the data are {tuple(imgs.shape[1:])}, the model takes "
                              f"{(c, h, w)}: set data.image_size / data.in_chans to the model's")
        raw = None
        if hasattr(ds, "raw"):
            raw = np.stack([np.round(np.asarray(ds.raw(i)[0], dtype=np.float32)[0] * 255.0) for i in idx])
            raw = np.clip(raw, 0, 255).astype(np.uint8)
        all_ids = data.ids("test") if hasattr(data, "ids") else []
        ids = [str(all_ids[i]) for i in idx] if all_ids else [str(i) for i in idx]
        return _Golden(imgs, raw, ids, [int(labels[i]) for i in idx],
                       f"test split ({len(idx)} images: {', '.join(ids[:8])})")
    rng = np.random.default_rng(int(seed or 0))
    log.warning("golden inputs are seeded noise: the device check cannot catch a wrong preprocessing or a "
                "constant answer (give the run's data: package.golden_data=true)")
    return _Golden(rng.standard_normal((n, c, h, w)).astype(np.float32), None, [], [],
                   f"seeded normal noise (seed {seed})")


@dataclass
class _Artifacts:
    """What a bundle is made from: the run's files, or the ones named explicitly."""
    run: Path | None
    fp32: Path | None
    int8: Path | None
    build_dir: Path | None
    metrics: dict | Path | None


def _find_artifacts(run_dir, pcfg, fp32_onnx, int8_onnx, build_dir, metrics) -> _Artifacts:
    run = Path(run_dir) if run_dir else None
    if run is not None and not run.is_dir():
        raise EdgeusError(f"run directory not found: {run}")
    fp32 = _pick(fp32_onnx, pcfg.fp32_onnx, run, RUN_NAMES["fp32_onnx"])
    int8 = _pick(int8_onnx, pcfg.int8_onnx, run, RUN_NAMES["int8_onnx"])
    bdir = _pick(build_dir, pcfg.build_dir, run, RUN_NAMES["build_dir"])
    mpath = metrics if isinstance(metrics, dict) else _pick(metrics, pcfg.metrics, run, RUN_NAMES["metrics"])
    if fp32 is None and int8 is None:
        where = f" in {run}" if run else ""
        raise EdgeusError(f"nothing to package: no {RUN_NAMES['int8_onnx']} or {RUN_NAMES['fp32_onnx']}{where} "
                          "(name them with package.int8_onnx= / package.fp32_onnx=)")
    return _Artifacts(run, fp32, int8, bdir, mpath)


def _check_out(out: Path, overwrite: bool, tar: bool) -> None:
    """Refuse to replace anything of a user's without ``overwrite``, and anything that is not a bundle ever."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise EdgeusError(f"out={out} exists and is not a directory; a bundle is a directory: choose another out=")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise EdgeusError(f"out={out} exists and is not empty; choose another out= or set package.overwrite=true")
        if not (out / mf.MANIFEST).is_file():
            raise EdgeusError(f"out={out} is not an edgeus bundle (no {mf.MANIFEST}); refusing to replace it even "
                              "with package.overwrite=true: remove it yourself or choose another out=")
    tar_path = out.with_name(out.name + ".tar.gz")
    if tar and (tar_path.exists() or tar_path.is_symlink()):
        if tar_path.is_dir() or tar_path.is_symlink():
            raise EdgeusError(f"{tar_path} exists and is not a file: choose another out=")
        if not overwrite:
            raise EdgeusError(f"{tar_path} exists; choose another out= or set package.overwrite=true")


def _prepare_out(out: Path) -> Path:
    """A fresh temporary directory beside ``out`` to write the bundle into (moved to ``out`` when complete)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    (tmp / "model").mkdir()
    (tmp / "golden").mkdir()
    return tmp


def _move_into_place(tmp: Path, out: Path) -> None:
    if out.exists():   # _check_out allowed it: an empty directory, or a bundle with overwrite=true
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old)
    else:
        os.replace(tmp, out)


def _describe_model(primary: Path, runm: dict, data_preprocessing: dict | None):
    """(metadata, inputs, outputs, preprocessing, classes) of the model: its ONNX metadata first,
    then the run's config, then ``data_preprocessing`` (the caller's data section: mean, std)."""
    from edgeus.deploy.builder import model_meta
    from edgeus.deploy.trt_compat import load_model, tensor_info

    pmodel = load_model(primary)
    meta = model_meta(pmodel)
    inputs, outputs = tensor_info(pmodel)
    prep = meta.get("preprocessing") or {}
    if not prep:
        d = runm.get("data") or {k: (data_preprocessing or {}).get(k) for k in ("mean", "std")}
        shp = inputs[0]["shape"] if inputs else []
        prep = {"image_size": shp[2] if len(shp) > 2 else d.get("image_size"),
                "in_chans": shp[1] if len(shp) > 1 else d.get("in_chans"),
                "mean": list(d.get("mean") or []), "std": list(d.get("std") or [])}
        log.warning("no preprocessing in the ONNX metadata; using the model's input shape and %s mean/std",
                    "the run's" if runm.get("data") else "cfg.data's")
    classes = meta.get("classes") or (runm.get("data") or {}).get("classes")
    if not classes:
        k = outputs[0]["shape"][-1] if outputs and outputs[0]["shape"] else 0
        classes = [str(i) for i in range(int(k) if isinstance(k, int) else 0)]
        log.warning("no class names in the ONNX metadata or the run config; labels.json lists indices")
    return meta, inputs, outputs, prep, classes


def _declare_outputs(outputs: list[dict]) -> dict | None:
    """Give each output its role in the manifest (``logits``; ``mask`` for a two-stage model's lesion mask,
    the second output of its ONNX graph) and return the manifest's ``segmentation`` entry (None without a
    mask), so firmware knows the mask is there and how to draw it."""
    from edgeus.onnx.export import MASK_NAME, OUTPUT_NAME

    seg = None
    for o in outputs:
        if o.get("name") == OUTPUT_NAME:
            o["role"] = "class logits (softmax -> probabilities in labels.json order)"
        elif o.get("name") == MASK_NAME:
            o["role"] = "segmentation mask"
            seg = {"output": MASK_NAME, "shape": o.get("shape"), "values": "lesion probability per pixel in [0, 1]",
                   "threshold": 0.5, "note": "same height and width as the input image; pixels above the threshold "
                   "are the lesion the classifier saw (the ledger's Dice / IoU use this threshold)"}
    return seg


def _copy_models(out: Path, a: _Artifacts) -> dict[str, Path]:
    models: dict[str, Path] = {}
    if a.int8:
        shutil.copyfile(a.int8, out / "model" / "model.int8.onnx")
        models["int8"] = out / "model" / "model.int8.onnx"
    if a.fp32:
        shutil.copyfile(a.fp32, out / "model" / "model.fp32.onnx")
        models["fp32"] = out / "model" / "model.fp32.onnx"
    return models


def _bundle_build(out: Path, a: _Artifacts, pcfg, target, build_cfg, meta: dict) -> tuple[dict | None, dict | None]:
    """Copy the run's build directory, or prepare one for a TensorRT target; (tensorrt, build) sections."""
    if a.build_dir is not None:
        shutil.copytree(a.build_dir, out / "build")
    elif pcfg.build and target.backend == "tensorrt" and a.int8 is not None:
        from edgeus.deploy.builder import build as _build

        bcfg = section(BuildConfig, build_cfg, strict=False, name="model")
        _build(out / "model" / "model.int8.onnx", target, bcfg, out / "build", meta)
    tensorrt = build_info = None
    if (out / "build" / mf.MANIFEST).is_file():
        bm = json.loads((out / "build" / mf.MANIFEST).read_text())
        build_info = bm.get("build")
        if isinstance(build_info, dict):   # paths of the device build, relative to the bundle's build/
            build_info = dict(build_info, dir="build", onnx=(build_info.get("settings") or {}).get("onnx"))
        if bm.get("tensorrt") and bm["tensorrt"].get("engine"):
            tensorrt = dict(bm["tensorrt"], engine=f"build/{bm['tensorrt']['engine']}")
    return tensorrt, build_info


def _write_golden(out: Path, g: _Golden, models: dict[str, Path], tensorrt: dict | None, pcfg) -> dict:
    """golden/inputs.npy (+ raw.npy) and the expected logits and top-1 of every model on them
    (ONNX Runtime, CPU); returns the manifest's ``golden`` section."""
    np.save(out / "golden" / "inputs.npy", g.inputs, allow_pickle=False)
    section: dict[str, Any] = {"inputs": "golden/inputs.npy", "source": g.source}
    if g.raw is not None:
        np.save(out / "golden" / "raw.npy", g.raw, allow_pickle=False)
        section.update(raw="golden/raw.npy", raw_format="uint8 [N, H, W] at the model's input size, before "
                       "/255, channel repeat and (x - mean) / std", ids=g.ids, labels=g.labels)
    golden_outputs = []
    for prec, path in models.items():
        y = np.asarray(_ort_outputs(path, g.inputs), dtype=np.float32)
        rel = f"golden/expected.{prec}.npy"
        np.save(out / rel, y, allow_pickle=False)
        golden_outputs.append({"model": f"model/{path.name}", "expected": rel, "precision": prec,
                               "atol": float(pcfg.atol if prec == "fp32" else pcfg.int8_atol),
                               "compare": "softmax", "top1": [int(k) for k in y.argmax(-1)],
                               "producer": "onnxruntime CPUExecutionProvider"})
        mask = _ort_mask(path, g.inputs)
        if mask is not None:     # a two-stage model: the expected lesion mask too (probabilities, max |diff| <= atol)
            mrel = f"golden/expected_mask.{prec}.npy"
            np.save(out / mrel, mask.astype(np.float32), allow_pickle=False)
            golden_outputs[-1]["mask"] = {"output": "mask", "expected": mrel, "compare": "max_abs_diff",
                                          "atol": golden_outputs[-1]["atol"]}
    if tensorrt and "int8" in models:
        int8 = next(e for e in golden_outputs if e["precision"] == "int8")
        golden_outputs.append({k: v for k, v in dict(int8, model=tensorrt["engine"]).items() if k != "mask"})
    section["outputs"] = golden_outputs
    return section


def _read_metrics(mpath) -> dict:
    if isinstance(mpath, dict):
        return mpath
    if mpath is None:
        return {}
    try:
        return json.loads(Path(mpath).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EdgeusError(f"{mpath}: not readable JSON metrics ({e})") from None


def _write_side_files(out: Path, classes: list, prep: dict, metrics_data: dict, run: Path | None) -> None:
    """labels.json, preprocessing.json, metrics.json and the run's config and ledger (source/)."""
    (out / "labels.json").write_text(json.dumps({"classes": list(classes),
                                                 "index": {str(i): c for i, c in enumerate(classes)}}, indent=2) + "\n")
    (out / "preprocessing.json").write_text(json.dumps(prep, indent=2) + "\n")
    (out / "metrics.json").write_text(json.dumps(metrics_data, indent=2, default=str) + "\n")
    if run is not None:
        for name in ("config.yaml", "ledger.json"):
            if (run / name).is_file():
                (out / "source").mkdir(exist_ok=True)
                shutil.copyfile(run / name, out / "source" / name)


def package(run_dir, out, pcfg, *, target, build_cfg=None, data=None, data_preprocessing: dict | None = None,
            seed: int | None = 0, recipe: str | None = None, overwrite: bool | None = None,
            fp32_onnx=None, int8_onnx=None, build_dir=None, metrics=None) -> Path:
    """Write a firmware bundle directory ``out`` (and ``out.tar.gz``) from a run. Returns the directory.

    ``pcfg``: the ``package`` section (:class:`PackageConfig`); ``target``: the target section;
    ``build_cfg``: the ``build`` section used when the bundle prepares the device build itself.
    Artifacts default to ``<run>/student.fp32.onnx``, ``<run>/student.int8.onnx``, ``<run>/build/``
    and ``<run>/metrics.json``; keyword arguments (or ``pcfg.*``) name them explicitly.
    ``data``: a DataBundle whose test images (a few per class) become the golden inputs; without it
    they are noise seeded by ``seed`` (with a warning: noise cannot catch a wrong preprocessing).
    ``data_preprocessing``: mean/std to record when neither the ONNX nor the run's config has them.
    ``recipe``: the recipe name recorded when the run's config has none. ``overwrite``: overrides
    ``pcfg.overwrite``. Nothing of a user's is replaced without overwrite, and a directory that is not
    a bundle never. With ``pcfg.sign_key`` (an Ed25519 private key, PEM) the manifest is signed.
    """
    from edgeus.deploy.builder import target_dict

    a = _find_artifacts(run_dir, pcfg, fp32_onnx, int8_onnx, build_dir, metrics)
    out = Path(out)
    _check_out(out, bool(pcfg.overwrite if overwrite is None else overwrite), bool(pcfg.tar))
    key = _load_sign_key(pcfg.sign_key) if pcfg.sign_key else None
    tmp = _prepare_out(out)
    try:
        runm = _run_meta(a.run)
        meta, inputs, outputs, prep, classes = _describe_model(a.int8 or a.fp32, runm, data_preprocessing)
        segmentation = _declare_outputs(outputs)
        models = _copy_models(tmp, a)
        tensorrt, build_info = _bundle_build(tmp, a, pcfg, target, build_cfg,
                                             {"classes": classes, "preprocessing": prep, "source": runm})
        golden = _write_golden(tmp, _golden_inputs(inputs[0]["shape"], int(pcfg.golden), data, seed), models,
                               tensorrt, pcfg)
        metrics_data = _read_metrics(a.metrics)
        _write_side_files(tmp, classes, prep, metrics_data, a.run)
        (tmp / "tools").mkdir()
        shutil.copyfile(DEVICE_TOOL, tmp / "tools" / DEVICE_TOOL.name)

        from edgeus.quantize.isa import isa_record

        man = mf.new_manifest(
            "bundle",
            model={"name": meta.get("arch", {}).get("name") if isinstance(meta.get("arch"), dict) else None,
                   "classes": list(classes), "preprocessing": prep, "inputs": inputs, "outputs": outputs,
                   "onnx": {k: f"model/{p.name}" for k, p in models.items()},
                   # where the INT8 model's accuracy was measured (host ISA) and what it runs on (target ISA)
                   **({"int8_isa": isa_record(models["int8"])} if "int8" in models else {}),
                   **({"segmentation": segmentation} if segmentation else {})},
            runtime_order=([tensorrt["engine"]] if tensorrt else []) + [f"model/{p.name}" for p in models.values()],
            tensorrt=tensorrt,
            build=build_info,
            target=target_dict(target),
            golden=golden,
            tools={"device": f"tools/{DEVICE_TOOL.name}"},
            source={"recipe": runm.get("recipe") or (recipe if recipe != "custom" else None),
                    "run": str(a.run) if a.run else None},
            metrics=metrics_data,
        )
        mf.write_manifest(tmp, man)
        if key is not None:
            sign_bundle(tmp, key)
        _move_into_place(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if pcfg.tar:
        write_tar(out)
    return out


# ------------------------------------------------------------------------------------------ signing

def _crypto():
    try:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError as e:
        from edgeus.errors import MissingDependencyError

        raise MissingDependencyError("signing needs the 'cryptography' package: pip install cryptography") from e
    return serialization, ed25519


def keygen(private_path) -> tuple[Path, Path]:
    """Write a new Ed25519 key pair: ``private_path`` (PEM, PKCS#8, mode 0600) and ``<private_path>.pub``.
    Existing files are never overwritten."""
    serialization, ed25519 = _crypto()
    priv = Path(private_path)
    pub = priv.with_name(priv.name + ".pub")
    for p in (priv, pub):
        if p.exists() or p.is_symlink():
            raise EdgeusError(f"{p} exists; keys are never overwritten: choose another out= or remove it yourself")
    priv.parent.mkdir(parents=True, exist_ok=True)
    key = ed25519.Ed25519PrivateKey.generate()
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                            serialization.NoEncryption())
    fd = os.open(priv, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(pem)
    pub.write_bytes(key.public_key().public_bytes(serialization.Encoding.PEM,
                                                  serialization.PublicFormat.SubjectPublicKeyInfo))
    return priv, pub


def _load_sign_key(path):
    serialization, ed25519 = _crypto()
    try:
        key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as e:
        raise EdgeusError(f"package.sign_key={path}: not a readable unencrypted PEM private key ({e})") from None
    if not isinstance(key, ed25519.Ed25519PrivateKey):
        raise EdgeusError(f"package.sign_key={path}: not an Ed25519 private key (make one with edgeus keygen out=...)")
    return key


def sign_bundle(bundle_dir, key) -> Path:
    """Sign ``bundle_dir/manifest.json`` (its exact bytes) with an Ed25519 private key (a key or a PEM path);
    writes ``manifest.json.sig``: {"algorithm": "ed25519", "key_sha256", "signature" (base64)}."""
    import base64

    serialization, _ = _crypto()
    if not hasattr(key, "sign"):
        key = _load_sign_key(key)
    root = Path(bundle_dir)
    data = (root / mf.MANIFEST).read_bytes()
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    sig = {"algorithm": "ed25519", "key_sha256": device_tool().key_fingerprint(pub),
           "signature": base64.b64encode(key.sign(data)).decode()}
    path = root / device_tool().SIGNATURE
    path.write_text(json.dumps(sig, indent=2) + "\n")
    return path


def write_tar(bundle_dir: Path) -> Path:
    tar_path = bundle_dir.with_name(bundle_dir.name + ".tar.gz")
    tmp = tar_path.with_name(tar_path.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for p in sorted(bundle_dir.rglob("*")):
            tar.add(p, arcname=f"{bundle_dir.name}/{p.relative_to(bundle_dir).as_posix()}", recursive=False)
    tmp.replace(tar_path)
    return tar_path


# ------------------------------------------------------------------------------------------ verify

def verify(bundle, *, backend: str = "auto", here: dict | None = None, key=None, allow_extra: bool = False,
           max_bytes: int | None = None, max_members: int | None = None) -> dict[str, Any]:
    """Check a bundle directory or ``.tar.gz``. Returns {"ok", "errors", "warnings", "checks", "golden"}.

    Trust first (the on-device tool's checks): every file listed with its SHA-256 and every file present
    listed (``allow_extra``: unlisted files only warn), every path the manifest refers to listed and inside
    the bundle, archives limited to ``max_bytes`` expanded and ``max_members`` members before extraction,
    and with ``key`` (an Ed25519 public key, PEM path) a valid signature of the manifest. Only a bundle
    that passes is run: engine compatibility with this machine and the golden outputs. Every error names
    the file it is about. ``here`` overrides the machine description (``device_probe.probe()``).
    """
    dev = device_tool()
    bundle = Path(bundle)
    report: dict[str, Any] = {"bundle": str(bundle), "ok": False, "errors": [], "warnings": [], "checks": [],
                              "golden": [], "backend": None}
    if not bundle.exists():
        report["errors"].append(f"{bundle}: not found")
        return report
    if key is not None and not Path(key).is_file():
        report["errors"].append(f"{key}: public key not found")
        return report
    if bundle.is_file():
        with tempfile.TemporaryDirectory(prefix="edgeus-verify-") as tmp:
            try:
                root = dev.safe_extract(bundle, tmp, max_bytes=max_bytes or dev.MAX_BUNDLE_BYTES,
                                        max_members=max_members or dev.MAX_MEMBERS)
            except ValueError as e:
                report["errors"].append(str(e))
                return report
            return _verify_dir(root, report, backend, here, key, allow_extra)
    return _verify_dir(bundle, report, backend, here, key, allow_extra)


def _verify_dir(root: Path, report: dict, backend: str, here: dict | None, key=None, allow_extra=False) -> dict:
    errors, warnings, checks = report["errors"], report["warnings"], report["checks"]
    try:
        man = mf.read_manifest(root)
    except mf.ManifestError as e:
        errors.append(str(e).replace(str(root / mf.MANIFEST), mf.MANIFEST))
        return report
    checks.append(f"{mf.MANIFEST}: schema_version {man['schema_version']}, {len(man['files'])} files listed")
    trust = device_tool().verify_dir(root, str(key) if key is not None else None, allow_extra)
    errors += trust["errors"]
    warnings += trust["warnings"]
    checks += trust["checks"]
    if errors:
        return report   # nothing from an untrusted bundle is run

    # compatibility of the engine with this machine
    trt_sec = man.get("tensorrt")
    engine_ok = False
    if trt_sec and trt_sec.get("engine"):
        from edgeus.deploy.device_probe import probe

        env = here if here is not None else probe()
        if not env.get("tensorrt"):
            warnings.append(f"{trt_sec['engine']}: cannot be checked here (TensorRT not installed); golden outputs "
                            "checked with ONNX Runtime on the ONNX fallback")
        else:
            problems = mf.check_engine_compat(trt_sec, env, trt_sec["engine"])
            if problems:
                errors.extend(problems)
            else:
                engine_ok = True
                checks.append(f"{trt_sec['engine']}: TensorRT {env['tensorrt']} and compute capability "
                              f"{env.get('compute_capability')} match the build")
    elif (man.get("build") or {}).get("status") == "device-build-required":
        checks.append("build: no engine inside; tools/edgeus_device.py (or build/build_engine.sh) builds it on "
                      "the device" + (f" ({man['build']['reason']})" if man["build"].get("reason") else ""))

    # golden outputs
    g = man.get("golden") or {}
    inp_rel = g.get("inputs")
    if not inp_rel:
        warnings.append(f"{mf.MANIFEST}: no golden inputs listed")
        report["ok"] = not errors
        return report
    try:
        x = np.load(root / inp_rel, allow_pickle=False)
    except Exception as e:
        errors.append(f"{inp_rel}: unreadable ({e})")
        return report
    if g.get("raw"):
        try:
            raw = np.load(root / g["raw"], allow_pickle=False)
            d = float(np.abs(device_tool().preprocess(raw, (man.get("model") or {}).get("preprocessing") or {})
                             - x).max())
        except Exception as e:
            errors.append(f"{g['raw']}: cannot be preprocessed ({e})")
        else:
            if d > 1e-4:
                errors.append(f"{g['raw']}: the manifest's preprocessing of the raw golden pixels differs from "
                              f"{inp_rel} by {d:.3g}")
            else:
                checks.append(f"{g['raw']}: the manifest's preprocessing reproduces {inp_rel} (real images: "
                              f"{', '.join(map(str, (g.get('ids') or [])[:4]))})")
    else:
        warnings.append(f"{inp_rel}: golden inputs are not real images ({g.get('source')}): a wrong preprocessing "
                        "or a constant answer on the device would not be caught")
    for entry in g.get("outputs", []):
        _golden_one(root, entry, x, engine_ok, backend, report, (man.get("model") or {}).get("classes"))
    report["ok"] = not errors
    return report


def _golden_one(root: Path, entry: dict, x: np.ndarray, engine_ok: bool, backend: str, report: dict,
                classes=None):
    model_rel, exp_rel = entry["model"], entry["expected"]
    is_engine = Path(model_rel).suffix in (".engine", ".plan")
    if is_engine and (not engine_ok or backend == "onnxruntime"):
        return  # the engine cannot run here; its ONNX fallback is checked instead
    try:
        expected = np.load(root / exp_rel, allow_pickle=False)
    except Exception as e:
        report["errors"].append(f"{exp_rel}: unreadable ({e})")
        return
    try:
        if is_engine:
            from edgeus.deploy.runners.trt import TrtRunner

            with TrtRunner(root / model_rel, check_compat=False) as r:
                (name, (dtype, _)), = r.input_metadata().items()
                y = np.concatenate([_engine_logits(r.infer({name: x[i:i + 1].astype(dtype)}))
                                    for i in range(len(x))])
            used = "tensorrt"
        else:
            y = _ort_outputs(root / model_rel, x)
            used = "onnxruntime"
    except EdgeusError as e:
        report["errors"].append(f"{model_rel}: cannot run ({e})")
        return
    report["backend"] = report["backend"] or used
    if entry.get("compare", "softmax") != "softmax":
        report["errors"].append(f"{model_rel}: golden compare={entry.get('compare')!r}; only softmax is supported")
        return
    errs, oks = device_tool().compare_golden(np.asarray(y), expected, dict(entry, model=model_rel), classes)
    a, b = _softmax(y), _softmax(expected)
    diff = float(np.abs(a - b).max()) if a.shape == b.shape else float("inf")
    top1 = float((a.argmax(-1) == b.argmax(-1)).mean()) if a.shape == b.shape else 0.0
    report["golden"].append({"model": model_rel, "backend": used, "max_abs_diff": diff, "atol": entry["atol"],
                             "top1_agreement": top1, "ok": not errs})
    report["errors"] += [f"{e} on {used}" for e in errs]
    report["checks"] += [f"{c} on {used}" for c in oks]
    m = entry.get("mask")
    if m and not is_engine:   # a two-stage model's lesion mask (second output)
        try:
            want = np.load(root / m["expected"], allow_pickle=False)
            got = _ort_mask(root / model_rel, x)
        except Exception as e:  # noqa: BLE001
            report["errors"].append(f"{m.get('expected')}: cannot be checked ({e})")
            return
        md = float(np.abs(got - want).max()) if got is not None and got.shape == want.shape else float("inf")
        report["golden"][-1].update(mask_max_abs_diff=md)
        if md > float(m["atol"]):
            report["errors"].append(f"{model_rel}: the mask output differs from {m['expected']} by {md:.3g} "
                                    f"(atol {m['atol']}) on {used}")
            report["golden"][-1]["ok"] = False
        else:
            report["checks"].append(f"{model_rel}: mask output matches {m['expected']} (max |diff| {md:.2g}) on {used}")
