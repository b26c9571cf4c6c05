"""Teachers: trained by the project (through the shared loop), frozen, logits cached.

Cache layout under ``cache_dir/<task key>/``::

    teacher-<name>.pt   {"state", "task_fingerprint", "select_acc", "test_acc", ...}
    logits-<name>.pt    {"fingerprint", "logits" [N_train, C]}

The logits' fingerprint hashes the training data, the unit ids and the teacher's
weights; a mismatch raises :class:`StaleCacheError` instead of loading.
"""

from __future__ import annotations

import copy
import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from metagate.checks import check_finite
from metagate.errors import ConfigError, StaleCacheError
from metagate.io import atomic_save, safe_load, state_fingerprint
from metagate.models import PermutedTeacher

if TYPE_CHECKING:  # pragma: no cover
    from metagate.data.task import Task, TeacherSpec


def default_cache_dir() -> Path:
    """``$METAGATE_CACHE`` or ``~/.cache/metagate``."""
    return Path(os.environ.get("METAGATE_CACHE", Path.home() / ".cache" / "metagate"))


class TeacherBank:
    """Frozen teachers' logits for the training units, looked up by unit id.

    :param logits: ``[N, K, C]``
    :param names: ``K`` teacher names
    """

    def __init__(self, logits: Tensor, names: list[str]) -> None:
        if logits.ndim != 3:
            raise ValueError(f"teacher logits must be [N, K, C], got {tuple(logits.shape)}")
        check_finite("teacher logits", logits)
        self.logits, self.names = logits, list(names)
        self._log_probs: dict[float, Tensor] = {}

    @property
    def num_units(self) -> int:
        return int(self.logits.shape[0])

    @property
    def num_teachers(self) -> int:
        return int(self.logits.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.logits.shape[2])

    def lookup(self, ids: Tensor) -> Tensor:
        """``[B, K, C]`` logits of units ``ids``."""
        return rows(self.logits, ids)

    def log_probs(self, tau: float) -> Tensor:
        """``[N, K, C]`` ``log_softmax(logits / tau)``, computed once per temperature."""
        lp = self._log_probs.get(float(tau))
        if lp is None:
            lp = self._log_probs[float(tau)] = torch.log_softmax(self.logits / float(tau), -1)
        return lp

    def to(self, device: torch.device | str) -> TeacherBank:
        return TeacherBank(self.logits.to(device), self.names) if self.logits.device != torch.device(device) \
            else self


def rows(table: Tensor, ids: Tensor) -> Tensor:
    """``table[ids]``; ``index_select`` for 1-D ids (several times faster than advanced indexing on CPU)."""
    return table.index_select(0, ids) if ids.ndim == 1 else table[ids]


@torch.no_grad()
def teacher_logits(teacher: nn.Module, x: Tensor, device: torch.device | str = "cpu",
                   batch_size: int = 1024) -> Tensor:
    """``[N, C]`` logits of a frozen teacher in eval mode (CPU result)."""
    teacher.eval().to(device)
    return torch.cat([teacher(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])


def logits_fingerprint(task_fingerprint: str, ids: Tensor, teacher: nn.Module) -> str:
    """Hash of (data, unit ids, teacher checkpoint)."""
    h = hashlib.sha256()
    h.update(task_fingerprint.encode())
    h.update(ids.cpu().numpy().tobytes())
    h.update(state_fingerprint(teacher).encode())
    return h.hexdigest()[:16]


def cached_logits(
    teacher: nn.Module, name: str, task: Task, cache_dir: Path | None, device: torch.device | str = "cpu",
    rebuild: bool = False, task_fingerprint: str | None = None,
) -> Tensor:
    """Training-split logits of ``teacher``, from the cache when it matches, else computed and cached.

    :param task_fingerprint: ``task.fingerprint()`` when the caller already has it (hashing the data is
        the costly part)
    :raises StaleCacheError: the cached logits were computed for other data, ids or weights
    """
    ids = torch.arange(len(task.train))
    fp = logits_fingerprint(task_fingerprint or task.fingerprint(), ids, teacher)
    path = None if cache_dir is None else Path(cache_dir) / task.key / f"logits-{name}.pt"
    if path is not None and path.exists() and not rebuild:
        blob = safe_load(path, "teacher logits cache")
        if not isinstance(blob, dict) or blob.get("fingerprint") != fp:
            got = blob.get("fingerprint") if isinstance(blob, dict) else None
            raise StaleCacheError(
                f"stale teacher cache {path}: it was computed for fingerprint {got}, but the current data, unit ids "
                f"and teacher checkpoint give {fp}. Delete the file or pass --rebuild-cache."
            )
        return blob["logits"]
    logits = teacher_logits(teacher, task.train.x, device)
    check_finite(f"logits of teacher {name!r}", logits)
    if path is not None:
        atomic_save({"fingerprint": fp, "logits": logits, "teacher": name}, path)
    return logits


def train_teacher(task: Task, spec: TeacherSpec, seed: int = 0, device: str = "auto",
                  progress: bool = True) -> tuple[nn.Module, dict[str, float]]:
    """Train one teacher on the (noisy) training split with the shared loop and the ``ce`` gate,
    keeping the epoch with the best accuracy on the clean ``select`` split (early stopping).
    """
    from metagate.gates.fixed import CEGate
    from metagate.trainer import TrainConfig, Trainer, seed_everything

    seed_everything(seed)
    model = spec.factory()
    cfg = TrainConfig(epochs=spec.epochs, batch_size=spec.batch_size, lr=spec.lr, optimizer="adam",
                      schedule="cosine", weight_decay=0.0, seed=seed, device=device, progress=progress,
                      eval_test_every_epoch=False)
    trainer = Trainer(task, model, CEGate(), None, cfg)
    from tqdm.auto import tqdm

    best: dict[str, Any] = {"acc": -1.0}
    patience = 0
    bar = tqdm(total=cfg.epochs * trainer.steps_per_epoch, desc=f"teacher {spec.name}", unit="step", leave=False,
               disable=True if not progress else None, dynamic_ncols=True)
    while trainer.epoch < cfg.epochs:
        trainer.run_epoch(bar)
        acc = trainer.evaluate("select")["acc"]
        bar.set_postfix(select_acc=f"{acc:.3f}")
        if acc > best["acc"]:
            best = {"acc": acc, "state": copy.deepcopy(model.state_dict()), "epoch": trainer.epoch}
            patience = 0
        else:
            patience += 1
            if patience >= 3:
                break
    bar.close()
    model.load_state_dict(best["state"])
    stats = {"select_acc": best["acc"], "test_acc": trainer.evaluate("test")["acc"], "epoch": best["epoch"]}
    return model.cpu().eval(), stats


def load_or_train_teachers(
    task: Task,
    num_teachers: int,
    cache_dir: Path | None = None,
    adversarial: bool = False,
    device: str = "auto",
    retrain: bool = False,
    progress: bool = True,
    verbose: bool = False,
) -> tuple[list[nn.Module], list[str], list[dict[str, float]]]:
    """The task's first ``num_teachers`` teachers (trained once and cached).

    With ``adversarial`` the last teacher is the planted one: the first teacher with its class
    outputs cyclically permuted.

    :return: modules (frozen, eval mode), names, per-teacher stats (select/test accuracy)
    """
    if num_teachers < 1:
        raise ConfigError(f"--teachers must be >= 1 for a gate that uses teachers, got {num_teachers}")
    n_real = num_teachers - 1 if adversarial else num_teachers
    if adversarial and n_real < 1:
        raise ConfigError("--adversarial-teacher needs --teachers >= 2 (one real teacher to permute)")
    specs = task.teacher_specs
    if n_real > len(specs):
        raise ConfigError(f"task {task.name!r} defines {len(specs)} teachers, {n_real} requested")
    fp = task.fingerprint()
    modules, names, stats = [], [], []
    for i, spec in enumerate(specs[:n_real]):
        path = None if cache_dir is None else Path(cache_dir) / task.key / f"teacher-{spec.name}.pt"
        model = spec.factory()
        if path is not None and path.exists() and not retrain:
            blob = safe_load(path, "teacher checkpoint")
            if blob.get("task_fingerprint") != fp:
                raise StaleCacheError(f"teacher checkpoint {path} was trained on other data (fingerprint "
                                      f"{blob.get('task_fingerprint')} vs {fp}); delete it or pass --retrain-teachers")
            model.load_state_dict(blob["state"])
            st = {k: blob[k] for k in ("select_acc", "test_acc", "epoch")}
        else:
            if verbose:
                print(f"training teacher {spec.name} on {task.key} ...", flush=True)
            model, st = train_teacher(task, spec, seed=1000 + i, device=device, progress=progress)
            if path is not None:
                atomic_save({"state": model.state_dict(), "task_fingerprint": fp, **st}, path)
        for p in model.parameters():
            p.requires_grad_(False)
        modules.append(model.eval())
        names.append(spec.name)
        stats.append(st)
    if adversarial:
        adv = PermutedTeacher(modules[0], task.num_classes).eval()
        modules.append(adv)
        names.append(f"adv-{names[0]}")
        stats.append({"select_acc": float("nan"), "test_acc": float("nan"), "epoch": stats[0]["epoch"]})
    return modules, names, stats


def build_bank(task: Task, modules: list[nn.Module], names: list[str], cache_dir: Path | None = None,
               device: str | torch.device = "cpu", rebuild: bool = False) -> TeacherBank:
    """Stack each teacher's cached training-split logits into a :class:`TeacherBank`."""
    fp = task.fingerprint()
    logits = [cached_logits(m, n, task, cache_dir, device, rebuild, fp) for m, n in zip(modules, names)]
    return TeacherBank(torch.stack(logits, dim=1), names)
