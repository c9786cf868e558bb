"""The ``edgeus`` command line: thin parsing over the Python API.

    edgeus <command> [positional ...] [group=option ...] [dotted.key=value ...]

Config groups: ``recipe=`` (recipes/*.yaml), ``data=`` (phantom | busi | tmed2 | folder),
``target=`` (targets/*.yaml), ``profile=`` (a recipe's profile). Everything else is a dotted
override of the typed config (``train.epochs=3``, ``data.root=/data/BUSI``). Each command lives in
``edgeus/commands/<name>.py`` and is imported only when it runs, so a command whose optional
dependency is missing still lists and fails only when used.
"""
from __future__ import annotations

import importlib
import logging
import sys

COMMANDS: dict[str, str] = {
    "train": "Train a classifier (teacher or student) on a dataset",
    "eval": "Evaluate a checkpoint or ONNX model: accuracy, per-class recall, F1, AUC, ECE",
    "models": "List the model zoo with parameters and MACs",
    "recipes": "List recipes, or show one: edgeus recipes rsmas_int8",
    "targets": "List deployment targets, or show one: edgeus targets jetson_orin_nano",
    "compress": "Run a recipe end to end: teacher -> prune -> distill -> decompose -> quantize -> ...",
    "prune": "Structured / unstructured / 2:4 pruning of a checkpoint",
    "distill": "Train a student from a teacher with knowledge distillation",
    "decompose": "Tucker-2 / SVD low-rank decomposition of a checkpoint",
    "export": "Export a checkpoint to ONNX (simplified, checked, parity-tested)",
    "quantize": "INT8 quantisation of an ONNX model for a target (calibrated Q/DQ)",
    "build": "Build a TensorRT engine (or prepare the build for the device when TensorRT is absent)",
    "bench": "Latency / throughput benchmark of models on a backend; compare mode gives ratios",
    "package": "Write a firmware bundle from a run directory",
    "verify": "Verify a firmware bundle: checksums, schema, compatibility, golden outputs",
    "keygen": "Make an Ed25519 key pair that signs firmware bundles (package.sign_key=, verify --key)",
    "config": "Print the resolved configuration of the same arguments: edgeus config recipe=rsmas_int8 ...",
    "predict": "Classify images with a bundle, ONNX model, engine or checkpoint; Grad-CAM overlays with --cam DIR",
    "view": "Desktop viewer (needs the [app] extra): teacher vs student predictions and saliency side by side",
}

USAGE = """usage: edgeus <command> [args] [key=value ...]

Compress ultrasound image classifiers into small, fast, trustworthy INT8 engines.

commands:
{commands}

Config groups: recipe=<name>  data=phantom|busi|tmed2|folder  target=<name>  profile=<name>
Overrides:     dotted keys, e.g. train.epochs=3 data.root=/data/BUSI model.name=rsmas
Options:       -q / --quiet (warnings and results only)   -v / --verbose (debug log)
Help:          edgeus <command> --help    |    edgeus recipes    |    edgeus targets

Exit codes:    0 ok, 1 unexpected error (a bug), 2 usage or configuration, 3 clinical gate failed,
               4 bad input (data, model, checkpoint, run directory), 5 verification failed,
               6 optional dependency missing, 7 disk full / cannot write, 130 interrupted

Example:       edgeus compress recipe=rsmas_int8
"""


def _usage() -> str:
    width = max(map(len, COMMANDS))
    return USAGE.format(commands="\n".join(f"  {k.ljust(width)}  {v}" for k, v in COMMANDS.items()))


def _command_module(name: str):
    return importlib.import_module(f"edgeus.commands.{name}")


def _verbosity(argv: list[str]) -> tuple[list[str], int]:
    """Remove -q/--quiet and -v/--verbose from ``argv``; return (argv, level: -1 quiet, 0, 1 verbose)."""
    level, rest = 0, []
    for a in argv:
        if a in ("-q", "--quiet"):
            level = -1
        elif a in ("-v", "--verbose"):
            level = 1
        else:
            rest.append(a)
    return rest, level


def _setup_output(level: int) -> None:
    import os

    logging.basicConfig(level={-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}[level],
                        format="%(levelname)s %(name)s: %(message)s")
    if level < 0 or not sys.stderr.isatty():
        os.environ.setdefault("TQDM_DISABLE", "1")   # progress bars only on a terminal
    if level < 0:
        os.environ.setdefault("EDGEUS_QUIET", "1")


def main(argv: list[str] | None = None) -> int:
    import edgeus.threads; edgeus.threads.configure()  # noqa: E702  before torch loads: no spinning on a shared CPU
    argv, level = _verbosity(list(sys.argv[1:] if argv is None else argv))
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        from edgeus import __version__

        print(f"edgeus {__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        import difflib

        close = difflib.get_close_matches(name, COMMANDS, n=2)
        print(f"edgeus: unknown command {name!r}." + (f" Did you mean {' or '.join(close)}?" if close else ""),
              file=sys.stderr)
        print(_usage(), file=sys.stderr)
        return 2
    module = _command_module(name)
    if any(a in ("-h", "--help") for a in rest):
        print(f"usage: edgeus {name} {getattr(module, 'USAGE', '[key=value ...]')}\n")
        print((module.__doc__ or COMMANDS[name]).strip())
        return 0
    _setup_output(level)
    from edgeus.config import ConfigError, compose, split_args, validate
    from edgeus.errors import EdgeusError, disk_full, exit_code

    positional, overrides = split_args(rest)
    try:
        cfg = validate(compose(overrides, defaults=getattr(module, "DEFAULTS", None)))
        return int(module.run(cfg, positional) or 0)
    except (ConfigError, EdgeusError) as e:
        print(f"edgeus {name}: error: {e}", file=sys.stderr)
        return exit_code(e)
    except KeyboardInterrupt:
        print(f"\nedgeus {name}: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        if not disk_full(e):
            raise
        print(f"edgeus {name}: error: the disk is full ({e.filename or 'writing a file'}): free space and run "
              f"again{' (a compress run continues with resume=<run dir>)' if name == 'compress' else ''}",
              file=sys.stderr)
        return exit_code(e)
    except BrokenPipeError:  # output piped into `head` and closed: not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
