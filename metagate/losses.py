"""Per-unit losses and the one weighted reduction (DESIGN.md, "The one equation").

Every loss here is *unweighted and unreduced*: it returns one value per unit.
The gate decides the mix; :func:`reduce_weighted` applies it.

The public functions validate their inputs (shapes, label range, non-finite logits, ``tau <= 0``,
negative or NaN weights) and raise :class:`~metagate.errors.InputError` naming the argument.
The shared loop, which has checked its data once, passes ``validate=False`` on its hot path.

Shapes: ``N`` units, ``K`` teachers, ``C`` classes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from metagate.checks import check_finite, check_labels, check_teacher_shape
from metagate.errors import InputError

__all__ = ["ce_per_unit", "kd_per_unit", "unit_losses", "reduce_weighted", "check_weights"]


def _check_student(student_logits: Tensor, labels: Tensor) -> None:
    if not torch.is_tensor(student_logits) or student_logits.ndim != 2 or not student_logits.is_floating_point():
        got = tuple(student_logits.shape) if torch.is_tensor(student_logits) else type(student_logits).__name__
        raise InputError(f"student_logits must be a floating [N, C] tensor, got {got}")
    check_finite("student_logits", student_logits)
    n, c = student_logits.shape
    if not torch.is_tensor(labels) or labels.shape != (n,):
        got = tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__
        raise InputError(f"labels must be [N] = [{n}] to match student_logits, got {got}")
    if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
        raise InputError(f"labels must be integer class ids, got dtype {labels.dtype}")
    check_labels(labels, c, "labels")


def _check_tau(tau: Tensor | float, n: int) -> None:
    if torch.is_tensor(tau):
        if tau.shape not in ((), (n,)):
            raise InputError(f"tau must be a scalar or [N] = [{n}], got shape {tuple(tau.shape)}")
        ok = bool(torch.isfinite(tau).all() and (tau > 0).all())
    else:
        ok = isinstance(tau, (int, float)) and not isinstance(tau, bool) and math.isfinite(tau) and tau > 0
    if not ok:
        raise InputError(f"tau must be finite and > 0, got {tau!r}")


def _check_teachers(student_logits: Tensor, teacher_logits: Tensor | None, teacher_log_probs: Tensor | None) -> None:
    if teacher_logits is not None:
        check_teacher_shape(student_logits, teacher_logits)
        check_finite("teacher_logits", teacher_logits)
    if teacher_log_probs is not None:
        check_teacher_shape(student_logits, teacher_log_probs)
        if torch.isnan(teacher_log_probs).any() or (teacher_log_probs > 0).any():
            raise InputError("teacher_log_probs must be log-probabilities (<= 0, no NaN)")


def ce_per_unit(student_logits: Tensor, labels: Tensor, validate: bool = True) -> Tensor:
    """Cross-entropy of each unit against its label.

    :param student_logits: ``[N, C]``
    :param labels: ``[N]`` integer class ids
    :return: ``[N]``
    """
    if validate:
        _check_student(student_logits, labels)
    return F.cross_entropy(student_logits, labels, reduction="none")


def _tempered_kd_reference(s: Tensor, t: Tensor, tau: Tensor) -> Tensor:
    """``tau**2 * KL(softmax(t/tau) || softmax(s/tau))`` ``[N, K]`` by plain autograd ops (tensor ``tau``)."""
    log_q = F.log_softmax(s / tau.reshape(-1, 1), dim=-1).unsqueeze(1)
    log_p = F.log_softmax(t / tau.reshape(-1, 1, 1), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(-1) * tau.reshape(-1, 1) ** 2


class TemperedKD(torch.autograd.Function):
    """:func:`_tempered_kd_reference` as one autograd node, its gradients in closed form (a learned or
    per-unit temperature changes every step, so the teacher side cannot come from the bank's cache; one node
    instead of a dozen is what keeps ``ctkd`` and ``temperature`` near fixed KD's step cost).

    With ``z_s = s/τ``, ``z_t = t/τ``, ``q = softmax(z_s)``, ``p = softmax(z_t)``, ``d = log p - log q`` and
    ``f = Σ_c p d`` (the KL): ``∂f/∂z_s = q - p``, ``∂f/∂z_t = p (d - f)``, ``∂z/∂τ = -z/τ``, hence
    ``∂(τ² f)/∂s = τ (q - p)`` and ``∂(τ² f)/∂τ = 2τ f - Σ_c [p (d - f) t + (q - p) s]``. The teacher
    logits get no gradient. A second derivative (``create_graph``) differentiates the reference formula.
    """

    @staticmethod
    def forward(ctx, s: Tensor, t: Tensor, tau: Tensor) -> Tensor:  # type: ignore[override]
        tau_s = tau.reshape(-1, 1)
        log_q = F.log_softmax(s / tau_s, dim=-1)
        log_p = F.log_softmax(t / tau.reshape(-1, 1, 1), dim=-1)
        p = log_p.exp()
        d = log_p - log_q.unsqueeze(1)
        f = (p * d).sum(-1)
        ctx.save_for_backward(s, t, tau, log_q, p, d, f)
        return f * tau_s**2

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, None, Tensor | None]:  # type: ignore[override]
        s, t, tau, log_q, p, d, f = ctx.saved_tensors
        need_s, need_t, need_tau = ctx.needs_input_grad
        if need_t:
            raise RuntimeError("TemperedKD gives no gradient to the teacher logits")
        if torch.is_grad_enabled():  # create_graph: the closed form's saved parts carry no graph
            with torch.enable_grad():
                inputs = [x for x, need in ((s, need_s), (tau, need_tau)) if need]
                grads = iter(torch.autograd.grad(_tempered_kd_reference(s, t, tau), inputs, g, create_graph=True))
            return (next(grads) if need_s else None), None, (next(grads) if need_tau else None)
        tau_s = tau.reshape(-1, 1)
        q = log_q.exp()
        gs = gtau = None
        if need_s:
            gs = tau_s * (g.sum(1, keepdim=True) * q - (g.unsqueeze(-1) * p).sum(1))
        if need_tau:
            a = (p * (d - f.unsqueeze(-1)) * t).sum(-1)
            b = (q * s).sum(-1, keepdim=True) - (p * s.unsqueeze(1)).sum(-1)
            gtau = (g * (2.0 * tau_s * f - a - b)).sum(1)
            gtau = gtau.sum() if tau.ndim == 0 else gtau
        return gs, None, gtau


def kd_per_unit(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    tau: Tensor | float = 1.0,
    teacher_log_probs: Tensor | None = None,
    validate: bool = True,
    student_tau: float | None = None,
    student_log_probs: Tensor | None = None,
) -> Tensor:
    """``tau**2 * KL(softmax(t/tau) || softmax(s/tau))`` for every unit and teacher.

    With ``student_tau`` set, the student sits at its own temperature instead:
    ``student_tau**2 * KL(softmax(t/tau) || softmax(s/student_tau))`` (``student_tau=1``: the student at
    ``tau = 1`` against the tempered teacher, no rescaling -- HKD's form).

    The teacher distribution is the *target*, the student's log-probabilities the
    *input* (``F.kl_div(input=log q_s, target=log p_t, log_target=True)``).

    :param student_logits: ``[N, C]``
    :param teacher_logits: ``[N, K, C]``
    :param tau: scalar or ``[N]`` per-unit temperature
    :param teacher_log_probs: optional precomputed ``log_softmax(teacher_logits / tau)`` ``[N, K, C]``
        (the teacher bank caches it per temperature)
    :param student_tau: ``None``: the student at ``tau`` as well; else a positive number
    :param student_log_probs: optional precomputed ``log_softmax(student_logits)``, reused when
        ``student_tau == 1``
    :return: ``[N, K]``
    """
    if validate:
        if not torch.is_tensor(student_logits) or student_logits.ndim != 2:
            raise InputError(f"student_logits must be [N, C], got {getattr(student_logits, 'shape', student_logits)}")
        check_finite("student_logits", student_logits)
        if teacher_logits is None and teacher_log_probs is None:
            raise InputError("kd_per_unit needs teacher_logits or teacher_log_probs")
        _check_teachers(student_logits, teacher_logits, teacher_log_probs)
        _check_tau(tau, student_logits.shape[0])
        if student_tau is not None:
            _check_tau(student_tau, student_logits.shape[0])
    if student_tau is not None:
        if teacher_log_probs is None:
            assert teacher_logits is not None
            tau_t = tau.to(teacher_logits.dtype).reshape(-1, 1, 1) if torch.is_tensor(tau) else float(tau)
            teacher_log_probs = F.log_softmax(teacher_logits / tau_t, dim=-1)
        st = float(student_tau)
        if st == 1.0:
            log_q = student_log_probs if student_log_probs is not None else F.log_softmax(student_logits, -1)
        else:
            log_q = F.log_softmax(student_logits / st, dim=-1)
        log_p = teacher_log_probs
        kl = (log_p.exp() * (log_p - log_q.unsqueeze(1))).sum(-1)
        return kl if st == 1.0 else kl * st**2
    if torch.is_tensor(tau) and teacher_log_probs is None and teacher_logits is not None \
            and not teacher_logits.requires_grad:
        # a tensor temperature (learned, or per unit): the teacher side is recomputed anyway; one fused node
        return TemperedKD.apply(student_logits, teacher_logits, tau.to(student_logits.dtype))
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
    validate: bool = True,
    student_tau: float | None = None,
) -> Tensor:
    """All loss columns of DESIGN.md: ``[N, 1+K]``, column 0 = CE to the label.

    :param student_logits: ``[N, C]``
    :param teacher_logits: ``[N, K, C]`` or ``None`` (then ``K = 0``)
    :param labels: ``[N]``
    :param tau: scalar or ``[N]``
    :param teacher_log_probs: optional precomputed teacher log-probabilities at ``tau``
    :param student_log_probs: optional precomputed ``log_softmax(student_logits)`` (with graph) for CE
    :param validate: check the inputs (``False``: the caller has, e.g. the shared loop's hot path)
    :param student_tau: the student's temperature in the KD columns (``None``: ``tau``; see
        :func:`kd_per_unit`)
    :raises InputError: bad shapes, labels out of range, NaN/inf logits, ``tau <= 0``
    """
    if validate:
        _check_student(student_logits, labels)
        _check_teachers(student_logits, teacher_logits, teacher_log_probs)
        if teacher_logits is not None or teacher_log_probs is not None:
            _check_tau(tau, student_logits.shape[0])
            if student_tau is not None:
                _check_tau(student_tau, student_logits.shape[0])
        if student_log_probs is not None and student_log_probs.shape != student_logits.shape:
            raise InputError(f"student_log_probs must be [N, C] = {tuple(student_logits.shape)}, got "
                             f"{tuple(student_log_probs.shape)}")
    if student_log_probs is not None:
        ce = F.nll_loss(student_log_probs, labels, reduction="none").unsqueeze(1)
    else:
        ce = ce_per_unit(student_logits, labels, validate=False).unsqueeze(1)
    if teacher_log_probs is None and (teacher_logits is None or teacher_logits.shape[1] == 0):
        return ce
    kd = kd_per_unit(student_logits, teacher_logits, tau, teacher_log_probs, validate=False,
                     student_tau=student_tau, student_log_probs=student_log_probs)
    return torch.cat([ce, kd], dim=1)


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
    validate: bool = True,
) -> Tensor:
    """``sum_i m_i sum_j w_ij l_ij / sum_i m_i`` (the one equation).

    :param losses: ``[N, J]`` unreduced loss columns
    :param weights: ``[N, J]`` or broadcastable (e.g. ``[J]``)
    :param mask: ``[N]`` of 0/1 (padding), or ``None`` for all ones
    :param reduction: ``mean`` (over unmasked units), ``sum`` or ``none`` (``[N]``)
    :param validate: check shapes, weights (finite, >= 0) and mask (``False``: the caller has)
    """
    if validate:
        if not torch.is_tensor(losses) or losses.ndim != 2:
            raise InputError(f"losses must be [N, J] loss columns, got {getattr(losses, 'shape', losses)}")
        if torch.isnan(losses).any():
            raise InputError("losses contain NaN")
        if not torch.is_tensor(weights):
            raise InputError(f"weights must be a tensor, got {type(weights).__name__}")
        try:
            torch.broadcast_shapes(losses.shape, weights.shape)
        except RuntimeError:
            raise InputError(f"weights of shape {tuple(weights.shape)} do not broadcast to the losses' "
                             f"{tuple(losses.shape)}") from None
        check_weights(weights)
        if mask is not None:
            if mask.shape != (losses.shape[0],):
                raise InputError(f"mask must be [N] = [{losses.shape[0]}], got {tuple(mask.shape)}")
            if not torch.isfinite(mask.float()).all() or (mask < 0).any():
                raise InputError("mask must hold finite values >= 0 (0/1 padding mask)")
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
