"""Plain ``nn.Module`` policies and the REINFORCE learner used in the distillation loop
(no stable-baselines3 needed at run time).
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from metagate.errors import ConfigError
from metagate.features import NUM_FEATURES
from metagate.policies.core import TeacherGaussian, TeacherLogitHead, action_weights, selection_weights

MODES = ("weights", "select")


class BernoulliSelection:
    """Independent Bernoulli selection of every (unit, teacher) pair.

    :param logits: ``[..., B, K]`` selection logits
    """

    def __init__(self, logits: Tensor) -> None:
        self.logits = logits

    def sample(self, shared_noise: Tensor | None = None) -> Tensor:
        with torch.no_grad():
            return torch.bernoulli(torch.sigmoid(self.logits))

    def mode(self) -> Tensor:
        return (self.logits > 0).to(self.logits.dtype)

    def log_prob(self, actions: Tensor) -> Tensor:
        """Summed over units and teachers: ``[...]``."""
        a = actions.reshape(self.logits.shape)
        lp = -nn.functional.binary_cross_entropy_with_logits(self.logits, a, reduction="none")
        return lp.sum((-1, -2))

    def units(self, start: int, stop: int) -> BernoulliSelection:
        """The distribution of units ``start:stop``."""
        return BernoulliSelection(self.logits[..., start:stop, :])

    def entropy(self) -> Tensor:
        p = torch.sigmoid(self.logits)
        return nn.functional.binary_cross_entropy_with_logits(self.logits, p, reduction="none").sum((-1, -2))


class StochasticTeacherPolicy(Protocol):
    """Anything the REINFORCE learner can train: ``distribution(features)`` with ``sample/log_prob``."""

    def distribution(self, features: Tensor) -> Any: ...

    def parameters(self) -> Any: ...


class ReinforcePolicy(nn.Module):
    """The equivariant teacher encoder as a plain policy.

    ``weights`` mode: a Gaussian over teacher logits (as the SB3 policy), mapped to
    ``softmax(clip(a, -1, 1) / temperature)`` inside the KD share. ``select`` mode: an independent
    Bernoulli per unit and teacher; selected teachers share the KD weight equally.

    :param mode: ``weights`` or ``select``
    :param hidden: encoder width
    :param temperature: softmax temperature of the weights mode
    :param log_std: per-unit log-std of the weights mode (learned; ``None``: off)
    :param shared_log_std: log-std of per-teacher noise shared by the batch's units (``None``: off)
    """

    def __init__(self, mode: str = "weights", num_features: int = NUM_FEATURES, hidden: int = 16,
                 temperature: float = 0.25, log_std: float | None = None, shared_log_std: float | None = -0.5) -> None:
        super().__init__()
        if mode not in MODES:
            raise ConfigError(f"policy mode must be one of {MODES}, got {mode!r}")
        if not temperature > 0:
            raise ConfigError(f"policy temperature must be > 0, got {temperature}")
        self.mode, self.temperature = mode, float(temperature)
        self.net = TeacherLogitHead(num_features, hidden, bounded=(mode == "weights"))
        if mode == "select":
            nn.init.constant_(self.net.head.bias, 1.0)  # start by selecting most teachers (p ~ 0.73)
        if mode == "weights" and log_std is None and shared_log_std is None:
            raise ConfigError("the weights policy needs per-unit or shared exploration noise")
        self.unit_log_std = nn.Parameter(torch.tensor(float(log_std))) if log_std is not None else None
        self.shared_log_std = nn.Parameter(torch.tensor(float(shared_log_std))) if shared_log_std is not None \
            else None

    def mean_logits(self, features: Tensor) -> Tensor:
        """``[..., B, K]`` logits for features ``[..., B, K, F]``."""
        return self.net(features)

    def distribution(self, features: Tensor) -> TeacherGaussian | BernoulliSelection:
        logits = self.mean_logits(features)
        if self.mode == "select":
            return BernoulliSelection(logits)
        return TeacherGaussian(logits, self.unit_log_std, self.shared_log_std)

    def gate_weights(self, action: Tensor, alpha: float) -> Tensor:
        """Action ``[N, K]`` -> ``W [N, 1+K]`` with label weight ``alpha``."""
        if self.mode == "select":
            return selection_weights(action, alpha)
        return action_weights(action, alpha, self.temperature)


def fused_adam(params: list[nn.Parameter], lr: float) -> torch.optim.Adam:
    """Adam, fused into one kernel where the parameters allow it (the policy's ten small tensors: one kernel
    instead of one per tensor; fused Adam skips version counters, see the caller)."""
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except RuntimeError:  # e.g. a device without a fused kernel
        return torch.optim.Adam(params, lr=lr, foreach=True)


class ReinforceLearner:
    """REINFORCE over episodes of recorded decisions.

    :meth:`record` stores (features, action) pairs; :meth:`finish` closes an episode with its scalar
    reward. Plain mode: advantage ``(R - b) / s`` with ``b``, ``s^2`` moving mean and variance of the
    rewards, one optimizer step on ``-advantage * log pi(episode)``. ``antithetic`` mode: episodes come
    in pairs whose exploration noise is mirrored (the caller negates it); the pair's mean reward is the
    baseline of both (it cancels the drift of the reward over training), scaled by a moving average of
    ``|R1 - R2|``; one step per pair. The moving-average baseline is tracked in both modes.

    :param policy: a policy with ``distribution(features)``
    :param lr: Adam learning rate
    :param baseline_decay: moving-average decay of the baseline
    :param antithetic: paired episodes with mirrored noise
    :param entropy_coef: entropy bonus
    """

    def __init__(self, policy: StochasticTeacherPolicy, lr: float = 3e-3, baseline_decay: float = 0.9,
                 antithetic: bool = False, entropy_coef: float = 0.0, params: list[nn.Parameter] | None = None) -> None:
        if not lr > 0:
            raise ConfigError(f"REINFORCE learning rate must be > 0, got {lr}")
        if not 0.0 <= baseline_decay < 1.0:
            raise ConfigError(f"baseline decay must be in [0, 1), got {baseline_decay}")
        self.policy = policy
        self.params = list(params) if params is not None else [p for p in policy.parameters() if p.requires_grad]
        self.optimizer = fused_adam(self.params, lr)
        self.decay, self.entropy_coef, self.antithetic = float(baseline_decay), float(entropy_coef), bool(antithetic)
        self.baseline: float | None = None
        self.reward_var = 0.0
        self.episodes = 0
        self.buffer: list[tuple[Tensor, Tensor]] = []
        self._pending: tuple[float, list[tuple[Tensor, Tensor]]] | None = None

    @property
    def first_of_pair(self) -> bool:
        """In antithetic mode: the next episode opens a pair (draw fresh noise; else mirror it)."""
        return self._pending is None

    def record(self, features: Tensor, action: Tensor) -> None:
        self.buffer.append((features.detach(), action.detach()))

    def _episode_logp(self, buffer: list[tuple[Tensor, Tensor]]) -> tuple[Tensor, Tensor]:
        return self._episodes_logp([buffer])[0]

    def _episodes_logp(self, buffers: list[list[tuple[Tensor, Tensor]]]) -> list[tuple[Tensor, Tensor]]:
        """Per episode ``(log pi / steps, entropy / steps)``; one policy forward for all of them when the
        distribution can be split along the unit axis (``units(start, stop)``)."""
        feats = torch.cat([f for buf in buffers for f, _ in buf], -3)
        dist = self.policy.distribution(feats)
        out, start = [], 0
        for buf in buffers:
            n = sum(int(f.shape[-3]) for f, _ in buf)
            if len(buffers) == 1:
                sub = dist
            elif hasattr(dist, "units"):
                sub = dist.units(start, start + n)
            else:
                sub = self.policy.distribution(torch.cat([f for f, _ in buf], -3))
            start += n
            acts = torch.cat([a for _, a in buf], -2)
            out.append((sub.log_prob(acts) / len(buf), sub.entropy() / len(buf)))
        return out

    def surrogate(self, advantage: float, buffer: list[tuple[Tensor, Tensor]] | None = None) -> Tensor:
        """``-advantage * log pi(episode) / steps`` (minus the entropy bonus).

        The episode's decisions are one joint sample (the per-teacher exploration noise is held over
        the episode), so their units are concatenated along the unit axis before scoring.
        """
        logp, ent = self._episode_logp(self.buffer if buffer is None else buffer)
        return -advantage * logp - self.entropy_coef * ent

    def _step(self, loss: Tensor) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        if self.optimizer.defaults.get("fused"):  # fused kernels leave version counters alone; caches key on them
            torch.autograd.graph.increment_version(self.params)

    def finish(self, reward: float) -> dict[str, float]:
        """Close the episode with ``reward``; update the policy when the advantage is defined."""
        stats = {"reward": float(reward)}
        buffer, self.buffer = self.buffer, []
        if not math.isfinite(reward) or not buffer:
            self._pending = None
            return stats
        if self.baseline is None:
            self.baseline = float(reward)
        delta = reward - self.baseline
        if self.antithetic:
            if self._pending is None:
                self._pending = (float(reward), buffer)
            else:
                r1, buf1 = self._pending
                self._pending = None
                half = 0.5 * (r1 - reward)
                self.reward_var = self.decay * self.reward_var + (1 - self.decay) * half * half \
                    if self.episodes > 2 else half * half
                adv = max(-5.0, min(5.0, half / math.sqrt(self.reward_var + 1e-12)))
                if half != 0:  # both episodes of the pair scored in one forward
                    (lp1, ent1), (lp2, ent2) = self._episodes_logp([buf1, buffer])
                    self._step(-adv * (lp1 - lp2) - self.entropy_coef * (ent1 + ent2))
                stats["advantage"] = float(adv)
        else:
            adv = delta / math.sqrt(self.reward_var + 1e-12) if self.reward_var > 0 else 0.0
            adv = max(-5.0, min(5.0, adv))
            if adv != 0:
                self._step(self.surrogate(adv, buffer))
            self.reward_var = self.decay * self.reward_var + (1 - self.decay) * delta * delta
            stats["advantage"] = float(adv)
        self.baseline = self.decay * self.baseline + (1 - self.decay) * reward
        stats["baseline"] = float(self.baseline)
        self.episodes += 1
        return stats

    def episode_units(self, buffer: list[tuple[Tensor, Tensor]] | None = None) -> tuple[Tensor, Tensor]:
        """The recorded decisions of an episode, its units concatenated: ``(features [n, ...], actions [n, ...])``."""
        buf = self.buffer if buffer is None else buffer
        return torch.cat([f for f, _ in buf], -3), torch.cat([a for _, a in buf], -2)

    def finish_units(self, reward: float, unit_rewards: Tensor) -> dict[str, float]:
        """Close the episode with a reward per recorded unit (``unit_rewards [n]``, summing to ``reward``).

        Each unit's advantage is ``n (r_i - b / n) / s`` (``b``, ``s^2``: moving mean and variance of the
        episode rewards, as in plain mode; clipped to ``[-5, 5]``), and the step is on
        ``-sum_i A_i log pi(a_i | s_i) / steps``: with equal rewards ``r_i = R / n`` this is plain mode's step.
        Needs a policy whose distribution has :meth:`~metagate.policies.core.TeacherGaussian.unit_log_prob`
        (per-unit noise only); not antithetic.
        """
        stats = {"reward": float(reward)}
        buffer, self.buffer = self.buffer, []
        if not math.isfinite(reward) or not buffer or not bool(torch.isfinite(unit_rewards).all()):
            return stats
        if self.baseline is None:
            self.baseline = float(reward)
        feats, acts = self.episode_units(buffer)
        n = int(unit_rewards.numel())
        if n != feats.shape[-3]:
            raise ValueError(f"{n} unit rewards for {feats.shape[-3]} recorded units")
        delta = reward - self.baseline
        if self.reward_var > 0:
            adv = ((unit_rewards.to(feats) - self.baseline / n) * (n / math.sqrt(self.reward_var + 1e-12)))
            adv = adv.clamp(-5.0, 5.0)
            dist = self.policy.distribution(feats)
            lp = dist.unit_log_prob(acts)  # [n]
            self._step(-(adv.detach() * lp).sum() / len(buffer) - self.entropy_coef * dist.entropy() / len(buffer))
            stats["advantage"] = float(adv.mean())
            stats["advantage_spread"] = float(adv.std()) if n > 1 else 0.0
        self.reward_var = self.decay * self.reward_var + (1 - self.decay) * delta * delta
        self.baseline = self.decay * self.baseline + (1 - self.decay) * reward
        stats["baseline"] = float(self.baseline)
        self.episodes += 1
        return stats

    def state_dict(self) -> dict[str, Any]:
        """Optimizer, reward statistics and the open episodes' recorded decisions (tensors and numbers only)."""
        pending = None if self._pending is None else {"reward": self._pending[0], "buffer": self._pending[1]}
        return {"optimizer": self.optimizer.state_dict(),
                "baseline": float("nan") if self.baseline is None else self.baseline,
                "reward_var": self.reward_var, "episodes": self.episodes,
                "buffer": list(self.buffer), "pending": pending}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        b = float(state["baseline"])
        self.baseline = None if math.isnan(b) else b
        self.reward_var, self.episodes = float(state["reward_var"]), int(state["episodes"])
        dev = self.params[0].device if self.params else torch.device("cpu")
        self.buffer = [(f.to(dev), a.to(dev)) for f, a in state.get("buffer", [])]
        pending = state.get("pending")
        self._pending = None if pending is None else (
            float(pending["reward"]), [(f.to(dev), a.to(dev)) for f, a in pending["buffer"]])
