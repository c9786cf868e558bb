"""decompose: not implemented yet (tracked in issue #6)."""
from edgeus.errors import EdgeusError


def run(cfg, args):
    raise EdgeusError("'edgeus decompose' is not implemented yet (issue #6)")
