"""Settings of the low-rank decomposition stage (``decompose.<field>=value`` on the command line)."""
from dataclasses import dataclass, field
from typing import List, Optional


@dataclass
class DecomposeConfig:
    enabled: bool = True
    method: str = "hooi"            # Tucker-2 initialisation: hosvd | hooi (tensorly partial_tucker); cp: CP (parafac)
    cp_iters: int = 25              # method=cp: at most this many CP-ALS iterations per layer
    hooi_iters: int = 10            # at most this many HOOI iterations (method=hooi)
    rank_mode: str = "budget"       # ratio | energy | vbmf | budget
    ratio: float = 0.5              # ratio: rank = ratio x channels, per mode
    energy: float = 0.95            # energy: keep this fraction of each unfolding's squared singular values
    target_macs: float = 0.5        # budget: the decomposed model's MACs as a fraction of the current model's
    rank_multiple: int = 8          # ranks are multiples of this (layers with < 4x this many channels: any rank)
    min_rank: int = 2               # no rank below this (rank 1 = every output a scaled copy of one map)
    min_rank_ratio: float = 0.0     # no rank below this fraction of a mode's channels
    min_channels: int = 8           # layers with fewer input or output channels are left alone ("tiny")
    pointwise: bool = True          # 1x1 convolutions: truncated SVD into two 1x1 convolutions
    linear: bool = True             # linear layers: truncated SVD into two linears
    exclude: List[str] = field(default_factory=list)  # fnmatch patterns of layer names to leave alone
    recalibrate_bn: int = 8         # with data: re-estimate BatchNorm statistics on this many train batches
    finetune_epochs: int = 3        # fine-tune after decomposing (when data is given); 0 = no fine-tuning
    lr: Optional[float] = None      # fine-tuning learning rate (default: train.lr)
