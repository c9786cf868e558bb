"""Verify a firmware bundle: trust (checksums, listing, signature), compatibility, golden outputs.

    edgeus verify firmware/as_classifier_v3
    edgeus verify firmware/as_classifier_v3.tar.gz --key keys/edgeus.pub
    edgeus verify firmware/as_classifier_v3 --allow-extra

Fails (exit status 5) on a missing, truncated or modified file; a file present but not listed in the
manifest (unless --allow-extra); a path in the manifest that is not listed or points outside the
bundle; an empty file table; an archive too large or with too many members; an unsupported manifest
schema; with --key, an unsigned bundle or a signature that does not match (Ed25519, PEM public key from
`edgeus keygen`); an engine built for another TensorRT version or GPU (where TensorRT is installed);
or golden outputs outside the manifest's tolerance or with another top-1. Each message names the file.
Without TensorRT the engine cannot be checked, and the golden inputs run through ONNX Runtime on the
ONNX fallbacks. On the device, `python3 tools/edgeus_device.py verify --key pub.pem` checks the same.
"""
from __future__ import annotations

from edgeus.errors import EdgeusError

USAGE = "<bundle_dir | bundle.tar.gz> [--key <public.pem>] [--allow-extra]"


def _parse(args):
    bundle, key, allow_extra = [], None, False
    it = iter(args)
    for a in it:
        if a == "--key":
            key = next(it, None)
            if key is None:
                raise EdgeusError(f"--key needs a public key file; usage: edgeus verify {USAGE}")
        elif a == "--allow-extra":
            allow_extra = True
        elif a.startswith("--"):
            raise EdgeusError(f"unknown option {a}; usage: edgeus verify {USAGE}")
        else:
            bundle.append(a)
    if len(bundle) != 1:
        raise EdgeusError(f"expected one bundle, got {len(bundle)}; usage: edgeus verify {USAGE}")
    return bundle[0], key, allow_extra


def run(cfg, args):
    from edgeus.deploy import verify

    bundle, key, allow_extra = _parse(args)
    r = verify(bundle, key=key, allow_extra=allow_extra)
    for c in r["checks"]:
        print(f"ok    {c}")
    for w in r["warnings"]:
        print(f"warn  {w}")
    for e in r["errors"]:
        print(f"FAIL  {e}")
    print(f"{bundle}: {'verified' if r['ok'] else 'NOT verified'}")
    from edgeus.errors import EXIT_VERIFY

    return 0 if r["ok"] else EXIT_VERIFY
