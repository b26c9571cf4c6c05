"""Per-unit losses and the one weighted reduction (DESIGN.md, "The one equation").

Every loss here is *unweighted and unreduced*: it returns one value per unit.
The gate decides the mix; :func:`reduce_weighted` applies it.

Shapes: ``N`` units, ``K`` teachers, ``C`` classes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from metagate.errors import InputError

__all__ = ["ce_per_unit", "kd_per_unit", "unit_losses", "reduce_weighted", "check_weights"]


def ce_per_unit(student_logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of each unit against its label.

    :param student_logits: ``[N, C]``
    :param labels: ``[N]`` integer class ids
    :return: ``[N]``
    """
    return F.cross_entropy(student_logits, labels, reduction="none")


def kd_per_unit(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    tau: Tensor | float = 1.0,
    teacher_log_probs: Tensor | None = None,
) -> Tensor:
    """``tau**2 * KL(softmax(t/tau) || softmax(s/tau))`` for every unit and teacher.

    The teacher distribution is the *target*, the student's log-probabilities the
    *input* (``F.kl_div(input=log q_s, target=log p_t, log_target=True)``).

    :param student_logits: ``[N, C]``
    :param teacher_logits: ``[N, K, C]``
    :param tau: scalar or ``[N]`` per-unit temperature
    :param teacher_log_probs: optional precomputed ``log_softmax(teacher_logits / tau)`` ``[N, K, C]``
        (the teacher bank caches it per temperature)
    :return: ``[N, K]``
    """
    if not torch.is_tensor(tau):  # python scalar: no tensor ops to build
        tau_s = tau_t = float(tau)
        scale: Tensor | float = float(tau) ** 2
    else:
        tau_u = tau.to(student_logits.dtype)
        tau_s = tau_u.reshape(-1, 1)
        tau_t = tau_u.reshape(-1, 1, 1)
        scale = tau_u.reshape(-1, 1) ** 2 if tau_u.ndim else tau_u**2
    log_q = F.log_softmax(student_logits / tau_s, dim=-1).unsqueeze(1)  # [N, 1, C]
    if teacher_log_probs is None:
        assert teacher_logits is not None
        teacher_log_probs = F.log_softmax(teacher_logits / tau_t, dim=-1)
    log_p = teacher_log_probs  # [N, K, C]
    kl = (log_p.exp() * (log_p - log_q)).sum(-1)  # [N, K]
    return kl * scale


def unit_losses(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor,
    tau: Tensor | float = 1.0,
    teacher_log_probs: Tensor | None = None,
    student_log_probs: Tensor | None = None,
) -> Tensor:
    """All loss columns of DESIGN.md: ``[N, 1+K]``, column 0 = CE to the label.

    :param student_logits: ``[N, C]``
    :param teacher_logits: ``[N, K, C]`` or ``None`` (then ``K = 0``)
    :param labels: ``[N]``
    :param tau: scalar or ``[N]``
    :param teacher_log_probs: optional precomputed teacher log-probabilities at ``tau``
    :param student_log_probs: optional precomputed ``log_softmax(student_logits)`` (with graph) for CE
    """
    if student_log_probs is not None:
        ce = F.nll_loss(student_log_probs, labels, reduction="none").unsqueeze(1)
    else:
        ce = ce_per_unit(student_logits, labels).unsqueeze(1)
    if teacher_log_probs is None and (teacher_logits is None or teacher_logits.shape[1] == 0):
        return ce
    return torch.cat([ce, kd_per_unit(student_logits, teacher_logits, tau, teacher_log_probs)], dim=1)


def check_weights(weights: Tensor) -> None:
    """Raise :class:`InputError` on negative or non-finite gate weights."""
    if not torch.isfinite(weights).all():
        raise InputError("gate weights contain NaN or inf")
    if (weights < 0).any():
        raise InputError(f"gate weights must be >= 0; min is {weights.min().item():.4g}")


def reduce_weighted(
    losses: Tensor,
    weights: Tensor,
    mask: Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """``sum_i m_i sum_j w_ij l_ij / sum_i m_i`` (the one equation).

    :param losses: ``[N, J]`` unreduced loss columns
    :param weights: ``[N, J]`` or broadcastable (e.g. ``[J]``)
    :param mask: ``[N]`` of 0/1 (padding), or ``None`` for all ones
    :param reduction: ``mean`` (over unmasked units), ``sum`` or ``none`` (``[N]``)
    """
    per_unit = (losses * weights).sum(-1)
    if mask is not None:
        per_unit = per_unit * mask.to(per_unit.dtype)
    if reduction == "none":
        return per_unit
    if reduction == "sum":
        return per_unit.sum()
    if reduction != "mean":
        raise ValueError(f"unknown reduction {reduction!r}; use mean, sum or none")
    if mask is None:
        return per_unit.sum() / max(per_unit.shape[0], 1)
    return per_unit.sum() / mask.sum().clamp_min(1).to(per_unit.dtype)
