"""MACs of decomposed layers by formula, composed from :func:`edgeus.models.profile.conv_macs` and
:func:`~edgeus.models.profile.linear_macs` — the formulas of edgeus's one MACs counter
(:func:`edgeus.models.profile.count_macs`, torch-pruning's op counter) — so the rank planner's
numbers match the measured ones exactly.
"""
from __future__ import annotations

from edgeus.models.profile import conv_macs, linear_macs


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


__all__ = ["conv_macs", "linear_macs", "tucker2_macs", "svd_conv_macs", "svd_linear_macs"]
