"""Verify a firmware bundle: checksums, schema, compatibility with this machine, golden outputs.

    edgeus verify firmware/as_classifier_v3
    edgeus verify firmware/as_classifier_v3.tar.gz

Fails (exit status 1) on a missing, truncated or modified file, an unsupported manifest schema,
an engine built for another TensorRT version or GPU (where TensorRT is installed), or golden
outputs outside the manifest's tolerance; each message names the file. Without TensorRT the
engine cannot be checked, and the golden inputs run through ONNX Runtime on the ONNX fallbacks.
"""
from __future__ import annotations

from edgeus.errors import EdgeusError

USAGE = "<bundle_dir | bundle.tar.gz>"


def run(cfg, args):
    from edgeus.deploy import verify

    if len(args) != 1:
        raise EdgeusError(f"expected one bundle, got {len(args)}; usage: edgeus verify {USAGE}")
    r = verify(args[0])
    for c in r["checks"]:
        print(f"ok    {c}")
    for w in r["warnings"]:
        print(f"warn  {w}")
    for e in r["errors"]:
        print(f"FAIL  {e}")
    print(f"{args[0]}: {'verified' if r['ok'] else 'NOT verified'}")
    return 0 if r["ok"] else 1
