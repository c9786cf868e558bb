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
    """The edgeus that imports is the installed distribution's (not a stray copy on sys.path), and its
    subpackages (one a wheel once lacked) come from that same tree."""
    import importlib.metadata as md
    import json
    from urllib.parse import unquote, urlparse

    import edgeus
    import edgeus.deploy.runners

    pkg = Path(edgeus.__file__).resolve().parent
    assert Path(edgeus.deploy.runners.__file__).resolve().parent == pkg / "deploy" / "runners"
    dist = md.distribution("edgeus")
    direct = dist.read_text("direct_url.json")
    info = json.loads(direct) if direct else {}
    if info.get("dir_info", {}).get("editable"):   # pip install -e: the source tree it points at
        src = Path(unquote(urlparse(info["url"]).path)).resolve()
        assert pkg.is_relative_to(src), f"edgeus imported from {pkg}, installed (editable) from {src}"
    else:                                           # a wheel: the site-packages copy it installed
        assert Path(dist.locate_file("edgeus/__init__.py")).resolve() == pkg / "__init__.py"
