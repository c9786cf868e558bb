"""List the deployment targets, or show one.

    edgeus targets                    # table of targets/*.yaml
    edgeus targets jetson_orin_nano   # the resolved target (compute capability, TensorRT range, Q/DQ layout ...)

A target is picked for any command with target=<name> (or a path to your own YAML file).
"""
from __future__ import annotations

USAGE = "[name]"


def run(cfg, args):
    from omegaconf import OmegaConf

    from edgeus import resources
    from edgeus.config import compose

    if args:
        for name in args:
            t = compose([f"target={name}"]).target
            print(f"# {resources.find('targets', name)}")
            print(OmegaConf.to_yaml(t), end="")
        return 0
    rows = []
    for name in resources.list_options("targets"):
        t = compose([f"target={name}"]).target
        q = t.quant or {}
        rows.append((name, t.backend, t.compute_capability or "-", t.tensorrt or "-", t.jetpack or "-",
                     str(t.dla_cores), "yes" if t.sparse_weights else "no",
                     f"{t.batch.min}/{t.batch.opt}/{t.batch.max}",
                     f"{q.get('activation_type', '?')}/{q.get('weight_type', '?')}"))
    head = ("target", "backend", "SM", "TensorRT", "JetPack", "DLA", "2:4", "batch", "act/w")
    widths = [max(len(str(r[i])) for r in rows + [head]) for i in range(len(head))]
    for r in [head] + rows:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0
