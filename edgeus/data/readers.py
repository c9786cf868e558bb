"""Dataset layouts on disk: BUSI, TMED-2 labelled set, and any class-per-folder tree.

Every reader returns a :class:`Source`: image paths, integer labels, class names, optional mask
paths and optional group ids (patients/studies, kept together across splits). Images are decoded
later, once, by :func:`load_images`, which reports unreadable files by path and skips them.
"""
from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from edgeus.errors import DataError

log = logging.getLogger("edgeus.data")
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"}
_MASK_RE = re.compile(r"_mask(_\d+)?$", re.IGNORECASE)


@dataclass
class Source:
    paths: list[str]
    labels: list[int]
    classes: list[str]
    masks: list[list[str]] = field(default_factory=list)   # per image: mask files (may be empty)
    groups: list[str] | None = None


# Pillow modes of one-channel images deeper than 8 bits, with the value of full white
_DEEP_MODES = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0}


def decode_gray(path: str | Path) -> np.ndarray:
    """One image as grayscale float32 [H, W] in [0, 1], at its own bit depth.

    8-bit images (and colour, palette, alpha: converted to luminance) are divided by 255; 16-bit
    grayscale (PNG, TIFF) by 65535, so a 0..65535 ramp stays a ramp instead of saturating the way
    Pillow's ``convert("L")`` clips it. 32-bit integer images are scaled by 65535 when they come from
    a 16-bit PNG (older Pillow) or hold values up to 65535, else by their own maximum; float images
    already in [0, 1] are kept, others scaled by their maximum.
    """
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        mode, fmt = im.mode, im.format
        if mode in _DEEP_MODES:
            return np.asarray(im, dtype=np.float32) / np.float32(_DEEP_MODES[mode])
        if mode in ("I", "F"):
            arr = np.asarray(im, dtype=np.float64)
            if not np.isfinite(arr).all():
                raise ValueError(f"{mode} image holds NaN or Inf pixel values")
            lo, hi = float(arr.min(initial=0.0)), float(arr.max(initial=0.0))
            if lo < 0:
                raise ValueError(f"{mode} image holds negative pixel values (min {lo:g}); expected intensities")
            if mode == "F" and hi <= 1.0:
                scale = 1.0
            elif mode == "I" and (fmt == "PNG" or hi <= 65535):
                scale = 65535.0 if (fmt == "PNG" or hi > 255) else 255.0
            else:
                scale = hi or 1.0
            return (arr / scale).astype(np.float32)
        return np.asarray(im.convert("L"), dtype=np.float32) / 255.0


def _need_root(root: str | None, layout: str) -> Path:
    if not root:
        raise DataError(f"data.root is not set; point it at a folder in the {layout}")
    p = Path(root).expanduser()
    if not p.is_dir():
        raise DataError(f"data.root={root} does not exist or is not a folder; expected the {layout}")
    return p


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTS)


def read_class_folders(root: str | None, layout: str, with_masks: bool = False,
                       classes: list[str] | None = None) -> Source:
    base = _need_root(root, layout)
    folders = sorted(d for d in base.iterdir() if d.is_dir() and not d.name.startswith("."))
    if classes:
        by_name = {d.name: d for d in folders}
        missing = [c for c in classes if c not in by_name]
        if missing:
            raise DataError(f"class folder(s) {missing} not found under {base}; found: {sorted(by_name)}")
        folders = [by_name[c] for c in classes]
    if len(folders) < 2:
        raise DataError(f"{base} has {len(folders)} class folder(s); the {layout} needs at least two")
    src = Source([], [], [d.name for d in folders])
    for k, d in enumerate(folders):
        files = _images_in(d)
        images = [f for f in files if not _MASK_RE.search(f.stem)]
        if not images:
            raise DataError(f"class folder {d} has no images ({', '.join(sorted(IMAGE_EXTS))}); "
                            f"remove it or add images")
        masks_by_stem: dict[str, list[str]] = {}
        for f in files:
            m = _MASK_RE.search(f.stem)
            if m:
                masks_by_stem.setdefault(f.stem[: m.start()], []).append(str(f))
        for f in images:
            src.paths.append(str(f))
            src.labels.append(k)
            src.masks.append(sorted(masks_by_stem.get(f.stem, [])) if with_masks else [])
    return src


BUSI_LAYOUT = "BUSI layout: <root>/benign/*.png, <root>/malignant/*.png, <root>/normal/*.png (masks *_mask*.png beside them)"
FOLDER_LAYOUT = "class-per-folder layout: <root>/<class_name>/<image files>"
TMED2_LAYOUT = ("TMED-2 labelled-set layout: a CSV (columns query_key, view_label, diagnosis_label) "
                "beside the PNGs (in <root>, <root>/labeled or any subfolder)")


def read_busi(root, classes=None) -> Source:
    return read_class_folders(root, BUSI_LAYOUT, with_masks=True, classes=classes)


def read_folder(root, classes=None) -> Source:
    return read_class_folders(root, FOLDER_LAYOUT, with_masks=True, classes=classes)


# --- TMED-2 ----------------------------------------------------------------------------------
# Severity labels of TMED-2 and the two label schemes of the RSMAS-Net paper:
#   as_binary:   no_AS  vs  AS (mild, mild-to-moderate, moderate, severe)
#   as_severity: MildtoMod_AS (mild, mild-to-moderate, moderate)  vs  Severe_AS  (no_AS dropped)
SCHEMES = {
    "as_binary": (["no_AS", "AS"], {"none": 0, "mild": 1, "mildtomod": 1, "moderate": 1, "severe": 1}),
    "as_severity": (["MildtoMod_AS", "Severe_AS"], {"mild": 0, "mildtomod": 0, "moderate": 0, "severe": 1}),
}


def normalise_severity(label: str) -> str | None:
    s = re.sub(r"[^a-z]", "", label.lower()).removesuffix("as")
    if s in ("no", "none", "noas", "normal"):
        return "none"
    if s in ("mildtomod", "mildtomoderate", "mildmoderate"):
        return "mildtomod"
    if s in ("mild", "moderate", "severe"):
        return s
    return None


def _column(header: list[str], names: tuple[str, ...], what: str, path: Path) -> str:
    low = {h.lower().strip(): h for h in header}
    for n in names:
        if n in low:
            return low[n]
    raise DataError(f"{path}: no {what} column (looked for {', '.join(names)}); columns are {header}")


def read_tmed2(root, csv_path=None, scheme="as_binary", views=None) -> Source:
    base = _need_root(root, TMED2_LAYOUT)
    if scheme not in SCHEMES:
        raise DataError(f"data.scheme={scheme} is not a TMED-2 label scheme; use one of {sorted(SCHEMES)}")
    if csv_path:
        table = Path(csv_path)
        if not table.is_absolute() and not table.exists():
            table = base / csv_path
    else:
        found = sorted(base.rglob("*.csv"))
        if len(found) != 1:
            raise DataError(f"found {len(found)} CSV files under {base}; set data.csv to the labelled-set CSV "
                            f"({TMED2_LAYOUT})")
        table = found[0]
    if not table.is_file():
        raise DataError(f"TMED-2 CSV {table} not found")
    classes, mapping = SCHEMES[scheme]
    index = {p.name: p for p in base.rglob("*.png")}
    src = Source([], [], list(classes), groups=[])
    with open(table, newline="") as fh:
        reader = csv.DictReader(fh)
        header = reader.fieldnames or []
        img_col = _column(header, ("query_key", "image", "file", "filename", "path"), "image", table)
        dx_col = _column(header, ("diagnosis_label", "diagnosis", "label"), "diagnosis", table)
        view_col = next((h for h in header if h.lower() in ("view_label", "view")), None)
        missing = 0
        for row in reader:
            sev = normalise_severity(row.get(dx_col) or "")
            if sev is None or sev not in mapping:
                continue
            if views and view_col and row.get(view_col) not in views:
                continue
            name = Path(row[img_col]).name
            path = index.get(name)
            if path is None:
                missing += 1
                continue
            src.paths.append(str(path))
            src.labels.append(mapping[sev])
            src.masks.append([])
            src.groups.append(name.split("_")[0])   # study id (e.g. 1234s1 of 1234s1_0.png)
    if missing:
        log.warning("%d rows of %s name images that are not under %s; skipped", missing, table, base)
    if not src.paths:
        raise DataError(f"no usable rows in {table} for scheme {scheme} ({TMED2_LAYOUT})")
    counts = np.bincount(src.labels, minlength=len(classes))
    for c, n in zip(classes, counts):
        if n == 0:
            raise DataError(f"TMED-2 scheme {scheme}: class {c} has no images in {table}")
    return src
