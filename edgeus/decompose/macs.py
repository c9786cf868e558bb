"""MACs of convolutions and linears by formula, counted the way ``edgeus.models.profile.count_macs``
(torch-pruning's op counter) counts them, so the planner's numbers match the measured ones exactly.

torch-pruning counts a convolution as ``kh*kw * C_in * (C_out/groups) * H_out*W_out`` plus
``C_out * H_out*W_out`` for a bias, and a linear as ``positions * in * out`` plus ``out`` for a bias.
"""
from __future__ import annotations


def conv_macs(c_in: int, c_out: int, kernel: tuple[int, int], out_hw: tuple[int, int], *,
              groups: int = 1, bias: bool = False) -> int:
    hw = int(out_hw[0]) * int(out_hw[1])
    macs = int(kernel[0]) * int(kernel[1]) * int(c_in) * (int(c_out) // int(groups)) * hw
    return macs + (int(c_out) * hw if bias else 0)


def linear_macs(in_features: int, out_features: int, positions: int = 1, *, bias: bool = False) -> int:
    return int(positions) * int(in_features) * int(out_features) + (int(out_features) if bias else 0)


def tucker2_macs(c_in: int, c_out: int, r_in: int, r_out: int, kernel: tuple[int, int],
                 in_hw: tuple[int, int], out_hw: tuple[int, int], *, bias: bool = False,
                 first: bool = True, last: bool = True) -> int:
    """MACs of the three-convolution replacement of a k x k convolution.

    ``first``: the 1x1 C_in->R_in at the input resolution; the k x k core R_in->R_out at the output
    resolution (it carries the stride); ``last``: the 1x1 R_out->C_out at the output resolution
    (it carries the bias). A factor that is left out (its mode kept at full rank) costs nothing and
    its channels go straight into the core.
    """
    core_in = r_in if first else c_in
    core_out = r_out if last else c_out
    macs = 0
    if first:
        macs += conv_macs(c_in, r_in, (1, 1), in_hw)
    macs += conv_macs(core_in, core_out, kernel, out_hw, bias=bias and not last)
    if last:
        macs += conv_macs(r_out, c_out, (1, 1), out_hw, bias=bias)
    return macs


def svd_conv_macs(c_in: int, c_out: int, rank: int, out_hw: tuple[int, int], *, bias: bool = False) -> int:
    """MACs of a 1x1 convolution factored into 1x1 C_in->R (with the stride) and 1x1 R->C_out."""
    return conv_macs(c_in, rank, (1, 1), out_hw) + conv_macs(rank, c_out, (1, 1), out_hw, bias=bias)


def svd_linear_macs(in_features: int, out_features: int, rank: int, positions: int = 1, *,
                    bias: bool = False) -> int:
    return linear_macs(in_features, rank, positions) + linear_macs(rank, out_features, positions, bias=bias)
