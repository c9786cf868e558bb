"""Make an Ed25519 key pair to sign firmware bundles.

    edgeus keygen out=keys/edgeus          # writes keys/edgeus (private, mode 0600) and keys/edgeus.pub

Sign a bundle with `edgeus package <run> out=<bundle> package.sign_key=keys/edgeus`; give the device
and the firmware team keys/edgeus.pub, and check with `edgeus verify <bundle> --key keys/edgeus.pub`
(or `python3 tools/edgeus_device.py verify --key edgeus.pub` on the device). Keep the private key
off the devices and out of the bundles. Existing key files are never overwritten.
"""
from __future__ import annotations

from edgeus.errors import EdgeusError

USAGE = "out=<private key path>"


def run(cfg, args):
    from edgeus.deploy.bundle import keygen

    if args:
        raise EdgeusError(f"keygen takes no positional arguments; usage: edgeus keygen {USAGE}")
    if not cfg.out:
        raise EdgeusError(f"say where the private key goes: edgeus keygen {USAGE}")
    priv, pub = keygen(cfg.out)
    print(f"wrote {priv} (private: keep it off devices; sign with package.sign_key={priv})")
    print(f"wrote {pub} (public: edgeus verify <bundle> --key {pub})")
    return 0
