"""compress: not implemented yet (tracked in issue #9)."""
from edgeus.errors import EdgeusError


def run(cfg, args):
    raise EdgeusError("'edgeus compress' is not implemented yet (issue #9)")
