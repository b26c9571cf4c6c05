"""Validation batches of the meta gate: seeded slices of the ``meta`` split (never ``select``)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor

from metagate.layout import channels_last

if TYPE_CHECKING:  # pragma: no cover
    from metagate.data.task import Split


class ValSampler:
    """The ``meta`` split, shuffled once into a contiguous copy, served as batches that are slices of it.

    Each pass starts at a random offset below the batch size and visits the contiguous batches after it in a
    random order: a batch is a slice (no gather, no copy; a gather of a 128x784 batch costs a noticeable share of
    a small MLP's step) and its members still mix between passes.

    :param split: the ``meta`` split
    :param batch_size: validation batch size (capped at the split's size)
    :param seed: the run's seed (the sampler's generator is its own)
    :param device: where the batches live
    :param dtype: the student's parameter dtype (inputs are cast once)
    :param conv: the student is convolutional: image batches are served channels-last, the same values on
        the layout where the CPU conv/pool kernels of the validation forward are fastest
    """

    def __init__(self, split: Split, batch_size: int, seed: int, device: torch.device, dtype: torch.dtype,
                 conv: bool) -> None:
        # token ids (sequence inputs) keep their integer dtype
        x = split.x.to(device, dtype) if split.x.is_floating_point() else split.x.to(device)
        y = split.y.to(device)
        self._gen = torch.Generator().manual_seed(7919 + int(seed))
        perm = torch.randperm(len(split), generator=self._gen).to(device)
        self.x, self.y = x.index_select(0, perm), y.index_select(0, perm)
        self.batch_size = min(batch_size, len(split))
        # train-mode batch norm in float32 on channels-last: validation gradients within ~2e-3 (relative) of
        # float64 instead of ~4e-5, far below the minibatch noise of a hypergradient
        self.channels_last = conv and self.x.dim() == 4
        self._order: Tensor = torch.empty(0, dtype=torch.long)  # start of each batch of the pass
        self._pos = 0  # the next batch of the pass; an empty order starts a pass

    def next(self) -> tuple[Tensor, Tensor]:
        """The next validation batch ``(x [M, ...], y [M])``."""
        if self._pos >= len(self._order):
            n, size = len(self.y), self.batch_size
            offset = int(torch.randint(0, n - size + 1 if n < 2 * size else size, (1,), generator=self._gen))
            chunks = (n - offset) // size
            self._order = offset + size * torch.randperm(chunks, generator=self._gen)
            self._pos = 0
        a = int(self._order[self._pos])
        self._pos += 1
        xv, yv = self.x[a : a + self.batch_size], self.y[a : a + self.batch_size]
        return (channels_last(xv) if self.channels_last else xv), yv

    def state_dict(self, prefix: str = "") -> dict[str, Any]:
        """The generator's state and the position in the current pass (keys ``rng``, ``order``, ``pos`` after
        ``prefix``)."""
        return {f"{prefix}rng": self._gen.get_state(), f"{prefix}order": self._order, f"{prefix}pos": self._pos}

    def load_state_dict(self, state: dict[str, Any], prefix: str = "") -> None:
        self._gen.set_state(state[f"{prefix}rng"])
        self._order, self._pos = state[f"{prefix}order"], int(state[f"{prefix}pos"])
