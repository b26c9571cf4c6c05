"""The compare's summary columns on hand-made rows: weight mass per unit, oracle kind, headroom share, headline."""

from __future__ import annotations

import pytest

from metagate.compare.outputs import headline, results_table
from metagate.compare.summary import row_mass, summarise


def _row(label, gate, seed, acc, weights):
    m = {"test/acc": acc, "test/nll": 1.0, "test/ece": 0.1, "gate/mean_w_label": weights[0]}
    m.update({f"gate/mean_w_teacher{k}": w for k, w in enumerate(weights[1:])})
    return {"label": label, "gate": gate, "seed": seed, "options": {}, "metrics": m,
            "time": {"per_epoch": 1.0, "steps_per_epoch": 10}}


def test_mass_kind_headroom_and_headline():
    rows = []
    for seed, d in enumerate((0.0, 0.01, -0.01)):
        rows += [_row("fixed", "fixed", seed, 0.80 + d, (0.5, 0.25, 0.25)),
                 _row("ca-mkd", "ca-mkd", seed, 0.81 + d, (1.0, 0.2, 0.13)),  # the code's mass 1 + 1/K
                 _row("meta", "meta", seed, 0.83 + d, (0.1, 0.9, 0.9, 0.9)[:3]),
                 _row("oracle-filter", "oracle-filter", seed, 0.90 + d, (0.3, 0.35, 0.35))]
    s = summarise(rows, {"fixed": True, "ca-mkd": True, "meta": False, "oracle-filter": False})
    g = s["gates"]
    # mass: the per-unit total weight is the sum of the column means (hand: 0.5+0.25+0.25, 1+0.2+0.13, 0.1+0.9+0.9)
    assert g["fixed"]["metrics"]["gate/mass"]["mean"] == pytest.approx(1.0)
    assert g["ca-mkd"]["metrics"]["gate/mass"]["mean"] == pytest.approx(1.33)
    assert g["meta"]["metrics"]["gate/mass"]["mean"] == pytest.approx(1.9)
    assert row_mass({"test/acc": 1.0}) != row_mass({"test/acc": 1.0})  # NaN without weights
    # the oracle is shown, never the best baseline (it has the best accuracy)
    assert [g[k]["kind"] for k in g] == ["baseline", "baseline", "learned", "oracle"]
    assert s["best_baseline"] == "ca-mkd"
    # meta gains 3 points over fixed, the oracle 10: it captured 30% of the headroom
    h = g["meta"]["headroom"]["oracle-filter"]
    assert (h["gain"], h["oracle_gain"], h["share"]) == pytest.approx((0.03, 0.10, 0.3))
    assert g["fixed"]["headroom"] == {} and g["oracle-filter"]["headroom"] == {}
    table = results_table(s)
    assert "weight / unit" in table and "| 1.900 ± 0.000 |" in table and "| 30% |" in table
    assert "| `oracle-filter` | oracle |" in table
    assert headline(s) == ("meta: +2.00 [2.00, 2.00] acc points vs best baseline ca-mkd; captured 30% of "
                           "oracle-filter's 10.00-point gain over fixed")


def test_no_share_when_the_oracle_gain_is_noise():
    rows = []
    for seed, d in enumerate((0.02, -0.03, 0.015)):  # oracle - fixed: +2, -3, +1.5 points: mean +0.17, t CI spans 0
        rows += [_row("fixed", "fixed", seed, 0.80, (0.5, 0.25, 0.25)),
                 _row("meta", "meta", seed, 0.81, (0.5, 0.25, 0.25)),
                 _row("oracle-teachers", "oracle-teachers", seed, 0.80 + d, (0.5, 0.25, 0.25))]
    s = summarise(rows, {"fixed": True, "meta": False, "oracle-teachers": False})
    h = s["gates"]["meta"]["headroom"]["oracle-teachers"]
    assert h["oracle_gain"] == pytest.approx(0.005 / 3) and h["oracle_gain_lo"] < 0 and h["share"] != h["share"]
    assert "share of oracle-teachers's gain" in results_table(s)
    assert headline(s).endswith("; oracle-teachers shows no headroom (0.17 points over fixed, interval reaching 0)")
