import numpy as np
import pytest
import torch
from PIL import Image

from edgeus.config import compose
from edgeus.data import build_datasets, build_loaders, stratified_split
from edgeus.data import phantom
from edgeus.errors import DataError


def test_phantom_is_deterministic_and_has_masks():
    a, ma = phantom.simulate("malignant", seed=3, index=1, size=64)
    b, mb = phantom.simulate("malignant", seed=3, index=1, size=64)
    c, _ = phantom.simulate("malignant", seed=4, index=1, size=64)
    assert np.array_equal(a, b) and np.array_equal(ma, mb) and not np.array_equal(a, c)
    assert a.dtype == np.float32 and 0 <= a.min() and a.max() <= 1
    assert ma.any()                                   # lesions come with a mask
    assert not phantom.simulate("normal", 3, 1, 64)[1].any()


def test_phantom_lesions_are_darker_than_tissue():
    img, mask = phantom.simulate("malignant", 0, 0, 128)
    assert img[mask].mean() < img[~mask].mean()


def test_split_is_stratified_seeded_and_disjoint():
    labels = np.repeat([0, 1, 2], [50, 30, 20])
    a = stratified_split(labels, [0.6, 0.2, 0.2], seed=1)
    b = stratified_split(labels, [0.6, 0.2, 0.2], seed=1)
    assert all(np.array_equal(x, y) for x, y in zip(a, b))
    assert len(set(np.concatenate(a))) == len(labels)
    for part, frac in zip(a, [0.6, 0.2, 0.2]):
        counts = np.bincount(labels[part], minlength=3)
        assert np.allclose(counts, frac * np.array([50, 30, 20]), atol=1)


def test_groups_never_straddle_splits():
    labels = np.repeat([0, 1], 40)
    groups = [f"s{i // 4}" for i in range(80)]
    parts = stratified_split(labels, [0.6, 0.2, 0.2], 0, groups)
    owner = {}
    for s, idx in enumerate(parts):
        for i in idx:
            assert owner.setdefault(groups[i], s) == s


def test_loader_batches(small_cfg, small_bundle):
    batch = next(iter(build_loaders(small_bundle, small_cfg.data)["train"]))
    assert batch["image"].shape == (16, 1, 32, 32) and batch["mask"].shape == (16, 1, 32, 32)
    assert batch["label"].dtype == torch.int64 and batch["has_mask"].all()
    assert small_bundle.classes == ["normal", "benign", "malignant"]


def test_three_channels_and_no_augmentation_outside_train(small_bundle):
    cfg = compose(["data.n_per_class=9", "data.image_size=32", "data.phantom_size=64", "data.in_chans=3"])
    b = build_datasets(cfg.data)
    x = b.val[0]["image"]
    assert x.shape == (3, 32, 32) and torch.equal(x[0], x[2])
    assert b.val.augment is None and b.test.augment is None and b.train_plain.augment is None
    assert b.train.augment is not None


def _write(path, size=40, value=None):
    arr = np.random.default_rng(len(str(path))).integers(0, 255, (size, size), dtype=np.uint8)
    if value is not None:
        arr[:] = value
    Image.fromarray(arr).save(path)


@pytest.fixture()
def busi_tree(tmp_path):
    for cls in ("benign", "malignant", "normal"):
        (tmp_path / cls).mkdir()
        for i in range(6):
            _write(tmp_path / cls / f"{cls} ({i}).png")
            if cls != "normal":
                m = np.zeros((40, 40), np.uint8)
                m[10:20, 10:20] = 255
                Image.fromarray(m).save(tmp_path / cls / f"{cls} ({i})_mask.png")
    return tmp_path


def test_busi_layout_masks_are_not_images(busi_tree):
    cfg = compose(["data=busi", f"data.root={busi_tree}", "data.image_size=32"])
    b = build_datasets(cfg.data)
    assert b.classes == ["benign", "malignant", "normal"]
    assert sum(len(b.split(s)) for s in ("train", "val", "test")) == 18
    assert not any("_mask" in i.rsplit("/", 1)[-1] for s in ("train", "val", "test") for i in b.ids(s))
    item = next(b.train_plain[i] for i in range(len(b.train_plain)) if b.train_plain[i]["label"] == 0)
    assert item["has_mask"] and item["mask"].sum() > 0


def test_corrupt_image_is_reported_and_skipped(busi_tree, caplog):
    bad = busi_tree / "benign" / "benign (99).png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    cfg = compose(["data=busi", f"data.root={busi_tree}", "data.image_size=32"])
    with caplog.at_level("WARNING"):
        b = build_datasets(cfg.data)
    assert [p for p, _ in b.skipped] == [str(bad)]
    assert str(bad) in caplog.text
    assert sum(len(b.split(s)) for s in ("train", "val", "test")) == 18


def test_empty_class_folder_is_a_clear_error(busi_tree):
    (busi_tree / "empty_class").mkdir()
    cfg = compose(["data=folder", f"data.root={busi_tree}", "data.image_size=32"])
    with pytest.raises(DataError, match="empty_class"):
        build_datasets(cfg.data)


def test_missing_root_names_path_and_layout(tmp_path):
    cfg = compose(["data=busi", f"data.root={tmp_path / 'nope'}"])
    with pytest.raises(DataError, match="nope.*BUSI layout"):
        build_datasets(cfg.data)


@pytest.fixture()
def tmed2_tree(tmp_path):
    (tmp_path / "labeled").mkdir()
    rows = ["query_key,view_label,diagnosis_label"]
    sev = ["no_AS", "mild_AS", "mildtomod_AS", "moderate_AS", "severe_AS"]
    for study in range(20):
        for k in range(3):
            name = f"{1000 + study}s1_{k}.png"
            _write(tmp_path / "labeled" / name, 24)
            rows.append(f"{name},{'PLAX' if k else 'PSAX'},{sev[study % 5]}")
    (tmp_path / "TMED2_fold0_labeledpart.csv").write_text("\n".join(rows) + "\n")
    return tmp_path


def test_tmed2_binary_scheme(tmed2_tree):
    cfg = compose(["data=tmed2", f"data.root={tmed2_tree}", "data.image_size=32", "data.scheme=as_binary"])
    b = build_datasets(cfg.data)
    assert b.classes == ["no_AS", "AS"]
    total = sum(np.array(b.counts(s)) for s in ("train", "val", "test"))
    assert total.tolist() == [12, 48]            # none vs mild / mild-to-moderate / moderate / severe
    studies = {s: {i.split("/")[-1].split("_")[0] for i in b.ids(s)} for s in ("train", "val", "test")}
    assert not (studies["train"] & studies["test"])  # a study never straddles splits


def test_tmed2_severity_scheme_drops_no_as(tmed2_tree):
    cfg = compose(["data=tmed2", f"data.root={tmed2_tree}", "data.image_size=32", "data.scheme=as_severity",
                   "data.views=[PLAX]"])
    b = build_datasets(cfg.data)
    assert b.classes == ["MildtoMod_AS", "Severe_AS"]
    total = sum(np.array(b.counts(s)) for s in ("train", "val", "test"))
    assert total.tolist() == [24, 8]              # 12 studies mild..moderate, 4 severe; 2 PLAX images each


def test_class_weights_favour_the_rare_class(tmed2_tree):
    cfg = compose(["data=tmed2", f"data.root={tmed2_tree}", "data.image_size=32"])
    w = build_datasets(cfg.data).class_weights()
    assert w[0] > w[1]


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    from edgeus.data.readers import decode_gray

    ramp = np.tile(np.linspace(0, 65535, 64).round().astype(np.uint16), (16, 1))
    Image.fromarray(ramp).save(tmp_path / "ramp16.png")
    got = decode_gray(tmp_path / "ramp16.png")
    assert got.shape == (16, 64) and got.dtype == np.float32
    assert np.allclose(got, ramp / 65535.0, atol=1e-6)             # a ramp, not 98 % white
    assert np.all(np.diff(got[0]) > 0) and got.min() == 0.0 and got.max() == 1.0
    Image.fromarray((ramp >> 8).astype(np.uint8)).save(tmp_path / "ramp8.png")   # the same ramp at 8 bits
    assert np.abs(decode_gray(tmp_path / "ramp8.png") - got).max() < 1 / 255 + 1e-6
    # and through the dataset: the decoded 16-bit image keeps its mid-grey as mid-grey
    for cls in ("a", "b"):
        (tmp_path / "tree" / cls).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((32, 32), 32768, np.uint16)).save(tmp_path / "tree" / cls / f"{i}.png")
    b = build_datasets(compose(["data=folder", f"data.root={tmp_path / 'tree'}", "data.image_size=32"]).data)
    assert abs(int(b.train.images.pixels.mean()) - 128) <= 1


def test_a_class_too_small_for_every_split_is_an_error_naming_it(busi_tree):
    for p in (busi_tree / "malignant").glob("malignant (*).png"):
        if not p.name.startswith("malignant (0)"):
            p.unlink()
    cfg = compose(["data=busi", f"data.root={busi_tree}", "data.image_size=32"])
    with pytest.raises(DataError, match=r"class 'malignant' has 1 image\(s\), too few"):
        build_datasets(cfg.data)


@pytest.mark.parametrize("name,kind", [("rsmas", "Augment"), ("true", "Augment"), ("ultrasound", "UltrasoundAugment"),
                                       ("none", None), ("false", None), ("False", None)])
def test_augment_policies_by_name(name, kind):
    from edgeus.data.transforms import augment_policy

    a = augment_policy(name)
    assert (type(a).__name__ if a is not None else None) == kind


def test_ultrasound_augmentation_is_seeded_bounded_and_moves_the_mask_with_the_image():
    from edgeus.data.transforms import UltrasoundAugment

    img = torch.rand(1, 32, 32)
    mask = torch.zeros(1, 32, 32)
    mask[:, 8:20, 10:22] = 1
    aug = UltrasoundAugment()
    a1, m1 = aug(img, mask, torch.Generator().manual_seed(3))
    a2, m2 = aug(img, mask, torch.Generator().manual_seed(3))
    assert torch.equal(a1, a2) and torch.equal(m1, m2)
    assert float(a1.min()) >= 0 and float(a1.max()) <= 1 and set(m1.unique().tolist()) <= {0.0, 1.0}
    outs = [aug(img, mask, torch.Generator().manual_seed(s))[0] for s in range(4)]
    assert not all(torch.equal(outs[0], o) for o in outs[1:])


def test_an_unknown_augmentation_is_a_one_line_error():
    from edgeus.config import AUGMENT_CHOICES, compose, validate
    from edgeus.data.transforms import AUGMENT
    from edgeus.errors import ConfigError

    assert set(AUGMENT_CHOICES) == set(AUGMENT)      # the config's list (no torch import) names every policy

    with pytest.raises(ConfigError, match="data.augment=strong: use rsmas, ultrasound, none"):
        validate(compose(["data.augment=strong"]))
