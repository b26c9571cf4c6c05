"""Run directories (marked, locked, replaced only after success) and the teacher-cache lock (issue 12, points 2, 7, 9)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import threading

import pytest

from metagate.cli import main
from metagate.errors import ConfigError
from metagate.rundir import MARKER, RunDir, is_run_dir
from metagate.trainer import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

ARGS = ["distill", "--task", "digits", "--noise", "0.4", "--teachers", "3", "--epochs", "1", "--batch-size", "64",
        "--device", "cpu", "--no-progress"]


def _digest(d):
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(d.iterdir()) if p.is_file()}


def test_overwrite_replaces_the_old_run_only_after_the_new_one_finished(digits_bank, tmp_path, monkeypatch):
    run = tmp_path / "run"
    assert main([*ARGS, "--logdir", str(run)]) == 0
    assert is_run_dir(run)
    old = _digest(run)

    class Boom(Exception):
        pass

    def fails(self, *a, **kw):
        raise Boom

    monkeypatch.setattr(Trainer, "fit", fails)
    with pytest.raises(Boom):
        main([*ARGS, "--logdir", str(run), "--overwrite", "--alpha", "0.2"])
    assert _digest(run) == old  # the failed replacement left the old run as it was
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # and no sibling behind
    monkeypatch.undo()
    assert main([*ARGS, "--logdir", str(run), "--overwrite", "--alpha", "0.2"]) == 0
    hp = json.loads((run / "hparams.json").read_text())
    assert hp["hparams"]["alpha"] == 0.2 and _digest(run) != old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def test_run_dir_marks_locks_and_cleans(tmp_path):
    run = tmp_path / "run"
    with RunDir(run) as rd:
        assert rd.work == run and (run / MARKER).is_file()
        with pytest.raises(ConfigError, match="in use by another metagate run"):
            RunDir(run, resume=True).__enter__()
        rd.commit()
    (run / ".checkpoint.pt.abc.tmp").write_bytes(b"half")  # a write killed mid-way
    stale = tmp_path / f".run.new-{99999999}"  # an --overwrite that was killed
    stale.mkdir()
    (stale / MARKER).write_text("{}")
    with RunDir(run, overwrite=True) as rd:
        assert rd.work.parent == tmp_path and rd.work.name.startswith(".run.new-")
        assert not stale.exists()
        (rd.work / "metrics.json").write_text("{}")
        rd.commit()
    assert (run / "metrics.json").is_file() and not list(run.glob("*.tmp"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    with RunDir(run, resume=True):
        assert not list(run.glob(".*.tmp"))


def test_empty_directory_is_used_and_foreign_one_refused(tmp_path):
    (tmp_path / "empty").mkdir()
    with RunDir(tmp_path / "empty", overwrite=True) as rd:
        assert rd.work == tmp_path / "empty"
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    for kw in ({}, {"overwrite": True}, {"resume": True}):
        with pytest.raises(ConfigError, match="not a metagate run directory"):
            RunDir(tmp_path / "mine", **kw).__enter__()
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]


def test_second_process_waits_for_the_first_ones_teachers(digits_noisy, tmp_path, monkeypatch):
    """Two loaders on one fresh cache: the teacher is trained once; the other waits for it and loads it."""
    import metagate.teachers.training as teachers

    trained, second_started = [], threading.Event()
    real = teachers.train_teacher

    def slow_train(task, spec, seed=0, device="auto", progress=True):
        trained.append(spec.name)
        # hold the lock until the second loader is surely past its cache check (or training too)
        second_started.wait(10)
        for _ in range(50):
            if len(trained) > 1:
                break
            threading.Event().wait(0.02)
        return real(task, dataclasses.replace(spec, epochs=1), seed, device, progress)

    monkeypatch.setattr(teachers, "train_teacher", slow_train)
    results, errors = [], []

    def load(first):
        try:
            if not first:
                second_started.set()
            results.append(teachers.load_or_train_teachers(digits_noisy, 1, tmp_path, device="cpu", progress=False))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    a = threading.Thread(target=load, args=(True,))
    a.start()
    while not trained:
        threading.Event().wait(0.01)
    b = threading.Thread(target=load, args=(False,))
    b.start()
    a.join(60)
    b.join(60)
    assert not errors and len(results) == 2
    assert trained == [digits_noisy.teacher_specs[0].name]
    (ma,), (mb,) = results[0][0], results[1][0]
    for (k, v), w in zip(ma.state_dict().items(), mb.state_dict().values()):
        assert bool((v == w).all()), k
