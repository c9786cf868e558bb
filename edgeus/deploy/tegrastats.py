"""Jetson power and clock state: ``tegrastats`` sampling in a thread, ``nvpmodel -q``, ``jetson_clocks --show``.

Everything here is a no-op off Jetson (the binaries are absent); the parsers are pure functions.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import threading
import time
from typing import Any

# "VDD_IN 5112mW/5112mW" (JetPack 5/6) or "VDD_IN 4375/4375" (older, mW without unit)
_RAIL = re.compile(r"\b([A-Z][A-Z0-9_]*)\s+(\d+)(?:mW)?/(\d+)(?:mW)?")
_GPU = re.compile(r"GR3D_FREQ\s+(\d+)%")
_RAM = re.compile(r"RAM\s+(\d+)/(\d+)MB")
TOTAL_RAILS = ("VDD_IN", "POM_5V_IN", "VDD_SYS_5V0")   # whole-module input rail, by module generation


def available() -> bool:
    return shutil.which("tegrastats") is not None


def parse_line(line: str) -> dict[str, Any]:
    """One tegrastats line -> {"power_mw": {rail: current}, "total_mw", "gpu_util", "ram_used_mb"}."""
    rails = {}
    for name, cur, _avg in _RAIL.findall(line):
        if name in ("RAM", "SWAP", "IRAM", "LFB"):
            continue
        rails[name] = int(cur)
    out: dict[str, Any] = {"power_mw": rails}
    for r in TOTAL_RAILS:
        if r in rails:
            out["total_mw"] = rails[r]
            break
    m = _GPU.search(line)
    if m:
        out["gpu_util"] = int(m.group(1))
    m = _RAM.search(line)
    if m:
        out["ram_used_mb"] = int(m.group(1))
    return out


class Tegrastats:
    """``with Tegrastats(100) as ts: ...`` then ``ts.summary()``: mean power over the block."""

    def __init__(self, interval_ms: int = 100):
        self.interval_ms = int(interval_ms)
        self.samples: list[dict] = []
        self._proc = None
        self._thread = None
        self.t0 = self.t1 = None

    def __enter__(self):
        if not available():
            return self
        self._proc = subprocess.Popen(["tegrastats", "--interval", str(self.interval_ms)],
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()
        self.t0 = time.perf_counter()
        return self

    def _read(self):
        for line in self._proc.stdout:
            s = parse_line(line)
            s["t"] = time.perf_counter()
            self.samples.append(s)

    def __exit__(self, *exc):
        self.t1 = time.perf_counter()
        if self._proc is not None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=5)
            except subprocess.TimeoutExpired:  # pragma: no cover
                self._proc.kill()
            self._thread.join(timeout=2)

    def summary(self, n_inferences: int | None = None) -> dict[str, Any] | None:
        pts = [s for s in self.samples if "total_mw" in s and self.t0 <= s["t"] <= (self.t1 or s["t"])]
        if not pts:
            return None
        mean_mw = sum(s["total_mw"] for s in pts) / len(pts)
        out = {"samples": len(pts), "mean_power_mw": round(mean_mw, 1),
               "max_power_mw": max(s["total_mw"] for s in pts)}
        rails = {}
        for s in pts:
            for k, v in s["power_mw"].items():
                rails.setdefault(k, []).append(v)
        out["rails_mean_mw"] = {k: round(sum(v) / len(v), 1) for k, v in rails.items()}
        if n_inferences and self.t1 and self.t0:
            seconds = self.t1 - self.t0
            out["energy_per_inference_mj"] = round(mean_mw * seconds / n_inferences, 4)  # mW*s = mJ
        return out


def _run(cmd: list[str]) -> tuple[int, str]:
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
        return p.returncode, (p.stdout + p.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return 1, str(e)


def parse_clocks(text: str) -> dict[str, Any]:
    """``jetson_clocks --show`` -> per-unit {min, max, current} and whether all are pinned."""
    units = {}
    for line in text.splitlines():
        m = re.search(r"^\s*(\S+?):?\s.*MinFreq=(\d+)\s+MaxFreq=(\d+)\s+CurrentFreq=(\d+)", line)
        if m:
            units[m.group(1)] = {"min": int(m.group(2)), "max": int(m.group(3)), "current": int(m.group(4))}
    fixed = bool(units) and all(u["min"] == u["max"] == u["current"] for u in units.values())
    return {"units": units, "fixed": fixed}


def clock_state() -> dict[str, Any] | None:
    """nvpmodel mode and clock pinning on a Jetson; None elsewhere."""
    if not (shutil.which("nvpmodel") or shutil.which("jetson_clocks") or available()):
        return None
    state: dict[str, Any] = {}
    if shutil.which("nvpmodel"):
        rc, out = _run(["nvpmodel", "-q"])
        state["nvpmodel"] = out if rc == 0 else None
        m = re.search(r"NV Power Mode:\s*(\S+)", out)
        state["power_mode"] = m.group(1) if m else None
    if shutil.which("jetson_clocks"):
        rc, out = _run(["jetson_clocks", "--show"])
        if rc == 0:
            parsed = parse_clocks(out)
            state["clocks"] = parsed["units"]
            state["clocks_fixed"] = parsed["fixed"]
        else:
            state["clocks_fixed"] = None
            state["clocks_error"] = out.splitlines()[-1] if out else "jetson_clocks --show failed (needs root)"
    if not state.get("clocks_fixed"):
        state["warning"] = ("clocks are not fixed (run `sudo jetson_clocks` after `sudo nvpmodel -m <mode>`): "
                            "latency and power vary with DVFS")
    return state
