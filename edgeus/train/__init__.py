"""Training: ``fit`` for any trainable, ``Supervised`` (weighted CE), ``finetune``, checkpoints."""
from edgeus.train.checkpoint import load_checkpoint, save_checkpoint
from edgeus.train.trainer import FitResult, Supervised, finetune, fit

__all__ = ["FitResult", "Supervised", "finetune", "fit", "load_checkpoint", "save_checkpoint"]
