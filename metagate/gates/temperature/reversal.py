"""Learnable distillation temperatures (CTKD, Li et al., AAAI 2023): the gradient-reversal layer, its
cosine curriculum, and the global and per-instance temperature modules.

Facts from the official code (zhengli97/CTKD): the temperature is ``T = 1 + 20 * sigmoid(theta)`` with
``theta`` initialised to 1 (``T ~ 15.6`` at the start); ``theta`` is trained by the student's own SGD
(same learning rate, momentum and weight decay) through a gradient-reversal layer, so it *ascends* the KD
loss while the student descends it; the reversal strength ``lambda`` follows a cosine curriculum from 0 to
1 over the first 10 of 240 epochs and stays at 1 after. The official code ships only the global
temperature; :class:`InstanceTemperature` is the paper's per-instance variant (a small net over the
instance's logits), written here from the paper's description.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from metagate.errors import ConfigError, InputError

__all__ = ["CTKD_T_MIN", "CTKD_T_MAX", "CTKD_THETA_INIT", "GradientReversal", "grad_reverse", "cosine_curriculum",
           "check_range", "check_temperature", "range_temperature", "GlobalTemperature", "InstanceTemperature"]

CTKD_T_MIN, CTKD_T_MAX, CTKD_THETA_INIT = 1.0, 21.0, 1.0  # T = 1 + 20 sigmoid(theta), theta_0 = 1


class GradientReversal(torch.autograd.Function):
    """Identity forward; backward multiplies the incoming gradient by ``-lambda`` (Ganin & Lempitsky 2015)."""

    @staticmethod
    def forward(ctx: torch.autograd.function.FunctionCtx, x: Tensor, lam: float) -> Tensor:
        ctx.lam = float(lam)  # type: ignore[attr-defined]
        return x.view_as(x)

    @staticmethod
    def backward(ctx: torch.autograd.function.FunctionCtx, grad: Tensor) -> tuple[Tensor, None]:
        return grad * -ctx.lam, None  # type: ignore[attr-defined]


def grad_reverse(x: Tensor, lam: float) -> Tensor:
    """:class:`GradientReversal` applied to ``x`` with strength ``lam``."""
    return GradientReversal.apply(x, lam)  # type: ignore[no-any-return]


def cosine_curriculum(epoch: float, epochs: float, start: float = 0.0, end: float = 1.0) -> float:
    """CTKD's reversal strength: ``start + (end - start) * (1 - cos(pi * epoch / epochs)) / 2`` for
    ``epoch < epochs``, ``end`` after (and always when ``epochs == 0``).

    The official code evaluates it at the 1-based epoch number before each epoch (so its first epoch
    already has ``lambda = 0.024`` with 10 curriculum epochs); pass ``trainer.epoch + 1`` to match.
    """
    if epochs < 0:
        raise ConfigError(f"--ctkd-curriculum-epochs must be >= 0, got {epochs}")
    if epochs == 0 or epoch >= epochs:
        return float(end)
    e = max(0.0, float(epoch))
    return float(start + (end - start) * 0.5 * (1.0 - math.cos(math.pi * e / epochs)))


def check_range(t_min: float, t_max: float, flags: tuple[str, str]) -> None:
    """A temperature range must satisfy ``0 < t_min < t_max < inf`` (``flags`` name the two options)."""
    if not (math.isfinite(t_min) and t_min > 0):
        raise ConfigError(f"{flags[0]} must be > 0, got {t_min}")
    if not (math.isfinite(t_max) and t_max > t_min):
        raise ConfigError(f"{flags[1]} must be > {flags[0]} ({t_min}), got {t_max}")


def check_temperature(gate: str, tau: Tensor) -> None:
    """A NaN/inf temperature stops the run with an :class:`InputError` naming the gate."""
    if not bool(torch.isfinite(tau.detach()).all()):
        raise InputError(f"gate {gate!r}: the KD temperature became NaN or inf (the last checkpoint holds the "
                         "state before it; lower --lr or narrow the temperature range)")


def range_temperature(z: Tensor, t_min: float, t_max: float) -> Tensor:
    """``t_min + (t_max - t_min) * sigmoid(z)``: any real ``z`` to a temperature in ``(t_min, t_max)``."""
    return torch.sigmoid(z) * (t_max - t_min) + t_min


def _logit(p: float) -> float:
    p = min(max(p, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


class GlobalTemperature(nn.Module):
    """One learnable temperature ``T = t_min + (t_max - t_min) sigmoid(theta)`` behind a reversal layer.

    :param t_min: lower end of the range (> 0)
    :param t_max: upper end (> t_min)
    :param theta_init: initial ``theta`` (the official code's 1.0 gives ``T = 15.62`` in ``(1, 21)``)
    """

    def __init__(self, t_min: float = CTKD_T_MIN, t_max: float = CTKD_T_MAX,
                 theta_init: float = CTKD_THETA_INIT) -> None:
        super().__init__()
        check_range(t_min, t_max, ("--ctkd-t-min", "--ctkd-t-max"))
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.theta = nn.Parameter(torch.tensor(float(theta_init)))

    def forward(self, lam: float) -> Tensor:
        """The temperature (a 0-dim tensor whose gradient reaches ``theta`` reversed and scaled by ``lam``)."""
        return range_temperature(grad_reverse(self.theta, lam), self.t_min, self.t_max)


class InstanceTemperature(nn.Module):
    """Per-instance learnable temperature: a two-layer net over the instance's logits.

    Input: the instance's predictions, the student's probabilities and the teachers' mean probability
    (``2C`` numbers in ``[0, 1]``, where raw logits' scale varies by model and instance; both detached: the
    net learns through its own output only, never by moving the student),
    output ``T_i = t_min + (t_max - t_min) sigmoid(z_i)`` behind a reversal layer. The output layer starts
    at zero weights and the bias of the global module, so the net starts as the global temperature.

    :param num_classes: ``C``
    :param hidden: hidden width
    """

    def __init__(self, num_classes: int, hidden: int = 64, t_min: float = CTKD_T_MIN, t_max: float = CTKD_T_MAX,
                 theta_init: float = CTKD_THETA_INIT) -> None:
        super().__init__()
        check_range(t_min, t_max, ("--ctkd-t-min", "--ctkd-t-max"))
        if num_classes < 2 or hidden < 1:
            raise ConfigError(f"instance temperature net needs >= 2 classes and hidden >= 1, got {num_classes}, "
                              f"{hidden}")
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.net = nn.Sequential(nn.Linear(2 * num_classes, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        nn.init.zeros_(self.net[2].weight)
        nn.init.constant_(self.net[2].bias, float(theta_init))

    def forward(self, student_log_probs: Tensor, teacher_log_probs: Tensor, lam: float) -> Tensor:
        """:param student_log_probs: ``[N, C]``; :param teacher_log_probs: ``[N, K, C]``. :return: ``[N]``."""
        x = torch.cat([student_log_probs.detach().exp(), teacher_log_probs.detach().exp().mean(1)], -1)
        z = self.net(x.to(self.net[0].weight.dtype)).squeeze(-1)
        return range_temperature(grad_reverse(z, lam), self.t_min, self.t_max)
