"""distill: not implemented yet (tracked in issue #5)."""
from edgeus.errors import EdgeusError


def run(cfg, args):
    raise EdgeusError("'edgeus distill' is not implemented yet (issue #5)")
