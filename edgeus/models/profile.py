"""Parameter counts and MACs, the numbers every ledger row carries."""
from __future__ import annotations

import torch
import torch.nn as nn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: int = 112, in_chans: int = 1) -> int:
    """Multiply-accumulates of one forward pass at batch 1 (torch-pruning's op counter)."""
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    example = torch.randn(1, in_chans, input_size, input_size, device=device)
    macs, _ = tp.utils.count_ops_and_params(model, example)
    model.train(was_training)
    return int(macs)
