"""Teacher logits per target token for sequence tasks, and their on-disk cache.

Only real (unmasked) training tokens are stored, packed as ``[M, K, V]`` in the order of
``task.train.y != <pad>`` (row-major); a ``[N_train, L]`` index maps each (example, position) to its row
and every padded position to one extra all-zero row (uniform teachers there -- padding is masked
anyway). Lookups return the flattened ``[B * L, K, V]`` the shared loop's units need.

Cache files under ``cache_dir/<task key>/`` (same fingerprint rules as :mod:`metagate.teachers.bank`; a stale file
raises :class:`~metagate.errors.StaleCacheError`)::

    tokens-<name>.pt         {"fingerprint", "logits" [M, V] float16}
    tokens-<name>-top<k>.pt  {"fingerprint", "values" [M, k] float32, "indices" [M, k] uint8/int16, "vocab" V}

**Top-k form** keeps each token's ``k`` largest log-probabilities; the remainder mass
``r = 1 - sum(top-k probabilities)`` is spread uniformly over the other ``V - k`` classes when the
bank is rebuilt. For a student distribution ``q``, the KL to the rebuilt ``p~`` differs from the KL to the
true ``p`` by at most ``r * (log(V - k) + max_tail log q - min_tail log q)`` (:func:`topk_kl_bound`;
the tail entropy moves by at most ``r log(V - k)``, the cross term by at most ``r`` times the spread of
``log q`` over the tail), at temperature 1. The kept log-probabilities are stored in float32 (float16
rounding of values near ``log p = -10`` moves the KL by more than the bound allows for large ``k``);
the ids take one byte while ``V <= 256``: 5 bytes per kept entry against 2 per class in the float16 form.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from metagate.checks import check_finite
from metagate.errors import ConfigError, InputError, StaleCacheError
from metagate.io import atomic_save, safe_load
from metagate.teachers.bank import TeacherBank, logits_fingerprint, rows
from metagate.teachers.files import read_teacher_file, token_table
from metagate.units import PAD_ID

if TYPE_CHECKING:  # pragma: no cover
    from metagate.data.task import Task


class SeqTeacherBank(TeacherBank):
    """Teachers' per-token logits of the training examples, looked up by example id.

    :param token_logits: ``[M, K, V]`` for the ``M`` real training tokens (float16 storage is kept;
        lookups return float32)
    :param token_index: ``[N_train, L]`` row of each position in ``token_logits`` (padding: ``M``)
    :param names: ``K`` teacher names
    """

    def __init__(self, token_logits: Tensor, token_index: Tensor, names: list[str]) -> None:
        if token_logits.ndim != 3:
            raise ValueError(f"token logits must be [M, K, V], got {tuple(token_logits.shape)}")
        check_finite("teacher logits", token_logits)
        pad_row = torch.zeros(1, *token_logits.shape[1:], dtype=token_logits.dtype, device=token_logits.device)
        self.logits = torch.cat([token_logits, pad_row])
        self.token_index = token_index.to(self.logits.device)
        self.names = list(names)
        self._log_probs: dict[float, Tensor] = {}

    @property
    def num_units(self) -> int:
        """Training examples covered (the trainer compares it with ``len(task.train)``)."""
        return int(self.token_index.shape[0])

    def lookup(self, ids: Tensor) -> Tensor:
        """``[B * L, K, V]`` float32 logits of examples ``ids``."""
        return self.logits.index_select(0, rows(self.token_index, ids).reshape(-1)).float()

    def log_probs(self, tau: float) -> Tensor:
        """``[M + 1, K, V]`` float32 ``log_softmax(logits / tau)`` per stored token, once per temperature."""
        lp = self._log_probs.get(float(tau))
        if lp is None:
            lp = self._log_probs[float(tau)] = torch.log_softmax(self.logits.float() / float(tau), -1)
        return lp

    def unit_log_probs(self, tau: float, ids: Tensor) -> Tensor:
        """``[B * L, K, V]`` teacher log-probabilities at ``tau`` of examples ``ids``' tokens."""
        return self.log_probs(tau).index_select(0, rows(self.token_index, ids).reshape(-1))

    def unit_right(self, clean_labels: Tensor) -> Tensor:
        """``[N_train * L, K]`` bool: each teacher's top token is the clean label (False on padding)."""
        top = self.logits.argmax(-1).index_select(0, self.token_index.reshape(-1))
        lab = clean_labels.to(top.device).reshape(-1, 1)
        return (top == lab) & (lab != PAD_ID)

    def to(self, device: torch.device | str) -> SeqTeacherBank:
        if self.logits.device == torch.device(device):
            return self
        return SeqTeacherBank(self.logits[:-1].to(device), self.token_index, self.names)


def token_index(mask: Tensor) -> Tensor:
    """``[N, L]`` row of each real token in the row-major packing of ``mask``; padding gets ``M``."""
    flat = mask.reshape(-1)
    m = int(flat.sum())
    idx = torch.full_like(flat, m, dtype=torch.long)
    idx[flat] = torch.arange(m)
    return idx.view(mask.shape)


def topk_compress(log_probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest log-probabilities of each row (float32) and their class ids (uint8, or int16 for
    ``V > 256``).

    :raises ConfigError: ``k < 1`` or ``k >= V`` (nothing would be saved)
    """
    v = log_probs.shape[-1]
    if not 1 <= k < v:
        raise ConfigError(f"--topk must be in [1, V) = [1, {v}) for a vocabulary of {v} tokens, got {k}")
    vals, idx = log_probs.float().topk(k, -1)
    return vals, idx.to(torch.uint8 if v <= 256 else torch.int16)


def topk_expand(values: Tensor, indices: Tensor, vocab: int) -> Tensor:
    """Full log-probabilities ``[..., V]`` from a top-k form: the stored entries, and the remainder mass
    ``1 - sum exp(values)`` spread uniformly over the other ``V - k`` classes (then renormalised, which
    only absorbs rounding)."""
    vals = values.float()
    k = vals.shape[-1]
    rest = (1.0 - vals.exp().sum(-1, keepdim=True)).clamp_min(1e-12) / (vocab - k)
    out = rest.log().expand(*vals.shape[:-1], vocab).clone()
    out.scatter_(-1, indices.long(), vals)
    return torch.log_softmax(out, -1)


def topk_kl_bound(teacher_log_probs: Tensor, student_log_probs: Tensor, k: int) -> Tensor:
    """Per-row bound on ``|KL(p~ || q) - KL(p || q)|`` for the top-``k`` rebuild ``p~`` of ``p`` (see the
    module docstring). Shapes ``[..., V]``; returns ``[...]``."""
    v = teacher_log_probs.shape[-1]
    top = teacher_log_probs.topk(k, -1).indices
    tail = torch.ones_like(teacher_log_probs, dtype=torch.bool).scatter_(-1, top, False)
    r = (teacher_log_probs.exp() * tail).sum(-1)
    lq = student_log_probs
    spread = lq.masked_fill(~tail, float("-inf")).amax(-1) - lq.masked_fill(~tail, float("inf")).amin(-1)
    return r * (torch.log(torch.tensor(float(v - k))) + spread)


@torch.no_grad()
def token_logits(teacher: nn.Module, task: Task, device: torch.device | str = "cpu",
                 batch_size: int = 512) -> Tensor:
    """``[M, V]`` teacher-forced logits of the real training tokens (eval mode, CPU float32)."""
    teacher.eval().to(device)
    x, mask = task.train.x, task.train.y != PAD_ID
    out = []
    for i in range(0, len(x), batch_size):
        lg = teacher(x[i : i + batch_size].to(device)).float().cpu()
        out.append(lg[mask[i : i + batch_size]])
    return torch.cat(out)


def token_logits_file(name: str, topk: int | None = None) -> str:
    """The cache file name of a teacher's token logits (full float16, or the top-k form)."""
    return f"tokens-{name}-top{topk}.pt" if topk else f"tokens-{name}.pt"


def cached_token_logits(teacher: nn.Module, name: str, task: Task, cache_dir: Path | None,
                        device: torch.device | str = "cpu", rebuild: bool = False, topk: int | None = None,
                        task_fingerprint: str | None = None) -> Tensor:
    """``[M, V]`` logits (float16; with ``topk``, log-probabilities rebuilt from the top-k form) of one
    teacher's training tokens, from the cache when its fingerprint matches.

    :raises StaleCacheError: the cached file was computed for other data, ids, weights or storage form
    :raises InputError: the teacher's vocabulary differs from the task's
    """
    v = task.num_classes
    ids = torch.arange(len(task.train))
    fp = logits_fingerprint(task_fingerprint or task.fingerprint(), ids, teacher) + (f"-top{topk}" if topk else "")
    path = None if cache_dir is None else Path(cache_dir) / task.key / token_logits_file(name, topk)
    if path is not None and path.exists() and not rebuild:
        blob = safe_load(path, "teacher token-logits cache")
        if not isinstance(blob, dict) or blob.get("fingerprint") != fp:
            got = blob.get("fingerprint") if isinstance(blob, dict) else None
            raise StaleCacheError(
                f"stale teacher cache {path}: it was computed for fingerprint {got}, but the current data, unit ids, "
                f"teacher checkpoint and storage form give {fp}. Delete the file or pass --rebuild-cache.")
        if topk:
            return topk_expand(blob["values"], blob["indices"], int(blob["vocab"]))
        return blob["logits"]
    logits = token_logits(teacher, task, device)
    if logits.shape[-1] != v:
        raise InputError(f"vocabulary mismatch: teacher {name!r} outputs {logits.shape[-1]} target tokens, "
                         f"the task's (and the student's) target vocabulary has {v}")
    check_finite(f"logits of teacher {name!r}", logits)
    if topk:
        values, indices = topk_compress(torch.log_softmax(logits, -1), topk)
        if path is not None:
            atomic_save({"fingerprint": fp, "values": values, "indices": indices, "vocab": v, "teacher": name}, path)
        return topk_expand(values, indices, v)
    half = logits.to(torch.float16)
    if path is not None:
        atomic_save({"fingerprint": fp, "logits": half, "teacher": name}, path)
    return half


def build_seq_bank(task: Task, modules: list[nn.Module], names: list[str], cache_dir: Path | None = None,
                   device: str | torch.device = "cpu", rebuild: bool = False,
                   topk: int | None = None, files: list[tuple[str, Path]] | None = None) -> SeqTeacherBank:
    """Stack each teacher's cached token logits into a :class:`SeqTeacherBank`, then the per-token ``[N, T, V]``
    teacher-logits files' (``(name, path)``, :func:`metagate.teachers.files.token_table`)."""
    if topk is not None:
        topk_compress(torch.zeros(1, task.num_classes), topk)  # refuse k >= V before any teacher runs
    fp = task.fingerprint()
    logits = [cached_token_logits(m, n, task, cache_dir, device, rebuild, topk, fp) for m, n in zip(modules, names)]
    mask = task.train.y != PAD_ID
    ids = torch.arange(len(task.train))
    logits += [token_table(read_teacher_file(p), ids, mask, task.num_classes) for _, p in files or []]
    stacked = torch.stack([lg.to(torch.float16) for lg in logits], 1)  # float16 in memory too
    return SeqTeacherBank(stacked, token_index(mask), [*names, *(n for n, _ in files or [])])
