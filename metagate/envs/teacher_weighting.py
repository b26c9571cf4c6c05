"""``metagate/TeacherWeighting-v0``: an agent weights the teachers of every unit of a batch.

One step = one student update through the shared :meth:`metagate.trainer.Trainer.train_step`
with the weights the action encodes (the episode, reward and reset machinery is
:class:`metagate.envs.base.StudentLoopEnv`). The observation is the *next* batch's unit features
``[B, K, F]`` (:func:`metagate.features.unit_features`); the action ``Box(-1, 1, [B, K])`` holds
per-unit teacher logits, mapped inside the env to ``W = [alpha, (1 - alpha) softmax(a / T)]``.

The reward (``env_reward``):

* ``scalar`` (the default): the scaled improvement of the student's loss (or accuracy) on a fixed subset of the
  task's ``meta`` split (the ``select`` split is never touched), every ``reward_every`` steps.
* ``hypergradient``: a dense reward per step from the per-(unit, teacher) credit of :mod:`metagate.gates.credit`
  (the same computation the ``reinforce --rl-credit hypergradient`` gate learns from). Before the update,
  ``d_ik = d CE_val(theta'(W)) / d W_ik`` is the derivative of the clean validation CE after one plain SGD step of
  the student's head on the ``W``-weighted loss (at the step's learning rate; a ``val_size`` batch of ``meta``),
  ``A_ik = -(d_ik - mean_k d_ik)`` its centred credit, and the reward is
  ``reward_scale * sum_i sum_k W_ik A_ik``: to first order, how much lower the look-ahead validation CE is
  under the action's teacher weights than under equal weights with the same label weight (positive when the
  action's choice of teachers lowers the validation loss; 0 for equal weights). It credits the action that was
  taken, with no noise from the rest of the update; it sees only the head's one-step look-ahead, not the real
  step's momentum or the body. On sequence tasks the units are the batch's token positions: the look-ahead's
  loss is the real tokens' masked mean and its validation CE the real tokens' of the ``meta`` batch, so padding
  positions earn exactly 0. This reward is ours (metagate's, issue 28), not a published method's.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from metagate.data.task import Batch, Task
from metagate.envs.base import StudentLoopEnv
from metagate.envs.config import TeacherWeightingEnvConfig
from metagate.errors import ConfigError
from metagate.features import FEATURE_HIGH, NUM_FEATURES
from metagate.gates.base import GateOutput
from metagate.gates.credit import HeadCredit, centred_credit
from metagate.gates.meta.linear_route import head_protocol
from metagate.policies.core import action_weights
from metagate.teachers.bank import TeacherBank
from metagate.units import token_units


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
        self.env_reward = self.config.env_reward
        self._credit: HeadCredit | None = None
        if self.env_reward == "hypergradient":
            with torch.random.fork_rng(devices=[]):  # a probe of the episodes' student, off the global RNG
                probe = self.task.make_student(self.student_arch)
            if not head_protocol(probe):
                raise ConfigError("--env-reward hypergradient needs a student with features(x) and a linear head "
                                  f"(metagate.models MLP/CNN, the seq2seq students); {type(probe).__name__} has not")

    def _start_episode(self) -> None:
        if self.env_reward != "hypergradient":
            return
        assert self.trainer is not None
        if self._credit is not None:
            self._credit.close()  # the hook on the last episode's student
        self._credit = HeadCredit(self.trainer, self.tau, self.config.val_size, what="--env-reward hypergradient")

    def credit(self, decision: GateOutput) -> tuple[torch.Tensor, torch.Tensor]:
        """``(W [N, 1+K], A [N, K])``: the decision's weights and their centred hypergradient credit on the batch
        being decided (:func:`metagate.gates.credit.centred_credit`), at the current parameters."""
        assert self.trainer is not None and self._credit is not None and self._logits is not None
        tr = self.trainer
        view = tr.make_view(*token_units(self._batch, self._logits))  # sequences: the batch's token positions
        # the learning rate train_step is about to set (the optimizer still holds the last step's)
        lr = tr.lr_at(tr.step)
        _, dw = self._credit.hypergrad(view, decision.weights, lr, self._batch.x)
        return decision.weights, centred_credit(dw)

    def _decision_reward(self, decision: GateOutput) -> float | None:
        if self._credit is None:
            return None
        w, a = self.credit(decision)
        reward = self.reward_scale * float((w[:, 1:].to(a.dtype) * a).sum())
        return reward if math.isfinite(reward) else -self.reward_scale

    def close(self) -> None:
        if self._credit is not None:
            self._credit.close()
            self._credit = None
        super().close()

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
