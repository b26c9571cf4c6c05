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

from metagate.data.task import Batch, Task
from metagate.envs.base import StudentLoopEnv
from metagate.envs.config import TeacherWeightingEnvConfig
from metagate.features import FEATURE_HIGH, NUM_FEATURES
from metagate.gates.base import GateOutput
from metagate.policies.core import action_weights
from metagate.teachers.bank import TeacherBank


class TeacherWeightingEnv(StudentLoopEnv):
    """Gymnasium environment over the shared student loop (options:
    :class:`~metagate.envs.config.TeacherWeightingEnvConfig`).

    The reward every step (``reward_every=1``, the default) gives PPO a reward it can assign to the action
    that earned it (the README's measured train-policy defaults); a small subset keeps the per-step
    validation cheap, and the same units are scored before and after each step, so their change is a
    paired difference.
    """

    config_class = TeacherWeightingEnvConfig
    config: TeacherWeightingEnvConfig

    def __init__(self, task: str | Task = "digits", bank: TeacherBank | None = None,
                 config: TeacherWeightingEnvConfig | None = None, **options: Any) -> None:
        super().__init__(task, bank, config, **options)
        self.temperature = self.config.temperature
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
        # the real tokens' softmax scaled by 1 - alpha: divide it out in numpy (cheap)
        kd = self._real_units(decision.weights[:, 1:]).cpu().numpy()
        if self.alpha < 1.0:
            kd = kd / (1.0 - self.alpha)
        return {"teacher_weights": kd}
