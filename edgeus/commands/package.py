"""Write a firmware bundle (a directory and a .tar.gz) from a compress run.

    edgeus package runs/rsmas_int8-20261123-1200 out=firmware/as_classifier_v3 target=jetson_orin_nano
    edgeus package runs/<run> out=firmware/v3 package.sign_key=keys/edgeus      # signed (edgeus keygen)

Reads <run>/student.int8.onnx, <run>/student.fp32.onnx, <run>/build/ and <run>/metrics.json (or the
paths given as package.int8_onnx=, package.fp32_onnx=, package.build_dir=, package.metrics=).
The bundle holds the engine (or the ONNX + build script for the device), the INT8 and FP32 ONNX
fallbacks, labels, preprocessing, golden inputs (real test-split images of the run's data, a few per
class, with their raw pixels) with expected outputs, the run's metrics, the on-device tool
(tools/edgeus_device.py) and a manifest (schema version, SHA-256 of every file, TensorRT/GPU of the
engine), signed with package.sign_key=. An existing out= is replaced only with package.overwrite=true,
and only when it is a bundle. Check it with `edgeus verify <bundle> [--key <key>.pub]`.
"""
from __future__ import annotations

from pathlib import Path

from edgeus.errors import EdgeusError

USAGE = ("<run_dir> out=<bundle_dir> [target=<name>] [package.golden=4] [package.sign_key=<private.pem>] "
         "[package.overwrite=true] [key=value ...]")


def _golden_data(cfg, run_dir):
    """The dataset whose test split gives the golden images: the run's own data section (its
    config.yaml), else cfg.data. None when package.golden_data=false."""
    if not cfg.package.golden_data:
        return None
    from omegaconf import OmegaConf

    from edgeus.data import build_datasets

    data_cfg = cfg.data
    saved = Path(run_dir) / "config.yaml" if run_dir else None
    if saved is not None and saved.is_file():
        try:
            rc = OmegaConf.load(saved)
            if "data" in rc:
                data_cfg = OmegaConf.merge(cfg.data, rc.data)
        except Exception as e:
            raise EdgeusError(f"{saved}: unreadable run config ({e}); give the data with data=... "
                              "or package.golden_data=false") from None
    try:
        return build_datasets(data_cfg)
    except EdgeusError as e:
        raise EdgeusError(f"golden images: cannot load the run's data ({e}); point data.root= at it, or set "
                          "package.golden_data=false for noise inputs (they cannot catch a wrong preprocessing)") \
            from None


def run(cfg, args):
    from edgeus.deploy import package

    if len(args) > 1:
        raise EdgeusError(f"expected one run directory, got {len(args)}; usage: edgeus package {USAGE}")
    out = cfg.out or cfg.package.out
    if not out:
        raise EdgeusError("say where the bundle goes: out=<bundle_dir>")
    run_dir = args[0] if args else None
    if run_dir:
        from edgeus.errors import GateError
        from edgeus.pipeline import gates as G
        from edgeus.pipeline.runner import failed_gates

        failed = failed_gates(run_dir)
        if failed:
            raise GateError(f"{run_dir} failed {len(failed)} enforced clinical gate(s), so it is not packaged: "
                            + "; ".join(G.describe(g) for g in failed[:3]))
    path = package(run_dir, out, cfg.package, target=cfg.target, build_cfg=cfg.build,
                   data=_golden_data(cfg, run_dir),
                   data_preprocessing={k: list(cfg.data[k]) for k in ("mean", "std")}, seed=cfg.seed,
                   recipe=cfg.recipe.name)
    print(f"wrote bundle {path}/" + (f" and {path}.tar.gz" if cfg.package.tar else "")
          + (" (signed)" if cfg.package.sign_key else ""))
    print(f"check it with: edgeus verify {path}" + (" --key <public key>" if cfg.package.sign_key else ""))
    return 0
