"""Epoch-end callbacks (issue 25): the run's own (TensorBoard, checkpoint, final record) and a user's, called once
per epoch through ``metagate.distill``, ``run_distill`` and ``Trainer.fit``."""

from __future__ import annotations

import pytest
import torch

import metagate
from metagate.callbacks import CallbackList, Checkpoint, EpochFn, FinalRecord, TensorBoardLog, standard_callbacks
from metagate.errors import ConfigError
from metagate.gates.fixed import CEGate
from metagate.logger import Logger
from metagate.run import DistillConfig, run_distill
from metagate.trainer import TrainConfig, Trainer, seed_everything

pytestmark = pytest.mark.usefixtures("one_thread")

FAST = {"epochs": 3, "batch_size": 64, "device": "cpu", "progress": False}


class Recorder(metagate.BaseCallback):
    """What a user writes: remembers every call."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple] = []

    def on_fit_start(self) -> None:
        self.calls.append(("start", self.trainer.epoch))

    def on_epoch_end(self, record: dict[str, float]) -> None:
        ckpt = self.trainer.run_dir / "checkpoint.pt" if self.trainer.run_dir else None
        saved = torch.load(ckpt, weights_only=True)["epoch"] if ckpt else None  # the run's callbacks ran first
        self.calls.append(("epoch", self.trainer.epoch, self.n_calls, record["select/acc"], saved))

    def on_fit_end(self, metrics: dict[str, float]) -> None:
        self.calls.append(("end", dict(metrics)))


def test_a_user_callback_is_called_every_epoch_through_the_api(digits_noisy, digits_bank, tmp_path):
    task, bank = digits_noisy, digits_bank[0]
    cb = Recorder()
    res = metagate.distill(task.students["mlp"], [bank.logits[:, k] for k in range(3)], (task.train.x, task.train.y),
                           val=(task.meta.x, task.meta.y), test=(task.test.x, task.test.y), gate="fixed",
                           train_config=FAST, logdir=tmp_path / "run", callbacks=[cb])
    assert cb.calls[0] == ("start", 0)
    epochs = [c for c in cb.calls if c[0] == "epoch"]
    assert [(e, n, saved) for _, e, n, _, saved in epochs] == [(1, 1, 1), (2, 2, 2), (3, 3, 3)]
    assert [c[3] for c in epochs] == [h["select/acc"] for h in res.history]
    assert cb.calls[-1] == ("end", res.metrics) and len(cb.calls) == 5


def test_run_distill_takes_callbacks_and_an_epoch_function(digits_noisy, digits_bank, tmp_path):
    cb, seen = Recorder(), []
    cfg = DistillConfig(task="digits", noise=0.4, gate="ce", train=TrainConfig(**FAST), logdir=str(tmp_path / "r"))
    out = run_distill(cfg, task=digits_noisy, on_epoch_end=lambda tr, rec: seen.append(tr.epoch), callbacks=[cb])
    assert seen == [1, 2, 3] and [c[1] for c in cb.calls if c[0] == "epoch"] == [1, 2, 3]
    assert cb.calls[-1][1]["test/acc"] == out["test/acc"]


def test_fit_runs_the_standard_callbacks_first_and_returns_the_final_metrics(digits_noisy, tmp_path):
    seed_everything(0)
    tr = Trainer(digits_noisy, digits_noisy.make_student(), CEGate(), None, TrainConfig(**FAST), Logger(tmp_path),
                 tmp_path)
    assert [type(c) for c in standard_callbacks(tr)] == [TensorBoardLog, Checkpoint]
    plain = Trainer(digits_noisy, digits_noisy.make_student(), CEGate(), None, TrainConfig(**FAST))
    assert standard_callbacks(plain) == []  # no logger, no run directory: nothing around the epochs
    cb = Recorder()
    metrics = tr.fit([cb])
    tr.logger.close()
    assert [c[4] for c in cb.calls if c[0] == "epoch"] == [1, 2, 3]
    assert cb.calls[-1] == ("end", metrics) and metrics["test/acc"] > 0.3
    assert list(tmp_path.glob("events.out.tfevents.*"))


def test_final_record_writes_the_hparams_session(digits_noisy, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    seed_everything(0)
    tr = Trainer(digits_noisy, digits_noisy.make_student(), CEGate(), None, TrainConfig(**{**FAST, "epochs": 1}),
                 Logger(tmp_path))
    tr.fit([FinalRecord(lambda: {"gate": "ce", "answer": 42})])
    tr.logger.close()
    acc = EventAccumulator(str(tmp_path))
    acc.Reload()
    assert "test/reliability" in acc.Tags()["images"]


def test_epoch_fn_and_callback_list(digits_noisy):
    seen = []
    cbs = CallbackList([EpochFn(lambda tr, rec: seen.append((tr.epoch, "train/loss" in rec)))])
    seed_everything(0)
    tr = Trainer(digits_noisy, digits_noisy.make_student(), CEGate(), None, TrainConfig(**{**FAST, "epochs": 2}))
    tr.fit([cbs])
    assert seen == [(1, True), (2, True)]


def test_a_callback_that_is_not_one_is_refused(digits_noisy):
    tr = Trainer(digits_noisy, digits_noisy.make_student(), CEGate(), None, TrainConfig(**FAST))
    with pytest.raises(ConfigError, match="callbacks must be metagate.BaseCallback instances, got function"):
        tr.fit([lambda tr, rec: None])
    assert tr.epoch == 0
