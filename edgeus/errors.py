"""Errors that reach the user as a one-line message (no traceback) from the CLI, and the exit codes.

Exit codes of every ``edgeus`` command (the CLI maps each error class to one):

    0    success
    1    an unexpected error (a bug: Python's traceback is shown)
    2    usage or configuration: unknown command or key, a value out of range, wrong arguments,
         a setting that cannot work (EdgeusError, UsageError, ConfigError)
    3    a clinical gate failed (the run's artifacts are kept; no bundle is written)
    4    bad input: data, model, checkpoint, ONNX file or run directory cannot be used as given
         (InputError, DataError, CheckpointError); edgeus eval refusing to score a model on images it
         was trained, validated or calibrated on (DataLeakError)
    5    verification failed: a bundle or model does not match what it claims
    6    an optional dependency is missing (TensorRT, pycuda, ...)
    7    the disk is full or a file cannot be written
    130  interrupted (Ctrl-C); a compress run continues with resume=<run dir>
"""
import errno

EXIT_OK, EXIT_BUG, EXIT_USAGE, EXIT_GATE, EXIT_INPUT, EXIT_VERIFY, EXIT_DEPENDENCY, EXIT_DISK, EXIT_INTERRUPT = \
    0, 1, 2, 3, 4, 5, 6, 7, 130


class EdgeusError(RuntimeError):
    """Base class: an impossible request (a setting or argument that cannot work), explained in the
    message. Exit code 2; the subclasses below say more precisely what went wrong."""
    exit_code = EXIT_USAGE


class UsageError(EdgeusError):
    """The command was called wrongly (arguments, a setting that cannot apply here)."""
    exit_code = EXIT_USAGE


class InputError(EdgeusError):
    """An input file or directory cannot be used as given (data, checkpoint, ONNX, run directory)."""
    exit_code = EXIT_INPUT


class DataError(InputError):
    """A dataset cannot be read: missing root, wrong layout, empty class, no readable images."""


class CheckpointError(InputError):
    """A checkpoint cannot be loaded: wrong architecture, corrupt file, incompatible format."""


class DataLeakError(InputError):
    """``edgeus eval`` would score a model on images it was trained, validated or calibrated on, or cannot
    show that it would not (its split cannot be reproduced). Exit code 4; ``eval.allow_overlap=true``
    scores anyway."""


class MissingDependencyError(EdgeusError):
    """An optional dependency (TensorRT, pycuda, neural-compressor) is needed and not installed."""
    exit_code = EXIT_DEPENDENCY


class GateError(EdgeusError):
    """A clinical gate of the recipe failed (accuracy, per-class recall or calibration)."""
    exit_code = EXIT_GATE


class ConfigError(ValueError):
    """A configuration the user gave cannot be used; the message says what to change."""
    exit_code = EXIT_USAGE


class VerificationError(EdgeusError):
    """A bundle or model does not verify (checksums, manifest, signature, golden outputs)."""
    exit_code = EXIT_VERIFY


def exit_code(exc: BaseException) -> int:
    """The documented exit code for an exception that reached the command line."""
    if isinstance(exc, KeyboardInterrupt):
        return EXIT_INTERRUPT
    code = getattr(exc, "exit_code", None)
    if isinstance(code, int):
        return code
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return EXIT_DISK
    return EXIT_BUG


def disk_full(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT)
