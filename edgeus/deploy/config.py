"""Settings of deployment targets and of the build, bench and package stages.

A target file (``targets/<name>.yaml``) is loaded under ``cfg.target`` by ``target=<name>``. The
schema below is strict: a mistyped key in a target file or on the command line fails at once.
"""
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class BatchProfile:
    """TensorRT optimisation profile over the batch dimension (all other dims are static)."""
    min: int = 1
    opt: int = 1
    max: int = 8


@dataclass
class TargetConfig:
    name: str = "cpu"
    description: str = ""
    backend: str = "onnxruntime"          # onnxruntime | tensorrt
    compute_capability: Optional[str] = None   # "8.7" (SM version of the GPU); None for CPU
    jetpack: Optional[str] = None         # JetPack range, e.g. ">=6.1,<7"; None = not a Jetson
    tensorrt: Optional[str] = None        # TensorRT version range, e.g. ">=10.3,<11"
    dla_cores: int = 0                    # DLA cores the module is expected to have (checked on device)
    sparse_weights: bool = False          # 2:4 structured sparsity worth enabling on this GPU
    # channel count multiple the target's INT8 kernels want: structured pruning keeps channel counts and
    # decomposition keeps ranks at multiples of it (None = no constraint, e.g. ONNX Runtime on a CPU)
    channel_multiple: Optional[int] = None
    precision: str = "int8"               # int8 | fp16 | fp32 (what the engine/model runs at)
    fp16: bool = True                     # allow FP16 for layers left unquantised (non strongly-typed builds)
    workspace_mb: int = 1024              # builder workspace memory pool
    builder_optimization_level: int = 3  # TensorRT 0..5 (3 = TensorRT's default)
    batch: BatchProfile = field(default_factory=BatchProfile)
    # Q/DQ layout the quantiser must produce for this target (see targets/*.yaml): layout,
    # activation_type, weight_type, activation_symmetric, weight_symmetric, per_channel,
    # quantize_bias, add_qdq_pair_to_weight, dedicated_qdq_pair, opset
    quant: Dict[str, Any] = field(default_factory=dict)


@dataclass
class BuildConfig:
    enabled: bool = True
    dla_core: Optional[int] = None        # build for this DLA core (GPU fallback on); None = GPU
    strongly_typed: Optional[bool] = None  # None = auto (TensorRT >= 10 and a Q/DQ model)
    timing_cache: Optional[str] = None    # path of the timing cache to reuse/save (default <out>/timing.cache)
    name: Optional[str] = None            # engine base name (default: the ONNX file's stem)
    input_name: Optional[str] = None      # input tensor for the batch profile (default: the first input)
    strict: bool = True                   # fail the build when the TensorRT compatibility check fails


@dataclass
class BenchConfig:
    backend: str = "auto"                 # auto (by file: .onnx/.pt/.engine) | onnxruntime | torch | tensorrt
    device: str = "cpu"                   # cpu | cuda (torch, onnxruntime providers)
    providers: Optional[List[str]] = None  # onnxruntime providers (default: best available for device)
    fp16: bool = False                    # torch: run in half precision (cuda)
    warmup: int = 10
    iters: int = 100
    batch_sizes: List[int] = field(default_factory=lambda: [1])
    image_size: Optional[int] = None      # input H=W when the model does not fix it
    in_chans: Optional[int] = None
    compare: Optional[bool] = None        # None = compare when two or more models are given
    block: int = 25                       # compare mode: timed iterations of one model before the next runs
    threads: Optional[int] = None         # intra-op threads (onnxruntime / torch)
    tegrastats_interval_ms: int = 100     # Jetson power sampling period
    markdown: bool = True                 # also write <out>.md next to the JSON


@dataclass
class PackageConfig:
    out: Optional[str] = None
    # explicit artifacts (default: found in the run directory by these names)
    fp32_onnx: Optional[str] = None       # <run>/student.fp32.onnx
    int8_onnx: Optional[str] = None       # <run>/student.int8.onnx
    build_dir: Optional[str] = None       # <run>/build (engine or build script + manifest)
    metrics: Optional[str] = None         # <run>/metrics.json
    build: bool = True                    # no build dir and a TensorRT target: prepare the build in the bundle
    golden_data: bool = True              # golden inputs: real test-split images of the run's data (false: noise)
    overwrite: bool = False               # replace an existing bundle (never a directory that is not a bundle)
    sign_key: Optional[str] = None        # Ed25519 private key (PEM) that signs the manifest (edgeus keygen)
    golden: int = 4                       # number of golden inputs with expected outputs
    atol: float = 1e-3                    # golden tolerance, FP32 ONNX (softmax probabilities)
    int8_atol: float = 5e-2               # golden tolerance, INT8 ONNX and engines (softmax probabilities)
    tar: bool = True                      # also write <out>.tar.gz


def section(cls, value=None, **overrides):
    """A new typed config node of ``cls`` from ``value`` (a section of a composed config, a dict, an
    instance of ``cls`` or None = defaults) with ``overrides`` applied; ``value`` is never modified."""
    from omegaconf import OmegaConf

    node = OmegaConf.structured(cls)
    if value is not None:
        node = OmegaConf.merge(node, value)
    if overrides:
        node = OmegaConf.merge(node, overrides)
    return node
