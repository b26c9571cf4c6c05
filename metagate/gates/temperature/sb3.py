"""A stable-baselines3 actor-critic policy for :class:`metagate.envs.InstanceTemperatureEnv`.

Observation ``[B, 1, S]`` unit states, action ``[B, 1]`` per-unit temperature actions. The actor is the
in-loop gate's :class:`~metagate.gates.temperature.policy.TemperatureHead` with a Gaussian whose log-stds do
not depend on the state; the critic pools an encoding of the units' states over the batch. The
temperature range and label weight are stored with the policy, so a deployed policy maps actions to
temperatures exactly as during training.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from torch import Tensor, nn

from metagate.errors import ConfigError
from metagate.features import FEATURE_HIGH
from metagate.gates.temperature.policy import (
    ACTION_BOUND,
    ITKD_T_INIT,
    ITKD_T_MAX,
    ITKD_T_MIN,
    TemperatureHead,
    action_temperature,
    temperature_action,
)
from metagate.policies.core import TeacherGaussian
from metagate.policies.safe_zip import build_policy, read_policy_zip, resolve_zip, write_meta
from metagate.policies.sb3 import GaussianActorCritic


class TemperaturePolicySB3(GaussianActorCritic):
    """Per-unit temperature actor-critic.

    :param hidden: MLP width
    :param log_std_init: initial per-unit log-std (``None``: off)
    :param shared_log_std_init: initial log-std of the noise shared by a batch's units (``None``: off)
    :param t_min: the env's lowest temperature
    :param t_max: the env's highest temperature
    :param t_init: the temperature the actor starts near
    :param label_alpha: the label weight used during training (deployment default)
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Any,
        hidden: int = 32,
        log_std_init: float | None = None,
        shared_log_std_init: float | None = -0.5,
        t_min: float = ITKD_T_MIN,
        t_max: float = ITKD_T_MAX,
        t_init: float = ITKD_T_INIT,
        label_alpha: float = 0.5,
        **kwargs: Any,
    ) -> None:
        if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) != 3 \
                or observation_space.shape[1] != 1:
            raise ValueError(f"observation space must be Box[B, 1, S], got {observation_space}")
        if not isinstance(action_space, spaces.Box) or action_space.shape != observation_space.shape[:2]:
            raise ValueError(f"action space must be Box[B, 1] matching the observation, got {action_space}")
        self.hidden = int(hidden)
        self.shared_log_std_init = shared_log_std_init
        self.t_min, self.t_max, self.t_init = float(t_min), float(t_max), float(t_init)
        self.label_alpha = float(label_alpha)
        kwargs.pop("ortho_init", None)
        super().__init__(observation_space, action_space, lr_schedule, log_std_init=log_std_init,
                         ortho_init=False, **kwargs)

    def _build(self, lr_schedule: Any) -> None:
        s = int(self.observation_space.shape[-1])  # type: ignore[index]
        self.actor = TemperatureHead(s, self.hidden, temperature_action(self.t_init, self.t_min, self.t_max))
        self.critic_encoder = nn.Sequential(nn.Linear(s, self.hidden), nn.ReLU())
        self.critic_head = nn.Sequential(nn.Linear(2 * self.hidden, self.hidden), nn.Tanh(), nn.Linear(self.hidden, 1))
        self._build_log_stds()
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return self._constructor(hidden=self.hidden, t_min=self.t_min, t_max=self.t_max, t_init=self.t_init,
                                 label_alpha=self.label_alpha)

    @property
    def num_state(self) -> int:
        return self.actor.num_state

    # -- networks --------------------------------------------------------------------------------
    def mean_action(self, state: Tensor) -> Tensor:
        """``[..., B, 1]`` mean actions for states ``[..., B, 1, S]`` (any number of units)."""
        return self.actor(state)

    def distribution(self, state: Tensor) -> TeacherGaussian:
        return TeacherGaussian(self.mean_action(state), self.unit_log_std, self.shared_log_std)

    def temperature(self, action: Tensor) -> Tensor:
        """Actions ``[B, 1]`` -> temperatures ``[B]`` (the env's mapping)."""
        return action_temperature(action.reshape(-1), self.t_min, self.t_max)

    def _values(self, x: Tensor) -> Tensor:
        h = self.critic_encoder(x)  # [n, B, 1, H]
        return self.critic_head(torch.cat([h.mean((1, 2)), h.amax((1, 2))], -1))


#: the plain-JSON description of a temperature policy zip (the safe loader reads only it and the weights)
META_NAME = "metagate-temperature-policy.json"
KWARGS = ("hidden", "log_std_init", "shared_log_std_init", "t_min", "t_max", "t_init", "label_alpha")


def write_temperature_meta(path: str | Path, policy: TemperaturePolicySB3, algo: str) -> None:
    """Add :data:`META_NAME` to a zip saved by ``model.save`` (``metagate train-policy --env temperature``)."""
    write_meta(path, META_NAME, {"algo": algo, "observation_shape": [int(s) for s in policy.observation_space.shape],
                                 "action_shape": [int(s) for s in policy.action_space.shape],
                                 "policy_kwargs": {k: getattr(policy, k) for k in KWARGS}})


def load_temperature_zip(path: str | Path, num_state: int, device: str | torch.device = "cpu",
                         what: str = "--temp-policy") -> TemperaturePolicySB3:
    """A :class:`TemperaturePolicySB3` from a zip, executing nothing of it (the JSON description and
    ``torch.load(weights_only=True)`` of the weights: :func:`metagate.policies.safe_zip.read_policy_zip`)."""
    p, where = resolve_zip(path, what, "train one with `metagate train-policy --env temperature --out ...`")

    def check(meta: Any, where: str) -> tuple[tuple[int, ...], tuple[int, ...], dict[str, Any]]:
        try:
            obs_shape, act_shape = tuple(int(s) for s in meta["observation_shape"]), \
                tuple(int(s) for s in meta["action_shape"])
            kwargs = {k: meta["policy_kwargs"][k] for k in KWARGS}
        except (KeyError, TypeError, ValueError) as e:
            raise ConfigError(f"{where}: {META_NAME} is malformed ({e})") from e
        if len(obs_shape) != 3 or obs_shape[-1] != num_state:
            raise ConfigError(f"{where}: trained for {obs_shape[-1] if obs_shape else '?'} state features per "
                              f"unit, this version has {num_state}; retrain it")
        return obs_shape, act_shape, kwargs

    (obs_shape, act_shape, kwargs), state = read_policy_zip(p, where, META_NAME, check=check)
    obs = spaces.Box(0.0, FEATURE_HIGH, obs_shape, np.float32)
    act = spaces.Box(-ACTION_BOUND, ACTION_BOUND, act_shape, np.float32)
    return build_policy(TemperaturePolicySB3, obs, act, kwargs, state, where, device)
