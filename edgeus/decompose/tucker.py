"""Tucker-2 decomposition of a k x k convolution into three plain ``nn.Conv2d`` layers.

The kernel ``W[C_out, C_in, kh, kw]`` is approximated on its output and input channel modes::

    W ~= core x_0 U_out x_1 U_in       core: [R_out, R_in, kh, kw], U_out: [C_out, R_out], U_in: [C_in, R_in]

and the convolution becomes ``1x1 (C_in->R_in)``, ``k x k (R_in->R_out, same stride, padding,
dilation)``, ``1x1 (R_out->C_out, with the bias)``: ordinary convolutions that ONNX Runtime and
TensorRT run as such. The factors come from tensorly's ``partial_tucker`` (HOSVD: the leading left
singular vectors of each unfolding; HOOI: then alternating refinement). A mode kept at full rank is
left out (``compact``): its factor would be a square orthogonal 1x1 convolution that costs MACs and
saves nothing.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import torch
import torch.nn as nn

METHODS = ("hosvd", "hooi")


def is_tucker_candidate(conv: nn.Module) -> str | None:
    """None if ``conv`` can be Tucker-2 decomposed, else the reason it cannot."""
    if type(conv) is not nn.Conv2d:
        return f"{type(conv).__name__} is not a plain nn.Conv2d"
    if conv.groups != 1:
        return "depth-wise convolution" if conv.groups == conv.in_channels else f"grouped convolution (groups={conv.groups})"
    if conv.padding_mode != "zeros":
        return f"padding_mode={conv.padding_mode!r}"
    if isinstance(conv.padding, str) and conv.padding != "valid":
        return f"padding={conv.padding!r}"
    return None


def _gram_svd(matrix, n_eigenvecs=None, **kwargs):
    """Truncated SVD through the eigenvectors of the smaller Gram matrix, for tensorly's ``svd=``.

    An unfolding of a kernel is wide (C x C'k^2); ``A A^T`` is C x C. (tensorly's own ``symeig_svd``
    takes the Gram matrix of the larger side for wide matrices, which is slow here.)"""
    A = np.asarray(matrix)
    rows, cols = A.shape
    k = min(rows, cols) if n_eigenvecs is None else min(int(n_eigenvecs), rows, cols)
    if rows <= cols:
        ev, U = np.linalg.eigh(A @ A.T)
        ev, U = ev[::-1][:k], U[:, ::-1][:, :k]
        S = np.sqrt(np.clip(ev, 0.0, None))
        V = (U.T @ A) / np.where(S > 0, S, 1.0)[:, None]
    else:
        ev, V = np.linalg.eigh(A.T @ A)
        ev, V = ev[::-1][:k], V[:, ::-1][:, :k]
        S = np.sqrt(np.clip(ev, 0.0, None))
        U = (A @ V) / np.where(S > 0, S, 1.0)[None, :]
        V = V.T
    return U, S, V


def _partial_tucker(weight: np.ndarray, modes: list[int], ranks: list[int], method: str, iters: int,
                    tol: float = 1e-6):
    """Tucker on ``modes`` of ``weight``: tensorly's ``partial_tucker`` HOSVD, then (``hooi``) the
    same alternating iterations as tensorly's HOOI loop, with the Gram-matrix SVD (tensorly's loop
    always uses a full SVD of the unfolding, which on this machine is the slow part)."""
    import tensorly as tl
    from tensorly.decomposition import partial_tucker
    from tensorly.tenalg import multi_mode_dot

    if method not in METHODS:
        raise ValueError(f"unknown Tucker method {method!r}; use one of {', '.join(METHODS)}")
    with tl.backend_context("numpy"):
        (core, factors), _ = partial_tucker(weight, rank=list(ranks), modes=list(modes), n_iter_max=0,
                                            init="svd", svd=_gram_svd)
        factors = [np.asarray(f) for f in factors]
        if method == "hooi":
            norm = float(np.linalg.norm(weight))
            prev = np.linalg.norm(core)
            for _ in range(int(iters)):
                for idx, mode in enumerate(modes):
                    proj = multi_mode_dot(weight, factors, modes=list(modes), skip=idx, transpose=True)
                    U, _, _ = _gram_svd(tl.unfold(proj, mode), ranks[idx])
                    factors[idx] = U
                core = multi_mode_dot(weight, factors, modes=list(modes), transpose=True)
                cur = np.linalg.norm(core)
                if abs(cur - prev) <= tol * max(norm, 1e-30):   # ||W - W_hat||^2 = ||W||^2 - ||core||^2
                    break
                prev = cur
    return np.asarray(core), [np.asarray(f) for f in factors]


def tucker2_skeleton(conv: nn.Conv2d, r_out: int, r_in: int, *, first: bool = True, last: bool = True) -> nn.Sequential:
    """The replacement's layers with the right shapes (weights uninitialised): used to decompose and to
    rebuild a decomposed model from its structure record before loading its state dict."""
    c_in, c_out = conv.in_channels, conv.out_channels
    has_bias = conv.bias is not None
    core_in = r_in if first else c_in
    core_out = r_out if last else c_out
    layers: list[nn.Module] = []
    kw = dict(device=conv.weight.device, dtype=conv.weight.dtype)
    if first:
        layers.append(nn.Conv2d(c_in, r_in, 1, bias=False, **kw))
    layers.append(nn.Conv2d(core_in, core_out, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                            dilation=conv.dilation, bias=has_bias and not last, **kw))
    if last:
        layers.append(nn.Conv2d(r_out, c_out, 1, bias=has_bias, **kw))
    return nn.Sequential(*layers)


@torch.no_grad()
def tucker2_decompose(conv: nn.Conv2d, ranks: Sequence[int], method: str = "hooi", *, iters: int = 10,
                      compact: bool = True) -> tuple[nn.Sequential, dict]:
    """Decompose ``conv`` with ranks ``(R_out, R_in)``.

    Returns the replacement ``nn.Sequential`` and ``info``: ``{"ranks", "first", "last", "rel_error"}``
    where ``rel_error = ||W - W_hat||_F / ||W||_F`` of the kernel. With ``compact=False`` all three
    convolutions are kept even at full rank.
    """
    why = is_tucker_candidate(conv)
    if why:
        raise ValueError(f"cannot Tucker-decompose: {why}")
    c_out, c_in = conv.out_channels, conv.in_channels
    r_out, r_in = int(ranks[0]), int(ranks[1])
    if not (1 <= r_out <= c_out and 1 <= r_in <= c_in):
        raise ValueError(f"ranks {tuple(ranks)} out of range for a {c_out}x{c_in} convolution")
    last = (r_out < c_out) or not compact
    first = (r_in < c_in) or not compact
    W = conv.weight.detach().cpu().double().numpy()
    modes = [m for m, keep in ((0, last), (1, first)) if keep]
    rank_of = {0: r_out, 1: r_in}
    if modes:
        core, factors = _partial_tucker(W, modes, [rank_of[m] for m in modes], method, iters)
    else:
        core, factors = W.copy(), []
    fac = dict(zip(modes, factors))
    W_hat = core
    for m, U in fac.items():
        W_hat = np.moveaxis(np.tensordot(U, W_hat, axes=([1], [m])), 0, m)
    rel = float(np.linalg.norm(W - W_hat) / max(np.linalg.norm(W), 1e-30))

    seq = tucker2_skeleton(conv, r_out, r_in, first=first, last=last)
    dev, dt = conv.weight.device, conv.weight.dtype
    i = 0
    if first:
        seq[i].weight.copy_(torch.from_numpy(fac[1].T.copy()).to(dev, dt)[:, :, None, None])
        i += 1
    seq[i].weight.copy_(torch.from_numpy(np.ascontiguousarray(core)).to(dev, dt))
    if conv.bias is not None and not last:
        seq[i].bias.copy_(conv.bias)
    i += 1
    if last:
        seq[i].weight.copy_(torch.from_numpy(fac[0].copy()).to(dev, dt)[:, :, None, None])
        if conv.bias is not None:
            seq[i].bias.copy_(conv.bias)
    seq.train(conv.training)
    return seq, {"ranks": [r_out, r_in], "first": first, "last": last, "rel_error": rel}


def decompose_conv(conv: nn.Conv2d, ranks: Sequence[int], method: str = "hooi", *, iters: int = 10,
                   compact: bool = True) -> nn.Sequential:
    """Tucker-2 decomposition of a k x k convolution (a 1x1 one goes by SVD: see ``svd.decompose_pointwise``)."""
    return tucker2_decompose(conv, ranks, method, iters=iters, compact=compact)[0]


def unfolding_spectra(weight: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Squared singular values of the mode-0 (output) and mode-1 (input) unfoldings of a conv kernel."""
    W = weight.detach().cpu().double().numpy()
    c_out, c_in = W.shape[:2]
    u0 = W.reshape(c_out, -1)
    u1 = np.moveaxis(W, 1, 0).reshape(c_in, -1)
    return gram_spectrum(u0), gram_spectrum(u1)


def gram_spectrum(A: np.ndarray) -> np.ndarray:
    """Squared singular values of ``A`` (rows x cols), one per row, descending: the eigenvalues of
    ``A A^T`` (a rows x rows problem, much cheaper than an SVD of a wide unfolding)."""
    ev = np.linalg.eigvalsh(A @ A.T)[::-1]
    return np.clip(ev, 0.0, None)


def unfoldings(weight: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    W = weight.detach().cpu().double().numpy()
    return W.reshape(W.shape[0], -1), np.moveaxis(W, 1, 0).reshape(W.shape[1], -1)
