"""``metagate/TeacherWeighting-v0``: an agent weights the teachers of every unit of a batch.

One step = one student update through the shared :meth:`metagate.trainer.Trainer.train_step`
with the weights the action encodes (the episode, reward and reset machinery is
:class:`metagate.envs.base.StudentLoopEnv`). The observation is the *next* batch's unit features
``[B, K, F]`` (:func:`metagate.features.unit_features`); the action ``Box(-1, 1, [B, K])`` holds
per-unit teacher logits, mapped inside the env to ``W = [alpha, (1 - alpha) softmax(a / T)]``;
the reward is the scaled improvement of the student's loss (or accuracy) on a fixed subset of the
task's ``meta`` split (the ``select`` split is never touched).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from metagate.bank import TeacherBank
from metagate.data.task import Batch, Task
from metagate.envs.base import StudentLoopEnv
from metagate.errors import ConfigError
from metagate.features import FEATURE_HIGH, NUM_FEATURES
from metagate.gates.base import GateOutput
from metagate.policies.core import action_weights


class TeacherWeightingEnv(StudentLoopEnv):
    """Gymnasium environment over the shared student loop (options of :class:`StudentLoopEnv`, plus:)

    :param task: a task name (``digits``, ``fashion``) or a :class:`~metagate.data.task.Task`
    :param bank: teacher logits for ``task.train``; by default the task's cached teachers are loaded
    :param teachers: number of teachers ``K`` (when loading)
    :param adversarial_teacher: plant the permuted teacher as the last one (when loading)
    :param noise: label-noise rate of the task (when ``task`` is a name)
    :param student: student architecture (task default if ``None``)
    :param batch_size: units per step ``B`` (fixed: short batches at the end of an epoch are skipped)
    :param episode_steps: student updates per episode (one short training run)
    :param alpha: label weight; the teachers share ``1 - alpha``
    :param tau: KD temperature
    :param temperature: softmax temperature mapping actions to teacher weights
    :param reward: ``loss`` (validation CE improvement) or ``acc`` (validation accuracy improvement)
    :param reward_scale: multiplies the reward
    :param val_size: size of the fixed ``meta`` subset the reward is measured on
    :param reward_every: measure the validation loss every this many steps (and at the episode's end);
        the improvement since the last measurement is the reward of that step, other steps get 0.
        Every step (the default) gives PPO a reward it can assign to the action that earned it (the
        README's measured train-policy defaults); a small subset keeps the per-step validation cheap, and
        the same units are scored before and after each step, so their change is a paired difference.
    :param lr: student learning rate (cosine schedule over the episode by default)
    :param momentum: student SGD momentum
    """

    def __init__(
        self,
        task: str | Task = "digits",
        bank: TeacherBank | None = None,
        teachers: int = 3,
        adversarial_teacher: bool = False,
        noise: float = 0.0,
        data_seed: int = 0,
        student: str | None = None,
        batch_size: int = 64,
        episode_steps: int = 50,
        alpha: float = 0.5,
        tau: float = 4.0,
        temperature: float = 0.25,
        reward: str = "loss",
        reward_scale: float = 10.0,
        val_size: int = 64,
        reward_every: int = 1,
        lr: float = 0.05,
        momentum: float = 0.9,
        optimizer: str = "sgd",
        schedule: str = "cosine",
        cache_dir: str | None = None,
        device: str = "cpu",
    ) -> None:
        if not temperature > 0:
            raise ConfigError(f"temperature must be > 0, got {temperature}")
        super().__init__(task, bank, teachers, adversarial_teacher, noise, data_seed, student, batch_size,
                         episode_steps, alpha, tau, reward, reward_scale, val_size, reward_every, lr, momentum,
                         optimizer, schedule, cache_dir, device)
        self.temperature = float(temperature)
        k = self.num_teachers
        n = self.num_units  # examples, or token positions of a sequence batch
        self.observation_space = spaces.Box(0.0, FEATURE_HIGH, (n, k, NUM_FEATURES), np.float32)
        self.action_space = spaces.Box(-1.0, 1.0, (n, k), np.float32)
        self._alpha_col = torch.full((n, 1), self.alpha, device=self.device)

    def _observation(self, logits: torch.Tensor, batch: Batch) -> np.ndarray:
        assert self.trainer is not None
        feats = self._unit_features(logits, batch)
        return feats.cpu().numpy()  # clamped to [0, FEATURE_HIGH]

    def weights_from_action(self, action: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Action ``[B, K]`` -> gate weights ``W [B, 1+K]`` (clipped to the box first)."""
        a = torch.as_tensor(np.asarray(action, dtype=np.float32), device=self.device)
        return action_weights(a.reshape(-1, self.num_teachers), self.alpha, self.temperature, self._alpha_col)

    def decision(self, action: np.ndarray | torch.Tensor) -> GateOutput:
        # softmax weights cannot be negative; NaN actions still surface as a non-finite loss
        return GateOutput(self.weights_from_action(action), self.tau, trusted=True)

    def _step_info(self, decision: GateOutput) -> dict[str, Any]:
        kd = decision.weights[:, 1:].cpu().numpy()  # the softmax scaled by 1 - alpha: divide it out in numpy (cheap)
        if self.alpha < 1.0:
            kd = kd / (1.0 - self.alpha)
        return {"teacher_weights": kd}
