"""Settings of the distillation stage (``distill.*`` on the command line and in recipes).

Loss terms are combined by weight::

    distill.losses=[ce,kd,fitnet] distill.weights.kd=0.9 distill.weights.fitnet=1.0

Feature pairs are module paths as printed by ``model.named_modules()``, **teacher first**::

    distill.pairs=[[layer3,features.13],[layer4,features.18]]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Optional


@dataclass
class DistillConfig:
    enabled: bool = True
    # loss terms, summed with their weights: ce | kd | dkd | fitnet | at
    losses: List[str] = field(default_factory=lambda: ["ce", "kd"])
    # weight of each term; a term not named here gets its default (edgeus.distill.DEFAULT_WEIGHTS)
    weights: Dict[str, float] = field(default_factory=dict)
    # Hinton's mixing weight: when set, ce gets (1 - alpha) and kd gets alpha (instead of weights.ce/kd)
    alpha: Optional[float] = None
    temperature: float = 4.0          # softening temperature of kd and dkd (losses are scaled by T^2)
    dkd_alpha: float = 1.0            # DKD: weight of the target-class term (TCKD)
    dkd_beta: float = 8.0             # DKD: weight of the non-target-class term (NCKD)
    dkd_warmup: float = 0.0           # DKD: epochs over which its weight ramps linearly from 0 to 1
    # feature pairs [teacher_module, student_module]; empty = the last feature stage of each model
    pairs: List[List[str]] = field(default_factory=list)
    pre_relu: bool = False            # tap features before the block's final ReLU (Heo et al. 2019)
    at_p: float = 2.0                 # attention transfer: map = mean_c |f|^p
    align: str = "pool"               # spatial mismatch: pool (larger map -> smaller) | interpolate (student -> teacher)
    epochs: Optional[int] = None      # default: train.epochs
    lr: Optional[float] = None        # default: train.lr
    cache_teacher: bool = False       # reuse teacher logits/features across epochs (no augmentation)
    teacher: Optional[str] = None     # CLI: teacher checkpoint (or the first positional argument)
    student: Optional[str] = None     # CLI: student checkpoint, or a model name (default: model.*)
