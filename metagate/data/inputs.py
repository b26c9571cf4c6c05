"""A map-style dataset's inputs as a split's ``x`` that is not held in memory.

:class:`DatasetInputs` reads items by unit id on demand (``x[ids]``, ``x[a:b]``, ``x.index_select(0, ids)``) and
stacks their inputs, so the code that reads ``split.x`` by id (the trainer's probe, module teachers' logits,
the meta gate's full pass over ``train_x``) works on data on disk without reading it all at once. The
trainer's batches come from a ``DataLoader`` (:mod:`metagate.loader`), not from here.

:func:`scan_dataset` reads the labels (and ids) once: from ``dataset.targets`` when the dataset has it (the
torchvision convention), else from one pass over the items (the inputs are dropped as they are read).
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from metagate.errors import InputError


def item_input(value: Any) -> Tensor:
    """One item's input as a tensor (floating inputs as float32, like the in-memory splits)."""
    t = value if isinstance(value, Tensor) else torch.as_tensor(np.asarray(value))
    return t.float() if t.is_floating_point() else t


def scan_dataset(dataset: Dataset, what: str) -> tuple[Tensor, Tensor | None]:
    """``(labels [N], ids [N] or None)`` of a map-style dataset of ``(x, y)`` or ``(x, y, id)`` items."""
    n = len(dataset)  # type: ignore[arg-type]
    if n == 0:
        raise InputError(f"{what} is empty")
    first = dataset[0]
    if not isinstance(first, (tuple, list)) or len(first) not in (2, 3):
        got = len(first) if isinstance(first, (tuple, list)) else type(first).__name__
        raise InputError(f"{what}: dataset items must be (x, y) or (x, y, id) tuples, item 0 is {got}")
    arity = len(first)
    targets = getattr(dataset, "targets", None)
    if targets is not None and arity == 2:
        y = torch.as_tensor(np.asarray(targets))
        if y.shape[0] != n:
            raise InputError(f"{what}: dataset.targets has {y.shape[0]} labels for {n} items")
        return y, None
    ys, ids = [], []
    for i in range(n):
        it = dataset[i] if i else first
        if not isinstance(it, (tuple, list)) or len(it) != arity:
            raise InputError(f"{what}: dataset items must all be (x, y) or all (x, y, id); item {i} differs from "
                             f"item 0 ({arity} fields)")
        ys.append(it[1])
        if arity == 3:
            ids.append(int(it[2]))
    y = torch.as_tensor(np.asarray([v.item() if isinstance(v, Tensor) else v for v in ys]))
    return y, (torch.as_tensor(ids, dtype=torch.long) if arity == 3 else None)


class DatasetInputs:
    """The inputs of ``dataset`` by unit id (= item index), read when indexed.

    :param dataset: map-style, item ``i`` = ``(x, y[, id])``
    :param device: where indexed inputs are returned
    :param random: the dataset's transform is random (its inputs have no fixed content to hash)
    """

    def __init__(self, dataset: Dataset, device: torch.device | str = "cpu", random: bool = False) -> None:
        self.dataset, self.device, self.random = dataset, torch.device(device), random
        self._n = len(dataset)  # type: ignore[arg-type]
        self._item_shape: tuple[int, ...] | None = None
        self._digest: bytes | None = None

    def __len__(self) -> int:
        return self._n

    @property
    def shape(self) -> torch.Size:
        if self._item_shape is None:
            self._item_shape = tuple(item_input(self.dataset[0][0]).shape)
        return torch.Size((self._n, *self._item_shape))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def dim(self) -> int:
        return self.ndim

    def _read(self, ids: list[int]) -> Tensor:
        if not ids:
            return torch.empty(0, *self.shape[1:]).to(self.device)
        return torch.stack([item_input(self.dataset[i][0]) for i in ids]).to(self.device)

    def __getitem__(self, index: Any) -> Tensor:
        if isinstance(index, slice):
            return self._read(list(range(*index.indices(self._n))))
        if isinstance(index, int):
            return self._read([index])[0]
        if isinstance(index, Tensor) and index.dtype == torch.bool:
            index = index.nonzero().flatten()
        return self._read([int(i) for i in torch.as_tensor(index).reshape(-1).tolist()])

    def index_select(self, dim: int, index: Tensor) -> Tensor:
        if dim != 0:
            raise ValueError("DatasetInputs are indexed by unit (dim 0) only")
        return self[index]

    def to(self, device: torch.device | str, dtype: torch.dtype | None = None, non_blocking: bool = False
           ) -> DatasetInputs:
        """The same inputs, returned on ``device`` when indexed (nothing is copied now)."""
        if dtype is not None:
            raise ValueError("DatasetInputs keep their items' dtype")
        if torch.device(device) == self.device:
            return self
        out = DatasetInputs(self.dataset, device, self.random)
        out._item_shape, out._digest = self._item_shape, self._digest
        return out

    def cpu(self) -> DatasetInputs:
        return self.to("cpu")

    def content_digest(self, chunk: int = 1024) -> bytes:
        """Hash of every input (one pass, in chunks), or of the dataset's type and size when its transform is
        random (the cache keys of such data follow its labels)."""
        if self._digest is None:
            h = hashlib.sha256()
            if self.random:
                h.update(f"{type(self.dataset).__qualname__}:{self._n}:random".encode())
            else:
                for a in range(0, self._n, chunk):
                    h.update(np.ascontiguousarray(self[a : a + chunk].cpu().numpy()).tobytes())
            self._digest = h.digest()
        return self._digest
