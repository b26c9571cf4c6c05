"""``metagate/InstanceTemperature-v0``: an agent picks the KD temperature of every unit of a batch (ITKD).

One step = one student update through the shared :meth:`metagate.trainer.Trainer.train_step` with the
temperatures the action encodes and the fixed label/KD mix ``alpha`` (equal teacher weights); the
episode, reward and reset machinery is :class:`metagate.envs.base.StudentLoopEnv`, shared with
``metagate/TeacherWeighting-v0``. The observation is the next batch's state ``[B, 1, S]`` (``B`` examples, or the
``B*T`` token positions of a sequence batch)
(:func:`metagate.gates.temperature.policy.temperature_state`: the ITKD state plus the project's unit features
averaged over teachers); the action ``Box(-6, 6, [B, 1])`` maps to ``T = t_min + (t_max - t_min) sigmoid(a)``.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from gymnasium import spaces

from metagate.data.task import Batch, Task
from metagate.envs.base import StudentLoopEnv
from metagate.envs.config import TemperatureEnvConfig
from metagate.features import FEATURE_HIGH
from metagate.gates.base import GateOutput
from metagate.gates.fixed import fixed_weights
from metagate.gates.temperature.policy import (
    ACTION_BOUND,
    NUM_STATE,
    TemperatureState,
    action_temperature,
    temperature_state,
)
from metagate.teachers.bank import TeacherBank
from metagate.units import flat_logits


class InstanceTemperatureEnv(StudentLoopEnv):
    """Per-unit temperatures over the shared student loop (options:
    :class:`~metagate.envs.config.TemperatureEnvConfig`; ``t_min``/``t_max`` are accepted for
    ``temp_min``/``temp_max``). The temperature range is ITKD's ``(0, 10)`` with 1 as the lowest here."""

    config_class = TemperatureEnvConfig
    config: TemperatureEnvConfig

    def __init__(self, task: str | Task = "digits", bank: TeacherBank | None = None,
                 config: TemperatureEnvConfig | None = None, **options: Any) -> None:
        super().__init__(task, bank, config, **options)
        self.t_min, self.t_max = self.config.temp_min, self.config.temp_max
        n = self.num_units  # examples, or token positions of a sequence batch
        self.observation_space = spaces.Box(0.0, FEATURE_HIGH, (n, 1, NUM_STATE), np.float32)
        self.action_space = spaces.Box(-ACTION_BOUND, ACTION_BOUND, (n, 1), np.float32)
        # the teacher part of the state, once per training example (sequences: per step from the token logits)
        self._state = None if self.sequence else \
            TemperatureState(self.bank.logits.to(self.device), self.task.train.y.to(self.device), self._features)
        self._weights = fixed_weights(n, self.num_teachers, self.alpha, self.device, torch.float32)

    def _observation(self, logits: torch.Tensor, batch: Batch) -> np.ndarray:
        assert self.trainer is not None
        ids = batch.ids.to(self.device)
        if self._state is not None:
            return self._state.state(logits, ids, self.trainer.progress).cpu().numpy()
        state = temperature_state(flat_logits(logits), self.bank.lookup(ids), batch.y.reshape(-1).to(self.device),
                                  self.trainer.progress)
        return state.cpu().numpy()

    def temperatures_from_action(self, action: np.ndarray | torch.Tensor) -> torch.Tensor:
        """Action ``[B, 1]`` -> temperatures ``[B]`` (clipped to the box first)."""
        a = torch.as_tensor(np.asarray(action, dtype=np.float32), device=self.device)
        return action_temperature(a.reshape(-1), self.t_min, self.t_max)

    def decision(self, action: np.ndarray | torch.Tensor) -> GateOutput:
        # fixed weights are valid; a NaN action gives a NaN temperature, which the loss check reports
        return GateOutput(self._weights, self.temperatures_from_action(action), trusted=True)

    def _step_info(self, decision: GateOutput) -> dict[str, Any]:
        assert torch.is_tensor(decision.tau)
        return {"temperatures": self._real_units(decision.tau).cpu().numpy()}
