"""A stable-baselines3 actor-critic policy for :class:`metagate.envs.TeacherWeightingEnv`.

Observation ``[B, K, F]`` unit features, action ``[B, K]`` per-unit teacher logits in ``[-1, 1]``.
The actor is the permutation-equivariant :class:`~metagate.policies.core.TeacherLogitHead` with a
Gaussian whose log-stds do not depend on the state; the critic pools the encoder's codes over the
batch's units and teachers. ``PPO.load(path)`` / ``A2C.load(path)`` only need ``import metagate``
(the class is pickled by reference to this module).
"""

from __future__ import annotations

from typing import Any

import torch
from gymnasium import spaces
from stable_baselines3.common.policies import ActorCriticPolicy
from torch import Tensor, nn

from metagate.policies.core import TeacherEncoder, TeacherGaussian, TeacherLogitHead, teacher_probs


class GaussianActorCritic(ActorCriticPolicy):
    """What the project's SB3 policies share: state-independent per-unit and shared log-stds, observations
    reshaped to the space's shape, and the ``ActorCriticPolicy`` API over ``distribution(x)`` and
    ``_values(x)`` (a subclass defines those two and builds its networks in ``_build``)."""

    shared_log_std_init: float | None

    def _build_log_stds(self) -> None:
        if self.log_std_init is None and self.shared_log_std_init is None:
            raise ValueError("give log_std_init and/or shared_log_std_init")
        self.unit_log_std = (nn.Parameter(torch.tensor(float(self.log_std_init)))
                             if self.log_std_init is not None else None)
        self.shared_log_std = (nn.Parameter(torch.tensor(float(self.shared_log_std_init)))
                               if self.shared_log_std_init is not None else None)

    def _constructor(self, **own: Any) -> dict[str, Any]:
        """SB3's constructor parameters plus the subclass's ``own`` (what ``model.save`` stores)."""
        data = super()._get_constructor_parameters()
        data.update(shared_log_std_init=self.shared_log_std_init, **own)
        data.pop("ortho_init", None)
        return data

    def distribution(self, x: Tensor) -> TeacherGaussian:
        raise NotImplementedError

    def _values(self, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _obs(self, obs: Tensor) -> Tensor:
        return obs.float().reshape(-1, *self.observation_space.shape)  # type: ignore[misc]

    @property
    def log_std(self) -> Tensor:
        """The per-unit log-std, or the shared one when there is no per-unit noise (SB3 logs ``train/std``)."""
        return self.unit_log_std if self.unit_log_std is not None else self.shared_log_std

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


class TeacherWeightingPolicy(GaussianActorCritic):
    """Equivariant actor-critic over teachers.

    :param hidden: encoder width ``H``
    :param log_std_init: initial per-unit log-std (``None``: no per-unit noise)
    :param shared_log_std_init: initial log-std of the per-teacher noise shared by the units of a batch
        (``None`` with a ``log_std_init``: the plain diagonal Gaussian). The default explores with the
        shared term only: a per-unit term's effect on the batch-level reward averages out over the
        units while its score does not, which swamps the gradient (see :class:`TeacherGaussian`).
    :param weight_temperature: the env's softmax temperature, stored with the policy so a deployed
        policy maps actions to weights exactly as during training
    :param label_alpha: the label weight used during training (deployment default)
    :param kd_tau: the KD temperature used during training (deployment default)
    """

    def __init__(
        self,
        observation_space: spaces.Space,
        action_space: spaces.Space,
        lr_schedule: Any,
        hidden: int = 16,
        log_std_init: float | None = None,
        shared_log_std_init: float | None = -0.5,
        weight_temperature: float = 0.25,
        label_alpha: float = 0.5,
        kd_tau: float = 4.0,
        **kwargs: Any,
    ) -> None:
        if not isinstance(observation_space, spaces.Box) or len(observation_space.shape) != 3:
            raise ValueError(f"observation space must be Box[B, K, F], got {observation_space}")
        if not isinstance(action_space, spaces.Box) or action_space.shape != observation_space.shape[:2]:
            raise ValueError(f"action space must be Box[B, K] matching the observation, got {action_space}")
        self.hidden = int(hidden)
        self.shared_log_std_init = shared_log_std_init
        self.weight_temperature = float(weight_temperature)
        self.label_alpha = float(label_alpha)
        self.kd_tau = float(kd_tau)
        kwargs.pop("ortho_init", None)
        super().__init__(observation_space, action_space, lr_schedule, log_std_init=log_std_init,
                         ortho_init=False, **kwargs)

    def _build(self, lr_schedule: Any) -> None:
        f = int(self.observation_space.shape[-1])  # type: ignore[index]
        self.actor = TeacherLogitHead(f, self.hidden, bounded=True)
        self.critic_encoder = TeacherEncoder(f, self.hidden)
        self.critic_head = nn.Sequential(nn.Linear(2 * self.hidden, self.hidden), nn.Tanh(), nn.Linear(self.hidden, 1))
        self._build_log_stds()
        self.optimizer = self.optimizer_class(self.parameters(), lr=lr_schedule(1), **self.optimizer_kwargs)

    def _get_constructor_parameters(self) -> dict[str, Any]:
        return self._constructor(hidden=self.hidden, weight_temperature=self.weight_temperature,
                                 label_alpha=self.label_alpha, kd_tau=self.kd_tau)

    # -- networks --------------------------------------------------------------------------------
    def mean_logits(self, features: Tensor) -> Tensor:
        """The mean action: ``[..., B, K]`` teacher logits in ``[-1, 1]`` for features ``[..., B, K, F]``.

        Works for any number of units and teachers (deployment uses this directly).
        """
        return self.actor(features)

    def distribution(self, features: Tensor) -> TeacherGaussian:
        return TeacherGaussian(self.mean_logits(features), self.unit_log_std, self.shared_log_std)

    def teacher_probs(self, features: Tensor) -> Tensor:
        """Mean-action teacher distribution ``[..., B, K]`` (the env's mapping)."""
        return teacher_probs(self.mean_logits(features), self.weight_temperature)

    def _values(self, x: Tensor) -> Tensor:
        h = self.critic_encoder(x)  # [n, B, K, H]
        pooled = torch.cat([h.mean((1, 2)), h.amax((1, 2))], -1)
        return self.critic_head(pooled)
