"""Low-rank decomposition: Tucker-2 of k x k convolutions, truncated SVD of linears and 1x1
convolutions, rank selection (ratio, energy, VBMF, global MACs budget), then fine-tuning.

    from edgeus.decompose import decompose_model
    ft = make_finetuner(cfg, bundle, teacher=teacher)                   # edgeus.finetune (optional)
    student, report = decompose_model(model, cfg.decompose, image_size=64, in_chans=1, finetune=ft,
                                      calib_loader=ft.loaders["train_plain"])

Imports are lazy: ``edgeus.config`` imports ``edgeus.decompose.config`` and must not pull in torch.
"""
from __future__ import annotations

from edgeus.lazy import lazy_exports

_EXPORTS = {
    "decompose_model": "edgeus.decompose.api",
    "decompose_layers": "edgeus.decompose.api",
    "format_table": "edgeus.decompose.api",
    "decompose_conv": "edgeus.decompose.tucker",
    "decompose_linear": "edgeus.decompose.svd",
    "decompose_pointwise": "edgeus.decompose.svd",
    "evbmf": "edgeus.decompose.vbmf",
    "evbmf_rank": "edgeus.decompose.vbmf",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)
