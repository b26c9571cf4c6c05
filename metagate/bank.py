"""The teacher bank: frozen teachers' logits for the training units, looked up by unit id, and their
on-disk cache.

Cache layout under ``cache_dir/<task key>/``::

    logits-<name>.pt    {"fingerprint", "logits" [N_train, C], "checksum"}

The logits' fingerprint hashes the training data, the unit ids and the teacher's
weights, the checksum the logits themselves (dtype, shape, bytes); a mismatch of either raises
:class:`StaleCacheError` instead of loading. This module sits
below the trainer (it imports nothing of it); training teachers lives in :mod:`metagate.teachers`.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from metagate.checks import check_finite
from metagate.diagnostics import teacher_right
from metagate.errors import StaleCacheError
from metagate.io import atomic_save, safe_load, state_fingerprint, tensor_checksum
from metagate.teacher_files import file_logits

if TYPE_CHECKING:  # pragma: no cover
    from metagate.data.task import Task


def default_cache_dir() -> Path:
    """``$METAGATE_CACHE`` or ``~/.cache/metagate``."""
    return Path(os.environ.get("METAGATE_CACHE", Path.home() / ".cache" / "metagate"))


class TeacherBank:
    """Frozen teachers' logits for the training units, looked up by unit id.

    :param logits: ``[N, K, C]``
    :param names: ``K`` teacher names
    """

    #: the bank's optional features, declared here with their defaults (sub-classes override them):
    #: ``online``: some teachers run on each step's inputs, handed over by :meth:`set_step`
    online: bool = False
    #: sequences: ``[N_train, L]`` row of each token position in ``logits``; ``None``: one row per unit
    token_index: Tensor | None = None

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

    def unit_log_probs(self, tau: float, ids: Tensor) -> Tensor:
        """``[B, K, C]`` log-probabilities at ``tau`` of units ``ids`` (a sequence bank flattens its tokens)."""
        return rows(self.log_probs(tau), ids)

    def set_step(self, x: Tensor, ids: Tensor) -> None:  # noqa: B027 - a no-op unless ``online``
        """The step's inputs and unit ids (an online bank runs its teachers on them; the trainer calls it only
        when :attr:`online`)."""

    def unit_right(self, clean_labels: Tensor) -> Tensor | None:
        """``[N, K]`` bool: teacher ``k``'s top class is unit ``i``'s clean label (ground truth for diagnostics
        only); ``None`` when the bank's rows are not the labels' units."""
        if self.logits.shape[0] != clean_labels.shape[0]:
            return None
        return teacher_right(self.logits, clean_labels)

    def to(self, device: torch.device | str) -> TeacherBank:
        """The bank on ``device``; on CUDA, when the logits do not fit (:func:`fits_on_gpu`), a
        :class:`HostBank` in pinned CPU memory serving lookups on the GPU."""
        device = torch.device(device)
        if self.logits.device == device:
            return self
        if device.type == "cuda" and not fits_on_gpu(self.logits, device):
            return HostBank(self.logits, self.names, device)
        return TeacherBank(self.logits.to(device), self.names)


def fits_on_gpu(t: Tensor, device: torch.device, share: float = 0.25) -> bool:
    """Whether ``t`` and one per-temperature log-probability copy of it take at most ``share`` of the GPU's free
    memory (the student, its activations and the optimizer need the rest)."""
    free, _ = torch.cuda.mem_get_info(device)
    return 2 * t.numel() * t.element_size() <= share * free


class HostBank(TeacherBank):
    """Teacher logits too large for the GPU: kept in pinned CPU memory, the rows of a batch gathered on the CPU
    and copied to ``device`` asynchronously."""

    def __init__(self, logits: Tensor, names: list[str], device: torch.device) -> None:
        super().__init__(logits.cpu().pin_memory(), names)
        self.device = device

    def lookup(self, ids: Tensor) -> Tensor:
        return rows(self.logits, ids.cpu()).pin_memory().to(self.device, non_blocking=True)

    def unit_log_probs(self, tau: float, ids: Tensor) -> Tensor:
        return rows(self.log_probs(tau), ids.cpu()).pin_memory().to(self.device, non_blocking=True)

    def to(self, device: torch.device | str) -> TeacherBank:
        return self if torch.device(device) == self.device else TeacherBank(self.logits, self.names).to(device)


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
        if "checksum" in blob:  # caches of older versions have none: they are recomputed below
            _check_logits(blob, path, (len(task.train), None))
            return blob["logits"]
    logits = teacher_logits(teacher, task.train.x, device)
    check_finite(f"logits of teacher {name!r}", logits)
    if path is not None:
        atomic_save({"fingerprint": fp, "logits": logits, "teacher": name, "checksum": tensor_checksum(logits)}, path)
    return logits


def _check_logits(blob: dict, path: Path, shape: tuple[int, int | None]) -> None:
    """The cached logits are the ones written: a float32 ``[N, C]`` tensor whose checksum matches."""
    logits = blob.get("logits")
    fix = "Delete the file or pass --rebuild-cache to recompute it."
    if not torch.is_tensor(logits) or logits.dtype != torch.float32 or logits.ndim != 2 \
            or logits.shape[0] != shape[0]:
        what = (f"{logits.dtype} {tuple(logits.shape)}" if torch.is_tensor(logits) else type(logits).__name__)
        raise StaleCacheError(f"damaged teacher cache {path}: logits are {what}, expected float32 "
                              f"[{shape[0]}, C]. {fix}")
    got = tensor_checksum(logits)
    if got != blob["checksum"]:
        raise StaleCacheError(f"damaged teacher cache {path}: the logits' checksum is {got}, the file recorded "
                              f"{blob['checksum']} (zeroed, shifted or flipped values). {fix}")


def build_bank(task: Task, modules: list[nn.Module], names: list[str], cache_dir: Path | None = None,
               device: str | torch.device = "cpu", rebuild: bool = False,
               files: list[tuple[str, Path]] | None = None) -> TeacherBank:
    """Stack each teacher's cached training-split logits into a :class:`TeacherBank`, then the teacher-logits
    files' (``(name, path)``; row i = training unit i, or keyed by the file's ``ids``)."""
    fp = task.fingerprint()
    logits = [cached_logits(m, n, task, cache_dir, device, rebuild, fp) for m, n in zip(modules, names)]
    ids = torch.arange(len(task.train))
    logits += [file_logits(p, ids, task.num_classes, what=f"task {task.name!r}") for _, p in files or []]
    return TeacherBank(torch.stack(logits, dim=1), [*names, *(n for n, _ in files or [])])
