"""Parameter counts and MACs, the numbers every ledger row carries: the one MACs counter of edgeus.

:func:`count_macs` measures a model (torch-pruning's op counter). :func:`conv_macs` and
:func:`linear_macs` are the same counter's formulas for one layer, for planners that must predict
the MACs of a layer before building it (``edgeus.decompose.macs`` composes them); tests hold them
equal to :func:`count_macs`.
"""
from __future__ import annotations

import torch
import torch.nn as nn


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def count_macs(model: nn.Module, input_size: int = 112, in_chans: int = 1, *, example: torch.Tensor | None = None) -> int:
    """Multiply-accumulates of one forward pass (torch-pruning's op counter).

    At batch 1 on a ``randn(1, in_chans, input_size, input_size)`` input, or on ``example`` when given
    (then no random numbers are drawn). The model's train/eval mode is restored afterwards.
    """
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    if example is None:
        device = next(model.parameters()).device
        example = torch.randn(1, in_chans, input_size, input_size, device=device)
    macs, _ = tp.utils.count_ops_and_params(model, example)
    model.train(was_training)
    return int(macs)


def conv_macs(c_in: int, c_out: int, kernel: tuple[int, int], out_hw: tuple[int, int], *,
              groups: int = 1, bias: bool = False) -> int:
    """MACs of a convolution as :func:`count_macs` counts them: ``kh*kw * C_in * (C_out/groups) * H_out*W_out``
    plus ``C_out * H_out*W_out`` for a bias."""
    hw = int(out_hw[0]) * int(out_hw[1])
    macs = int(kernel[0]) * int(kernel[1]) * int(c_in) * (int(c_out) // int(groups)) * hw
    return macs + (int(c_out) * hw if bias else 0)


def linear_macs(in_features: int, out_features: int, positions: int = 1, *, bias: bool = False) -> int:
    """MACs of a linear layer as :func:`count_macs` counts them: ``positions * in * out`` plus ``out`` for a bias."""
    return int(positions) * int(in_features) * int(out_features) + (int(out_features) if bias else 0)
