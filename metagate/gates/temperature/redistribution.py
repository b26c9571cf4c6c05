"""Reward redistribution for the ``temperature`` gate (ITKD, Zhang et al. 2024; issue #14): the delayed
reward of an episode is split into per-unit rewards by a model of the return.

What ITKD's official code does (github Zhengbo-Zhang/ITKD, read, not copied):

* ``utils/trainer.py`` (``training_step``, ``train_agent``): the units of a batch are the time steps of the
  agent's episode, 64 of them per buffer (``is_update``); every step's reward is 0 but the last one's, which
  is the change of the student's *training-batch* accuracy between the last two steps (``self.acc[-1] -
  self.acc[-2]``, scaled by an epoch-dependent cosine factor of 10, 5 or 2), or in ``train_agent``
  ``-log(KL + CE)`` of the batch.
* ``utils/rl/agents/utils/ppo_utils.py`` (``ReplayBufferPPO.finish_path``): the regression targets are the
  discounted rewards-to-go ``ret_buf`` of that sparse sequence (gamma 0.99, bootstrapped by the critic).
* ``utils/rl/utils.py`` (``RewardRedistribution``): the model regresses the return on each unit's
  *observation and action* concatenated, ``[s_top1, t_top1, s_top1 - s_top2, T]``, through
  ``Linear(4, 16) -> Identity -> Linear(16, 1)`` (the LSTM of RUDDER is commented out, so the model is
  linear in its input and sees one unit at a time); ``lossfunction_rew`` squares the *mean* error of the
  last position plus half that of all positions (``torch.mean(pred - ret) ** 2``), and ``train_rew`` takes
  9 Adam steps (lr 1e-3) per buffer.
* ``utils/trainer.py`` (``get_prediction``): the per-unit rewards are the differences of consecutive
  predictions, ``r_0 = ret_0``, ``r_t = g_t - g_{t-1}``, plus the prediction error ``(ret - sum r) / n``
  spread equally over the positions (computed twice, the second copy overwriting the first); those
  rewards replace the buffer's before GAE and the PPO update. A "critical state detector" (a sigmoid
  linear mask over the observations, L1-sparse) also multiplies the stored observations; it is not
  taken here.

What this module does with those facts (our code): a batch's units are not a sequence (they act at once
and the reward comes after the whole episode), so instead of differences of a sequence model's predictions
the return is *decomposed* over the units, ``R_e ~ c + sum_i g(s_i, a_i)``: ``g`` takes ITKD's inputs (the
three ITKD state features, :data:`~metagate.gates.temperature.policy.ITKD_FEATURES`, and the action) and is
linear in them as in ITKD, plus the action times each state feature (without that product a linear ``g``
gives every unit the same credit per unit of action, whatever its state): 7 coefficients. It is fitted in closed form (ridge
regression on standardised per-episode sums of the features, intercept ``c`` not penalised) on the last
``window`` episodes, instead of a few Adam steps on squared mean errors. The per-unit rewards keep ITKD's
rule: the model's share of each unit plus the prediction error spread equally,
``r_i = g_i + (R - sum_j g_j) / n``, so they sum to the episode's reward exactly; before ``min_episodes``
episodes have been seen every unit gets ``R / n`` (the episode reward, spread).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["ReturnDecomposition", "unit_features"]


def unit_features(state: Tensor, action: Tensor) -> Tensor:
    """``[n, 2S + 1]``: the state ``[n, S]``, the action ``[n]`` and the action times each state feature."""
    s = state.reshape(state.shape[0], -1).float()
    a = action.reshape(-1, 1).float()
    return torch.cat([s, a, a * s], 1)


class ReturnDecomposition:
    """A linear model of the episode return as a sum over its units (see the module's docstring).

    :param num_state: state features per unit ``S``
    :param window: episodes the model is fitted on (the most recent ones)
    :param ridge: L2 penalty on the standardised coefficients
    :param min_episodes: episodes before the model is used (default: twice the number of coefficients, at
        least 8, at most ``window``)
    """

    def __init__(self, num_state: int, window: int = 64, ridge: float = 1e-3, min_episodes: int | None = None) -> None:
        if window < 2:
            raise ValueError(f"the redistribution window must be >= 2 episodes, got {window}")
        self.num_state, self.window, self.ridge = int(num_state), int(window), float(ridge)
        self.dim = 2 * self.num_state + 1
        self.min_episodes = min(max(8, 2 * self.dim), self.window) if min_episodes is None else int(min_episodes)
        self.sums: list[Tensor] = []  # per episode: the sum of its units' features [D]
        self.returns: list[float] = []
        self.coef: Tensor | None = None  # [D] per-unit coefficients (None: not fitted)
        self.intercept = 0.0
        self.r2 = float("nan")

    @property
    def fitted(self) -> bool:
        return self.coef is not None

    def add(self, state: Tensor, action: Tensor, ret: float) -> None:
        """Record an episode (its units' states ``[n, ...S]`` and actions ``[n]``, its return) and refit."""
        self.sums.append(unit_features(state, action).sum(0).double().cpu())
        self.returns.append(float(ret))
        if len(self.sums) > self.window:
            del self.sums[0], self.returns[0]
        if len(self.sums) >= self.min_episodes:
            self.fit()

    def fit(self) -> None:
        """Ridge regression of the returns on the episodes' feature sums (standardised; intercept free)."""
        x = torch.stack(self.sums)  # [E, D]
        y = torch.tensor(self.returns, dtype=torch.float64)
        mx, my = x.mean(0), y.mean()
        sx = x.std(0, unbiased=False)
        sx = torch.where(sx > 1e-12, sx, torch.ones_like(sx))  # a constant column carries no information
        z = (x - mx) / sx
        gram = z.T @ z + self.ridge * len(y) * torch.eye(self.dim, dtype=torch.float64)
        beta = torch.linalg.solve(gram, z.T @ (y - my))
        self.coef = beta / sx
        self.intercept = float(my - mx @ self.coef)
        pred = x @ self.coef + self.intercept
        var = float(((y - my) ** 2).sum())
        self.r2 = 1.0 - float(((y - pred) ** 2).sum()) / var if var > 0 else float("nan")

    def predict_units(self, state: Tensor, action: Tensor) -> Tensor:
        """``g(s_i, a_i)`` of every unit ``[n]`` (zeros before the model is fitted)."""
        if self.coef is None:
            return torch.zeros(state.shape[0], dtype=torch.float32, device=state.device)
        return (unit_features(state, action).double() @ self.coef.to(state.device)).float()

    def redistribute(self, state: Tensor, action: Tensor, ret: float) -> Tensor:
        """Per-unit rewards ``[n]`` summing to ``ret``: ``g_i + (ret - sum_j g_j) / n`` (ITKD's correction)."""
        g = self.predict_units(state, action)
        return g + (float(ret) - float(g.double().sum())) / g.shape[0]

    def state_dict(self) -> dict[str, Any]:
        return {"sums": torch.stack(self.sums) if self.sums else torch.zeros(0, self.dim, dtype=torch.float64),
                "returns": torch.tensor(self.returns, dtype=torch.float64)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sums = [row.double().cpu() for row in state["sums"]]
        self.returns = [float(r) for r in state["returns"]]
        self.coef, self.intercept, self.r2 = None, 0.0, float("nan")
        if len(self.sums) >= self.min_episodes:
            self.fit()
