"""export: not implemented yet (tracked in issue #7)."""
from edgeus.errors import EdgeusError


def run(cfg, args):
    raise EdgeusError("'edgeus export' is not implemented yet (issue #7)")
