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


def _sig(z: float) -> float:
    return 1 / (1 + math.exp(-z))


# Golden values by hand, tau = 1.5, C = 2, K = 1, gold = class 0 everywhere (E1, E2, E4 of hard.py).
# Two-class softmax: p(0) = sigmoid(z0 - z1). Teacher at tau: q(0) = sigmoid((t0 - t1) / 1.5).
#   seq 0, tok 0: student [2, 0] -> p = sig(2) = 0.8808; teacher [1.5, 0] -> q = sig(1) = 0.7311 -> E1: 1
#   seq 0, tok 1: student [0, 0] -> p = 0.5;             teacher [0.9, 0] -> q = sig(0.6) = 0.6457 -> E1: 0
#   seq 0, tok 2: padding (absurd logits), mask 0                                              -> 0
#   E2 seq 0: ln 0.8808 + ln 0.5 = -0.8200 < ln 0.7311 + ln 0.6457 = -0.7507 -> 0 on both tokens
#   seq 1, tok 0: student [3, 0] -> p = sig(3) = 0.9526; teacher as seq 0         -> E1: 1
#   seq 1, tok 1: as seq 0 tok 1                                                   -> E1: 0
#   E2 seq 1: ln 0.9526 + ln 0.5 = -0.7417 > -0.7507 -> 1 on both real tokens
def _golden():
    s = torch.tensor([[[2.0, 0.0], [0.0, 0.0], [-40.0, 40.0]], [[3.0, 0.0], [0.0, 0.0], [40.0, -40.0]]])
    t = torch.tensor([[[1.5, 0.0], [0.9, 0.0], [0.0, 30.0]], [[1.5, 0.0], [0.9, 0.0], [30.0, 0.0]]]).unsqueeze(2)
    y = torch.zeros(2, 3, dtype=torch.long)
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    return s, t, y, mask


def test_golden_token_gate_by_hand():
    s, t, y, mask = _golden()
    assert _sig(2) > _sig(1) and 0.5 < _sig(0.6)  # the hand comparisons above
    g = hard_gate_decision(s, t, y, mask, level="token", teacher_tau=1.5)
    torch.testing.assert_close(g, torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]]))


def test_golden_sentence_gate_by_hand():
    s, t, y, mask = _golden()
    teacher = math.log(_sig(1)) + math.log(_sig(0.6))
    assert round(teacher, 4) == -0.7507
    assert math.log(_sig(2)) + math.log(0.5) < teacher < math.log(_sig(3)) + math.log(0.5)
    g = hard_gate_decision(s, t, y, mask, level="sentence", teacher_tau=1.5)
    torch.testing.assert_close(g, torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 0.0]]))


def test_teacher_temperature_decides_golden_token():
    # student p = sig(2) = 0.8808; teacher [2.4, 0]: at tau=1 q = sig(2.4) = 0.9168 > p -> label (0);
    # at tau=1.5 q = sig(1.6) = 0.8320 < p -> teacher (1): the temperature is on the teacher only (E4)
    s = torch.tensor([[[2.0, 0.0]]])
    t = torch.tensor([[[[2.4, 0.0]]]])
    y, m = torch.zeros(1, 1, dtype=torch.long), torch.ones(1, 1)
    assert hard_gate_decision(s, t, y, m, teacher_tau=1.0).item() == 0.0
    assert hard_gate_decision(s, t, y, m, teacher_tau=1.5).item() == 1.0


def test_kd_column_student_at_tau_one_by_hand():
    """E3/E4: the gate's KD column is KL(softmax(t/tau) || softmax(s)), no tau^2; the option gives Hinton's."""
    from metagate.losses import unit_losses

    s = torch.tensor([[2.0, 0.0]])
    t = torch.tensor([[[2.4, 0.0]]])
    y = torch.zeros(1, dtype=torch.long)
    q, p = _sig(1.6), _sig(2.0)
    kl_paper = q * math.log(q / p) + (1 - q) * math.log((1 - q) / (1 - p))
    ps = _sig(2.0 / 1.5)
    kl_hinton = 1.5**2 * (q * math.log(q / ps) + (1 - q) * math.log((1 - q) / (1 - ps)))
    assert round(kl_paper, 5) == 0.01022 and round(kl_hinton, 5) == 0.01185
    view = UnitView(s, t, y, torch.ones(1), None, (1, 1))
    out = HardGate(hard_tau=1.5).weights(view)
    assert (out.tau, out.student_tau) == (1.5, 1.0)
    cols = unit_losses(s, t, y, out.tau, student_tau=out.student_tau)
    assert cols[0, 1].item() == pytest.approx(kl_paper, rel=1e-5)
    assert cols[0, 0].item() == pytest.approx(-math.log(p), rel=1e-6)
    out_h = HardGate(hard_tau=1.5, hard_temper_student=True).weights(view)
    assert out_h.student_tau is None  # the trainer then puts the student at tau as well
    cols_h = unit_losses(s, t, y, out_h.tau, student_tau=out_h.student_tau)
    assert cols_h[0, 1].item() == pytest.approx(kl_hinton, rel=1e-5)


def test_trainer_step_uses_the_gates_student_temperature(digits_noisy, digits_bank):
    from metagate.losses import unit_losses
    from metagate.trainer import TrainConfig, Trainer

    bank, _ = digits_bank
    for temper, st in ((False, 1.0), (True, None)):
        tr = Trainer(digits_noisy, digits_noisy.make_student(), HardGate(hard_tau=1.5, hard_temper_student=temper), bank,
                     TrainConfig(device="cpu", progress=False))
        batch = next(tr.epoch_batches(0))
        with torch.no_grad():
            z = tr.student(batch.x)
        res = tr.train_step(batch)
        expect = unit_losses(z, bank.lookup(batch.ids), batch.y, 1.5, student_tau=st)
        torch.testing.assert_close(res.losses, expect, rtol=1e-5, atol=1e-6)


def test_length_norm_option_is_gone():
    # dividing both sides of E2 by one length never changes a decision; the option was removed
    with pytest.raises((ConfigError, TypeError), match="hard_length_norm"):
        HardGate(hard_length_norm=True)


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
    gate = HardGate(hard_tau=1.5)
    tr = Trainer(digits_noisy, digits_noisy.make_student(), gate, bank, TrainConfig(device="cpu", progress=False))
    batch = next(tr.epoch_batches(0))
    view = tr.make_view(batch, tr.student(batch.x))
    fast = gate.weights(view).weights
    slow = HardGate(hard_tau=1.5).weights(view).weights  # no setup() -> generic path
    torch.testing.assert_close(fast, slow)
    assert 0 < fast[:, 0].mean() < 1


def test_fast_path_weights_in_the_students_dtype(digits_noisy, digits_bank):
    from types import SimpleNamespace

    bank, _ = digits_bank
    student = digits_noisy.make_student().double()
    gate = HardGate(hard_tau=1.5)
    gate.setup(SimpleNamespace(bank=bank, train_y=digits_noisy.train.y, dtype=torch.float64))
    ids = torch.arange(64)
    logits = student(digits_noisy.train.x[ids].double())
    view = UnitView(logits, bank.lookup(ids), digits_noisy.train.y[ids], torch.ones(64), ids, (64, 1),
                    num_teachers=bank.num_teachers)
    fast = gate.weights(view).weights
    assert fast.dtype == torch.float64
    slow = HardGate(hard_tau=1.5).weights(view).weights  # no setup() -> generic path, cast to the logits' dtype
    torch.testing.assert_close(fast, slow)


@pytest.mark.parametrize("kw", [{"hard_level": "doc"}, {"hard_reference": "teacher"}, {"hard_tau": 0}])
def test_bad_options(kw):
    with pytest.raises(ConfigError, match=next(iter(kw)).replace("_", "-")):
        HardGate(**kw)


def test_fixed_tau_reproduces_the_uncalibrated_gate_exactly(tmp_path):
    """``--hard-tau 1.5`` is the gate as it was before calibrated teachers became the default: a two-epoch
    digits run (40% noise) gives the golden numbers of the previous default, bit for bit; the calibrated
    default decides differently (less label weight on the corrupted units). Teachers are trained here, on one
    thread, into the test's own cache: a convolution's float sums depend on the thread count, and the session's
    cache may hold teachers trained on two."""
    from metagate.run import DistillConfig, run_distill
    from metagate.trainer import TrainConfig

    def run(opts, name):
        cfg = DistillConfig(task="digits", noise=0.4, gate="hard", gate_options=opts, logdir=str(tmp_path / name),
                            cache_dir=str(tmp_path / "cache"), train=TrainConfig(epochs=2, device="cpu", progress=False))
        return run_distill(cfg)

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _golden_and_calibrated(run)
    finally:
        torch.set_num_threads(threads)


def _golden_and_calibrated(run):
    old = run({"hard_tau": 1.5}, "fixed")
    assert old["test/acc"] == 0.4288888888888889 and old["test/nll"] == 2.082245810243371
    assert old["gate/mean_w_label"] == 0.7605285048484802 and old["diag/w_label_corrupted"] == 0.40082645416259766
    new = run({}, "calibrated")
    assert new["diag/w_label_corrupted"] < 0.2 < old["diag/w_label_corrupted"]


def test_hard_tau_takes_a_number_or_calibrated():
    assert HardGate().teacher_calibration == "temperature" and HardGate(hard_tau="calibrated").teacher_tau == 1.0
    g = HardGate(hard_tau="2")  # the command line's text
    assert (g.teacher_calibration, g.teacher_tau, g.gauge_tau) == (None, 2.0, 2.0)
    with pytest.raises(ConfigError, match=r"--hard-tau \(HardConfig\) must be a number or one of calibrated, got .warm."):
        HardGate(hard_tau="warm")
