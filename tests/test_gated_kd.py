"""``metagate.losses.gated_kd``: the one equation over a causal LM's tokens, dense and sparse top-k teachers."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from metagate.errors import InputError
from metagate.losses import SparseTeacher, gated_kd, sparse_kd_per_unit

B, T, V = 2, 5, 7


def _data(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    t1 = 2 * torch.randn(B, T, V, generator=g, dtype=torch.float64)
    t2 = torch.randn(B, T, V, generator=g, dtype=torch.float64)
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, 0] = -100  # a prompt token: unused after the shift anyway
    labels[1, 2] = -100  # a masked target
    labels[1, 4] = -100  # padding
    w = torch.rand(B, T, 3, generator=g, dtype=torch.float64)
    return s, t1, t2, labels, w


def _hand(s, teachers_full_logp, labels, w, tau, shift=True):
    """Token by token, in plain python over the vocabulary: the loss sum and the real-token count."""
    total, n = 0.0, 0
    for b in range(s.shape[0]):
        for t in range(s.shape[1] - (1 if shift else 0)):
            y = int(labels[b, t + 1 if shift else t])
            if y == -100:
                continue
            n += 1
            z = s[b, t].tolist()
            lse = math.log(sum(math.exp(x) for x in z))
            loss = w[b, t, 0].item() * (lse - z[y])
            zs = [x / tau for x in z]
            lse_s = math.log(sum(math.exp(x) for x in zs))
            for k, logp in enumerate(teachers_full_logp):
                lt = [x / tau for x in logp[b, t].tolist()]
                lse_t = math.log(sum(math.exp(x) for x in lt))
                kl = sum(math.exp(a - lse_t) * ((a - lse_t) - (c - lse_s)) for a, c in zip(lt, zs))
                loss += w[b, t, 1 + k].item() * tau * tau * kl
            total += loss
    return total, n


def test_dense_against_a_hand_computation_with_the_shift_and_ignored_labels():
    s, t1, t2, labels, w = _data()
    total, n = _hand(s, [t1, t2], labels, w, tau=2.0)
    assert n == 6  # 8 shifted targets, two of them -100
    got = gated_kd(s, [t1, t2], labels, w, tau=2.0)
    assert got.item() == pytest.approx(total / n, rel=1e-12)
    assert gated_kd(s, [t1, t2], labels, w, tau=2.0, reduction="sum").item() == pytest.approx(total, rel=1e-12)
    # gradient accumulation: the micro-batch's sum over the whole batch's count
    assert gated_kd(s, [t1, t2], labels, w, tau=2.0, num_items_in_batch=20).item() == pytest.approx(total / 20)
    assert gated_kd(s, [t1, t2], labels, w, tau=2.0, num_items_in_batch=torch.tensor(20)).item() == \
        pytest.approx(total / 20)
    # no shift: every position against its own label
    total0, n0 = _hand(s, [t1, t2], labels, w, tau=2.0, shift=False)
    assert gated_kd(s, [t1, t2], labels, w, tau=2.0, shift=False).item() == pytest.approx(total0 / n0, rel=1e-12)


def test_golden_value_of_one_token():
    """One position, V = 2, one teacher, the numbers by hand: CE = log(1 + e^-1), KL at tau = 1."""
    s = torch.tensor([[[1.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    t = torch.tensor([[[0.0, 0.0], [0.0, 0.0]]], dtype=torch.float64)
    labels = torch.tensor([[5, 0]]) % 2  # shifted target: label[1] = 0 for position 0
    q0 = math.exp(1) / (math.exp(1) + 1)
    ce = -math.log(q0)
    kl = 0.5 * math.log(0.5 / q0) + 0.5 * math.log(0.5 / (1 - q0))
    w = torch.tensor([[[0.3, 0.7], [0.0, 0.0]]], dtype=torch.float64)
    assert gated_kd(s, [t], labels, w, tau=1.0).item() == pytest.approx(0.3 * ce + 0.7 * kl, rel=1e-12)
    # weights=None: fixed's mix, alpha on the label
    assert gated_kd(s, t, labels, tau=1.0, alpha=0.2).item() == pytest.approx(0.2 * ce + 0.8 * kl, rel=1e-12)


def _topk(logits, k, tail="bucket", gold_labels=None):
    lp = F.log_softmax(logits, -1)
    vals, ids = lp.topk(k, -1)
    gold = None
    if gold_labels is not None:
        nxt = torch.cat([gold_labels[:, 1:], gold_labels[:, :1]], 1).clamp_min(0)
        gold = lp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
    return SparseTeacher(ids, vals, gold, tail)


@pytest.mark.parametrize("tail", ["bucket", "uniform"])
@pytest.mark.parametrize("tau", [1.0, 2.5])
def test_sparse_teacher_with_k_equal_v_is_the_dense_formula(tail, tau):
    s, t1, t2, labels, w = _data(1)
    dense = gated_kd(s, [t1, t2], labels, w, tau=tau)
    sparse = gated_kd(s, [_topk(t1, V, tail), _topk(t2, V, tail)], labels, w, tau=tau)
    assert sparse.item() == pytest.approx(dense.item(), rel=1e-12)
    # mixed: a dense and a sparse teacher
    assert gated_kd(s, [t1, _topk(t2, V, tail)], labels, w, tau=tau).item() == pytest.approx(dense.item(), rel=1e-12)
    # float32 top-k (what a bank stores): equal to float32 dense to rounding
    s32, t32 = s.float(), t1.float()
    d32 = gated_kd(s32, [t32], labels, tau=tau)
    assert gated_kd(s32, [_topk(t32, V, tail)], labels, tau=tau).item() == pytest.approx(d32.item(), rel=1e-5)


def test_sparse_columns_by_hand_below_v():
    """k = 2 of V = 4, tau = 1: the bucket and the uniform columns computed on paper."""
    s = torch.tensor([[0.5, -1.0, 0.0, 2.0]], dtype=torch.float64)
    p = torch.tensor([[0.5, 0.3, 0.15, 0.05]], dtype=torch.float64)
    te_b = SparseTeacher(torch.tensor([[0, 1]]), p[:, :2].log(), None, "bucket")
    te_u = SparseTeacher(torch.tensor([[0, 1]]), p[:, :2].log(), None, "uniform")
    q = torch.softmax(s, -1)[0].tolist()
    r, qt = 0.2, q[2] + q[3]
    bucket = 0.5 * math.log(0.5 / q[0]) + 0.3 * math.log(0.3 / q[1]) + r * math.log(r / qt)
    uniform = 0.5 * math.log(0.5 / q[0]) + 0.3 * math.log(0.3 / q[1]) + 0.1 * math.log(0.1 / q[2]) \
        + 0.1 * math.log(0.1 / q[3])
    assert sparse_kd_per_unit(s, te_b, 1.0).item() == pytest.approx(bucket, rel=1e-12)
    assert sparse_kd_per_unit(s, te_u, 1.0).item() == pytest.approx(uniform, rel=1e-12)
    # tau = 2: the bucket tempered as one token of mass 0.2; the uniform tail as two tokens of 0.1
    q2 = torch.softmax(s / 2, -1)[0].tolist()
    zb = 0.5**0.5 + 0.3**0.5 + 0.2**0.5
    pb = [0.5**0.5 / zb, 0.3**0.5 / zb, 0.2**0.5 / zb]
    bucket2 = 4 * sum(a * math.log(a / b) for a, b in zip(pb, [q2[0], q2[1], q2[2] + q2[3]]))
    assert sparse_kd_per_unit(s, te_b, 2.0).item() == pytest.approx(bucket2, rel=1e-12)
    z = 0.5**0.5 + 0.3**0.5 + 2 * 0.1**0.5
    pt = [0.5**0.5 / z, 0.3**0.5 / z, 0.1**0.5 / z, 0.1**0.5 / z]
    uniform2 = 4 * sum(a * math.log(a / b) for a, b in zip(pt, q2))
    assert sparse_kd_per_unit(s, te_u, 2.0).item() == pytest.approx(uniform2, rel=1e-12)
    # the stated bound: full KL = bucket KL + r * KL(tail shapes), so the bucket is short by exactly that
    full = sum(pi * math.log(pi / qi) for pi, qi in zip(p[0].tolist(), q))
    tails = (0.15 / r) * math.log((0.15 / r) / (q[2] / qt)) + (0.05 / r) * math.log((0.05 / r) / (q[3] / qt))
    assert full == pytest.approx(bucket + r * tails, rel=1e-12)


def test_padding_and_ignored_tokens_never_change_the_loss():
    s, t1, t2, labels, w = _data(2)
    te = _topk(t2, 3, "uniform")
    base = gated_kd(s, [t1, te], labels, w, tau=2.0)
    ignored = torch.zeros(B, T, dtype=torch.bool)
    ignored[:, :-1] = labels[:, 1:] == -100  # the logit positions whose target is -100
    g = torch.Generator().manual_seed(9)
    s2 = torch.where(ignored.unsqueeze(-1), 1e3 * torch.randn(B, T, V, generator=g, dtype=s.dtype), s)
    t12 = torch.where(ignored.unsqueeze(-1), torch.randn(B, T, V, generator=g, dtype=s.dtype), t1)
    w2 = torch.where(ignored.unsqueeze(-1), torch.full_like(w, 7.0), w)
    assert gated_kd(s2, [t12, te], labels, w2, tau=2.0).item() == base.item()
    # appending a padded position changes nothing
    pad = lambda x, v: torch.cat([x, torch.full_like(x[:, :1], v)], 1)  # noqa: E731
    s3 = torch.cat([s, torch.randn(B, 1, V, dtype=s.dtype)], 1)
    t13 = torch.cat([t1, torch.randn(B, 1, V, dtype=s.dtype)], 1)
    te3 = SparseTeacher(pad(te.ids, 0), pad(te.logprobs, -1.0), None, "uniform")
    got = gated_kd(s3, [t13, te3], pad(labels, -100), pad(w, 1.0), tau=2.0)
    assert got.item() == pytest.approx(base.item(), rel=1e-12)
    none = gated_kd(s, [t1, te], labels, w, tau=2.0, reduction="none")
    assert none.shape == (B, T - 1) and (none[labels[:, 1:] == -100] == 0).all()


def test_gradient_reaches_the_student_only_at_real_tokens():
    s, t1, _, labels, w = _data(3)
    s = s.requires_grad_()
    gated_kd(s, [_topk(t1, 3)], labels, w[..., :2], tau=2.0).backward()
    ignored = torch.ones(B, T, dtype=torch.bool)
    ignored[:, :-1] = labels[:, 1:] == -100
    assert (s.grad[ignored] == 0).all() and (s.grad[~ignored].abs().sum(-1) > 0).all()


def test_clear_errors_naming_sizes():
    s, t1, _, labels, _ = _data()
    with pytest.raises(InputError, match=r"teacher 0 has V = 9 tokens, the student V = 7"):
        gated_kd(s, [torch.randn(B, T, 9, dtype=s.dtype)], labels, tau=1.0)
    with pytest.raises(InputError, match=r"k = 8 .* V = 7"):
        big = SparseTeacher(torch.zeros(B, T, 8, dtype=torch.long), torch.full((B, T, 8), -3.0))
        gated_kd(s, [big], labels, tau=1.0)
    with pytest.raises(InputError, match=r"reach 12, outside the student's vocabulary of V = 7"):
        other = SparseTeacher(torch.full((B, T, 2), 12), torch.full((B, T, 2), -1.0))
        gated_kd(s, [other], labels, tau=1.0)
    with pytest.raises(InputError, match=r"covers positions \(2, 4\)"):
        gated_kd(s, [_topk(t1[:, :4], 2)], labels, tau=1.0)
    with pytest.raises(InputError, match=r"labels out of range"):
        gated_kd(s, [t1], labels.clamp_min(0) + V, tau=1.0)
    with pytest.raises(InputError, match=r"weights must be \[B, T, 1\+K\] = \[2, 5, 2\]"):
        gated_kd(s, [t1], labels, torch.ones(B, T, 3), tau=1.0)
    with pytest.raises(InputError, match="tau"):
        gated_kd(s, [t1], labels, tau=0.0)
