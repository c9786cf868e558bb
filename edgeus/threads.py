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
  (``usable - demand``, at least 1) when others use some of them; the demand is the larger of the
  1-minute load average and the cores busy right now (``/proc/stat`` over 0.1 s: the load average
  lags a job that started a minute ago).

A value the user set is never overwritten. This module imports nothing heavy (no torch, no numpy):
it must run before they load, because OpenMP reads its environment once.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

ENV_KEYS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OMP_WAIT_POLICY")


@dataclass
class ThreadPlan:
    cores: int                        # CPUs this process may run on (affinity)
    load: float                       # cores' worth of work other processes want
    oversubscribed: bool              # shared: fewer free cores than usable ones
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


def _cpu_times() -> tuple[float, float] | None:
    try:
        with open("/proc/stat") as f:
            vals = [float(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0.0)     # idle + iowait
    return sum(vals[:8]), idle


def busy_cores(window_s: float = 0.1) -> float | None:
    """How many cores other processes keep busy right now (machine-wide /proc/stat over ``window_s``;
    this process sleeps meanwhile). The 1-minute load average lags a job that just started by a
    minute; this does not. None where /proc/stat is not readable."""
    import time

    a = _cpu_times()
    if a is None:
        return None
    time.sleep(window_s)
    b = _cpu_times()
    total, idle = b[0] - a[0], b[1] - a[1]
    if total <= 0:
        return None
    return (1.0 - idle / total) * (os.cpu_count() or 1)


def demand() -> float:
    """Cores' worth of work other processes want: the larger of the 1-minute load average and what
    they use right now."""
    return max(load_average(), busy_cores() or 0.0)


def plan(cores: int | None = None, load: float | None = None, environ: dict | None = None) -> ThreadPlan:
    """Decide the thread settings (pure given ``cores`` and ``load``: reads ``environ``, changes nothing).

    ``load``: cores' worth of work that other processes want (default :func:`demand`). The free
    cores are ``cores - load`` rounded, at least 1; when that is fewer than ``cores`` the machine is
    shared: OpenMP gets that many threads (a thread on a core someone else uses makes every
    parallel region wait for it) and waits passively (a spinning thread steals the slices that
    the working threads and the other jobs need)."""
    environ = os.environ if environ is None else environ
    cores = usable_cores() if cores is None else max(1, int(cores))
    load = demand() if load is None else float(load)
    free = max(1, min(cores, int(cores - load + 0.5)))
    shared = free < cores
    env = {}
    if "OMP_WAIT_POLICY" not in environ and (shared or cores <= 4):
        env["OMP_WAIT_POLICY"] = "PASSIVE"
    if shared:
        for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            if k not in environ:
                env[k] = str(free)
    try:
        threads = int(environ.get("OMP_NUM_THREADS") or env.get("OMP_NUM_THREADS") or free)
    except ValueError:
        threads = free
    reason = (f"shared: others want {load:.1f} of {cores} core(s), {free} free" if shared
              else f"not shared: others want {load:.1f} of {cores} core(s)")
    return ThreadPlan(cores=cores, load=load, oversubscribed=shared, threads=threads, env=env, reason=reason)


def configure(environ: dict | None = None, **kw) -> ThreadPlan:
    """Apply :func:`plan` to the environment (call before torch / onnxruntime are imported).

    ``EDGEUS_THREADS=off`` leaves everything as it is (to measure the difference). If torch is
    already imported its intra-op thread count is lowered too (the wait policy can no longer
    change then)."""
    environ = os.environ if environ is None else environ
    if environ.get("EDGEUS_THREADS", "").lower() in ("off", "0", "no", "false"):
        return ThreadPlan(cores=usable_cores(), load=0.0, oversubscribed=False, threads=0, reason="EDGEUS_THREADS=off")
    p = plan(environ=environ, **kw)
    environ.update(p.env)
    import logging
    import sys

    if p.env:
        logging.getLogger("edgeus.threads").debug(p.describe())
    torch = sys.modules.get("torch")
    if torch is not None and "OMP_NUM_THREADS" in p.env:
        try:
            torch.set_num_threads(p.threads)
        except Exception:  # pragma: no cover
            pass
    return p


__all__ = ["ThreadPlan", "plan", "configure", "usable_cores", "load_average", "busy_cores", "demand"]
