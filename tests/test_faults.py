"""Kill a run with SIGKILL (mid-step, mid-checkpoint, after a checkpoint, before the final metrics), resume
it, and get bit-identical final metrics (issue 12, point 3)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from metagate.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # the killed runs use one thread too: same arithmetic

RUNNER = Path(__file__).with_name("fault_runner.py")
STEPS_PER_EPOCH = 19  # digits train split (1213 units) at batch 64
GATES = {"fixed": [], "meta": ["--meta-param", "net"], "reinforce": ["--rl-episode", "3"]}
KILLS = [("ckpt-mid", 2), ("step", 30), ("ckpt-after", 1), ("final", 1)]


def _args(gate, run):
    return ["distill", "--task", "digits", "--noise", "0.4", "--gate", gate, *GATES[gate], "--teachers", "3",
            "--epochs", "3", "--batch-size", "64", "--logdir", str(run), "--device", "cpu", "--no-progress"]


_REFERENCE: dict[str, dict] = {}


def _reference(gate, tmp_path_factory):
    if gate not in _REFERENCE:
        run = tmp_path_factory.mktemp(f"ref-{gate}") / "run"
        assert main(_args(gate, run)) == 0
        _REFERENCE[gate] = json.loads((run / "metrics.json").read_text())
    return _REFERENCE[gate]


def _kill_and_resume(gate, point, n, run):
    proc = subprocess.run([sys.executable, str(RUNNER), point, str(n), *_args(gate, run)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not (run / "metrics.json").exists()
    has_ckpt = (run / "checkpoint.pt").exists()
    if point == "ckpt-mid":
        assert list(run.glob(".checkpoint.pt.*.tmp")), "the kill should leave a half-written checkpoint"
    assert main(_args(gate, run) + (["--resume"] if has_ckpt else [])) == 0
    assert not list(run.glob(".*.tmp"))  # stale temporary files were cleaned
    return json.loads((run / "metrics.json").read_text())


def _tensorboard_steps(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run), size_guidance={"scalars": 0})
    acc.Reload()
    return [e.step for e in acc.Scalars("train/loss")]


@pytest.mark.parametrize("gate, point, n", [("reinforce", "ckpt-mid", 2), ("fixed", "step", 30)])
def test_kill_and_resume_is_bit_identical(digits_bank, tmp_path, tmp_path_factory, gate, point, n):
    ref = _reference(gate, tmp_path_factory)
    run = tmp_path / "run"
    assert _kill_and_resume(gate, point, n, run) == ref
    assert _tensorboard_steps(run) == [STEPS_PER_EPOCH * e for e in (1, 2, 3)]  # no duplicate points


@pytest.mark.slow
@pytest.mark.parametrize("gate", sorted(GATES))
@pytest.mark.parametrize("point, n", KILLS)
def test_kill_matrix(digits_bank, tmp_path, tmp_path_factory, gate, point, n):
    """Every gate (fixed, meta, reinforce) at every kill point (mid-checkpoint, mid-epoch, after a checkpoint,
    before the final metrics)."""
    ref = _reference(gate, tmp_path_factory)
    run = tmp_path / "run"
    assert _kill_and_resume(gate, point, n, run) == ref
    assert _tensorboard_steps(run) == [STEPS_PER_EPOCH * e for e in (1, 2, 3)]
