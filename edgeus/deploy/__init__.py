"""Deployment: targets, TensorRT builds, benchmarks, firmware bundles and their verification.

    from edgeus.deploy import build, bench, package, verify
    build("student.int8.onnx", cfg.target, cfg.build, "out/build", meta)   # engine here, or a device build
    bench(["teacher.onnx", "student.onnx"], cfg)         # latency; ratios in compare mode
    package("runs/<run>", "firmware/v3", cfg.package, target=cfg.target)   # bundle directory + .tar.gz
    verify("firmware/v3.tar.gz", key="keys/edgeus.pub")  # trust (files, signature), compatibility, golden

TensorRT and its CUDA bindings are imported only inside the TensorRT runner and the engine builder.
"""
from __future__ import annotations


def build(onnx_path, target, build_cfg, out_dir, meta=None, **kwargs):
    from edgeus.deploy.builder import build as _build

    return _build(onnx_path, target, build_cfg, out_dir, meta, **kwargs)


def bench(paths, cfg, *, out=None):
    from edgeus.deploy.benchmark import bench as _bench

    return _bench(paths, cfg, out=out)


def package(run_dir, out, pcfg, **kwargs):
    from edgeus.deploy.bundle import package as _package

    return _package(run_dir, out, pcfg, **kwargs)


def verify(bundle, **kwargs):
    from edgeus.deploy.bundle import verify as _verify

    return _verify(bundle, **kwargs)


__all__ = ["build", "bench", "package", "verify"]
