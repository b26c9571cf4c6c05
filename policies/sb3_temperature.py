"""A stable-baselines3 actor-critic policy for :class:`metagate.envs.InstanceTemperatureEnv`.

Observation ``[B, 1, S]`` unit states, action ``[B, 1]`` per-unit temperature actions. The actor is the
in-loop gate's :class:`~metagate.policies.temperature.TemperatureHead` with a Gaussian whose log-stds do
not depend on the state; the critic pools an encoding of the units' states over the batch. The
temperature range and label weight are stored with the policy, so a deployed policy maps actions to
temperatures exactly as during training.
"""

from __future__ import annotations

import io
import json
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy
from torch import Tensor, nn

from metagate.errors import ConfigError
from metagate.features import FEATURE_HIGH
from metagate.policies.core import TeacherGaussian
from metagate.policies.safe_zip import MAX_JSON_BYTES, MAX_WEIGHTS_BYTES, _read
from metagate.policies.temperature import (
    ACTION_BOUND,
    ITKD_T_INIT,
    ITKD_T_MAX,
    ITKD_T_MIN,
    TemperatureHead,
    action_temperature,
    temperature_action,
)


class TemperaturePolicySB3(ActorCriticPolicy):
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
        if self.log_std_init is None and self.shared_log_std_init is None:
            raise ValueError("give log_std_init and/or shared_log_std_init")
        self.unit_log_std = (nn.Parameter(torch.tensor(float(self.log_std_init)))
                             if self.log_std_init is not None else None)
        self.shared_log_std = (nn.Parameter(torch.tensor(float(self.shared_log_std_init)))
                               if self.shared_log_std_init is not None else None)
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        data = super()._get_constructor_parameters()
        data.update(hidden=self.hidden, shared_log_std_init=self.shared_log_std_init, t_min=self.t_min,
                    t_max=self.t_max, t_init=self.t_init, label_alpha=self.label_alpha)
        data.pop("ortho_init", None)
        return data

    @property
    def num_state(self) -> int:
        return self.actor.num_state

    # -- networks --------------------------------------------------------------------------------
    def _obs(self, obs: Tensor) -> Tensor:
        return obs.float().reshape(-1, *self.observation_space.shape)  # type: ignore[misc]

    def mean_action(self, state: Tensor) -> Tensor:
        """``[..., B, 1]`` mean actions for states ``[..., B, 1, S]`` (any number of units)."""
        return self.actor(state)

    def distribution(self, state: Tensor) -> TeacherGaussian:
        return TeacherGaussian(self.mean_action(state), self.unit_log_std, self.shared_log_std)

    def temperature(self, action: Tensor) -> Tensor:
        """Actions ``[B, 1]`` -> temperatures ``[B]`` (the env's mapping)."""
        return action_temperature(action.reshape(-1), self.t_min, self.t_max)

    @property
    def log_std(self) -> Tensor:
        return self.unit_log_std if self.unit_log_std is not None else self.shared_log_std

    def _values(self, x: Tensor) -> Tensor:
        h = self.critic_encoder(x)  # [n, B, 1, H]
        return self.critic_head(torch.cat([h.mean((1, 2)), h.amax((1, 2))], -1))

    # -- the ActorCriticPolicy API ---------------------------------------------------------------
    def forward(self, obs: Tensor, deterministic: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        x = self._obs(obs)
        dist = self.distribution(x)
        actions = dist.get_actions(deterministic)
        return actions, self._values(x), dist.log_prob(actions)

    def evaluate_actions(self, obs: Tensor, actions: Tensor) -> tuple[Tensor, Tensor, Tensor]:  # type: ignore[override]
        x = self._obs(obs)
        dist = self.distribution(x)
        return self._values(x), dist.log_prob(actions), dist.entropy()

    def get_distribution(self, obs: Tensor) -> TeacherGaussian:  # type: ignore[override]
        return self.distribution(self._obs(obs))

    def predict_values(self, obs: Tensor) -> Tensor:
        return self._values(self._obs(obs))

    def _predict(self, observation: Tensor, deterministic: bool = False) -> Tensor:
        return self.get_distribution(observation).get_actions(deterministic)


#: the plain-JSON description of a temperature policy zip (the safe loader reads only it and the weights)
META_NAME = "metagate-temperature-policy.json"
KWARGS = ("hidden", "log_std_init", "shared_log_std_init", "t_min", "t_max", "t_init", "label_alpha")


def write_temperature_meta(path: str | Path, policy: TemperaturePolicySB3, algo: str) -> None:
    """Add :data:`META_NAME` to a zip saved by ``model.save`` (``metagate train-policy --env temperature``)."""
    meta = {"algo": algo, "observation_shape": [int(s) for s in policy.observation_space.shape],
            "action_shape": [int(s) for s in policy.action_space.shape],
            "policy_kwargs": {k: getattr(policy, k) for k in KWARGS}}
    with zipfile.ZipFile(path, mode="a") as zf:
        zf.writestr(META_NAME, json.dumps(meta, indent=2))


def load_temperature_zip(path: str | Path, num_state: int, device: str | torch.device = "cpu",
                         what: str = "--temp-policy") -> TemperaturePolicySB3:
    """A :class:`TemperaturePolicySB3` from a zip, executing nothing of it (no unpickling: the JSON
    description and ``torch.load(weights_only=True)`` of the weights; see :mod:`metagate.policies.safe_zip`)."""
    p = Path(path)
    if not p.is_file() and p.with_suffix(".zip").is_file():
        p = p.with_suffix(".zip")
    where = f"{what} {p}"
    if not p.is_file():
        raise ConfigError(f"{what} {path}: no such file (train one with `metagate train-policy --env temperature "
                          "--out ...`)")
    try:
        with zipfile.ZipFile(p) as zf:
            meta = json.loads(_read(zf, META_NAME, MAX_JSON_BYTES, where))
            weights = _read(zf, "policy.pth", MAX_WEIGHTS_BYTES, where)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as e:
        raise ConfigError(f"{where}: not a metagate temperature policy zip ({type(e).__name__}: {e})") from e
    try:
        obs_shape, act_shape = tuple(int(s) for s in meta["observation_shape"]), \
            tuple(int(s) for s in meta["action_shape"])
        kwargs = {k: meta["policy_kwargs"][k] for k in KWARGS}
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"{where}: {META_NAME} is malformed ({e})") from e
    if len(obs_shape) != 3 or obs_shape[-1] != num_state:
        raise ConfigError(f"{where}: trained for {obs_shape[-1] if obs_shape else '?'} state features per unit, "
                          f"this version has {num_state}; retrain it")
    try:
        state = torch.load(io.BytesIO(weights), map_location="cpu", weights_only=True)
        obs = spaces.Box(0.0, FEATURE_HIGH, obs_shape, np.float32)
        act = spaces.Box(-ACTION_BOUND, ACTION_BOUND, act_shape, np.float32)
        policy = TemperaturePolicySB3(obs, act, lambda _: 0.0, **kwargs)
        policy.load_state_dict(state)
    except Exception as e:  # noqa: BLE001 - anything unexpected in a user file: refuse it
        raise ConfigError(f"{where}: the weights do not fit a temperature policy ({type(e).__name__}: {e})") from e
    return policy.to(device)
