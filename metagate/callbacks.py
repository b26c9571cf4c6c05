"""Epoch-end callbacks of :meth:`Trainer.fit <metagate.trainer.Trainer.fit>`, in the style of stable-baselines3's
``BaseCallback``.

The trainer runs the epochs; everything else a run does around them is a callback: TensorBoard scalars and
histograms (:class:`TensorBoardLog`), the checkpoint (:class:`Checkpoint`), the final figures and HPARAMS
record (:class:`FinalRecord`). A user adds their own::

    class Timer(metagate.BaseCallback):
        def on_epoch_end(self, record):
            print(self.trainer.epoch, record["select/acc"])

    metagate.distill(student, teachers, train, ..., callbacks=[Timer()])

Callbacks are called once per epoch (never per step), in the order of the list: logging, then the checkpoint,
then the run's and the user's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from metagate import units
from metagate.calibration import calibration_record
from metagate.diagnostics import teacher_share, teacher_trust_figure
from metagate.errors import ConfigError
from metagate.metrics import reliability_figure, reliability_table
from metagate.tb.hparams import gate_spec_of

if TYPE_CHECKING:  # pragma: no cover
    from metagate.trainer import Trainer


class BaseCallback:
    """Base class of the callbacks: override any of the hooks.

    :attr trainer: the :class:`~metagate.trainer.Trainer` (set by :meth:`init_callback`)
    :attr n_calls: epochs seen by :meth:`on_epoch_end` in this fit
    """

    def __init__(self) -> None:
        self.trainer: Trainer | None = None
        self.n_calls = 0

    def init_callback(self, trainer: Trainer) -> None:
        """Bind the callback to ``trainer`` (called by :meth:`Trainer.fit` before training)."""
        self.trainer = trainer

    def on_fit_start(self) -> None:  # noqa: B027 - optional hook
        """Before the first epoch of this fit (after a resume: before the first remaining epoch)."""

    def on_epoch_end(self, record: dict[str, float]) -> None:  # noqa: B027
        """After each epoch: ``record`` holds its ``train/*``, ``select/*`` (and ``test/*``) numbers."""

    def on_fit_end(self, metrics: dict[str, float]) -> None:  # noqa: B027
        """After the last epoch, with the final metrics."""

    def _epoch_end(self, record: dict[str, float]) -> None:
        self.n_calls += 1
        self.on_epoch_end(record)


class CallbackList(BaseCallback):
    """Several callbacks called in order."""

    def __init__(self, callbacks: Iterable[BaseCallback]) -> None:
        super().__init__()
        self.callbacks = list(callbacks)
        for cb in self.callbacks:
            if not isinstance(cb, BaseCallback):
                raise ConfigError(f"callbacks must be metagate.BaseCallback instances, got {type(cb).__name__}")

    def init_callback(self, trainer: Trainer) -> None:
        super().init_callback(trainer)
        for cb in self.callbacks:
            cb.init_callback(trainer)

    def on_fit_start(self) -> None:
        for cb in self.callbacks:
            cb.on_fit_start()

    def on_epoch_end(self, record: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb._epoch_end(record)

    def on_fit_end(self, metrics: dict[str, float]) -> None:
        for cb in self.callbacks:
            cb.on_fit_end(metrics)


class EpochFn(BaseCallback):
    """A plain function ``fn(trainer, record)`` called after each epoch."""

    def __init__(self, fn: Callable[[Trainer, dict[str, float]], Any]) -> None:
        super().__init__()
        self.fn = fn

    def on_epoch_end(self, record: dict[str, float]) -> None:
        assert self.trainer is not None
        self.fn(self.trainer, record)


class TensorBoardLog(BaseCallback):
    """Each epoch's record as scalars, the unit weights as histograms (all / clean / corrupted), the gate's own."""

    def on_epoch_end(self, record: dict[str, float]) -> None:
        tr = self.trainer
        assert tr is not None
        lg = tr.logger
        lg.set_teachers(tr.bank.names if tr.bank is not None else [])
        for tag, v in record.items():
            lg.scalar(tag, v, tr.step)
        w, corrupted, _ = tr.real_unit_weights()
        # one section per column, all / clean / corrupted units next to each other; ce (no teacher column)
        # logs its teacher share of 0 too, so every gate has the same charts
        cols = [(name, w[:, j]) for j, name in enumerate(["label"] + [f"teacher{j}" for j in
                                                                      range(tr.num_teachers)])]
        for name, col in [*cols, ("teacher_share", teacher_share(w))]:
            lg.histogram(f"weights/{name}/all", col, tr.step, span=(0.0, 1.0))
            if corrupted.any() and (~corrupted).any():
                lg.histogram(f"weights/{name}/clean", col[~corrupted], tr.step, span=(0.0, 1.0))
                lg.histogram(f"weights/{name}/corrupted", col[corrupted], tr.step, span=(0.0, 1.0))
        tr.gate.log(lg, tr.step)
        lg.flush()


class Checkpoint(BaseCallback):
    """``checkpoint.pt`` in ``run_dir`` after each epoch, written atomically."""

    def __init__(self, run_dir: str | Path) -> None:
        super().__init__()
        self.path = Path(run_dir) / "checkpoint.pt"

    def on_epoch_end(self, record: dict[str, float]) -> None:
        assert self.trainer is not None
        self.trainer.save_checkpoint(self.path)


class FinalRecord(BaseCallback):
    """At the end: the test reliability diagram and its bins, the teacher-trust chart, the HPARAMS session.

    :param hparams: the run's hyper-parameters, or a function giving them at the end (a gate's resolved values)
    :param group: the HPARAMS session group (default: the gate spec, the same for all seeds of a gate)
    """

    def __init__(self, hparams: dict[str, Any] | Callable[[], dict[str, Any]], group: str | None = None) -> None:
        super().__init__()
        self.hparams, self.group = hparams, group

    def on_fit_end(self, metrics: dict[str, float]) -> None:
        tr = self.trainer
        assert tr is not None
        hp = self.hparams() if callable(self.hparams) else self.hparams
        log_final(tr, metrics, hp, self.group)


def log_final(tr: Trainer, metrics: dict[str, float], hparams: dict[str, Any], group: str | None = None) -> None:
    """What :class:`FinalRecord` writes (nothing when the trainer's logger is off)."""
    lg = tr.logger
    if not lg.enabled:
        return
    lg.set_teachers(tr.bank.names if tr.bank is not None else [])
    logits, labels = tr.predict(tr.task.test), tr.task.test.y
    if units.is_sequence(tr.task):  # token-level diagram over the unpadded test tokens
        keep = labels != units.PAD_ID
        logits, labels = logits[keep], labels[keep]
    probs = torch.softmax(logits.double(), -1)
    lg.figure("test/reliability", reliability_figure(probs, labels, title="test"), tr.step)
    lg.text("test/reliability_bins", reliability_table(probs, labels), tr.step,
            "the reliability diagram's bins: units, mean confidence, accuracy")
    if tr.teacher_right is not None and tr.bank is not None and tr.step > 0:
        w, _, right = tr.real_unit_weights()
        fig = teacher_trust_figure(w, right, tr.bank.names, title=tr.gate.name)
        lg.figure("diag/teacher_trust", fig, tr.step)
    cal = tr.bank.calibration if tr.bank is not None else None
    if cal is not None:  # the teachers' temperature fit on meta (teachers.build.fit_teacher_temperatures)
        for tag, v in calibration_record(cal).items():
            lg.scalar(tag, v, tr.step)
    for tag, v in metrics.items():  # a metric HPARAMS shows must be a scalar of this run
        if isinstance(v, float) and lg.logged_at(tag) != tr.step:
            lg.scalar(tag, v, tr.step)
    lg.session(hparams, group or gate_spec_of(tr.gate), metrics)
    lg.flush()


def standard_callbacks(trainer: Trainer) -> list[BaseCallback]:
    """What every fit does around its epochs: TensorBoard (when the logger is on), the checkpoint (with a run
    directory)."""
    out: list[BaseCallback] = []
    if trainer.logger.enabled:
        out.append(TensorBoardLog())
    if trainer.run_dir is not None:
        out.append(Checkpoint(trainer.run_dir))
    return out
