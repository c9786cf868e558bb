"""The ``compress`` pipeline: recipe stages over one run directory, ledger, gates, robustness, report."""
from edgeus.pipeline.runner import compress

__all__ = ["compress"]
