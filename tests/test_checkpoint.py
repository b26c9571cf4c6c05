"""Every field of a checkpoint is checked against the run on resume (issue 26): a damaged or foreign checkpoint is
refused, naming the checkpoint, instead of training from it."""

from __future__ import annotations

import json

import pytest
import torch

from metagate.checkpoint import CHECKPOINT_KEYS, state_dict
from metagate.cli import main
from metagate.errors import CheckpointError
from metagate.gates.fixed import CEGate
from metagate.trainer import TrainConfig, Trainer, seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")


def _trainer(task, epochs=2):
    seed_everything(0)
    cfg = TrainConfig(epochs=epochs, batch_size=64, device="cpu", progress=False)
    return Trainer(task, task.make_student(), CEGate(), None, cfg, identity={"gate": "ce"})


def _refused(task, tmp_path, change, match):
    tr = _trainer(task)
    tr.run_epoch()
    state = state_dict(tr)
    change(state)
    path = tmp_path / "c.pt"
    torch.save(state, path)
    fresh = _trainer(task)
    before = {k: v.clone() for k, v in fresh.student.state_dict().items()}
    with pytest.raises(CheckpointError, match=match) as e:
        fresh.load_checkpoint(path)
    assert str(path) in str(e.value)
    assert fresh.epoch == 0 and fresh.step == 0  # nothing was loaded
    assert all(torch.equal(v, fresh.student.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("epoch", [-5, 3, 10**6])
def test_epoch_out_of_range_is_refused(digits_noisy, tmp_path, epoch):
    _refused(digits_noisy, tmp_path, lambda s: s.update(epoch=epoch),
             rf"epoch {epoch} is outside this run's 0\.\.2 \(--epochs 2\)")


@pytest.mark.parametrize("value", ["1", 1.0, True, None])
def test_counter_that_is_not_an_integer_is_refused(digits_noisy, tmp_path, value):
    _refused(digits_noisy, tmp_path, lambda s: s.update(step=value), rf"step is {value!r}, expected an integer")


def test_step_behind_the_epoch_is_refused(digits_noisy, tmp_path):
    # one epoch of 1211 units in batches of 64 is 19 steps
    _refused(digits_noisy, tmp_path, lambda s: s.update(step=18), r"step 18 is below epoch 1 x 19 steps per epoch")


def test_non_finite_unit_weights_are_refused(digits_noisy, tmp_path):
    _refused(digits_noisy, tmp_path, lambda s: s["unit_weights"].fill_(float("nan")),
             r"unit_weights holds 1211 NaN/inf value\(s\) of 1211")


def test_negative_unit_weights_are_refused(digits_noisy, tmp_path):
    def change(s):
        s["unit_weights"][3, 0] = -1.0

    _refused(digits_noisy, tmp_path, change, r"unit_weights holds 1 negative value\(s\)")


def test_unit_weights_of_another_shape_are_refused(digits_noisy, tmp_path):
    _refused(digits_noisy, tmp_path, lambda s: s.update(unit_weights=torch.zeros(10, 4)),
             r"unit_weights has shape \(10, 4\), this run has \(1211, 1\)")


def test_nan_student_weights_name_the_checkpoint(digits_noisy, tmp_path):
    def change(s):
        name = next(iter(s["student"]))
        s["student"][name].view(-1)[0] = float("inf")

    _refused(digits_noisy, tmp_path, change, r"student\.\S+ holds 1 NaN/inf value\(s\)")


@pytest.mark.parametrize("key", ["identity", "config"])
def test_identity_and_config_must_be_mappings(digits_noisy, tmp_path, key):
    _refused(digits_noisy, tmp_path, lambda s: s.update({key: [1, 2]}), rf"{key} is a list, expected a mapping")


def test_the_checked_checkpoint_still_resumes(digits_noisy, tmp_path):
    """A good checkpoint passes every check and continues the run to the uninterrupted result."""
    whole = _trainer(digits_noisy).fit()
    tr = _trainer(digits_noisy)
    tr.run_epoch()
    tr.save_checkpoint(tmp_path / "c.pt")
    assert set(CHECKPOINT_KEYS) <= set(torch.load(tmp_path / "c.pt", weights_only=True))
    torch.manual_seed(123)
    resumed = _trainer(digits_noisy)
    resumed.load_checkpoint(tmp_path / "c.pt")
    assert resumed.fit() == whole


def test_command_line_resume_of_a_damaged_checkpoint_touches_nothing(digits_bank, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["distill", "--gate", "ce", "--epochs", "2", "--batch-size", "64", "--logdir", str(run), "--device", "cpu",
            "--no-progress", "--noise", "0.4"]
    assert main(args) == 0
    state = torch.load(run / "checkpoint.pt", weights_only=True)
    state["epoch"] = -5
    torch.save(state, run / "checkpoint.pt")
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    capsys.readouterr()
    assert main([*args, "--resume"]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {run / 'checkpoint.pt'}: epoch -5 is outside this run's 0..2" in err
    assert {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()} == before
    assert json.loads(before["metrics.json"])["test/acc"] > 0.2
