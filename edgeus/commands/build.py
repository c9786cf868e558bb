"""Build a TensorRT engine for a target from a (Q/DQ) ONNX model.

    edgeus build student.int8.onnx target=jetson_orin_nano out=build/orin_nano
    edgeus build student.int8.onnx target=jetson_agx_orin build.dla_core=0 out=build/agx_dla0

Checks the ONNX against TensorRT's ONNX parser (operators, opset, static shapes except the batch,
Q/DQ rules), writes the manifest, the trtexec command (trtexec.txt) and build_engine.sh. With
TensorRT installed (an NVIDIA GPU) it also builds <name>.engine here, reusing the timing cache.
Without it, the engine must be built on the device: copy the output directory there and run
`bash build_engine.sh`. Settings: target.* (targets/*.yaml) and build.* (dla_core, strongly_typed,
timing_cache, name, input_name, strict).
"""
from __future__ import annotations

from pathlib import Path

from edgeus.errors import EdgeusError

USAGE = "<model.onnx> target=<name> out=<dir> [build.dla_core=0] [key=value ...]"


def run(cfg, args):
    from edgeus.commands.common import new_output
    from edgeus.deploy import build

    if len(args) != 1:
        raise EdgeusError(f"expected one ONNX model, got {len(args)} paths; usage: edgeus build {USAGE}")
    onnx_path = Path(args[0])
    out = new_output(cfg.out or onnx_path.parent / f"build-{cfg.target.name}", cfg, "build folder")
    r = build(onnx_path, cfg.target, cfg.build, out)
    c = r["compat"]
    print(f"TensorRT compatibility ({cfg.target.name}): {'ok' if c['ok'] else 'FAILED'}"
          f" ({c['qdq_nodes']} Q/DQ nodes{', Q/DQ rules checked' if c['qdq_checked'] else ''})")
    for e in c["errors"]:
        print(f"  error: {e}")
    for w in c["warnings"]:
        print(f"  warning: {w}")
    for n in r["settings"]["notes"]:
        print(f"  note: {n}")
    print(f"trtexec: {r['trtexec']}")
    print(f"wrote {out}/ (manifest.json, build_engine.sh, trtexec.txt, compat.json)")
    print(r["message"])
    return 0
