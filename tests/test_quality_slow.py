"""End-to-end quality on real data (slow: ``pytest -m slow``): the claims of ``make demo`` hold."""

from __future__ import annotations

import statistics

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_thread")]


def _runs(tmp_path, gate: str, options: dict, seeds=(0, 1, 2)) -> list[dict]:
    from metagate.run import DistillConfig, run_distill
    from metagate.trainer import TrainConfig

    out = []
    for s in seeds:
        cfg = DistillConfig(task="digits", noise=0.4, gate=gate, gate_options=options,
                            logdir=str(tmp_path / f"{gate}-{s}"),
                            train=TrainConfig(seed=s, device="cpu", progress=False))
        out.append(run_distill(cfg))
    return out


def test_meta_net_beats_fixed_kd_on_noisy_digits(tmp_path):
    """The ``make demo`` set-up (40% symmetric noise, 3 CNN teachers, MLP student, 30 epochs, seeds 0-2):
    the Meta-Weight-Net gate is more accurate than fixed KD and better calibrated, and its teacher share
    separates corrupted from clean labels. Measured: acc 0.944 vs 0.927, NLL 0.235 vs 0.805, ECE 0.091 vs
    0.441, AUROC 0.999."""
    fixed = _runs(tmp_path, "fixed", {})
    meta = _runs(tmp_path, "meta", {"meta_param": "net"})

    def mean(rs, key):
        return statistics.mean(r[key] for r in rs)

    assert mean(meta, "test/acc") > mean(fixed, "test/acc") + 0.005
    assert mean(meta, "test/nll") < mean(fixed, "test/nll") - 0.2
    assert mean(meta, "test/ece") < mean(fixed, "test/ece") - 0.1
    assert mean(meta, "diag/auroc_teacher_share") > 0.9
