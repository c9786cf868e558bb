"""``edgeus build``: from a Q/DQ ONNX model to a TensorRT engine for a target, or to a ready build.

The engine is built here (TensorRT Python API) only where it will run: TensorRT importable, a
builder creatable on a CUDA device, the local TensorRT inside the target's range and the local
GPU's compute capability the target's (``local_build_blocker``). Everywhere else the build does
all that needs no GPU: the compatibility check of the ONNX (``trt_compat``), the manifest (status
``device-build-required`` with the reason), the ``trtexec`` command line and a small
``build_engine.sh`` that builds the engine on the device and records what it was built with.
The trtexec options are those of the lowest TensorRT the target's range admits (``trt_features``).

Precision follows TensorRT 10's explicit quantisation: a Q/DQ model is built *strongly typed*
(``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` / ``trtexec --stronglyTyped``), where the types
come from the graph and the precision flags FP16/INT8 are not allowed. TensorRT 8.x (Xavier NX,
JetPack 5) has no strong typing: there the Q/DQ graph is built with ``--int8`` (+ ``--fp16``).
"""
from __future__ import annotations

import json
import logging
import shlex
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from edgeus.deploy import manifest as mf
from edgeus.deploy.config import BuildConfig, section
from edgeus.deploy.trt_compat import CompatReport, check_onnx, load_model
from edgeus.deploy.versions import lower_bound, parse_version
from edgeus.errors import EdgeusError, MissingDependencyError

log = logging.getLogger(__name__)

PROBE = Path(__file__).with_name("device_probe.py")


@dataclass
class BuildSettings:
    """Everything the engine build depends on, in one JSON-able record (written to the manifest)."""
    target: str
    onnx: str                      # file name of the ONNX inside the build directory
    engine: str                    # file name of the engine to write
    input_name: str
    input_shape: list[int]         # C, H, W (static)
    batch_min: int = 1
    batch_opt: int = 1
    batch_max: int = 1
    dynamic_batch: bool = True
    strongly_typed: bool = True
    int8: bool = False
    fp16: bool = False
    sparse_weights: bool = False
    dla_core: int | None = None
    workspace_mb: int = 1024
    builder_optimization_level: int | None = 3
    timing_cache: str = "timing.cache"
    tensorrt_range: str | None = None
    jetpack_range: str | None = None
    tensorrt_floor: str | None = None   # the lowest TensorRT the flags must work on (the range's lower bound)
    notes: list[str] = field(default_factory=list)

    def shape(self, batch: int) -> str:
        return "x".join(str(d) for d in [batch, *self.input_shape])


# What trtexec and the builder accept, by TensorRT version (read from NVIDIA/TensorRT's
# samples/common/sampleOptions.cpp on release/8.5, 8.6, 9.x, 10.x and 11.0):
#  - 8.5 knows --buildOnly only; 8.6 adds --skipInference (and warns that --buildOnly is deprecated);
#    10.0 removes --buildOnly. Unknown options are fatal.
#  - --builderOptimizationLevel and IBuilderConfig.builder_optimization_level: 8.6+.
#  - --stronglyTyped / NetworkDefinitionCreationFlag.STRONGLY_TYPED: 9.x+, used from 10 (the TensorRT
#    10 explicit-quantisation path); in 11 strong typing is the default, --stronglyTyped a no-op and
#    --int8 / --fp16 (BuilderFlag.INT8 / FP16) are gone.
#  - --memPoolSize=workspace:N is MiB in every version (8.5 reads a plain number; 10 adds suffixes).
NEWEST_KNOWN = (10, 0)


def trt_features(version: tuple[int, ...] | str | None) -> dict[str, Any]:
    """The version-gated trtexec / builder features of TensorRT ``version`` (None: ``NEWEST_KNOWN``)."""
    v = parse_version(version) if isinstance(version, str) else tuple(version or NEWEST_KNOWN)
    return {"skip_inference_flag": "--skipInference" if v >= (8, 6) else "--buildOnly",
            "builder_optimization_level": v >= (8, 6),
            "strongly_typed": v >= (10,),
            "strongly_typed_default": v >= (11,),
            "precision_flags": v < (11,)}


def tensorrt_available() -> bool:
    """TensorRT counts as available only when a builder can be created on a CUDA device."""
    return tensorrt_status()[0]


def tensorrt_status() -> tuple[bool, str]:
    """(True, version) when ``tensorrt`` imports and ``trt.Builder`` can be created; else (False, why).

    Without a CUDA device (or driver) ``trt.Builder(logger)`` raises instead of returning a builder
    (pybind11: "factory function returned nullptr"); that is "not available", not a crash.
    """
    try:
        import tensorrt as trt
    except Exception as e:
        return False, f"tensorrt does not import ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
    try:
        builder = trt.Builder(trt.Logger(trt.Logger.ERROR))
        if builder is None:
            raise RuntimeError("trt.Builder returned None")
        del builder
    except Exception as e:  # pybind11 TypeError on a machine without a CUDA device
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        return False, f"TensorRT {getattr(trt, '__version__', '?')} imports but cannot create a builder ({msg}): no usable CUDA device"
    return True, str(getattr(trt, "__version__", ""))


def local_build_blocker(target, here: dict) -> str | None:
    """Why an engine for ``target`` must not be built on this machine (None: it may).

    ``here``: ``{"tensorrt": version or None, "builder": bool, "builder_error": str, "compute_capability",
    "gpu", "dla_cores": int | None}`` (``local_environment()``). An engine only runs on the TensorRT
    version and GPU architecture that built it, so the local TensorRT must be inside the target's range
    and the local GPU's compute capability must be the target's.
    """
    from edgeus.deploy.versions import in_range

    if not here.get("tensorrt"):
        return here.get("builder_error") or "TensorRT is not installed here (it needs an NVIDIA GPU)"
    if not here.get("builder", False):
        return here.get("builder_error") or f"TensorRT {here['tensorrt']} cannot create a builder here"
    if target.tensorrt and not in_range(here["tensorrt"], target.tensorrt):
        return (f"this machine has TensorRT {here['tensorrt']}, target {target.name} needs TensorRT {target.tensorrt}: "
                "an engine only loads on the TensorRT version that built it")
    cc = here.get("compute_capability")
    if not cc:
        return "no CUDA GPU found here"
    if target.compute_capability and parse_version(cc)[:2] != parse_version(target.compute_capability)[:2]:
        return (f"this GPU ({here.get('gpu') or 'unknown'}) has compute capability {cc}, target {target.name} is "
                f"{target.compute_capability}: an engine is specific to the GPU architecture that built it")
    return None


def local_environment() -> dict:
    """This machine for ``local_build_blocker``: device_probe plus whether a TensorRT builder can be made."""
    from edgeus.deploy.device_probe import probe

    env = probe()
    ok, why = tensorrt_status()
    env["builder"] = ok
    if not ok:
        env["builder_error"] = why
    return env


def check_dla_core(dla_core: int | None, found: int, where: str = "this device") -> None:
    """A clear error when a DLA core is requested that ``where`` does not have (``builder.num_DLA_cores``)."""
    if dla_core is None:
        return
    if found <= 0:
        raise EdgeusError(f"build.dla_core={dla_core}: {where} has no DLA (builder.num_DLA_cores = 0); "
                          "build for the GPU (leave build.dla_core unset) or build on a module with DLA")
    if not 0 <= dla_core < found:
        raise EdgeusError(f"build.dla_core={dla_core}: {where} has {found} DLA core(s) (0..{found - 1}); "
                          "the target file may be wrong for this module")


def resolve_settings(report: CompatReport, target, bcfg, name: str, *, trt_version: str | None = None) -> BuildSettings:
    """Turn the target section, the build section (:class:`BuildConfig`) and the model into settings."""
    if not report.inputs:
        raise EdgeusError("the model has no inputs to build a profile for")
    inp = report.inputs[0]
    if bcfg.input_name:
        match = [t for t in report.inputs if t["name"] == bcfg.input_name]
        if not match:
            raise EdgeusError(f"build.input_name={bcfg.input_name!r}: the model's inputs are "
                              f"{[t['name'] for t in report.inputs]}")
        inp = match[0]
    if len(report.inputs) > 1:
        log.warning("model has %d inputs; the batch profile covers %s only", len(report.inputs), inp["name"])
    dims = inp["shape"]
    chw = [int(d) if isinstance(d, int) else -1 for d in dims[1:]]
    # flags come from the lowest TensorRT the target admits (what the device may have), never from
    # the TensorRT installed here (``trt_version`` only fills in a target without a range)
    trt_low = lower_bound(target.tensorrt) or (parse_version(trt_version) if trt_version else None)
    feats = trt_features(trt_low)
    trt10 = feats["strongly_typed"]
    precision = (target.precision or "int8").lower()

    s = BuildSettings(target=target.name, onnx=f"{name}.onnx", engine=f"{name}.engine",
                      input_name=inp["name"], input_shape=chw,
                      workspace_mb=int(target.workspace_mb or 1024),
                      builder_optimization_level=(int(target.builder_optimization_level)
                                                  if feats["builder_optimization_level"]
                                                  and target.builder_optimization_level is not None else None),
                      sparse_weights=bool(target.sparse_weights),
                      tensorrt_range=target.tensorrt, jetpack_range=target.jetpack,
                      tensorrt_floor=".".join(map(str, trt_low)) if trt_low else None)
    if isinstance(dims[0], int) and dims[0] > 0:
        s.dynamic_batch = False
        s.batch_min = s.batch_opt = s.batch_max = dims[0]
    else:
        b = target.batch
        s.batch_min, s.batch_opt, s.batch_max = int(b.min), int(b.opt), int(b.max)
        if not s.batch_min <= s.batch_opt <= s.batch_max:
            raise EdgeusError(f"target {target.name}: batch profile needs min <= opt <= max, got "
                              f"{s.batch_min}/{s.batch_opt}/{s.batch_max}")

    strong = bcfg.strongly_typed
    if feats["strongly_typed_default"]:
        strong = True   # TensorRT 11: every network is strongly typed
    if strong is None:
        strong = trt10 and (report.qdq_nodes > 0 or precision == "fp32")
    if strong and not trt10:
        raise EdgeusError(f"build.strongly_typed=true needs TensorRT 10; target {target.name} expects "
                          f"TensorRT {target.tensorrt}")
    s.strongly_typed = bool(strong)
    if s.strongly_typed:
        if target.fp16 and precision != "fp32":
            s.notes.append("strongly typed: FP16/INT8 builder flags are not allowed; layers outside the "
                           "Q/DQ pairs run at the ONNX model's float type")
    else:
        s.int8 = precision == "int8" and report.qdq_nodes > 0
        s.fp16 = precision == "fp16" or (bool(target.fp16) and precision != "fp32")
        if precision == "int8" and report.qdq_nodes == 0:
            s.notes.append("INT8 requested but the model has no Q/DQ nodes: building without INT8 "
                           "(implicit calibration is deprecated since TensorRT 10.1); quantise the model first")

    if bcfg.dla_core is not None:
        n = int(target.dla_cores or 0)
        if bcfg.dla_core < 0 or bcfg.dla_core >= max(n, 0) or n == 0:
            raise EdgeusError(f"build.dla_core={bcfg.dla_core}: target {target.name} lists {n} DLA core(s)"
                              + (" (none: build for the GPU)" if n == 0 else f" (0..{n - 1})"))
        s.dla_core = int(bcfg.dla_core)
        s.notes.append("DLA runs INT8/FP16 layers only; the rest falls back to the GPU (GPU_FALLBACK)")
        if s.batch_min != s.batch_max:
            # DLA engines need static shapes: one profile with min = opt = max (at the target's opt batch)
            s.batch_min = s.batch_max = s.batch_opt
            s.notes.append(f"DLA needs static shapes: batch profile fixed at {s.batch_opt} (min = opt = max)")
    if s.sparse_weights:
        s.notes.append("2:4 sparse weights enabled: only layers whose weights are 2:4 sparse gain")
    if bcfg.timing_cache:
        s.timing_cache = str(bcfg.timing_cache)
    return s


def trtexec_args(s: BuildSettings) -> list[str]:
    """The ``trtexec`` command that builds the same engine as ``build_engine``, with the options of the
    lowest TensorRT the target admits (``s.tensorrt_floor``). A list: run it without a shell."""
    feats = trt_features(s.tensorrt_floor)
    args = ["trtexec", f"--onnx={s.onnx}", f"--saveEngine={s.engine}"]
    if s.strongly_typed:
        if not feats["strongly_typed_default"]:
            args.append("--stronglyTyped")
    elif feats["precision_flags"]:
        if s.int8:
            args.append("--int8")
        if s.fp16:
            args.append("--fp16")
    if s.dynamic_batch:
        args += [f"--minShapes={s.input_name}:{s.shape(s.batch_min)}",
                 f"--optShapes={s.input_name}:{s.shape(s.batch_opt)}",
                 f"--maxShapes={s.input_name}:{s.shape(s.batch_max)}"]
    if s.sparse_weights:
        args.append("--sparsity=enable")
    if s.dla_core is not None:
        args += [f"--useDLACore={s.dla_core}", "--allowGPUFallback"]
    args.append(f"--memPoolSize=workspace:{s.workspace_mb}")   # MiB in every version
    if s.builder_optimization_level is not None and feats["builder_optimization_level"]:
        args.append(f"--builderOptimizationLevel={s.builder_optimization_level}")
    args += [f"--timingCacheFile={s.timing_cache}", feats["skip_inference_flag"]]
    return args


def trtexec_command(s: BuildSettings) -> str:
    return shlex.join(trtexec_args(s))


def build_script(s: BuildSettings, onnx_sha256: str) -> str:
    """A bash script that builds the engine on the device and records what built it (engine.json).

    Every file name and argument is quoted (``shlex.quote``) and handed to Python through ``argv``, never
    pasted into code: a hostile file name is data, not a command. The ONNX checksum is checked first.
    """
    from edgeus import __version__

    q = shlex.quote
    cmd = " ".join(['"$TRTEXEC"'] + [q(a) for a in trtexec_args(s)[1:]])
    expect = f"TensorRT {s.tensorrt_range or 'any'}" + (f", JetPack {s.jetpack_range}" if s.jetpack_range else "")
    comment = expect.replace("\n", " ")
    return f"""#!/usr/bin/env bash
# Build the engine for target {s.target.replace(chr(10), ' ')} on the device ({comment}).
# Generated by edgeus {__version__}. Usage:  bash build_engine.sh   (TRTEXEC=/path/to/trtexec to override)
set -euo pipefail
cd "$(dirname "$0")"
ONNX={q(s.onnx)}
ENGINE={q(s.engine)}
EXPECTED_SHA256={q(onnx_sha256)}
ACTUAL_SHA256="$(sha256sum < "$ONNX" | cut -d' ' -f1)"
if [ "$ACTUAL_SHA256" != "$EXPECTED_SHA256" ]; then
  printf '%s: SHA-256 differs from the model edgeus checked; refusing to build\n' "$ONNX" >&2
  exit 1
fi
TRTEXEC="${{TRTEXEC:-$(command -v trtexec || true)}}"
if [ -z "$TRTEXEC" ] && [ -x /usr/src/tensorrt/bin/trtexec ]; then TRTEXEC=/usr/src/tensorrt/bin/trtexec; fi
[ -n "$TRTEXEC" ] || {{ echo "trtexec not found: set TRTEXEC=/path/to/trtexec (JetPack: /usr/src/tensorrt/bin/trtexec)" >&2; exit 1; }}
python3 device_probe.py > device.json || echo '{{}}' > device.json
{cmd} 2>&1 | tee build.log
python3 - "$ENGINE" {q(s.tensorrt_range or "")} {q(s.jetpack_range or "")} <<'PY'
import hashlib, json, os, sys
engine, trt_range, jp_range = sys.argv[1], sys.argv[2] or None, sys.argv[3] or None
probe = json.load(open("device.json"))
h = hashlib.sha256(open(engine, "rb").read()).hexdigest()
info = dict(probe, engine=engine, sha256=h, bytes=os.path.getsize(engine),
            expected={{"tensorrt": trt_range, "jetpack": jp_range}})
json.dump(info, open("engine.json", "w"), indent=2)
print("built", engine, "with TensorRT", probe.get("tensorrt"), "on", probe.get("gpu"),
      "(compute capability", str(probe.get("compute_capability")) + ")")
PY
"""


def model_meta(model) -> dict:
    """classes / preprocessing / arch that ``edgeus.onnx.export_onnx`` stores in the ONNX
    metadata_props (``edgeus.classes``, ``edgeus.preprocessing``, ``edgeus.arch``; JSON values)."""
    raw = {}
    for p in model.metadata_props:
        try:
            raw[p.key] = json.loads(p.value)
        except (json.JSONDecodeError, TypeError):
            raw[p.key] = p.value
    out = {}
    for key in ("classes", "preprocessing", "arch"):
        v = raw.get(f"edgeus.{key}", raw.get(key))
        if v:
            out[key] = v
    return out


def build(onnx_path: str | Path, target, build_cfg, out_dir: str | Path, meta: dict | None = None, *,
          here: dict | None = None) -> dict:
    """Check, prepare and (with TensorRT) build an engine for ``target`` into ``out_dir``.

    ``target``: the target section (:class:`TargetConfig`); ``build_cfg``: the build section
    (:class:`BuildConfig`, None = defaults).

    ``meta``: {"name", "classes", "preprocessing", "source": {"recipe", "run"} (or "recipe"/"run" at
    the top level), "metrics"} (optional;
    missing fields are read from the ONNX metadata). ``here``: this machine as ``local_environment()``
    describes it (tests, dry runs). The engine is built here only when ``local_build_blocker`` finds
    nothing against it; otherwise the status is ``device-build-required`` with the ``reason``.
    Returns a JSON-able report.
    """
    bcfg = build_cfg if build_cfg is not None else section(BuildConfig)
    onnx_path = Path(onnx_path)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = load_model(onnx_path)
    meta = {**model_meta(model), **(meta or {})}
    stem = onnx_path.name[:-5] if onnx_path.name.endswith(".onnx") else onnx_path.stem
    name = bcfg.name or meta.get("name") or stem
    if not isinstance(name, str):
        name = stem
    if not name or name in (".", "..") or any(c in name for c in ("/", "\\", "\0")):
        raise EdgeusError(f"engine name {name!r} is not a plain file name: set build.name=<name>")

    report = check_onnx(model, target)
    (out / "compat.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if not report.ok and bcfg.strict:
        shown = "\n  ".join(report.errors[:8]) + (f"\n  ... {len(report.errors) - 8} more" if len(report.errors) > 8 else "")
        raise EdgeusError(f"{onnx_path.name} is not ready for TensorRT ({target.name}); "
                          f"see {out / 'compat.json'}:\n  {shown}")

    env = here if here is not None else local_environment()
    blocker = local_build_blocker(target, env)
    settings = resolve_settings(report, target, bcfg, name,
                                trt_version=env.get("tensorrt") if env.get("builder") else None)

    dst_onnx = out / settings.onnx
    if dst_onnx.resolve() != onnx_path.resolve():
        shutil.copyfile(onnx_path, dst_onnx)
    onnx_sha = mf.sha256_file(dst_onnx)
    cmd = trtexec_command(settings)
    (out / "trtexec.txt").write_text(cmd + "\n")
    script = out / "build_engine.sh"
    script.write_text(build_script(settings, onnx_sha))
    script.chmod(0o755)
    shutil.copyfile(PROBE, out / "device_probe.py")

    result: dict[str, Any] = {
        "stage": "build", "target": target.name, "onnx": str(dst_onnx), "trtexec": cmd,
        "script": str(script), "compat": {"ok": report.ok, "errors": report.errors, "warnings": report.warnings,
                                          "qdq_nodes": report.qdq_nodes, "qdq_checked": report.qdq_checked},
        "settings": asdict(settings), "engine": None, "tensorrt": None,
    }
    if blocker is None:
        info = build_engine(out / settings.onnx, out / settings.engine, settings,
                            timing_cache=_timing_cache_path(out, settings))
        result.update(status="engine", engine=str(out / settings.engine), tensorrt=info["tensorrt"],
                      io=info["io"])
        result["message"] = (f"built {settings.engine} with TensorRT {info['tensorrt']['version']} on "
                             f"{info['tensorrt'].get('gpu')}")
    else:
        result["status"] = "device-build-required"
        result["reason"] = blocker
        result["message"] = (f"no engine built here: {blocker}. The engine itself must be "
                             f"built on the {target.name} device. Copy {out}/ there and run "
                             f"`bash build_engine.sh` (or: {cmd})")

    m = mf.new_manifest(
        "build",
        model={"name": name, "classes": meta.get("classes"), "preprocessing": meta.get("preprocessing"),
               "inputs": report.inputs, "outputs": report.outputs, "onnx": settings.onnx},
        target=target_dict(target),
        build={"status": result["status"], "reason": result.get("reason"), "settings": asdict(settings),
               "trtexec": cmd, "trtexec_args": trtexec_args(settings)[1:], "script": "build_engine.sh",
               "onnx_sha256": onnx_sha},
        tensorrt=(dict(result["tensorrt"], engine=settings.engine) if result["tensorrt"] else None),
        source=meta.get("source") or {k: meta[k] for k in ("recipe", "run") if meta.get(k)},
        metrics=meta.get("metrics") or {},
    )
    result["manifest"] = str(mf.write_manifest(out, m))
    return result


def _timing_cache_path(out: Path, s: BuildSettings) -> Path:
    p = Path(s.timing_cache)
    return p if p.is_absolute() else out / p


def target_dict(target) -> dict:
    from dataclasses import is_dataclass

    if OmegaConf.is_config(target):
        return OmegaConf.to_container(target, resolve=True)
    return asdict(target) if is_dataclass(target) else dict(target)


# --------------------------------------------------------------------------------------------------
# TensorRT path (written against the TensorRT 10 Python API; runs only where tensorrt imports)
# --------------------------------------------------------------------------------------------------

def build_engine(onnx_path: Path, engine_path: Path, s: BuildSettings, *, timing_cache: Path) -> dict:
    """Parse the ONNX, configure the builder from ``s``, build and save the engine and timing cache."""
    try:
        import tensorrt as trt
    except ImportError as e:  # pragma: no cover - guarded by tensorrt_available()
        raise MissingDependencyError("tensorrt not installed (needs an NVIDIA GPU)") from e
    from edgeus.deploy.device_probe import probe

    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    major = parse_version(trt.__version__)[0]
    flags = 0
    if s.strongly_typed:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    elif major < 10:
        flags |= 1 << int(trt.NetworkDefinitionCreationFlag.EXPLICIT_BATCH)
    network = builder.create_network(flags)
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):
        errs = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise EdgeusError(f"TensorRT's ONNX parser rejected {onnx_path.name}:\n  " + "\n  ".join(errs[:10]))

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(s.workspace_mb) << 20)
    if not s.strongly_typed:  # precision flags are not allowed on strongly typed networks
        if s.int8:
            config.set_flag(trt.BuilderFlag.INT8)
        if s.fp16:
            config.set_flag(trt.BuilderFlag.FP16)
    if s.sparse_weights:
        config.set_flag(trt.BuilderFlag.SPARSE_WEIGHTS)
    if s.dla_core is not None:
        check_dla_core(s.dla_core, int(builder.num_DLA_cores))
        config.default_device_type = trt.DeviceType.DLA
        config.DLA_core = s.dla_core
        config.set_flag(trt.BuilderFlag.GPU_FALLBACK)
    if s.builder_optimization_level is not None and hasattr(config, "builder_optimization_level"):
        config.builder_optimization_level = int(s.builder_optimization_level)

    inp = network.get_input(0)
    for i in range(network.num_inputs):
        if network.get_input(i).name == s.input_name:
            inp = network.get_input(i)
    if s.dynamic_batch:
        profile = builder.create_optimization_profile()
        profile.set_shape(inp.name, [s.batch_min, *s.input_shape], [s.batch_opt, *s.input_shape],
                          [s.batch_max, *s.input_shape])
        config.add_optimization_profile(profile)

    cache_bytes = timing_cache.read_bytes() if timing_cache.is_file() else b""
    cache = config.create_timing_cache(cache_bytes)
    config.set_timing_cache(cache, ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise EdgeusError(f"TensorRT failed to build {engine_path.name} (see the TensorRT log above)")
    tmp = engine_path.with_name(engine_path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(serialized)
    tmp.replace(engine_path)
    with open(timing_cache, "wb") as f:
        f.write(cache.serialize())

    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(engine_path.read_bytes())
    io = []
    for i in range(engine.num_io_tensors):
        tname = engine.get_tensor_name(i)
        io.append({"name": tname,
                   "mode": "input" if engine.get_tensor_mode(tname) == trt.TensorIOMode.INPUT else "output",
                   "shape": list(engine.get_tensor_shape(tname)),
                   "dtype": str(trt.nptype(engine.get_tensor_dtype(tname)).__name__)})
    env = probe()
    env["tensorrt"] = trt.__version__
    dla_found = builder.num_DLA_cores
    info = {"version": trt.__version__, "gpu": env.get("gpu"), "compute_capability": env.get("compute_capability"),
            "jetpack": env.get("jetpack"), "dla_cores_found": dla_found,
            "platform_has_fast_int8": bool(getattr(builder, "platform_has_fast_int8", False))}
    return {"tensorrt": info, "io": io}
