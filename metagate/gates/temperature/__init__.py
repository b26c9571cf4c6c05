"""The temperature gates and everything they are made of, in one folder.

* :mod:`~metagate.gates.temperature.itkd`: the ``temperature`` gate, ITKD-style per-unit KD temperatures
  chosen by a policy (in-loop REINFORCE or a deployed PPO policy), and :class:`TemperatureLog`
* :mod:`~metagate.gates.temperature.ctkd`: the ``ctkd`` gate, CTKD's learnable temperature (global or per
  instance) trained through gradient reversal
* :mod:`~metagate.gates.temperature.reversal`: the gradient-reversal layer, the cosine curriculum, the
  learnable temperature modules and the range checks
* :mod:`~metagate.gates.temperature.policy`: the temperature policy (state, action <-> τ, Gaussian head)
* :mod:`~metagate.gates.temperature.redistribution`: ITKD's reward redistribution (a return model)
* :mod:`~metagate.gates.temperature.sb3`: the policy as a stable-baselines3 policy and its zip (imported only
  where stable-baselines3 is needed)
"""

from metagate.gates.temperature.ctkd import CTKDConfig, CTKDGate, CTKDTemperatureConfig  # registers ctkd
from metagate.gates.temperature.itkd import (  # registers temperature
    TemperatureConfig,
    TemperatureGate,
    TemperatureLog,
    load_temperature_policy,
)

__all__ = ["CTKDConfig", "CTKDGate", "CTKDTemperatureConfig", "TemperatureConfig", "TemperatureGate",
           "TemperatureLog", "load_temperature_policy"]
