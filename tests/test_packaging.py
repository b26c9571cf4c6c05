"""The distribution ships every package under metagate/, and ``import metagate`` stays light."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_every_package_is_found():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    from setuptools import find_packages

    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "package-dir" not in cfg  # no mapping: the import path is the folder
    found = set(find_packages(str(ROOT), **cfg["packages"]["find"]))
    on_disk = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "metagate").glob("**/__init__.py")}
    assert found == on_disk
    assert {"metagate.envs", "metagate.policies"} <= found


def test_envs_and_policies_import_under_metagate():
    import metagate.envs
    import metagate.policies

    assert Path(metagate.envs.__file__).parent == ROOT / "metagate" / "envs"
    assert Path(metagate.policies.__file__).parent == ROOT / "metagate" / "policies"


def test_import_metagate_does_not_import_gymnasium_but_registers_its_envs():
    code = (
        "import sys, metagate\n"
        "assert 'gymnasium' not in sys.modules, 'import metagate imported gymnasium'\n"
        "assert 'metagate.envs.base' not in sys.modules and 'stable_baselines3' not in sys.modules\n"
        "import gymnasium\n"
        "ids = set(gymnasium.envs.registration.registry)\n"
        "assert {'metagate/TeacherWeighting-v0', 'metagate/InstanceTemperature-v0'} <= ids, ids\n"
        "from gymnasium.envs.registration import load_env_creator\n"
        "print(load_env_creator(gymnasium.spec('metagate/TeacherWeighting-v0').entry_point).__name__)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "TeacherWeightingEnv"
