"""Settings of the prune stage (``prune.<field>=value`` on the command line and in recipes)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class PruneConfig:
    enabled: bool = True
    # structured | unstructured | semi_structured (2:4); combine with "+", e.g. "structured+semi_structured"
    method: str = "structured"

    # ---- structured (channel) pruning on torch-pruning's dependency graph
    importance: str = "l2"             # l1 | l2 | bn_scale (network slimming) | taylor | lamp | random
    ratio: float = 0.5                 # fraction of channels removed per layer (or globally)
    target_macs: Optional[float] = None  # keep this fraction of the model's MACs (overrides ratio)
    macs_tolerance: float = 0.03       # accept MACs up to target * (1 + tolerance)
    global_pruning: bool = False       # rank channels across layers (True) or per layer (False)
    max_layer_ratio: float = 0.9       # never remove more than this fraction of one layer's channels
    round_to: Optional[int] = None     # keep channel counts multiples of this (8 suits tensor cores)
    steps: int = 1                     # iterative pruning: N steps, fine-tuning between them
    ignore: List[str] = field(default_factory=list)  # module names to leave whole (e.g. [stem.conv])
    prune_attention_dims: bool = True  # prune MDTA q/k/v dims uniformly inside each head
    # importance estimation
    taylor_batches: int = 4            # batches of train_plain for first-order Taylor scores
    slimming_epochs: int = 0           # bn_scale: epochs of L1 sparsity training on BN gammas first
    slimming_reg: float = 1e-4         # bn_scale: L1 coefficient on BN gammas

    # ---- fine-tuning (plain CE, or with the teacher when one is given and use_teacher)
    finetune_epochs: int = 0           # after the last step
    step_epochs: int = 0               # between iterative steps
    use_teacher: bool = True
    lr: Optional[float] = None         # fine-tuning learning rate (default: train.lr)

    # ---- unstructured / 2:4 semi-structured sparsity (weights only; dense shapes unchanged)
    sparsity: float = 0.5              # unstructured: global fraction of conv/linear weights zeroed
    sparsity_steps: int = 1            # gradual (cubic, Zhu & Gupta 2017) schedule over this many steps
    include_classifier: bool = False   # also sparsify the final classifier
    measure_latency: bool = True       # unstructured / 2:4: measure the dense ONNX Runtime latency ratio
