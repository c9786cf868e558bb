"""Truncated SVD of linear layers and 1x1 convolutions: one layer becomes two thinner ones.

``W[out, in] ~= A B`` (rank r): the first layer ``B: in -> r`` (no bias; for a convolution it
carries the stride and padding), the second ``A: r -> out`` with the bias. One of the two factors
is the orthonormal singular basis (``V_r^T`` or ``U_r``), the other the projection of ``W`` on it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn


def _factor(W: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray, float]:
    """``W ~= A @ B`` with ``A: [out, r]``, ``B: [r, in]``, the best rank-r approximation.

    Through the eigenvectors of the smaller Gram matrix (an SVD of a wide 2048 x 1024 weight is an
    order of magnitude slower): with ``V_r`` the leading right singular vectors, ``W ~= (W V_r) V_r^T``;
    with ``U_r`` the leading left ones, ``W ~= U_r (U_r^T W)``. Exact at full rank.
    """
    r = int(rank)
    out, inp = W.shape
    if out >= inp:
        _, V = np.linalg.eigh(W.T @ W)
        Vr = V[:, ::-1][:, :r]
        A, B = W @ Vr, Vr.T
    else:
        _, U = np.linalg.eigh(W @ W.T)
        Ur = U[:, ::-1][:, :r]
        A, B = Ur, Ur.T @ W
    rel = float(np.linalg.norm(W - A @ B) / max(np.linalg.norm(W), 1e-30))
    return np.ascontiguousarray(A), np.ascontiguousarray(B), rel


def is_pointwise_candidate(conv: nn.Module) -> str | None:
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if conv.groups != 1:
        return "depth-wise convolution" if conv.groups == conv.in_channels else f"grouped convolution (groups={conv.groups})"
    if tuple(conv.kernel_size) != (1, 1):
        return "not a 1x1 convolution"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if isinstance(conv.padding, str) and conv.padding != "valid":
        return f"padding={conv.padding!r}"
    return None


def linear_skeleton(linear: nn.Linear, rank: int) -> nn.Sequential:
    kw = dict(device=linear.weight.device, dtype=linear.weight.dtype)
    return nn.Sequential(nn.Linear(linear.in_features, rank, bias=False, **kw),
                         nn.Linear(rank, linear.out_features, bias=linear.bias is not None, **kw))


def pointwise_skeleton(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    kw = dict(device=conv.weight.device, dtype=conv.weight.dtype)
    return nn.Sequential(
        nn.Conv2d(conv.in_channels, rank, 1, stride=conv.stride, padding=conv.padding, dilation=conv.dilation,
                  bias=False, **kw),
        nn.Conv2d(rank, conv.out_channels, 1, bias=conv.bias is not None, **kw),
    )


@torch.no_grad()
def svd_linear_decompose(linear: nn.Linear, rank: int) -> tuple[nn.Sequential, dict]:
    if type(linear) is not nn.Linear:
        raise ValueError(f"{type(linear).__name__} is not a plain nn.Linear")
    r = int(rank)
    if not 1 <= r <= min(linear.in_features, linear.out_features):
        raise ValueError(f"rank {r} out of range for a {linear.out_features}x{linear.in_features} linear")
    A, B, rel = _factor(linear.weight.detach().cpu().double().numpy(), r)
    seq = linear_skeleton(linear, r)
    dev, dt = linear.weight.device, linear.weight.dtype
    seq[0].weight.copy_(torch.from_numpy(B).to(dev, dt))
    seq[1].weight.copy_(torch.from_numpy(A).to(dev, dt))
    if linear.bias is not None:
        seq[1].bias.copy_(linear.bias)
    seq.train(linear.training)
    return seq, {"ranks": [r], "rel_error": rel}


@torch.no_grad()
def svd_pointwise_decompose(conv: nn.Conv2d, rank: int) -> tuple[nn.Sequential, dict]:
    why = is_pointwise_candidate(conv)
    if why:
        raise ValueError(f"cannot SVD-decompose: {why}")
    r = int(rank)
    if not 1 <= r <= min(conv.in_channels, conv.out_channels):
        raise ValueError(f"rank {r} out of range for a {conv.out_channels}x{conv.in_channels} 1x1 convolution")
    W = conv.weight.detach().cpu().double().numpy()[:, :, 0, 0]
    A, B, rel = _factor(W, r)
    seq = pointwise_skeleton(conv, r)
    dev, dt = conv.weight.device, conv.weight.dtype
    seq[0].weight.copy_(torch.from_numpy(B).to(dev, dt)[:, :, None, None])
    seq[1].weight.copy_(torch.from_numpy(A).to(dev, dt)[:, :, None, None])
    if conv.bias is not None:
        seq[1].bias.copy_(conv.bias)
    seq.train(conv.training)
    return seq, {"ranks": [r], "rel_error": rel}


def decompose_linear(linear: nn.Linear, rank: int) -> nn.Sequential:
    """Truncated SVD of a linear layer into two linears (``in -> rank -> out``)."""
    return svd_linear_decompose(linear, rank)[0]


def decompose_pointwise(conv: nn.Conv2d, rank: int) -> nn.Sequential:
    """Truncated SVD of a 1x1 convolution into two 1x1 convolutions (``C_in -> rank -> C_out``)."""
    return svd_pointwise_decompose(conv, rank)[0]


def matrix_spectrum(weight: torch.Tensor) -> np.ndarray:
    """Squared singular values of a linear weight or a 1x1 kernel."""
    from edgeus.decompose.tucker import gram_spectrum

    W = weight.detach().cpu().double().numpy().reshape(weight.shape[0], -1)
    return gram_spectrum(W if W.shape[0] <= W.shape[1] else W.T)
