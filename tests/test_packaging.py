"""The wheel must carry every package and the YAML files (recipes, targets, calibration specs)."""
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(not (ROOT / "pyproject.toml").is_file(), reason="runs from a source checkout")
def test_every_package_is_listed_in_pyproject():
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "edgeus").rglob("__init__.py")}
    assert on_disk <= listed, f"add to [tool.setuptools] packages: {sorted(on_disk - listed)}"


def test_yaml_groups_are_found():
    from edgeus import resources

    assert "rsmas_int8" in resources.list_options("recipes")
    assert {"cpu", "jetson_orin_nano", "desktop_ampere"} <= set(resources.list_options("targets"))
    assert "default" in resources.list_options("calibration")


def test_edgeus_is_imported_from_where_it_was_installed():
    import edgeus.deploy.runners  # noqa: F401  (a subpackage a wheel once lacked)
