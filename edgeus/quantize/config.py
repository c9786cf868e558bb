"""Settings of the export and quantize stages."""
from dataclasses import dataclass


@dataclass
class ExportConfig:
    opset: int = 17


@dataclass
class QuantizeConfig:
    enabled: bool = True
