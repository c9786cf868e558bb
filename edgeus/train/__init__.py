"""Training: ``fit`` for any trainable, ``Supervised`` (weighted CE), checkpoints.

Fine-tuning with (or without) a teacher is :func:`edgeus.finetune.make_finetuner`."""
from edgeus.train.checkpoint import load_checkpoint, save_checkpoint
from edgeus.train.trainer import FitResult, Supervised, fit

__all__ = ["FitResult", "Supervised", "fit", "load_checkpoint", "save_checkpoint"]
