"""Registers metagate's gymnasium environments without importing gymnasium.

``import metagate`` calls :func:`install`: when gymnasium is already imported the ids are registered at once;
otherwise a post-import hook registers them the moment gymnasium is first imported (gymnasium 1.x dropped its
plugin entry points). So ``import metagate`` stays light, and ``gymnasium.make("metagate/TeacherWeighting-v0")``
works after it.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from typing import Any

ENV_ID = "metagate/TeacherWeighting-v0"
TEMPERATURE_ENV_ID = "metagate/InstanceTemperature-v0"
ENTRY_POINTS = {
    ENV_ID: "metagate.envs.teacher_weighting:TeacherWeightingEnv",
    TEMPERATURE_ENV_ID: "metagate.envs.instance_temperature:InstanceTemperatureEnv",
}


def register_envs() -> None:
    """Register every metagate env id with gymnasium (idempotent; imports gymnasium)."""
    from gymnasium.envs.registration import register, registry

    for env_id, entry_point in ENTRY_POINTS.items():
        if env_id not in registry:
            register(id=env_id, entry_point=entry_point)


class _RegisterAfterImport(importlib.abc.MetaPathFinder):
    """Finds ``gymnasium`` through the other finders and registers the envs once its module has run."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "gymnasium":
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from recursing into this finder
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_and_register(module: Any) -> None:
            exec_module(module)
            register_envs()

        spec.loader.exec_module = exec_and_register  # type: ignore[method-assign]
        return spec


def install() -> None:
    """Register now if gymnasium is loaded, else when it is first imported."""
    if "gymnasium" in sys.modules:
        register_envs()
    elif not any(isinstance(f, _RegisterAfterImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _RegisterAfterImport())
