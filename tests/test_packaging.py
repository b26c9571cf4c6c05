"""The distribution ships every package, with envs/ and policies/ installed under metagate."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_listed():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    mapping = {v: k for k, v in cfg["package-dir"].items()}
    found = set()
    for init in ROOT.glob("*/**/__init__.py"):
        rel = init.parent.relative_to(ROOT)
        top = rel.parts[0]
        if top not in ("metagate", *mapping):
            continue
        name = ".".join((mapping.get(top, top), *rel.parts[1:]))
        found.add(name)
    assert found == set(cfg["packages"])


def test_envs_and_policies_import_under_metagate():
    import metagate.envs
    import metagate.policies

    assert Path(metagate.envs.__file__).parent == ROOT / "envs"
    assert Path(metagate.policies.__file__).parent == ROOT / "policies"
