"""Evaluate a checkpoint (.pt), ONNX model or TensorRT engine on its own test split — or a compress run's
teacher and final student on the run's test split — refusing to score images the model has seen.

    edgeus eval runs/train-x/best.pt                         # the model's own test split
    edgeus eval runs/<run>/04-quantize/student.int8.onnx     # (data settings come from the model)
    edgeus eval model.engine data=busi data.root=/data/BUSI  # through the TensorRT runner (needs TensorRT)
    edgeus eval run=runs/<run>                               # the run's teacher and final student
    edgeus eval student.onnx data=folder data.root=/external eval.split_from=data   # other data, leak-checked
    edgeus eval student.onnx data=tmed2 data.root=/TMED-1 eval.split=all eval.class_map={severe: AS}
                                                             # external validation: every image of a dataset it never saw

What the model carries decides how it is scored:

* preprocessing (image size, channels, mean / std) and classes: from the checkpoint, the ONNX metadata
  (``edgeus.preprocessing``, ``edgeus.classes``) or, for an engine, the bundle / ONNX beside it;
* its data fingerprint (``edgeus.data`` / the checkpoint's ``data``): dataset, root, split seed and
  ratios and the hashes of its train / val / test / calibration file lists. By default
  (``eval.split_from=model``) the model's own split is rebuilt from it (``data.root=`` may say where
  the dataset is now) and checked against the hashes; ``eval.split_from=data`` scores the data
  settings as given instead, after rebuilding the model's split to find shared images.

The command refuses (exit code 4, DataLeakError) to score a model on images it was trained or
validated on (the calibration images are drawn from the train split), or when it cannot show that it
would not (the model's split cannot be reproduced); ``eval.allow_overlap=true`` scores anyway and
records the overlap. A model without a fingerprint is scored with a warning that leakage was not
checked. Metrics (accuracy, per-class precision / recall / F1, macro-F1, AUC, confusion, ECE) are
printed and written as JSON (eval.out, default beside the model; ``<run>/eval.json`` for a run). A model
that segments (a two-stage checkpoint, or an ONNX model with a ``mask`` output) is also scored on the
images that have a mask: Dice and IoU per image and mean (``metrics["segmentation"]``, ``dice``, ``iou``).

External validation (``eval.split=all``, seed 000's TMED-1 step): every image of the data as given
(``data=``, ``data.root=``; no split is made, the data's own classes are read) is scored. The data's
classes are matched to the model's by name, or by ``eval.class_map={<data class>: <model class>}``
(several data classes may map to one model class; ``null`` leaves a class's images out); a data class
that maps to nothing is an error that names both class lists. The leak check rebuilds the model's own
split and refuses any image of its train / val splits, by path or by identical pixels; a dataset the
model never saw has none.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path

from edgeus.errors import DataLeakError, EdgeusError, InputError

USAGE = ("<checkpoint.pt | model.onnx | model.engine> [eval.split=test|val|train|all] [eval.split_from=model|data] "
         "[eval.allow_overlap=false] [data=...] [eval.class_map={data class: model class}] [eval.out=FILE]   |   "
         "run=<compress run dir>")
ENGINE = (".engine", ".plan", ".trt")


# ---------------------------------------------------------------------------------------------- the model
def model_record(path: str | Path) -> dict:
    """What a model file says about itself: {path, kind, model, classes, preprocessing, data}."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"model file not found: {path}")
    suffix = path.suffix.lower()
    if suffix in (".pt", ".pth"):
        from edgeus.train.checkpoint import load_checkpoint

        model, ckpt = load_checkpoint(path)
        return {"path": path, "kind": "checkpoint", "model": model, "classes": list(ckpt["classes"]),
                "preprocessing": dict(ckpt["preprocessing"]), "data": ckpt.get("data") or None}
    if suffix == ".onnx":
        from edgeus.onnx.metadata import model_info

        info = model_info(path)
        return {"path": path, "kind": "onnx", "model": str(path), "classes": info["classes"],
                "preprocessing": info["preprocessing"], "data": info["data"] or None}
    if suffix in ENGINE:
        return _engine_record(path)
    raise InputError(f"{path}: not a model file edgeus evaluates (.pt, .onnx, .engine / .plan)")


def _engine_record(path: Path) -> dict:
    """An engine carries no metadata: read it from the bundle beside it (labels.json, preprocessing.json)
    or from an edgeus ONNX model next to it (its classes, preprocessing and data fingerprint)."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        from edgeus.errors import MissingDependencyError

        raise MissingDependencyError(f"edgeus eval {path.name}: TensorRT is not installed here (it needs an NVIDIA "
                                     "GPU; on a Jetson it comes with JetPack); evaluate the ONNX model instead") from None
    from edgeus.onnx.metadata import model_info

    rec = {"path": path, "kind": "engine", "model": str(path), "classes": None, "preprocessing": None, "data": None}
    for d in (path.parent, path.parent.parent):
        onnx_files = sorted(d.glob("*.onnx")) + sorted((d / "model").glob("*.onnx"))
        same_stem = [p for p in onnx_files if p.stem == path.stem]
        for cand in same_stem + [p for p in onnx_files if ".int8" in p.name] + onnx_files:
            info = model_info(cand)
            if info["classes"] and info["preprocessing"]:
                rec.update(classes=info["classes"], preprocessing=info["preprocessing"], data=info["data"] or None,
                           metadata_from=str(cand))
                return rec
        if (d / "labels.json").is_file() and (d / "preprocessing.json").is_file():
            rec.update(classes=json.loads((d / "labels.json").read_text()).get("classes"),
                       preprocessing=json.loads((d / "preprocessing.json").read_text()),
                       metadata_from=str(d))
            return rec
    return rec


# ---------------------------------------------------------------------------------------------- the data
def _apply_model(data, rec: dict, classes: bool = True) -> None:
    pre = rec.get("preprocessing") or {}
    for key in ("image_size", "in_chans", "mean", "std"):
        if pre.get(key) is not None:
            data[key] = pre[key]
    if classes and rec.get("classes"):
        data.classes = list(rec["classes"])


def _explicit(cfg) -> set[str]:
    return {a.partition("=")[0].strip().lstrip("+") for a in (cfg.command_line or [])}


def data_for(cfg, rec: dict, split_from: str) -> tuple[object, list[str]]:
    """The data section a model is scored on, and notes on the settings it overrode."""
    from edgeus.data.fingerprint import source_overrides

    data, notes = copy.deepcopy(cfg.data), []
    if cfg.eval.split == "all":    # external validation: the data as given, its own classes (mapped later)
        _apply_model(data, rec, classes=False)
        return data, notes
    fp = rec.get("data")
    if fp and split_from == "model":
        explicit = _explicit(cfg)
        for k, v in source_overrides(fp).items():
            if k == "root" and "data.root" in explicit:
                continue   # the user says where the dataset is now
            if (f"data.{k}" in explicit or (k == "name" and "data" in explicit)) and data[k] != v:
                notes.append(f"data.{k}={data[k]} ignored: the model's own split uses {v!r} "
                             "(eval.split_from=data scores the data as given)")
            data[k] = v
    _apply_model(data, rec)
    return data, notes


def _source(data) -> dict:
    from edgeus.data.fingerprint import SOURCE_KEYS, plain

    out = {k: plain(data[k]) for k in SOURCE_KEYS}
    out["root"] = str(Path(out["root"]).resolve()) if out["root"] else None
    return out


def _pixel_keys(images, indices) -> set[bytes]:
    import hashlib

    return {hashlib.sha256(images.pixels[j].tobytes()).digest() for j in indices}


def leak_check(rec: dict, bundle, data, split: str, allow: bool, *, ids: list[str] | None = None,
               images=None, indices=None) -> dict:
    """Raise DataLeakError when ``bundle``'s ``split`` holds images ``rec``'s model was trained or validated
    on, or when the model's split cannot be reproduced to show it does not (unless ``allow``).
    Returns what was checked (JSON-able).

    ``ids`` / ``images`` + ``indices`` (external validation, ``bundle`` None): the images scored, given
    directly; they are compared with the model's train / val images by path and by pixels (a copy of a
    training image under another name is found too)."""
    from edgeus.data import build_datasets
    from edgeus.data.fingerprint import overlap, source_overrides, verify_split
    from edgeus.errors import DataError

    name, fp = rec["path"].name, rec.get("data")
    if not fp:
        note = (f"{name} carries no data fingerprint: whether it saw these images cannot be checked "
                "(models written by this edgeus carry one)")
        print(f"warning: {note}")
        return {"checked": False, "note": note}
    fp_src = source_overrides(fp)
    same = {k: v for k, v in _source(data).items() if k != "root"} == {k: v for k, v in fp_src.items() if k != "root"}
    model_bundle, root = bundle, data.root
    if not same or bundle is None:
        mdata = copy.deepcopy(data)
        for k, v in fp_src.items():
            mdata[k] = v
        if fp_src.get("root") and not Path(fp_src["root"]).exists() and data.root and data.name == fp_src.get("name"):
            mdata.root = data.root   # the model's dataset moved to data.root
        root = mdata.root
        try:
            model_bundle = build_datasets(mdata)
        except DataError as e:
            model_bundle, why = None, f"its dataset cannot be read ({e})"
    bad = verify_split(model_bundle, fp, root=root) if model_bundle is not None else None
    if model_bundle is not None and bad:
        why = (f"the rebuilt {', '.join(bad)} file list(s) differ from the model's fingerprint (the dataset "
               "changed, or the data settings differ from the model's)")
    if model_bundle is None or bad:
        msg = (f"cannot show that {name} never saw the {split} split: its own split cannot be reproduced — {why}. "
               "Point data.root at the dataset it was trained on, or score anyway with eval.allow_overlap=true")
        if not allow:
            raise DataLeakError(msg)
        print(f"warning: {msg}")
        return {"checked": False, "note": msg, "allowed": True}
    ids = bundle.ids(split) if ids is None else list(ids)
    shared = overlap(ids, model_bundle, ("train", "val"))
    by_pixels = 0
    if images is not None:       # the same picture under another path or name
        seen = set()
        for s in ("train", "val"):
            ds = model_bundle.split(s)
            seen |= _pixel_keys(ds.images, ds.indices)
        import hashlib

        already = set(shared)
        for j, i in zip(indices, ids):
            if i not in already and hashlib.sha256(images.pixels[j].tobytes()).digest() in seen:
                shared.append(i)
                by_pixels += 1
    report = {"checked": True, "split_verified": True, "overlap": len(shared), "n": len(ids),
              "overlap_by_pixels": by_pixels if images is not None else None,
              "fingerprint": {"dataset": fp.get("dataset"), "seed": fp.get("seed"), "split": fp.get("split"),
                              "sha256": fp.get("sha256")},
              "calibration": ("drawn from the train split (the quantiser refuses val/test images): covered by "
                              "the train check" if (fp.get("sha256") or {}).get("calibration") else None)}
    if shared:
        msg = (f"{len(shared)} of the {len(ids)} images of the {split} split were used to train or validate {name} "
               f"(e.g. {', '.join(Path(s).name for s in shared[:3])}); scoring them would overstate it. Use the "
               "model's test split (eval.split=test, eval.split_from=model), or eval.allow_overlap=true to score anyway")
        if not allow:
            raise DataLeakError(msg)
        print(f"warning: {msg}")
        report["allowed"] = True
    return report


# ---------------------------------------------------------------------------------------------- scoring
def _segmentation(metrics: dict, rec: dict, loader, device: str) -> None:
    """Dice / IoU (per image and mean) of a model that segments, on the images with a mask."""
    from edgeus.segmentation import segmentation_metrics

    seg = segmentation_metrics(rec["model"], loader, device)
    if seg:
        metrics.update(dice=seg["dice_mean"], iou=seg["iou_mean"], segmentation=seg)


def score(cfg, rec: dict, data, split: str, *, bundle=None, notes=()) -> dict:
    """Metrics of ``rec``'s model on ``split`` of ``data`` (built unless ``bundle``), after the leak check."""
    from edgeus.data import build_datasets, build_loaders
    from edgeus.evaluate import evaluate_model
    from edgeus.train.run import resolve_device

    if split == "all":
        return score_external(cfg, rec, data, notes=notes)
    bundle = bundle or build_datasets(data)
    if rec.get("classes") and list(rec["classes"]) != list(bundle.classes):
        raise InputError(f"{rec['path']} predicts classes {list(rec['classes'])}, the data has {bundle.classes}")
    leak = leak_check(rec, bundle, data, split, bool(cfg.eval.allow_overlap))
    loader = build_loaders(bundle, data)[split if split != "train" else "train_plain"]
    device = resolve_device(cfg.device)
    metrics = evaluate_model(rec["model"], loader, bundle.classes, device, int(cfg.eval.ece_bins))
    _segmentation(metrics, rec, loader, device)
    metrics["evaluated"] = {"model": str(rec["path"]), "kind": rec["kind"], "dataset": bundle.name,
                            "split": split, "preprocessing": dict(bundle.preprocessing), "leak_check": leak,
                            "notes": list(notes)}
    return metrics


def class_mapping(model_classes: list[str], data_classes: list[str], class_map: dict | None) -> tuple[list[int], dict]:
    """``(lut, mapping)``: ``lut[k]`` is the model's class index of the data's class ``k`` (-1: left out);
    ``mapping`` {data class: model class or None}. A data class maps to ``class_map``'s entry, else to the
    model's class of the same name; one that maps to nothing is an :class:`InputError` naming both lists."""
    cm = {str(k): (None if v is None else str(v)) for k, v in dict(class_map or {}).items()}
    model_classes, data_classes = list(model_classes), list(data_classes)
    bad_keys = [k for k in cm if k not in data_classes]
    if bad_keys:
        raise InputError(f"eval.class_map names {bad_keys}, which the data does not have; the data's classes: "
                         f"{', '.join(data_classes)}")
    bad_targets = sorted({v for v in cm.values() if v is not None and v not in model_classes})
    if bad_targets:
        raise InputError(f"eval.class_map maps to {bad_targets}, which the model does not predict; the model's "
                         f"classes: {', '.join(model_classes)}")
    lut, mapping, unmapped = [], {}, []
    for c in data_classes:
        target = cm[c] if c in cm else (c if c in model_classes else "<none>")
        if target == "<none>":
            unmapped.append(c)
            continue
        mapping[c] = target
        lut.append(-1 if target is None else model_classes.index(target))
    if unmapped:
        raise InputError(
            f"the data's class(es) {unmapped} do not map to the model's classes {model_classes} (data classes: "
            f"{data_classes}): map each with eval.class_map={{{unmapped[0]}: <one of {', '.join(model_classes)}>}}, "
            f"leave its images out with eval.class_map={{{unmapped[0]}: null}}, or keep only matching classes with "
            "data.classes=[...]")
    if all(v < 0 for v in lut):
        raise InputError(f"eval.class_map leaves every class of the data out ({data_classes}): nothing to score")
    return lut, mapping


def score_external(cfg, rec: dict, data, *, notes=()) -> dict:
    """External validation: every image of ``data`` (no split), its classes mapped to the model's
    (:func:`class_mapping`), after the leak check against the model's own train / val images."""
    import numpy as np
    from torch.utils.data import DataLoader

    from edgeus.data import SplitDataset, _read
    from edgeus.evaluate import compute_metrics, predict
    from edgeus.train.run import resolve_device

    images, data_classes, skipped = _read(data)
    if len(images.labels) == 0:
        raise InputError(f"data={data.name}: no images to score (data.root={data.root})")
    model_classes = list(rec.get("classes") or [])
    if not model_classes:
        raise InputError(f"{rec['path']} does not name its classes: an external dataset's classes cannot be matched")
    lut, mapping = class_mapping(model_classes, data_classes, cfg.eval.class_map)
    pre = {"image_size": int(data.image_size), "in_chans": int(data.in_chans),
           "mean": [float(v) for v in data.mean], "std": [float(v) for v in data.std]}
    indices = np.arange(len(images.labels))
    ids = [images.ids[j] for j in indices]
    leak = leak_check(rec, None, data, "all", bool(cfg.eval.allow_overlap), ids=ids, images=images, indices=indices)
    loader = DataLoader(SplitDataset(images, indices, pre), batch_size=int(data.batch_size), shuffle=False,
                        num_workers=int(data.num_workers))
    device = resolve_device(cfg.device)
    y, p = predict(rec["model"], loader, device)
    lut_arr = np.asarray(lut, np.int64)
    y_model = lut_arr[y]
    keep = y_model >= 0
    metrics = compute_metrics(y_model[keep], p[keep], model_classes, int(cfg.eval.ece_bins))
    _segmentation(metrics, rec, loader, device)
    absent = [c for i, c in enumerate(model_classes) if not (y_model[keep] == i).any()]
    counts = np.bincount(y, minlength=len(data_classes))
    metrics["evaluated"] = {
        "model": str(rec["path"]), "kind": rec["kind"], "dataset": data.name,
        "root": str(data.root) if data.root else None, "split": "all", "external": True,
        "preprocessing": pre, "leak_check": leak, "data_classes": list(data_classes),
        "data_counts": {c: int(n) for c, n in zip(data_classes, counts)}, "class_map": mapping,
        "left_out": int((~keep).sum()), "model_classes_without_images": absent,
        "skipped_files": len(skipped), "notes": list(notes)}
    if absent:
        metrics["evaluated"]["notes"].append(
            f"no image of the data maps to {absent}: their recall and AUC say nothing here")
    return metrics


def _check(cfg) -> str:
    split_from = str(cfg.eval.split_from)
    if split_from not in ("model", "data"):
        raise EdgeusError(f"eval.split_from={split_from!r}; expected model or data")
    if cfg.eval.split not in ("train", "val", "test", "all"):
        raise EdgeusError(f"eval.split={cfg.eval.split!r}; expected train, val, test or all (every image of "
                          "another dataset: external validation)")
    if cfg.eval.class_map and cfg.eval.split != "all":
        raise EdgeusError("eval.class_map is for external validation (eval.split=all): a model's own split has "
                          "its own classes")
    return split_from


def run(cfg, args):
    from edgeus.evaluate import format_metrics

    split_from = _check(cfg)
    run_dir = cfg.eval.run or cfg.run or (args[0] if args and Path(args[0]).is_dir() else None)
    if run_dir:
        return _run_dir(cfg, Path(run_dir))
    path = args[0] if args else cfg.eval.checkpoint
    if not path:
        raise EdgeusError("give the model to evaluate: edgeus eval <checkpoint.pt | model.onnx | model.engine>, "
                          "or a compress run: edgeus eval run=<run dir>")
    rec = model_record(path)
    data, notes = data_for(cfg, rec, split_from)
    for n in notes:
        print(f"note: {n}")
    metrics = score(cfg, rec, data, cfg.eval.split, notes=notes)
    ev = metrics["evaluated"]
    where = (f"every image of {ev['dataset']} (external validation)" if cfg.eval.split == "all" else
             f"the {cfg.eval.split} split of {ev['dataset']}")
    print(format_metrics(metrics, f"{rec['path'].name} on {where} ({ev['preprocessing']['image_size']} px):"))
    if cfg.eval.split == "all":
        mapped = {k: v for k, v in ev["class_map"].items() if k != v}
        if mapped:
            print("classes mapped: " + ", ".join(f"{k} -> {v if v is not None else '(left out)'}"
                                                 for k, v in mapped.items()))
        for n in ev["notes"]:
            print(f"note: {n}")
    out = Path(cfg.eval.out or cfg.out or rec["path"].with_suffix(f".{cfg.eval.split}.metrics.json"))
    out.write_text(json.dumps(metrics, indent=1, default=str))
    print(f"metrics written to {out}")
    return 0


def run_models(run_dir: Path) -> dict[str, Path]:
    """The teacher and the final student of a compress run directory (from its state.json)."""
    state_path = run_dir / "state.json"
    if not state_path.is_file():
        raise InputError(f"{run_dir}: not a compress run directory (no state.json)")
    arts = json.loads(state_path.read_text()).get("artifacts", {})

    def path(key):
        v = arts.get(key)
        if not v:
            return None
        p = Path(v)
        return p if p.is_absolute() else run_dir / p

    teacher = path("teacher_model") or path("teacher_onnx")
    student = path("int8_onnx") or path("onnx") or path("model")
    if teacher is None or student is None:
        raise InputError(f"{run_dir}: the run has no teacher or no student yet (artifacts: {sorted(arts)})")
    out = {"teacher": teacher}
    if student != teacher:
        out["student"] = student
    return out


def _run_dir(cfg, run_dir: Path) -> int:
    from omegaconf import OmegaConf

    from edgeus.data import build_datasets
    from edgeus.evaluate import format_metrics

    models = run_models(run_dir)
    saved = OmegaConf.load(run_dir / "config.yaml") if (run_dir / "config.yaml").is_file() else {}
    base = copy.deepcopy(cfg.data)
    for k, v in (saved.get("data") or {}).items():   # the run's data: its test split
        if k == "root" and "data.root" in _explicit(cfg):
            continue
        base[k] = v
    results, bundles = {}, {}
    for role, path in models.items():
        rec = model_record(path)
        data = copy.deepcopy(base)
        _apply_model(data, rec)
        key = json.dumps(OmegaConf.to_container(data) if hasattr(data, "_get_node") else str(data), sort_keys=True)
        if key not in bundles:
            bundles[key] = build_datasets(data)
        m = score(cfg, rec, data, cfg.eval.split, bundle=bundles[key])
        print(format_metrics(m, f"{role} {path.name} on the run's {cfg.eval.split} split ({m['evaluated']['dataset']}):"))
        results[role] = m
    if "student" in results:
        t, s = results["teacher"], results["student"]
        print(f"student - teacher: accuracy {s['accuracy'] - t['accuracy']:+.4f}, macro-F1 "
              f"{s['macro_f1'] - t['macro_f1']:+.4f}; recall " +
              ", ".join(f"{c} {s['recall'][c] - t['recall'][c]:+.3f}" for c in t["recall"]))
        if t.get("dice") is not None and s.get("dice") is not None:
            print(f"student - teacher: mask Dice {s['dice'] - t['dice']:+.4f}, IoU {s['iou'] - t['iou']:+.4f}")
    out = Path(cfg.eval.out or cfg.out or run_dir / f"eval.{cfg.eval.split}.json")
    out.write_text(json.dumps({"run": str(run_dir), "split": cfg.eval.split, "models": results}, indent=1, default=str))
    print(f"metrics written to {out}")
    return 0
