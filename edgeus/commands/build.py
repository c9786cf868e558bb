"""build: not implemented yet (tracked in issue #8)."""
from edgeus.errors import EdgeusError


def run(cfg, args):
    raise EdgeusError("'edgeus build' is not implemented yet (issue #8)")
