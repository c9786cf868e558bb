#!/usr/bin/env python3
"""edgeus on-device tool: trust, build, check and time a firmware bundle on the device itself.

Runs on JetPack 5 (Python 3.8, TensorRT 8.5) and JetPack 6 (Python 3.10, TensorRT 10.3) and on any
machine with an NVIDIA GPU. Needs nothing but what JetPack ships: the Python standard library for
``verify`` and ``build`` (plus ``trtexec``), numpy + tensorrt + cuda-python for ``golden``, and
``cryptography`` to check a signature (without it a signature cannot be checked, and ``--key`` fails).
The same file is what ``edgeus verify`` uses for its trust checks, so host and device decide alike.

    python3 tools/edgeus_device.py verify [--key pub.pem] [--allow-extra]
    python3 tools/edgeus_device.py build  [--trtexec /usr/src/tensorrt/bin/trtexec] [--out DIR]
    python3 tools/edgeus_device.py golden [--engine FILE]
    python3 tools/edgeus_device.py bench  [--engine FILE] [--duration 3] [--batch N]
    python3 tools/edgeus_device.py all    [--key pub.pem]      # verify, build (if needed), golden, bench

The bundle is the directory above ``tools/`` unless ``--bundle DIR`` says otherwise. The engine is
built outside the bundle (``<bundle>-engine/`` by default), so the signed bundle stays as it was.
Exit status: 0 all checks passed, 1 a check failed, 2 a tool or file is missing.
"""
import argparse
import base64
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

MANIFEST = "manifest.json"
SIGNATURE = "manifest.json.sig"
MAX_BUNDLE_BYTES = 2 << 30      # an archive that expands beyond this is refused (a model bundle is far smaller)
MAX_MEMBERS = 10000
_HEX = set("0123456789abcdef")


# ------------------------------------------------------------------------------------------------ files

def sha256_file(path, chunk=1 << 20):
    h = hashlib.sha256()
    with open(str(path), "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def unsafe_reason(rel):
    """Why ``rel`` is not a plain relative path inside a bundle (None: it is)."""
    if not isinstance(rel, str) or not rel:
        return "not a file name"
    if "\\" in rel or "\x00" in rel or rel.startswith("/") or (len(rel) > 1 and rel[1] == ":"):
        return "absolute or not a POSIX relative path"
    parts = rel.split("/")
    if any(p in ("", ".", "..") for p in parts):
        return "a path with '..', '.' or an empty part"
    return None


def inside(root, rel):
    """``root/rel`` when it exists as a regular file inside ``root`` through no symbolic link; else None."""
    root = Path(root).resolve()
    p = root
    for part in rel.split("/"):
        p = p / part
        if p.is_symlink():
            return None
    try:
        p.resolve().relative_to(root)
    except ValueError:
        return None
    return p if p.is_file() else None


def referenced_paths(man):
    """Every file the manifest points at, with what points at it."""
    refs = []
    g = man.get("golden") or {}
    if not isinstance(g, dict):
        g = {}
    for key in ("inputs", "raw"):
        if g.get(key):
            refs.append((g[key], "golden." + key))
    outs = g.get("outputs") or []
    for i, e in enumerate(outs if isinstance(outs, list) else []):
        if isinstance(e, dict):
            for key in ("model", "expected"):
                if key in e:
                    refs.append((e[key], "golden.outputs[%d].%s" % (i, key)))
        else:
            refs.append((e, "golden.outputs[%d]" % i))
    order = man.get("runtime_order") or []
    for i, r in enumerate(order if isinstance(order, list) else [order]):
        refs.append((r, "runtime_order[%d]" % i))
    trt = man.get("tensorrt") or {}
    if isinstance(trt, dict) and trt.get("engine"):
        refs.append((trt["engine"], "tensorrt.engine"))
    onnx = (man.get("model") or {}).get("onnx") if isinstance(man.get("model"), dict) else None
    if isinstance(onnx, dict):
        for k, v in onnx.items():
            refs.append((v, "model.onnx." + str(k)))
    tools = man.get("tools") or {}
    if isinstance(tools, dict):
        for k, v in tools.items():
            refs.append((v, "tools." + str(k)))
    b = man.get("build") or {}
    if isinstance(b, dict) and b.get("dir"):
        for key in ("onnx", "script"):
            if b.get(key):
                refs.append(("%s/%s" % (b["dir"], b[key]), "build." + key))
    return refs


def check_files(root, man, allow_extra=False):
    """(errors, warnings, checks) of the files of bundle directory ``root`` against its manifest.

    Every listed file must be present, a regular file inside the bundle, of the listed size and
    SHA-256; every file present must be listed (``allow_extra``: only a warning); every file the
    manifest refers to must be listed; the table must not be empty.
    """
    root = Path(root)
    errors, warnings, checks = [], [], []
    files = man.get("files")
    if not isinstance(files, dict) or not files:
        return ["%s: the 'files' table is empty or missing: nothing is protected by a checksum" % MANIFEST], [], []
    bad = set()
    for rel, entry in sorted(files.items()):
        why = unsafe_reason(rel)
        if why:
            errors.append("%s: unsafe path in %s (%s)" % (rel, MANIFEST, why))
            bad.add(rel)
            continue
        if rel in (MANIFEST, SIGNATURE):
            errors.append("%s: the manifest cannot list itself or its signature" % rel)
            continue
        if not isinstance(entry, dict) or not isinstance(entry.get("bytes"), int) \
                or not isinstance(entry.get("sha256"), str) or len(entry["sha256"]) != 64 \
                or not set(entry["sha256"]) <= _HEX:
            errors.append("%s: malformed entry in %s (needs sha256 and bytes)" % (rel, MANIFEST))
            bad.add(rel)
            continue
        p = inside(root, rel)
        if p is None:
            if (root / rel).is_symlink() or (root / rel).exists():
                errors.append("%s: not a regular file inside the bundle (a link or a directory)" % rel)
            else:
                errors.append("%s: missing (listed in %s)" % (rel, MANIFEST))
            bad.add(rel)
            continue
        size, want = p.stat().st_size, entry["bytes"]
        if size < want:
            errors.append("%s: truncated (%d of %d bytes)" % (rel, size, want))
        elif size != want:
            errors.append("%s: size %d bytes, manifest says %d" % (rel, size, want))
        elif sha256_file(p) != entry["sha256"]:
            errors.append("%s: SHA-256 mismatch (the file was modified after packaging)" % rel)
        else:
            continue
        bad.add(rel)
    for dirpath, dirnames, filenames in os.walk(str(root)):
        for name in sorted(dirnames + filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if full.is_symlink():
                errors.append("%s: a symbolic link in the bundle (refused)" % rel)
            elif full.is_file() and rel not in files and rel not in (MANIFEST, SIGNATURE):
                msg = "%s: present but not listed in %s" % (rel, MANIFEST)
                if allow_extra:
                    warnings.append(msg + " (allowed: --allow-extra; it is not trusted)")
                else:
                    errors.append(msg + " (an unlisted file is refused; --allow-extra to accept it)")
    for rel, what in referenced_paths(man):
        why = unsafe_reason(rel)
        if why:
            errors.append("%s: %s points outside the bundle or at no plain path (%r: %s)" % (MANIFEST, what, rel, why))
        elif rel not in files:
            errors.append("%s: %s is not listed (with a checksum) in the manifest's files" % (rel, what))
    if not errors:
        checks.append("files: %d listed, all present, unmodified (SHA-256), none unlisted" % len(files))
    return errors, warnings, checks


# ------------------------------------------------------------------------------------------------ signatures

def _crypto():
    try:
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ed25519
    except ImportError:
        return None
    return serialization, ed25519, InvalidSignature


def key_fingerprint(public_pem_bytes):
    """SHA-256 of the raw 32-byte Ed25519 public key (hex): names the key without the PEM's formatting."""
    c = _crypto()
    if c is None:
        raise RuntimeError("the 'cryptography' package is needed for keys (pip install cryptography)")
    serialization, ed25519, _ = c
    key = serialization.load_pem_public_key(public_pem_bytes)
    if not isinstance(key, ed25519.Ed25519PublicKey):
        raise ValueError("not an Ed25519 public key")
    raw = key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()


def check_signature(root, key_path=None):
    """(errors, warnings, checks) of ``manifest.json.sig`` against the Ed25519 public key at ``key_path``.

    With a key: an unsigned bundle, a wrong signature, a signature by another key, or no way to
    check (no ``cryptography``) is an error. Without a key nothing is trusted; it is said so.
    """
    root = Path(root)
    sig_path = root / SIGNATURE
    if key_path is None:
        if sig_path.is_file():
            return [], ["%s: signed, but no --key given: the signature was not checked" % SIGNATURE], []
        return [], ["%s: the bundle is not signed; its checksums prove integrity against accidents, not who "
                    "wrote it (sign with package.sign_key=, check with --key)" % MANIFEST], []
    if not sig_path.is_file() or sig_path.is_symlink():
        return ["%s: the bundle is not signed, and --key %s was given: refusing it" % (SIGNATURE, key_path)], [], []
    c = _crypto()
    if c is None:
        return ["%s: cannot check the signature here: the 'cryptography' package is not installed "
                "(pip3 install cryptography), and --key was given" % SIGNATURE], [], []
    serialization, ed25519, InvalidSignature = c
    try:
        pem = Path(key_path).read_bytes()
        key = serialization.load_pem_public_key(pem)
    except (OSError, ValueError, TypeError) as e:
        return ["%s: not a readable PEM public key (%s)" % (key_path, str(e).splitlines()[0] if str(e) else e)], [], []
    if not isinstance(key, ed25519.Ed25519PublicKey):
        return ["%s: not an Ed25519 public key" % key_path], [], []
    try:
        sig = json.loads(sig_path.read_text())
        signature = base64.b64decode(sig["signature"], validate=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        return ["%s: unreadable signature file (%s)" % (SIGNATURE, e)], [], []
    if sig.get("algorithm") != "ed25519":
        return ["%s: algorithm %r; only ed25519 is accepted" % (SIGNATURE, sig.get("algorithm"))], [], []
    try:
        key.verify(signature, (root / MANIFEST).read_bytes())
    except InvalidSignature:
        fp = key_fingerprint(pem)
        other = sig.get("key_sha256")
        who = " (it was signed by key %s..., you gave %s...)" % (other[:16], fp[:16]) if other and other != fp else ""
        return ["%s: the signature does not match %s with this key%s: the manifest was changed after signing, "
                "or the bundle was signed by someone else" % (SIGNATURE, MANIFEST, who)], [], []
    except OSError as e:
        return ["%s: unreadable (%s)" % (MANIFEST, e)], [], []
    return [], [], ["%s: Ed25519 signature valid for key %s..." % (SIGNATURE, key_fingerprint(pem)[:16])]


# ------------------------------------------------------------------------------------------------ archives

def safe_extract(tar_path, into, max_bytes=MAX_BUNDLE_BYTES, max_members=MAX_MEMBERS):
    """Extract a bundle archive after checking every member: regular files and directories only,
    no absolute or '..' paths, at most ``max_members`` members and ``max_bytes`` bytes in all.
    Returns the bundle directory. Raises ValueError with a message naming the archive."""
    name = Path(tar_path).name
    try:
        with tarfile.open(str(tar_path), "r:*") as tar:
            members, total = [], 0
            for m in tar:
                members.append(m)
                if len(members) > max_members:
                    raise ValueError("%s: more than %d members; refusing to extract" % (name, max_members))
                if unsafe_reason(m.name.rstrip("/")) or not (m.isfile() or m.isdir()):
                    raise ValueError("%s: unsafe archive member %r" % (name, m.name))
                total += max(int(m.size), 0)
                if total > max_bytes:
                    raise ValueError("%s: expands to more than %d bytes; refusing to extract (an archive bomb, "
                                     "or not a bundle)" % (name, max_bytes))
            for m in members:
                target = Path(into) / m.name
                if m.isdir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                with open(str(target), "wb") as f:
                    shutil.copyfileobj(src, f)
    except (tarfile.TarError, EOFError, OSError) as e:
        raise ValueError("%s: truncated or corrupt archive (%s)" % (name, e))
    except Exception as e:  # zlib.error and the like from a corrupt stream
        if isinstance(e, ValueError) and str(e).startswith(name):
            raise
        raise ValueError("%s: truncated or corrupt archive (%s)" % (name, e))
    roots = list(Path(into).iterdir())
    return roots[0] if len(roots) == 1 and roots[0].is_dir() else Path(into)


# ------------------------------------------------------------------------------------------------ verify

def read_manifest(root):
    p = Path(root) / MANIFEST
    if not p.is_file() or p.is_symlink():
        raise ValueError("%s: manifest not found" % MANIFEST)
    try:
        man = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError("%s: not a readable JSON manifest (%s)" % (MANIFEST, str(e).splitlines()[0]))
    if not isinstance(man, dict):
        raise ValueError("%s: not a JSON object" % MANIFEST)
    return man


def verify_dir(root, key=None, allow_extra=False):
    """Trust checks of a bundle directory: manifest, files, references, signature.
    Returns {"ok", "errors", "warnings", "checks", "manifest"}."""
    rep = {"ok": False, "errors": [], "warnings": [], "checks": [], "manifest": None}
    try:
        man = read_manifest(root)
    except ValueError as e:
        rep["errors"].append(str(e))
        return rep
    rep["manifest"] = man
    for part in (check_signature(root, key), check_files(root, man, allow_extra)):
        rep["errors"] += part[0]
        rep["warnings"] += part[1]
        rep["checks"] += part[2]
    rep["ok"] = not rep["errors"]
    return rep


# ------------------------------------------------------------------------------------------------ device

def _fail(msg, code=1):
    print("FAIL  " + msg)
    return code


def _trtexec(given=None):
    for c in (given, os.environ.get("TRTEXEC"), shutil.which("trtexec"), "/usr/src/tensorrt/bin/trtexec"):
        if c and os.path.isfile(c) and os.access(c, os.X_OK):
            return c
    return None


def _engine_dir(bundle, out=None):
    return Path(out) if out else Path(bundle).resolve().parent / (Path(bundle).resolve().name + "-engine")


def _default_engine(bundle, man, out=None):
    trt = man.get("tensorrt") or {}
    if trt.get("engine") and inside(bundle, trt["engine"]):
        return Path(bundle) / trt["engine"]
    settings = (man.get("build") or {}).get("settings") or {}
    return _engine_dir(bundle, out) / settings.get("engine", "model.engine")


def cmd_build(bundle, man, trtexec=None, out=None):
    b = man.get("build") or {}
    args = b.get("trtexec_args")
    settings = b.get("settings") or {}
    if not isinstance(args, list) or not b.get("dir"):
        return _fail("%s: no device build in this bundle (build.trtexec_args missing)" % MANIFEST, 2)
    exe = _trtexec(trtexec)
    if exe is None:
        return _fail("trtexec not found: pass --trtexec, set TRTEXEC, or install TensorRT "
                     "(JetPack: /usr/src/tensorrt/bin/trtexec)", 2)
    onnx_rel = "%s/%s" % (b["dir"], settings.get("onnx"))
    entry = (man.get("files") or {}).get(onnx_rel) or {}
    onnx = inside(bundle, onnx_rel)
    if onnx is None or sha256_file(onnx) != entry.get("sha256"):
        return _fail("%s: missing or modified (SHA-256 differs from the manifest); refusing to build" % onnx_rel)
    out_dir = _engine_dir(bundle, out)
    out_dir.mkdir(parents=True, exist_ok=True)
    run = [exe]
    for a in args:
        if not isinstance(a, str) or not a.startswith("--"):
            return _fail("%s: build.trtexec_args holds %r, not an option" % (MANIFEST, a))
        run.append("--onnx=" + str(onnx.resolve()) if a.startswith("--onnx=") else a)
    print("build: " + " ".join(run))
    with open(str(out_dir / "build.log"), "w") as log:
        rc = subprocess.call(run, cwd=str(out_dir), stdout=log, stderr=subprocess.STDOUT)   # no shell
    engine = out_dir / settings.get("engine", "model.engine")
    if rc != 0 or not engine.is_file():
        return _fail("trtexec failed (exit %d); see %s" % (rc, out_dir / "build.log"))
    info = dict(probe(), engine=engine.name, sha256=sha256_file(engine), bytes=engine.stat().st_size,
                expected={"tensorrt": settings.get("tensorrt_range"), "jetpack": settings.get("jetpack_range")})
    (out_dir / "engine.json").write_text(json.dumps(info, indent=2) + "\n")
    print("ok    built %s with TensorRT %s on %s" % (engine, info.get("tensorrt"), info.get("gpu")))
    return 0


def probe():
    info = {"tensorrt": None, "gpu": None, "compute_capability": None, "jetpack": None}
    try:
        import tensorrt as trt
        info["tensorrt"] = trt.__version__
    except Exception:
        pass
    try:
        cudart = _cudart()
        err, prop = cudart.cudaGetDeviceProperties(0)
        if int(err) == 0:
            name = prop.name
            info["gpu"] = name.decode(errors="replace").rstrip("\x00") if isinstance(name, bytes) else str(name)
            info["compute_capability"] = "%d.%d" % (prop.major, prop.minor)
    except Exception:
        pass
    try:
        out = subprocess.run(["dpkg-query", "-W", "-f=${Version}", "nvidia-jetpack"], stdout=subprocess.PIPE,
                             stderr=subprocess.DEVNULL, universal_newlines=True, timeout=10)
        if out.returncode == 0 and out.stdout.strip():
            info["jetpack"] = out.stdout.strip().split("-")[0].split("+")[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _cudart():
    try:
        from cuda.bindings import runtime as cudart   # cuda-python >= 12.6
    except ImportError:
        from cuda import cudart                       # older cuda-python (JetPack 5)
    return cudart


def _check(call):
    err, rest = call[0], call[1:]
    if int(err) != 0:
        raise RuntimeError("CUDA error %s" % (err,))
    return rest[0] if len(rest) == 1 else rest


def _handle(stream):
    """The integer handle of a cuda-python stream (execute_async_v3 takes a size_t)."""
    try:
        return int(stream)
    except TypeError:
        return int(stream.getPtr())


def preprocess(raw_u8, prep):
    """uint8 [N, H, W] -> float32 [N, C, H, W]: /255, grayscale repeated to ``in_chans``, (x - mean) / std
    (edgeus.data.transforms.normalise)."""
    import numpy as np

    c = int(prep.get("in_chans") or 1)
    x = raw_u8.astype(np.float32) / np.float32(255.0)
    x = np.repeat(x[:, None], c, axis=1)
    mean = list(prep.get("mean") or [0.0])
    std = list(prep.get("std") or [1.0])
    mean = np.asarray((mean * c if len(mean) == 1 else mean)[:c], np.float32)[None, :, None, None]
    std = np.asarray((std * c if len(std) == 1 else std)[:c], np.float32)[None, :, None, None]
    return ((x - mean) / std).astype(np.float32)


def softmax(x):
    import numpy as np

    x = np.asarray(x, dtype=np.float64)
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def compare_golden(y, expected, entry, classes=None):
    """(errors, checks) of outputs ``y`` against the expected logits of a golden entry: softmax within
    ``atol``, and the expected top-1 on every image the reference is sure of (margin > 2 atol)."""
    import numpy as np

    errors, checks = [], []
    model = entry.get("model", "model")
    if y.shape != expected.shape:
        return ["%s: output shape %s, expected %s" % (model, y.shape, expected.shape)], []
    atol = float(entry.get("atol", 0.05))
    a, b = softmax(y), softmax(expected)
    diff = float(np.abs(a - b).max())
    want = np.asarray(entry.get("top1") or b.argmax(-1).tolist())
    got = a.argmax(-1)
    srt = np.sort(b, axis=-1)
    sure = (srt[:, -1] - srt[:, -2]) > 2 * atol if b.shape[-1] > 1 else np.ones(len(b), bool)
    wrong = [int(i) for i in np.nonzero((got != want) & sure)[0]]
    name = (lambda k: classes[k] if classes and 0 <= k < len(classes) else str(k))
    if diff > atol:
        errors.append("%s: golden probabilities differ by %.3g (tolerance %g)" % (model, diff, atol))
    if wrong:
        errors.append("%s: top-1 differs on golden image(s) %s: got %s, expected %s" % (
            model, wrong, [name(int(got[i])) for i in wrong], [name(int(want[i])) for i in wrong]))
    if not errors:
        checks.append("%s: golden outputs within %g (max diff %.2e), top-1 %s" % (
            model, atol, diff, [name(int(k)) for k in got]))
    return errors, checks


def run_engine(engine_path, x, dla_core=None):
    """Outputs of a TensorRT engine on ``x`` (float32 NCHW), with the CUDA runtime of cuda-python on the
    primary context; batches the engine's profile cannot take are split (or padded for a static batch)."""
    import numpy as np
    import tensorrt as trt

    cudart = _cudart()
    logger = trt.Logger(trt.Logger.WARNING)
    runtime = trt.Runtime(logger)
    if dla_core is not None:
        runtime.DLA_core = int(dla_core)
    engine = runtime.deserialize_cuda_engine(Path(engine_path).read_bytes())
    if engine is None:
        raise RuntimeError("%s: TensorRT could not deserialize it (built by another TensorRT version or GPU?)"
                           % engine_path)
    ctx = engine.create_execution_context()
    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    inputs = [n for n in names if engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
    outputs = [n for n in names if engine.get_tensor_mode(n) != trt.TensorIOMode.INPUT]
    if len(inputs) != 1:
        raise RuntimeError("the engine has %d inputs; golden checks handle one" % len(inputs))
    iname = inputs[0]
    dims = list(engine.get_tensor_shape(iname))
    if dims[0] >= 0:
        lo = hi = dims[0]
    else:
        try:
            prof = engine.get_tensor_profile_shape(iname, 0)
        except AttributeError:   # TensorRT 8.4 and older
            prof = engine.get_profile_shape(0, iname)
        lo, hi = int(prof[0][0]), int(prof[2][0])
    step = max(1, min(hi, len(x))) if lo <= 1 else lo
    stream = _check(cudart.cudaStreamCreate())
    results = []
    allocs = []
    try:
        for start in range(0, len(x), step):
            chunk = np.ascontiguousarray(x[start:start + step], dtype=np.float32)
            n = len(chunk)
            if n < lo:   # a static batch: pad with copies of the last image
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], lo - n, axis=0)])
            if not ctx.set_input_shape(iname, tuple(chunk.shape)):
                raise RuntimeError("set_input_shape(%s, %s) refused: outside the engine's profile [%d, %d]"
                                   % (iname, chunk.shape, lo, hi))
            chunk = chunk.astype(trt.nptype(engine.get_tensor_dtype(iname)))
            dev_in = _check(cudart.cudaMalloc(chunk.nbytes))
            allocs.append(dev_in)
            _check(cudart.cudaMemcpyAsync(dev_in, chunk.ctypes.data, chunk.nbytes,
                                          cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, stream))
            ctx.set_tensor_address(iname, int(dev_in))
            host_out = {}
            for o in outputs:
                shape = tuple(ctx.get_tensor_shape(o))
                arr = np.empty(shape, dtype=trt.nptype(engine.get_tensor_dtype(o)))
                d = _check(cudart.cudaMalloc(max(arr.nbytes, 1)))
                allocs.append(d)
                ctx.set_tensor_address(o, int(d))
                host_out[o] = (arr, d)
            if not ctx.execute_async_v3(_handle(stream)):
                raise RuntimeError("execute_async_v3 failed (see the TensorRT log)")
            for o, (arr, d) in host_out.items():
                _check(cudart.cudaMemcpyAsync(arr.ctypes.data, d, arr.nbytes,
                                              cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost, stream))
            _check(cudart.cudaStreamSynchronize(stream))
            # the class scores by name: a two-stage model's engine also outputs its lesion "mask"
            logits = "logits" if "logits" in host_out else outputs[0]
            results.append(host_out[logits][0][:n].astype(np.float32))
            for d in allocs:
                _check(cudart.cudaFree(d))
            allocs = []
    finally:
        for d in allocs:
            cudart.cudaFree(d)
        cudart.cudaStreamDestroy(stream)
    return np.concatenate(results)


def cmd_golden(bundle, man, engine=None, out=None):
    try:
        import numpy as np
    except ImportError:
        return _fail("numpy is needed for the golden check (pip3 install numpy)", 2)
    g = man.get("golden") or {}
    errors, checks = [], []
    x = np.load(str(Path(bundle) / g["inputs"]), allow_pickle=False)
    prep = (man.get("model") or {}).get("preprocessing") or {}
    classes = (man.get("model") or {}).get("classes")
    if g.get("raw"):
        raw = np.load(str(Path(bundle) / g["raw"]), allow_pickle=False)
        d = float(np.abs(preprocess(raw, prep) - x).max())
        if d > 1e-4:
            errors.append("%s: preprocessing the raw pixels gives inputs that differ by %.3g from %s: the "
                          "preprocessing recorded in the manifest is not the one the golden inputs used"
                          % (g["raw"], d, g["inputs"]))
        else:
            checks.append("%s: preprocessing (/255, mean %s, std %s) reproduces the golden inputs"
                          % (g["raw"], prep.get("mean"), prep.get("std")))
    else:
        print("warn  golden inputs are not from real images: a wrong preprocessing cannot be caught")
    engine = Path(engine) if engine else _default_engine(bundle, man, out)
    if not engine.is_file():
        return _fail("%s: no engine (run `build` first, or pass --engine)" % engine, 2)
    ref = [e for e in g.get("outputs", []) if e.get("precision") == "int8"] or list(g.get("outputs", []))
    if not ref:
        return _fail("%s: no golden outputs listed" % MANIFEST)
    entry = dict(ref[0], model=str(engine))
    expected = np.load(str(Path(bundle) / ref[0]["expected"]), allow_pickle=False)
    dla = ((man.get("build") or {}).get("settings") or {}).get("dla_core")
    try:
        y = run_engine(engine, x, dla)
    except ImportError as e:
        return _fail("the golden check needs tensorrt and cuda-python (%s)" % e, 2)
    except RuntimeError as e:
        return _fail(str(e))
    e2, c2 = compare_golden(y, expected, entry, classes)
    errors += e2
    checks += c2
    for c in checks:
        print("ok    " + c)
    for e in errors:
        print("FAIL  " + e)
    return 1 if errors else 0


def summarize_times(times):
    """median / p90 / p99 (p99 only from >= 1000 samples) of trtexec --exportTimes records."""
    def pct(v, q):
        v = sorted(v)
        return v[min(len(v) - 1, int(round(q / 100.0 * (len(v) - 1))))]
    out = {"n": len(times)}
    for key in ("latencyMs", "computeMs"):
        v = [float(t[key]) for t in times if key in t]
        if v:
            out[key] = {"median": pct(v, 50), "p90": pct(v, 90)}
            if len(v) >= 1000:
                out[key]["p99"] = pct(v, 99)
    return out


def cmd_bench(bundle, man, engine=None, out=None, duration=3, batch=None, trtexec=None):
    exe = _trtexec(trtexec)
    if exe is None:
        return _fail("trtexec not found: pass --trtexec or set TRTEXEC", 2)
    engine = Path(engine) if engine else _default_engine(bundle, man, out)
    if not engine.is_file():
        return _fail("%s: no engine (run `build` first, or pass --engine)" % engine, 2)
    settings = (man.get("build") or {}).get("settings") or {}
    out_dir = _engine_dir(bundle, out)
    out_dir.mkdir(parents=True, exist_ok=True)
    times = out_dir / "times.json"
    run = [exe, "--loadEngine=" + str(engine.resolve()), "--warmUp=200", "--duration=%d" % int(duration),
           "--iterations=1000", "--exportTimes=" + str(times)]
    if settings.get("dynamic_batch") and settings.get("input_name"):
        b = int(batch or settings.get("batch_opt") or 1)
        shape = "x".join(str(d) for d in [b] + list(settings.get("input_shape") or []))
        run.append("--shapes=%s:%s" % (settings["input_name"], shape))
    if settings.get("dla_core") is not None:
        run.append("--useDLACore=%d" % int(settings["dla_core"]))
    print("bench: " + " ".join(run))
    with open(str(out_dir / "bench.log"), "w") as log:
        rc = subprocess.call(run, cwd=str(out_dir), stdout=log, stderr=subprocess.STDOUT)
    if rc != 0 or not times.is_file():
        return _fail("trtexec failed (exit %d); see %s" % (rc, out_dir / "bench.log"))
    s = summarize_times(json.loads(times.read_text()))
    s.update(engine=str(engine), device=probe(), command=run)
    (out_dir / "bench.json").write_text(json.dumps(s, indent=2) + "\n")
    lat = s.get("latencyMs") or {}
    gpu = s.get("computeMs") or {}
    print("ok    %d runs: host latency median %.3f ms (p99 %s), GPU compute median %.3f ms; %s" % (
        s["n"], lat.get("median", float("nan")), lat.get("p99", "n/a (< 1000 runs)"),
        gpu.get("median", float("nan")), out_dir / "bench.json"))
    return 0


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("command", choices=["verify", "build", "golden", "bench", "all"])
    ap.add_argument("--bundle", default=None, help="bundle directory or .tar.gz (default: the directory above tools/)")
    ap.add_argument("--key", default=None, help="Ed25519 public key (PEM): refuse unsigned or wrongly signed bundles")
    ap.add_argument("--allow-extra", action="store_true", help="accept files the manifest does not list")
    ap.add_argument("--trtexec", default=None)
    ap.add_argument("--engine", default=None)
    ap.add_argument("--out", default=None, help="where the engine is built (default: <bundle>-engine/)")
    ap.add_argument("--duration", type=int, default=3)
    ap.add_argument("--batch", type=int, default=None)
    a = ap.parse_args(argv)
    bundle = Path(a.bundle) if a.bundle else Path(__file__).resolve().parent.parent
    if bundle.is_file():
        import atexit
        import tempfile
        tmp = tempfile.mkdtemp(prefix="edgeus-bundle-")
        atexit.register(shutil.rmtree, tmp, True)
        try:
            bundle = safe_extract(bundle, tmp)
        except ValueError as e:
            return _fail(str(e))
    rep = verify_dir(bundle, a.key, a.allow_extra)
    for c in rep["checks"]:
        print("ok    " + c)
    for w in rep["warnings"]:
        print("warn  " + w)
    for e in rep["errors"]:
        print("FAIL  " + e)
    if not rep["ok"]:
        print("%s: NOT verified" % bundle)
        return 1
    man = rep["manifest"]
    if a.command == "verify":
        print("%s: verified" % bundle)
        return 0
    steps = {"build": [cmd_build], "golden": [cmd_golden], "bench": [cmd_bench]}.get(a.command)
    if steps is None:   # all
        have_engine = _default_engine(bundle, man, a.out).is_file()
        steps = ([] if have_engine else [cmd_build]) + [cmd_golden, cmd_bench]
    for step in steps:
        if step is cmd_build:
            rc = cmd_build(bundle, man, a.trtexec, a.out)
        elif step is cmd_golden:
            rc = cmd_golden(bundle, man, a.engine, a.out)
        else:
            rc = cmd_bench(bundle, man, a.engine, a.out, a.duration, a.batch, a.trtexec)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
