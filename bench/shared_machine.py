"""The main command's teacher stage on a quiet machine and beside one competing CPU-bound process.
Writes bench/results/shared_machine.{json,md}.

    python bench/shared_machine.py                      # quiet, then with one competitor
    python bench/shared_machine.py --unconfigured       # also with the competitor and EDGEUS_THREADS=off
                                                        # (PyTorch's default threads: what issue 19 measured)
    python bench/shared_machine.py --set train.epochs=1 --results /tmp/sm   # a quick check of the script

The goal (issue 19.6): the teacher stage with one competing process within 2x of its quiet time.
``edgeus.threads.configure`` (called first thing by the CLI) sees the competitor (load average and
the cores busy right now), gives OpenMP only the free cores and makes idle threads wait passively.

Each run is ``edgeus compress recipe=rsmas_int8 stages=[teacher] out=<temp dir>`` in a subprocess
(the README's main command, its first stage), timed wall-clock. The competitor is one process
spinning in pure Python (one core's worth of CPU-bound work); it starts ``--warm`` seconds before the
timed run and is stopped (by its own pid) right after. Run it when nothing else loads the machine:
the script records the load average before each run and refuses (exit 3) when the machine is
already busy, unless ``--force``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SPIN = "import time\nt = time.time()\nwhile True:\n    pass\n"


def _teacher_run(overrides: list[str], env: dict, log: Path) -> dict:
    out = Path(tempfile.mkdtemp(prefix="edgeus-shared-")) / "run"
    cmd = [sys.executable, "-m", "edgeus.cli", "compress", "recipe=rsmas_int8", "stages=[teacher]",
           f"out={out}", *overrides]
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(cmd)}\n")
        f.flush()
        r = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    ledger = out / "ledger.json"
    acc = None
    if ledger.is_file():
        rows = json.loads(ledger.read_text())["rows"]
        acc = next((x["metrics"]["accuracy"] for x in rows if x["stage"] == "teacher" and x.get("metrics")), None)
    shutil.rmtree(out.parent, ignore_errors=True)
    return {"wall_s": wall, "returncode": r.returncode, "teacher_accuracy": acc, "load_before": load_before,
            "load_after": os.getloadavg()[0]}


def _with_competitor(fn, warm: float):
    comp = subprocess.Popen([sys.executable, "-c", SPIN], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(warm)
        return fn()
    finally:
        comp.kill()
        comp.wait()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", action="append", default=[], help="extra key=value overrides of the teacher stage")
    ap.add_argument("--warm", type=float, default=5.0, help="seconds the competitor runs before the timed run")
    ap.add_argument("--unconfigured", action="store_true",
                    help="also time the competitor case with EDGEUS_THREADS=off (PyTorch's own thread defaults)")
    ap.add_argument("--results", default=str(HERE / "results" / "shared_machine"),
                    help="results path without suffix")
    ap.add_argument("--force", action="store_true", help="run even when the machine is already busy")
    args = ap.parse_args(argv)

    sys.path.insert(0, str(HERE.parent))
    from edgeus.threads import busy_cores, plan, usable_cores

    cores = usable_cores()
    busy = busy_cores(0.5) or 0.0
    if busy > 0.5 and not args.force:
        print(f"the machine is busy ({busy:.1f} of {cores} cores in use, load {os.getloadavg()[0]:.2f}): a quiet "
              "time measured now would not be quiet. Run again when it is idle, or --force.", file=sys.stderr)
        return 3
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY",
                                                             "EDGEUS_THREADS")}
    env["TQDM_DISABLE"] = "1"
    res_path = Path(args.results)
    res_path.parent.mkdir(parents=True, exist_ok=True)
    log = res_path.with_suffix(".log")
    log.write_text("")
    runs = {}
    print("quiet ...", flush=True)
    runs["quiet"] = _teacher_run(args.set, env, log)
    print(f"  {runs['quiet']['wall_s']:.1f} s", flush=True)
    print("one competing CPU-bound process ...", flush=True)
    runs["competitor"] = _with_competitor(lambda: _teacher_run(args.set, env, log), args.warm)
    print(f"  {runs['competitor']['wall_s']:.1f} s", flush=True)
    if args.unconfigured:
        print("one competing process, EDGEUS_THREADS=off ...", flush=True)
        runs["competitor_unconfigured"] = _with_competitor(
            lambda: _teacher_run(args.set, {**env, "EDGEUS_THREADS": "off"}, log), args.warm)
        print(f"  {runs['competitor_unconfigured']['wall_s']:.1f} s", flush=True)
    quiet = runs["quiet"]["wall_s"]
    for r in runs.values():
        r["ratio_vs_quiet"] = r["wall_s"] / quiet if quiet else None
    ratio = runs["competitor"]["ratio_vs_quiet"]
    ok = all(r["returncode"] == 0 for r in runs.values())
    result = {
        "bench": "shared_machine", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "command": "edgeus compress recipe=rsmas_int8 stages=[teacher] " + " ".join(args.set),
        "machine": {"platform": platform.platform(), "cores": cores, "python": platform.python_version()},
        "plan_with_one_competitor": plan(cores=cores, load=1.0, environ={}).describe(),
        "runs": runs, "goal": "competitor within 2x of quiet", "within_goal": bool(ok and ratio is not None and ratio <= 2.0),
    }
    res_path.with_suffix(".json").write_text(json.dumps(result, indent=1))
    md = ["# Shared machine: the main command's teacher stage, quiet and beside a competing process", "",
          f"- created: {result['created']}", f"- machine: {result['machine']['platform']}, {cores} usable core(s)",
          f"- command: `{result['command']}` (written by `python bench/shared_machine.py"
          + "".join(f" --set {s}" for s in args.set) + (" --unconfigured" if args.unconfigured else "") + "`)",
          f"- competitor: one pure-Python spinning process, started {args.warm:g} s before the timed run",
          f"- edgeus.threads with one competitor: {result['plan_with_one_competitor']}", "",
          "| case | wall s | × quiet | teacher test accuracy | load before | exit |", "|---|---|---|---|---|---|"]
    names = {"quiet": "quiet", "competitor": "one competitor (edgeus.threads on)",
             "competitor_unconfigured": "one competitor, EDGEUS_THREADS=off (torch defaults)"}
    for k, r in runs.items():
        acc = "–" if r["teacher_accuracy"] is None else f"{r['teacher_accuracy']:.3f}"
        md.append(f"| {names[k]} | {r['wall_s']:.1f} | {r['ratio_vs_quiet']:.2f}× | {acc} | {r['load_before']:.2f} | "
                  f"{r['returncode']} |")
    md += ["", f"Goal: one competitor within 2× of quiet — **{'met' if result['within_goal'] else 'NOT met'}** "
           f"({ratio:.2f}×)." if ratio is not None else "", ""]
    res_path.with_suffix(".md").write_text("\n".join(md))
    print("\n".join(md))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
