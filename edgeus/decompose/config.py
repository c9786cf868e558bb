"""Settings of this stage (filled in by its own issue)."""
from dataclasses import dataclass


@dataclass
class DecomposeConfig:
    enabled: bool = True
