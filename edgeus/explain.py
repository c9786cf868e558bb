"""Predict and explain: open any edgeus model, classify images with the model's own preprocessing
and classes, and show where a torch model looks (Grad-CAM), teacher and student side by side.

    m = open_model("runs/<run>/07-package/bundle")       # bundle dir, .onnx, .pt, .engine or a run dir
    x01, x = load_image("scan.png", m.preprocessing)      # [H, W] in [0, 1], [C, H, W] standardised
    probs = m.predict(x[None])                            # [1, K]
    pair = torch_pair("runs/<run>")                       # {"teacher": (module, ckpt), "student": ...}
    cam = gradcam(pair["student"][0], torch.from_numpy(x[None]))   # [1, H, W] in [0, 1]
    lesion_fraction(cam[0], mask), pointing_game(cam[0], mask)

Grad-CAM comes from **captum** (``captum.attr.LayerGradCam``), chosen over torchcam (both import with
the CPU torch 2.13 here and neither needs torchvision): captum is maintained by the PyTorch
organisation with regular releases tracking new torch versions, its ``LayerGradCam`` takes any
``nn.Module`` layer and registers its hooks only for the duration of one ``attribute`` call (torchcam
hooks the model from construction until ``remove_hooks()``, which a long-lived viewer that swaps
models would have to manage), and it has a much larger user base. captum is a dependency of
edgeus, imported lazily: everything here except :func:`gradcam` works without it.

Saliency inside the lesion (images with a lesion mask only):

* :func:`lesion_fraction` — the fraction of the (ReLU'd, upsampled) CAM mass that falls inside the
  mask; a uniform map scores the lesion's area fraction;
* :func:`pointing_game` — 1 when the CAM's maximum lies inside the mask (Zhang et al., 2016).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeus.errors import InputError, MissingDependencyError

IMAGE_EXT = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")


# ----------------------------------------------------------------------------------------------- models
@dataclass
class Model:
    """One model to predict with. ``predict`` takes standardised float32 [B, C, H, W] and returns
    probabilities [B, K]."""
    path: Path
    kind: str                       # onnx | torch | tensorrt
    classes: list[str]
    preprocessing: dict
    module: object = None           # the torch module (kind torch)
    run_dir: Path | None = None     # the compress run this model belongs to, when found
    describe: str = ""
    _session: object = field(default=None, repr=False)

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.ascontiguousarray(x, np.float32)
        if self.kind == "torch":
            import torch

            with torch.no_grad():
                logits = self.module(torch.from_numpy(x)).float().numpy()
        elif self.kind == "onnx":
            from edgeus.onnx.session import run_logits, session

            if self._session is None:
                self._session = session(str(self.path))
            logits = run_logits(self._session, x)
        else:
            runner = self._session                 # an activated TensorRT runner
            feed = {next(iter(runner.input_metadata())): x}
            logits = np.asarray(next(iter(runner.infer(feed).values())), np.float32)
        return softmax(logits)


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def find_run(path: str | Path) -> Path | None:
    """The compress run directory that holds ``path`` (the nearest parent with state.json), if any."""
    p = Path(path).absolute()
    for d in [p] + list(p.parents):
        if (d / "state.json").is_file() and (d / "config.yaml").is_file():
            return d
    return None


def _run_artifacts(run_dir: Path) -> dict:
    state = json.loads((run_dir / "state.json").read_text())
    out = {}
    for k, v in (state.get("artifacts") or {}).items():
        if isinstance(v, str) and v:
            p = Path(v)
            out[k] = p if p.is_absolute() else run_dir / p
    return out


def _torch_model(path: Path) -> Model:
    from edgeus.train.checkpoint import load_checkpoint

    module, ckpt = load_checkpoint(path)
    return Model(path=path, kind="torch", classes=list(ckpt["classes"]), preprocessing=dict(ckpt["preprocessing"]),
                 module=module, run_dir=find_run(path), describe=f"{ckpt['arch']['name']} checkpoint")


def _onnx_model(path: Path, classes=None, preprocessing=None) -> Model:
    from edgeus.onnx.metadata import model_info

    info = model_info(path)
    classes = classes or info.get("classes")
    pre = preprocessing or info.get("preprocessing")
    if not classes or not pre:
        raise InputError(f"{path}: the model carries no edgeus.classes / edgeus.preprocessing metadata; "
                          "export it with `edgeus export` (or predict with its bundle or checkpoint)")
    return Model(path=path, kind="onnx", classes=list(classes), preprocessing=dict(pre), run_dir=find_run(path),
                 describe="ONNX Runtime CPU")


def _engine_model(path: Path) -> Model:
    """A TensorRT engine through ``edgeus.deploy.runners``; classes and preprocessing from the bundle
    or run beside it (an engine file carries no metadata of ours)."""
    from edgeus.deploy.runners import make_runner

    try:
        runner = make_runner(path, backend="tensorrt")
        runner.activate()          # without TensorRT: MissingDependencyError, which says what to use instead
    except (ImportError, ModuleNotFoundError) as e:
        raise MissingDependencyError(f"{path}: running a TensorRT engine needs TensorRT and CUDA on this machine "
                          f"({e}); predict with the bundle's ONNX model instead") from None
    root = path.parent.parent if (path.parent.parent / "manifest.json").is_file() else path.parent
    meta = _bundle_meta(root) if (root / "manifest.json").is_file() else None
    if meta is None:
        runner.deactivate()
        raise InputError(f"{path}: a TensorRT engine carries no classes or preprocessing; predict with the bundle "
                          "that holds it (edgeus predict <bundle> ...)")
    return Model(path=path, kind="tensorrt", classes=meta["classes"], preprocessing=meta["preprocessing"],
                 run_dir=find_run(path), describe="TensorRT", _session=runner)


def _bundle_meta(root: Path) -> dict:
    man = json.loads((root / "manifest.json").read_text())
    m = man.get("model", {})
    return {"classes": m.get("classes"), "preprocessing": m.get("preprocessing"), "manifest": man}


def open_model(path: str | Path) -> Model:
    """Open a bundle directory, a compress run directory (its deployed student), an ``.onnx``, a
    ``.pt`` checkpoint or a TensorRT ``.engine``."""
    p = Path(path)
    if not p.exists():
        raise InputError(f"{p}: no such model, bundle or run directory")
    if p.is_dir():
        if (p / "manifest.json").is_file():
            meta = _bundle_meta(p)
            order = meta["manifest"].get("runtime_order") or []
            onnx = [p / o for o in order if o.endswith(".onnx") and (p / o).is_file()]
            if not onnx:
                raise InputError(f"{p}: the bundle lists no ONNX model this machine can run")
            m = _onnx_model(onnx[0], meta["classes"], meta["preprocessing"])
            m.describe = f"bundle {p.name}: {onnx[0].name} on ONNX Runtime CPU"
            return m
        if (p / "state.json").is_file():
            a = _run_artifacts(p)
            for key in ("int8_onnx", "fp32_onnx", "onnx"):
                if key in a and a[key].is_file():
                    m = _onnx_model(a[key])
                    m.run_dir = p
                    m.describe = f"run {p.name}: {a[key].relative_to(p)}"
                    return m
            if "model" in a:
                return _torch_model(a["model"])
            raise InputError(f"{p}: the run has no model yet")
        raise InputError(f"{p}: a directory that is neither a bundle (manifest.json) nor a compress run (state.json)")
    if p.name.endswith(".tar.gz"):
        raise InputError(f"{p}: unpack the bundle archive first (tar xzf) and predict with its directory")
    suffix = p.suffix.lower()
    if suffix == ".onnx":
        return _onnx_model(p)
    if suffix in (".pt", ".pth"):
        return _torch_model(p)
    if suffix in (".engine", ".plan", ".trt"):
        return _engine_model(p)
    raise InputError(f"{p}: unknown model type {suffix!r} (bundle dir, run dir, .onnx, .pt or .engine)")


def torch_pair(run_dir: str | Path) -> dict:
    """The run's teacher (``00-teacher/model.pt``) and its last torch stage's model (the student behind
    the exported ONNX): {"teacher": Model, "student": Model}; a missing one is absent."""
    run_dir = Path(run_dir)
    a = _run_artifacts(run_dir)
    out = {}
    if a.get("teacher_model") and a["teacher_model"].is_file():
        out["teacher"] = _torch_model(a["teacher_model"])
    if a.get("model") and a["model"].is_file() and a["model"] != a.get("teacher_model"):
        out["student"] = _torch_model(a["model"])
        out["student"].describe += f" ({a['model'].parent.name})"
    return out


# ----------------------------------------------------------------------------------------------- images
def list_images(args) -> list[Path]:
    """Image files named by ``args`` (files or folders, folders searched recursively); lesion masks
    (``*_mask*.png``) are not images."""
    from edgeus.data.readers import _MASK_RE

    out = []
    for a in args:
        p = Path(a)
        if p.is_dir():
            out += sorted(f for f in p.rglob("*") if f.suffix.lower() in IMAGE_EXT and not _MASK_RE.search(f.stem))
        elif p.is_file():
            out.append(p)
        else:
            raise InputError(f"{p}: no such image or folder")
    if not out:
        raise InputError(f"no images ({', '.join(IMAGE_EXT)}) in {', '.join(map(str, args))}")
    return out


def load_image(path: str | Path, preprocessing: dict) -> tuple[np.ndarray, np.ndarray]:
    """(image [H, W] in [0, 1] at the model's size, standardised [C, H, W] float32), the way the
    training data was prepared (grayscale, area resize, channel repeat, (x - mean) / std)."""
    import torch

    from edgeus.data import _decode
    from edgeus.data.transforms import normalise

    size = int(preprocessing["image_size"])
    try:
        raw = _decode(str(path), size).astype(np.float32) / 255.0
    except Exception as e:
        raise InputError(f"{path}: not a readable image ({type(e).__name__}: {e})") from None
    x = normalise(torch.from_numpy(raw)[None], int(preprocessing["in_chans"]), preprocessing["mean"],
                  preprocessing["std"]).numpy().astype(np.float32)
    return raw, x


def find_mask(path: str | Path, size: int) -> np.ndarray | None:
    """The lesion mask beside an image (BUSI naming: ``<stem>_mask.png``, ``<stem>_mask_1.png``),
    resized to ``size``; None when there is none."""
    from edgeus.data import _decode_mask

    p = Path(path)
    masks = sorted(str(f) for f in p.parent.glob(f"{p.stem}_mask*{p.suffix}"))
    return _decode_mask(masks, size) if masks else None


# ----------------------------------------------------------------------------------------------- Grad-CAM
def cam_layer(module, preprocessing: dict):
    """The layer Grad-CAM reads: the last convolution (more than one output channel) whose output is
    still at least max(4, input/16) pixels wide — the last block of a small input is 2x2, too coarse
    to say whether a lesion is looked at. Returns (name, layer)."""
    import torch

    size, chans = int(preprocessing["image_size"]), int(preprocessing["in_chans"])
    seen = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.append((n, mod, tuple(o.shape))))
             for n, m in module.named_modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            module(torch.zeros(1, chans, size, size))
    finally:
        for h in hooks:
            h.remove()
    if not seen:
        raise InputError("Grad-CAM needs a convolutional model; this one has no Conv2d")
    min_side = max(4, size // 16)
    good = [s for s in seen if s[2][1] > 1 and min(s[2][2:]) >= min_side]
    name, layer, _ = (good or [s for s in seen if s[2][1] > 1] or seen)[-1]
    return name, layer


def gradcam(module, x, target=None, layer=None, preprocessing: dict | None = None) -> np.ndarray:
    """Grad-CAM maps [B, H, W] in [0, 1] (each map scaled by its own maximum; 0 where it is all zero).

    ``target``: class index per image (default: the model's own prediction). ``layer``: a module of
    ``module`` (default :func:`cam_layer`)."""
    import torch

    try:
        from captum.attr import LayerAttribution, LayerGradCam
    except ImportError:
        raise MissingDependencyError("saliency maps need captum: pip install captum (a dependency of edgeus)") from None
    x = torch.as_tensor(x, dtype=torch.float32)
    if layer is None:
        pre = preprocessing or {"image_size": x.shape[-1], "in_chans": x.shape[1]}
        layer = cam_layer(module, pre)[1]
    module.eval()
    if target is None:
        with torch.no_grad():
            target = module(x).argmax(1)
    target = torch.as_tensor(target, dtype=torch.long).reshape(-1)
    with torch.enable_grad():
        attr = LayerGradCam(module, layer).attribute(x, target=target, relu_attributions=True)
    attr = LayerAttribution.interpolate(attr.detach(), tuple(x.shape[-2:]), "bilinear")[:, 0].clamp_min(0)
    mx = attr.flatten(1).max(1).values.clamp_min(1e-12)[:, None, None]
    return (attr / mx).numpy().astype(np.float32)


def lesion_fraction(cam: np.ndarray, mask: np.ndarray) -> float | None:
    """Fraction of the CAM's mass inside the lesion mask (None without a lesion or without saliency)."""
    mask = np.asarray(mask, bool)
    total = float(np.sum(cam))
    if not mask.any() or total <= 0:
        return None
    return float(np.sum(cam[mask]) / total)


def pointing_game(cam: np.ndarray, mask: np.ndarray) -> float | None:
    """1.0 when the CAM's maximum lies inside the lesion, else 0.0 (None without a lesion)."""
    mask = np.asarray(mask, bool)
    if not mask.any() or float(np.max(cam)) <= 0:
        return None
    return float(mask.flat[int(np.argmax(cam))])


def overlay(img01: np.ndarray, cam: np.ndarray | None, alpha: float = 0.45) -> np.ndarray:
    """RGB uint8 [H, W, 3]: the grayscale image with the CAM blended in (jet colours)."""
    import matplotlib

    gray = np.repeat(np.clip(img01, 0, 1)[..., None], 3, axis=2)
    if cam is None:
        return (gray * 255).round().astype(np.uint8)
    heat = matplotlib.colormaps["jet"](np.clip(cam, 0, 1))[..., :3]
    a = alpha * np.clip(cam, 0, 1)[..., None] ** 0.5
    return ((gray * (1 - a) + heat * a) * 255).round().astype(np.uint8)


def mask_outline(mask: np.ndarray) -> np.ndarray:
    """The boundary pixels of a mask (for drawing the lesion's outline)."""
    m = np.asarray(mask, bool)
    inner = m.copy()
    inner[1:, :] &= m[:-1, :]
    inner[:-1, :] &= m[1:, :]
    inner[:, 1:] &= m[:, :-1]
    inner[:, :-1] &= m[:, 1:]
    return m & ~inner


def save_panels(path: str | Path, img01: np.ndarray, panels: list[tuple[str, np.ndarray | None]],
                mask: np.ndarray | None = None, title: str = "") -> Path:
    """A PNG with the image and one overlay per panel (title, cam), the lesion outlined in white."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = 1 + len(panels)
    fig, axes = plt.subplots(1, n, figsize=(3.0 * n, 3.4), squeeze=False)
    items = [("image", None)] + list(panels)
    for ax, (t, cam) in zip(axes[0], items):
        rgb = overlay(img01, cam)
        if mask is not None and np.asarray(mask).any():
            rgb = rgb.copy()
            rgb[mask_outline(mask)] = (255, 255, 255)
        ax.imshow(rgb, interpolation="nearest")
        ax.set_title(t, fontsize=9)
        ax.axis("off")
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0, 1, 0.9 if title else 1))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------------------------- split-level
def saliency_agreement(teacher, student, images01: np.ndarray, x: np.ndarray, masks: np.ndarray,
                       has_mask: np.ndarray | None = None, preprocessing: dict | None = None,
                       batch: int = 32) -> dict:
    """Where teacher and student look on a set of images (the report's "saliency inside the lesion").

    ``teacher`` / ``student``: torch modules; ``x`` standardised [N, C, H, W]; ``masks`` bool [N, H, W].
    Each model's CAM is for its own predicted class. Returns per model the mean lesion fraction and
    pointing-game hit rate over images that have a lesion, the mean lesion area fraction (what a
    uniform map would score), and the mean Pearson correlation of the two models' maps.
    """
    n = len(x)
    cams = {}
    for name, mod in (("teacher", teacher), ("student", student)):
        layer = cam_layer(mod, preprocessing or {"image_size": x.shape[-1], "in_chans": x.shape[1]})[1]
        cams[name] = np.concatenate([gradcam(mod, x[i:i + batch], layer=layer) for i in range(0, n, batch)]) \
            if n else np.zeros((0,) + x.shape[-2:], np.float32)
    masks = np.asarray(masks, bool)
    lesion = masks.reshape(n, -1).any(1) if n else np.zeros(0, bool)
    if has_mask is not None:
        lesion &= np.asarray(has_mask, bool)
    out = {"n_images": int(n), "n_lesion": int(lesion.sum()),
           "area_fraction": float(np.mean([masks[i].mean() for i in np.flatnonzero(lesion)])) if lesion.any() else None}
    per = {}
    for name, c in cams.items():
        fr = [lesion_fraction(c[i], masks[i]) for i in np.flatnonzero(lesion)]
        pg = [pointing_game(c[i], masks[i]) for i in np.flatnonzero(lesion)]
        fr, pg = [v for v in fr if v is not None], [v for v in pg if v is not None]
        per[name] = {"lesion_fraction": float(np.mean(fr)) if fr else None,
                     "pointing_game": float(np.mean(pg)) if pg else None, "per_image_fraction": fr}
        out[name] = {k: v for k, v in per[name].items() if k != "per_image_fraction"}
    corr = []
    for i in range(n):
        a, b = cams["teacher"][i].ravel(), cams["student"][i].ravel()
        if a.std() > 0 and b.std() > 0:
            corr.append(float(np.corrcoef(a, b)[0, 1]))
    out["cam_correlation"] = float(np.mean(corr)) if corr else None
    out["cams"] = cams     # [N, H, W] per model (not JSON: callers drop it before saving)
    return out


__all__ = ["Model", "open_model", "torch_pair", "find_run", "list_images", "load_image", "find_mask", "cam_layer",
           "gradcam", "lesion_fraction", "pointing_game", "overlay", "save_panels", "saliency_agreement", "softmax"]
