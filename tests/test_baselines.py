"""The rule baselines' weight tables against hand-computed values, and best-teacher's choice."""

from __future__ import annotations

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
