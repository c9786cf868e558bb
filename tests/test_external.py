"""Issue 20.4: external validation (``edgeus eval <model> data=<another dataset> eval.split=all``) and a
critical class that follows the dataset (``gates.critical_class=auto``), refused before a run when unknown."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from conftest import make_cfg

FOLDER = ("data=folder", "data.image_size=24", "data.batch_size=8", "model.name=simple_cnn", "model.width=0.25")


def _folder(root, classes=("benign", "malignant", "normal"), n=5, seed=0, size=24):
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c in classes:
        (root / c).mkdir(parents=True)
        for i in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size), dtype=np.uint8)).save(root / c / f"{c}_{i}.png")
    return root


def _model(tmp_path, root):
    """A simple_cnn checkpoint 'trained' on the folder dataset at ``root`` (its data fingerprint)."""
    from edgeus.data import build_datasets
    from edgeus.data.fingerprint import data_fingerprint
    from edgeus.models import create_model
    from edgeus.train.checkpoint import save_checkpoint

    cfg = make_cfg(*FOLDER, f"data.root={root}", tiny=False)
    bundle = build_datasets(cfg.data)
    torch.manual_seed(0)
    model = create_model("simple_cnn", num_classes=len(bundle.classes), in_chans=1, width=0.25)
    return save_checkpoint(tmp_path / "m.pt", model, classes=bundle.classes, preprocessing=bundle.preprocessing,
                           data=data_fingerprint(bundle, cfg.data)), bundle


def test_external_validation_scores_every_image_of_a_dataset_the_model_never_saw(tmp_path, capsys):
    from edgeus.cli import main

    ckpt, bundle = _model(tmp_path, _folder(tmp_path / "A"))
    ext = _folder(tmp_path / "B", n=3, seed=1)               # 3 images a class: too few to split, fine for all
    assert main(["eval", str(ckpt), "data=folder", f"data.root={ext}", "eval.split=all"]) == 0
    assert "external validation" in capsys.readouterr().out
    out = json.loads((tmp_path / "m.all.metrics.json").read_text())
    ev = out["evaluated"]
    assert out["n"] == 9 and ev["external"] and ev["split"] == "all" and out["classes"] == bundle.classes
    assert ev["leak_check"]["checked"] and ev["leak_check"]["overlap"] == 0 and ev["leak_check"]["n"] == 9
    assert ev["class_map"] == {c: c for c in ("benign", "malignant", "normal")}


def test_external_validation_refuses_the_models_own_images_even_under_another_name(tmp_path, capsys):
    from edgeus.cli import main

    a = _folder(tmp_path / "A")
    ckpt, bundle = _model(tmp_path, a)
    assert main(["eval", str(ckpt), "data=folder", f"data.root={a}", "eval.split=all"]) == 4   # its own data
    assert "were used to train or validate" in capsys.readouterr().err
    ext = _folder(tmp_path / "B", n=3, seed=1)
    src = bundle.ids("train")[0]
    shutil.copyfile(src, ext / "benign" / "renamed_copy.png")            # a training image under another name
    assert main(["eval", str(ckpt), "data=folder", f"data.root={ext}", "eval.split=all"]) == 4
    assert "renamed_copy.png" in capsys.readouterr().err
    assert main(["eval", str(ckpt), "data=folder", f"data.root={ext}", "eval.split=all",
                 "eval.allow_overlap=true"]) == 0
    leak = json.loads((tmp_path / "m.all.metrics.json").read_text())["evaluated"]["leak_check"]
    assert leak["overlap"] == 1 and leak["overlap_by_pixels"] == 1 and leak["allowed"]


def test_external_classes_that_do_not_map_are_an_error_and_class_map_maps_them(tmp_path, capsys):
    from edgeus.cli import main

    ckpt, _ = _model(tmp_path, _folder(tmp_path / "A"))
    ext = _folder(tmp_path / "B", classes=("AS", "normal"), n=3, seed=2)
    base = ["eval", str(ckpt), "data=folder", f"data.root={ext}", "eval.split=all"]
    assert main(base) == 4                                              # bad input: the classes do not match
    err = capsys.readouterr().err
    assert "['AS'] do not map" in err and "eval.class_map={AS:" in err and "malignant" in err
    assert main([*base, "eval.class_map={AS: malignant}"]) == 0
    out = json.loads((tmp_path / "m.all.metrics.json").read_text())
    assert out["n"] == 6 and out["evaluated"]["class_map"] == {"AS": "malignant", "normal": "normal"}
    assert out["per_class"]["malignant"]["support"] == 3 and out["per_class"]["benign"]["support"] == 0
    assert out["evaluated"]["model_classes_without_images"] == ["benign"]
    assert main([*base, "eval.class_map={AS: null}"]) == 0                  # AS left out
    out = json.loads((tmp_path / "m.all.metrics.json").read_text())
    assert out["n"] == 3 and out["evaluated"]["left_out"] == 3
    capsys.readouterr()
    assert main([*base, "eval.class_map={AS: severe}"]) == 4                # not a class of the model
    assert "does not predict" in capsys.readouterr().err
    assert main(["eval", str(ckpt), "eval.class_map={AS: malignant}"]) == 2  # only with eval.split=all


def test_class_mapping_many_to_one():
    from edgeus.commands.eval import class_mapping

    lut, mapping = class_mapping(["no_AS", "AS"], ["none", "mild", "severe"], {"none": "no_AS", "mild": "AS",
                                                                              "severe": "AS"})
    assert lut == [0, 1, 1] and mapping["severe"] == "AS"


# ------------------------------------------------------------------------------------ critical class
@pytest.mark.parametrize("recipe", ["rsmas_int8", "resnet50_prune_kd_int8", "efficientnet_cbam_int8",
                                    "dsc_sta_student_int8", "two_stage_int8", "mobilenetv2_kd_int8"])
def test_every_recipe_names_a_critical_class_the_dataset_has(recipe, tmp_path):
    from edgeus.pipeline.gates import check_critical_class, known_classes

    want = {(): "malignant", ("data=busi",): "malignant", ("data=tmed2",): "AS",
            ("data=tmed2", "data.scheme=as_severity"): "Severe_AS", ("data=camus",): None}
    for extra, critical in want.items():
        cfg = make_cfg(f"recipe={recipe}", *extra, tiny=False)
        assert cfg.gates.critical_class == critical, (recipe, extra)
        assert critical is None or critical in known_classes(cfg.data)
        check_critical_class(cfg.gates, cfg.data)
    views = _folder(tmp_path / "views", classes=("A2C", "A4C"), n=1)
    cfg = make_cfg(f"recipe={recipe}", "data=folder", f"data.root={views}", tiny=False)
    assert cfg.gates.critical_class is None                       # a folder tree without 'malignant'


def test_an_unknown_critical_class_is_refused_before_anything_runs(tmp_path):
    from edgeus.config import ConfigError
    from edgeus.pipeline import compress

    out = tmp_path / "run"
    cfg = make_cfg("recipe=rsmas_int8", "data=tmed2", "data.scheme=as_severity", "gates.critical_class=malignant",
                   f"data.root={tmp_path / 'nowhere'}", f"out={out}")
    with pytest.raises(ConfigError, match="MildtoMod_AS, Severe_AS") as e:
        compress(cfg)
    assert "gates.critical_class=Severe_AS" in str(e.value) and not out.exists()
    views = _folder(tmp_path / "views", classes=("A2C", "A4C"), n=1)
    cfg = make_cfg("recipe=rsmas_int8", "data=folder", f"data.root={views}", "gates.critical_class=malignnat",
                   f"out={out}")
    with pytest.raises(ConfigError, match="A2C, A4C"):
        compress(cfg)
    assert not out.exists()


def test_external_validation_of_a_two_stage_model_scores_its_masks(tmp_path):
    from PIL import Image

    from edgeus.cli import main
    from edgeus.data import build_datasets
    from edgeus.data.fingerprint import data_fingerprint
    from edgeus.models import create_model
    from edgeus.train.checkpoint import save_checkpoint

    cfg = make_cfg("data.n_per_class=6", "data.image_size=32", "data.phantom_size=32")
    bundle = build_datasets(cfg.data)
    torch.manual_seed(0)
    model = create_model("two_stage", num_classes=3, in_chans=1, width=0.125, classifier="simple_cnn")
    ckpt = save_checkpoint(tmp_path / "ts.pt", model, classes=bundle.classes, preprocessing=bundle.preprocessing,
                           data=data_fingerprint(bundle, cfg.data))
    ext = _folder(tmp_path / "busi", n=2, seed=3, size=32)
    for c in ("benign", "malignant"):                 # lesion masks beside the images (BUSI's *_mask.png)
        for i in range(2):
            m = np.zeros((32, 32), np.uint8)
            m[8:20, 8:20] = 255
            Image.fromarray(m).save(ext / c / f"{c}_{i}_mask.png")
    assert main(["eval", str(ckpt), "data=folder", f"data.root={ext}", "eval.split=all",
                 f"eval.out={tmp_path / 'e.json'}"]) == 0
    out = json.loads((tmp_path / "e.json").read_text())
    assert out["n"] == 6 and out["segmentation"]["n"] == 4 and len(out["segmentation"]["per_image"]) == 4
    assert 0.0 <= out["dice"] <= 1.0 and out["evaluated"]["leak_check"]["overlap"] == 0
