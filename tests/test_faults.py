"""Fault injection for the compress pipeline (issue 21): what a user, a crash or a second user does to a
run, and what they see. Tiny phantom runs; the whole module takes well under two minutes.

| tried | the user sees |
|---|---|
| run killed (SIGKILL) in the teacher stage, then resume= | the resumed run's ledger equals an uninterrupted one |
| two runs started in the same second | two run directories (time + random suffix, created exclusively) |
| out= of an earlier run that died, or a folder of the user's | exit 2 before anything runs: "already holds a run" / "not an empty directory"; the folder is untouched |
| resume= with data.* / gates.* / seed changed | exit 2 naming each refused key; nothing runs |
| resume= a train output folder | exit 4, one line: not a compress run directory |
| resume= after the data changed on disk | exit 4: the data differs from the run's (fingerprint) |
| a copied run directory, resumed / packaged | works: state and ledger hold paths relative to the run directory |
| train.epochs=0, data.image_size=0, data.batch_size=0, train.lr=-1, a negative tolerance | exit 2 naming key, value and valid range; no run directory |
| data.root that does not exist | exit 4; no run directory left behind |
| package.out=<folder with the user's files>, or its .tar.gz exists | exit 2 before training; the files are untouched |
| a gate fails; resume; resume stages=[package] | exit 3 each time, no bundle; only a resume that changes the stage's settings runs it again (recorded in state.json) |
| teacher.checkpoint trained at 48 px in a 64-px run | exit 4 before any data loads: "set data.image_size=48 to use it" |
| the disk fills while state/ledger is written | the temporary file is removed; exit 7 "the disk is full" |
| recipe file without profiles | composes |
| edgeus config <args> / compress --json | the resolved YAML / a JSON summary on stdout |
"""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import TINY as BASE, fail_every_gate
from conftest import make_cfg

from edgeus.errors import GateError

ARGS = [*BASE, "recipe=rsmas_int8", "train.epochs=2", "train.lr=0.003", "prune.finetune_epochs=1",
        "compress.latency_iters=3", "compress.latency_warmup=1", "quantize.qat=false", "compress.robustness=false",
        "compress.report=false", "compress.baseline_int8=false", "seed=0"]
SHORT = ["recipe.stages=[teacher,prune]"]
ENV = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")


def cli(*args, cwd=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "edgeus.cli", *args], capture_output=True, text=True, env=ENV,
                          cwd=cwd, timeout=timeout)


def main_rc(capsys, *args):
    """The CLI in this process (no interpreter start): (exit code, stderr)."""
    from edgeus.cli import main

    capsys.readouterr()
    rc = main(list(args))
    return rc, capsys.readouterr().err


def ledger_key(run: Path):
    rows = json.loads((run / "ledger.json").read_text())["rows"]
    return [(r["stage"], r.get("params"), r.get("macs"), json.dumps(r.get("metrics"), sort_keys=True)) for r in rows]


def run_compress(*over):
    from edgeus.pipeline import compress

    return compress(make_cfg(*ARGS, *over, tiny=False))


@pytest.fixture(scope="module")
def done_run(tmp_path_factory):
    """A finished tiny run: teacher, prune, export, quantize, package."""
    out = tmp_path_factory.mktemp("faults") / "run"
    run_compress("recipe.stages=[teacher,prune,export,quantize,package]", f"out={out}", "gates.enforce=false")
    return out


# ------------------------------------------------------------------------------------------ kill / resume

@pytest.mark.slow
def test_killed_in_the_teacher_stage_resumes_to_the_same_ledger(tmp_path):
    ref = tmp_path / "ref"
    run_compress(*SHORT, "train.epochs=6", f"out={ref}", "gates.enforce=false")
    run = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "edgeus.cli", "compress", *ARGS, *SHORT, "train.epochs=6",
                             f"out={run}", "gates.enforce=false"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env=ENV)
    mid = run / "00-teacher" / "train" / "last.pt"
    deadline = time.time() + 120
    while time.time() < deadline and not mid.exists() and proc.poll() is None:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert "teacher" not in json.loads((run / "state.json").read_text())["done"]
    r = cli("compress", f"resume={run}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert ledger_key(run) == ledger_key(ref)


# ------------------------------------------------------------------------------------------ run directories

@pytest.mark.slow
def test_runs_started_in_the_same_second_get_their_own_directories(tmp_path):
    from edgeus.models import create_model
    from edgeus.train.checkpoint import save_checkpoint

    ckpt = tmp_path / "teacher.pt"     # a loaded teacher: the quickest complete run
    save_checkpoint(ckpt, create_model("simple_cnn", num_classes=3, in_chans=1, width=0.25),
                    classes=["normal", "benign", "malignant"],
                    preprocessing={"image_size": 32, "in_chans": 1, "mean": [0.5], "std": [0.25]})
    procs = [subprocess.Popen([sys.executable, "-m", "edgeus.cli", "compress", *ARGS, "recipe.stages=[teacher]",
                               f"teacher.checkpoint={ckpt}", f"out_dir={tmp_path / 'runs'}"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-1000:] for o in outs]
    dirs = sorted((tmp_path / "runs").iterdir())
    assert len(dirs) == 2, outs
    for d in dirs:
        assert json.loads((d / "state.json").read_text())["done"] == ["teacher"] and (d / "ledger.json").is_file()


def test_exclusive_creation_refuses_a_taken_directory(tmp_path):
    from edgeus.errors import UsageError
    from edgeus.pipeline.runner import _create_run_dir, _fresh_run_dir

    cfg = make_cfg(*ARGS, f"out_dir={tmp_path}", tiny=False)
    a, _ = _fresh_run_dir(cfg)
    b, _ = _fresh_run_dir(cfg)
    assert a != b and a.name.split("-")[:3] == b.name.split("-")[:3]   # same recipe and second, new suffix
    _create_run_dir(a, cfg)
    with pytest.raises(UsageError, match="just taken"):
        _create_run_dir(a, cfg)


def test_a_new_run_never_writes_into_an_old_run_or_a_users_folder(tmp_path, done_run, capsys):
    rc, err = main_rc(capsys, "compress", *ARGS, *SHORT, f"out={done_run}")
    assert rc == 2 and "already holds a run" in err and f"resume={done_run}" in err
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("precious")
    rc, err = main_rc(capsys, "compress", *ARGS, *SHORT, f"out={mine}")
    assert rc == 2 and "not an empty directory" in err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"] and (mine / "notes.txt").read_text() == "precious"


def test_a_failed_start_leaves_no_run_directory(tmp_path, capsys):
    rc, err = main_rc(capsys, "compress", *ARGS, *SHORT, "data=busi", f"data.root={tmp_path / 'nowhere'}",
                      f"out={tmp_path / 'run'}")
    assert rc == 4 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "run").exists()


# ------------------------------------------------------------------------------------------ resume

def test_resume_refuses_overrides_it_cannot_apply_by_name(done_run, capsys):
    before = (done_run / "state.json").read_text()
    rc, err = main_rc(capsys, "compress", f"resume={done_run}", "data.image_size=48", "gates.max_accuracy_drop=0.5",
                      "seed=3")
    assert rc == 2
    for key in ("data.image_size", "gates.max_accuracy_drop", "seed"):
        assert key in err
    assert (done_run / "state.json").read_text() == before


def test_resume_of_a_train_folder_is_one_line(tmp_path, capsys):
    folder = tmp_path / "train-out"
    folder.mkdir()
    (folder / "last.pt").write_bytes(b"")
    (folder / "config.yaml").write_text("seed: 0\n")
    rc, err = main_rc(capsys, "compress", f"resume={folder}")
    assert rc == 4 and len(err.strip().splitlines()) == 1
    assert "not a compress run directory" in err and "edgeus train" in err


@pytest.mark.slow
def test_resume_after_the_data_changed_is_refused(tmp_path):
    from PIL import Image
    import numpy as np

    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(6):
            Image.fromarray(rng.integers(0, 255, (32, 32), dtype=np.uint8)).save(root / c / f"{i}.png")
    run = tmp_path / "run"
    args = [*ARGS, "recipe.stages=[teacher]", "train.epochs=1", "data=folder", f"data.root={root}",
            "gates.critical_class=null", f"out={run}"]
    assert cli("compress", *args).returncode == 0
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "a" / "0.png")    # one image changes
    r = cli("compress", f"resume={run}", "stages=[teacher]")
    assert r.returncode == 4 and "data differs" in r.stderr


def test_a_copied_run_directory_packages_from_its_own_files(tmp_path, done_run, capsys):
    state = json.loads((done_run / "state.json").read_text())
    rows = json.loads((done_run / "ledger.json").read_text())["rows"]
    paths = [*state["artifacts"].values(), *(v for a in state["outputs"].values() for v in a.values()),
             *(r.get(k) for r in rows for k in ("artifact", "onnx") if r.get(k))]
    assert paths and not any(Path(p).is_absolute() for p in paths)     # relative to the run directory
    copy = tmp_path / "moved"
    shutil.copytree(done_run, copy)
    rc, err = main_rc(capsys, "compress", f"resume={copy}", "stages=[package]")
    assert rc == 0, err[-2000:]
    bundle = json.loads((copy / "state.json").read_text())["artifacts"]["bundle"]
    assert (copy / bundle).is_dir() and not Path(bundle).is_absolute()
    assert (copy / "student.int8.onnx").is_file() and (copy / "run.log").is_file()
    assert "stages=[package]" in (copy / "command.txt").read_text()


# ------------------------------------------------------------------------------------------ bad values

@pytest.mark.parametrize("bad,text", [("train.epochs=0", "train.epochs=0: must be >= 1"),
                                      ("data.image_size=0", "data.image_size=0: must be >= 1"),
                                      ("data.batch_size=0", "data.batch_size=0: must be >= 1"),
                                      ("train.lr=-0.1", "train.lr=-0.1: must be > 0"),
                                      ("gates.max_recall_drop=-0.02", "gates.max_recall_drop=-0.02: must be >= 0")])
def test_out_of_range_settings_are_refused_before_anything_runs(tmp_path, bad, text):
    from edgeus.cli import main

    out = tmp_path / "run"
    assert main(["compress", *ARGS, *SHORT, bad, f"out={out}"]) == 2
    assert not out.exists()


def test_out_of_range_message_names_key_value_and_range():
    from edgeus.config import ConfigError, validate

    with pytest.raises(ConfigError, match=r"train\.epochs=0: must be >= 1") as e:
        validate(make_cfg("train.epochs=0", "data.batch_size=0"))
    assert "data.batch_size=0: must be >= 1" in str(e.value)


def test_a_recipe_file_without_profiles_composes(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text("recipe:\n  stages: [teacher, prune]\nmodel:\n  name: simple_cnn\n")
    cfg = make_cfg(f"recipe={path}")
    assert list(cfg.recipe.stages) == ["teacher", "prune"] and cfg.recipe.name == "mine"
    rc, err = main_rc(capsys, "compress", f"recipe={path}", "profile=full")
    assert rc == 2 and "no profile 'full'" in err


# ------------------------------------------------------------------------------------------ data loss

def test_package_out_never_replaces_a_users_files(tmp_path, capsys):
    mine = tmp_path / "firmware"
    mine.mkdir()
    (mine / "keep.bin").write_text("user data")
    rc, err = main_rc(capsys, "compress", *ARGS, *SHORT, f"package.out={mine}", f"out={tmp_path / 'run'}",
                      "recipe.stages=[teacher,prune,export,quantize,package]")
    assert rc == 2 and "package.out" in err and "package.overwrite=true" in err
    assert (mine / "keep.bin").read_text() == "user data" and not (tmp_path / "run").exists()
    other = tmp_path / "fw2"
    (tmp_path / "fw2.tar.gz").write_text("old archive")
    rc, err = main_rc(capsys, "compress", *ARGS, *SHORT, f"package.out={other}", f"out={tmp_path / 'run2'}",
                      "recipe.stages=[teacher,prune,export,quantize,package]")
    assert rc == 2 and (tmp_path / "fw2.tar.gz").read_text() == "old archive"


def test_single_commands_never_replace_an_existing_output(tmp_path, capsys):
    from edgeus.models import create_model
    from edgeus.train.checkpoint import save_checkpoint

    ckpt = save_checkpoint(tmp_path / "m.pt", create_model("simple_cnn", width=0.25), classes=["a", "b", "c"],
                           preprocessing={"image_size": 32, "in_chans": 1, "mean": [0.5], "std": [0.25]})
    mine = tmp_path / "m.onnx"
    mine.write_text("a user's file")
    rc, err = main_rc(capsys, "export", str(ckpt))
    assert rc == 2 and "m.onnx exists" in err and "overwrite=true" in err and mine.read_text() == "a user's file"
    rc, _ = main_rc(capsys, "export", str(ckpt), "overwrite=true")
    assert rc == 0 and mine.read_bytes()[:1] != b"a"


def test_a_truncated_onnx_file_is_a_one_line_input_error(tmp_path, capsys):
    from edgeus.models import create_model
    from edgeus.onnx.export import export_onnx

    cfg = make_cfg()
    good = tmp_path / "m.onnx"
    export_onnx(create_model("simple_cnn", width=0.25), good, cfg.export,
                preprocessing={"image_size": 32, "in_chans": 1, "mean": [0.5], "std": [0.25]})
    bad = tmp_path / "cut.onnx"
    bad.write_bytes(good.read_bytes()[:3000])
    for cmd in (["eval", str(bad)], ["quantize", str(bad), f"out={tmp_path / 'q.onnx'}"], ["bench", str(bad)]):
        rc, err = main_rc(capsys, *cmd)
        assert rc == 4 and "cut.onnx" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, cmd


# ------------------------------------------------------------------------------------------ gates

@pytest.mark.slow
def test_a_failed_gate_stays_failed_on_resume_and_ships_nothing(tmp_path, monkeypatch):
    from edgeus.cli import main

    fail_every_gate(monkeypatch)
    run = tmp_path / "run"
    stages = "recipe.stages=[teacher,prune,export,quantize,package]"
    assert main(["compress", *ARGS, stages, f"out={run}"]) == 3
    state = json.loads((run / "state.json").read_text())
    assert "prune" in state["done"] and "package" not in state["done"] and any(not g["passed"] for g in state["gates"])
    for extra in ([], ["stages=[package]"], ["stages=[export,quantize,package]"]):
        assert main(["compress", f"resume={run}", *extra]) == 3
        assert not (run / "04-package" / "bundle").exists()
    assert main(["package", str(run), f"out={tmp_path / 'fw'}"]) == 3       # nor through edgeus package
    assert not (tmp_path / "fw").exists()
    monkeypatch.undo()        # the gates as configured; a resume that changes prune's settings re-runs it
    assert main(["compress", f"resume={run}", "prune.finetune_epochs=2"]) == 0
    state = json.loads((run / "state.json").read_text())
    assert state["changes"][-1]["stage"] == "prune" and state["changes"][-1]["keys"] == ["prune.finetune_epochs"]
    assert state["settings"]["prune"]["prune"]["finetune_epochs"] == 2 and "package" in state["done"]


def test_gate_error_from_the_python_api(tmp_path, monkeypatch):
    from edgeus.pipeline.runner import failed_gates

    fail_every_gate(monkeypatch)
    with pytest.raises(GateError, match="no bundle is written"):
        run_compress(*SHORT, f"out={tmp_path / 'g'}")
    assert failed_gates(tmp_path / "g") and failed_gates(tmp_path / "nothing") == []


# ------------------------------------------------------------------------------------------ inputs, disk

def test_a_teacher_checkpoint_of_another_size_is_refused_before_the_run(tmp_path, capsys):
    from edgeus.models import create_model
    from edgeus.train.checkpoint import save_checkpoint

    ckpt = tmp_path / "t48.pt"
    save_checkpoint(ckpt, create_model("simple_cnn", num_classes=3, in_chans=1, width=0.25),
                    classes=["normal", "benign", "malignant"],
                    preprocessing={"image_size": 48, "in_chans": 1, "mean": [0.5], "std": [0.25]})
    rc, err = main_rc(capsys, "compress", *ARGS, *SHORT, f"teacher.checkpoint={ckpt}", f"out={tmp_path / 'run'}")
    assert rc == 4 and "image_size=48" in err and "data.image_size=48" in err
    assert not (tmp_path / "run").exists()


def test_a_full_disk_leaves_no_temporary_file(tmp_path, monkeypatch):
    import errno

    from edgeus.errors import exit_code
    from edgeus.pipeline.ledger import write_json

    def full(self, *a, **k):       # half a file written, then the disk is full
        with open(self, "w") as f:
            f.write("{")
        raise OSError(errno.ENOSPC, "No space left on device", str(self))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError) as e:
        write_json(tmp_path / "state.json", {"a": 1})
    assert exit_code(e.value) == 7 and list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------------ CLI hygiene

def test_config_command_prints_the_resolved_configuration(capsys):
    from edgeus.cli import main

    assert main(["config", "recipe=rsmas_int8", "prune.target_macs=0.2"]) == 0
    out = capsys.readouterr().out
    assert "target_macs: 0.2" in out and "name: rsmas_int8" in out


@pytest.mark.slow
def test_compress_json_summary_and_headline(tmp_path):
    r = cli("compress", *ARGS, "recipe.stages=[teacher,prune,export,quantize]", "gates.enforce=false",
            f"out={tmp_path / 'run'}", "--json")
    assert r.returncode == 0, r.stderr[-2000:]
    summary = json.loads(r.stdout)
    assert summary["ok"] and summary["run_dir"] == str(tmp_path / "run")
    h = summary["headline"]
    assert h["student"] == "quantize" and h["bytes"][1] < h["bytes"][0]
    from edgeus.pipeline.runner import headline_text

    lines = headline_text(h).splitlines()
    assert [x.split(":")[0] for x in lines] == ["size", "speed", "accuracy"]
