"""The one run driver (issue 25) and the API's run-directory rules (issue 26): the Python API writes, locks,
overwrites and resumes exactly as ``metagate distill`` does, and never touches a directory that is not its run."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import metagate
from metagate.cli import main
from metagate.errors import CheckpointError, ConfigError, InputError, StorageError
from metagate.run import DistillConfig, run_distill
from metagate.rundir import MARKER, is_run_dir
from metagate.trainer import TrainConfig

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {"epochs": 1, "batch_size": 64, "device": "cpu", "progress": False}
ROOT = Path(__file__).resolve().parents[1]


def _distill(task, bank, logdir, train=None, **kw):
    """The digits task through the Python API, the bank's logits as tensor teachers."""
    return metagate.distill(task.students["mlp"], [bank.logits[:, k] for k in range(bank.num_teachers)],
                            (task.train.x, task.train.y), meta=(task.meta.x, task.meta.y),
                            select=(task.select.x, task.select.y), test=(task.test.x, task.test.y), gate="fixed",
                            train_config={**FAST, **(train or {})}, logdir=logdir, **kw)


def _snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` (hidden ones too) and its bytes' hash."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _users_dir(root: Path, checkpoint: bool) -> Path:
    d = root / "thesis"
    (d / "src").mkdir(parents=True)
    (d / "thesis.tex").write_text("\\documentclass{article}")
    (d / "src" / "a.py").write_text("print('mine')")
    (d / "metrics.json").write_text('{"mine": 1}')
    if checkpoint:
        torch.save({"my": torch.ones(2)}, d / "checkpoint.pt")
    return d


@pytest.mark.parametrize("overwrite", [False, True])
def test_api_refuses_a_directory_that_is_not_a_run(digits_noisy, digits_bank, tmp_path, overwrite):
    """Issue 26 data-loss cases 1 and 2: the user's files are byte-identical afterwards."""
    d = _users_dir(tmp_path, checkpoint=overwrite)
    before = _snapshot(tmp_path)
    with pytest.raises(ConfigError, match=f"logdir {d} exists and is not a metagate run directory"):
        _distill(digits_noisy, digits_bank[0], d, overwrite=overwrite)
    assert _snapshot(tmp_path) == before


def test_api_overwrite_keeps_the_old_run_when_the_new_one_fails(digits_noisy, digits_bank, tmp_path):
    """Issue 26 data-loss case 3, and the diverging learning rate named with its epoch, step and rate."""
    d = tmp_path / "run"
    good = _distill(digits_noisy, digits_bank[0], d)
    assert json.loads((d / "metrics.json").read_text())["test/acc"] == good.metrics["test/acc"] > 0.2
    before = _snapshot(tmp_path)
    with pytest.raises(ConfigError, match=r"student logits contain \d+ NaN/inf value\(s\): the first NaN/inf loss "
                                          r"came in epoch 1 of 1, step \d+ \(learning rate \d+\), with finite inputs and teachers: "
                                          r"the student diverged; lower --lr \(now 1e\+06\)"):
        _distill(digits_noisy, digits_bank[0], d, train={"lr": 1e6}, overwrite=True)
    assert _snapshot(tmp_path) == before  # the old run, and no sibling left behind
    again = _distill(digits_noisy, digits_bank[0], d, overwrite=True)
    assert again.metrics == good.metrics and is_run_dir(d)


def test_api_run_that_dies_in_its_first_epoch_leaves_no_directory(digits_noisy, digits_bank, tmp_path):
    with pytest.raises(ConfigError, match="first NaN/inf loss came in epoch 1"):
        _distill(digits_noisy, digits_bank[0], tmp_path / "new", train={"lr": 1e6})
    assert not (tmp_path / "new").exists()
    (tmp_path / "empty").mkdir()  # an empty directory the user made stays, empty
    with pytest.raises(ConfigError, match="first NaN/inf loss"):
        _distill(digits_noisy, digits_bank[0], tmp_path / "empty", train={"lr": 1e6})
    assert (tmp_path / "empty").is_dir() and not any((tmp_path / "empty").iterdir())


def test_api_lock_refuses_a_second_run_naming_the_holder(digits_noisy, digits_bank, tmp_path):
    """Two API runs into one logdir at once: the second is refused, naming the first's process."""
    d = tmp_path / "run"
    script = tmp_path / "run.py"
    script.write_text(_KILLABLE)
    holder = subprocess.Popen([sys.executable, str(script), str(d), "new"], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HOLD": "1"})
    try:
        assert holder.stdout.readline().strip() == "running"  # in its first epoch's callback, the lock held
        before = _snapshot(tmp_path)
        with pytest.raises(ConfigError, match=rf"logdir {d} is in use by another metagate run \(pid {holder.pid}\)"):
            _distill(digits_noisy, digits_bank[0], d)
        assert _snapshot(tmp_path) == before
    finally:
        holder.kill()
        holder.wait()


def test_api_overwrite_over_a_command_line_run_keeps_the_marker(digits_noisy, digits_bank, tmp_path):
    d = tmp_path / "run"
    args = ["distill", "--task", "digits", "--noise", "0.4", "--gate", "fixed", "--epochs", "1", "--batch-size", "64",
            "--logdir", str(d), "--device", "cpu", "--no-progress"]
    assert main(args) == 0
    res = _distill(digits_noisy, digits_bank[0], d, overwrite=True)
    assert is_run_dir(d) and (d / MARKER).is_file()
    written = json.loads((d / "metrics.json").read_text())
    assert written["test/acc"] == res.metrics["test/acc"] and written["teachers"][0]["kind"] == "tensor"
    assert main([*args, "--overwrite"]) == 0  # the command line still takes it as its run


def test_api_logdir_that_is_a_file_or_under_a_file(digits_noisy, digits_bank, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("mine")
    with pytest.raises(StorageError, match=f"logdir {f} is a file, not a directory"):
        _distill(digits_noisy, digits_bank[0], f)
    with pytest.raises(StorageError, match=f"lies under {f}, which is a file"):
        _distill(digits_noisy, digits_bank[0], f / "run")
    assert f.read_text() == "mine"


def test_api_refuses_an_existing_run_without_resume_or_overwrite(digits_noisy, digits_bank, tmp_path):
    d = tmp_path / "run"
    _distill(digits_noisy, digits_bank[0], d)
    before = _snapshot(tmp_path)
    with pytest.raises(ConfigError, match="already holds a run"):
        _distill(digits_noisy, digits_bank[0], d)
    with pytest.raises(ConfigError, match="resume=True needs logdir"):
        _distill(digits_noisy, digits_bank[0], None, resume=True)
    with pytest.raises(ConfigError, match="resume=True: no checkpoint"):
        _distill(digits_noisy, digits_bank[0], tmp_path / "other", resume=True)
    assert _snapshot(tmp_path) == before


def test_non_finite_inputs_are_named_with_their_unit_ids(digits_noisy, digits_bank):
    task = digits_noisy
    x = task.train.x.clone()
    x[5, 0, 1, 1], x[7, 0, 0, 0] = float("nan"), float("inf")
    with pytest.raises(InputError, match=r"train inputs hold 2 NaN/inf value\(s\) in 2 unit\(s\): unit id\(s\) 5, 7"):
        metagate.distill(task.students["mlp"], [digits_bank[0].logits[:, 0]], (x, task.train.y),
                         val=(task.meta.x, task.meta.y), gate="fixed", train_config=FAST)
    ids = torch.arange(len(task.train)) + 1000  # explicit ids are the ones named
    with pytest.raises(InputError, match=r"unit id\(s\) 1005, 1007"):
        metagate.distill(task.students["mlp"], None, (x, task.train.y, ids), val=(task.meta.x, task.meta.y),
                         gate="ce", train_config=FAST)


def test_resume_with_a_changed_noise_is_refused_before_teachers(digits_noisy, digits_bank, tmp_path, monkeypatch):
    """Options are checked before any expensive work: no teacher is trained for the other noise."""
    d = tmp_path / "run"
    cfg = DistillConfig(task="digits", noise=0.4, gate="fixed", train=TrainConfig(**FAST), logdir=str(d))
    run_distill(cfg, task=digits_noisy)
    before = _snapshot(tmp_path)

    def no_teachers(*a, **kw):
        raise AssertionError("teachers were loaded before the resume was checked")

    monkeypatch.setattr("metagate.run.load_teachers", no_teachers)
    for change, flag in (({"noise": 0.2}, "task"), ({"train": TrainConfig(**{**FAST, "lr": 0.1})}, "--lr")):
        other = DistillConfig(**{"task": "digits", "noise": 0.4, "gate": "fixed", "train": TrainConfig(**FAST),
                                 "logdir": str(d), "resume": True, **change})
        with pytest.raises(CheckpointError, match=flag):
            run_distill(other)
    assert _snapshot(tmp_path) == before


_KILLABLE = """
import json, os, signal, sys, time
import torch
torch.set_num_threads(1)
import metagate
from metagate.data import get_task

task = get_task("digits", noise=0.4)
g = torch.Generator().manual_seed(0)
teachers = [torch.nn.functional.one_hot(task.clean_train_labels, 10).float() * 3
            + torch.randn(len(task.train), 10, generator=g) for _ in range(2)]


class DieAfterFirstCheckpoint(metagate.BaseCallback):
    def on_epoch_end(self, record):
        if os.environ.get("DIE") and self.trainer.epoch == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if os.environ.get("HOLD"):
            print("running", flush=True)
            time.sleep(120)


res = metagate.distill(task.students["mlp"], teachers, (task.train.x, task.train.y), val=(task.meta.x, task.meta.y),
                       test=(task.test.x, task.test.y), gate="reinforce", gate_config={"rl_episode": 3},
                       train_config={"epochs": 2, "batch_size": 64, "device": "cpu", "progress": False},
                       logdir=sys.argv[1], resume=sys.argv[2] == "resume", callbacks=[DieAfterFirstCheckpoint()])
print(json.dumps(res.metrics))
"""


def test_kill_9_then_resume_gives_bit_identical_metrics(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(_KILLABLE)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

    def start(logdir, mode, die=False):
        return subprocess.Popen([sys.executable, str(script), str(logdir), mode], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, env={**env, **({"DIE": "1"} if die else {})})

    def finish(proc):
        out, err = proc.communicate(timeout=300)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)

    whole, killed = start(tmp_path / "whole", "new"), start(tmp_path / "killed", "new", die=True)  # side by side
    whole, killed = finish(whole), finish(killed)
    assert whole.returncode == 0, whole.stderr
    assert killed.returncode == -9, killed.stderr
    ckpt = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert ckpt["epoch"] == 1 and not (tmp_path / "killed" / "metrics.json").exists()
    resumed = finish(start(tmp_path / "killed", "resume"))
    assert resumed.returncode == 0, resumed.stderr
    want = json.loads(whole.stdout.strip().splitlines()[-1])
    assert json.loads(resumed.stdout.strip().splitlines()[-1]) == want and want["test/acc"] > 0.3
    assert json.loads((tmp_path / "killed" / "metrics.json").read_text()) == \
        json.loads((tmp_path / "whole" / "metrics.json").read_text())
    assert is_run_dir(tmp_path / "killed")


def test_non_finite_inputs_of_a_dataset_are_named_when_the_loss_turns_nan(digits_noisy):
    """A Dataset is read by id, not up front: the first NaN loss names the batch's non-finite units."""
    from torch.utils.data import Dataset

    task = digits_noisy

    class Items(Dataset):
        def __len__(self):
            return len(task.train)

        def __getitem__(self, i):
            x = task.train.x[i].clone()
            if i == 9:
                x[0, 2, 2] = float("nan")
            return x, task.train.y[i]

    with pytest.raises(InputError, match=r"student logits contain 10 NaN/inf value\(s\): the batch's training inputs "
                                         r"hold 1 NaN/inf value\(s\) in 1 unit\(s\): unit id\(s\) 9$"):
        metagate.distill(task.students["mlp"], None, Items(), val=(task.meta.x, task.meta.y), gate="ce",
                         train_config=FAST)


@pytest.mark.parametrize("gate", ["fixed", "meta"])
def test_command_line_diverging_lr_is_named_and_leaves_no_run_directory(digits_bank, tmp_path, capsys, gate):
    """``--lr 1e6``: the first NaN/inf loss with its epoch, step and learning rate, also for a gate whose weights
    follow the (diverged) student logits; the new run directory is gone."""
    run = tmp_path / "run"
    args = ["distill", "--task", "digits", "--noise", "0.4", "--gate", gate, "--epochs", "1", "--batch-size", "64",
            "--lr", "1e6", "--logdir", str(run), "--device", "cpu", "--no-progress"]
    if gate == "meta":  # AMAL's rows (total weight 0.1 + 0.9 K): the look-ahead's virtual step breaks first
        args += ["--meta-init-label", "0.1", "--meta-init-teacher", "0.9"]
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    if gate == "fixed":
        assert "the first NaN/inf loss came in epoch 1 of 1, step " in err, err
        assert "the student diverged; lower --lr (now 1e+06)" in err, err
    else:  # the meta look-ahead's virtual step breaks first
        assert "gate weights contain NaN or inf in epoch 1 of 1, step " in err, err
        assert "from finite student logits: the gate's own computation broke" in err, err
        assert "try a lower --lr, now 1e+06" in err, err
    assert not run.exists()
