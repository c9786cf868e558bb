"""prune: not implemented yet (tracked in issue #4)."""
from edgeus.errors import EdgeusError


def run(cfg, args):
    raise EdgeusError("'edgeus prune' is not implemented yet (issue #4)")
