"""Datasets: the built-in phantom, BUSI, TMED-2 and any class-per-folder tree.

    bundle = build_datasets(cfg.data)        # decode once, split 6:2:2 (stratified, seeded)
    loaders = build_loaders(bundle, cfg.data)

A batch is a dict: ``image`` [B,C,H,W] standardised, ``label`` [B], ``mask`` [B,1,H,W] (zeros
where none), ``has_mask`` [B], ``index`` [B] (position in the split).
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from edgeus.data import phantom, readers
from edgeus.data.transforms import Augment, augment_policy, normalise, resize
from edgeus.errors import DataError

log = logging.getLogger("edgeus.data")
__all__ = ["DataBundle", "SplitDataset", "build_datasets", "build_loaders", "load_images", "stratified_split"]


@dataclass
class Images:
    """Decoded images at the working size: uint8 [N,H,W], masks bool [N,H,W] or None per image."""
    pixels: np.ndarray
    masks: np.ndarray
    has_mask: np.ndarray
    labels: np.ndarray
    ids: list[str]
    groups: list[str] | None = None


def _decode(path: str, size: int) -> np.ndarray:
    arr = readers.decode_gray(path)      # [0, 1] at the file's own bit depth (16-bit scaled, not clipped)
    return (resize(torch.from_numpy(arr), size).numpy() * 255).round().astype(np.uint8)


def _decode_mask(paths: list[str], size: int) -> np.ndarray | None:
    out = None
    for p in paths:
        try:
            m = _decode(p, size) > 127
        except Exception as e:  # a broken mask loses only the mask
            log.warning("unreadable mask %s skipped: %s", p, e)
            continue
        out = m if out is None else (out | m)
    return out


def load_images(src: readers.Source, size: int, desc: str = "loading images") -> tuple[Images, list[tuple[str, str]]]:
    """Decode every image once; unreadable files are skipped and returned as (path, reason)."""
    pix, masks, has, labels, ids, groups, skipped = [], [], [], [], [], [], []
    bar = tqdm(src.paths, desc=desc, unit="img", leave=False,
               disable=len(src.paths) < 200 or None)       # None: only on a terminal
    for i, path in enumerate(bar):
        try:
            img = _decode(path, size)
        except Exception as e:
            skipped.append((path, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"))
            continue
        m = _decode_mask(src.masks[i], size) if src.masks and src.masks[i] else None
        pix.append(img)
        masks.append(m if m is not None else np.zeros((size, size), bool))
        has.append(m is not None)
        labels.append(src.labels[i])
        ids.append(path)
        if src.groups is not None:
            groups.append(src.groups[i])
    for path, why in skipped:
        log.warning("unreadable image skipped: %s (%s)", path, why)
    if not pix:
        raise DataError(f"none of the {len(src.paths)} images could be read")
    labels_arr = np.asarray(labels, np.int64)
    for k, cls in enumerate(src.classes):
        if not (labels_arr == k).any():
            raise DataError(f"class {cls!r} has no readable images (skipped: {[p for p, _ in skipped][:5]})")
    return Images(np.stack(pix), np.stack(masks), np.asarray(has), labels_arr, ids,
                  groups if src.groups is not None else None), skipped


def stratified_split(labels: np.ndarray, fractions, seed: int, groups: list[str] | None = None) -> list[np.ndarray]:
    """Indices of train/val/test, stratified by class, seeded; groups (studies) never straddle splits."""
    fr = np.asarray(fractions, float)
    if fr.shape != (3,) or (fr < 0).any() or abs(fr.sum() - 1) > 1e-6:
        raise DataError(f"data.split must be three fractions summing to 1, got {list(fractions)}")
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[], [], []]
    units: dict[int, list[list[int]]] = {}
    if groups is None:
        for i, y in enumerate(labels):
            units.setdefault(int(y), []).append([i])
    else:
        by_group: dict[str, list[int]] = {}
        for i, g in enumerate(groups):
            by_group.setdefault(g, []).append(i)
        for members in by_group.values():
            major = int(np.bincount(labels[members]).argmax())
            units.setdefault(major, []).append(members)
    for y in sorted(units):
        u = units[y]
        order = rng.permutation(len(u))
        n = len(u)
        n_val = int(round(fr[1] * n))
        n_test = int(round(fr[2] * n))
        if n >= 3:  # every split sees every class when it can
            n_val, n_test = max(n_val, 1 if fr[1] > 0 else 0), max(n_test, 1 if fr[2] > 0 else 0)
        n_train = n - n_val - n_test
        cuts = [order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]]
        for s in range(3):
            for j in cuts[s]:
                parts[s].extend(u[j])
    return [np.asarray(sorted(p), np.int64) for p in parts]


class SplitDataset(Dataset):
    """One split over decoded images; augmentation (train only) is seeded by (seed, epoch, index)."""

    def __init__(self, images: Images, indices: np.ndarray, preprocessing: dict, augment: Augment | None = None,
                 seed: int = 0):
        self.images, self.indices = images, indices
        self.pre = preprocessing
        self.augment = augment
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices)

    @property
    def labels(self) -> np.ndarray:
        return self.images.labels[self.indices]

    def raw(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Image [1,H,W] in [0, 1] and mask [1,H,W] before augmentation and normalisation."""
        j = self.indices[i]
        img = torch.from_numpy(self.images.pixels[j].astype(np.float32) / 255.0)[None]
        mask = torch.from_numpy(self.images.masks[j].astype(np.float32))[None]
        return img, mask

    def __getitem__(self, i: int) -> dict:
        img, mask = self.raw(i)
        if self.augment is not None:
            g = torch.Generator().manual_seed(hash((self.seed, self.epoch, int(i))) & 0x7FFFFFFF)
            img, mask = self.augment(img, mask, g)
        j = self.indices[i]
        return {
            "image": normalise(img, self.pre["in_chans"], self.pre["mean"], self.pre["std"]),
            "label": torch.tensor(int(self.images.labels[j])),
            "mask": mask,
            "has_mask": torch.tensor(bool(self.images.has_mask[j])),
            "index": torch.tensor(i),
        }


@dataclass
class DataBundle:
    train: SplitDataset
    val: SplitDataset
    test: SplitDataset
    train_plain: SplitDataset
    classes: list[str]
    preprocessing: dict
    name: str
    skipped: list = field(default_factory=list)

    def split(self, name: str) -> SplitDataset:
        if name not in ("train", "val", "test", "train_plain"):
            raise DataError(f"unknown split {name!r}; use train, val or test")
        return getattr(self, name)

    def ids(self, split: str) -> list[str]:
        ds = self.split(split)
        return [ds.images.ids[j] for j in ds.indices]

    def counts(self, split: str = "train") -> list[int]:
        return np.bincount(self.split(split).labels, minlength=len(self.classes)).tolist()

    def class_weights(self) -> torch.Tensor:
        """Inverse-frequency weights of the train split, mean 1 (for weighted cross-entropy)."""
        c = np.maximum(np.asarray(self.counts("train"), float), 1)
        w = c.sum() / (len(c) * c)
        return torch.tensor(w / w.mean(), dtype=torch.float32)

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for s in ("train", "val", "test"):
            h.update("\n".join(self.ids(s)).encode())
        return h.hexdigest()[:16]

    def summary(self) -> str:
        return (f"{self.name}: classes {self.classes}; train {self.counts('train')}, val {self.counts('val')}, "
                f"test {self.counts('test')}" + (f"; {len(self.skipped)} unreadable file(s) skipped" if self.skipped else ""))


def _read(cfg) -> tuple[Images, list[str], list]:
    size = int(cfg.image_size)
    if cfg.name == "phantom":
        classes = list(cfg.classes) if cfg.classes else list(phantom.CLASSES)
        bad = [c for c in classes if c not in phantom.CLASSES]
        if bad:
            raise DataError(f"phantom classes are {list(phantom.CLASSES)}; got {bad}")
        if cfg.n_per_class < 3:
            raise DataError("data.n_per_class must be at least 3 for a train/val/test split")
        imgs, masks, labels, ids = phantom.generate(int(cfg.n_per_class), int(cfg.seed), int(cfg.phantom_size), classes)
        pix = resize(torch.from_numpy(imgs), size).numpy()
        m = resize(torch.from_numpy(masks.astype(np.float32)), size).numpy() > 0.5
        return Images((pix * 255).round().astype(np.uint8), m, np.ones(len(labels), bool), labels, ids), classes, []
    if cfg.name == "camus":   # NIfTI frames, patient groups, _gt masks: edgeus.data.camus decodes them itself
        from edgeus.data import camus

        return camus.read(cfg)
    classes = list(cfg.classes) if cfg.classes else None
    if cfg.name == "busi":
        src = readers.read_busi(cfg.root, classes)
    elif cfg.name == "folder":
        src = readers.read_folder(cfg.root, classes)
    elif cfg.name == "tmed2":
        src = readers.read_tmed2(cfg.root, cfg.csv, cfg.scheme, list(cfg.views) if cfg.views else None)
    else:
        raise DataError(f"unknown dataset {cfg.name!r}; use phantom, busi, tmed2, folder or camus")
    images, skipped = load_images(src, size, desc=f"loading {cfg.name}")
    return images, src.classes, skipped


def build_datasets(cfg) -> DataBundle:
    """Decode the dataset ``cfg`` (the ``data`` section) and split it."""
    if cfg.in_chans not in (1, 3):
        raise DataError(f"data.in_chans must be 1 or 3, got {cfg.in_chans}")
    images, classes, skipped = _read(cfg)
    tr, va, te = stratified_split(images.labels, list(cfg.split), int(cfg.seed), images.groups)
    pre = {"image_size": int(cfg.image_size), "in_chans": int(cfg.in_chans),
           "mean": [float(v) for v in cfg.mean], "std": [float(v) for v in cfg.std]}
    try:
        aug = augment_policy(cfg.augment)
    except ValueError as e:
        raise DataError(str(e)) from None
    b = DataBundle(
        train=SplitDataset(images, tr, pre, aug, int(cfg.seed)),
        val=SplitDataset(images, va, pre),
        test=SplitDataset(images, te, pre),
        train_plain=SplitDataset(images, tr, pre),
        classes=classes, preprocessing=pre, name=cfg.name, skipped=skipped,
    )
    for s in ("train", "val", "test"):
        if len(b.split(s)) == 0:
            raise DataError(f"the {s} split is empty (data.split={list(cfg.split)}, {len(images.labels)} images)")
    check_every_class_in_every_split(b, list(cfg.split))
    return b


def check_every_class_in_every_split(bundle: DataBundle, split=None) -> None:
    """A class missing from a split makes its metrics vacuous (a recall over no images passes every
    gate): refuse it, naming the class, its image count and what to do."""
    total = np.bincount(bundle.train.images.labels, minlength=len(bundle.classes))
    for s in ("train", "val", "test"):
        counts = bundle.counts(s)
        for k, cls in enumerate(bundle.classes):
            if counts[k] == 0:
                raise DataError(
                    f"class {cls!r} has {int(total[k])} image(s), too few for every split to get one "
                    f"(none in {s}; data.split={split if split is not None else '?'}): add images of {cls!r} "
                    f"(at least 3 with a 6:2:2 split) or leave the class out with data.classes=[...]")


def build_loaders(bundle: DataBundle, cfg, distributed: bool = False, batch_size: int | None = None) -> dict:
    bs = int(batch_size or cfg.batch_size)
    sampler, shuffle = None, True
    if distributed:
        from torch.utils.data.distributed import DistributedSampler

        sampler, shuffle = DistributedSampler(bundle.train, seed=int(cfg.seed), shuffle=True), False
        if cfg.balance == "sampler":
            log.warning("data.balance=sampler is not combined with distributed training; using class weights")
    elif cfg.balance == "sampler":
        from torch.utils.data import WeightedRandomSampler

        counts = np.maximum(np.asarray(bundle.counts("train"), float), 1)
        w = (1.0 / counts)[bundle.train.labels]
        sampler = WeightedRandomSampler(torch.as_tensor(w), num_samples=len(w), replacement=True,
                                        generator=torch.Generator().manual_seed(int(cfg.seed)))
        shuffle = False
    g = torch.Generator().manual_seed(int(cfg.seed))
    kw = dict(num_workers=int(cfg.num_workers), persistent_workers=False)
    return {
        "train": DataLoader(bundle.train, batch_size=bs, shuffle=shuffle, sampler=sampler, drop_last=len(bundle.train) > bs,
                            generator=g, **kw),
        "val": DataLoader(bundle.val, batch_size=bs, shuffle=False, **kw),
        "test": DataLoader(bundle.test, batch_size=bs, shuffle=False, **kw),
        "train_plain": DataLoader(bundle.train_plain, batch_size=bs, shuffle=False, **kw),
    }
