"""Checkpoints of a run: what :class:`~metagate.trainer.Trainer` saves each epoch and how a resume is checked.

A checkpoint holds the student, its optimizer, the gate, every random state and the counters, written
atomically and loaded with ``weights_only=True``. A resume is refused (:class:`CheckpointError`, naming the
checkpoint) when the checkpoint belongs to another run (identity), was written with options that change the
result, or holds a field that does not fit this run (epoch out of range, non-finite or mis-shaped weights):
nothing trains from a checkpoint that is not this run's.
"""

from __future__ import annotations

import random
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from metagate.errors import CheckpointError
from metagate.io import atomic_save, safe_load

if TYPE_CHECKING:  # pragma: no cover
    from metagate.gates.base import Gate
    from metagate.trainer import TrainConfig, Trainer

CHECKPOINT_VERSION = 1
#: the checkpoint of a run directory
CHECKPOINT_NAME = "checkpoint.pt"
#: options whose change alters a run's result: a resume with another value is refused
RESULT_OPTIONS = ("batch_size", "lr", "momentum", "weight_decay", "optimizer", "schedule", "seed", "precision")
CHECKPOINT_KEYS = ("version", "identity", "config", "student", "optimizer", "gate", "rng", "epoch", "step",
                   "unit_weights")


def state_dict(trainer: Trainer) -> dict[str, Any]:
    """Everything a bit-identical resume of ``trainer`` needs."""
    np_state = np.random.get_state()
    rng = {
        "torch": torch.get_rng_state(),
        "numpy_keys": torch.from_numpy(np.asarray(np_state[1], dtype=np.int64)),
        "numpy_pos": int(np_state[2]),
        "python": list(random.getstate()[1]),
    }
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    extra = {} if trainer.scaler is None else {"scaler": trainer.scaler.state_dict()}
    return {**extra,
            "version": CHECKPOINT_VERSION,
            "identity": trainer.identity,
            "config": asdict(trainer.config),
            "student": trainer.student.state_dict(),
            "optimizer": trainer.optimizer.state_dict(),
            "gate": trainer.gate.state_dict(),
            "gate_hparams": plain(trainer.gate.hparams()),
            "rng": rng,
            "epoch": trainer.epoch,
            "step": trainer.step,
            "unit_weights": trainer.unit_weights.cpu()}


def save_checkpoint(trainer: Trainer, path: str | Path) -> None:
    """Atomically write student, optimizer, gate, RNG states and counters."""
    atomic_save(state_dict(trainer), path)


def read_checkpoint(path: str | Path) -> dict[str, Any]:
    """A metagate checkpoint with every key (``weights_only``), else :class:`CheckpointError` naming ``path``."""
    state = safe_load(path)
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise CheckpointError(f"checkpoint {path} is not a metagate v{CHECKPOINT_VERSION} checkpoint")
    missing = [k for k in CHECKPOINT_KEYS if k not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is incomplete: it lacks {', '.join(missing)}")
    for key in ("identity", "config"):
        if not isinstance(state[key], dict):
            raise CheckpointError(f"checkpoint {path}: {key} is a {type(state[key]).__name__}, expected a mapping")
    return state


def check_identity(path: str | Path, state: dict[str, Any], identity: dict[str, Any]) -> None:
    """Refuse a checkpoint of another run (task, data, gate, student, teachers): the keys of ``identity`` given."""
    diff = {k: (state["identity"].get(k), v) for k, v in identity.items() if state["identity"].get(k) != v}
    if diff:
        detail = ", ".join(f"{k}: checkpoint {a!r} vs run {b!r}" for k, (a, b) in diff.items())
        raise CheckpointError(f"checkpoint {path} is incompatible with this run ({detail})")


def check_options(path: str | Path, state: dict[str, Any], config: TrainConfig, gate: Gate | None = None) -> None:
    """Refuse a resume whose options would mix two configurations, naming each changed option."""
    saved, now = state["config"], asdict(config)
    changed = [(f"--{k.replace('_', '-')}", saved[k], now[k]) for k in RESULT_OPTIONS
               if k in saved and saved[k] != now[k]]
    if "epochs" in saved and now["epochs"] < saved["epochs"]:
        changed.append(("--epochs", saved["epochs"], now["epochs"]))
    old_gate = state.get("gate_hparams")
    if gate is not None and isinstance(old_gate, dict):
        new_gate = plain(gate.hparams())
        changed += [(f"--{k.replace('_', '-')}", old_gate.get(k), new_gate.get(k))
                    for k in sorted(set(old_gate) | set(new_gate)) if old_gate.get(k) != new_gate.get(k)]
    if changed:
        detail = ", ".join(f"{flag} {b!r} (checkpoint: {a!r})" for flag, a, b in changed)
        raise CheckpointError(f"--resume of {path} with other options than the checkpoint's: {detail}. Resume "
                              "with the checkpoint's values (only --epochs may grow, to extend a run)")


def precheck_resume(path: str | Path, identity: dict[str, Any], config: TrainConfig) -> dict[str, Any]:
    """The checks a resume can make before any expensive work (teachers): the checkpoint reads, belongs to this
    run as far as ``identity`` already says, and was written with the same result options."""
    state = read_checkpoint(path)
    check_identity(path, state, identity)
    check_options(path, state, config)
    return state


def check_fields(path: str | Path, state: dict[str, Any], trainer: Trainer) -> None:
    """Every counter and tensor of the checkpoint fits the run (else :class:`CheckpointError` naming ``path``)."""
    epoch, step = state["epoch"], state["step"]
    for name, v in (("epoch", epoch), ("step", step)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise CheckpointError(f"checkpoint {path}: {name} is {v!r}, expected an integer")
    epochs = trainer.config.epochs
    if not 0 <= epoch <= epochs:
        raise CheckpointError(f"checkpoint {path}: epoch {epoch} is outside this run's 0..{epochs} (--epochs "
                              f"{epochs}); the checkpoint is damaged or of another run")
    if not epoch * trainer.steps_per_epoch <= step:
        raise CheckpointError(f"checkpoint {path}: step {step} is below epoch {epoch} x {trainer.steps_per_epoch} "
                              "steps per epoch; the checkpoint is damaged or of another run")
    w = state["unit_weights"]
    want = tuple(trainer.unit_weights.shape)
    if not torch.is_tensor(w) or tuple(w.shape) != want:
        got = tuple(w.shape) if torch.is_tensor(w) else type(w).__name__
        raise CheckpointError(f"checkpoint {path}: unit_weights has shape {got}, this run has {want} "
                              "(training units, 1 + teachers)")
    _check_finite_tensors(path, "unit_weights", {"": w})
    if bool((w < 0).any()):
        raise CheckpointError(f"checkpoint {path}: unit_weights holds {int((w < 0).sum())} negative value(s)")
    student = state["student"]
    if not isinstance(student, dict):
        raise CheckpointError(f"checkpoint {path}: student is a {type(student).__name__}, expected a state dict")
    _check_finite_tensors(path, "student", student)


def _check_finite_tensors(path: str | Path, what: str, tensors: dict[str, Any]) -> None:
    for name, t in tensors.items():
        if torch.is_tensor(t) and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            where = f"{what}.{name}" if name else what
            raise CheckpointError(f"checkpoint {path}: {where} holds {bad} NaN/inf value(s) of {t.numel()}; "
                                  "the checkpoint is damaged or its run diverged")


def load_checkpoint(trainer: Trainer, path: str | Path) -> None:
    """Restore ``trainer`` from a checkpoint written by :func:`save_checkpoint` (``weights_only=True``).

    Refused (:class:`CheckpointError`, naming the checkpoint) when it is of another run, the run's options
    differ in anything that changes the result, or a field does not fit the run (:func:`check_fields`);
    ``--epochs`` may grow (the run is *extended*: the cosine schedule is stretched to the new length from here
    on, so the result differs from a run started with the larger ``--epochs``) but not shrink below the
    checkpoint's.
    """
    state = read_checkpoint(path)
    check_identity(path, state, trainer.identity)
    check_options(path, state, trainer.config, trainer.gate)
    check_fields(path, state, trainer)
    try:
        trainer.student.load_state_dict(state["student"])
        trainer.optimizer.load_state_dict(state["optimizer"])
        trainer.gate.load_state_dict(state["gate"])
        if trainer.scaler is not None and "scaler" in state:
            trainer.scaler.load_state_dict(state["scaler"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        if "cuda" in rng and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(rng["cuda"])
        np.random.set_state(("MT19937", rng["numpy_keys"].numpy().astype(np.uint32), rng["numpy_pos"], 0, 0.0))
        random.setstate((3, tuple(rng["python"]), None))
        trainer.epoch, trainer.step = int(state["epoch"]), int(state["step"])
        trainer.unit_weights.copy_(state["unit_weights"].to(trainer.device))
    except (RuntimeError, KeyError, ValueError, TypeError, AttributeError) as e:
        raise CheckpointError(f"checkpoint {path} does not fit this student/gate: {type(e).__name__}: {e}") from e
    trainer.logger.purge_after(trainer.step)  # TensorBoard points of the re-run steps replace the old ones


def plain(d: dict[str, Any]) -> dict[str, Any]:
    """Hyper-parameters as checkpoint-safe primitives (``weights_only`` loads str/int/float/bool/None)."""
    return {str(k): (v if v is None or isinstance(v, (bool, int, float, str)) else str(v)) for k, v in d.items()}
