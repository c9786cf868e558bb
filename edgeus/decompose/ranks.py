"""Rank selection: fixed ratio, energy threshold, VBMF, or a global MACs budget.

The budget mode chooses every layer's ranks at once, in the spirit of BATUDE's budget-aware ranks
(Yin et al., AAAI 2022) but without training: each layer offers every allowed rank pair with its
MACs and its estimated relative squared reconstruction error ``e`` (exact for an SVD, the HOSVD
bound ``t_out[R_out] + t_in[R_in]`` for Tucker-2). The cost of a choice is ``-log(1 - e)``, the log
of the fraction of the kernel's energy it keeps: summed over layers it is the log of the product of
kept fractions, the signal a chain of approximations passes on, and it grows without bound as a
layer is cut to nothing (the plain error saturates at 1, which makes cutting a layer almost to zero
look cheap per MAC saved). On each layer's lower convex hull of (MACs, cost), a step to a cheaper
point costs ``delta cost / delta MACs``; the planner takes the cheapest steps over all layers until
the model fits the budget, then spends what is left of the budget, layer by layer, on the
lowest-cost choice that still fits. The result sums to the budget from below.
"""
from __future__ import annotations

import heapq
import logging
from dataclasses import dataclass

import numpy as np

from edgeus.decompose.layers import Layer
from edgeus.decompose.vbmf import evbmf_rank

log = logging.getLogger(__name__)

RANK_MODES = ("ratio", "energy", "vbmf", "budget")
_MIN_KEPT = 1e-4   # the kept energy fraction below which a cut costs the same (the cost's ceiling)


def _snap(layer: Layer, mode: int, r: int, cfg) -> int:
    """The smallest allowed rank >= r."""
    allowed = layer.allowed_ranks(mode, cfg)
    i = int(np.searchsorted(allowed, r))
    return int(allowed[min(i, len(allowed) - 1)])


def _vbmf_matrices(layer: Layer) -> list[np.ndarray]:
    W = layer.module.weight.detach().cpu().double().numpy()
    if layer.kind == "tucker2":
        return [W.reshape(W.shape[0], -1), np.moveaxis(W, 1, 0).reshape(W.shape[1], -1)]
    return [W.reshape(W.shape[0], -1)]


def fixed_ranks(layer: Layer, cfg) -> tuple[int, ...]:
    """Ranks of one layer under ``ratio`` / ``energy`` / ``vbmf``."""
    mode = cfg.rank_mode
    ranks = []
    if mode == "ratio":
        raw = [max(1, int(round(float(cfg.ratio) * c))) for c in layer.modes]
    elif mode == "energy":
        raw = []
        for t in layer.tail_fractions():
            ok = np.nonzero(t <= 1.0 - float(cfg.energy) + 1e-12)[0]
            raw.append(max(1, int(ok[0]) if len(ok) else len(t) - 1))
    elif mode == "vbmf":
        raw = [evbmf_rank(Y) for Y in _vbmf_matrices(layer)]
    else:
        raise ValueError(f"unknown rank_mode {mode!r}; use one of {', '.join(RANK_MODES)}")
    for i, r in enumerate(raw):
        ranks.append(_snap(layer, i, min(r, layer.modes[i]), cfg))
    return tuple(ranks)


@dataclass
class _Options:
    """One layer's choices: ranks (None = leave as is), MACs, estimated relative squared error and
    cost ``-log(1 - err)`` (the log of the kernel energy lost) of each."""
    ranks: list
    macs: np.ndarray
    err: np.ndarray

    @property
    def cost(self) -> np.ndarray:
        return -np.log(np.clip(1.0 - self.err, _MIN_KEPT, 1.0))


def _options(layer: Layer, cfg) -> _Options:
    allowed = [layer.allowed_ranks(i, cfg) for i in range(len(layer.modes))]
    tails = layer.tail_fractions()
    if layer.kind == "tucker2":
        r0, r1 = np.meshgrid(allowed[0], allowed[1], indexing="ij")
        r0, r1 = r0.ravel(), r1.ravel()
        macs = np.array([layer.macs_at((a, b)) for a, b in zip(r0, r1)], dtype=np.int64)
        err = tails[0][r0] + tails[1][r1]
        ranks = [(int(a), int(b)) for a, b in zip(r0, r1)]
    else:
        macs = np.array([layer.macs_at((a,)) for a in allowed[0]], dtype=np.int64)
        err = tails[0][allowed[0]]
        ranks = [(int(a),) for a in allowed[0]]
    keep = macs < layer.macs
    ranks = [None] + [r for r, k in zip(ranks, keep) if k]
    return _Options(ranks, np.concatenate([[layer.macs], macs[keep]]), np.concatenate([[0.0], err[keep]]))


def _lower_hull(macs: np.ndarray, err: np.ndarray) -> list[int]:
    """Indices of the lower convex hull of the points, from most to fewest MACs."""
    order = sorted(range(len(macs)), key=lambda i: (macs[i], err[i]))
    order = [i for j, i in enumerate(order) if j == 0 or macs[i] != macs[order[j - 1]]]
    hull: list[int] = []
    for i in order:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            cross = (macs[b] - macs[a]) * (err[i] - err[a]) - (err[b] - err[a]) * (macs[i] - macs[a])
            if cross <= 0:
                hull.pop()
            else:
                break
        hull.append(i)
    # the undecomposed option (most MACs, zero error) is the rightmost point and the lowest one, so
    # along the hull the error only rises as MACs fall
    return hull[::-1]


def budget_ranks(layers: list[Layer], cfg, budget: int) -> tuple[dict[str, tuple | None], dict]:
    """Ranks for every layer so that the layers' MACs sum to at most ``budget``, with the least
    estimated error per MAC saved. Returns ``(plan, info)``; ``plan[name]`` is None for a layer
    left as it is."""
    opts = {l.name: _options(l, cfg) for l in layers}
    choice = {n: 0 for n in opts}
    total = int(sum(int(o.macs[0]) for o in opts.values()))
    floor = int(sum(int(o.macs.min()) for o in opts.values()))
    info = {"layer_budget": int(budget), "layers_macs_before": total, "layers_min_macs": floor}
    if not opts and budget < 0:
        log.warning("decompose: the budget cannot be met: no layer can be decomposed at the allowed ranks "
                    "(a target's channel multiple or decompose.min_channels leaves every layer whole)")
        info["feasible"] = False
    elif floor > budget:
        log.warning("decompose: the budget cannot be met: the decomposable layers need at least %d MACs, "
                    "%d allowed", floor, budget)
        for n, o in opts.items():
            choice[n] = int(np.argmin(o.macs))
        info["feasible"] = False
    else:
        # the cheapest step (least error per MAC saved) over all layers, each layer walking down its hull
        costs = {n: o.cost for n, o in opts.items()}
        hulls = {n: _lower_hull(o.macs, costs[n]) for n, o in opts.items()}
        pos = {n: 0 for n in opts}
        heap = []

        def push(n: str) -> None:
            h, k, o = hulls[n], pos[n], opts[n]
            if k + 1 < len(h):
                saved = int(o.macs[h[k]] - o.macs[h[k + 1]])
                heapq.heappush(heap, ((costs[n][h[k + 1]] - costs[n][h[k]]) / max(saved, 1), n))

        for n in opts:
            push(n)
        cur = total
        while cur > budget and heap:
            _, n = heapq.heappop(heap)
            h, o = hulls[n], opts[n]
            cur -= int(o.macs[h[pos[n]]] - o.macs[h[pos[n] + 1]])
            pos[n] += 1
            choice[n] = h[pos[n]]
            push(n)
        # spend the remaining budget: per layer, the lowest-error option that still fits
        for _ in range(3):
            changed = False
            for n, o in sorted(opts.items(), key=lambda kv: -kv[1].macs[0]):
                cur = int(sum(int(opts[m].macs[choice[m]]) for m in opts))
                room = budget - (cur - int(o.macs[choice[n]]))
                fits = np.nonzero(o.macs <= room)[0]
                if len(fits) == 0:
                    continue
                c = costs[n]
                best = int(fits[np.argmin(c[fits])])
                if c[best] < c[choice[n]] - 1e-15:
                    choice[n], changed = best, True
            if not changed:
                break
        info["feasible"] = True
    plan = {n: opts[n].ranks[choice[n]] for n in opts}
    info["layers_macs_after"] = int(sum(int(opts[n].macs[choice[n]]) for n in opts))
    info["estimated_err2"] = {n: float(opts[n].err[choice[n]]) for n in opts}
    return plan, info


def select_ranks(layers: list[Layer], cfg, *, fixed_macs: int = 0, total_macs: int | None = None
                 ) -> tuple[dict[str, tuple | None], dict]:
    """Ranks per layer for ``cfg.rank_mode`` (cfg = the decompose section)."""
    if cfg.rank_mode not in RANK_MODES:
        raise ValueError(f"unknown decompose.rank_mode {cfg.rank_mode!r}; use one of {', '.join(RANK_MODES)}")
    if cfg.rank_mode == "budget":
        if not 0.0 < float(cfg.target_macs) <= 1.0:
            raise ValueError(f"decompose.target_macs must be in (0, 1], got {cfg.target_macs}")
        total = total_macs if total_macs is not None else fixed_macs + sum(l.macs for l in layers)
        target = int(np.floor(float(cfg.target_macs) * total))
        plan, info = budget_ranks(layers, cfg, target - int(fixed_macs))
        info.update({"target_macs": target, "total_macs_before": int(total)})
        return plan, info
    plan = {}
    for l in layers:
        r = fixed_ranks(l, cfg)
        plan[l.name] = None if (all(a >= c for a, c in zip(r, l.modes)) or l.macs_at(r) >= l.macs) else r
    return plan, {}
