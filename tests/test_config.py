import pytest

from edgeus.config import ConfigError, compose, split_args


def test_defaults_and_dotted_overrides():
    cfg = compose(["train.epochs=3", "data.root=/x", "data.split=[0.7,0.15,0.15]"])
    assert cfg.train.epochs == 3 and cfg.data.root == "/x"
    assert list(cfg.data.split) == [0.7, 0.15, 0.15]


def test_typo_lists_nearby_keys():
    with pytest.raises(ConfigError) as e:
        compose(["train.epoch=3"])
    assert "train.epochs" in str(e.value)


def test_typo_in_section_name():
    with pytest.raises(ConfigError) as e:
        compose(["trian.epochs=3"])
    assert "train" in str(e.value)


def test_section_given_a_plain_value_names_its_keys():
    with pytest.raises(ConfigError, match=r"'model' is a section.*model\.name=rsmas"):
        compose(["model=rsmas"])
    cfg = compose(["model={name: rsmas, width: 0.5}"])   # a whole mapping is still fine
    assert cfg.model.name == "rsmas" and cfg.model.width == 0.5


def test_wrong_type_is_an_error():
    with pytest.raises(ConfigError, match="train.epochs"):
        compose(["train.epochs=many"])


def test_unknown_group_options_list_the_valid_ones():
    with pytest.raises(ConfigError, match="busi"):
        compose(["data=bussi"])
    with pytest.raises(ConfigError, match="Available"):
        compose(["recipe=no_such_recipe"])


def test_split_args_keeps_positionals_apart():
    assert split_args(["a.pt", "x=1", "b.onnx", "y.z=2"]) == (["a.pt", "b.onnx"], ["x=1", "y.z=2"])


def test_importing_config_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, edgeus.config; print('torch' in sys.modules)"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "False", r.stdout + r.stderr
