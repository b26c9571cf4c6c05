"""The temperature gates' final diagnostics: mean last temperature, corrupted vs clean units."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from metagate.gates.temperature.itkd import TemperatureLog

pytestmark = pytest.mark.usefixtures("one_thread")


def test_summary_against_hand_computation():
    corrupted = torch.tensor([True, False, False, True, False])
    run = SimpleNamespace(num_train_units=5, device=torch.device("cpu"), corrupted=corrupted, bank=None)
    log = TemperatureLog(run)
    assert log.summary() == {}  # nothing chosen yet
    log.record(torch.tensor([0, 1, 2]), torch.tensor([2.0, 4.0, 6.0]))
    log.record(torch.tensor([2, 3]), torch.tensor([8.0, 10.0]))  # unit 2's last temperature is 8; unit 4 unseen
    s = log.summary()
    assert s["diag/tau_mean"] == pytest.approx((2 + 4 + 8 + 10) / 4)
    assert s["diag/tau_corrupted"] == pytest.approx((2 + 10) / 2)
    assert s["diag/tau_clean"] == pytest.approx((4 + 8) / 2)
    log.record(torch.tensor([4]), 3.0)  # a global temperature
    assert log.summary()["diag/tau_clean"] == pytest.approx((4 + 8 + 3) / 3)


def test_ctkd_global_run_reports_its_temperature(digits_noisy, digits_bank):
    from metagate.gates.temperature.ctkd import CTKDGate
    from metagate.trainer import TrainConfig, Trainer

    gate = CTKDGate()
    tr = Trainer(digits_noisy, digits_noisy.make_student(), gate, digits_bank[0],
                 TrainConfig(epochs=2, progress=False, device="cpu"))
    m = tr.fit()
    with torch.no_grad():
        t = float(gate.module(1.0))  # the learned global temperature now
    assert set(m) >= {"diag/tau_mean", "diag/tau_corrupted", "diag/tau_clean"}
    # one global temperature that moves a little per step: every unit's last value is near today's
    assert m["diag/tau_mean"] == pytest.approx(t, abs=0.05)
    assert m["diag/tau_corrupted"] == pytest.approx(m["diag/tau_clean"], abs=0.05)
    assert 1.0 < t < 21.0
