"""Policy gates: per-unit teacher weights chosen by a policy over unit features (docs/design.md,
"Layout"; Yuan et al., AAAI 2021, reinforced multi-teacher selection).

* ``reinforce`` -- learns in the loop with REINFORCE: the policy acts on every batch, the reward is
  the improvement of the student's loss on a fixed subset of the clean ``meta`` split over an
  episode of ``--rl-episode`` steps, with a moving-average baseline. Selection (Bernoulli per unit
  and teacher) or weights (Gaussian teacher logits -> softmax). Needs no stable-baselines3.
  ``--rl-credit hypergradient`` instead credits every (unit, teacher) by the look-ahead hypergradient of the
  clean validation loss (:mod:`metagate.gates.credit`) and acts without exploration. Under ``meta+policy`` the
  look-ahead scores the policy's rows at its own ``alpha``, not the meta gate's split (the teacher columns'
  ranking is what the policy learns).
* ``policy`` -- deploys a policy trained with ``metagate train-policy`` (a stable-baselines3 zip):
  mean action by default, ``--online`` keeps learning with REINFORCE.

Both weight the teachers *inside* the KD share ``1 - alpha`` (:func:`split_kd_share`), so the
label/KD split may come from elsewhere (``--alpha`` of the fixed gate, or a meta gate).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from metagate.errors import ConfigError
from metagate.features import (
    FEATURE_HIGH,
    NUM_FEATURES,
    NUM_RELIABILITY,
    TeacherFeatureCache,
    ViewReliability,
    clamped_view_features,
)
from metagate.gates.base import Gate, GateContext, GateOutput, StepContext, UnitView
from metagate.gates.credit import HeadCredit, centred_credit
from metagate.gates.fixed import KDMixConfig
from metagate.gates.registry import register
from metagate.layout import for_model
from metagate.modes import eval_mode, is_mode_free
from metagate.options import option
from metagate.policies.core import FrozenLogitHead, TeacherLogitHead, action_weights
from metagate.policies.reinforce import MODES, BernoulliSelection, ReinforceLearner, ReinforcePolicy, fused_adam
from metagate.policies.safe_zip import load_policy_zip
from metagate.units import unit_ce

__all__ = ["CREDITS", "FEATURE_HIGH", "PolicyGate", "ReinforceGate", "load_sb3_policy"]

#: the in-loop policy's learning signals (``--rl-credit``)
CREDITS = ("episode", "hypergradient")


@dataclass
class RLConfig(KDMixConfig):
    """The in-loop REINFORCE episode, shared by ``reinforce``, ``policy --online`` and ``meta+policy``.

    ``rl_update_units``: units of each step the REINFORCE update scores (unset: all; else the batch's first
    units, a random subset since batches are random draws). With per-teacher noise the episode's
    log-probability gradient is a mean over its units, so a subset keeps it unbiased and cheaper, but noisier.
    """

    rl_episode: int = option(5, "steps per REINFORCE episode (the reward is measured at its ends)")
    rl_lr: float = option(1e-2, "policy learning rate (Adam)")
    rl_baseline_decay: float = option(0.9, "moving-average decay of the reward baseline, in [0, 1)")
    rl_val_size: int = option(128, "size of the fixed meta subset the reward is measured on")
    rl_update_units: int | None = option(None, "units per step scored by the REINFORCE update (a random subset; "
                                               "unset: all). Cheaper, unbiased, noisier")

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("rl_episode", "rl_val_size", "rl_update_units"):
            v = getattr(self, name)
            if v is not None and v < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {v}")
        if not self.rl_lr > 0:
            raise ConfigError(f"--rl-lr must be > 0, got {self.rl_lr}")
        if not 0.0 <= self.rl_baseline_decay < 1.0:
            raise ConfigError(f"--rl-baseline-decay must be in [0, 1), got {self.rl_baseline_decay}")


@dataclass
class TeacherRLConfig(RLConfig):
    """The unit of a teacher-weighting policy on sequences, shared by ``reinforce`` and ``policy``."""

    rl_unit: str = option("token", "sequences: teacher weights per token, or per word (the policy acts once on "
                                   "the mean features of the word's unmasked tokens; every token gets them)",
                          choices=("token", "word"))


@dataclass
class ReinforceConfig(TeacherRLConfig):
    """Options of the ``reinforce`` gate."""

    rl_mode: str = option("weights", "per-unit teacher weights (softmax) or Bernoulli teacher selection",
                          choices=MODES)
    rl_temperature: float = option(0.25, "softmax temperature mapping teacher logits in [-1, 1] to weights")
    rl_hidden: int = option(16, "policy encoder width")
    rl_log_std: float | None = option(None, "initial log-std of per-unit exploration noise (unset: off; only the "
                                            "per-teacher noise held over an episode, the low-variance choice)")
    rl_shared_log_std: float = option(-0.5, "initial log-std of the per-teacher noise held over an episode")
    rl_no_shared_noise: bool = option(False, "independent exploration noise per unit only (Yuan et al.; higher "
                                             "variance)")
    rl_credit: str = option("episode", "the policy's learning signal: the scalar validation improvement of an "
                                       "episode (REINFORCE with exploration), or per (unit, teacher) the look-ahead "
                                       "hypergradient of the clean validation CE w.r.t. the unit's teacher weights, "
                                       "centred over its teachers (deterministic; needs a student with a linear "
                                       "head, e.g. metagate.models or the seq2seq students, per token or per word "
                                       "on sequences; --rl-val-size is the meta batch of each look-ahead)",
                            choices=CREDITS)
    rl_credit_every: int = option(1, "hypergradient credit: one look-ahead and policy update every this many steps "
                                     "(the policy acts on every step)")
    rl_credit_entropy: float = option(0.3, "hypergradient credit: entropy bonus of each unit's teacher distribution "
                                           "(the credit is scaled to unit RMS; the policy then tends to "
                                           "softmax(E[credit | state] / this))")
    rl_features: str = option("unit", "the policy's state per unit and teacher: the unit features, or those and "
                                      "the teacher-reliability features (held-out reliability given the prediction, "
                                      "agreement with the other teachers' majority, KL to their mean; measured on "
                                      "the clean meta split; see metagate.features)",
                              choices=("unit", "reliability"))

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.rl_credit == "hypergradient" and self.rl_mode == "select":
            raise ConfigError("--rl-credit hypergradient credits softmax weights; it needs --rl-mode weights, "
                              "got --rl-mode select")
        if self.rl_credit_every < 1:
            raise ConfigError(f"--rl-credit-every must be >= 1, got {self.rl_credit_every}")
        if not self.rl_credit_entropy >= 0:
            raise ConfigError(f"--rl-credit-entropy must be >= 0, got {self.rl_credit_entropy}")
        if self.rl_hidden < 1:
            raise ConfigError(f"--rl-hidden must be >= 1, got {self.rl_hidden}")
        if not self.rl_temperature > 0:
            raise ConfigError(f"--rl-temperature must be > 0, got {self.rl_temperature}")


@dataclass
class PolicyConfig(TeacherRLConfig):
    """Options of the ``policy`` gate (a policy zip from ``metagate train-policy``)."""

    policy: str | None = option(None, "a policy zip written by `metagate train-policy`")
    online: bool = option(False, "keep learning with REINFORCE during the run")


def word_features(view: UnitView, feats: Tensor) -> Tensor:
    """``[B, K, F]`` one decision's features per word: the mean of its unmasked tokens' ``feats [B*T, K, F]``."""
    b, t = view.seq_shape
    m_tok = view.mask.to(feats.dtype).view(b, t, 1, 1)
    return (feats.view(b, t, *feats.shape[1:]) * m_tok).sum(1) / m_tok.sum(1).clamp_min(1.0)


class _RLGate(Gate):
    """Shared machinery: features -> policy -> weights, and the in-loop REINFORCE episode.

    :param learn: update the policy with REINFORCE during the run
    """

    trusted_weights = True
    config: RLConfig

    def __init__(self, config: RLConfig | None = None, learn: bool = True, **options: Any) -> None:
        super().__init__(config, **options)
        c = self.config
        self.alpha, self.tau, self.learn = c.label_weight, c.temperature, bool(learn)
        self.episode, self.lr, self.baseline_decay, self.val_size = c.rl_episode, c.rl_lr, c.rl_baseline_decay, \
            c.rl_val_size
        self.update_units = c.rl_update_units
        self.learner: ReinforceLearner | None = None
        self._run: GateContext | None = None
        self._val_start: float | None = None
        self._t = 0
        self._last: dict[str, float] = {}
        self._noise: Tensor | None = None
        self._prev_noise: Tensor | None = None
        self._offset: Tensor | None = None
        self.antithetic = True
        self.temperature = 0.25
        self._features: TeacherFeatureCache | ViewReliability | None = None
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

    def _per_word(self, view: UnitView) -> bool:
        """One decision per word (``--rl-unit word`` on a sequence batch)."""
        return view.is_sequence and getattr(self.config, "rl_unit", "token") == "word"

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
    def setup(self, run: GateContext) -> None:
        self._run = run
        dev = run.device
        self.policy.to(dev)
        meta = run.meta  # the clean split gates may learn from (never ``select``)
        g = torch.Generator().manual_seed(0)
        idx = torch.randperm(len(meta), generator=g)[: min(self.val_size, len(meta))]
        self._val_x, self._val_y = for_model(run.student, meta.x[idx].to(dev)), meta.y[idx].to(dev)
        self._mode_free = is_mode_free(run.student)  # e.g. a plain MLP: the reward needs no mode switch
        # teacher-only features of every training unit, computed once (per step: KL and student features)
        self._features = TeacherFeatureCache.for_run(run)
        if self.learn and self.learner is None:
            self.learner = ReinforceLearner(self.policy, lr=self.lr, baseline_decay=self.baseline_decay,
                                            antithetic=self.antithetic)

    def weights(self, view: UnitView) -> GateOutput:
        if view.num_teachers == 0:  # not ``view.teacher_logits``: that would gather the raw logits
            raise ConfigError(f"gate {self.name!r} needs teachers; pass --teachers K >= 1")
        feats = clamped_view_features(view, self._features)
        seq = view.is_sequence
        per_word = self._per_word(view)
        if per_word:
            feats = word_features(view, feats)
        learning = self.learn and self._run is not None and self.policy.training
        action = self._act(feats, learning)
        if learning:
            assert self.learner is not None
            rec_f, rec_a = feats, action
            if seq and not per_word:  # padding tokens are no decisions: REINFORCE scores the real tokens only
                real = view.mask.reshape(-1) > 0
                rec_f, rec_a = feats[real], action[real]
            m = self.update_units  # batches are random draws: their first units are a random subset
            self.learner.record(rec_f if m is None else rec_f[:m], rec_a if m is None else rec_a[:m])
        w = self._weights_from_action(action)
        if per_word:
            w = w.unsqueeze(1).expand(-1, view.seq_shape[1], -1).reshape(view.num_units, -1)
        if w.dtype != view.student_logits.dtype:
            w = w.to(view.student_logits.dtype)
        if seq:  # padding tokens get no weight
            w = w * view.mask.to(w.dtype).unsqueeze(1)
        return GateOutput(w, self.tau)

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Student CE on the fixed ``meta`` subset (eval mode; the trainer switches back to train)."""
        assert self._run is not None
        with eval_mode(self._run.student, self._mode_free) as student:
            return float(unit_ce(student(self._val_x), self._val_y))  # sequences: over real tokens

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
        self._last = self._finish_episode(reward)
        self._val_start = val
        self._prev_noise, self._noise, self._offset = self._noise, None, None

    def _finish_episode(self, reward: float) -> dict[str, float]:
        """Close the episode with its reward (a subclass may credit it per unit)."""
        assert self.learner is not None
        return self.learner.finish(reward)

    def log(self, logger: Any, step: int) -> None:
        for k, v in self._last.items():
            logger.scalar(f"policy/{k}", v, step)
        for name in ("unit_log_std", "shared_log_std"):
            p = getattr(self.policy, name, None)
            if isinstance(p, torch.Tensor):
                logger.scalar(f"policy/{name}", float(p.detach()), step)

    def state_dict(self) -> dict[str, Any]:
        """Policy, learner and the open episode (start loss, exploration noise, recorded decisions): a
        resume continues the episode exactly where the checkpoint was written."""
        state: dict[str, Any] = {"policy": self.policy.state_dict(), "t": self._t,
                                 "val_start": float("nan") if self._val_start is None else self._val_start,
                                 "val_started": self._val_start is not None,
                                 "noise": self._noise, "prev_noise": self._prev_noise}
        if self.learner is not None:
            state["learner"] = self.learner.state_dict()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.policy.load_state_dict(state["policy"])
        self._t = int(state.get("t", 0))
        started = bool(state.get("val_started", False))  # older checkpoints: re-measured on the restored student
        self._val_start = float(state["val_start"]) if started else None
        dev = next(iter(self.policy.parameters())).device
        self._noise = None if state.get("noise") is None else state["noise"].to(dev)
        self._prev_noise = None if state.get("prev_noise") is None else state["prev_noise"].to(dev)
        self._offset = None  # rebuilt from the restored exploration scale and noise
        self._fast_head = None
        if self.learner is not None and "learner" in state:
            self.learner.load_state_dict(state["learner"])

    def parameters(self) -> list[nn.Parameter]:
        return list(self.policy.parameters())


@register("reinforce")
class ReinforceGate(_RLGate):
    """In-loop REINFORCE over per-unit teacher decisions (options: :class:`ReinforceConfig`)."""

    config_class = ReinforceConfig
    config: ReinforceConfig

    def __init__(self, config: ReinforceConfig | None = None, **options: Any) -> None:
        c0 = config if config is not None else ReinforceConfig.from_options(options, what="gate 'reinforce'")
        # hypergradient credit: no episodes, no exploration (the REINFORCE learner stays off)
        super().__init__(c0, c0.rl_credit == "episode")
        c = self.config
        self.credit = c.rl_credit
        self._credit: HeadCredit | None = None
        self._credit_opt: torch.optim.Optimizer | None = None
        self.credit_entropy, self.credit_every = c.rl_credit_entropy, c.rl_credit_every
        self._adv_sq: float | None = None
        self.mode, self.temperature, self.hidden = c.rl_mode, c.rl_temperature, c.rl_hidden
        self.shared_noise = not c.rl_no_shared_noise
        log_std = c.rl_log_std
        if not self.shared_noise and log_std is None:
            log_std = c.rl_shared_log_std  # per-unit noise only
        self.reliability = c.rl_features == "reliability"
        nf = NUM_FEATURES + (NUM_RELIABILITY if self.reliability else 0)
        self.policy = ReinforcePolicy(self.mode, nf, hidden=self.hidden, temperature=self.temperature,
                                      log_std=log_std, shared_log_std=c.rl_shared_log_std if self.shared_noise else None)

    def _weights_from_action(self, action: Tensor) -> Tensor:
        if self.mode == "select":
            return self.policy.gate_weights(action, self.alpha)
        return self._softmax_weights(action)

    # -- hypergradient credit ----------------------------------------------------------------------
    def setup(self, run: GateContext) -> None:
        super().setup(run)
        if self.reliability:
            self._features = TeacherFeatureCache.for_run(run, reliability=True)
        if self.credit == "hypergradient":
            if self._credit is not None:
                self._credit.close()
            self._credit = HeadCredit(run, self.tau, self.val_size)
            if self._credit_opt is None:
                self._credit_opt = fused_adam(list(self.policy.net.parameters()), self.lr)

    def before_step(self, ctx: StepContext) -> None:
        """Hypergradient credit, before the policy acts on this batch: one Adam step on
        ``-mean_i [sum_k p_ik A_ik + lambda H(p_i)]`` (``A``: the centred credit of :mod:`metagate.gates.credit`
        scaled to unit moving RMS, ``p``: the policy's teacher softmax, ``lambda``: ``--rl-credit-entropy``). Its
        first term's gradient is the all-actions policy gradient ``sum_ik p_ik A_ik grad log p_ik``: minus the
        gradient of the look-ahead validation loss w.r.t. the policy's parameters (up to the scale).

        ``i`` runs over the policy's decisions: the units; on sequences the real tokens (``--rl-unit token``:
        padding decides nothing) or the words (``--rl-unit word``: a word's credit is the sum of its tokens')."""
        if self._credit is None or self._credit_opt is None or not self.policy.training \
                or ctx.step % self.credit_every:
            return
        view = ctx.view
        feats = clamped_view_features(view, self._features)
        per_word = self._per_word(view)
        if per_word:
            feats = word_features(view, feats)
        elif view.is_sequence:  # padding tokens decide nothing
            feats = feats[view.mask.reshape(-1) > 0]
        with torch.enable_grad():
            logits = self.policy.net(feats) / self.temperature  # [n, K], with its graph
        probs = torch.softmax(logits.detach(), -1)
        kd = 1.0 - self.alpha
        w = torch.cat([torch.full_like(probs[:, :1], self.alpha), kd * probs], 1)
        val, dw = self._credit.decision_hypergrad(view, w, ctx.run.lr, ctx.batch.x, per_word)
        # per unit of step size (the credit is proportional to the learning rate, which a schedule moves faster
        # than the moving RMS below follows), then scaled by a moving RMS: the credit shrinks with the student's
        # loss, the entropy term's strength should not
        adv = centred_credit(dw).to(probs.dtype) / max(ctx.run.lr, 1e-12)  # [n, K]
        sq = float(adv.pow(2).mean())
        if sq > 0:
            self._adv_sq = sq if self._adv_sq is None else 0.9 * self._adv_sq + 0.1 * sq
        adv = adv / (self._adv_sq ** 0.5 + 1e-30) if self._adv_sq else adv
        with torch.enable_grad():
            lsm = torch.log_softmax(logits, -1)
            p = lsm.exp()
            # maximise sum_k p_ik A_ik + lambda H(p_i): its optimum is p_ik ~ exp(E[A_ik | s_ik] / lambda)
            loss = -((p * adv).sum() - self.credit_entropy * (p * lsm).sum()) / probs.shape[0]
            self._credit_opt.zero_grad(set_to_none=True)
            loss.backward()
        self._credit_opt.step()
        if self._credit_opt.defaults.get("fused"):  # the fast head's cache keys on the parameters' versions
            torch.autograd.graph.increment_version(list(self.policy.net.parameters()))
        self._last = {"val_lookahead": float(val), "credit_rms": (self._adv_sq or 0.0) ** 0.5}

    def state_dict(self) -> dict[str, Any]:
        state = super().state_dict()
        if self._credit_opt is not None:
            state["credit_optimizer"] = self._credit_opt.state_dict()
            state["credit_sq"] = float("nan") if self._adv_sq is None else self._adv_sq
        if self._credit is not None:
            state.update(self._credit.sampler.state_dict(prefix="credit_val_"))
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        if self._credit_opt is not None and "credit_optimizer" in state:
            self._credit_opt.load_state_dict(state["credit_optimizer"])
            sq = float(state.get("credit_sq", float("nan")))
            self._adv_sq = None if sq != sq else sq
        if self._credit is not None and "credit_val_rng" in state:
            self._credit.sampler.load_state_dict(state, prefix="credit_val_")

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "alpha": self.alpha, "tau": self.tau}


def load_sb3_policy(path: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Load the policy of a ``metagate train-policy`` zip (PPO or A2C) without executing anything from it
    (:func:`metagate.policies.safe_zip.load_policy_zip`; ``PPO.load`` unpickles the zip's fields)."""
    return load_policy_zip(path, device)


@register("policy")
class PolicyGate(_RLGate):
    """Deploy a trained teacher-weighting policy (mean action); ``online`` fine-tunes it with REINFORCE.

    Unset ``alpha``/``tau`` take the values the policy was trained with.

    :param config: :class:`PolicyConfig` (``policy``: the zip's path)
    :param module: an already loaded policy (a :class:`metagate.policies.sb3.TeacherWeightingPolicy`, or any
        module with ``mean_logits``/``distribution``) instead of ``policy``
    """

    config_class = PolicyConfig
    config: PolicyConfig

    def __init__(self, config: PolicyConfig | None = None, *, module: nn.Module | None = None,
                 **options: Any) -> None:
        Gate.__init__(self, config, **options)
        c = self.config
        if module is None:
            if c.policy is None:
                raise ConfigError("--gate policy needs --policy PATH (a zip from `metagate train-policy`)")
            module = load_sb3_policy(c.policy)
        # unset alpha/tau: the values the policy was trained with
        alpha = float(getattr(module, "label_alpha", 0.5)) if c.alpha is None else c.alpha
        tau = float(getattr(module, "kd_tau", 4.0)) if c.tau is None else c.tau
        super().__init__(type(c)(**{**vars(c), "alpha": alpha, "tau": tau}), c.online)
        self.policy = module
        self.temperature = float(getattr(module, "weight_temperature", 0.25))
        self.policy.train(c.online)

    def _weights_from_action(self, action: Tensor) -> Tensor:
        return self._softmax_weights(action)

    def setup(self, run: GateContext) -> None:
        super().setup(run)
        self.policy.train(self.learn)

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "policy_temperature": self.temperature}
