"""The one run driver: ``metagate distill`` (:func:`metagate.run.run_distill`) and the Python API
(:func:`metagate.distill`) both run a distillation through :func:`drive`.

In order: the run directory's options are checked (a new, empty or marked directory; ``resume``: its checkpoint
exists and was written by this run with these options) *before* any expensive work, the directory is marked and
locked (:class:`~metagate.rundir.RunDir`), the caller builds its trainer (teachers, student, gate), a resume loads
the checkpoint (every field checked), :meth:`Trainer.fit` runs with the run's callbacks (TensorBoard, checkpoint,
final record, the user's), ``metrics.json`` is written atomically and an ``overwrite`` swaps the new run in only
now. A run that fails before its first checkpoint leaves no directory of its own behind.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from metagate.callbacks import BaseCallback, FinalRecord
from metagate.checkpoint import CHECKPOINT_NAME, precheck_resume
from metagate.errors import ConfigError
from metagate.io import atomic_write_text, check_dir_path
from metagate.rundir import RunDir
from metagate.trainer import TrainConfig, Trainer


@dataclass
class Finished:
    """A finished run: ``metrics`` (what :meth:`Trainer.fit` returned), ``record`` (``metrics.json``'s contents),
    the ``trainer``."""

    metrics: dict[str, float]
    record: dict[str, Any]
    trainer: Trainer


#: the options' names in errors: the command line's, the Python API's
SPELLING = {False: ("--logdir", "--resume", "--overwrite"), True: ("logdir", "resume=True", "overwrite=True")}
#: builds the run's trainer, writing into the given directory (``None``: nothing written)
BuildTrainer = Callable[[Path | None], Trainer]


def drive(
    build: BuildTrainer,
    train_config: TrainConfig,
    *,
    run_dir: str | Path | None,
    resume: bool = False,
    overwrite: bool = False,
    identity: dict[str, Any] | None = None,
    hparams: Callable[[Trainer], dict[str, Any]] | None = None,
    summary: Callable[[dict[str, float]], dict[str, Any]] | None = None,
    callbacks: Sequence[BaseCallback] = (),
    api: bool = False,
) -> Finished:
    """Run one distillation; return its final metrics, its ``metrics.json`` record and the trainer.

    :param build: the expensive part (teachers, student, gate, :class:`~metagate.trainer.Trainer` with its
        ``Logger`` and ``run_dir`` in the directory it is given); called once the options have passed
    :param train_config: the student's options (a resume checks them against the checkpoint before ``build``)
    :param run_dir: the run directory, or ``None`` to write nothing (no resume then)
    :param identity: what is known of the run's identity before ``build`` (task, data, ...): a resume of a
        checkpoint of another run is refused before ``build``
    :param hparams: the HPARAMS record of the trained run (the final record's; default: none written)
    :param summary: the contents of ``metrics.json`` from the final metrics (default: the metrics)
    :param callbacks: the caller's epoch-end callbacks, after the run's own
    :param api: name the options in errors as the Python API spells them (``logdir``, ``resume=True``), else as
        the command line does (``--logdir``, ``--resume``)
    """
    option, resume_opt, overwrite_opt = SPELLING[api]
    if run_dir is None:
        if resume or overwrite:
            raise ConfigError(f"{resume_opt if resume else overwrite_opt} needs {option} (the run directory)")
        trainer = build(None)
        metrics = trainer.fit(callbacks)
        return Finished(metrics, dict(metrics) if summary is None else summary(metrics), trainer)
    path = check_dir_path(run_dir, option)
    existed = path.exists()
    fresh = not existed or (path.is_dir() and not any(path.iterdir()))
    entered = False
    try:
        with RunDir(path, overwrite=overwrite, resume=resume, option=option) as rd:  # validated, marked, locked
            entered = True
            ckpt = path / CHECKPOINT_NAME
            if ckpt.exists() and not (resume or overwrite):
                raise ConfigError(f"{option} {path} already holds a run (a checkpoint); pass {resume_opt} to continue "
                                  f"it, {overwrite_opt} to replace it, or another {option}")
            if resume:
                if not ckpt.exists():
                    raise ConfigError(f"{resume_opt}: no checkpoint at {ckpt}")
                precheck_resume(ckpt, identity or {}, train_config)  # before teachers are trained
            trainer = build(rd.work)  # the run directory, or the sibling an overwrite replaces it with when done
            try:
                if resume:
                    trainer.load_checkpoint(ckpt)
                final = [] if hparams is None else [FinalRecord(lambda: hparams(trainer))]
                metrics = trainer.fit([*final, *callbacks])
            finally:
                trainer.logger.close()
            record = dict(metrics) if summary is None else summary(metrics)
            atomic_write_text(rd.work / "metrics.json", json.dumps(record, indent=2))
            rd.commit()
    except BaseException:
        if entered and fresh:
            _remove_unfinished(path, keep_dir=existed)
        raise
    return Finished(metrics, record, trainer)


def _remove_unfinished(path: Path, keep_dir: bool) -> None:
    """A new run directory whose run failed before its first checkpoint: nothing in it is worth keeping (it
    held nothing before; a later checkpoint is kept for a resume)."""
    if not path.is_dir() or (path / CHECKPOINT_NAME).exists():
        return
    for p in path.iterdir():
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
    if not keep_dir:
        path.rmdir()
