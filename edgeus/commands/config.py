"""Print the resolved configuration of the same arguments another command would take.

    edgeus config recipe=rsmas_int8 profile=full data=busi data.root=/data/BUSI
    edgeus config recipe=rsmas_int8 prune.target_macs=0.2 --keys prune     # one section only

The output is the YAML that ``edgeus compress`` with these arguments saves as ``config.yaml``:
schema defaults, then the recipe, data, target and profile, then the ``key=value`` overrides.
Range errors (``train.epochs=0``) are reported here too, exactly as the command would.
"""
from __future__ import annotations

USAGE = "[recipe=...] [data=...] [target=...] [profile=...] [key=value ...] [--keys SECTION]"


def run(cfg, args):
    from omegaconf import OmegaConf

    from edgeus.config import to_yaml, validate
    from edgeus.errors import UsageError

    validate(cfg)
    keys = None
    rest = list(args)
    if rest[:1] == ["--keys"] and len(rest) == 2:
        keys = rest[1]
    elif rest:
        raise UsageError(f"edgeus config takes key=value arguments (and --keys SECTION), got {rest}")
    if keys:
        node = OmegaConf.select(cfg, keys)
        if node is None:
            raise UsageError(f"--keys {keys}: no such section")
        print(OmegaConf.to_yaml(node, resolve=True) if OmegaConf.is_config(node) else node, end="")
        return 0
    print(to_yaml(cfg), end="")
    return 0
