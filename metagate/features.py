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
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # typing only: the features sit below the gates that use them
    from metagate.gates.base import UnitView

TEACHER_FEATURES = ("t_conf", "t_p_label", "t_entropy", "t_ce", "t_kl", "t_agree")
STUDENT_FEATURES = ("s_conf", "s_margin", "s_entropy", "s_ce", "progress")
FEATURE_NAMES = TEACHER_FEATURES + STUDENT_FEATURES
NUM_FEATURES = len(FEATURE_NAMES)
FEATURE_HIGH = 5.0  # every feature lies in [0, 5] (CE and KL are clamped there)


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
    ps = log_ps.exp()
    log_pt = F.log_softmax(t, -1)
    pt = log_pt.exp()
    yk = y.view(n, 1, 1).expand(n, k, 1)
    t_conf, t_arg = pt.max(-1)
    t_plab = pt.gather(-1, yk).squeeze(-1)
    t_ent = -(pt * log_pt).sum(-1) / log_c
    t_ce = (-log_pt.gather(-1, yk).squeeze(-1) / log_c).clamp(0, FEATURE_HIGH)
    t_kl = ((pt * (log_pt - log_ps.unsqueeze(1))).sum(-1) / log_c).clamp(0, FEATURE_HIGH)
    t_agree = (t_arg == y.view(n, 1)).float()
    top2 = ps.topk(2, -1).values if c > 1 else torch.cat([ps, torch.zeros_like(ps)], -1)
    s_feats = torch.stack([
        top2[:, 0],
        top2[:, 0] - top2[:, 1],
        -(ps * log_ps).sum(-1) / log_c,
        (-log_ps.gather(-1, y.view(n, 1)).squeeze(-1) / log_c).clamp(0, FEATURE_HIGH),
        torch.full((n,), float(progress), device=s.device),
    ], -1)  # [N, 5]
    t_feats = torch.stack([t_conf, t_plab, t_ent, t_ce, t_kl, t_agree], -1)  # [N, K, 6]
    return torch.cat([t_feats, s_feats.unsqueeze(1).expand(n, k, s_feats.shape[-1])], -1)


def view_features(view: UnitView) -> Tensor:
    """:func:`unit_features` of a gate's :class:`~metagate.gates.UnitView`."""
    if view.teacher_logits is None:
        raise ValueError("unit features need teacher logits")
    return unit_features(view.student_logits, view.teacher_logits, view.labels, view.progress)


def clamped_view_features(view: UnitView, cache: TeacherFeatureCache | None = None) -> Tensor:
    """Features of a gate's view clamped to ``[0, FEATURE_HIGH]``: from ``cache`` when it covers the
    view's units, else :func:`unit_features`."""
    if cache is not None and cache.covers(view):
        assert view.ids is not None
        log_ps = view.student_log_probs.float()  # the trainer reuses this log-softmax for the CE column
        return cache.flat_features(log_ps, view.ids, view.progress).view(-1, cache.num_teachers, NUM_FEATURES)
    return view_features(view).clamp_(0.0, FEATURE_HIGH)


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
    """

    def __init__(self, teacher_logits: Tensor, labels: Tensor) -> None:
        with torch.no_grad():
            t = teacher_logits.detach().float()
            n, k, c = t.shape
            if labels.shape != (n,):
                raise ValueError(f"labels must be [{n}], got {tuple(labels.shape)}")
            self.num_units, self.num_teachers, self.num_classes = n, k, c
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
            self.static = static.reshape(n, k * NUM_FEATURES).contiguous()
            # rows dotted with the student's log-probs each step: teachers' probabilities, the label's one-hot
            self.rows = torch.cat([pt, F.one_hot(y, c).to(pt.dtype).unsqueeze(1)], 1) / log_c  # [N, K+1, C]
            # u = [p_t . log p_s / log C (K), log p_s(y) / log C, top-1 p_s, top-2 p_s, sum p_s log p_s]
            mix = torch.zeros(k + 4, k, NUM_FEATURES, device=t.device)
            for j in range(k):
                mix[j, j, 4] = -1.0  # KL
            mix[k + 1, :, 6] = 1.0  # confidence
            mix[k + 1, :, 7], mix[k + 2, :, 7] = 1.0, -1.0  # margin
            mix[k + 3, :, 8] = -1.0 / log_c  # entropy
            mix[k, :, 9] = -1.0  # CE to the label
            self.mix = mix.reshape(k + 4, k * NUM_FEATURES)
            prog = torch.zeros(k, NUM_FEATURES, device=t.device)
            prog[:, 10] = 1.0
            self.progress_row = prog.reshape(-1)

    @classmethod
    def for_run(cls, run: Any) -> TeacherFeatureCache | None:
        """The cache of a run's teacher bank and training labels (``None`` without teachers)."""
        bank = getattr(run, "bank", None)
        if bank is None or run.train_y.ndim != 1:  # sequences: features from the view (no token cache yet)
            return None
        return cls(bank.logits, run.train_y)

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
            return self.flat_features(log_ps, ids, progress).view(-1, self.num_teachers, NUM_FEATURES)

    def view_features(self, view: UnitView) -> Tensor:
        """Clamped features of a gate's view: cached when :meth:`covers` holds, else :func:`unit_features`."""
        return clamped_view_features(view, self)
