"""Temperature scaling of the teachers (metagate.calibration) and calibrated teachers in a run."""

from __future__ import annotations

import json
import math

import pytest
import torch

from metagate.calibration import (
    calibrate_teachers,
    calibration_record,
    ensemble_nll_at,
    fit_ensemble_temperature,
    fit_temperature,
    nll_at,
)
from metagate.errors import InputError
from metagate.teachers.build import calibrated_bank


def _planted(tau: float, n: int = 20000, c: int = 10, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and labels drawn from ``softmax(logits / tau)``: the NLL's minimiser is ``tau`` in expectation."""
    g = torch.Generator().manual_seed(seed)
    z = 3.0 * torch.randn(n, c, generator=g, dtype=torch.float64)
    y = torch.multinomial(torch.softmax(z / tau, -1), 1, generator=g).squeeze(1)
    return z, y


@pytest.mark.parametrize("tau", [0.4, 2.5])
def test_fit_recovers_a_planted_temperature(tau):
    z, y = _planted(tau)
    got = fit_temperature(z, y)
    assert abs(got / tau - 1) < 0.02
    assert nll_at(z, y, got) <= nll_at(z, y, tau)  # the fit is the NLL's minimiser on these draws
    assert nll_at(z, y, got) < nll_at(z, y, 1.0)


def test_fit_is_a_minimum_of_the_nll():
    z, y = _planted(0.7, n=3000)
    t = fit_temperature(z, y)
    assert nll_at(z, y, t) <= min(nll_at(z, y, t * 0.99), nll_at(z, y, t * 1.01))


def test_per_token_fit_ignores_padding():
    """[B, T, C] with a mask: the padded positions (logits that would wreck the fit) count for nothing."""
    z, y = _planted(2.0, n=4000, c=6)
    zb, yb = z.reshape(400, 10, 6).clone(), y.reshape(400, 10).clone()
    mask = torch.ones(400, 10, dtype=torch.bool)
    mask[:, 7:] = False
    zb[:, 7:] = 100.0 * torch.arange(6, dtype=torch.float64)  # confidently wrong garbage on padding
    yb[:, 7:] = 0
    got = fit_temperature(zb, yb, mask)
    assert got == pytest.approx(fit_temperature(zb[:, :7].reshape(-1, 6), yb[:, :7].reshape(-1)), rel=1e-9)
    assert abs(got / 2.0 - 1) < 0.05


def test_ensemble_of_identical_teachers_has_the_teachers_temperature():
    z, y = _planted(1.8, n=5000)
    k3 = z.unsqueeze(1).expand(-1, 3, -1)
    assert fit_ensemble_temperature(k3, y) == pytest.approx(fit_temperature(z, y), rel=1e-6)
    assert ensemble_nll_at(k3, y, 1.3) == pytest.approx(nll_at(z, y, 1.3), rel=1e-9)


def test_calibrate_teachers_scores_before_and_after():
    za, y = _planted(0.5, n=4000, seed=1)
    zb = 0.25 * za  # the same teacher, four times flatter: its temperature is four times smaller
    cal = calibrate_teachers(torch.stack([za, zb], 1), y, ["a", "b"], extra_taus=(1.5,))
    assert cal.taus[1] == pytest.approx(cal.taus[0] / 4, rel=1e-3)
    for n in ("a", "b"):
        st = cal.stats[n]
        assert st["nll"] <= st["nll_tau1"] and st["nll"] <= st["nll_tau1.5"]
    # the calibrated teachers are the same model: their ensemble needs no further temperature
    assert cal.ensemble_tau == pytest.approx(1.0, abs=2e-3)
    assert cal.stats["ensemble"]["nll"] <= cal.stats["ensemble"]["nll_tau1"]
    rec = calibration_record(cal)
    assert rec["teachers/tau_teacher1"] == cal.taus[1] and rec["teachers/meta_nll_tau1_teacher0"] == cal.stats["a"][
        "nll_tau1"]


def test_all_padding_is_an_input_error():
    with pytest.raises(InputError, match="padding"):
        fit_temperature(torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))


def test_digits_teachers_calibrated_on_meta(digits_noisy, digits_bank):
    """The run's teachers (40% noise, under-confident): each fitted tau lowers the meta NLL below tau = 1 and
    sharpens (tau < 1); the calibrated bank holds logits / tau_k."""
    bank, stats = digits_bank
    cal = bank.calibration
    for k, (n, st) in enumerate(zip(cal.names, stats)):
        assert cal.stats[n]["nll"] <= cal.stats[n]["nll_tau1"]
        assert cal.stats[n]["ece"] < cal.stats[n]["ece_tau1"]
        assert 0 < cal.taus[k] < 1 and st["tau"] == cal.taus[k] and st["meta_nll"] == cal.stats[n]["nll"]
    cb = calibrated_bank(bank)
    torch.testing.assert_close(cb.logits, bank.logits / torch.tensor(cal.taus).view(1, -1, 1))
    assert cb.calibrated and cb.calibration is cal and not getattr(bank, "calibrated", False)


def test_hard_calibrated_run_records_the_fit(tmp_path):
    """A distill run of hard (calibrated by default): taus in the teacher stats (metrics.json), HPARAMS and
    TensorBoard, with the ensemble's fit."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from metagate.run import DistillConfig, run_distill
    from metagate.trainer import TrainConfig

    cfg = DistillConfig(task="digits", noise=0.4, gate="hard", logdir=str(tmp_path / "run"),
                        train=TrainConfig(epochs=1, device="cpu", progress=False))
    r = run_distill(cfg)
    taus = [t["tau"] for t in r["teachers"]]
    assert all(0 < t < 1 for t in taus) and all(t["meta_nll"] <= t["meta_nll_tau1"] for t in r["teachers"])
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert [t["tau"] for t in saved["teachers"]] == taus
    hp = json.loads((tmp_path / "run" / "hparams.json").read_text())["hparams"]
    assert [hp[f"teacher_tau{k}"] for k in range(3)] == taus and math.isfinite(hp["teacher_ensemble_tau"])
    assert hp["hard_calibrated"] is True and hp["hard_gauge_tau"] == hp["teacher_ensemble_tau"]
    acc = EventAccumulator(str(tmp_path / "run"))
    acc.Reload()
    tb = {t: acc.Scalars(t)[-1].value for t in acc.Tags()["scalars"] if t.startswith("teachers/")}
    assert tb["teachers/tau_teacher1"] == pytest.approx(taus[1], rel=1e-6)
    assert tb["teachers/meta_ece_ensemble"] < tb["teachers/meta_ece_tau1_ensemble"]


def test_any_gate_can_ask_for_calibrated_teachers(tmp_path):
    from metagate.gates.hard import HardGate
    from metagate.run import DistillConfig, build_gate, run_distill, wants_calibrated_teachers
    from metagate.trainer import TrainConfig

    plain = DistillConfig(task="digits", noise=0.4, gate="fixed")
    assert not wants_calibrated_teachers(plain, build_gate("fixed"))
    assert wants_calibrated_teachers(plain, HardGate()) and not wants_calibrated_teachers(plain, HardGate(hard_tau=1.5))
    assert wants_calibrated_teachers(plain, build_gate("hard+temperature"))  # a composition asks for its part
    cfg = DistillConfig(task="digits", noise=0.4, gate="fixed", teacher_calibration="temperature",
                        logdir=str(tmp_path / "cal"), train=TrainConfig(epochs=1, device="cpu", progress=False))
    cal = run_distill(cfg)
    base = run_distill(DistillConfig(task="digits", noise=0.4, gate="fixed", logdir=str(tmp_path / "raw"),
                                     train=TrainConfig(epochs=1, device="cpu", progress=False)))
    hp = [json.loads((tmp_path / d / "hparams.json").read_text())["hparams"] for d in ("cal", "raw")]
    assert [h["teacher_calibration"] for h in hp] == ["temperature", "none"]
    assert cal["test/nll"] != base["test/nll"]  # the KD targets changed
    assert cal["teachers"][0]["tau"] == base["teachers"][0]["tau"]  # one fit, recorded either way


def test_calibrated_sequence_bank_scales_each_teacher_and_keeps_float16():
    from metagate.calibration import TeacherCalibration
    from metagate.teachers.sequence import SeqTeacherBank

    g = torch.Generator().manual_seed(0)
    tok = (4 * torch.randn(5, 2, 7, generator=g)).half()
    bank = SeqTeacherBank(tok, torch.tensor([[0, 1, 5], [2, 3, 4]]), ["a", "b"])
    bank.calibration = TeacherCalibration(["a", "b"], [0.5, 2.0], 1.0)
    cb = calibrated_bank(bank)
    assert cb.logits.dtype == torch.float16 and cb.calibrated
    torch.testing.assert_close(cb.logits[:-1].float(), (tok.float() / torch.tensor([0.5, 2.0]).view(1, 2, 1)).half()
                               .float())
    bank.calibration = TeacherCalibration(["a", "b"], [1e-4, 1.0], 1.0)  # float16 would overflow: float32 kept
    assert calibrated_bank(bank).logits.dtype == torch.float32
