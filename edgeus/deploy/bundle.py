"""Firmware bundles: ``package`` writes one from a run, ``verify`` decides whether to trust one.

Bundle layout (a directory, and the same tree as ``<dir>.tar.gz``)::

    manifest.json            schema_version, model (classes, preprocessing, I/O), files + SHA-256,
                             tensorrt (when an engine is inside), golden (inputs, expected, tolerance),
                             target, source (recipe, run), metrics
    model/model.int8.onnx    the Q/DQ model for the target (ONNX Runtime fallback / device build input)
    model/model.fp32.onnx    the FP32 student (last-resort fallback, reference)
    build/                   the engine, or the ONNX + build_engine.sh + trtexec.txt (+ build manifest)
    golden/inputs.npy        golden inputs (normalised, NCHW float32)
    golden/expected.*.npy    outputs of each model on them (ONNX Runtime, CPU)
    labels.json, preprocessing.json, metrics.json, source/config.yaml, source/ledger.json
"""
from __future__ import annotations

import json
import logging
import shutil
import tarfile
import tempfile
import zlib
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


def _ort_outputs(onnx_path: Path, inputs: np.ndarray) -> np.ndarray:
    from edgeus.deploy.runners.onnxrt import OnnxrtRunner

    with OnnxrtRunner(onnx_path) as r:
        (name, (dtype, shape)), = r.input_metadata().items()
        static_b = shape[0] if shape and isinstance(shape[0], int) and shape[0] > 0 else None
        if static_b and static_b != len(inputs):
            outs = [next(iter(r.infer({name: inputs[i:i + static_b].astype(dtype)}).values()))
                    for i in range(0, len(inputs), static_b)]
            return np.concatenate(outs)
        return next(iter(r.infer({name: inputs.astype(dtype)}).values()))


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


def _golden_inputs(shape: list, n: int, data, seed) -> tuple[np.ndarray, str]:
    c, h, w = (int(d) for d in shape[1:4])
    if data is not None:
        ds = getattr(data, "test", data)
        k = min(n, len(ds))
        imgs = np.stack([np.asarray(ds[i]["image"], dtype=np.float32) for i in range(k)])
        if tuple(imgs.shape[1:]) != (c, h, w):
            raise EdgeusError(f"golden inputs from the data are {tuple(imgs.shape[1:])}, the model takes "
                              f"{(c, h, w)}: set data.image_size / data.in_chans to the model's")
        ids = data.ids("test")[:k] if hasattr(data, "ids") else []
        return imgs, f"test split ({k} images{': ' + ', '.join(map(str, ids[:4])) if ids else ''})"
    rng = np.random.default_rng(int(seed or 0))
    return rng.standard_normal((n, c, h, w)).astype(np.float32), f"seeded normal noise (seed {seed})"


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


def _prepare_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise EdgeusError(f"{out} exists and is not empty; choose another out= or set package.overwrite=true")
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "model").mkdir()
    (out / "golden").mkdir()


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
        if bm.get("tensorrt") and bm["tensorrt"].get("engine"):
            tensorrt = dict(bm["tensorrt"], engine=f"build/{bm['tensorrt']['engine']}")
    return tensorrt, build_info


def _write_golden(out: Path, x: np.ndarray, models: dict[str, Path], tensorrt: dict | None, pcfg) -> list[dict]:
    """golden/inputs.npy and the expected outputs of every model on them (ONNX Runtime, CPU)."""
    np.save(out / "golden" / "inputs.npy", x, allow_pickle=False)
    golden_outputs = []
    for prec, path in models.items():
        y = _ort_outputs(path, x)
        rel = f"golden/expected.{prec}.npy"
        np.save(out / rel, np.asarray(y, dtype=np.float32), allow_pickle=False)
        golden_outputs.append({"model": f"model/{path.name}", "expected": rel, "precision": prec,
                               "atol": float(pcfg.atol if prec == "fp32" else pcfg.int8_atol),
                               "compare": "softmax", "producer": "onnxruntime CPUExecutionProvider"})
    if tensorrt and "int8" in models:
        golden_outputs.append({"model": tensorrt["engine"], "expected": "golden/expected.int8.npy",
                               "precision": "int8", "atol": float(pcfg.int8_atol), "compare": "softmax",
                               "producer": "onnxruntime CPUExecutionProvider"})
    return golden_outputs


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
    ``data``: a DataBundle whose test images become the golden inputs (default: noise seeded by ``seed``).
    ``data_preprocessing``: mean/std to record when neither the ONNX nor the run's config has them.
    ``recipe``: the recipe name recorded when the run's config has none. ``overwrite``: overrides
    ``pcfg.overwrite``.
    """
    from edgeus.deploy.builder import target_dict

    a = _find_artifacts(run_dir, pcfg, fp32_onnx, int8_onnx, build_dir, metrics)
    out = Path(out)
    _prepare_out(out, bool(pcfg.overwrite if overwrite is None else overwrite))

    runm = _run_meta(a.run)
    meta, inputs, outputs, prep, classes = _describe_model(a.int8 or a.fp32, runm, data_preprocessing)
    models = _copy_models(out, a)
    tensorrt, build_info = _bundle_build(out, a, pcfg, target, build_cfg,
                                         {"classes": classes, "preprocessing": prep, "source": runm})
    x, source = _golden_inputs(inputs[0]["shape"], int(pcfg.golden), data, seed)
    golden_outputs = _write_golden(out, x, models, tensorrt, pcfg)
    metrics_data = _read_metrics(a.metrics)
    _write_side_files(out, classes, prep, metrics_data, a.run)

    man = mf.new_manifest(
        "bundle",
        model={"name": meta.get("arch", {}).get("name") if isinstance(meta.get("arch"), dict) else None,
               "classes": list(classes), "preprocessing": prep, "inputs": inputs, "outputs": outputs,
               "onnx": {k: f"model/{p.name}" for k, p in models.items()}},
        runtime_order=([tensorrt["engine"]] if tensorrt else []) + [f"model/{p.name}" for p in models.values()],
        tensorrt=tensorrt,
        build=build_info,
        target=target_dict(target),
        golden={"inputs": "golden/inputs.npy", "source": source, "outputs": golden_outputs},
        source={"recipe": runm.get("recipe") or (recipe if recipe != "custom" else None),
                "run": str(a.run) if a.run else None},
        metrics=metrics_data,
    )
    mf.write_manifest(out, man)
    if pcfg.tar:
        write_tar(out)
    return out


def write_tar(bundle_dir: Path) -> Path:
    tar_path = bundle_dir.with_name(bundle_dir.name + ".tar.gz")
    tmp = tar_path.with_name(tar_path.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for p in sorted(bundle_dir.rglob("*")):
            tar.add(p, arcname=f"{bundle_dir.name}/{p.relative_to(bundle_dir).as_posix()}", recursive=False)
    tmp.replace(tar_path)
    return tar_path


# ------------------------------------------------------------------------------------------ verify

def _extract(tar_path: Path, into: Path) -> Path:
    try:
        with tarfile.open(tar_path, "r:gz") as tar:
            members = tar.getmembers()
            for m in members:
                parts = Path(m.name).parts
                if m.name.startswith("/") or ".." in parts or not (m.isfile() or m.isdir()):
                    raise EdgeusError(f"{tar_path.name}: unsafe archive member {m.name!r}")
            if hasattr(tarfile, "data_filter"):
                tar.extractall(into, filter="data")
            else:  # pragma: no cover - Python < 3.11.4
                tar.extractall(into)
    except (tarfile.TarError, EOFError, OSError, zlib.error) as e:
        raise EdgeusError(f"{tar_path.name}: truncated or corrupt archive ({e})") from None
    roots = [p for p in into.iterdir()]
    if len(roots) == 1 and roots[0].is_dir():
        return roots[0]
    return into


def verify(bundle, *, backend: str = "auto", here: dict | None = None) -> dict[str, Any]:
    """Check a bundle directory or ``.tar.gz``. Returns {"ok", "errors", "warnings", "checks", "golden"}.

    Every error names the file it is about. ``here`` overrides the machine description
    (``device_probe.probe()``), for tests and dry runs.
    """
    bundle = Path(bundle)
    report: dict[str, Any] = {"bundle": str(bundle), "ok": False, "errors": [], "warnings": [], "checks": [],
                              "golden": [], "backend": None}
    if not bundle.exists():
        report["errors"].append(f"{bundle}: not found")
        return report
    if bundle.is_file():
        with tempfile.TemporaryDirectory(prefix="edgeus-verify-") as tmp:
            try:
                root = _extract(bundle, Path(tmp))
            except EdgeusError as e:
                report["errors"].append(str(e))
                return report
            return _verify_dir(root, report, backend, here)
    return _verify_dir(bundle, report, backend, here)


def _verify_dir(root: Path, report: dict, backend: str, here: dict | None) -> dict:
    errors, warnings, checks = report["errors"], report["warnings"], report["checks"]
    try:
        man = mf.read_manifest(root)
    except mf.ManifestError as e:
        errors.append(str(e).replace(str(root / mf.MANIFEST), mf.MANIFEST))
        return report
    checks.append(f"{mf.MANIFEST}: schema_version {man['schema_version']}, {len(man['files'])} files listed")
    ferr, fwarn = mf.check_files(root, man)
    errors += ferr
    warnings += fwarn
    bad = {e.split(":", 1)[0] for e in ferr}
    if not ferr:
        checks.append("checksums: all files present and unmodified (SHA-256)")

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
                engine_ok = trt_sec["engine"] not in bad
                checks.append(f"{trt_sec['engine']}: TensorRT {env['tensorrt']} and compute capability "
                              f"{env.get('compute_capability')} match the build")
    elif (man.get("build") or {}).get("status") == "device-build-required":
        checks.append("build: no engine inside; build/build_engine.sh builds it on the device")

    # golden outputs
    g = man.get("golden") or {}
    inp_rel = g.get("inputs")
    if not inp_rel:
        warnings.append(f"{mf.MANIFEST}: no golden inputs listed")
    elif inp_rel in bad:
        warnings.append(f"{inp_rel}: golden check skipped (the file failed its checksum)")
    else:
        try:
            x = np.load(root / inp_rel, allow_pickle=False)
        except Exception as e:
            errors.append(f"{inp_rel}: unreadable ({e})")
            x = None
        if x is not None:
            for entry in g.get("outputs", []):
                _golden_one(root, entry, x, bad, engine_ok, backend, report)
    report["ok"] = not errors
    return report


def _golden_one(root: Path, entry: dict, x: np.ndarray, bad: set, engine_ok: bool, backend: str, report: dict):
    model_rel, exp_rel = entry["model"], entry["expected"]
    is_engine = Path(model_rel).suffix in (".engine", ".plan")
    if is_engine and (not engine_ok or backend == "onnxruntime"):
        return  # the engine cannot run here; its ONNX fallback is checked instead
    if model_rel in bad or exp_rel in bad:
        report["warnings"].append(f"{model_rel}: golden check skipped (a file failed its checksum)")
        return
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
                y = np.concatenate([next(iter(r.infer({name: x[i:i + 1].astype(dtype)}).values()))
                                    for i in range(len(x))])
            used = "tensorrt"
        else:
            y = _ort_outputs(root / model_rel, x)
            used = "onnxruntime"
    except EdgeusError as e:
        report["errors"].append(f"{model_rel}: cannot run ({e})")
        return
    report["backend"] = report["backend"] or used
    if y.shape != expected.shape:
        report["errors"].append(f"{model_rel}: output shape {y.shape} differs from {exp_rel} {expected.shape}")
        return
    a, b = (_softmax(y), _softmax(expected)) if entry.get("compare", "softmax") == "softmax" else (y, expected)
    diff = float(np.abs(a - b).max())
    top1 = float((a.argmax(-1) == b.argmax(-1)).mean())
    row = {"model": model_rel, "backend": used, "max_abs_diff": diff, "atol": entry["atol"], "top1_agreement": top1,
           "ok": diff <= float(entry["atol"])}
    report["golden"].append(row)
    if row["ok"]:
        report["checks"].append(f"{model_rel}: golden outputs within {entry['atol']} on {used} "
                                f"(max diff {diff:.2e}, top-1 agreement {top1:.0%})")
    else:
        report["errors"].append(f"{model_rel}: golden outputs differ from {exp_rel} by {diff:.3g} "
                                f"(tolerance {entry['atol']}, top-1 agreement {top1:.0%}) on {used}")
