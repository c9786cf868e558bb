"""Which INT8 kernels a CPU has, and whether an INT8 layout's accuracy measured here holds on the target.

    host = detect_host()                 # {"arch", "isa", "int8_dot", "flags", "kernels"}
    plan = evaluation_plan(layout, host) # how to measure accuracy here so it is the target's, plus warnings

Why it matters (ONNX Runtime's quantisation docs, "Data type selection"): on x86-64 with AVX2 or
AVX-512 but **without VNNI**, ONNX Runtime runs U8S8 (uint8 activations, int8 weights) with
``VPMADDUBSW``, which adds two uint8 x int8 products into a *saturating int16*: 255 x 127 x 2 =
64770 does not fit (max 32767) and is clamped. Whole models collapse (RSMAS-Net student: 0.992 ->
0.400 val accuracy on an AVX2 EPYC). With VNNI (``VPDPBUSD``: AVX512-VNNI, AVX-VNNI, AMX) the products
accumulate in int32 and nothing saturates; Arm (NEON widening / ``SDOT``/``UDOT``) has no such issue.
Weights in 7 bits (``reduce_range``: [-64, 63]) bound a pair by 255 x 64 x 2 = 32640 <= 32767, so
the U8S8 kernel can never saturate and stays as fast; U8U8 avoids it too with a slower kernel.

The targets say which ISA they run on (``quant.isa`` in ``targets/*.yaml``); the portable ``cpu``
target assumes no VNNI and uses ``reduce_range``; ``cpu_vnni`` uses full-range U8S8.

Accuracy is measured so that it is the target's: where this host's ONNX Runtime kernels compute
what the target computes (no saturation on either side), with the fused integer kernels; otherwise
(a TensorRT target, or full-range U8S8 for a VNNI target measured on a host without VNNI) with the
Q/DQ graph simulated in float (ONNX Runtime graph optimisation off: DequantizeLinear -> float
Conv), which is exact int32 accumulation up to float rounding, and a warning says so.
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

# ISA names the targets use (quant.isa)
X86_AVX2 = "x86_avx2"          # x86-64 with AVX2 / AVX-512 but no VNNI: U8S8 saturates (VPMADDUBSW)
X86_VNNI = "x86_vnni"          # AVX512-VNNI, AVX-VNNI or AMX-INT8: int32 accumulation
ARM_DOTPROD = "arm_dotprod"    # Armv8.2+ dot product (SDOT/UDOT)
ARM_NEON = "arm_neon"          # Arm without dot product (widening multiply-accumulate)
TENSORRT = "tensorrt"          # an NVIDIA GPU through TensorRT (int8 tensor cores / DP4A, int32 accumulation)
ISAS = (X86_AVX2, X86_VNNI, ARM_DOTPROD, ARM_NEON, TENSORRT)
SATURATING = {X86_AVX2}        # ISAs whose ONNX Runtime U8S8 kernel adds pairs in saturating int16

_X86_DOT = ("avx512_vnni", "avx_vnni", "amx_int8")
_ARM_DOT = ("asimddp", "dotprod")


def parse_cpuinfo(text: str, machine: str | None = None) -> dict:
    """ISA facts from the text of ``/proc/cpuinfo`` (x86 ``flags`` or Arm ``Features``)."""
    flags: set[str] = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip().lower() in ("flags", "features"):
            flags |= set(value.split())
    machine = (machine or "").lower()
    arm = machine in ("aarch64", "arm64") or (not machine and any(f in flags for f in ("asimd", "neon", "fp")) and
                                              "sse2" not in flags)
    if arm:
        dot = next((f for f in _ARM_DOT if f in flags), None)
        return {"arch": "aarch64", "isa": ARM_DOTPROD if dot else ARM_NEON, "int8_dot": dot,
                "flags": sorted(f for f in flags if f in ("asimd", "asimddp", "dotprod", "i8mm", "sve", "sve2"))}
    dot = next((f for f in _X86_DOT if f in flags), None)
    relevant = ("avx2", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8", "amx_tile", "fma")
    if dot:
        isa = X86_VNNI
    elif flags:
        isa = X86_AVX2   # AVX2 / AVX-512BW (and older SSE4.1 paths, which widen the same way) without VNNI
    else:
        isa = "unknown"
    return {"arch": "x86_64" if flags else (machine or "unknown"), "isa": isa, "int8_dot": dot,
            "flags": sorted(f for f in flags if f in relevant)}


def detect_host(cpuinfo: str | Path = "/proc/cpuinfo") -> dict:
    """This machine's ISA (:func:`parse_cpuinfo` of ``/proc/cpuinfo``), with a line on its INT8 kernels."""
    try:
        text = Path(cpuinfo).read_text()
    except OSError:
        text = ""
    host = parse_cpuinfo(text, platform.machine())
    host["kernels"] = kernels(host["isa"])
    return host


def kernels(isa: str) -> str:
    """What ONNX Runtime's CPU INT8 kernels do on ``isa`` (one line, for reports)."""
    return {
        X86_AVX2: "U8S8 via VPMADDUBSW: pairs of uint8 x int8 products summed in saturating int16 (full-range int8 "
                  "weights can saturate; 7-bit weights, reduce_range, cannot)",
        X86_VNNI: "U8S8 via VPDPBUSD (VNNI): products accumulated in int32, no saturation",
        ARM_DOTPROD: "Arm SDOT/UDOT: int32 accumulation, no saturation",
        ARM_NEON: "Arm NEON widening multiply-accumulate: no saturation",
        TENSORRT: "TensorRT int8 kernels on the GPU: int32 accumulation (not runnable on a CPU)",
    }.get(isa, "unknown CPU: ONNX Runtime's kernels not characterised")


def target_isa(layout) -> str:
    """The ISA a layout's target runs on (``quant.isa``; unset: tensorrt for TensorRT, else the portable x86_avx2)."""
    isa = getattr(layout, "isa", None)
    if isa:
        return str(isa)
    return TENSORRT if layout.layout == "tensorrt" else X86_AVX2


def can_saturate(layout) -> bool:
    """True when the layout is U8S8 with full-range int8 weights (the only ORT CPU layout VPMADDUBSW can saturate)."""
    return (layout.layout == "onnxruntime" and layout.activation_type == "uint8" and layout.weight_type == "int8"
            and not layout.reduce_range)


def evaluation_plan(layout, host: dict | None = None) -> dict:
    """How to measure INT8 accuracy on this host so that it is the target's, and what to warn about.

    Returns ``{"host", "target_isa", "mode": "native" | "simulated", "optimization": None | "disable",
    "warnings": [...], "notes": [...]}`` (warnings: accuracy or layout risks; notes: facts). ``native``: ONNX Runtime's fused integer kernels (they compute what the
    target computes); ``simulated``: Q/DQ evaluated in float (graph optimisation off).
    """
    host = host or detect_host()
    tisa = target_isa(layout)
    warnings: list[str] = []
    mode = "native"
    if tisa not in ISAS:
        warnings.append(f"target quant.isa={tisa!r} is not one of {', '.join(ISAS)}; accuracy measured with this "
                        f"host's kernels ({host['isa']})")
    if tisa == TENSORRT:
        mode = "simulated"
        warnings.append("TensorRT layout measured on the CPU by simulating its Q/DQ in float (exact int32 accumulation "
                        "up to float rounding); TensorRT's own kernels and fusions can differ slightly - check the "
                        "engine's accuracy on the device")
    elif can_saturate(layout):
        if tisa in SATURATING:
            warnings.append(f"full-range U8S8 for target ISA {tisa}: ONNX Runtime's VPMADDUBSW kernel saturates int16 "
                            "there and can collapse accuracy; set quant.reduce_range=true (or U8U8) for CPUs without VNNI")
            if host["isa"] not in SATURATING:
                mode = "simulated"
                warnings.append(f"this host ({host['isa']}) does not saturate, the target ({tisa}) does: accuracy is "
                                "measured without saturation and will NOT hold on the target")
        elif host["isa"] in SATURATING:
            mode = "simulated"
            warnings.append(f"this host ({host['isa']}, no VNNI) would saturate full-range U8S8 where the target "
                            f"({tisa}) does not: accuracy is measured by simulating the Q/DQ graph in float; latency "
                            "measured here is not the target's")
    notes = []
    if host["isa"] != tisa and tisa != TENSORRT and not warnings:
        notes.append(f"measured on {host['isa']} for a {tisa} target: the layout cannot saturate on either, so the "
                     "accuracy measured here holds there; latency measured here is not the target's")
    return {"host": host, "target_isa": tisa, "mode": mode, "optimization": "disable" if mode == "simulated" else None,
            "warnings": warnings, "notes": notes}


def vpmaddubsw_dot(xq: "np.ndarray", wq: "np.ndarray", saturate: bool = True) -> "np.ndarray":
    """Integer ``xq @ wq.T`` as ONNX Runtime's AVX2 U8S8 kernel computes it (host-independent emulation).

    ``xq``: uint8 [N, K]; ``wq``: int8 [M, K]. Products of neighbouring K pairs are added into int16
    with saturation (``VPMADDUBSW``), then the pair sums are accumulated in int32 (``VPMADDWD`` by
    ones). ``saturate=False`` is the VNNI / exact int32 result.
    """
    import numpy as np

    x = np.asarray(xq, np.int32)
    w = np.asarray(wq, np.int32)
    if x.shape[1] % 2:
        x, w = np.pad(x, ((0, 0), (0, 1))), np.pad(w, ((0, 0), (0, 1)))
    prod = x[:, None, :] * w[None, :, :]                       # [N, M, K]
    pairs = prod[..., 0::2] + prod[..., 1::2]
    if saturate:
        pairs = np.clip(pairs, -32768, 32767)
    return pairs.sum(-1).astype(np.int64)


def isa_record(int8_onnx) -> dict:
    """The ISA facts the quantiser stored in an INT8 ONNX (``edgeus.quantization``), for the bundle manifest:
    ``{"host_isa", "host_int8_dot", "target_isa", "accuracy_mode", "layout", "reduce_range", "warnings"}``
    (empty when the model was not quantised by edgeus)."""
    from edgeus.onnx.metadata import read_metadata

    q = read_metadata(int8_onnx).get("edgeus.quantization") or {}
    if isinstance(q, str):
        q = json.loads(q)
    return dict(q.get("isa") or {})


__all__ = ["parse_cpuinfo", "detect_host", "kernels", "target_isa", "can_saturate", "evaluation_plan", "isa_record",
           "vpmaddubsw_dot", "ISAS", "X86_AVX2", "X86_VNNI", "ARM_DOTPROD", "ARM_NEON", "TENSORRT"]
