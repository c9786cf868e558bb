"""Errors that reach the user as a one-line message (no traceback) from the CLI."""


class EdgeusError(RuntimeError):
    """Base class: bad input or an impossible request, explained in the message."""


class DataError(EdgeusError):
    """A dataset cannot be read: missing root, wrong layout, empty class, no readable images."""


class CheckpointError(EdgeusError):
    """A checkpoint cannot be loaded: wrong architecture, corrupt file, incompatible format."""


class MissingDependencyError(EdgeusError):
    """An optional dependency (TensorRT, pycuda, neural-compressor) is needed and not installed."""


class GateError(EdgeusError):
    """A clinical gate of the recipe failed (accuracy, per-class recall or calibration)."""
