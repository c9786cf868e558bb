"""Write a firmware bundle (a directory and a .tar.gz) from a compress run.

    edgeus package runs/rsmas_int8-20261123-1200 out=firmware/as_classifier_v3 target=jetson_orin_nano

Reads <run>/student.int8.onnx, <run>/student.fp32.onnx, <run>/build/ and <run>/metrics.json (or the
paths given as package.int8_onnx=, package.fp32_onnx=, package.build_dir=, package.metrics=).
The bundle holds the engine (or the ONNX + build script for the device), the INT8 and FP32 ONNX
fallbacks, labels, preprocessing, golden inputs with expected outputs, the run's metrics and a
manifest (schema version, SHA-256 of every file, TensorRT/GPU of the engine). Check it with
`edgeus verify <bundle>`.
"""
from __future__ import annotations

from edgeus.errors import EdgeusError

USAGE = "<run_dir> out=<bundle_dir> [target=<name>] [package.golden=4] [key=value ...]"


def run(cfg, args):
    from edgeus.deploy import package

    if len(args) > 1:
        raise EdgeusError(f"expected one run directory, got {len(args)}; usage: edgeus package {USAGE}")
    out = cfg.out or cfg.package.out
    if not out:
        raise EdgeusError("say where the bundle goes: out=<bundle_dir>")
    run_dir = args[0] if args else None
    data = None
    if cfg.package.golden_data:   # golden inputs from the test split of cfg.data
        from edgeus.data import build_datasets

        data = build_datasets(cfg.data)
    path = package(run_dir, out, cfg.package, target=cfg.target, build_cfg=cfg.build, data=data,
                   data_preprocessing={k: list(cfg.data[k]) for k in ("mean", "std")}, seed=cfg.seed,
                   recipe=cfg.recipe.name)
    print(f"wrote bundle {path}/" + (f" and {path}.tar.gz" if cfg.package.tar else ""))
    print(f"check it with: edgeus verify {path}")
    return 0
