"""Gymnasium environments that wrap the shared student loop.

``import metagate`` registers ``metagate/TeacherWeighting-v0`` and ``metagate/InstanceTemperature-v0`` without
importing gymnasium (:mod:`metagate.envs.registration`); the classes and configs below are imported on first use.
"""

from __future__ import annotations

import importlib
from typing import Any

from metagate.envs.registration import ENV_ID, TEMPERATURE_ENV_ID, register_envs

_LAZY = {
    "EnvConfig": "metagate.envs.config",
    "TeacherWeightingEnvConfig": "metagate.envs.config",
    "TemperatureEnvConfig": "metagate.envs.config",
    "InstanceTemperatureEnv": "metagate.envs.instance_temperature",
    "TeacherWeightingEnv": "metagate.envs.teacher_weighting",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'metagate.envs' has no attribute {name!r}")


__all__ = ["ENV_ID", "TEMPERATURE_ENV_ID", "EnvConfig", "InstanceTemperatureEnv", "TeacherWeightingEnv",
           "TeacherWeightingEnvConfig", "TemperatureEnvConfig", "register_envs"]
