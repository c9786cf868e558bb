"""CP (CANDECOMP/PARAFAC) decomposition of a k x k convolution, beside Tucker-2 (``decompose.method=cp``).

Lebedev et al. (ICLR 2015), one of the low-rank methods the review of lightweight CNNs (seed 002)
names: the kernel ``W[C_out, C_in, kh, kw]`` is approximated by a sum of ``R`` rank-one tensors::

    W ~= sum_r  lambda_r  a_r (x) b_r (x) c_r (x) d_r      A: [C_out, R], B: [C_in, R], C: [kh, R], D: [kw, R]

(tensorly's ``parafac``, alternating least squares from an SVD initialisation), and the convolution
becomes four plain layers::

    1x1 conv C_in -> R (weights B^T)                       at the input resolution
    kh x 1 depth-wise conv on R channels (C^T)            vertical stride, padding, dilation
    1 x kw depth-wise conv on R channels (D^T)            horizontal stride, padding, dilation
    1x1 conv R -> C_out (weights A * lambda, the bias)    at the output resolution

Ranks: the rank modes (``ratio``, ``energy``, ``vbmf``, ``budget``) choose Tucker-2 ranks
``(R_out, R_in)`` per layer exactly as for Tucker-2; CP then takes the largest ``R`` whose MACs do not
exceed that Tucker-2 layer's (:func:`cp_rank_for_macs`). Both methods therefore run at the same MACs
for the same settings (a budget is met from below), and a comparison between them is one of accuracy
and real latency at equal MACs. A layer where no ``R >= 1`` fits is left whole.
"""
from __future__ import annotations

import warnings

import numpy as np
import torch
import torch.nn as nn

from edgeus.decompose.macs import conv_macs


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def cp_macs(c_in: int, c_out: int, rank: int, kernel, in_hw, out_hw, *, bias: bool = False) -> int:
    """MACs of the four-layer CP replacement, by the formulas of edgeus's MACs counter."""
    kh, kw = _pair(kernel)
    mid = (int(out_hw[0]), int(in_hw[1]))
    return (conv_macs(c_in, rank, (1, 1), in_hw)
            + conv_macs(rank, rank, (kh, 1), mid, groups=rank)
            + conv_macs(rank, rank, (1, kw), out_hw, groups=rank)
            + conv_macs(rank, c_out, (1, 1), out_hw, bias=bias))


def cp_rank_for_macs(c_in: int, c_out: int, kernel, in_hw, out_hw, max_macs: int, *, bias: bool = False,
                     multiple: int = 1) -> int:
    """The largest rank (a multiple of ``multiple`` when one fits, else any) whose CP MACs are at most
    ``max_macs``; 0 when not even rank 1 fits."""
    per_rank = cp_macs(c_in, c_out, 1, kernel, in_hw, out_hw)                       # linear in the rank
    fixed = cp_macs(c_in, c_out, 1, kernel, in_hw, out_hw, bias=bias) - per_rank     # the bias, if any
    r = int((int(max_macs) - fixed) // max(per_rank, 1))
    while r > 0 and cp_macs(c_in, c_out, r, kernel, in_hw, out_hw, bias=bias) > max_macs:
        r -= 1
    m = max(1, int(multiple))
    if m > 1 and r >= m:
        r -= r % m
    return max(0, r)


def cp_skeleton(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """The replacement's layers with the right shapes (weights uninitialised): used to decompose and to
    rebuild a decomposed model from its structure record before loading its state dict."""
    (sh, sw), (ph, pw), (dh, dw) = _pair(conv.stride), _pair(conv.padding), _pair(conv.dilation)
    kh, kw = _pair(conv.kernel_size)
    kw_ = dict(device=conv.weight.device, dtype=conv.weight.dtype)
    r = int(rank)
    return nn.Sequential(
        nn.Conv2d(conv.in_channels, r, 1, bias=False, **kw_),
        nn.Conv2d(r, r, (kh, 1), stride=(sh, 1), padding=(ph, 0), dilation=(dh, 1), groups=r, bias=False, **kw_),
        nn.Conv2d(r, r, (1, kw), stride=(1, sw), padding=(0, pw), dilation=(1, dw), groups=r, bias=False, **kw_),
        nn.Conv2d(r, conv.out_channels, 1, bias=conv.bias is not None, **kw_),
    )


def cp_factors(weight: np.ndarray, rank: int, iters: int = 25, tol: float = 1e-7, seed: int = 0):
    """``(lambda [R], [A, B, C, D])`` of ``weight`` [C_out, C_in, kh, kw] by tensorly's ``parafac``
    (numpy backend, SVD initialisation; columns beyond a mode's size start from a seeded generator,
    never the global one)."""
    import tensorly as tl
    from tensorly.decomposition import parafac

    with tl.backend_context("numpy"), warnings.catch_warnings():
        # the SVD initialisation of a kh- or kw-mode with fewer rows than the rank: tensorly says so, then
        # fills the other columns from random_state (seeded here), which is what we want
        warnings.filterwarnings("ignore", message="Trying to compute SVD with n_eigenvecs")
        cp = parafac(np.asarray(weight, np.float64), rank=int(rank), n_iter_max=int(iters), init="svd",
                     tol=tol, random_state=np.random.RandomState(seed), normalize_factors=False)
        w, factors = cp
    return np.asarray(w, np.float64), [np.asarray(f, np.float64) for f in factors]


@torch.no_grad()
def cp_decompose(conv: nn.Conv2d, rank: int, *, iters: int = 25) -> tuple[nn.Sequential, dict]:
    """CP-decompose ``conv`` at ``rank``. Returns the replacement and ``{"ranks": [R], "rel_error"}``
    with ``rel_error = ||W - W_hat||_F / ||W||_F`` of the kernel."""
    from edgeus.decompose.tucker import is_tucker_candidate

    why = is_tucker_candidate(conv)
    if why:
        raise ValueError(f"cannot CP-decompose: {why}")
    r = int(rank)
    if r < 1:
        raise ValueError(f"CP rank must be >= 1, got {rank}")
    W = conv.weight.detach().cpu().double().numpy()
    lam, (A, B, C, D) = cp_factors(W, r, iters)
    A = A * lam[None, :]
    W_hat = np.einsum("or,ir,hr,wr->oihw", A, B, C, D)
    rel = float(np.linalg.norm(W - W_hat) / max(np.linalg.norm(W), 1e-30))
    seq = cp_skeleton(conv, r)
    dev, dt = conv.weight.device, conv.weight.dtype
    t = lambda a: torch.from_numpy(np.ascontiguousarray(a)).to(dev, dt)  # noqa: E731
    seq[0].weight.copy_(t(B.T)[:, :, None, None])
    seq[1].weight.copy_(t(C.T)[:, None, :, None])
    seq[2].weight.copy_(t(D.T)[:, None, None, :])
    seq[3].weight.copy_(t(A)[:, :, None, None])
    if conv.bias is not None:
        seq[3].bias.copy_(conv.bias)
    seq.train(conv.training)
    return seq, {"ranks": [r], "rel_error": rel}


def cp_layer(layer, tucker_ranks, cfg) -> tuple[nn.Sequential | None, dict]:
    """Decompose one planned Tucker-2 layer (``edgeus.decompose.layers.Layer``) by CP at the MACs of
    its Tucker-2 ``tucker_ranks``. Returns ``(replacement or None when no rank fits, info)``; ``info``
    has ``ranks``, ``rel_error``, ``macs`` and ``spec`` (the structure record)."""
    budget = layer.macs_at(tucker_ranks)
    # the rank rules of Tucker-2's modes (edgeus.decompose.layers.Layer.allowed_ranks): a target's channel
    # multiple (then at least it), else decompose.rank_multiple where the layer is wide enough for it;
    # never below decompose.min_rank
    target = int(getattr(cfg, "channel_multiple", None) or 1)
    if target > 1:
        mult = floor = target
    else:
        mult = max(1, int(getattr(cfg, "rank_multiple", 1) or 1))
        mult = mult if min(layer.c_in, layer.c_out) >= 4 * mult else 1
        floor = 1
    floor = max(floor, int(getattr(cfg, "min_rank", 1) or 1))
    r = cp_rank_for_macs(layer.c_in, layer.c_out, layer.kernel, layer.in_hw, layer.out_hw, budget,
                         bias=layer.bias, multiple=mult)
    if r < max(1, floor):
        return None, {"ranks": [r], "macs": layer.macs,
                      "reason": f"no CP rank of at least {max(1, floor)} (in steps of {mult}) fits the Tucker-2 "
                                "layer's MACs"}
    new, info = cp_decompose(layer.module, r, iters=int(getattr(cfg, "cp_iters", 25)))
    info["macs"] = cp_macs(layer.c_in, layer.c_out, r, layer.kernel, layer.in_hw, layer.out_hw, bias=layer.bias)
    info["spec"] = {"type": "cp", "ranks": [r], "tucker_ranks": [int(v) for v in tucker_ranks]}
    return new, info
