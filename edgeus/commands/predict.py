"""Classify images with a shipped or trained model, with the model's own preprocessing and classes.

    edgeus predict runs/<run>/07-package/bundle scans/             # a bundle directory
    edgeus predict student.int8.onnx a.png b.png --json            # ONNX (edgeus.* metadata)
    edgeus predict runs/<run>/00-teacher/model.pt scans/ --cam cams/
    edgeus predict bundle/model/model.engine scans/                # TensorRT (needs TensorRT + CUDA)
    edgeus predict runs/<run> scans/ --cam cams/                   # a run directory: its deployed student

Prints one line per image: the class and every class's probability (``--json``: one JSON document
on stdout instead). ``--cam DIR`` writes a Grad-CAM overlay per image (captum, a
dependency of edgeus) for the torch model behind the model given: for a run (or a bundle, ONNX file or
checkpoint inside one) the teacher (``00-teacher/model.pt``) and the student (the last torch stage)
side by side; for a lone checkpoint, that checkpoint. Where a lesion mask lies beside an image
(BUSI naming, ``<name>_mask.png``) each map's "saliency inside the lesion" is given: the fraction of
the map's mass inside the mask and whether its peak lies inside (pointing game).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from edgeus.errors import InputError, UsageError

USAGE = "<bundle | run dir | model.onnx | model.engine | ckpt.pt> <images or folders ...> [--json] [--cam DIR]"


def _parse(args):
    pos, as_json, cam = [], False, None
    it = iter(args)
    for a in it:
        if a == "--json":
            as_json = True
        elif a == "--cam":
            cam = next(it, None)
            if cam is None:
                raise UsageError(f"--cam needs a folder; usage: edgeus predict {USAGE}")
        elif a.startswith("--cam="):
            cam = a.split("=", 1)[1]
        elif a.startswith("--"):
            raise UsageError(f"unknown option {a}; usage: edgeus predict {USAGE}")
        else:
            pos.append(a)
    if len(pos) < 2:
        raise UsageError(f"expected a model and at least one image or folder; usage: edgeus predict {USAGE}")
    return pos[0], pos[1:], as_json, cam


def predict(model_path, images, cam_dir=None) -> dict:
    """The Python API behind the command: {"model", "classes", "preprocessing", "images": [...]}.

    Each image: {"path", "class", "probabilities": {class: p}} and, with ``cam_dir``,
    "cam": {"file", "models": {name: {"class", "confidence", "lesion_fraction", "pointing_game"}}}."""
    import numpy as np

    from edgeus import explain as E

    model = E.open_model(model_path)
    files = E.list_images(images)
    pre, classes = model.preprocessing, model.classes
    loaded = [E.load_image(f, pre) for f in files]
    x = np.stack([xx for _, xx in loaded]) if loaded else np.zeros((0,))
    probs = np.concatenate([model.predict(x[i:i + 32]) for i in range(0, len(x), 32)])
    out = {"model": str(model.path), "runtime": model.describe, "classes": classes, "preprocessing": pre,
           "images": []}
    for f, p in zip(files, probs):
        out["images"].append({"path": str(f), "class": classes[int(p.argmax())],
                              "probabilities": {c: float(v) for c, v in zip(classes, p)}})
    if cam_dir:
        explainers = _explainers(model)
        out["cam_models"] = {k: str(m.path) for k, m in explainers.items()}
        _cams(explainers, files, loaded, out, Path(cam_dir))
    return out


def _explainers(model) -> dict:
    """The torch models behind ``model``: a run's teacher and student, or the checkpoint itself."""
    from edgeus import explain as E

    if model.run_dir is not None:
        pair = E.torch_pair(model.run_dir)
        if pair:
            return pair
    if model.kind == "torch":
        return {"model": model}
    raise InputError(f"--cam: no torch model behind {model.path} (Grad-CAM needs the checkpoint: give a run "
                      "directory, a bundle or model inside one, or a .pt checkpoint)")


def _cams(explainers: dict, files, loaded, out: dict, cam_dir: Path) -> None:
    import numpy as np
    import torch

    from edgeus import explain as E

    cam_dir.mkdir(parents=True, exist_ok=True)
    layers = {}
    for name, m in explainers.items():
        if m.classes != out["classes"]:
            raise InputError(f"--cam: {m.path} has classes {m.classes}, the model given {out['classes']}")
        layers[name] = E.cam_layer(m.module, m.preprocessing)[1]
    for f, (raw, _), entry in zip(files, loaded, out["images"]):
        panels, info = [], {}
        mask = None
        for name, m in explainers.items():
            img01, x = E.load_image(f, m.preprocessing)
            if mask is None:
                mask = E.find_mask(f, int(m.preprocessing["image_size"]))
            p = m.predict(x[None])[0]
            k = int(p.argmax())
            cam = E.gradcam(m.module, torch.from_numpy(x[None]), target=[k], layer=layers[name])[0]
            d = {"class": m.classes[k], "confidence": float(p[k])}
            title = f"{name}: {m.classes[k]} {p[k]:.2f}"
            if mask is not None and mask.shape == cam.shape:
                d["lesion_fraction"] = E.lesion_fraction(cam, mask)
                d["pointing_game"] = E.pointing_game(cam, mask)
                if d["lesion_fraction"] is not None:
                    title += f"\nCAM in lesion {d['lesion_fraction']:.2f}"
            info[name] = d
            panels.append((title, cam))
            raw = img01
        png = cam_dir / f"{Path(f).stem}.cam.png"
        classes_seen = {d["class"] for d in info.values()}
        flag = " — teacher and student DISAGREE" if len(classes_seen) > 1 else ""
        E.save_panels(png, raw, panels, mask if mask is not None and np.asarray(mask).any() else None,
                      title=f"{Path(f).name}{flag}")
        entry["cam"] = {"file": str(png), "models": info}


def run(cfg, args):
    model_path, images, as_json, cam = _parse(args)
    res = predict(model_path, images, cam)
    if as_json:
        json.dump(res, sys.stdout, indent=1)
        print()
        return 0
    classes = res["classes"]
    print(f"model: {res['model']} ({res['runtime']}); classes {', '.join(classes)}")
    width = max(len(Path(e["path"]).name) for e in res["images"])
    for e in res["images"]:
        probs = "  ".join(f"{c} {e['probabilities'][c]:.3f}" for c in classes)
        line = f"{Path(e['path']).name.ljust(width)}  {e['class']:<10}  {probs}"
        if "cam" in e:
            cams = e["cam"]["models"]
            bits = []
            for n, d in cams.items():
                s = f"{n} {d['class']}"
                if d.get("lesion_fraction") is not None:
                    s += f" (CAM in lesion {d['lesion_fraction']:.2f})"
                bits.append(s)
            line += "   [" + "; ".join(bits) + f"] -> {e['cam']['file']}"
        print(line)
    return 0
