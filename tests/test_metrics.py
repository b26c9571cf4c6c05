"""Metrics against straightforward independent computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metagate.metrics import auroc, classification_metrics, ece_mce, reliability_figure


def _ece_loop(probs: np.ndarray, labels: np.ndarray, n_bins: int = 15) -> tuple[float, float]:
    """Textbook ECE/MCE: python loops, bins (lo, hi], confidence 0 goes to the first bin."""
    conf = probs.max(1)
    pred = probs.argmax(1)
    ece, mce, n = 0.0, 0.0, len(labels)
    for b in range(n_bins):
        lo, hi = b / n_bins, (b + 1) / n_bins
        members = [i for i in range(n) if (lo < conf[i] <= hi) or (b == 0 and conf[i] == 0)]
        if not members:
            continue
        acc = np.mean([pred[i] == labels[i] for i in members])
        avg = np.mean([conf[i] for i in members])
        ece += len(members) / n * abs(acc - avg)
        mce = max(mce, abs(acc - avg))
    return ece, mce


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_ece_mce_match_loop_implementation(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(500, 7, generator=g, dtype=torch.float64) * (1 + seed)
    labels = torch.randint(0, 7, (500,), generator=g)
    probs = torch.softmax(logits, -1)
    ece, mce = ece_mce(probs, labels)
    ref_ece, ref_mce = _ece_loop(probs.numpy(), labels.numpy())
    assert ece == pytest.approx(ref_ece, abs=1e-10)
    assert mce == pytest.approx(ref_mce, abs=1e-10)


def test_perfect_calibration_has_zero_ece():
    probs = torch.tensor([[1.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    assert ece_mce(probs, torch.tensor([0, 1])) == (0.0, 0.0)


def test_classification_metrics_values():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [3.0, 0.0]])
    labels = torch.tensor([0, 1, 1])
    m = classification_metrics(logits, labels)
    p = torch.softmax(logits.double(), -1)
    assert m["acc"] == pytest.approx(2 / 3)
    assert m["nll"] == pytest.approx(float(-p[torch.arange(3), labels].log().mean()))
    onehot = torch.nn.functional.one_hot(labels, 2).double()
    assert m["brier"] == pytest.approx(float(((p - onehot) ** 2).sum(1).mean()))


def test_masked_units_are_dropped():
    logits = torch.tensor([[2.0, 0.0], [0.0, 5.0]])
    m = classification_metrics(logits, torch.tensor([0, 0]), mask=torch.tensor([1, 0]))
    assert m["acc"] == 1.0


def test_auroc_matches_pairwise_definition():
    g = torch.Generator().manual_seed(0)
    s = torch.randint(0, 6, (120,), generator=g).float()  # many ties
    pos = torch.rand(120, generator=g) < 0.3
    sp, sn = s[pos], s[~pos]
    pairwise = ((sp[:, None] > sn[None]).double() + 0.5 * (sp[:, None] == sn[None]).double()).mean()
    assert auroc(s, pos) == pytest.approx(float(pairwise), abs=1e-12)
    assert np.isnan(auroc(s, torch.zeros(120, dtype=torch.bool)))


def test_reliability_figure_renders():
    probs = torch.softmax(torch.randn(200, 5), -1)
    fig = reliability_figure(probs, torch.randint(0, 5, (200,)), "x")
    assert "ECE" in fig.axes[0].get_title()
