"""What every gymnasium environment over the shared student loop has in common.

One step = one student update through :meth:`metagate.trainer.Trainer.train_step` with the decision the
action encodes; the observation describes the *next* batch from the student's train-mode forward,
whose logits (and graph) that update reuses; the reward is the scaled improvement of the student's loss
(or accuracy) on a fixed subset of the task's ``meta`` split (``select`` is never touched), or a subclass's dense
reward of the decision (:meth:`StudentLoopEnv._decision_reward`). An episode is
a short student training run of ``episode_steps`` updates; ``reset`` builds a fresh student from a seed
drawn from the env's RNG, so a policy learns a rule that transfers to new students.

A subclass sets ``observation_space`` / ``action_space`` and implements :meth:`StudentLoopEnv._observation`
(batch logits -> observation), :meth:`StudentLoopEnv.decision` (action -> gate output) and optionally
:meth:`StudentLoopEnv._step_info`.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import gymnasium as gym
import numpy as np
import torch

from metagate.data.task import Batch, Task
from metagate.envs.config import EnvConfig, env_config
from metagate.errors import ConfigError
from metagate.features import FEATURE_HIGH, TeacherFeatureCache, unit_features
from metagate.gates.base import GateOutput
from metagate.gates.fixed import FixedGate
from metagate.layout import for_model
from metagate.modes import eval_mode, is_mode_free
from metagate.teachers.bank import TeacherBank
from metagate.trainer import TrainConfig, Trainer
from metagate.units import PAD_ID, flat_logits, unit_ce


class StudentLoopEnv(gym.Env):
    """Base environment: task and teachers, the reward subset, episodes of student updates.

    :param task: a task name (``digits``, ``fashion``) or a :class:`~metagate.data.task.Task`
    :param bank: teacher logits for ``task.train``; by default the task's cached teachers are loaded
        (``teachers``, ``adversarial_teacher``, ``noise``, ``data_seed``, ``cache_dir`` of the config)
    :param config: the env's options (:attr:`config_class`, see :mod:`metagate.envs.config`); or give them as
        keywords (field names: ``batch_size=16, episode_steps=4, ...``), not both
    """

    metadata = {"render_modes": []}
    config_class: type[EnvConfig] = EnvConfig

    def __init__(self, task: str | Task = "digits", bank: TeacherBank | None = None,
                 config: EnvConfig | None = None, **options: Any) -> None:
        super().__init__()
        c = self.config = env_config(self.config_class, config, options)
        if isinstance(task, str) or bank is None:
            task, bank = _load(task, bank, c)
        if bank.num_units != len(task.train):
            raise ConfigError(f"teacher bank covers {bank.num_units} units, task has {len(task.train)}")
        if c.batch_size > len(task.train):
            raise ConfigError(f"batch_size must be in [1, {len(task.train)}], got {c.batch_size}")
        self.task, self.bank = task, bank
        self.student_arch = c.student
        self.batch_size, self.episode_steps = c.batch_size, c.episode_steps
        self.alpha, self.tau = c.alpha, c.kd_tau
        self.reward_kind, self.reward_scale, self.reward_every = c.reward, c.reward_scale, c.reward_every
        self.train_config = dict(batch_size=self.batch_size, lr=c.lr, momentum=c.momentum, optimizer=c.optimizer,
                                 schedule=c.schedule,
                                 epochs=1, device=c.device, progress=False, eval_test_every_epoch=False)
        self.device = torch.device(c.device)
        self.num_teachers = bank.num_teachers
        g = torch.Generator().manual_seed(0)  # the reward subset is fixed for the env's lifetime
        idx = torch.randperm(len(task.meta), generator=g)[: min(c.val_size, len(task.meta))]
        self._val_x = task.meta.x[idx].to(self.device)
        self._val_y = task.meta.y[idx].to(self.device)
        self.trainer: Trainer | None = None
        self._logits: torch.Tensor | None = None
        self._gate = FixedGate(alpha=self.alpha, tau=self.tau)
        #: units of one step: ``batch_size`` examples, or their ``batch_size * T`` token positions (sequences;
        #: padding tokens are observed too, and the trainer's reduction masks them)
        self.sequence = task.train.y.ndim == 2
        self.num_units = self.batch_size * (int(task.train.y.shape[1]) if self.sequence else 1)
        # teacher-only features of every training unit, once: an observation only adds KL and student features
        # (sequences: computed per step from the bank's token logits)
        self._features = None if self.sequence else \
            TeacherFeatureCache(bank.logits.to(self.device), task.train.y.to(self.device))
        self._t = 0
        #: the real (not padding) tokens of the batch being decided; ``None`` on example units
        self._real: torch.Tensor | None = None

    # -- what a subclass defines -----------------------------------------------------------------
    def _observation(self, logits: torch.Tensor, batch: Batch) -> np.ndarray:
        """The observation of ``batch`` from the student's train-mode ``logits`` of it."""
        raise NotImplementedError

    def decision(self, action: np.ndarray | torch.Tensor) -> GateOutput:
        """The gate output the action encodes (handed to ``Trainer.train_step``)."""
        raise NotImplementedError

    def _step_info(self, decision: GateOutput) -> dict[str, Any]:
        """Extra ``info`` of a step (e.g. the chosen weights)."""
        return {}

    def _start_episode(self) -> None:
        """Called by :meth:`reset` once the episode's trainer exists, before its first batch is observed."""

    def _decision_reward(self, decision: GateOutput) -> float | None:
        """A dense reward of ``decision``, measured before the update at the current parameters; ``None`` (the
        default): the step's reward is the scaled validation improvement."""
        return None

    # -- helpers ---------------------------------------------------------------------------------
    def _batches(self, trainer: Trainer) -> Iterator[Batch]:
        epoch = 0
        while True:
            for batch in trainer.epoch_batches(epoch):
                if len(batch) == self.batch_size:
                    yield batch
            epoch += 1

    def _real_units(self, per_unit: torch.Tensor) -> torch.Tensor:
        """``per_unit`` (one row per unit of the step) without the padding tokens: padding decides nothing."""
        return per_unit if self._real is None else per_unit[self._real]

    def _observe(self, batch: Batch) -> np.ndarray:
        """Observation of ``batch`` (the batch the next action decides) from the student's train-mode forward,
        whose logits (and graph) the next ``train_step`` reuses: the observation costs no extra forward pass."""
        assert self.trainer is not None
        self._real = batch.y.reshape(-1).to(self.device) != PAD_ID if self.sequence else None
        student = self.trainer.student
        if not student.training:  # Module.train() walks every submodule
            student.train()
        self._logits = student(batch.x)
        return self._observation(self._logits, batch)

    @torch.no_grad()
    def _validate(self) -> float:
        assert self.trainer is not None
        with eval_mode(self.trainer.student, self._mode_free) as student:
            logits = student(self._val_x)
        if self.reward_kind == "acc":
            right = logits.argmax(-1) == self._val_y
            if self.sequence:  # token accuracy over the real tokens
                return float(right[self._val_y != PAD_ID].float().mean())
            return float(right.float().mean())
        return float(unit_ce(logits, self._val_y))

    def _unit_features(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """Clamped unit features ``[units, K, F]`` of ``batch`` (tokens for sequences)."""
        assert self.trainer is not None
        if self._features is not None:
            return self._features.features(logits, batch.ids.to(self.device), self.trainer.progress)
        t = self.bank.lookup(batch.ids.to(self.device))
        return unit_features(flat_logits(logits), t, batch.y.reshape(-1), self.trainer.progress).clamp_(0.0,
                                                                                                        FEATURE_HIGH)

    # -- gymnasium API ---------------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict[str, Any] | None = None) -> tuple[np.ndarray, dict]:
        super().reset(seed=seed)
        student_seed = int(self.np_random.integers(0, 2**31 - 1))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(student_seed)
            student = self.task.make_student(self.student_arch)
        cfg = TrainConfig(seed=student_seed, **self.train_config)  # type: ignore[arg-type]
        self.trainer = Trainer(self.task, student, self._gate, self.bank, cfg)
        self._mode_free = is_mode_free(student)
        self._val_x = for_model(student, self._val_x)
        self.trainer.set_total_steps(self.episode_steps)  # progress and the lr schedule span the episode
        self._iter = self._batches(self.trainer)
        self._batch = next(self._iter)
        self._start_episode()
        self._t = 0
        self._val = self._validate()
        return self._observe(self._batch), {"val": self._val, "student_seed": student_seed}

    def step(self, action: np.ndarray) -> tuple[np.ndarray, float, bool, bool, dict]:
        if self.trainer is None:
            raise RuntimeError("call reset() before step()")
        decision = self.decision(action)
        dense = self._decision_reward(decision)  # before the update: it looks ahead from the current parameters
        res = self.trainer.train_step(self._batch, decision, logits=self._logits)
        step_info = self._step_info(decision)  # before the next batch is observed: it is about this batch
        self._logits = None
        self._t += 1
        truncated = self._t >= self.episode_steps
        reward, val = 0.0, self._val
        if truncated or self._t % self.reward_every == 0:
            val = self._validate()
            delta = (self._val - val) if self.reward_kind == "loss" else (val - self._val)
            reward = self.reward_scale * delta
            if not math.isfinite(reward):
                reward = -self.reward_scale
            self._val = val
        if dense is not None:
            reward = dense
        self._batch = next(self._iter)
        obs = self._observe(self._batch)
        info = {"val": val, "train_loss": float(res.loss), **step_info}
        return obs, float(reward), False, truncated, info


def _load(task: str | Task, bank: TeacherBank | None, config: EnvConfig) -> tuple[Task, TeacherBank]:
    from metagate.run import load_task
    from metagate.teachers.build import load_teachers

    cfg = config.data_config(task if isinstance(task, str) else task.name)
    task_obj = load_task(cfg) if isinstance(task, str) else task
    if bank is None:
        bank, _ = load_teachers(cfg, task_obj, progress=False)
        if cfg.teacher_calibration == "temperature":
            from metagate.teachers.build import calibrated_bank

            bank = calibrated_bank(bank)
    return task_obj, bank
