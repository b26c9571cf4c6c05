"""The rule baselines' weight tables against hand-computed values, and best-teacher's choice."""

from __future__ import annotations

import math

import pytest
import torch

from metagate.errors import ConfigError
from metagate.gates.baselines import BestTeacherGate, conf_teachers_table, label_filter_table
from metagate.gates.tuned import FixedTunedConfig


def _probs() -> torch.Tensor:
    # 2 units, 2 teachers, 3 classes
    return torch.tensor([[[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]],
                         [[0.1, 0.6, 0.3], [0.2, 0.2, 0.6]]], dtype=torch.float64)


def test_label_filter_cuts_the_label_where_the_ensemble_disagrees():
    # ensemble means: unit 0 (0.6, 0.25, 0.15) -> class 0; unit 1 (0.15, 0.4, 0.45) -> class 2
    w = label_filter_table(_probs(), torch.tensor([0, 1]), alpha=0.3)
    assert torch.allclose(w, torch.tensor([[0.3, 0.35, 0.35], [0.0, 0.5, 0.5]], dtype=torch.float64))


def test_conf_teachers_weights_each_teacher_by_its_probability_of_the_label():
    w = conf_teachers_table(_probs(), torch.tensor([0, 1]), alpha=0.2)
    # unit 0: p(y) = 0.7, 0.5 -> shares 7/12, 5/12; unit 1: p(y) = 0.6, 0.2 -> 3/4, 1/4
    expect = torch.tensor([[0.2, 0.8 * 7 / 12, 0.8 * 5 / 12], [0.2, 0.8 * 0.75, 0.8 * 0.25]], dtype=torch.float64)
    assert torch.allclose(w, expect)
    assert torch.allclose(w.sum(1), torch.ones(2, dtype=torch.float64))


def test_best_teacher_is_chosen_on_select_and_never_the_planted_one():
    stats = [{"name": "cnn16", "select_acc": 0.91}, {"name": "cnn24", "select_acc": 0.93},
             {"name": "adv-cnn16", "select_acc": float("nan")}]
    assert BestTeacherGate.choose(stats) == {"best_teacher": "cnn24"}
    with pytest.raises(ConfigError, match="select accuracy"):
        BestTeacherGate.choose([{"name": "adv", "select_acc": float("nan")}])


def test_fixed_tuned_grid():
    cfg = FixedTunedConfig(alpha_grid="0.1/0.9", tau_grid="4", lr_scales="0.5/2")
    assert cfg.grid(0.1) == [{"alpha": 0.1, "tau": 4.0, "lr": 0.05}, {"alpha": 0.1, "tau": 4.0, "lr": 0.2},
                             {"alpha": 0.9, "tau": 4.0, "lr": 0.05}, {"alpha": 0.9, "tau": 4.0, "lr": 0.2}]
    with pytest.raises(ConfigError, match="--alpha-grid"):
        FixedTunedConfig(alpha_grid="0.1/1.5")


def test_ca_mkd_worked_example():
    """p(y) = (.9, .05, .05): CE = (0.105, 3.0, 3.0), softmax (0.027, 0.487, 0.487), 1 - it over K - 1 = 2."""
    from metagate.gates.baselines import ca_mkd_attention, ca_mkd_table

    probs = torch.tensor([[[0.9, 0.1], [0.05, 0.95], [0.05, 0.95]]], dtype=torch.float64)
    y = torch.tensor([0])
    a = ca_mkd_attention(probs, y)
    e = [math.exp(-math.log(p)) for p in (0.9, 0.05, 0.05)]  # exp(CE_k) = 1 / p_k(y)
    expect = [(1 - v / sum(e)) / 2 for v in e]
    assert torch.allclose(a, torch.tensor([expect], dtype=torch.float64))
    assert [round(v, 2) for v in a[0].tolist()] == [0.49, 0.26, 0.26]
    # the code's rows: label weight gamma = 1, teacher k alpha a_k / K (alpha = 1); "unit" scales them to sum 1
    w = ca_mkd_table(probs, y)
    assert torch.allclose(w, torch.tensor([[1.0, *(v / 3 for v in expect)]], dtype=torch.float64))
    assert w.sum().item() == pytest.approx(1 + 1 / 3)
    wu = ca_mkd_table(probs, y, mass="unit")
    assert wu.sum().item() == pytest.approx(1.0) and wu[0, 0].item() == pytest.approx(0.75)
    # conf-teachers, its own definition: the teachers' probabilities of the label, normalised
    c = conf_teachers_table(probs, y, alpha=0.0)
    assert torch.allclose(c[0, 1:], torch.tensor([0.9, 0.05, 0.05], dtype=torch.float64))


def test_ca_mkd_needs_two_teachers_and_defaults_follow_the_code():
    from metagate.gates.baselines import CAMKDGate, ca_mkd_attention

    with pytest.raises(ConfigError, match="K >= 2"):
        ca_mkd_attention(torch.ones(2, 1, 3) / 3, torch.tensor([0, 1]))
    g = CAMKDGate()
    assert (g.config.ca_mkd_label_weight, g.config.ca_mkd_kd_weight, g.config.ca_mkd_tau,
            g.config.ca_mkd_mass) == (1.0, 1.0, 4.0, "code")


def test_oracle_tables_on_hand_made_truth():
    from metagate.gates.oracle import oracle_filter_table, oracle_teachers_table

    w = oracle_filter_table(torch.tensor([False, True]), 2, alpha=0.3)
    assert torch.allclose(w, torch.tensor([[0.3, 0.35, 0.35], [0.0, 0.5, 0.5]], dtype=torch.float64))
    right = torch.tensor([[True, False, True], [False, False, False], [False, True, False]])
    w = oracle_teachers_table(right, alpha=0.4)
    expect = torch.tensor([[0.4, 0.3, 0.0, 0.3], [0.4, 0.2, 0.2, 0.2], [0.4, 0.0, 0.6, 0.0]], dtype=torch.float64)
    assert torch.allclose(w, expect)


def test_oracle_gates_in_a_run_read_the_recorded_truth(digits_noisy, digits_bank):
    """Through the trainer: oracle-filter's label weight is 0 exactly on the corrupted units, oracle-teachers'
    KD weight sits on the teachers right against the clean label."""
    from metagate.gates.oracle import OracleFilterGate, OracleTeachersGate
    from metagate.trainer import TrainConfig, Trainer

    bank, _ = digits_bank
    cfg = TrainConfig(device="cpu", progress=False, epochs=1)
    tr = Trainer(digits_noisy, digits_noisy.make_student(), OracleFilterGate(alpha=0.5), bank, cfg)
    t = tr.gate._table  # noqa: SLF001
    assert torch.equal(t[:, 0] == 0, digits_noisy.corrupted) and float(t.sum(1).min()) == pytest.approx(1.0)
    tr = Trainer(digits_noisy, digits_noisy.make_student(), OracleTeachersGate(alpha=0.5), bank, cfg)
    t = tr.gate._table  # noqa: SLF001
    right = (bank.logits.argmax(-1) == digits_noisy.clean_train_labels.view(-1, 1))
    some = right.any(1)
    assert torch.equal(t[some, 1:] > 0, right[some]) and bool((t[~some, 1:] > 0).all())
    assert OracleFilterGate.oracle and not OracleFilterGate.baseline
