"""The ``temperature`` gate (ITKD, Zhang et al. 2024): a policy over unit states picks every unit's KD
temperature; the label/KD mix is the fixed gate's ``alpha`` (or another gate's, composed in
:mod:`metagate.gates.compose`).

* in-loop REINFORCE by default: the episode, reward (the improvement of the student's CE on a fixed
  ``meta`` subset over ``--rl-episode`` steps) and antithetic learner of the ``reinforce`` gate
  (:class:`metagate.gates.policy._RLGate`), over :class:`~metagate.gates.temperature.policy.TemperaturePolicy`.
  ITKD rewards the change of the student's *training-batch* accuracy with PPO and a reward-redistribution
  model; here the reward is the project's validated one. ``--temp-reward redistributed`` splits each
  episode's reward over its units with a return-decomposition model in ITKD's manner
  (:mod:`metagate.gates.temperature.redistribution`, which lists the facts taken from their code) and makes the
  REINFORCE step per unit; ``episode`` (the default) credits every unit of the episode alike.
* ``--temp-policy PATH``: deploy a PPO policy trained on ``metagate/InstanceTemperature-v0`` (mean action;
  ``--temp-online`` keeps learning with REINFORCE).

The first ``--temp-warmup-epochs`` epochs run at ``--tau`` (ITKD: 20 of 240 epochs at T = 4).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from metagate.errors import ConfigError
from metagate.gates.base import Gate, GateContext, GateOutput, UnitView
from metagate.gates.fixed import FixedMix
from metagate.gates.policy import RLConfig, _RLGate
from metagate.gates.registry import register
from metagate.gates.temperature.policy import (
    ITKD_FEATURES,
    ITKD_T_INIT,
    ITKD_T_MAX,
    ITKD_T_MIN,
    NUM_STATE,
    TemperaturePolicy,
    TemperatureState,
    temperature_state,
)
from metagate.gates.temperature.redistribution import ReturnDecomposition
from metagate.gates.temperature.reversal import check_range, check_temperature
from metagate.options import option

__all__ = ["TemperatureConfig", "TemperatureGate", "TemperatureLog", "check_temperature", "load_temperature_policy"]


class TemperatureLog:
    """TensorBoard diagnostics of the chosen temperatures: each training unit's last temperature, the mean
    over the steps since the last write (``temperature/mean``), histograms over all units, split into
    corrupted vs clean units (noisy tasks) and by the teachers' confidence in the unit (the top-1 probability of
    their mean distribution, in tertiles over the training set: teachers trained on noisy labels are rarely
    confident, so fixed thresholds would leave bins empty).

    The corrupted flags are ground truth for diagnostics only; no decision reads them.
    """

    def __init__(self, run: GateContext) -> None:
        n = run.num_train_units
        self.unit_tau = torch.full((n,), float("nan"), device=run.device)
        self.corrupted: Tensor | None = run.corrupted
        bank = run.bank
        if bank is not None and not bank.whole_table:  # a sparse top-k bank: its per-unit summary, read in chunks
            ids = torch.arange(run.train_y.shape[0], device=run.device)
            self.confidence: Tensor | None = bank.unit_ensemble_top(ids)[0].float()
        else:
            self.confidence = None if bank is None else \
                torch.softmax(bank.logits.float(), -1).mean(1).max(-1).values.to(run.device)
            index = None if bank is None else bank.token_index
            if self.confidence is not None and index is not None:  # sequences: one entry per token position
                self.confidence = self.confidence.index_select(0, index.reshape(-1).to(run.device))
        self.bins = None if self.confidence is None else \
            torch.quantile(self.confidence, torch.tensor([1 / 3, 2 / 3], device=run.device)).tolist()
        self._means: list[Tensor] = []
        self._pending: list[tuple[Tensor | None, Tensor]] = []

    def record(self, ids: Tensor | None, tau: Tensor | float) -> None:
        """Keep a step's temperatures; reduced when read or written (no tensor op per step)."""
        self._pending.append((ids, tau.detach() if torch.is_tensor(tau) else torch.tensor(float(tau))))
        if len(self._pending) >= 1024:  # an outside driver may never read: stay bounded
            self._flush()

    def _flush(self) -> None:
        for ids, t in self._pending:
            if len(self._means) < 4096:
                self._means.append(t.float().mean().reshape(1))
            if ids is not None and ids.ndim == 1 and (t.ndim == 0 or t.shape[0] == ids.shape[0]):
                self.unit_tau.index_copy_(0, ids, t.to(self.unit_tau).expand(ids.shape[0]))
        self._pending.clear()

    def summary(self) -> dict[str, float]:
        """Mean of each training unit's last temperature: all units, and corrupted vs clean ones."""
        self._flush()
        tau = self.unit_tau
        seen = ~torch.isnan(tau)
        if not bool(seen.any()):
            return {}
        out = {"diag/tau_mean": float(tau[seen].mean())}
        if self.corrupted is not None and bool(self.corrupted.any()) and bool((~self.corrupted).any()):
            for name, sel in (("corrupted", self.corrupted), ("clean", ~self.corrupted)):
                if bool((sel & seen).any()):
                    out[f"diag/tau_{name}"] = float(tau[sel & seen].mean())
        return out

    def write(self, logger: Any, step: int) -> None:
        self._flush()
        if self._means:
            logger.scalar("temperature/mean", float(torch.cat(self._means).mean()), step)
            self._means.clear()
        tau = self.unit_tau
        seen = ~torch.isnan(tau)
        if not bool(seen.any()):
            return
        logger.histogram("temperature/tau/all", tau[seen], step)
        if self.corrupted is not None and bool(self.corrupted.any()):
            logger.histogram("temperature/tau/corrupted", tau[seen & self.corrupted], step)
            logger.histogram("temperature/tau/clean", tau[seen & ~self.corrupted], step)
        if self.confidence is not None and self.bins is not None:
            lo, hi = self.bins
            c = self.confidence
            for name, sel in (("low", c < lo), ("mid", (c >= lo) & (c < hi)), ("high", c >= hi)):
                if bool((sel & seen).any()):
                    logger.histogram(f"temperature/tau/teacher_conf_{name}", tau[sel & seen], step)


@dataclass
class TemperatureConfig(RLConfig):
    """Options of the ``temperature`` gate (ITKD's per-unit temperature policy); ``--tau`` is the warm-up
    temperature, ``--alpha`` the label weight."""

    temp_min: float = option(ITKD_T_MIN, "lowest per-unit temperature (> 0)")
    temp_max: float = option(ITKD_T_MAX, "highest per-unit temperature (ITKD: 10)")
    temp_init: float = option(ITKD_T_INIT, "the temperature every unit starts near, in (--temp-min, --temp-max)")
    temp_hidden: int = option(32, "policy MLP width")
    temp_log_std: float | None = option(None, "initial log-std of per-unit exploration noise (ITKD: -0.5; unset: "
                                              "off, only the noise shared by a batch and held over an episode)")
    temp_shared_log_std: float = option(-0.5, "initial log-std of the exploration noise held over an episode")
    temp_warmup_epochs: int = option(0, "epochs at --tau before the policy acts (ITKD: 20 of 240)")
    temp_reward: str = option("episode", "how the episode's reward credits its units: episode (every unit "
                                         "alike) or redistributed (ITKD's reward redistribution: a return model "
                                         "over the units' states and temperatures; per-unit exploration noise, "
                                         "--temp-log-std, default -0.5)", choices=("episode", "redistributed"))
    temp_rrd_window: int = option(64, "--temp-reward redistributed: episodes the return model is fitted on")
    temp_policy: str | None = option(None, "a temperature policy zip (PPO on metagate/InstanceTemperature-v0) to "
                                           "deploy instead of learning in the loop")
    temp_online: bool = option(False, "with --temp-policy: keep learning with REINFORCE during the run")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self.temp_min, self.temp_max, ("--temp-min", "--temp-max"))
        if not self.temp_min < self.temp_init < self.temp_max:
            raise ConfigError(f"--temp-init must lie in (--temp-min, --temp-max) = ({self.temp_min}, "
                              f"{self.temp_max}), got {self.temp_init}")
        if self.temp_hidden < 1:
            raise ConfigError(f"--temp-hidden must be >= 1, got {self.temp_hidden}")
        if self.temp_warmup_epochs < 0:
            raise ConfigError(f"--temp-warmup-epochs must be >= 0, got {self.temp_warmup_epochs}")
        if self.temp_rrd_window < 2:
            raise ConfigError(f"--temp-rrd-window must be >= 2, got {self.temp_rrd_window}")
        if self.temp_online and self.temp_policy is None:
            raise ConfigError("--temp-online keeps a deployed --temp-policy learning; without --temp-policy there is "
                              "nothing to deploy (the gate learns in the loop anyway): give --temp-policy PATH or "
                              "drop --temp-online")

    @property
    def redistributed(self) -> bool:
        return self.temp_reward == "redistributed"


def load_temperature_policy(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The policy of a zip from ``metagate train-policy --env temperature`` (nothing in it is unpickled)."""
    from metagate.gates.temperature.sb3 import load_temperature_zip  # needs stable-baselines3: only here

    return load_temperature_zip(path, NUM_STATE, device)


@register("temperature")
class TemperatureGate(_RLGate):
    """Per-unit KD temperatures from a policy over unit states (options: :class:`TemperatureConfig`).

    :param module: an already loaded temperature policy (instead of ``--temp-policy``)
    """

    config_class = TemperatureConfig
    config: TemperatureConfig

    def __init__(self, config: TemperatureConfig | None = None, *, module: nn.Module | None = None,
                 **options: Any) -> None:
        Gate.__init__(self, config, **options)
        c = self.config
        if module is None and c.temp_policy is not None:
            module = load_temperature_policy(c.temp_policy)
        deployed = module is not None
        super().__init__(c, learn=(not deployed) or c.temp_online)
        self.redistribution: ReturnDecomposition | None = None
        if c.redistributed:
            # per-unit credit needs per-unit exploration (ITKD: sigma = exp(-0.5) per instance), no shared
            # noise, and unpaired episodes
            self.antithetic = False
            self.redistribution = ReturnDecomposition(len(ITKD_FEATURES), window=c.temp_rrd_window)
        if module is None:
            if c.redistributed:
                module = TemperaturePolicy(c.temp_min, c.temp_max, c.temp_init, c.temp_hidden,
                                           -0.5 if c.temp_log_std is None else c.temp_log_std, None)
            else:
                module = TemperaturePolicy(c.temp_min, c.temp_max, c.temp_init, c.temp_hidden, c.temp_log_std,
                                           c.temp_shared_log_std)
        elif c.redistributed and self.learn and getattr(module, "shared_log_std", None) is not None:
            raise ConfigError("--temp-reward redistributed credits units through per-unit exploration noise; "
                              "the policy of --temp-policy explores with noise shared by a batch: fine-tune it "
                              "(--temp-online) with --temp-reward episode")
        self.policy = module
        self.t_min, self.t_max = float(module.t_min), float(module.t_max)  # a deployed policy's own range
        self.policy.train(self.learn)
        self._state: TemperatureState | None = None
        self._log: TemperatureLog | None = None
        self._mix = FixedMix(self.alpha)

    def setup(self, run: GateContext) -> None:
        super().setup(run)
        self.policy.train(self.learn)
        if self._features is not None:
            self._state = TemperatureState(run.bank.logits, run.train_y, self._features)  # type: ignore[union-attr]
        self._log = TemperatureLog(run)

    def _head(self) -> Any:
        """The policy's mean action without a graph: :meth:`_act` adds the exploration noise itself, fused
        (fewer tensor ops per step than building the policy's distribution and sampling it)."""
        return self._mean_action

    @torch.no_grad()
    def _mean_action(self, state: Tensor) -> Tensor:
        return self.policy.mean_action(state)

    def _warming_up(self) -> bool:
        run = self._run
        return run is not None and self.config.temp_warmup_epochs > 0 and \
            run.step < self.config.temp_warmup_epochs * run.steps_per_epoch

    def state(self, view: UnitView) -> Tensor:
        """``[N, 1, S]`` unit states (cached teacher part when the view holds whole training units)."""
        if self._state is not None and self._state.cache.covers(view):
            assert view.ids is not None
            return self._state.flat_state(view.student_log_probs.float(), view.ids, view.progress)
        if view.teacher_logits is None:
            raise ConfigError(f"gate {self.name!r} needs teachers; pass --teachers K >= 1")
        return temperature_state(view.student_logits, view.teacher_logits, view.labels, view.progress)

    def weights(self, view: UnitView) -> GateOutput:
        if view.num_teachers == 0:
            raise ConfigError(f"gate {self.name!r} needs teachers; pass --teachers K >= 1")
        w = self._mix(view)
        if self._warming_up():
            tau: Tensor | float = self.tau
        else:
            state = self.state(view)
            learning = self.learn and self._run is not None and self.policy.training
            action = self._act(state, learning)
            if learning:
                assert self.learner is not None
                rec_s, rec_a = state, action
                if view.is_sequence:  # padding tokens are no decisions: REINFORCE scores the real tokens only
                    real = view.mask.reshape(-1) > 0
                    rec_s, rec_a = state[real], action[real]
                m = self.update_units
                self.learner.record(rec_s if m is None else rec_s[:m], rec_a if m is None else rec_a[:m])
            tau = self.policy.temperature(action).to(view.student_logits.dtype)  # NaN: the trainer's loss check
        if self._log is not None:
            self._log.record(view.unit_ids, tau)
        return GateOutput(w, tau)

    def after_step(self, ctx: Any) -> None:
        if self._warming_up():
            return
        super().after_step(ctx)

    def _finish_episode(self, reward: float) -> dict[str, float]:
        assert self.learner is not None
        if self.redistribution is None or not self.learner.buffer:
            return self.learner.finish(reward)
        states, actions = self.learner.episode_units()
        # ITKD's inputs: the ITKD part of the state (the first columns) and the action
        states, actions = states.reshape(states.shape[0], -1)[:, : len(ITKD_FEATURES)], actions.reshape(-1)
        unit_rewards = self.redistribution.redistribute(states, actions, reward)  # the model before this episode
        stats = self.learner.finish_units(reward, unit_rewards)
        if math.isfinite(reward):
            self.redistribution.add(states, actions, reward)
        if self.redistribution.fitted:
            stats["rrd_r2"] = self.redistribution.r2
        return stats

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self.redistribution is not None:
            state["redistribution"] = self.redistribution.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self.redistribution is not None and "redistribution" in state:
            self.redistribution.load_state_dict(state["redistribution"])

    def diagnostics(self) -> dict[str, float]:
        return {} if self._log is None else self._log.summary()

    def log(self, logger: Any, step: int) -> None:
        for k, v in self._last.items():
            logger.scalar(f"policy/{k}", v, step)
        for name in ("unit_log_std", "shared_log_std"):
            p = getattr(self.policy, name, None)
            if isinstance(p, torch.Tensor) and math.isfinite(float(p.detach())):
                logger.scalar(f"policy/{name}", float(p.detach()), step)
        if self._log is not None:
            self._log.write(logger, step)

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "alpha": self.alpha, "tau": self.tau, "temp_min": self.t_min,
                "temp_max": self.t_max}
