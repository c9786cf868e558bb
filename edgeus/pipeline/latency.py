"""ONNX Runtime CPU latency for the ledger and the bench stage: a thin call of
``edgeus.deploy.benchmark.latency_table`` (edgeus's one latency API) with the ledger's settings.

Kept out of ``runner`` so that ``stages`` (the bench stage) and ``runner`` (the ledger) both use it
without importing each other.
"""
from __future__ import annotations


def measure_latency(cfg, models: dict[str, str], iters: int, warmup: int, batch_sizes=(1,), *, threads=None,
                    out=None) -> dict:
    """ONNX Runtime CPU latency of ``models`` ({label: onnx path}): interleaved in one process, the first
    model the baseline. Returns {"batch N": {label: stats}}, each stats dict with median_ms, p90_ms,
    p99_ms, speedup (first model's median / this one's) and bytes. ``cfg``: the run's config (its
    ``bench`` section and ``seed``); it is not modified."""
    from omegaconf import OmegaConf

    from edgeus.deploy.benchmark import latency_table
    from edgeus.deploy.config import BenchConfig

    bcfg = OmegaConf.merge(OmegaConf.structured(BenchConfig), cfg.bench, {
        "backend": "onnxruntime", "device": "cpu", "providers": None, "iters": int(iters), "warmup": int(warmup),
        "batch_sizes": [int(b) for b in batch_sizes], "threads": threads, "compare": len(models) > 1})
    return latency_table(models, bcfg, seed=int(cfg.seed), out=out)
