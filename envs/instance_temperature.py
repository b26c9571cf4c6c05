"""``metagate/InstanceTemperature-v0``: an agent picks the KD temperature of every unit of a batch (ITKD).

One step = one student update through the shared :meth:`metagate.trainer.Trainer.train_step` with the
temperatures the action encodes and the fixed label/KD mix ``alpha`` (equal teacher weights); the
episode, reward and reset machinery is :class:`metagate.envs.base.StudentLoopEnv`, shared with
``metagate/TeacherWeighting-v0``. The observation is the next batch's state ``[B, 1, S]``
(:func:`metagate.policies.temperature.temperature_state`: the ITKD state plus the project's unit features
averaged over teachers); the action ``Box(-6, 6, [B, 1])`` maps to ``T = t_min + (t_max - t_min) sigmoid(a)``.
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
from metagate.features import FEATURE_HIGH
from metagate.gates.base import GateOutput
from metagate.gates.fixed import fixed_weights
from metagate.policies.temperature import (
    ACTION_BOUND,
    ITKD_T_MAX,
    ITKD_T_MIN,
    NUM_STATE,
    TemperatureState,
    action_temperature,
)
from metagate.temperature import check_range


class InstanceTemperatureEnv(StudentLoopEnv):
    """Per-unit temperatures over the shared student loop (options of :class:`StudentLoopEnv`, plus:)

    :param t_min: lowest temperature (> 0; ITKD's range is ``(0, 10)``, its default here 1)
    :param t_max: highest temperature (> t_min)
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
        t_min: float = ITKD_T_MIN,
        t_max: float = ITKD_T_MAX,
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
        check_range(t_min, t_max, ("--temp-min", "--temp-max"))
        super().__init__(task, bank, teachers, adversarial_teacher, noise, data_seed, student, batch_size,
                         episode_steps, alpha, 0.5 * (t_min + t_max), reward, reward_scale, val_size, reward_every,
                         lr, momentum, optimizer, schedule, cache_dir, device)
        self.t_min, self.t_max = float(t_min), float(t_max)
        if self.sequence:
            raise ConfigError("InstanceTemperature-v0 takes classification tasks only for now (its state cache is "
                              "per example); on a sequence task train a teacher-weighting policy, or use the "
                              "in-loop `temperature` gate, which runs on token units")
        self.observation_space = spaces.Box(0.0, FEATURE_HIGH, (self.batch_size, 1, NUM_STATE), np.float32)
        self.action_space = spaces.Box(-ACTION_BOUND, ACTION_BOUND, (self.batch_size, 1), np.float32)
        self._state = TemperatureState(self.bank.logits.to(self.device), self.task.train.y.to(self.device),
                                       self._features)
        self._weights = fixed_weights(self.batch_size, self.num_teachers, self.alpha, self.device, torch.float32)

    def _observation(self, logits: torch.Tensor, batch: Batch) -> np.ndarray:
        assert self.trainer is not None
        return self._state.state(logits, batch.ids.to(self.device), self.trainer.progress).cpu().numpy()

    def temperatures_from_action(self, action: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Action ``[B, 1]`` -> temperatures ``[B]`` (clipped to the box first)."""
        a = torch.as_tensor(np.asarray(action, dtype=np.float32), device=self.device)
        return action_temperature(a.reshape(-1), self.t_min, self.t_max)

    def decision(self, action: np.ndarray | torch.Tensor) -> GateOutput:
        # fixed weights are valid; a NaN action gives a NaN temperature, which the loss check reports
        return GateOutput(self._weights, self.temperatures_from_action(action), trusted=True)

    def _step_info(self, decision: GateOutput) -> dict[str, Any]:
        assert torch.is_tensor(decision.tau)
        return {"temperatures": decision.tau.cpu().numpy()}
