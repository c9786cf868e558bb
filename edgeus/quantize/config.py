"""Settings of the export and quantize stages.

The Q/DQ *layout* (int8 vs uint8 activations, symmetry, per-channel weights, bias quantisation)
is a property of the deployment target and lives in ``targets/*.yaml`` under ``quant:``; it is
never read from here. This section holds what the recipe decides: how to calibrate, how much
accuracy may be lost, and what to do when PTQ loses more.
"""
from dataclasses import dataclass
from typing import Optional


@dataclass
class ExportConfig:
    opset: int = 17                    # ONNX opset (>= 13 for per-channel Q/DQ; the target's quant.opset wins when higher)
    exporter: str = "auto"             # auto | torchscript | dynamo (auto: TorchScript exporter when present, else dynamo)
    simplify: bool = True              # onnxslim
    dynamic_batch: bool = True         # batch axis named "batch"
    atol: float = 1e-3                 # parity: max |logit(onnx) - logit(torch)| <= atol + rtol * max |logit(torch)|
    rtol: float = 1e-4                 # (deep untrained nets have logits in the hundreds: float32 rounding scales)
    min_top1_agreement: float = 1.0    # fraction of the parity sample whose argmax must agree
    parity_samples: int = 16           # images of the parity sample (from the val split when data is given)
    path: Optional[str] = None         # `edgeus export`: output file (default <checkpoint stem>.onnx)


@dataclass
class QuantizeConfig:
    enabled: bool = True
    calibration: str = "default"       # calibration spec: calibration/<name>.yaml or a path to a YAML file
    method: Optional[str] = None       # minmax | entropy | percentile | mse (overrides the spec; mse: edgeus's, on ORT's histograms)
    num_images: Optional[int] = None   # calibration images (overrides the spec; 0 = the whole train split)
    percentile: Optional[float] = None # percentile method (overrides the spec; default 99.99)
    eval_split: str = "val"            # split on which INT8 is compared with FP32 (never the calibration split)
    max_accuracy_drop: float = 0.01    # tolerance: top-1 accuracy (fraction, 0.01 = 1 point)
    max_recall_drop: float = 0.02      # tolerance: recall of any single class
    min_agreement: float = 0.99        # tolerance: FP32/INT8 top-1 agreement on every non-test image (train, val, views)
    max_class_flip_rate: float = 0.02  # tolerance: fraction of one class's non-test images whose top-1 flips
    fidelity_views: int = 1            # augmented views of each train image in the fidelity set (0: none)
    bias_correction: bool = False      # correct each Conv/Gemm bias for its weight-rounding shift (recovery.py)
    fallback: str = "sensitivity"      # sensitivity | none (inc: see README, not usable with onnxruntime here)
    sensitivity: str = "single"        # single (quantise one node at a time) | leave_one_out (exclude one at a time)
    max_fallback_nodes: int = 8        # at most this many nodes kept in floating point
    qat: str = "auto"                  # auto (when PTQ + fallback misses the tolerance) | true | false
    qat_epochs: int = 3                # QAT trains through edgeus.train.fit with the run's train/distill settings
    qat_lr: float = 1e-4               # (steps per epoch: train.max_steps_per_epoch; KD loss: distill.losses)
    trt_cache_version: str = "8602"    # header of calibration.cache: TRT-<version>-EntropyCalibration2 (8602 = TensorRT 8.6.2, JetPack 6.0)
    out: Optional[str] = None          # `edgeus quantize`: output file (default <input stem>.int8.onnx)
    checkpoint: Optional[str] = None   # `edgeus quantize`: the torch checkpoint (enables QAT)
