"""Unit features shared by learned gates (policy state, Meta-Weight-Net input).

For each unit and teacher, ``F = 11`` normalised float32 features:

====  ==========================================================
0     teacher confidence (max probability)
1     teacher probability of the label
2     teacher entropy / log C
3     teacher CE to the label / log C (clamped to [0, 5])
4     KL(teacher || student) / log C (clamped to [0, 5])
5     teacher agrees with the label (argmax == label), 0/1
6     student confidence
7     student margin (top-1 minus top-2 probability)
8     student entropy / log C
9     student CE to the label / log C (clamped to [0, 5])
10    training progress in [0, 1]
====  ==========================================================

Teacher-reliability features (:func:`reliability_features`, ``R = 3`` more per unit and teacher, opt-in: a gate
that asks for them appends them to the ``F`` above; every value in ``[0, FEATURE_HIGH]``):

====  ==========================================================
0     the teacher's held-out reliability given its prediction: P(teacher right | teacher predicts c) on the
      clean ``meta`` split (:func:`teacher_reliability`), at the class it predicts for this unit
1     the teacher's prediction equals the majority prediction of the other teachers, 0/1
2     KL(teacher || mean of the other teachers) / log C (clamped to [0, 5])
====  ==========================================================
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from metagate.errors import ConfigError
from metagate.losses import uniform_tail_kl, uniform_tail_log_probs

if TYPE_CHECKING:  # typing only: the features sit below the gates that use them
    from metagate.gates.base import UnitView

TEACHER_FEATURES = ("t_conf", "t_p_label", "t_entropy", "t_ce", "t_kl", "t_agree")
STUDENT_FEATURES = ("s_conf", "s_margin", "s_entropy", "s_ce", "progress")
FEATURE_NAMES = TEACHER_FEATURES + STUDENT_FEATURES
NUM_FEATURES = len(FEATURE_NAMES)
FEATURE_HIGH = 5.0  # every feature lies in [0, 5] (CE and KL are clamped there)
RELIABILITY_FEATURES = ("t_reliability", "t_agree_others", "t_kl_others")
NUM_RELIABILITY = len(RELIABILITY_FEATURES)


@torch.no_grad()
def teacher_reliability(meta_logits: Tensor, meta_labels: Tensor, prior: float = 1.0) -> Tensor:
    """``[K, C]`` P(teacher k right | teacher k predicts c), measured on held-out (clean ``meta``) units.

    Smoothed towards 1/2 by ``prior`` pseudo-counts of each outcome (``(right + prior) / (predicted + 2 prior)``),
    so a class a teacher never predicts on ``meta`` has reliability 1/2.

    :param meta_logits: ``[M, K, C]`` the teachers' logits on the ``meta`` units
    :param meta_labels: ``[M]`` their clean labels
    """
    m, k, c = meta_logits.shape
    pred = meta_logits.argmax(-1)  # [M, K]
    right = (pred == meta_labels.view(m, 1)).double()
    counts = torch.zeros(k, c, dtype=torch.float64)
    hits = torch.zeros(k, c, dtype=torch.float64)
    for j in range(k):
        counts[j].index_add_(0, pred[:, j].cpu(), torch.ones(m, dtype=torch.float64))
        hits[j].index_add_(0, pred[:, j].cpu(), right[:, j].cpu())
    return ((hits + prior) / (counts + 2 * prior)).float()


@torch.no_grad()
def reliability_features(teacher_logits: Tensor, reliability: Tensor) -> Tensor:
    """``[N, K, 3]`` teacher-reliability features (see the module docstring) of units with teacher logits
    ``[N, K, C]``, given :func:`teacher_reliability` ``[K, C]`` (teacher-only: no label, no student).

    With one teacher there are no others: agreement 1 and KL 0.
    """
    t = teacher_logits.detach().float()
    n, k, c = t.shape
    log_pt = F.log_softmax(t, -1)
    pt = log_pt.exp()
    pred = t.argmax(-1)  # [N, K]
    rel = reliability.to(t.device).gather(1, pred.t()).t()  # [N, K]: reliability[k, pred_ik]
    if k == 1:
        return torch.stack([rel, torch.ones_like(rel), torch.zeros_like(rel)], -1)
    votes = F.one_hot(pred, c).float()  # [N, K, C]
    others = votes.sum(1, keepdim=True) - votes  # the other teachers' votes per class
    majority = others.argmax(-1)  # ties: the lowest class
    agree = (majority == pred).float()
    p_others = (pt.sum(1, keepdim=True) - pt) / (k - 1)
    kl = (pt * (log_pt - p_others.clamp_min(1e-12).log())).sum(-1) / math.log(c)
    return torch.stack([rel, agree, kl.clamp(0.0, FEATURE_HIGH)], -1)


@torch.no_grad()
def unit_features(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, progress: float = 0.0
) -> Tensor:
    """Features ``[N, K, F]`` (see module docstring) -- detached, float32.

    :param student_logits: ``[N, C]``
    :param teacher_logits: ``[N, K, C]``
    :param labels: ``[N]`` (negative labels, e.g. padding, are treated as class 0)
    :param progress: fraction of training done
    """
    s = student_logits.detach().float()
    t = teacher_logits.detach().float()
    n, k, c = t.shape
    log_c = math.log(c)
    y = labels.clamp_min(0)
    log_ps = F.log_softmax(s, -1)
    log_pt = F.log_softmax(t, -1)
    pt = log_pt.exp()
    yk = y.view(n, 1, 1).expand(n, k, 1)
    t_conf, t_arg = pt.max(-1)
    t_plab = pt.gather(-1, yk).squeeze(-1)
    t_ent = -(pt * log_pt).sum(-1) / log_c
    t_ce = (-log_pt.gather(-1, yk).squeeze(-1) / log_c).clamp(0, FEATURE_HIGH)
    t_kl = ((pt * (log_pt - log_ps.unsqueeze(1))).sum(-1) / log_c).clamp(0, FEATURE_HIGH)
    t_agree = (t_arg == y.view(n, 1)).float()
    t_feats = torch.stack([t_conf, t_plab, t_ent, t_ce, t_kl, t_agree], -1)  # [N, K, 6]
    return with_student_features(t_feats, log_ps, y, progress)


def with_student_features(teacher_feats: Tensor, log_ps: Tensor, labels: Tensor, progress: float) -> Tensor:
    """``[N, K, F]``: the teacher features ``[N, K, 6]`` (columns 0-5 of the module docstring) followed by the
    student's (6-10) from its float32 log-probabilities ``log_ps [N, C]``."""
    n, k = teacher_feats.shape[:2]
    c = log_ps.shape[1]
    log_c = math.log(c)
    y = labels.clamp_min(0)
    ps = log_ps.exp()
    top2 = ps.topk(2, -1).values if c > 1 else torch.cat([ps, torch.zeros_like(ps)], -1)
    s_feats = torch.stack([
        top2[:, 0],
        top2[:, 0] - top2[:, 1],
        -(ps * log_ps).sum(-1) / log_c,
        (-log_ps.gather(-1, y.view(n, 1)).squeeze(-1) / log_c).clamp(0, FEATURE_HIGH),
        torch.full((n,), float(progress), device=log_ps.device),
    ], -1)  # [N, 5]
    return torch.cat([teacher_feats, s_feats.unsqueeze(1).expand(n, k, s_feats.shape[-1])], -1)


@torch.no_grad()
def uniform_tail_teacher_features(log_ps: Tensor, ids: Tensor, logprobs: Tensor, labels: Tensor,
                                  tau: float = 1.0) -> Tensor:
    """:func:`unit_features`' teacher columns ``[n, 6]`` of one top-k teacher rebuilt with its tail spread
    uniformly (:func:`~metagate.losses.sparse_log_probs_at` at ``tau``), from its top-k alone: the same values
    as on the rebuilt ``[n, V]`` rows, except that a teacher whose tail token outweighs its whole top-k (never
    for a top-k of a trained model) predicts no token here instead of the first tail token.

    :param log_ps: ``[n, V]`` the student's float32 log-probabilities
    :param ids: ``[n, k]`` int64 top-k token ids; ``logprobs``: ``[n, k]`` their log-probabilities at temperature 1
    :param labels: ``[n]`` (negative: class 0)
    """
    vocab, k = log_ps.shape[1], ids.shape[1]
    log_c = math.log(vocab)
    y = labels.clamp_min(0).view(-1, 1)
    top, tail = uniform_tail_log_probs(logprobs, vocab, tau)
    top, tail = top.float(), tail.float()
    p_top, p_u = top.exp(), tail.exp()
    best, at = p_top.max(-1)
    conf = torch.maximum(best, p_u)
    arg = torch.where(best >= p_u, ids.gather(1, at.unsqueeze(1)).squeeze(1), torch.full_like(at, -1))
    hit = ids == y
    log_plab = torch.where(hit.any(1), (top * hit).sum(1), tail)
    m = vocab - k
    tail_ent = torch.where(p_u > 0, -m * p_u * tail, torch.zeros_like(p_u))
    ent = (-(p_top * top).sum(-1) + tail_ent) / log_c
    kl = uniform_tail_kl(log_ps, ids, logprobs, tau) / log_c
    return torch.stack([conf, log_plab.exp(), ent, (-log_plab / log_c).clamp(0, FEATURE_HIGH),
                        kl.clamp(0, FEATURE_HIGH), (arg == y.squeeze(1)).float()], -1)


def view_features(view: UnitView) -> Tensor:
    """:func:`unit_features` of a gate's :class:`~metagate.gates.UnitView` (a sparse bank's teacher columns from
    its top-k entries, :attr:`~metagate.gates.UnitView.teacher_features_fn`)."""
    if view.teacher_features_fn is not None:
        log_ps = view.student_log_probs.float()
        return with_student_features(view.teacher_features_fn(log_ps, view.labels), log_ps, view.labels,
                                     view.progress)
    if view.teacher_logits is None:
        raise ValueError("unit features need teacher logits")
    return unit_features(view.student_logits, view.teacher_logits, view.labels, view.progress)


def clamped_view_features(view: UnitView, cache: TeacherFeatureCache | ViewReliability | None = None) -> Tensor:
    """Features of a gate's view clamped to ``[0, FEATURE_HIGH]``: from ``cache`` when it covers the
    view's units, else :func:`unit_features` (and, when ``cache`` carries a reliability table, the
    :func:`reliability_features` of the view's teacher logits: e.g. the tokens of a sequence batch)."""
    if isinstance(cache, TeacherFeatureCache) and cache.covers(view):
        assert view.ids is not None
        log_ps = view.student_log_probs.float()  # the trainer reuses this log-softmax for the CE column
        return cache.flat_features(log_ps, view.ids, view.progress).view(-1, cache.num_teachers, cache.num_features)
    feats = view_features(view).clamp_(0.0, FEATURE_HIGH)
    if cache is None or cache.num_features == NUM_FEATURES:
        return feats
    if cache.reliability is None:
        raise ConfigError("the cache's static features are measured per training unit; this view's units are not "
                          "whole training units with ids")
    return torch.cat([feats, view_reliability_features(view, cache.reliability)], -1)


def view_reliability_features(view: UnitView, reliability: Tensor) -> Tensor:
    """:func:`reliability_features` ``[N, K, 3]`` of a gate's view from its teacher logits, clamped to
    ``[0, FEATURE_HIGH]``; padding units (``mask`` 0, whose teacher rows may be NaN) get 0.

    :raises ConfigError: the view's bank serves no ``[N, K, C]`` rows (a sparse top-k bank)
    """
    if view.teacher_features_fn is not None:
        raise ConfigError("teacher-reliability features need the teachers' full rows; a sparse top-k bank has "
                          "only each token's k most likely entries (use --rl-features unit)")
    t = view.teacher_logits
    if t is None:
        raise ValueError("teacher-reliability features need teacher logits")
    real = view.mask.reshape(-1, 1, 1) > 0
    t = torch.where(real, t.detach().float(), torch.zeros((), device=t.device))  # NaN padding rows: argmax 0
    rel = reliability_features(t, reliability).clamp_(0.0, FEATURE_HIGH)
    return rel.masked_fill_(~real, 0.0)


@dataclass(frozen=True)
class ViewReliability:
    """The teacher-reliability table of units no :class:`TeacherFeatureCache` holds (the tokens of sequence
    batches): :func:`clamped_view_features` appends :func:`view_reliability_features` per batch.

    :param reliability: ``[K, C]`` :func:`teacher_reliability` measured on the clean ``meta`` split (per token)
    """

    reliability: Tensor

    @property
    def num_features(self) -> int:
        return NUM_FEATURES + NUM_RELIABILITY


class TeacherFeatureCache:
    """:func:`unit_features` for a fixed teacher bank and fixed training labels, fast.

    The teacher-only features (confidence, p(label), entropy, CE to the label, agreement) of every
    training unit are computed once. Per step the features are one affine map of a few numbers per
    unit, ``x = static[ids] + u @ M + progress * e``, clamped: ``u`` holds the student's
    log-probabilities scored against each teacher's probabilities and the label (one batched matrix
    product), its top-2 probabilities and its negative entropy; the constant ``M`` routes them to the
    KL and student-feature columns of every teacher. About a dozen ops, none of them a slow
    ``__setitem__``.

    ``cache.features(student_logits, ids, progress)`` equals
    ``unit_features(student_logits, teacher_logits[ids], labels[ids], progress).clamp(0, FEATURE_HIGH)``
    (the clamp every gate applies anyway; a no-op for ``progress`` in ``[0, 1]``) up to float rounding.

    :param teacher_logits: ``[N, K, C]`` logits of all training units
    :param labels: ``[N]`` their (possibly noisy) labels
    :param extra: ``[N, K, E]`` static features appended after the ``F`` above (e.g. :func:`reliability_features`);
        the cache's features are then ``[B, K, F + E]`` (:attr:`num_features`)
    """

    def __init__(self, teacher_logits: Tensor, labels: Tensor, extra: Tensor | None = None) -> None:
        with torch.no_grad():
            t = teacher_logits.detach().float()
            n, k, c = t.shape
            if labels.shape != (n,):
                raise ValueError(f"labels must be [{n}], got {tuple(labels.shape)}")
            if extra is not None and extra.shape[:2] != (n, k):
                raise ValueError(f"extra features must be [{n}, {k}, E], got {tuple(extra.shape)}")
            e = 0 if extra is None else int(extra.shape[-1])
            self.num_units, self.num_teachers, self.num_classes = n, k, c
            self.num_features = nf = NUM_FEATURES + e
            #: the reliability table behind ``extra`` (:meth:`for_run`): views the cache does not cover get the
            #: same features from their own teacher logits
            self.reliability: Tensor | None = None
            log_c = math.log(c)
            self.log_c = log_c
            y = labels.to(t.device).clamp_min(0)
            log_pt = F.log_softmax(t, -1)
            pt = log_pt.exp()
            yk = y.view(n, 1, 1).expand(n, k, 1)
            t_conf, t_arg = pt.max(-1)
            neg_ent = (pt * log_pt).sum(-1) / log_c
            zeros = torch.zeros_like(t_conf)
            static = torch.stack([
                t_conf, pt.gather(-1, yk).squeeze(-1), -neg_ent,
                (-log_pt.gather(-1, yk).squeeze(-1) / log_c).clamp(0, FEATURE_HIGH),
                neg_ent,  # KL = sum p_t log p_t - sum p_t log p_s: the step subtracts the second term
                (t_arg == y.view(n, 1)).float(), *[zeros] * len(STUDENT_FEATURES),
            ], -1)  # [N, K, F]
            if extra is not None:
                static = torch.cat([static, extra.to(static).clamp(0.0, FEATURE_HIGH)], -1)
            self.static = static.reshape(n, k * nf).contiguous()
            # rows dotted with the student's log-probs each step: teachers' probabilities, the label's one-hot
            self.rows = torch.cat([pt, F.one_hot(y, c).to(pt.dtype).unsqueeze(1)], 1) / log_c  # [N, K+1, C]
            # u = [p_t . log p_s / log C (K), log p_s(y) / log C, top-1 p_s, top-2 p_s, sum p_s log p_s]
            mix = torch.zeros(k + 4, k, nf, device=t.device)
            for j in range(k):
                mix[j, j, 4] = -1.0  # KL
            mix[k + 1, :, 6] = 1.0  # confidence
            mix[k + 1, :, 7], mix[k + 2, :, 7] = 1.0, -1.0  # margin
            mix[k + 3, :, 8] = -1.0 / log_c  # entropy
            mix[k, :, 9] = -1.0  # CE to the label
            self.mix = mix.reshape(k + 4, k * nf)
            prog = torch.zeros(k, nf, device=t.device)
            prog[:, 10] = 1.0
            self.progress_row = prog.reshape(-1)

    @classmethod
    def for_run(cls, run: Any, reliability: bool = False) -> TeacherFeatureCache | ViewReliability | None:
        """The cache of a run's teacher bank and training labels (``None`` without teachers).

        :param reliability: append :func:`reliability_features` from the bank's ``reliability`` table (measured
            on the clean ``meta`` split when the run's teachers were loaded)
        :returns: the cache; for sequence units (no cache) the table alone (:class:`ViewReliability`) when
            ``reliability``, else ``None``
        :raises ConfigError: ``reliability`` asked for a bank without the table
        """
        bank = getattr(run, "bank", None)
        if bank is None:
            return None
        table = None
        if reliability:
            table = bank.reliability  # declared on TeacherBank (None: unmeasured)
            if table is None:
                raise ConfigError("teacher-reliability features need each teacher's logits on the meta split "
                                  "(teachers trained by the project or given as modules; not logits files, not "
                                  "a sparse top-k bank)")
        if run.train_y.ndim != 1:  # sequences: features from the view (no token cache), the table per batch
            return None if table is None else ViewReliability(table)
        extra = None if table is None else reliability_features(bank.logits, table)
        cache = cls(bank.logits, run.train_y, extra)
        cache.reliability = table
        return cache

    def covers(self, view: UnitView) -> bool:
        """Whether ``view`` holds whole training units with ids (their teachers and labels are the cached ones)."""
        ids = view.ids
        return ids is not None and ids.ndim == 1 and ids.shape[0] == view.num_units \
            and view.num_teachers == self.num_teachers and self.num_classes > 1

    def flat_features(self, log_ps: Tensor, ids: Tensor, progress: float = 0.0) -> Tensor:
        """Clamped unit features flattened over teachers, ``[B, K*F]``, from the student's detached
        float32 log-probabilities ``log_ps [B, C]`` (no graph: every input is a plain tensor)."""
        ps = log_ps.exp()
        r = torch.bmm(self.rows.index_select(0, ids), log_ps.unsqueeze(-1)).squeeze(-1)  # [B, K+1]
        u = torch.cat([r, ps.topk(2, -1).values, (ps * log_ps).sum(-1, keepdim=True)], 1)  # [B, K+4]
        x = torch.addmm(self.static.index_select(0, ids), u, self.mix)
        if progress:
            x.add_(self.progress_row, alpha=float(progress))
        return x.clamp_(0.0, FEATURE_HIGH)

    def features(self, student_logits: Tensor, ids: Tensor, progress: float = 0.0) -> Tensor:
        """Clamped unit features ``[B, K, F]`` of training units ``ids`` (see the class docstring)."""
        with torch.no_grad():
            log_ps = F.log_softmax(student_logits.detach().float(), -1)
            return self.flat_features(log_ps, ids, progress).view(-1, self.num_teachers, self.num_features)

    def view_features(self, view: UnitView) -> Tensor:
        """Clamped features of a gate's view: cached when :meth:`covers` holds, else :func:`unit_features`."""
        return clamped_view_features(view, self)
