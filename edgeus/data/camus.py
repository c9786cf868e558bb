"""CAMUS (Leclerc et al., IEEE TMI 2019): echocardiographic view recognition, seed 003's dataset.

The challenge's NIfTI layout (``data=camus data.root=<.../database_nifti>``)::

    <root>/patient0001/patient0001_2CH_ED.nii.gz        end-diastole frame, apical two-chamber view
    <root>/patient0001/patient0001_2CH_ED_gt.nii.gz     its segmentation (0 background, 1 LV cavity,
                                                        2 myocardium, 3 left atrium)
    <root>/patient0001/patient0001_2CH_ES.nii.gz (+ _gt), patient0001_4CH_{ED,ES}.nii.gz (+ _gt)
    <root>/patient0001/Info_2CH.cfg, Info_4CH.cfg        "ED: 1", "ES: 15", "ImageQuality: Good", ...
    (half-sequence files and anything else are ignored; patient folders may sit one level deeper,
    e.g. under training/ and testing/)

Classes: by default the view, ``2CH`` vs ``4CH`` (the paper's task). ``data.classes`` chooses and
orders them, and its names choose the labelling: view names (``[2CH, 4CH]``) or view-and-phase names
(``[2CH_ED, 2CH_ES, 4CH_ED, 4CH_ES]``, or a subset: frames of other classes are left out). The class
names are what a model's data fingerprint records, so ``edgeus eval`` rebuilds the same labelling.
Image quality (``Good``, ``Medium``, ``Poor`` from the Info files; ``unknown`` without one) is kept
per frame (:func:`scan`), and ``read(cfg, qualities=[...])`` / ``scan(root, qualities)`` keep only
some qualities (no config key yet).

Splits are by patient (``groups``): a patient's views never straddle train / val / test. Masks are the
union of the annotated structures (``_gt`` > 0: LV, myocardium, atrium), so the two-stage model and
Grad-CAM's pointing game get the heart's outline; ``has_mask`` is false where no ``_gt`` file exists.

Frames are read with nibabel (an optional dependency, imported here only); CAMUS stores a frame as a
(width, height) array, so it is transposed to (rows, columns). 8-bit intensities are divided by 255,
others scaled by their maximum.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from edgeus.errors import DataError

log = logging.getLogger("edgeus.data")

LAYOUT = ("CAMUS layout: <root>/patientNNNN/patientNNNN_{2CH,4CH}_{ED,ES}.nii.gz with _gt masks and "
          "Info_2CH.cfg / Info_4CH.cfg beside them")
LABELS = {"view": ["2CH", "4CH"], "view_phase": ["2CH_ED", "2CH_ES", "4CH_ED", "4CH_ES"]}
QUALITIES = ("Good", "Medium", "Poor", "unknown")
_FRAME = re.compile(r"^(patient\d+)_(2CH|4CH)_(ED|ES)\.nii(\.gz)?$")


@dataclass
class CamusSource:
    """What :func:`scan` finds: one entry per frame, in patient, view, phase order."""
    paths: list[str] = field(default_factory=list)
    masks: list[str | None] = field(default_factory=list)
    patients: list[str] = field(default_factory=list)
    views: list[str] = field(default_factory=list)
    phases: list[str] = field(default_factory=list)
    qualities: list[str] = field(default_factory=list)
    info: list[dict] = field(default_factory=list)


def read_info(path: str | Path) -> dict:
    """An ``Info_<view>.cfg`` as a dict (``"ED": "1", "ImageQuality": "Good", ...``); numbers stay strings."""
    out = {}
    for line in Path(path).read_text(errors="replace").splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip():
            out[key.strip()] = value.strip()
    return out


def _patient_dirs(base: Path) -> list[Path]:
    dirs = sorted(p for p in base.glob("patient*") if p.is_dir())
    if not dirs:   # e.g. <root>/training/patient0001, <root>/testing/patient0401
        dirs = sorted(p for p in base.glob("*/patient*") if p.is_dir())
    return dirs


def scan(root: str | Path | None, qualities: list[str] | None = None) -> CamusSource:
    """Every ED / ES frame under ``root`` (see the module docstring), filtered by image quality."""
    if not root:
        raise DataError(f"data.root is not set; point it at the CAMUS folder ({LAYOUT})")
    base = Path(root).expanduser()
    if not base.is_dir():
        raise DataError(f"data.root={root} does not exist or is not a folder; expected the {LAYOUT}")
    keep_q = None
    if qualities:
        bad = [q for q in qualities if q not in QUALITIES]
        if bad:
            raise DataError(f"CAMUS image quality {bad} unknown; use {list(QUALITIES)}")
        keep_q = set(qualities)
    src = CamusSource()
    dropped = 0
    for pdir in _patient_dirs(base):
        infos = {}
        for view in ("2CH", "4CH"):
            f = pdir / f"Info_{view}.cfg"
            infos[view] = read_info(f) if f.is_file() else {}
        for f in sorted(pdir.iterdir()):
            m = _FRAME.match(f.name)
            if not m or m.group(1) != pdir.name:
                continue
            patient, view, phase = m.group(1), m.group(2), m.group(3)
            info = infos[view]
            quality = info.get("ImageQuality", "unknown") or "unknown"
            if keep_q is not None and quality not in keep_q:
                dropped += 1
                continue
            gt = [g for g in (f.with_name(f"{patient}_{view}_{phase}_gt.nii.gz"),
                              f.with_name(f"{patient}_{view}_{phase}_gt.nii")) if g.is_file()]
            src.paths.append(str(f))
            src.masks.append(str(gt[0]) if gt else None)
            src.patients.append(patient)
            src.views.append(view)
            src.phases.append(phase)
            src.qualities.append(quality)
            src.info.append({k: info[k] for k in ("ED", "ES", "NbFrame", "ImageQuality") if k in info})
    if not src.paths:
        raise DataError(f"no CAMUS frames found under {base}" + (f" of quality {sorted(keep_q)}" if keep_q else "")
                        + f"; expected the {LAYOUT}")
    if dropped:
        log.info("camus: %d frame(s) of other image qualities than %s left out", dropped, sorted(keep_q))
    return src


def read_frame(path: str | Path) -> np.ndarray:
    """One frame as float32 [rows, columns] in [0, 1] (CAMUS stores (width, height): transposed)."""
    try:
        import nibabel as nib
    except ImportError:  # pragma: no cover - depends on the environment
        raise DataError("data=camus reads NIfTI files with nibabel: pip install nibabel") from None
    arr = np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32))
    arr = np.squeeze(arr)
    if arr.ndim != 2:
        raise ValueError(f"expected one 2-D frame, found an array of shape {arr.shape}")
    arr = arr.T
    if not np.isfinite(arr).all():
        raise ValueError("frame holds NaN or Inf values")
    lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
    if lo < 0:
        arr = arr - lo
        hi -= lo
    scale = 1.0 if hi <= 1.0 else (255.0 if hi <= 255.0 else hi)
    return (arr / scale).astype(np.float32)


def read_mask(path: str | Path) -> np.ndarray:
    """The ``_gt`` labels as a boolean [rows, columns] mask of every annotated structure (label > 0)."""
    import nibabel as nib

    arr = np.squeeze(np.asarray(nib.load(str(path)).get_fdata(dtype=np.float32)))
    if arr.ndim != 2:
        raise ValueError(f"expected one 2-D mask, found an array of shape {arr.shape}")
    return arr.T > 0.5


def scheme_of(classes: list[str] | None) -> str:
    """``view`` or ``view_phase``, from the class names asked for (``view`` when none are)."""
    if not classes:
        return "view"
    for scheme, names in LABELS.items():
        if all(c in names for c in classes):
            return scheme
    raise DataError(f"data.classes={list(classes)} are not CAMUS classes: use views {LABELS['view']} or views "
                    f"with phases {LABELS['view_phase']} (not a mix)")


def labels_for(src: CamusSource, classes: list[str] | None) -> tuple[list[int | None], list[str]]:
    """Integer labels (None = a frame of a class not asked for) and the class names."""
    scheme = scheme_of(classes)
    names = list(classes) if classes else LABELS[scheme]
    if len(set(names)) != len(names):
        raise DataError(f"data.classes={names} names a class twice")
    index = {c: i for i, c in enumerate(names)}
    keys = [v if scheme == "view" else f"{v}_{p}" for v, p in zip(src.views, src.phases)]
    return [index.get(k) for k in keys], names


def read(cfg, qualities: list[str] | None = None):
    """``data=camus``: decode every frame once at ``data.image_size``. Returns ``(Images, classes, skipped)``
    as :func:`edgeus.data._read` does for the other datasets; ``qualities`` keeps those image qualities."""
    from edgeus.data import Images
    from edgeus.data.transforms import resize

    size = int(cfg.image_size)
    src = scan(cfg.root, qualities)
    labels, classes = labels_for(src, list(cfg.classes) if cfg.classes else None)
    pix, masks, has, ys, ids, groups, skipped = [], [], [], [], [], [], []
    for i, path in enumerate(src.paths):
        if labels[i] is None:
            continue
        try:
            img = read_frame(path)
        except Exception as e:
            skipped.append((path, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
            continue
        mask = None
        if src.masks[i]:
            try:
                mask = read_mask(src.masks[i])
                if mask.shape != img.shape:
                    raise ValueError(f"mask {mask.shape} and frame {img.shape} differ in size")
            except Exception as e:   # a broken mask loses only the mask
                log.warning("unreadable CAMUS mask %s skipped: %s", src.masks[i], e)
                mask = None
        t = resize(torch.from_numpy(img), size)
        pix.append((t.clamp(0, 1).numpy() * 255).round().astype(np.uint8))
        if mask is not None:
            masks.append(resize(torch.from_numpy(mask.astype(np.float32)), size).numpy() > 0.5)
        else:
            masks.append(np.zeros((size, size), bool))
        has.append(mask is not None)
        ys.append(labels[i])
        ids.append(path)
        groups.append(src.patients[i])
    for path, why in skipped:
        log.warning("unreadable CAMUS frame skipped: %s (%s)", path, why)
    if not pix:
        raise DataError(f"none of the {len(src.paths)} CAMUS frames could be read")
    y = np.asarray(ys, np.int64)
    for k, c in enumerate(classes):
        if not (y == k).any():
            raise DataError(f"CAMUS class {c!r} has no readable frames under {cfg.root}")
    return Images(np.stack(pix), np.stack(masks), np.asarray(has), y, ids, groups), classes, skipped
