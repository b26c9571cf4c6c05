"""The sparse top-k bank in the shared loop: a language-modelling task's teachers, scored once into a
:class:`~metagate.teachers.sparse.SparseBank` and read by the core :class:`~metagate.trainer.Trainer` per token.

The shared loop asks a sequence bank for the ``[B * L, K, V]`` rows of a batch's *example* ids
(:class:`~metagate.teachers.sequence.SeqTeacherBank`'s protocol); :class:`SeqSparseBank` maps each (example,
position) to its sparse-bank row through ``token_index [N_train, L]`` and rebuilds those rows alone from their
top-k entries, so no ``[tokens, V]`` table exists (at ``V = 49,152`` a dense float16 bank of the lm task's
training text would take about 9 GB per teacher).

The sparse bank scores the training inputs ``x`` (the right-padded rows, id 0 padding); its position ``t``
holds the teacher's prediction of the token after ``x[t]``: the unit ``y[t]``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from metagate.errors import InputError
from metagate.teachers.bank import TeacherBank, rows
from metagate.teachers.sparse import SparseBank, cached_sparse_bank
from metagate.units import PAD_ID


class SeqSparseBank(TeacherBank):
    """A :class:`SparseBank` over the training examples' tokens, looked up by example id.

    :param sparse: the bank of the ``N_train`` training rows (sequence ``i`` = the real tokens of ``x[i]``)
    :param token_index: ``[N_train, L]`` sparse-bank row of each (example, position); padding: ``sparse.num_units``
    :param taus: per teacher, a temperature its rows are read at on top of the asked one (the calibrated
        teachers, :func:`~metagate.teachers.build.calibrated_bank`); ``None``: 1
    """

    def __init__(self, sparse: SparseBank, token_index: Tensor, taus: list[float] | None = None) -> None:
        self.sparse = sparse
        self.token_index = token_index.cpu()
        self.names = list(sparse.names)
        self.taus = taus

    @property
    def logits(self) -> Tensor:  # type: ignore[override]
        return self.sparse.logits  # raises: no whole table

    def log_probs(self, tau: float) -> Tensor:
        return self.sparse.log_probs(tau)  # raises: no whole table

    @property
    def num_units(self) -> int:
        return int(self.token_index.shape[0])

    @property
    def num_teachers(self) -> int:
        return self.sparse.num_teachers

    @property
    def num_classes(self) -> int:
        return self.sparse.num_classes

    def _rows(self, ids: Tensor) -> Tensor:
        return rows(self.token_index, ids.cpu()).reshape(-1)

    def lookup(self, ids: Tensor) -> Tensor:
        """``[B * L, K, V]`` logits (the rebuilt log-probabilities at temperature 1) of examples ``ids``."""
        return self.unit_log_probs(1.0, ids)

    def unit_log_probs(self, tau: float, ids: Tensor) -> Tensor:
        """``[B * L, K, V]`` log-probabilities at ``tau`` of examples ``ids``' tokens (padding: uniform)."""
        r = self._rows(ids)
        if self.taus is None:
            return self.sparse.unit_log_probs(tau, r).to(ids.device)
        return torch.stack([self.sparse.unit_log_probs(tau * t, r)[:, j] for j, t in enumerate(self.taus)],
                           1).to(ids.device)

    def unit_right(self, clean_labels: Tensor) -> Tensor:
        """``[N_train * L, K]`` bool: each teacher's top-1 entry is the clean label (False on padding)."""
        idx = self.token_index.reshape(-1)
        safe = idx.clamp_max(max(self.sparse.num_units - 1, 0))
        top = self.sparse.ids[safe, :, 0].to(torch.int64)
        lab = clean_labels.reshape(-1, 1).cpu()
        return (top == lab) & (lab != PAD_ID) & (idx < self.sparse.num_units).unsqueeze(1)

    def to(self, device: torch.device | str) -> SeqSparseBank:  # noqa: ARG002 - the protocol's signature
        """The same bank: its tensors stay on the CPU and a batch's rows are moved to the batch's device."""
        return self


def training_sequences(x: Tensor) -> tuple[list[Tensor], Tensor]:
    """The real tokens of each right-padded row of ``x [N, L]`` (id 0 is padding; a row's real tokens come
    first) and ``token_index [N, L]`` of their packing."""
    real = x != PAD_ID
    lengths = real.sum(1)
    if not torch.equal(real, torch.arange(x.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)):
        raise InputError("a training row has padding (id 0) before a real token; the sparse bank needs "
                         "right-padded rows")
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    n = int(offsets[-1])
    idx = torch.where(real, offsets[:-1].unsqueeze(1) + torch.arange(x.shape[1]), torch.full_like(x, n))
    return [row[m] for row, m in zip(x, real)], idx


def sparse_bank_file(names: Sequence[str], k: int) -> str:
    """The cache file name of the sparse bank of teachers ``names`` at top-``k``."""
    return f"sparse-{'+'.join(names)}-top{k}.safetensors"


def sparse_seq_bank(teachers: Sequence[nn.Module], names: Sequence[str], x: Tensor, k: int,
                    path: str | os.PathLike | None = None, batch_size: int = 8) -> SeqSparseBank:
    """The teachers' top-``k`` bank of the training inputs ``x [N, L]``: read from ``path`` when it was scored
    for these inputs, teachers and ``k``, else scored (and saved at ``path``); a file for other inputs or
    teachers is a :class:`~metagate.errors.StaleCacheError`."""
    seqs, index = training_sequences(x)
    if path is None:
        from metagate.teachers.sparse import score_sparse

        sparse = score_sparse(list(teachers), seqs, k, names=list(names), batch_size=batch_size, tail="uniform")
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        sparse = cached_sparse_bank(path, list(teachers), seqs, k, names=list(names), batch_size=batch_size,
                                    tail="uniform")
    return SeqSparseBank(sparse, index)
