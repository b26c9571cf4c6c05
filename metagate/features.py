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

import torch
import torch.nn.functional as F
from torch import Tensor

from metagate.gates.base import UnitView

TEACHER_FEATURES = ("t_conf", "t_p_label", "t_entropy", "t_ce", "t_kl", "t_agree")
STUDENT_FEATURES = ("s_conf", "s_margin", "s_entropy", "s_ce", "progress")
FEATURE_NAMES = TEACHER_FEATURES + STUDENT_FEATURES
NUM_FEATURES = len(FEATURE_NAMES)


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
    t_ce = (-log_pt.gather(-1, yk).squeeze(-1) / log_c).clamp(0, 5)
    t_kl = ((pt * (log_pt - log_ps.unsqueeze(1))).sum(-1) / log_c).clamp(0, 5)
    t_agree = (t_arg == y.view(n, 1)).float()
    top2 = ps.topk(2, -1).values if c > 1 else torch.cat([ps, torch.zeros_like(ps)], -1)
    s_feats = torch.stack([
        top2[:, 0],
        top2[:, 0] - top2[:, 1],
        -(ps * log_ps).sum(-1) / log_c,
        (-log_ps.gather(-1, y.view(n, 1)).squeeze(-1) / log_c).clamp(0, 5),
        torch.full((n,), float(progress), device=s.device),
    ], -1)  # [N, 5]
    t_feats = torch.stack([t_conf, t_plab, t_ent, t_ce, t_kl, t_agree], -1)  # [N, K, 6]
    return torch.cat([t_feats, s_feats.unsqueeze(1).expand(n, k, s_feats.shape[-1])], -1)


def view_features(view: UnitView) -> Tensor:
    """:func:`unit_features` of a gate's :class:`~metagate.gates.UnitView`."""
    if view.teacher_logits is None:
        raise ValueError("unit features need teacher logits")
    return unit_features(view.student_logits, view.teacher_logits, view.labels, view.progress)
