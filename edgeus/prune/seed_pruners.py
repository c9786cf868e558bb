"""Block pruners for the seed review's lightweight modules (issue 20.6): the Ghost module.

``GhostModule`` (``edgeus.models.layers``) outputs ``cat([x1, dw(x1)])``: channel ``j`` and channel
``j + C/2`` both come from intrinsic channel ``j``. Traced natively, torch-pruning reaches that
concatenation from the primary conv and again from the depth-wise conv and prunes it once per root,
cutting far more than the ratio asks (48 -> 8 channels at ratio 0.4 in a MobileNetV2 block). As a
block it is one node from the primary conv's input channels to ``C`` output channels in two channel
groups (``get_out_channel_groups = 2``), so the graph removes ``j`` and ``j + C/2`` together and
:meth:`GhostModulePruner.prune_out_channels` cuts the intrinsic channel ``j`` everywhere inside.

``CoordinateAttention`` needs no pruner: its gates are element-wise and the graph follows it (its
hidden ``mip`` channels are pruned like any conv's).

Imported (for its registration) by :mod:`edgeus.prune.structured`, the registry's user; the registry
itself is in :mod:`edgeus.prune.custom_pruners`, which this module imports (one direction: no cycle).
"""
from __future__ import annotations

import torch.nn as nn

from edgeus.prune.custom_pruners import (BlockPruner, block_pruner, conv_keep_in, conv_keep_out, dwconv_keep, keep_from,
                                         norm_keep)


@block_pruner("edgeus.models.layers", "GhostModule")
class GhostModulePruner(BlockPruner):
    """Ghost module: input channels are the primary conv's; output channels come in pairs (j, j + C/2)."""

    def stride(self, layer) -> int:
        s = layer.primary_conv[0].stride
        return int(s[0] if isinstance(s, tuple) else s)

    def get_in_channels(self, layer):
        return layer.primary_conv[0].in_channels

    def get_out_channels(self, layer):
        return 2 * layer.primary_conv[0].out_channels

    def get_in_channel_groups(self, layer):
        return 1

    def get_out_channel_groups(self, layer):
        return 2

    def prune_in_channels(self, layer, idxs):
        conv = layer.primary_conv[0]
        conv_keep_in(conv, keep_from(conv.in_channels, idxs))
        return layer

    def prune_out_channels(self, layer, idxs):
        init = layer.primary_conv[0].out_channels
        drop = {int(i) % init for i in idxs}       # j and j + init name the same intrinsic channel
        keep = keep_from(init, sorted(drop))
        if not keep:
            raise ValueError("GhostModule output pruning would remove every channel")
        conv_keep_out(layer.primary_conv[0], keep)
        norm_keep(layer.primary_conv[1], keep)
        dwconv_keep(layer.cheap_operation[0], keep)
        norm_keep(layer.cheap_operation[1], keep)
        return layer

    def prune_internal(self, layer: nn.Module, ratio: float, multiple: int = 1) -> dict:
        return {}
