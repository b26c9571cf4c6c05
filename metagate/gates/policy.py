"""Policy gates: per-unit teacher weights chosen by a policy over unit features (DESIGN.md,
"Policy gate"; Yuan et al., AAAI 2021, reinforced multi-teacher selection).

* ``reinforce`` -- learns in the loop with REINFORCE: the policy acts on every batch, the reward is
  the improvement of the student's loss on a fixed subset of the clean ``meta`` split over an
  episode of ``--rl-episode`` steps, with a moving-average baseline. Selection (Bernoulli per unit
  and teacher) or weights (Gaussian teacher logits -> softmax). Needs no stable-baselines3.
* ``policy`` -- deploys a policy trained with ``metagate train-policy`` (a stable-baselines3 zip):
  mean action by default, ``--online`` keeps learning with REINFORCE.

Both weight the teachers *inside* the KD share ``1 - alpha`` (:func:`split_kd_share`), so the
label/KD split may come from elsewhere (``--alpha`` of the fixed gate, or a meta gate).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagate.diagnostics import kd_shares
from metagate.errors import ConfigError
from metagate.features import FEATURE_HIGH, TeacherFeatureCache, clamped_view_features
from metagate.gates.base import Gate, GateOutput, StepContext, UnitView
from metagate.gates.registry import register
from metagate.layout import for_model
from metagate.modes import eval_mode, is_mode_free
from metagate.policies.core import FrozenLogitHead, TeacherLogitHead, action_weights, split_kd_share
from metagate.policies.reinforce import MODES, BernoulliSelection, ReinforceLearner, ReinforcePolicy

if TYPE_CHECKING:  # pragma: no cover
    from metagate.trainer import Trainer

__all__ = ["FEATURE_HIGH", "MetaPolicyGate", "PolicyGate", "ReinforceGate", "load_sb3_policy", "policy_quality"]


class _RLGate(Gate):
    """Shared machinery: features -> policy -> weights, and the in-loop REINFORCE episode.

    :param alpha: label weight (the teachers share ``1 - alpha``)
    :param tau: KD temperature
    :param learn: update the policy with REINFORCE during the run
    :param episode: steps per REINFORCE episode
    :param lr: policy learning rate
    :param baseline_decay: moving-average decay of the reward baseline
    :param val_size: size of the fixed ``meta`` subset the reward is measured on
    :param update_units: units of each step the REINFORCE update scores (``None``: all; else a random
        subset, the batch's first units). With per-teacher noise the episode's log-probability gradient
        is a mean over its units, so a subset keeps it unbiased and cheaper, but noisier: on digits
        with two half-right teachers 8 of 32 units cut the weight learned on the right teacher from
        0.90 to 0.59, while the planted-teacher result on fashion is unchanged at 32 of 128.
    """

    trusted_weights = True

    def __init__(self, alpha: float = 0.5, tau: float = 4.0, learn: bool = True, episode: int = 5,
                 lr: float = 3e-3, baseline_decay: float = 0.9, val_size: int = 128,
                 update_units: int | None = None) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"--alpha must be in [0, 1], got {alpha}")
        if not tau > 0:
            raise ConfigError(f"--tau must be > 0, got {tau}")
        if episode < 1:
            raise ConfigError(f"--rl-episode must be >= 1, got {episode}")
        if val_size < 1:
            raise ConfigError(f"--rl-val-size must be >= 1, got {val_size}")
        if update_units is not None and update_units < 1:
            raise ConfigError(f"--rl-update-units must be >= 1, got {update_units}")
        self.alpha, self.tau, self.learn = float(alpha), float(tau), bool(learn)
        self.episode, self.lr, self.baseline_decay, self.val_size = int(episode), float(lr), float(baseline_decay), \
            int(val_size)
        self.learner: ReinforceLearner | None = None
        self._trainer: Trainer | None = None
        self._val_start: float | None = None
        self._t = 0
        self._last: dict[str, float] = {}
        self._logged: list[Tensor] = []
        self.update_units = None if update_units is None else int(update_units)
        self._noise: Tensor | None = None
        self._prev_noise: Tensor | None = None
        self._offset: Tensor | None = None
        self.antithetic = True
        self.temperature = 0.25
        self._features: TeacherFeatureCache | None = None
        self._fast_head: FrozenLogitHead | None = None
        self._alpha_cols: dict[tuple[int, torch.device, torch.dtype], Tensor] = {}

    # subclasses provide the policy
    policy: nn.Module

    def _head(self) -> FrozenLogitHead | None:
        """Fast acting forward of the policy's teacher-logit head (``None``: use ``policy.distribution``)."""
        head = getattr(self.policy, "net", None) or getattr(self.policy, "actor", None)
        if not isinstance(head, TeacherLogitHead):
            return None
        if self._fast_head is None or self._fast_head.head is not head:
            self._fast_head = FrozenLogitHead(head)
        return self._fast_head

    def _episode_noise(self, k: int, like: Tensor) -> Tensor:
        """Per-teacher noise ``[1, K]``, held over the episode (mirrored in the second of an antithetic pair)."""
        if self._noise is None or self._noise.shape[-1] != k:
            assert self.learner is not None
            if self.learner.antithetic and not self.learner.first_of_pair and self._prev_noise is not None \
                    and self._prev_noise.shape[-1] == k:
                self._noise = -self._prev_noise  # mirrored second episode of the pair
            else:
                self._noise = torch.randn(1, k, device=like.device, dtype=like.dtype)
            self._offset = None
        return self._noise

    def _act(self, features: Tensor, learning: bool) -> Tensor:
        """Actions ``[B, K]`` for features ``[B, K, F]`` (no graph: features are plain tensors, the fast
        head's matrices are built without grad, and ``policy.distribution`` runs under ``no_grad``)."""
        head = self._head()
        k = features.shape[-2]
        if head is None:  # any policy with ``distribution``
            with torch.no_grad():
                dist = self.policy.distribution(features)
                return dist.sample(self._episode_noise(k, features)) if learning else dist.mode()
        mean = head(features)
        if getattr(self.policy, "mode", "weights") == "select":
            dist = BernoulliSelection(mean)
            return dist.sample() if learning else dist.mode()
        if not learning:
            return mean
        # TeacherGaussian.sample, fused: mean + sigma_u * eta + sigma_t * eps (eps held over the episode;
        # sigma_t is constant within an episode: the policy only changes when an episode closes)
        noise = self._episode_noise(k, features)
        unit = getattr(self.policy, "unit_log_std", None)
        action = mean + unit.detach().exp() * torch.randn_like(mean) if unit is not None else mean
        shared = getattr(self.policy, "shared_log_std", None)
        if shared is not None:
            if self._offset is None or self._offset.device != mean.device:
                self._offset = shared.detach().exp() * noise
            action = action + self._offset
        return action

    def _softmax_weights(self, action: Tensor) -> Tensor:
        """Action ``[N, K]`` -> ``W [N, 1+K]`` (:func:`action_weights`, with a cached ``alpha`` column)."""
        key = (action.shape[0], action.device, action.dtype)
        col = self._alpha_cols.get(key)
        if col is None:
            col = self._alpha_cols[key] = torch.full((action.shape[0], 1), self.alpha, device=action.device,
                                                     dtype=action.dtype)
        return action_weights(action, self.alpha, self.temperature, col)

    def _weights_from_action(self, action: Tensor) -> Tensor:
        raise NotImplementedError

    # -- gate API --------------------------------------------------------------------------------
    def setup(self, trainer: Trainer) -> None:
        self._trainer = trainer
        dev = trainer.device
        self.policy.to(dev)
        meta = trainer.task.meta  # the clean split gates may learn from (never ``select``)
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(meta), generator=g)[: min(self.val_size, len(meta))]
        self._val_x, self._val_y = for_model(trainer.student, meta.x[idx].to(dev)), meta.y[idx].to(dev)
        self._mode_free = is_mode_free(trainer.student)  # e.g. a plain MLP: the reward needs no mode switch
        # teacher-only features of every training unit, computed once (per step: KL and student features)
        self._features = TeacherFeatureCache.for_trainer(trainer)
        if self.learn and self.learner is None:
            self.learner = ReinforceLearner(self.policy, lr=self.lr, baseline_decay=self.baseline_decay,
                                            antithetic=self.antithetic)

    def weights(self, view: UnitView) -> GateOutput:
        if view.num_teachers == 0:  # not ``view.teacher_logits``: that would gather the raw logits
            raise ConfigError(f"gate {self.name!r} needs teachers; pass --teachers K >= 1")
        feats = clamped_view_features(view, self._features)
        learning = self.learn and self._trainer is not None and self.policy.training
        action = self._act(feats, learning)
        if learning:
            assert self.learner is not None
            m = self.update_units  # batches are random draws: their first units are a random subset
            self.learner.record(feats if m is None else feats[:m], action if m is None else action[:m])
        w = self._weights_from_action(action)
        if w.dtype != view.student_logits.dtype:
            w = w.to(view.student_logits.dtype)
        if len(self._logged) < 4096:  # reduced when logged (no per-step ops); bounded for outside drivers
            self._logged.append(w)
        return GateOutput(w, self.tau)

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Student CE on the fixed ``meta`` subset (eval mode; the trainer switches back to train)."""
        assert self._trainer is not None
        with eval_mode(self._trainer.student, self._mode_free) as student:
            return float(F.cross_entropy(student(self._val_x), self._val_y))

    def after_step(self, ctx: StepContext) -> None:
        if not (self.learn and self.learner is not None and self.policy.training):
            return
        if self._val_start is None:  # first step of the run (or after a resume): no reward yet
            self.learner.buffer.clear()
            self._noise = self._offset = None
            self._val_start = self.validation_loss()
            return
        self._t += 1
        if self._t % self.episode:
            return
        val = self.validation_loss()
        reward = 100.0 * (self._val_start - val)  # scaled validation improvement over the episode
        self._last = self.learner.finish(reward)
        self._val_start = val
        self._prev_noise, self._noise, self._offset = self._noise, None, None

    def log(self, logger: Any, step: int) -> None:
        for k, v in self._last.items():
            logger.scalar(f"policy/{k}", v, step)
        if self._logged:
            for j, v in enumerate(torch.cat(self._logged)[:, 1:].mean(0).tolist()):
                logger.scalar(f"policy/mean_w_teacher{j}", v, step)
            self._logged.clear()
        for name in ("unit_log_std", "shared_log_std"):
            p = getattr(self.policy, name, None)
            if isinstance(p, torch.Tensor):
                logger.scalar(f"policy/{name}", float(p.detach()), step)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"policy": self.policy.state_dict(), "t": self._t,
                                 "val_start": float("nan") if self._val_start is None else self._val_start}
        if self.learner is not None:
            state["learner"] = self.learner.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self._t = int(state.get("t", 0))
        self._val_start = None  # re-measured on the restored student
        self._offset = None  # the restored exploration scale
        if self.learner is not None and "learner" in state:
            self.learner.load_state_dict(state["learner"])

    def parameters(self) -> list[nn.Parameter]:
        return list(self.policy.parameters())

    @staticmethod
    def _add_rl_arguments(g: argparse._ArgumentGroup) -> None:
        g.add_argument("--rl-episode", type=int, default=5,
                       help="policy/reinforce: steps per REINFORCE episode (the reward is measured at its ends)")
        g.add_argument("--rl-lr", type=float, default=1e-2, help="policy/reinforce: policy learning rate (Adam)")
        g.add_argument("--rl-baseline-decay", type=float, default=0.9,
                       help="policy/reinforce: moving-average decay of the reward baseline")
        g.add_argument("--rl-val-size", type=int, default=128,
                       help="policy/reinforce: size of the fixed meta subset the reward is measured on")
        g.add_argument("--rl-update-units", type=int, default=None,
                       help="policy/reinforce: units per step scored by the REINFORCE update (a random subset; "
                            "default all). Cheaper, unbiased, noisier")


@register("reinforce")
class ReinforceGate(_RLGate):
    """In-loop REINFORCE over per-unit teacher decisions.

    :param mode: ``weights`` (softmax over sampled teacher logits) or ``select`` (Bernoulli per teacher)
    :param temperature: softmax temperature of the weights mode
    :param hidden: policy encoder width
    :param shared_noise: add exploration noise shared by the batch's units per teacher (lower variance)
    """

    def __init__(self, mode: str = "weights", alpha: float = 0.5, tau: float = 4.0, temperature: float = 0.25,
                 hidden: int = 16, episode: int = 5, lr: float = 1e-2, baseline_decay: float = 0.9,
                 val_size: int = 128, shared_noise: bool = True, log_std: float | None = None,
                 shared_log_std: float = -0.5, update_units: int | None = None) -> None:
        if mode not in MODES:
            raise ConfigError(f"--rl-mode must be one of {', '.join(MODES)}, got {mode!r}")
        super().__init__(alpha, tau, True, episode, lr, baseline_decay, val_size, update_units)
        self.mode, self.temperature, self.hidden, self.shared_noise = mode, float(temperature), int(hidden), \
            bool(shared_noise)
        if not shared_noise and log_std is None:
            log_std = shared_log_std  # per-unit noise only
        self.log_std_init, self.shared_log_std_init = log_std, float(shared_log_std)
        self.policy = ReinforcePolicy(mode, hidden=hidden, temperature=temperature, log_std=log_std,
                                      shared_log_std=shared_log_std if shared_noise else None)

    def _weights_from_action(self, action: Tensor) -> Tensor:
        if self.mode == "select":
            return self.policy.gate_weights(action, self.alpha)
        return self._softmax_weights(action)

    def hparams(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "tau": self.tau, "rl_mode": self.mode, "rl_temperature": self.temperature,
                "rl_episode": self.episode, "rl_lr": self.lr, "rl_baseline_decay": self.baseline_decay,
                "rl_val_size": self.val_size, "rl_update_units": self.update_units or "all",
                "rl_shared_noise": self.shared_noise,
                "rl_log_std": "off" if self.log_std_init is None else self.log_std_init,
                "rl_shared_log_std": self.shared_log_std_init}

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("reinforce / policy gates (label weight and KD temperature: --alpha, --tau)")
        g.add_argument("--rl-mode", default="weights", choices=list(MODES),
                       help="reinforce: per-unit teacher weights (softmax) or Bernoulli teacher selection")
        g.add_argument("--rl-temperature", type=float, default=0.25,
                       help="reinforce: softmax temperature mapping teacher logits in [-1, 1] to weights")
        g.add_argument("--rl-hidden", type=int, default=16, help="reinforce: policy encoder width")
        g.add_argument("--rl-log-std", type=float, default=None,
                       help="reinforce: initial log-std of per-unit exploration noise (default: off; only the "
                            "per-teacher noise held over an episode, the low-variance choice)")
        g.add_argument("--rl-shared-log-std", type=float, default=-0.5,
                       help="reinforce: initial log-std of the per-teacher noise held over an episode")
        g.add_argument("--rl-no-shared-noise", action="store_true",
                       help="reinforce: independent exploration noise per unit only (Yuan et al.; higher variance)")
        cls._add_rl_arguments(g)
        g.add_argument("--policy", default=None, help="policy: a policy zip written by `metagate train-policy`")
        g.add_argument("--online", action="store_true", help="policy: keep learning with REINFORCE during the run")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ReinforceGate:
        return cls(mode=args.rl_mode, alpha=getattr(args, "alpha", 0.5), tau=getattr(args, "tau", 4.0),
                   temperature=args.rl_temperature, hidden=args.rl_hidden, episode=args.rl_episode, lr=args.rl_lr,
                   baseline_decay=args.rl_baseline_decay, val_size=args.rl_val_size,
                   update_units=args.rl_update_units,
                   shared_noise=not args.rl_no_shared_noise, log_std=args.rl_log_std,
                   shared_log_std=args.rl_shared_log_std)


def load_sb3_policy(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load the policy of a stable-baselines3 zip (PPO or A2C) without knowing the algorithm."""
    from stable_baselines3.common.save_util import load_from_zip_file

    p = Path(path)
    if not p.is_file() and p.with_suffix(".zip").is_file():
        p = p.with_suffix(".zip")
    if not p.is_file():
        raise ConfigError(f"--policy {path}: no such file (train one with `metagate train-policy --out ...`)")
    try:
        data, params, _ = load_from_zip_file(p, device=device)
    except Exception as e:  # a truncated or foreign zip
        raise ConfigError(f"--policy {path}: not a stable-baselines3 policy zip ({e})") from e
    if data is None or "policy_class" not in data or params is None or "policy" not in params:
        raise ConfigError(f"--policy {path}: the zip holds no policy")
    cls = data["policy_class"]
    policy = cls(data["observation_space"], data["action_space"], lambda _: 0.0, **data.get("policy_kwargs", {}))
    policy.load_state_dict(params["policy"])
    if not hasattr(policy, "mean_logits"):
        raise ConfigError(f"--policy {path}: {cls.__name__} is not a metagate teacher-weighting policy")
    return policy.to(device)


@register("policy")
class PolicyGate(_RLGate):
    """Deploy a trained teacher-weighting policy (mean action); ``online`` fine-tunes it with REINFORCE.

    :param policy: a loaded :class:`metagate.policies.sb3.TeacherWeightingPolicy` (or any module with
        ``mean_logits``/``distribution``) -- or give ``path``
    :param path: a zip written by ``metagate train-policy``
    :param alpha: label weight (default: the value the policy was trained with)
    :param tau: KD temperature (default: the value the policy was trained with)
    """

    def __init__(self, policy: nn.Module | None = None, path: str | Path | None = None, alpha: float | None = None,
                 tau: float | None = None, online: bool = False, episode: int = 5, lr: float = 1e-3,
                 baseline_decay: float = 0.9, val_size: int = 128, update_units: int | None = None) -> None:
        if policy is None:
            if path is None:
                raise ConfigError("--gate policy needs --policy PATH (a zip from `metagate train-policy`)")
            policy = load_sb3_policy(path)
        self.path = str(path) if path is not None else ""
        a = float(getattr(policy, "label_alpha", 0.5)) if alpha is None else alpha
        t = float(getattr(policy, "kd_tau", 4.0)) if tau is None else tau
        super().__init__(a, t, online, episode, lr, baseline_decay, val_size, update_units)
        self.policy = policy
        self.temperature = float(getattr(policy, "weight_temperature", 0.25))
        self.policy.train(online)

    def _weights_from_action(self, action: Tensor) -> Tensor:
        return self._softmax_weights(action)

    def setup(self, trainer: Trainer) -> None:
        super().setup(trainer)
        self.policy.train(self.learn)

    def hparams(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "tau": self.tau, "policy": self.path, "online": self.learn,
                "policy_temperature": self.temperature}

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> PolicyGate:
        alpha = args.alpha if getattr(args, "alpha", 0.5) != 0.5 else None  # 0.5 = the flag's default
        tau = args.tau if getattr(args, "tau", 4.0) != 4.0 else None
        return cls(path=args.policy, alpha=alpha, tau=tau, online=args.online, episode=args.rl_episode,
                   lr=args.rl_lr, baseline_decay=args.rl_baseline_decay, val_size=args.rl_val_size,
                   update_units=args.rl_update_units)


def policy_quality(weights: Tensor) -> dict[str, float]:
    """Mean KD-internal weight of every teacher, ``w_k / sum_j w_j`` over units (diagnostic)."""
    share = kd_shares(weights)
    return {f"teacher{j}": float(v) for j, v in enumerate(share.mean(0).tolist()) if not math.isnan(v)}


@register("meta+policy")
class MetaPolicyGate(Gate):
    """Composition: the meta gate learns the label/KD split, a policy weights the teachers inside it.

    Per step: the meta gate's look-ahead (``before_step``) and weights give each unit's label weight
    and total teacher weight (the sum of its teacher columns; ``--meta-columns split`` learns exactly
    that); the policy gate (``reinforce``, or ``policy`` with ``--policy PATH``) gives the per-unit
    distribution over teachers; :func:`split_kd_share` combines them. Both learn in the same step:
    the meta gate from its look-ahead (which uses its own teacher columns), the policy from the
    validation reward of its episodes.

    :param meta: a :class:`metagate.gates.meta.MetaGate`
    :param policy: a :class:`ReinforceGate` or :class:`PolicyGate`
    """

    trusted_weights = True

    def __init__(self, meta: Gate, policy: _RLGate) -> None:
        self.meta, self.policy_gate = meta, policy
        self.uses_teachers = True

    def setup(self, trainer: Trainer) -> None:
        self.meta.setup(trainer)
        self.policy_gate.setup(trainer)

    def before_step(self, ctx: StepContext) -> None:
        self.meta.before_step(ctx)
        self.policy_gate.before_step(ctx)

    def weights(self, view: UnitView) -> GateOutput:
        m = self.meta.weights(view)
        p = self.policy_gate.weights(view).weights
        kd = p[:, 1:]
        probs = kd / kd.sum(1, keepdim=True).clamp_min(1e-12)
        no_teacher = kd.sum(1) <= 0  # a selection policy chose no teacher: keep the meta row as it is
        w = split_kd_share(m.weights[:, 0], probs, kd_share=m.weights[:, 1:].sum(1))
        if bool(no_teacher.any()):
            w = torch.where(no_teacher.unsqueeze(1), m.weights, w)
        return GateOutput(w, m.tau)

    def after_step(self, ctx: StepContext) -> None:
        self.meta.after_step(ctx)
        self.policy_gate.after_step(ctx)

    def parameters(self) -> list[nn.Parameter]:
        return list(self.meta.parameters()) + list(self.policy_gate.parameters())

    def state_dict(self) -> dict[str, Any]:
        return {"meta": self.meta.state_dict(), "policy": self.policy_gate.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.meta.load_state_dict(state["meta"])
        self.policy_gate.load_state_dict(state["policy"])

    def hparams(self) -> dict[str, Any]:
        return {**self.meta.hparams(), **{f"policy_{k}": v for k, v in self.policy_gate.hparams().items()}}

    def log(self, logger: Any, step: int) -> None:
        self.meta.log(logger, step)
        self.policy_gate.log(logger, step)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> MetaPolicyGate:
        from metagate.gates.registry import get_gate_class

        meta = get_gate_class("meta").from_args(args)
        policy: _RLGate = PolicyGate.from_args(args) if getattr(args, "policy", None) else \
            ReinforceGate.from_args(args)
        return cls(meta, policy)
