"""Run a recipe end to end over one run directory.

    edgeus compress recipe=rsmas_int8                                  # built-in phantom data
    edgeus compress recipe=rsmas_int8 data=busi data.root=/data/BUSI target=jetson_orin_nano profile=full
    edgeus compress resume=runs/rsmas_int8-20261123-101500-a1b2c3      # continue after an interruption
    edgeus compress resume=runs/<run> prune.finetune_epochs=40         # change a stage: it and later ones run again
    edgeus compress resume=runs/<run> stages=[quantize,build,bench,package]   # re-run some stages
    edgeus compress recipe=rsmas_int8 --json                           # a JSON summary on stdout

Stages: teacher (train, or teacher.checkpoint=<ckpt> to load) -> prune -> distill -> decompose ->
export -> quantize -> build -> bench -> package, as the recipe lists them. Each stage writes into
runs/<recipe>-<time>-<suffix>/NN-<stage>/ and adds a row to ledger.json / ledger.md (parameters, MACs,
bytes, ONNX Runtime CPU latency against the teacher, accuracy, macro-F1, per-class recall, AUC,
ECE, wall time); a disabled stage is a 'skipped' row. The run directory also holds config.yaml,
state.json, run.log, command.txt and, once made, student.fp32.onnx / student.int8.onnx.

A new run never writes into an existing folder (out= must be new or empty) and never replaces a
bundle (package.out=) without package.overwrite=true. resume= continues only the same run on the
same data; it applies settings of the stages after the teacher (the changed stage and every later
one run again) and measurement / report settings, and refuses every other override by name.

The recipe's gates (gates.max_accuracy_drop, gates.max_recall_drop, gates.max_ece_rise) end the run
with exit code 3 when a student falls short; the artifacts stay, no bundle is written, and every
resume exits 3 again until the failed stage's settings change.
At the end: robustness under ultrasound corruptions, report.md, a self-contained report.html and a
three-line headline (size, speed, accuracy of the final student against the teacher).

Exit codes: 0 ok, 2 usage / configuration, 3 gate failed, 4 bad input (data, checkpoint, run
directory), 5 verification failed, 7 disk full, 130 interrupted.
"""
from edgeus.errors import GateError

USAGE = ("recipe=<name> [data=...] [target=...] [profile=...] [resume=<run>] [stages=[...]] [key=value ...] "
         "[--json] [-q|-v]")


def run(cfg, args):
    import contextlib
    import json
    import sys

    from edgeus.errors import UsageError
    from edgeus.pipeline.runner import compress, main_summary

    as_json = "--json" in args
    rest = [a for a in args if a != "--json"]
    if rest:
        raise UsageError(f"edgeus compress takes key=value arguments (and --json, -q, -v) only; got {rest}")
    code, result, error = 0, None, None
    try:
        if as_json:   # progress on stderr, the summary alone on stdout
            with contextlib.redirect_stdout(sys.stderr):
                result = compress(cfg)
        else:
            result = compress(cfg)
    except GateError as e:
        code, error, result = GateError.exit_code, str(e), getattr(e, "result", None)
        print(f"edgeus compress: {e}", file=sys.stderr)
    except KeyboardInterrupt:
        return 130     # the runner said how to continue (resume=<run dir>)
    if as_json:
        print(json.dumps({"ok": code == 0, "exit_code": code, "error": error, **(result or {})}, indent=1,
                         default=str))
    elif result is not None:
        print(main_summary(result))
    return code
