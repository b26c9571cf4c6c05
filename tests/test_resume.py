"""Reproducibility and faithful resume for every gate (issue 12, points 3, 4 and 9)."""

from __future__ import annotations

import json

import pytest
import torch

from metagate.callbacks import EpochFn
from metagate.cli import main
from metagate.errors import CheckpointError
from metagate.run import DistillConfig, build_gate, run_distill
from metagate.trainer import TrainConfig, Trainer, seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")

GATE_OPTIONS = {"reinforce": {"rl_episode": 3}, "meta+policy": {"rl_episode": 3, "meta_columns": "split"}}


@pytest.mark.parametrize("gate", ["ce", "fixed", "hard", "meta", "reinforce", "meta+policy"])
def test_same_seed_same_metrics_for_every_gate(digits_noisy, digits_bank, tmp_path, gate):
    """Two identical runs in one process agree exactly (the gate is built after the seed is set)."""
    def once(name):
        cfg = DistillConfig(task="digits", noise=0.4, teachers=3, gate=gate, gate_options=GATE_OPTIONS.get(gate, {}),
                            train=TrainConfig(epochs=1, batch_size=64, device="cpu", progress=False),
                            logdir=str(tmp_path / name))
        out = run_distill(cfg, task=digits_noisy)
        return {k: v for k, v in out.items() if k != "teachers"}

    a, b = once("a"), once("b")
    assert a == b
    assert a["test/acc"] > 0.15  # above chance (0.1) after one epoch


def _trainer(task, bank, gate_name, epochs, run_dir):
    seed_everything(0)
    gate = build_gate(gate_name, GATE_OPTIONS[gate_name])
    cfg = TrainConfig(epochs=epochs, batch_size=64, seed=0, device="cpu", progress=False)
    return Trainer(task, task.make_student(), gate, bank, cfg, run_dir=run_dir, identity={"gate": gate_name})


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("gate", ["reinforce", "meta+policy"])
def test_policy_gates_resume_bit_identically(digits_noisy, digits_bank, tmp_path, gate):
    """19 steps per epoch, 3-step episodes in antithetic pairs: the checkpoint falls inside an episode and a pair."""
    bank, _ = digits_bank
    full = _trainer(digits_noisy, bank, gate, 3, None)
    m_full = full.fit()

    def stop(tr, record):
        if tr.epoch == 1:
            raise _Interrupt

    with pytest.raises(_Interrupt):
        _trainer(digits_noisy, bank, gate, 3, tmp_path).fit([EpochFn(stop)])
    torch.manual_seed(999)  # another process: other RNG state until the checkpoint restores it
    resumed = _trainer(digits_noisy, bank, gate, 3, tmp_path)
    resumed.load_checkpoint(tmp_path / "checkpoint.pt")
    assert resumed.step == 19 and resumed.step % 3 != 0
    assert resumed.fit() == m_full
    for (k, v), v2 in zip(full.student.state_dict().items(), resumed.student.state_dict().values()):
        assert torch.equal(v, v2), k
    for p, q in zip(full.gate.parameters(), resumed.gate.parameters()):
        assert torch.equal(p, q)


def _cli(run, *extra):
    return ["distill", "--task", "digits", "--noise", "0.4", "--gate", "fixed", "--teachers", "3", "--epochs", "2",
            "--batch-size", "64", "--logdir", str(run), "--device", "cpu", "--no-progress", *extra]


def _replace(args, flag, value):
    args = list(args)
    args[args.index(flag) + 1] = value
    return args


def test_resume_with_other_options_is_refused(digits_bank, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(_cli(run)) == 0
    ckpt = (run / "checkpoint.pt").read_bytes()
    metrics = (run / "metrics.json").read_text()
    for flag, value in (("--alpha", "0.3"), ("--tau", "2"), ("--seed", "1"), ("--batch-size", "32"), ("--lr", "0.1"),
                        ("--epochs", "1")):
        args = _replace(_cli(run), flag, value) if flag in _cli(run) else [*_cli(run), flag, value]
        capsys.readouterr()
        assert main([*args, "--resume"]) == 2, flag
        err = capsys.readouterr().err
        assert f"{flag} " in err and "checkpoint" in err, (flag, err)
    assert (run / "checkpoint.pt").read_bytes() == ckpt and (run / "metrics.json").read_text() == metrics
    # --epochs may grow: the run is extended
    assert main([*_replace(_cli(run), "--epochs", "3"), "--resume"]) == 0
    assert json.loads((run / "metrics.json").read_text())["test/acc"] > 0.3


def test_checkpoint_without_keys_is_refused(digits_noisy, digits_bank, tmp_path):
    bank, _ = digits_bank
    tr = _trainer(digits_noisy, bank, "reinforce", 1, None)
    state = tr.state_dict()
    for key in ("rng", "gate", "unit_weights"):
        broken = {k: v for k, v in state.items() if k != key}
        torch.save(broken, tmp_path / "c.pt")
        with pytest.raises(CheckpointError, match=f"lacks {key}"):
            tr.load_checkpoint(tmp_path / "c.pt")


def test_tensorboard_points_of_rerun_steps_are_purged(digits_noisy, digits_bank, tmp_path, monkeypatch):
    """A run killed between logging an epoch and checkpointing it re-runs that epoch: one point per step."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from metagate.logger import Logger

    bank, _ = digits_bank

    def trainer():
        seed_everything(0)
        cfg = TrainConfig(epochs=3, batch_size=64, seed=0, device="cpu", progress=False)
        return Trainer(digits_noisy, digits_noisy.make_student(), build_gate("fixed"), bank, cfg,
                       Logger(tmp_path), tmp_path, {"gate": "fixed"})

    tr = trainer()
    real = Trainer.save_checkpoint

    def dies_at_epoch_2(self, path):
        if self.epoch == 2:
            raise _Interrupt
        real(self, path)

    monkeypatch.setattr(Trainer, "save_checkpoint", dies_at_epoch_2)
    with pytest.raises(_Interrupt):
        tr.fit()
    tr.logger.close()
    monkeypatch.undo()
    resumed = trainer()
    resumed.load_checkpoint(tmp_path / "checkpoint.pt")
    resumed.fit()
    resumed.logger.close()
    acc = EventAccumulator(str(tmp_path), size_guidance={"scalars": 0})
    acc.Reload()
    steps = [e.step for e in acc.Scalars("train/loss")]
    assert steps == [19, 38, 57]
