"""Thread settings that do not collapse on a shared machine.

PyTorch's OpenMP runtime by default starts one thread per core and lets each *spin* while it waits
for work (``OMP_WAIT_POLICY=ACTIVE`` behaviour in libgomp). On a machine where other processes want
the same cores, the spinning threads take the time slices that the thread doing the actual work
needs, and every parallel region waits for its slowest thread: a 2-core machine with two other
jobs ran the main command 10x slower than quiet (issue 19).

:func:`configure` looks at the CPUs this process may use (``os.sched_getaffinity``) and at the
load average (``os.getloadavg``), and before torch is imported sets:

* ``OMP_WAIT_POLICY=PASSIVE`` (idle threads sleep instead of spinning) whenever the machine is
  shared (load above what it can take) — harmless on a quiet machine, so it is also set when only
  a few cores are available;
* ``OMP_NUM_THREADS`` / ``MKL_NUM_THREADS`` to the cores that are actually free
  (``usable - load``, at least 1) when the machine is oversubscribed.

A value the user set is never overwritten. This module imports nothing heavy (no torch, no numpy):
it must run before they load, because OpenMP reads its environment once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

OVERSUBSCRIBED = 1.0    # load average per usable core above which the machine counts as shared
ENV_KEYS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")


@dataclass
class ThreadPlan:
    cores: int                        # CPUs this process may run on (affinity)
    load: float                       # 1-minute load average (runnable processes, machine-wide)
    oversubscribed: bool
    threads: int                      # intra-op threads chosen
    env: dict = field(default_factory=dict)   # what configure() set (keys it left alone are absent)
    reason: str = ""

    def describe(self) -> str:
        set_ = ", ".join(f"{k}={v}" for k, v in self.env.items()) or "nothing changed"
        return f"threads: {self.cores} usable core(s), load {self.load:.2f} ({self.reason}); {set_}"


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


def load_average() -> float:
    try:
        return float(os.getloadavg()[0])
    except (AttributeError, OSError):  # pragma: no cover
        return 0.0


def plan(cores: int | None = None, load: float | None = None, environ: dict | None = None) -> ThreadPlan:
    """Decide the thread settings (pure: reads ``environ``, changes nothing)."""
    environ = os.environ if environ is None else environ
    cores = usable_cores() if cores is None else max(1, int(cores))
    load = load_average() if load is None else float(load)
    # our own process is not running yet when the CLI starts, so the load is the others' demand
    over = load > OVERSUBSCRIBED * cores
    free = max(1, int(cores - load + 0.5)) if over else cores
    env = {}
    if "OMP_WAIT_POLICY" not in environ and (over or cores <= 4):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if over:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            if k not in environ:
                env[k] = str(free)
    threads = int(environ.get("OMP_NUM_THREADS", env.get("OMP_NUM_THREADS", free)) or free)
    reason = (f"oversubscribed: others use {load:.1f} of {cores} core(s), {free} left" if over
              else "not oversubscribed")
    return ThreadPlan(cores=cores, load=load, oversubscribed=over, threads=threads, env=env, reason=reason)


def configure(environ: dict | None = None, **kw) -> ThreadPlan:
    """Apply :func:`plan` to the environment (call before torch / onnxruntime are imported).

    If torch is already imported its intra-op thread count is lowered too (the wait policy can
    no longer change then)."""
    environ = os.environ if environ is None else environ
    p = plan(environ=environ, **kw)
    environ.update(p.env)
    import sys

    torch = sys.modules.get("torch")
    if torch is not None and p.oversubscribed and "OMP_NUM_THREADS" in p.env:
        try:
            torch.set_num_threads(p.threads)
        except Exception:  # pragma: no cover
            pass
    return p


__all__ = ["ThreadPlan", "plan", "configure", "usable_cores", "load_average"]
