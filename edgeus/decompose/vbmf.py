"""Empirical variational Bayesian matrix factorisation (EVBMF), analytic solution, numpy only.

Nakajima, Sugiyama, Babacan and Tomioka, "Global analytic solution of fully-observed variational
Bayesian matrix factorization", JMLR 14 (2013), Theorem 2 and Corollary 1: with the noise variance
estimated by a one-dimensional minimisation of the free energy, the retained components are those
whose singular values exceed ``sqrt(M * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar))``.
Kim et al. (ICLR 2016) used it on the mode-0 and mode-1 unfoldings of a convolution kernel to pick
the Tucker-2 ranks; :func:`evbmf_rank` is that use.
"""
from __future__ import annotations

import numpy as np

_TAU_BAR_COEF = 2.5129  # tau_bar = 2.5129 * sqrt(alpha) (Nakajima et al. 2013, after Eq. 22)


def _tau(x: np.ndarray, alpha: float) -> np.ndarray:
    return 0.5 * (x - (1 + alpha) + np.sqrt(np.maximum((x - (1 + alpha)) ** 2 - 4 * alpha, 0.0)))


def _free_energy(sigma2: float, L: int, M: int, s: np.ndarray, residual: float, xubar: float) -> float:
    """Free energy (up to constants) as a function of the noise variance (Nakajima et al. Eq. 27)."""
    H = len(s)
    alpha = L / M
    x = s ** 2 / (M * sigma2)
    z1 = x[x > xubar]
    z2 = x[x <= xubar]
    tau_z1 = _tau(z1, alpha)
    term1 = np.sum(z2 - np.log(z2))
    term2 = np.sum(z1 - tau_z1)
    term3 = np.sum(np.log((tau_z1 + 1) / z1))
    term4 = alpha * np.sum(np.log(tau_z1 / alpha + 1))
    return float(term1 + term2 + term3 + term4 + residual / (M * sigma2) + (L - H) * np.log(sigma2))


def _minimise_bounded(f, lo: float, hi: float, grid: int = 200, iters: int = 80) -> float:
    """Minimise a 1-D function on [lo, hi]: a log-spaced grid scan, then golden-section refinement."""
    if not (hi > lo > 0):
        return max(lo, hi)
    xs = np.geomspace(lo, hi, grid)
    vals = np.array([f(x) for x in xs])
    i = int(np.nanargmin(vals))
    a = np.log(xs[max(i - 1, 0)])
    b = np.log(xs[min(i + 1, grid - 1)])
    g = (np.sqrt(5) - 1) / 2
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(np.exp(c)), f(np.exp(d))
    for _ in range(iters):
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(np.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(np.exp(d))
    best = np.exp((a + b) / 2)
    return float(best if f(best) <= vals[i] else xs[i])


def evbmf(Y: np.ndarray, sigma2: float | None = None) -> dict:
    """EVBMF of a matrix ``Y``: the retained singular values and the estimated noise variance.

    Returns ``{"rank", "sigma2", "threshold", "singular_values", "posterior"}`` where ``posterior``
    holds the shrunk singular values of the retained components.
    """
    Y = np.asarray(Y, dtype=np.float64)
    if Y.ndim != 2:
        raise ValueError(f"EVBMF needs a matrix, got shape {Y.shape}")
    if Y.shape[0] > Y.shape[1]:
        Y = Y.T
    L, M = Y.shape
    H = L
    alpha = L / M
    tau_bar = _TAU_BAR_COEF * np.sqrt(alpha)
    # singular values through the L x L Gram matrix (L <= M): much cheaper than an SVD of a wide matrix
    s = np.sqrt(np.clip(np.linalg.eigvalsh(Y @ Y.T)[::-1], 0.0, None))
    residual = max(float(np.sum(Y ** 2) - np.sum(s ** 2)), 0.0) if H < L else 0.0
    xubar = (1 + tau_bar) * (1 + alpha / tau_bar)
    if sigma2 is None:
        eh_ub = int(min(np.ceil(L / (1 + alpha)) - 1, H)) - 1
        upper = (np.sum(s ** 2) + residual) / (L * M)
        lower = max(s[eh_ub + 1] ** 2 / (M * xubar), np.mean(s[eh_ub + 1:] ** 2) / M)
        if upper <= 0:
            return {"rank": 0, "sigma2": 0.0, "threshold": 0.0, "singular_values": s, "posterior": s[:0]}
        lower = max(lower, upper * 1e-12)
        sigma2 = _minimise_bounded(lambda v: _free_energy(v, L, M, s, residual, xubar), lower, upper)
    threshold = float(np.sqrt(M * sigma2 * (1 + tau_bar) * (1 + alpha / tau_bar)))
    pos = int(np.sum(s > threshold))
    sp = s[:pos]
    ratio = (L + M) * sigma2 / sp ** 2
    post = sp / 2 * (1 - ratio + np.sqrt(np.maximum((1 - ratio) ** 2 - 4 * L * M * sigma2 ** 2 / sp ** 4, 0.0)))
    return {"rank": pos, "sigma2": float(sigma2), "threshold": threshold, "singular_values": s, "posterior": post}


def evbmf_rank(Y: np.ndarray) -> int:
    """The number of components EVBMF keeps (at least 1)."""
    return max(1, evbmf(Y)["rank"])
