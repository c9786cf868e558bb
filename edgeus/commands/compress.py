"""Run a recipe end to end over one run directory.

    edgeus compress recipe=rsmas_int8                                  # built-in phantom data
    edgeus compress recipe=rsmas_int8 data=busi data.root=/data/BUSI target=jetson_orin_nano profile=full
    edgeus compress resume=runs/rsmas_int8-20261123-101500             # continue after an interruption
    edgeus compress resume=runs/<run> stages=[quantize,build,bench,package]   # re-run some stages

Stages: teacher (train, or teacher.checkpoint=<ckpt> to load) -> prune -> distill -> decompose ->
export -> quantize -> build -> bench -> package, as the recipe lists them. Each stage writes into
runs/<recipe>-<time>/NN-<stage>/ and adds a row to ledger.json / ledger.md (parameters, MACs,
bytes, ONNX Runtime CPU latency against the teacher, accuracy, macro-F1, per-class recall, AUC,
ECE, wall time). The recipe's gates (gates.max_accuracy_drop, gates.max_recall_drop,
gates.max_ece_rise) end the run with exit code 3 when a student falls short; the artifacts stay.
At the end: robustness under ultrasound corruptions, report.md and a self-contained report.html.
"""
from edgeus.errors import GateError

USAGE = "recipe=<name> [data=...] [target=...] [profile=...] [resume=<run>] [stages=[...]] [key=value ...]"


def run(cfg, args):
    import sys

    from edgeus.pipeline.runner import compress, main_summary

    if args:
        raise SystemExit(f"edgeus compress takes key=value arguments only (got {args})")
    try:
        result = compress(cfg)
    except GateError as e:
        print(f"edgeus compress: {e}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("\nedgeus compress: interrupted; finished stages are kept — continue with "
              "edgeus compress resume=<run dir printed above>", file=sys.stderr)
        return 130
    print(main_summary(result))
    return 0
