"""HKD hard gate on hand-made logits: token and sentence level, gold and pred reference, padding."""

from __future__ import annotations

import math

import pytest
import torch

from metagate.errors import ConfigError
from metagate.gates import UnitView
from metagate.gates.hard import HardGate, hard_gate_decision

BIG = 10.0
# B=2 sequences, T=3 tokens, C=3 classes, K=2 teachers. Gold labels:
Y = torch.tensor([[0, 1, 2], [1, 1, 0]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])  # last token of sequence 2 is padding


def _logits():
    s = torch.zeros(2, 3, 3)
    t = torch.zeros(2, 3, 2, 3)
    s[0, 0, 0] = BIG  # confident on gold; teachers uniform -> over-confident -> teacher (1)
    t[0, 1, :, 1] = BIG  # student uniform, teachers sure of gold -> label (0)
    s[0, 2, 2] = 1.0  # student p(gold)=0.576; teachers: one sure of gold, one sure of class 0
    t[0, 2, 0, 2] = BIG
    t[0, 2, 1, 0] = BIG  # mean teacher p(gold) ~= 0.5 -> student higher -> teacher (1)
    s[1, 0, 2] = BIG  # student sure of the WRONG class; teachers uniform: p_s(gold) ~ 0 -> label (0)
    s[1, 1, 1] = 2.0  # p_s(gold) = 0.787 vs uniform teachers 1/3 -> teacher (1)
    s[1, 2, 1] = BIG  # padding: whatever it is, gate must be 0
    return s, t


def test_token_level_gold_reference():
    s, t = _logits()
    g = hard_gate_decision(s, t, Y, MASK, level="token", reference="gold", teacher_tau=1.0)
    torch.testing.assert_close(g, torch.tensor([[1.0, 0.0, 1.0], [0.0, 1.0, 0.0]]))


def test_token_level_pred_reference_uses_student_argmax():
    s, t = _logits()
    g = hard_gate_decision(s, t, Y, MASK, level="token", reference="pred", teacher_tau=1.0)
    # (0,1): uniform student, argmax 0 with p = 1/3; teachers put p ~ 4.5e-5 on class 0 -> teacher.
    # (1,0): student sure of class 2 (its own argmax) vs teachers' uniform 1/3 -> teacher.
    torch.testing.assert_close(g, torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]))
    gold = hard_gate_decision(s, t, Y, MASK, level="token", reference="gold", teacher_tau=1.0)
    assert gold[0, 1].item() == 0.0 and gold[1, 0].item() == 0.0  # the two units where they differ


def test_sentence_level_sums_unmasked_log_probs():
    s, t = _logits()
    g = hard_gate_decision(s, t, Y, MASK, level="sentence", reference="gold", teacher_tau=1.0)
    ls = torch.log_softmax(s, -1).gather(-1, Y.unsqueeze(-1)).squeeze(-1)
    lt = torch.softmax(t, -1).mean(-2).gather(-1, Y.unsqueeze(-1)).squeeze(-1).log()
    m = MASK.float()
    expect = ((ls * m).sum(1) > (lt * m).sum(1)).float()
    # seq 1: student log-probs ~ (0, -1.1, -0.55) vs teachers (-1.1, 0, -0.69): -1.65 > -1.79 -> 1
    # seq 2: (-10, -0.24) vs (-1.1, -1.1): -10.2 < -2.2 -> 0
    torch.testing.assert_close(expect, torch.tensor([1.0, 0.0]))
    torch.testing.assert_close(g, expect.unsqueeze(1) * m)


def test_sentence_level_ignores_padding_content():
    s, t = _logits()
    s2 = s.clone()
    s2[1, 2] = torch.tensor([-50.0, 50.0, 0.0])  # change only the padded token
    for level in ("token", "sentence"):
        a = hard_gate_decision(s, t, Y, MASK, level=level)
        b = hard_gate_decision(s2, t, Y, MASK, level=level)
        torch.testing.assert_close(a, b)


def test_length_normalisation_changes_sentence_decision():
    # seq A: 1 token; seq B: 4 tokens. Sums favour the short sequence, means do not.
    s = torch.zeros(1, 4, 2)
    t = torch.zeros(1, 4, 1, 2)
    y = torch.zeros(1, 4, dtype=torch.long)
    s[0, :, 0] = 1.0  # student p(gold) = 0.731 each token
    t[0, 0, 0, 0] = 3.0  # teacher very sure on token 0 only
    mask = torch.ones(1, 4)
    raw = hard_gate_decision(s, t, y, mask, level="sentence", teacher_tau=1.0)
    norm = hard_gate_decision(s, t, y, mask, level="sentence", teacher_tau=1.0, length_norm=True)
    ls = 4 * math.log(1 / (1 + math.exp(-1)))
    lt = math.log(1 / (1 + math.exp(-3))) + 3 * math.log(0.5)
    assert raw[0, 0].item() == float(ls > lt) == norm[0, 0].item()  # same ordering under a constant length


def test_teacher_temperature_flattens_teacher():
    s = torch.zeros(1, 1, 3)
    s[0, 0, 0] = 1.0  # p_s(gold) = 0.576
    t = torch.zeros(1, 1, 1, 3)
    t[0, 0, 0, 0] = 1.5  # at tau=1 p_t = 0.691 > 0.576 -> label; at tau=3 p_t = 0.452 < 0.576 -> teacher
    y = torch.zeros(1, 1, dtype=torch.long)
    m = torch.ones(1, 1)
    assert hard_gate_decision(s, t, y, m, teacher_tau=1.0).item() == 0.0
    assert hard_gate_decision(s, t, y, m, teacher_tau=3.0).item() == 1.0


def test_gate_weights_split_kd_share_equally_between_teachers():
    s, t = _logits()
    view = UnitView(s.reshape(6, 3), t.reshape(6, 2, 3), Y.reshape(6), MASK.reshape(6).float(), None, (2, 3))
    out = HardGate(hard_tau=1.0).weights(view)
    g = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 0.0])
    torch.testing.assert_close(out.weights, torch.stack([1 - g, g / 2, g / 2], 1))
    assert out.tau == 1.0


def test_fast_path_matches_pure_function(digits_noisy, digits_bank):
    from metagate.trainer import TrainConfig, Trainer

    bank, _ = digits_bank
    gate = HardGate()
    tr = Trainer(digits_noisy, digits_noisy.make_student(), gate, bank, TrainConfig(device="cpu", progress=False))
    batch = next(tr.epoch_batches(0))
    view = tr.make_view(batch, tr.student(batch.x))
    fast = gate.weights(view).weights
    slow = HardGate().weights(view).weights  # no setup() -> generic path
    torch.testing.assert_close(fast, slow)
    assert 0 < fast[:, 0].mean() < 1


def test_fast_path_weights_in_the_students_dtype(digits_noisy, digits_bank):
    from types import SimpleNamespace

    bank, _ = digits_bank
    student = digits_noisy.make_student().double()
    gate = HardGate()
    gate.setup(SimpleNamespace(bank=bank, train_y=digits_noisy.train.y, dtype=torch.float64))
    ids = torch.arange(64)
    logits = student(digits_noisy.train.x[ids].double())
    view = UnitView(logits, bank.lookup(ids), digits_noisy.train.y[ids], torch.ones(64), ids, (64, 1),
                    num_teachers=bank.num_teachers)
    fast = gate.weights(view).weights
    assert fast.dtype == torch.float64
    slow = HardGate().weights(view).weights  # no setup() -> generic path, cast to the logits' dtype
    torch.testing.assert_close(fast, slow)


@pytest.mark.parametrize("kw", [{"hard_level": "doc"}, {"hard_reference": "teacher"}, {"hard_tau": 0}])
def test_bad_options(kw):
    with pytest.raises(ConfigError, match=next(iter(kw)).replace("_", "-")):
        HardGate(**kw)
