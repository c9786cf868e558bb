import json
import os
import subprocess
import sys

import pytest
import torch

from edgeus.config import compose
from edgeus.errors import CheckpointError
from edgeus.models import create_model
from edgeus.train.checkpoint import load_checkpoint, read_checkpoint, save_checkpoint
from edgeus.train.run import train_from_config


def test_training_beats_chance_on_the_phantom(tmp_path):
    cfg = compose(["data.n_per_class=60", "data.image_size=32", "data.phantom_size=64", "model.name=simple_cnn",
                   "model.width=0.5", "train.epochs=8", "train.lr=3e-3", "seed=0"])
    result, bundle = train_from_config(cfg, tmp_path / "run")
    from edgeus.data import build_loaders
    from edgeus.evaluate import evaluate_model

    m = evaluate_model(result.model, build_loaders(bundle, cfg.data)["test"], bundle.classes)
    assert m["accuracy"] > 0.6          # chance is 1/3
    assert (tmp_path / "run" / "best.pt").is_file() and (tmp_path / "run" / "config.yaml").is_file()


def test_checkpoint_round_trip_is_exact_and_weights_only(tmp_path, small_bundle):
    model = create_model("simple_cnn", num_classes=3, in_chans=1, width=0.25).eval()
    path = save_checkpoint(tmp_path / "m.pt", model, classes=small_bundle.classes,
                           preprocessing=small_bundle.preprocessing, config="a: 1", metrics={"acc": 0.5})
    raw = torch.load(path, weights_only=True)         # plain data: no pickled objects
    assert raw["arch"]["name"] == "simple_cnn"
    loaded, ckpt = load_checkpoint(path)
    x = torch.randn(2, 1, 32, 32)
    assert torch.equal(model(x), loaded(x))
    assert ckpt["classes"] == small_bundle.classes and ckpt["preprocessing"]["image_size"] == 32


def test_checkpoint_from_another_architecture_is_refused(tmp_path):
    a = create_model("simple_cnn", num_classes=3, in_chans=1, width=0.25)
    path = save_checkpoint(tmp_path / "a.pt", a, classes=list("abc"), preprocessing={})
    raw = read_checkpoint(path)
    raw["arch"]["width"] = 0.5                           # claims another shape than its weights
    torch.save(raw, tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_checkpoint(tmp_path / "b.pt")
    with pytest.raises(CheckpointError, match="holds a 'simple_cnn'"):
        load_checkpoint(path, expect_arch="resnet50")


def test_pickled_or_foreign_files_are_refused(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not an edgeus checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")


def test_training_resumes_from_last_epoch(tmp_path):
    args = ["data.n_per_class=12", "data.image_size=32", "data.phantom_size=64", "model.width=0.25",
            "train.lr=1e-3"]
    r1, _ = train_from_config(compose(args + ["train.epochs=2"]), tmp_path)
    r2, _ = train_from_config(compose(args + ["train.epochs=3"]), tmp_path)
    assert [h["epoch"] for h in r2.history] == [1, 2, 3]
    assert r2.history[:2] == r1.history          # the first two epochs were loaded, not re-trained


def test_a_training_folder_never_resumes_on_other_data(tmp_path):
    from edgeus.errors import InputError

    args = ["data.n_per_class=12", "data.image_size=32", "data.phantom_size=64", "model.width=0.25", "train.epochs=1"]
    train_from_config(compose(args), tmp_path)
    with pytest.raises(InputError, match="holds a training on other data"):
        train_from_config(compose(args + ["data.seed=1"]), tmp_path)      # another split of the phantom
    r, _ = train_from_config(compose(args + ["data.seed=1", "train.resume=false"]), tmp_path)
    assert [h["epoch"] for h in r.history] == [1]


@pytest.mark.slow
def test_cli_train_and_eval(tmp_path):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    common = ["data.n_per_class=12", "data.image_size=32", "data.phantom_size=64"]
    out = tmp_path / "cli"
    r = subprocess.run([sys.executable, "-m", "edgeus.cli", "train", "model.width=0.25", "train.epochs=1",
                        f"train.out={out}", *common], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "macro-F1" in r.stdout
    r = subprocess.run([sys.executable, "-m", "edgeus.cli", "eval", str(out / "best.pt"), *common,
                        f"eval.out={tmp_path / 'm.json'}"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    m = json.loads((tmp_path / "m.json").read_text())
    assert {"accuracy", "macro_f1", "per_class", "auc", "ece", "confusion"} <= set(m)
    r = subprocess.run([sys.executable, "-m", "edgeus.cli", "train", "train.epoch=1"], capture_output=True, text=True)
    assert r.returncode == 2 and "train.epochs" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.slow
def test_data_parallel_training_with_two_gloo_processes(tmp_path):
    import socket

    with socket.socket() as sock:                      # a free port on the loopback
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}",
           "--master_addr=127.0.0.1",
           "-m", "edgeus.cli", "train", "data.n_per_class=12", "data.image_size=32", "data.phantom_size=64",
           "model.width=0.25", "train.epochs=2", f"train.out={out}"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    hist = json.loads((out / "history.json").read_text())
    assert len(hist) == 2
    model, _ = load_checkpoint(out / "best.pt")
    assert model(torch.randn(1, 1, 32, 32)).shape == (1, 3)


def _saved(tmp_path, name="m.pt", classes=("a", "b", "c"), **arch):
    model = create_model("simple_cnn", num_classes=3, in_chans=1, width=0.25)
    path = save_checkpoint(tmp_path / name, model, classes=list(classes), preprocessing={})
    return path, read_checkpoint(path)


def test_nan_or_inf_weights_are_refused_at_load(tmp_path):
    path, raw = _saved(tmp_path)
    key = next(k for k, v in raw["state_dict"].items() if v.is_floating_point())
    for bad in (float("nan"), float("inf")):
        raw["state_dict"][key].view(-1)[0] = bad
        torch.save(raw, tmp_path / "bad.pt")
        with pytest.raises(CheckpointError, match=f"NaN or Inf weights \\(in {key}\\)") as e:
            load_checkpoint(tmp_path / "bad.pt")
        assert "\n" not in str(e.value)


def test_head_size_must_match_the_class_names(tmp_path):
    path, raw = _saved(tmp_path)
    raw["classes"] = ["benign", "malignant"]            # 3 outputs, 2 names
    torch.save(raw, tmp_path / "two.pt")
    with pytest.raises(CheckpointError, match="3 outputs but the checkpoint names 2 classes"):
        load_checkpoint(tmp_path / "two.pt")


@pytest.mark.parametrize("edit, message", [
    (lambda a: a.pop("name"), "no arch.name"),
    (lambda a: a.update(name="no_such_net"), "cannot be built"),
    (lambda a: a.update(kwargs={"bogus": 1}), "cannot be built with its settings"),
    (lambda a: a.pop("width"), "arch lacks width"),
])
def test_malformed_but_safe_checkpoints_are_one_line_errors(tmp_path, edit, message):
    path, raw = _saved(tmp_path)
    edit(raw["arch"])
    torch.save(raw, tmp_path / "odd.pt")
    with pytest.raises(CheckpointError, match=message) as e:
        load_checkpoint(tmp_path / "odd.pt")
    assert "\n" not in str(e.value) and str(tmp_path / "odd.pt") in str(e.value)


def test_pickle_refusal_does_not_advise_turning_the_check_off(tmp_path):
    from fractions import Fraction   # a pickled object: weights_only=True refuses it (edgeus must not suggest otherwise)

    torch.save({"format": "edgeus-checkpoint/1", "obj": Fraction(1, 3)}, tmp_path / "pickled.pt")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "pickled.pt")
    msg = str(e.value)
    assert "pickled Python objects" in msg and "weights_only=False" not in msg and "\n" not in msg


def test_a_failed_save_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno

    from edgeus.train import checkpoint as ck

    def full_disk(obj, f):
        with open(f, "wb") as fh:
            fh.write(b"half a file")
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(ck.torch, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        ck.atomic_save({"a": 1}, tmp_path / "last.pt")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("arg, key", [("train.epochs=0", "train.epochs"), ("data.batch_size=0", "data.batch_size"),
                                      ("data.image_size=0", "data.image_size"), ("train.lr=-0.1", "train.lr")])
def test_out_of_range_settings_are_one_line_errors_before_training(tmp_path, capsys, arg, key):
    from edgeus.cli import main

    assert main(["train", arg, f"train.out={tmp_path / 'run'}"]) == 2
    err = capsys.readouterr().err.strip()
    assert key in err and ("must be >" in err) and len(err.splitlines()) == 1
    assert not (tmp_path / "run").exists()               # nothing trained, nothing written


def test_fit_with_no_epochs_names_no_best_checkpoint(tmp_path, small_cfg, small_bundle):
    from edgeus.data import build_loaders
    from edgeus.train import Supervised, fit

    model = create_model("simple_cnn", num_classes=3, width=0.25)
    r = fit(Supervised(model), build_loaders(small_bundle, small_cfg.data), small_cfg.train, tmp_path,
            classes=small_bundle.classes, preprocessing=small_bundle.preprocessing, epochs=0)
    assert r.best_path is None and r.history == []


def test_a_finetuner_builds_its_loaders_once_and_sharing_them_changes_nothing():
    """edgeus.finetune: one set of loaders per finetuner; fit reseeds them every epoch, so a second
    fine-tune through the same finetuner trains exactly like one through a fresh finetuner."""
    from conftest import make_cfg
    from edgeus.data import build_datasets
    from edgeus.finetune import make_finetuner
    from edgeus.train import Supervised

    cfg = make_cfg("train.max_steps_per_epoch=2")
    bundle = build_datasets(cfg.data)

    def run(ft, **kw):
        torch.manual_seed(0)
        m = create_model("simple_cnn", num_classes=3, width=0.25)
        m, rep = ft(m, epochs=2, desc="ft", **kw)
        return [v.clone() for v in m.state_dict().values()], rep

    ft = make_finetuner(cfg, bundle)
    first, rep = run(ft)
    loaders = ft.loaders
    second, _ = run(ft)
    fresh, _ = run(make_finetuner(cfg, bundle))
    assert ft.loaders is loaders
    assert all(torch.equal(a, b) for a, b in zip(first, fresh)) and all(torch.equal(a, b) for a, b in zip(second, fresh))
    assert rep["epochs"] == 2 and not rep["with_teacher"] and len(rep["history"]) == 2
    # with a teacher: it is put in eval mode and used, unless a custom trainable replaces the default one
    teacher = create_model("simple_cnn", num_classes=3, width=0.25).train()
    ft = make_finetuner(cfg, bundle, teacher=teacher)
    assert not teacher.training
    assert run(ft)[1]["with_teacher"]
    assert not run(ft, use_teacher=False)[1]["with_teacher"]
    assert not run(ft, trainable=lambda m, w: Supervised(m, w))[1]["with_teacher"]


def test_weight_average_warms_up_and_copies_integer_buffers():
    from edgeus.train.trainer import WeightAverage

    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    ema = WeightAverage(model, decay=0.99)
    w0 = ema.model[0].weight.clone()
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model[1].num_batches_tracked.fill_(7)
    ema.update(model)                 # first update: decay min(0.99, 2/11), so the new weights dominate
    d = 2 / 11
    assert torch.allclose(ema.model[0].weight, d * w0 + (1 - d) * model[0].weight)
    assert int(ema.model[1].num_batches_tracked) == 7          # copied, not averaged
    for _ in range(2000):
        ema.update(model)
    assert torch.allclose(ema.model[0].weight, model[0].weight, atol=1e-6)
    assert not any(p.requires_grad for p in ema.model.parameters())


def test_select_last_with_ema_keeps_the_final_average(tmp_path):
    cfg = compose(["data.n_per_class=24", "data.image_size=32", "data.phantom_size=64", "data.batch_size=16",
                   "model.name=simple_cnn", "model.width=0.25", "train.epochs=3", "train.select=last",
                   "train.ema=0.9", "data.augment=ultrasound"])
    result, _ = train_from_config(cfg, tmp_path / "run")
    assert result.best_epoch == 3 and [r["select"]["by"] for r in result.history] == ["last"] * 3
    _, ckpt = load_checkpoint(tmp_path / "run" / "best.pt")
    last = torch.load(tmp_path / "run" / "last.pt", map_location="cpu", weights_only=True)
    for k, v in last["ema"]["state"].items():          # what is kept is the weight average, not the raw weights
        assert torch.equal(ckpt["state_dict"][k], v)
    raw = {k[len("student."):]: v for k, v in last["trainable"].items() if k.startswith("student.")}
    assert any(not torch.equal(raw[k], v) for k, v in last["ema"]["state"].items() if v.is_floating_point())


def test_refit_on_train_and_val_trains_on_both_and_needs_select_last(tmp_path):
    from edgeus.config import validate
    from edgeus.errors import ConfigError
    from edgeus.train.run import refit_bundle

    with pytest.raises(ConfigError, match="select=last"):
        validate(compose(["train.fit_on=train+val"]))
    cfg = compose(["data.n_per_class=24", "data.image_size=32", "data.phantom_size=64", "model.name=simple_cnn",
                   "model.width=0.25", "train.epochs=1", "train.fit_on=train+val", "train.select=last"])
    validate(cfg)
    from edgeus.data import build_datasets

    b = build_datasets(cfg.data)
    n_train = len(b.train)
    r = refit_bundle(b)
    assert len(r.train) == len(b.train) + len(b.val) and len(r.train_plain) == len(r.train)
    assert r.train.augment is not None and r.train_plain.augment is None and r.val is b.val and r.test is b.test
    assert set(b.ids("test")).isdisjoint(r.ids("train"))
    result, _ = train_from_config(cfg, tmp_path / "run", bundle=b)
    assert len(b.train) == n_train                 # the caller's bundle is left as it was
    assert read_checkpoint(tmp_path / "run" / "best.pt")["data"]["fit_on"] == "train+val"
