"""Settings of deployment targets and of the build, bench and package stages."""
from dataclasses import dataclass, field
from typing import Any, Dict, Optional


@dataclass
class TargetConfig:
    name: str = "cpu"
    description: str = ""
    backend: str = "onnxruntime"          # onnxruntime | tensorrt
    # Q/DQ layout the quantiser must produce for this target (see targets/*.yaml)
    quant: Dict[str, Any] = field(default_factory=dict)


@dataclass
class BuildConfig:
    enabled: bool = True


@dataclass
class BenchConfig:
    backend: str = "onnxruntime"


@dataclass
class PackageConfig:
    out: Optional[str] = None
