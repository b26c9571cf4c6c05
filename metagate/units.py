"""Units of the shared loop: one per example for classification, one per target token for sequences.

A sequence task's batch holds ``y [B, T]`` labels padded with :data:`PAD_ID` and the student returns
logits ``[B, T, V]``; the loop works on ``N = B * T`` flattened units with the padding mask, so every
loss, gate and reduction sees units exactly as for classification (``T = 1``). Unit ``i`` of training
example ``e`` at position ``t`` has the global id ``e * T + t`` (per-unit weights and diagnostics).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor

from metagate.data.task import Batch
from metagate.seq_models import PAD

if TYPE_CHECKING:  # pragma: no cover
    from metagate.data.task import Task

#: id of ``<pad>`` in every sequence task's target vocabulary (padded label positions hold it)
PAD_ID = PAD


def is_sequence(task: Task) -> bool:
    """Whether the task's units are tokens (labels ``[N, T]``)."""
    return task.train.y.ndim == 2


def token_units(batch: Batch, logits: Tensor) -> tuple[Batch, Tensor]:
    """``(batch with its [B, T] padding mask, logits [B*T, V])`` for sequence logits ``[B, T, V]``;
    classification batches and logits pass through unchanged."""
    if logits.ndim != 3:
        return batch, logits
    if batch.mask is None:
        batch = Batch(batch.x, batch.y, batch.ids, batch.y != PAD_ID)
    return batch, logits.reshape(-1, logits.shape[-1])


def unit_ids(batch: Batch) -> Tensor:
    """Global unit ids of a batch: its example ids, or ``id * T + t`` for each of its ``[B, T]`` tokens."""
    if batch.y.ndim != 2:
        return batch.ids
    t = batch.y.shape[1]
    return (batch.ids.unsqueeze(1) * t + torch.arange(t, device=batch.ids.device)).reshape(-1)


def num_units(task: Task) -> int:
    """Training units: examples, or examples x padded length for sequences."""
    return int(task.train.y.numel())


def train_unit_mask(task: Task) -> Tensor | None:
    """``[N_train * T]`` bool, False on padding (``None`` for classification: every unit is real)."""
    return (task.train.y != PAD_ID).reshape(-1) if is_sequence(task) else None


def unit_ce(logits: Tensor, y: Tensor) -> Tensor:
    """Mean CE over the units of a batch: examples, or the real (unpadded) tokens of ``[B, T, V]`` logits."""
    if logits.ndim == 3:
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=PAD_ID)
    return F.cross_entropy(logits, y)


def flat_logits(logits: Tensor) -> Tensor:
    """``[B*T, V]`` for sequence logits ``[B, T, V]``; classification logits unchanged."""
    return logits.reshape(-1, logits.shape[-1]) if logits.ndim == 3 else logits
