"""Find the layers a model could decompose, with the shapes and MACs each one runs at.

One forward pass at batch 1 with hooks records every convolution's input and output resolution
and every linear's number of positions; each layer is then either a :class:`Layer` (something a
decomposition can make cheaper) or a ``(name, reason)`` pair saying why it is left alone.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn

from edgeus.decompose import macs as M
from edgeus.decompose.svd import is_pointwise_candidate, matrix_spectrum
from edgeus.decompose.tucker import is_tucker_candidate, unfolding_spectra

KINDS = ("tucker2", "svd_conv", "svd_linear")


@dataclass
class Layer:
    name: str
    kind: str                      # tucker2 | svd_conv | svd_linear
    module: nn.Module
    c_in: int
    c_out: int
    kernel: tuple[int, int]
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    positions: int                 # linears: rows the weight is applied to
    bias: bool
    macs: int                      # MACs of the layer as it is
    _spectra: tuple | None = field(default=None, repr=False)

    @property
    def modes(self) -> tuple[int, ...]:
        """Channel counts of the modes a rank is chosen for (Tucker: (C_out, C_in); SVD: (min(out,in),))."""
        return (self.c_out, self.c_in) if self.kind == "tucker2" else (min(self.c_out, self.c_in),)

    @property
    def shape(self) -> list[int]:
        return [self.c_out, self.c_in, *self.kernel] if self.kind != "svd_linear" else [self.c_out, self.c_in]

    def spectra(self) -> tuple[np.ndarray, ...]:
        """Squared singular values per mode (Tucker: of the two unfoldings; SVD: of the matrix)."""
        if self._spectra is None:
            w = self.module.weight
            self._spectra = unfolding_spectra(w) if self.kind == "tucker2" else (matrix_spectrum(w),)
        return self._spectra

    def macs_at(self, ranks) -> int:
        if self.kind == "tucker2":
            r_out, r_in = int(ranks[0]), int(ranks[1])
            return M.tucker2_macs(self.c_in, self.c_out, r_in, r_out, self.kernel, self.in_hw, self.out_hw,
                                  bias=self.bias, first=r_in < self.c_in, last=r_out < self.c_out)
        if self.kind == "svd_conv":
            return M.svd_conv_macs(self.c_in, self.c_out, int(ranks[0]), self.out_hw, bias=self.bias)
        return M.svd_linear_macs(self.c_in, self.c_out, int(ranks[0]), self.positions, bias=self.bias)

    def allowed_ranks(self, mode: int, cfg) -> np.ndarray:
        """Ranks a mode may take, ascending, ending at its full size: multiples of
        ``decompose.rank_multiple`` (any rank when the mode has fewer than 4x that many channels), or
        of a target's ``channel_multiple`` when one is given (then at least that multiple, and a mode
        no larger than it stays whole); never below ``decompose.min_rank`` nor
        ``decompose.min_rank_ratio`` of the channels; a Tucker mode with fewer than
        ``decompose.min_channels`` channels stays at full rank."""
        c = self.modes[mode]
        if self.kind == "tucker2" and c < int(getattr(cfg, "min_channels", 1)):
            return np.array([c])
        target = int(getattr(cfg, "channel_multiple", None) or 1)
        if target > 1:
            # a target's channel multiple (its INT8 kernels' alignment): ranks are multiples of it and
            # at least it; a mode of at most that many channels stays at full rank
            if c <= target:
                return np.array([c])
            mult = floor = target
        else:
            mult = max(1, int(getattr(cfg, "rank_multiple", 1)))
            if c < 4 * mult:
                mult = 1
            floor = 1
        # never a degenerate core: below decompose.min_rank (2: no rank-1 layer whose outputs are
        # scaled copies of one map) or decompose.min_rank_ratio of the channels
        floor = max(floor, min(c, int(getattr(cfg, "min_rank", 1) or 1)),
                    int(np.ceil(float(getattr(cfg, "min_rank_ratio", 0.0)) * c)))
        ranks = [r for r in range(mult, c, mult) if r >= floor]
        return np.array(ranks + [c])

    def tail_fractions(self) -> list[np.ndarray]:
        """Per mode, ``t[r]``: the fraction of the kernel's energy outside the leading ``r`` components
        (index 0..C). For Tucker-2 (HOSVD) the relative squared error is at most ``t0[r_out] + t1[r_in]``;
        for an SVD it is exactly ``t[r]``."""
        out = []
        for s in self.spectra():
            total = max(float(s.sum()), 1e-30)
            kept = np.concatenate([[0.0], np.cumsum(s)])
            out.append(np.clip((total - kept) / total, 0.0, 1.0))
        return out

    def est_err2(self, ranks) -> float:
        t = self.tail_fractions()
        return float(sum(ti[min(int(r), len(ti) - 1)] for ti, r in zip(t, ranks)))


@torch.no_grad()
def find_layers(model: nn.Module, image_size: int, in_chans: int, cfg) -> tuple[list[Layer], list[dict]]:
    """Decomposable layers and the ones left alone (``{"name", "type", "shape", "reason"}``)."""
    seen: dict[str, list] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            def hook(mod, inp, out, name=name):
                seen.setdefault(name, []).append((tuple(inp[0].shape), tuple(out.shape)))
            hooks.append(m.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        p = next(model.parameters())
        model(torch.zeros(1, in_chans, image_size, image_size, device=p.device, dtype=p.dtype))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)

    layers: list[Layer] = []
    skipped: list[dict] = []
    ids: dict[int, str] = {}
    exclude = list(getattr(cfg, "exclude", []) or [])
    min_ch = int(getattr(cfg, "min_channels", 1))
    for name, m in model.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Linear)):
            continue
        shape = list(m.weight.shape)

        def skip(reason: str) -> None:
            skipped.append({"name": name, "type": type(m).__name__, "shape": shape, "reason": reason})

        if id(m) in ids:
            skip(f"shared with {ids[id(m)]}")
            continue
        ids[id(m)] = name
        if any(fnmatch.fnmatchcase(name, pat) for pat in exclude):
            skip("excluded by decompose.exclude")
            continue
        calls = seen.get(name, [])
        if not calls:
            skip("not used in the forward pass")
            continue
        if len(calls) > 1:
            skip(f"called {len(calls)} times per forward")
            continue
        (ishape, oshape), = calls
        if isinstance(m, nn.Linear):
            if type(m) is not nn.Linear:
                skip(f"{type(m).__name__} is not a plain nn.Linear")
                continue
            if not getattr(cfg, "linear", True):
                skip("linear layer (decompose.linear=false)")
                continue
            c_in, c_out = m.in_features, m.out_features
            if min(c_in, c_out) < min_ch:
                skip(f"tiny (fewer than decompose.min_channels={min_ch} features)")
                continue
            positions = int(np.prod(ishape[:-1])) if len(ishape) > 1 else 1
            macs = M.linear_macs(c_in, c_out, positions, bias=m.bias is not None)
            layer = Layer(name, "svd_linear", m, c_in, c_out, (1, 1), (1, 1), (1, 1), positions,
                          m.bias is not None, macs)
        else:
            if len(ishape) != 4:
                skip("unbatched input")
                continue
            c_in, c_out = m.in_channels, m.out_channels
            pointwise = tuple(m.kernel_size) == (1, 1)
            why = is_pointwise_candidate(m) if pointwise else is_tucker_candidate(m)
            if why:
                skip(why)
                continue
            if pointwise and not getattr(cfg, "pointwise", True):
                skip("1x1 convolution (decompose.pointwise=false)")
                continue
            if (min(c_in, c_out) if pointwise else max(c_in, c_out)) < min_ch:
                skip(f"tiny (fewer than decompose.min_channels={min_ch} channels)")
                continue
            in_hw, out_hw = (int(ishape[2]), int(ishape[3])), (int(oshape[2]), int(oshape[3]))
            macs = M.conv_macs(c_in, c_out, tuple(m.kernel_size), out_hw, groups=m.groups, bias=m.bias is not None)
            layer = Layer(name, "svd_conv" if pointwise else "tucker2", m, c_in, c_out, tuple(m.kernel_size),
                          in_hw, out_hw, 1, m.bias is not None, macs)
        # is there any allowed rank at which the decomposition is cheaper?
        lowest = tuple(int(layer.allowed_ranks(i, cfg)[0]) for i in range(len(layer.modes)))
        if layer.macs_at(lowest) >= layer.macs:
            skip("no rank would save MACs")
            continue
        layers.append(layer)
    return layers, skipped
