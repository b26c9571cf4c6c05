"""Gymnasium environments that wrap the shared student loop (installed as metagate.envs).

Importing this package (``import metagate`` does) registers ``metagate/TeacherWeighting-v0`` and
``metagate/InstanceTemperature-v0``.
"""

from gymnasium.envs.registration import register, registry

from metagate.envs.config import EnvConfig, TeacherWeightingEnvConfig, TemperatureEnvConfig
from metagate.envs.instance_temperature import InstanceTemperatureEnv
from metagate.envs.teacher_weighting import TeacherWeightingEnv

ENV_ID = "metagate/TeacherWeighting-v0"
TEMPERATURE_ENV_ID = "metagate/InstanceTemperature-v0"
if ENV_ID not in registry:
    register(id=ENV_ID, entry_point="metagate.envs.teacher_weighting:TeacherWeightingEnv")
if TEMPERATURE_ENV_ID not in registry:
    register(id=TEMPERATURE_ENV_ID, entry_point="metagate.envs.instance_temperature:InstanceTemperatureEnv")

__all__ = ["ENV_ID", "TEMPERATURE_ENV_ID", "EnvConfig", "InstanceTemperatureEnv", "TeacherWeightingEnv",
           "TeacherWeightingEnvConfig", "TemperatureEnvConfig"]
