"""Describe this machine for a TensorRT engine: TensorRT version, GPU, compute capability, JetPack.

Standard library only: the same file is copied next to the generated build script so that a
device without edgeus can record what it built the engine with (``python3 device_probe.py``).
"""
from __future__ import annotations

import ctypes
import json
import os
import re
import subprocess
import sys


def cuda_device(index: int = 0) -> dict | None:
    """Name and compute capability of a CUDA GPU through the driver API (libcuda), or None."""
    for lib in ("libcuda.so.1", "libcuda.so", "nvcuda.dll"):
        try:
            cuda = ctypes.CDLL(lib)
            break
        except OSError:
            continue
    else:
        return None
    try:
        if cuda.cuInit(0) != 0:
            return None
        dev = ctypes.c_int()
        if cuda.cuDeviceGet(ctypes.byref(dev), index) != 0:
            return None
        major, minor = ctypes.c_int(), ctypes.c_int()
        # CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR = 75, _MINOR = 76
        cuda.cuDeviceGetAttribute(ctypes.byref(major), 75, dev)
        cuda.cuDeviceGetAttribute(ctypes.byref(minor), 76, dev)
        name = ctypes.create_string_buffer(256)
        cuda.cuDeviceGetName(name, 256, dev)
        return {"gpu": name.value.decode(errors="replace"),
                "compute_capability": f"{major.value}.{minor.value}"}
    except Exception:  # pragma: no cover - a broken driver
        return None


def tensorrt_version() -> str | None:
    try:
        import tensorrt  # noqa: F401
    except Exception:
        return None
    return getattr(tensorrt, "__version__", None)


def jetson_info() -> dict | None:
    """Jetson module, L4T release and JetPack version, or None when this is not a Jetson."""
    release = "/etc/nv_tegra_release"
    if not os.path.exists(release):
        return None
    info: dict = {}
    try:
        text = open(release).read()
        m = re.search(r"R(\d+)\s*\(release\),\s*REVISION:\s*([\d.]+)", text)
        if m:
            info["l4t"] = f"{m.group(1)}.{m.group(2)}"
    except OSError:
        pass
    try:
        info["model"] = open("/proc/device-tree/model").read().strip("\x00\n ")
    except OSError:
        pass
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"],
                             capture_output=True, text=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            info["jetpack"] = out.stdout.strip().split("-")[0].split("+")[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def probe() -> dict:
    dev = cuda_device() or {}
    jet = jetson_info()
    return {
        "tensorrt": tensorrt_version(),
        "gpu": dev.get("gpu"),
        "compute_capability": dev.get("compute_capability"),
        "jetpack": (jet or {}).get("jetpack"),
        "jetson": jet,
    }


if __name__ == "__main__":
    json.dump(probe(), sys.stdout, indent=2)
    sys.stdout.write("\n")
