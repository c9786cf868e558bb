"""The model zoo: ``create_model(name, num_classes, in_chans, width=..., **kwargs)``."""
from edgeus.models.registry import create_model, list_models, register_model

__all__ = ["create_model", "list_models", "register_model"]
