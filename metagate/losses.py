"""Per-unit losses and the one weighted reduction (docs/design.md, "The one equation").

Every loss here is *unweighted and unreduced*: it returns one value per unit.
The gate decides the mix; :func:`reduce_weighted` applies it.

The public functions validate their inputs (shapes, label range, non-finite logits, ``tau <= 0``,
negative or NaN weights) and raise :class:`~metagate.errors.InputError` naming the argument.
The shared loop, which has checked its data once, passes ``validate=False`` on its hot path.

Shapes: ``N`` units, ``K`` teachers, ``C`` classes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from metagate.checks import check_finite, check_labels, check_teacher_shape
from metagate.errors import InputError

__all__ = ["ce_per_unit", "kd_per_unit", "unit_losses", "reduce_weighted", "check_weights", "SparseTeacher",
           "sparse_kd_per_unit", "sparse_log_probs_at", "sparse_log_prob_of", "check_lm_inputs", "token_columns", "token_loss", "gated_kd", "IGNORE_INDEX"]


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
    """All loss columns of docs/design.md ("The one equation"): ``[N, 1+K]``, column 0 = CE to the label.

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


def closed_form_columns(
    student_logits: Tensor,
    labels: Tensor,
    teacher_kd: Callable[[Tensor, float], Tensor],
    tau: float,
    student_tau: float | None = None,
    student_log_probs: Tensor | None = None,
) -> Tensor:
    """:func:`unit_losses`'s ``[N, 1+K]`` columns with the KD columns from a bank's closed form
    (``teacher_kd(log_q [N, C], tau) -> [N, K]`` unscaled ``KL(p_k,tau || q)``, e.g. the sparse bank's
    ``unit_kd``): the same values as :func:`unit_losses` against the bank's rows, never building ``[N, K, C]``.

    :param student_log_probs: optional ``log_softmax(student_logits)`` (with graph) to reuse
    """
    log_p = student_log_probs if student_log_probs is not None else F.log_softmax(student_logits, -1)
    sigma = tau if student_tau is None else float(student_tau)
    log_q = log_p if sigma == 1.0 else F.log_softmax(student_logits / sigma, -1)
    kd = teacher_kd(log_q, tau)
    return torch.cat([F.nll_loss(log_p, labels, reduction="none").unsqueeze(1), kd * sigma**2], 1)


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


# -- language models: sparse teachers and the token-level loss -----------------------------------------

#: label id of positions without a loss (``transformers``' and PyTorch's ``ignore_index``)
IGNORE_INDEX = -100


@dataclass
class SparseTeacher:
    """A teacher's top-k next-token distribution per position (the DistillKit / TRL offline layout).

    :param ids: ``[B, T, k]`` (or ``[n, k]``) the teacher's top-k token ids at each position
    :param logprobs: same shape, the teacher's log-probabilities of those tokens at temperature 1 (over the
        whole vocabulary, so ``sum(exp(logprobs)) <= 1``; the rest is the tail mass ``r``)
    :param gold_logprob: ``[B, T]`` (or ``[n]``) optional: the teacher's log-probability of the token that
        follows each position (the gold token), for the gates that compare it with the student's
    :param tail: how the KD column treats the tail mass ``r``: ``bucket`` (one extra outcome, the student's
        own tail mass ``1 - sum q_topk`` against ``r``) or ``uniform`` (``r`` spread evenly over the
        ``V - k`` other tokens, the rebuilt dense teacher of :func:`sparse_log_probs_at`)
    """

    ids: Tensor
    logprobs: Tensor
    gold_logprob: Tensor | None = None
    tail: str = "bucket"

    def __post_init__(self) -> None:
        if self.tail not in ("bucket", "uniform"):
            raise InputError(f"SparseTeacher.tail must be 'bucket' or 'uniform', got {self.tail!r}")
        if not torch.is_tensor(self.ids) or not torch.is_tensor(self.logprobs) or self.ids.shape != self.logprobs.shape:
            raise InputError("SparseTeacher needs ids and logprobs tensors of one shape, got "
                             f"{getattr(self.ids, 'shape', self.ids)} and {getattr(self.logprobs, 'shape', self.logprobs)}")
        if self.ids.is_floating_point():
            raise InputError(f"SparseTeacher.ids must be integer token ids, got dtype {self.ids.dtype}")

    @property
    def k(self) -> int:
        return int(self.ids.shape[-1])

    def select(self, rows: Tensor, lead: int) -> SparseTeacher:
        """The teacher at flattened positions ``rows`` of its first ``lead`` dimensions (``[n, k]``)."""
        ids = self.ids.reshape(-1, self.k)[rows] if lead == 2 else self.ids[rows]
        lp = self.logprobs.reshape(-1, self.k)[rows] if lead == 2 else self.logprobs[rows]
        gold = None if self.gold_logprob is None else self.gold_logprob.reshape(-1)[rows]
        return SparseTeacher(ids, lp, gold, self.tail)



#: the least tail mass of a uniform-tail rebuild with tokens outside the top-k: keeps every rebuilt log p finite
TAIL_FLOOR = 1e-9


def _tail_mass(logprobs: Tensor, vocab: int) -> Tensor:
    """``[n]`` the teacher's mass outside its top-k, ``1 - sum exp(logprobs)``, in float64 (0 if rounding
    makes it negative). With ``k = V`` there is no tail: the remainder is rounding and is zero (tempering by
    ``tau`` would otherwise blow ``1e-7`` up into a visible bucket)."""
    k = logprobs.shape[-1]
    if k >= vocab:
        return torch.zeros(logprobs.shape[:-1], dtype=torch.float64, device=logprobs.device)
    return (-torch.expm1(torch.logsumexp(logprobs.double(), -1))).clamp_min(0.0)


def uniform_tail_log_probs(logprobs: Tensor, vocab: int, tau: Tensor | float) -> tuple[Tensor, Tensor]:
    """``(log p_tau of the top-k [n, k], log p_tau of each tail token [n])`` of the teacher rebuilt with its
    tail mass spread uniformly over the ``V - k`` other tokens, at temperature ``tau`` (``[n, 1]`` or scalar)."""
    k = logprobs.shape[-1]
    m = vocab - k
    r = _tail_mass(logprobs, vocab)
    if m > 0:  # a top-k holding all the mass in float32 (a confident pretrained teacher) would give its tail
        r = r.clamp_min(TAIL_FLOOR)  # tokens log p = -inf, and the KD term 0 * -inf = NaN
    lp = logprobs.double()
    neg_inf = torch.full_like(r, float("-inf"))
    log_u = torch.where(r > 0, r.log() - math.log(max(m, 1)), neg_inf)  # each tail token's log p at tau = 1
    t = tau.double() if torch.is_tensor(tau) else float(tau)
    a_top = lp / t
    a_u = log_u / (t.reshape(-1) if torch.is_tensor(t) and t.ndim else t)
    tail_total = torch.where(r > 0, a_u + math.log(max(m, 1)), neg_inf)
    log_z = torch.logsumexp(torch.cat([a_top, tail_total.unsqueeze(-1)], -1), -1)
    return a_top - log_z.unsqueeze(-1), a_u - log_z


def sparse_log_probs_at(teacher: SparseTeacher, vocab: int, tau: float = 1.0) -> Tensor:
    """The teacher's dense ``[..., V]`` log-probabilities at ``tau``, rebuilt from its top-k with the tail
    spread uniformly. Per batch, for a gate that
    reads whole distributions; never for a bank."""
    lead = teacher.ids.shape[:-1]
    ids, lp = teacher.ids.reshape(-1, teacher.k), teacher.logprobs.reshape(-1, teacher.k)
    top, tail = uniform_tail_log_probs(lp, vocab, tau)
    out = tail.to(lp.dtype).unsqueeze(-1).expand(-1, vocab).clone()  # built in the logits' dtype, not float64
    out.scatter_(1, ids.long(), top.to(lp.dtype))
    return out.reshape(*lead, vocab)


def sparse_log_prob_of(teacher: SparseTeacher, vocab: int, tokens: Tensor, tau: float = 1.0,
                       gold: bool | Tensor = False) -> Tensor:
    """``[n]`` the teacher's log-probability of one token per position at ``tau`` in its uniform-tail
    rebuild (:func:`sparse_log_probs_at`'s value there) without building ``[n, V]``; with ``gold=True``
    (``tokens`` are the gold tokens) its stored gold log-probability, tempered by the same normaliser; with a
    ``[n]`` bool ``gold``, the stored value where it is set and the rebuild's elsewhere (one normaliser for both)."""
    ids, lp = teacher.ids.reshape(-1, teacher.k).long(), teacher.logprobs.reshape(-1, teacher.k)
    top, tail = uniform_tail_log_probs(lp, vocab, tau)
    use_gold = teacher.gold_logprob is not None and (torch.is_tensor(gold) or gold)
    if use_gold:
        assert teacher.gold_logprob is not None
        log_z = lp[:, 0].double() / tau - top[:, 0]
        stored = teacher.gold_logprob.reshape(-1).double() / tau - log_z
        if not torch.is_tensor(gold):
            return stored.to(lp.dtype)
    hit = ids == tokens.reshape(-1, 1)
    rebuilt = torch.where(hit.any(1), (top * hit).sum(1), tail)
    return (torch.where(gold.reshape(-1), stored, rebuilt) if use_gold else rebuilt).to(lp.dtype)


def uniform_tail_kl(log_q: Tensor, ids: Tensor, logprobs: Tensor, tau: Tensor | float,
                    log_q_top: Tensor | None = None) -> Tensor:
    """``[n]`` ``KL(p_tau || q)`` of a top-k teacher rebuilt with its tail spread uniformly over the ``V - k``
    other tokens (:func:`sparse_log_probs_at`'s distribution), in closed form: the tail's part needs only
    ``sum_tail log q = sum_V log q - sum_topk log q``, so no ``[n, V]`` row is built for the teacher.

    :param log_q: ``[n, V]`` the student's log-probabilities (at its own temperature; with graph)
    :param ids: ``[n, k]`` the teacher's top-k token ids (int64)
    :param logprobs: ``[n, k]`` their log-probabilities at temperature 1
    :param tau: the teacher's temperature, scalar or ``[n, 1]``
    :param log_q_top: optional ``log_q.gather(1, ids)`` when the caller has it
    """
    vocab, k = log_q.shape[1], ids.shape[1]
    if log_q_top is None:
        log_q_top = log_q.gather(1, ids)
    log_p_top, log_p_u = uniform_tail_log_probs(logprobs, vocab, tau)
    log_p_top, log_p_u = log_p_top.to(log_q.dtype), log_p_u.to(log_q.dtype)
    kl = (log_p_top.exp() * (log_p_top - log_q_top)).sum(-1)
    m = vocab - k
    if m > 0:
        p_u = log_p_u.exp()
        tail_log_q = log_q.sum(-1) - log_q_top.sum(-1)
        kl = kl + torch.where(p_u > 0, p_u * (m * log_p_u - tail_log_q), torch.zeros_like(p_u))
    return kl


def sparse_kd_per_unit(
    student_logits: Tensor,
    teacher: SparseTeacher,
    tau: Tensor | float = 1.0,
    student_tau: float | None = None,
    student_log_probs: Tensor | None = None,
) -> Tensor:
    """The KD column of a top-k teacher: ``sigma**2 * KL(p_tau || softmax(s / sigma))`` over ``[n]`` units
    (``sigma = tau`` unless ``student_tau``), never building ``[n, V]`` for the teacher.

    ``p_tau`` is the teacher's top-k at temperature ``tau`` (``softmax(logprobs / tau)`` together with the
    tail) and the tail ``r = 1 - sum exp(logprobs)``:

    * ``uniform``: ``r`` spread over the ``V - k`` other tokens; the student side needs only
      ``sum_tail log q = sum_V log q - sum_topk log q``;
    * ``bucket``: the tail is one outcome (tempered as one token, as DistillKit and TRL do), the student's is
      ``1 - sum_topk q``.

    At ``tau > 1`` the tail's tempered mass is unknown: one token underestimates it, a uniform tail
    overestimates it (the README measures both against the dense column).

    Exactness and bound: with ``k = V`` (no tail) both equal the dense column. Otherwise, at ``tau = 1`` and
    for the same student, the chain rule of the KL gives ``KL_full = KL_bucket + r * KL(p_tail/r || q_tail/Q)``
    (``Q`` the student's tail mass), so the bucket column is a lower bound, short by exactly ``r`` times the
    KL between the tails' shapes; the uniform column is the exact KL to the rebuilt teacher, which differs
    from the real one only inside the tail (both err by at most what the tail's ``r`` carries; measured per
    ``k`` in the README).

    :param student_logits: ``[n, V]``
    :param teacher: a :class:`SparseTeacher` with ``[n, k]`` ids and log-probabilities
    :param tau: scalar or ``[n]``
    :param student_log_probs: optional ``log_softmax(student_logits / sigma)`` (shared by several teachers)
    :return: ``[n]``
    """
    n, vocab = student_logits.shape
    ids, lp = teacher.ids.reshape(n, -1).long(), teacher.logprobs.reshape(n, -1)
    k = ids.shape[1]
    if k > vocab:
        raise InputError(f"a top-k teacher has k = {k} entries per position but the vocabulary has V = {vocab}")
    tau_col = tau.reshape(-1, 1) if torch.is_tensor(tau) and tau.ndim else tau
    sigma = tau_col if student_tau is None else float(student_tau)
    log_q = student_log_probs if student_log_probs is not None else F.log_softmax(student_logits / sigma, dim=-1)
    log_q_top = log_q.gather(1, ids)
    if teacher.tail == "uniform":
        kl = uniform_tail_kl(log_q, ids, lp, tau_col, log_q_top)
    else:  # the tail is one outcome, tempered as one token (DistillKit's, TRL's)
        r = _tail_mass(lp, vocab)
        log_r = torch.where(r > 0, r.log(), torch.full_like(r, float("-inf")))
        t = tau_col.double() if torch.is_tensor(tau_col) else float(tau_col)
        log_p = F.log_softmax(torch.cat([lp.double(), log_r.unsqueeze(-1)], -1) / t, -1).to(log_q.dtype)
        q_tail = (1.0 - log_q_top.exp().sum(-1)).clamp_min(torch.finfo(log_q.dtype).tiny)
        log_q_items = torch.cat([log_q_top, q_tail.log().unsqueeze(-1)], -1)
        p = log_p.exp()
        kl = torch.where(p > 0, p * (log_p - log_q_items), torch.zeros_like(p)).sum(-1)
    scale = sigma**2 if not torch.is_tensor(sigma) else sigma.reshape(-1) ** 2
    return kl * scale


def check_lm_inputs(student_logits: Tensor, labels: Tensor, teachers: list, weights: Tensor | None) -> None:
    """Raise :class:`InputError` on bad :func:`gated_kd` inputs, naming the sizes (vocabularies, ``k``, positions)."""
    if not torch.is_tensor(student_logits) or student_logits.ndim != 3 or not student_logits.is_floating_point():
        got = tuple(student_logits.shape) if torch.is_tensor(student_logits) else type(student_logits).__name__
        raise InputError(f"student_logits must be a floating [B, T, V] tensor, got {got}")
    b, t, v = student_logits.shape
    if not torch.is_tensor(labels) or labels.shape != (b, t) or labels.is_floating_point():
        raise InputError(f"labels must be integer [B, T] = [{b}, {t}] (-100 where there is no loss), got "
                         f"{tuple(labels.shape) if torch.is_tensor(labels) else type(labels).__name__}")
    real = labels[labels != IGNORE_INDEX]
    if real.numel() and (int(real.min()) < 0 or int(real.max()) >= v):
        raise InputError(f"labels out of range: found [{int(real.min())}, {int(real.max())}] but the student's "
                         f"vocabulary has V = {v} tokens (-100 marks positions without a loss)")
    for j, te in enumerate(teachers):
        if isinstance(te, SparseTeacher):
            if te.ids.shape[:2] != (b, t):
                raise InputError(f"sparse teacher {j} covers positions {tuple(te.ids.shape[:2])} but the student's "
                                 f"logits have [B, T] = [{b}, {t}]")
            if te.k > v:
                raise InputError(f"sparse teacher {j} has k = {te.k} entries per position but the student's "
                                 f"vocabulary has V = {v}")
            if te.ids.numel() and (int(te.ids.min()) < 0 or int(te.ids.max()) >= v):
                raise InputError(f"sparse teacher {j}'s token ids reach {int(te.ids.max())}, outside the "
                                 f"student's vocabulary of V = {v} (another tokenizer?)")
        elif torch.is_tensor(te):
            if te.ndim != 3 or te.shape[:2] != (b, t):
                raise InputError(f"teacher {j}'s logits must be [B, T, V] = [{b}, {t}, {v}], got {tuple(te.shape)}")
            if te.shape[2] != v:
                raise InputError(f"vocabulary mismatch: teacher {j} has V = {te.shape[2]} tokens, the student "
                                 f"V = {v} (distillation needs one tokenizer)")
        else:
            raise InputError(f"teacher {j} must be [B, T, V] logits or a SparseTeacher, got {type(te).__name__}")
    if weights is not None and (not torch.is_tensor(weights) or weights.shape != (b, t, 1 + len(teachers))):
        raise InputError(f"weights must be [B, T, 1+K] = [{b}, {t}, {1 + len(teachers)}], got "
                         f"{tuple(weights.shape) if torch.is_tensor(weights) else type(weights).__name__}")


def token_columns(
    student_logits: Tensor,
    teachers: list,
    labels: Tensor,
    tau: Tensor | float,
    student_tau: float | None = None,
) -> Tensor:
    """The one equation's columns ``[n, 1+K]`` for ``n`` real tokens: CE to the label, then one KD column per
    teacher (dense ``[n, V]`` logits through :func:`kd_per_unit`, a :class:`SparseTeacher` through
    :func:`sparse_kd_per_unit`)."""
    cols = [ce_per_unit(student_logits, labels, validate=False).unsqueeze(1)]
    dense = [j for j, te in enumerate(teachers) if torch.is_tensor(te)]
    kd: dict[int, Tensor] = {}
    if dense:
        stacked = torch.stack([teachers[j] for j in dense], 1).to(student_logits.dtype)
        out = kd_per_unit(student_logits, stacked, tau, validate=False, student_tau=student_tau)
        kd.update({j: out[:, i] for i, j in enumerate(dense)})
    log_q = None
    for j, te in enumerate(teachers):
        if j not in kd:
            if log_q is None:  # one student log-softmax for every sparse teacher
                sigma = tau if student_tau is None else float(student_tau)
                sigma = sigma.reshape(-1, 1) if torch.is_tensor(sigma) and sigma.ndim else sigma
                log_q = F.log_softmax(student_logits / sigma, dim=-1)
            kd[j] = sparse_kd_per_unit(student_logits, te, tau, student_tau, log_q)
    cols += [kd[j].unsqueeze(1) for j in range(len(teachers))]
    return torch.cat(cols, 1)


def gated_kd(
    student_logits: Tensor,
    teachers: list | tuple | Tensor | SparseTeacher,
    labels: Tensor,
    weights: Tensor | None = None,
    *,
    tau: Tensor | float,
    shift: bool = True,
    num_items_in_batch: int | Tensor | None = None,
    reduction: str = "mean",
    alpha: float = 0.5,
    student_tau: float | None = None,
) -> Tensor:
    """The one equation over the tokens of a causal LM batch, for any training loop (TRL style).

    ``L = sum_i [ w_i0 CE(s_i, y_i) + sum_k w_ik sigma^2 KL(p_k,tau || softmax(s_i / sigma)) ] / n`` over the real
    tokens ``i`` (``label != -100``), ``n`` their count or ``num_items_in_batch`` when given (as ``transformers``
    does under gradient accumulation: the sum over this micro-batch divided by the whole batch's count).

    :param student_logits: ``[B, T, V]``
    :param teachers: a list of teachers (or one): dense logits ``[B, T, V]`` or :class:`SparseTeacher`
        (top-k ids and log-probabilities ``[B, T, k]``), all at the positions of ``student_logits``
    :param labels: ``[B, T]`` token ids, ``-100`` where there is no loss (padding, prompt)
    :param weights: ``[B, T, 1+K]`` the gate's weights at the positions of ``student_logits`` (column 0 the
        label), or ``None``: ``fixed``'s mix, ``alpha`` on the label and ``(1 - alpha) / K`` on each teacher
    :param tau: the KD temperature, scalar or ``[B, T]``
    :param shift: ``True``: the logits at ``t`` predict the label at ``t + 1`` (``transformers``' causal LM
        convention: ``labels`` are the input ids); logits, teachers, weights and ``tau`` drop their last
        position and ``labels`` their first. ``False``: already aligned
    :param num_items_in_batch: the divisor instead of this batch's real-token count
    :param reduction: ``mean`` (the divisor above), ``sum``, or ``none`` (``[B, T']``, zero where ignored)
    :param alpha: the label weight of ``weights=None`` (``fixed``'s ``--alpha``; 0.5 like the gate)
    :param student_tau: the student's temperature in the KD columns (``None``: ``tau``; ``1.0``: HKD's form)
    :raises InputError: shapes, a vocabulary mismatch (naming both sizes), ``k > V``, labels out of range
    """
    if isinstance(teachers, (SparseTeacher, Tensor)):
        teachers = [teachers]
    teachers = list(teachers)
    check_lm_inputs(student_logits, labels, teachers, weights)
    if not torch.is_tensor(tau):
        _check_tau(tau, student_logits.shape[0])
    if torch.is_tensor(tau) and tau.ndim and tau.shape != labels.shape:
        raise InputError(f"tau must be a scalar or [B, T] = {tuple(labels.shape)}, got {tuple(tau.shape)}")
    if not 0.0 <= alpha <= 1.0:
        raise InputError(f"alpha must be in [0, 1], got {alpha}")
    if reduction not in ("mean", "sum", "none"):
        raise InputError(f"unknown reduction {reduction!r}; use mean, sum or none")
    return token_loss(student_logits, teachers, labels, weights, tau=tau, shift=shift,
                      num_items_in_batch=num_items_in_batch, reduction=reduction, alpha=alpha,
                      student_tau=student_tau)[0]


def token_loss(
    student_logits: Tensor,
    teachers: list,
    labels: Tensor,
    weights: Tensor | None,
    *,
    tau: Tensor | float,
    shift: bool,
    num_items_in_batch: int | Tensor | None,
    reduction: str,
    alpha: float,
    student_tau: float | None,
) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`gated_kd` (inputs checked) and its parts: ``(loss, columns [n, 1+K] of the real tokens, their
    flat row indices into [B*T])`` -- a trainer logs from the columns (the CE column is each token's NLL).

    The causal shift moves the labels, not the logits: label ``t+1`` goes to position ``t`` and the last
    position gets ``-100``, so ``[B, T, V]`` logits are read in place (``[B*T, V]`` is a view, no copy of
    the vocabulary-sized tensors) and only the real rows are gathered once."""
    if shift:
        labels = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], 1)
    b, t, v = student_logits.shape
    flat_labels = labels.reshape(-1)
    rows = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
    s = student_logits.reshape(-1, v).index_select(0, rows)
    picked = [te.select(rows, 2) if isinstance(te, SparseTeacher) else te.reshape(-1, v).index_select(0, rows)
              for te in teachers]
    tau_r = tau.reshape(-1).index_select(0, rows) if torch.is_tensor(tau) and tau.ndim else tau
    if torch.is_tensor(tau_r) and tau_r.ndim:
        _check_tau(tau_r, rows.numel())
    cols = token_columns(s, picked, flat_labels.index_select(0, rows), tau_r, student_tau)
    k = len(teachers)
    if weights is None:
        row = torch.full((1 + k,), (1.0 - alpha) / max(k, 1), dtype=cols.dtype, device=cols.device)
        row[0] = alpha if k else 1.0
        w = row.expand(rows.numel(), -1)
    else:
        w = weights.reshape(-1, 1 + k).index_select(0, rows).to(cols.dtype)
        check_weights(w)
    per_token = (cols * w).sum(-1)
    if reduction == "none":
        out = per_token.new_zeros(b * t).index_copy(0, rows, per_token).reshape(b, t)
        return (out[:, :-1] if shift else out), cols, rows
    total = per_token.sum()
    if reduction == "sum":
        return total, cols, rows
    if num_items_in_batch is not None:
        denom = num_items_in_batch.to(total.device, total.dtype) if torch.is_tensor(num_items_in_batch) \
            else float(num_items_in_batch)
        return total / denom, cols, rows
    return total / max(rows.numel(), 1), cols, rows
