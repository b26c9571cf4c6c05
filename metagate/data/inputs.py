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


def as_tensor(value: Any, what: str) -> Tensor:
    """``value`` (a tensor, an array, a list of numbers) as a CPU tensor.

    :raises InputError: text (e.g. string class labels), objects or ragged lists, naming ``what``
    """
    if isinstance(value, Tensor):
        return value.detach().cpu()
    try:
        arr = np.asarray(value)
    except ValueError as e:  # ragged nested lists
        raise InputError(f"{what}: not a rectangular array of numbers ({e})") from e
    if arr.dtype.kind in "USO":
        first = arr.reshape(-1)[0].item() if arr.size else None
        kind = "text" if arr.dtype.kind in "US" or isinstance(first, (str, bytes)) else "objects"
        hint = (" (class labels must be integer ids 0..C-1: map them first, e.g. with "
                "sklearn.preprocessing.LabelEncoder)" if "label" in what else "")
        raise InputError(f"{what} hold {kind}, e.g. {first!r}, not numbers{hint}")
    try:
        return torch.as_tensor(arr)
    except TypeError as e:
        raise InputError(f"{what}: cannot be read as numbers ({arr.dtype}): {e}") from e


def check_item_shapes(shapes: list[tuple[int, ...]], ids: list[Any] | None, what: str,
                      positions: list[int] | None = None) -> None:
    """Every item's input has the first item's shape; else an :class:`InputError` naming both items.

    :param ids: the items' unit ids when the dataset gives them (else the item index is the id)
    :param positions: the items' indices in the dataset (default ``0..len-1``)
    """
    positions = positions if positions is not None else list(range(len(shapes)))
    for k, shape in enumerate(shapes):
        if shape != shapes[0]:
            def name(j: int) -> str:
                return f"item {positions[j]}" + (f" (id {_plain(ids[j])})" if ids is not None else "")
            raise InputError(f"{what}: inputs of different shapes cannot be stacked into a batch: {name(0)} has "
                             f"shape {tuple(shapes[0])}, {name(k)} has {tuple(shape)} (pad or resize them to one "
                             "shape, e.g. in the dataset's transform)")


def _plain(v: Any) -> Any:
    return v.item() if isinstance(v, Tensor) and v.numel() == 1 else v


def item_input(value: Any, what: str = "input") -> Tensor:
    """One item's input as a tensor (floating inputs as float32, like the in-memory splits)."""
    t = as_tensor(value, what)
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
        y = as_tensor(targets, f"{what} labels (dataset.targets)")
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
    y = as_tensor([v.item() if isinstance(v, Tensor) and v.numel() == 1 else v for v in ys], f"{what} labels")
    return y, (torch.as_tensor(ids, dtype=torch.long) if arity == 3 else None)


class DatasetInputs:
    """The inputs of ``dataset`` by unit id (= item index), read when indexed.

    :param dataset: map-style, item ``i`` = ``(x, y[, id])``
    :param device: where indexed inputs are returned
    :param random: the dataset's transform is random (its inputs have no fixed content to hash)
    :param what: the argument the dataset was given as (``train``), for errors
    """

    def __init__(self, dataset: Dataset, device: torch.device | str = "cpu", random: bool = False,
                 what: str = "dataset") -> None:
        self.dataset, self.device, self.random, self.what = dataset, torch.device(device), random, what
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
        xs = [item_input(self.dataset[i][0], f"item {i}'s input") for i in ids]
        shapes = [tuple(x.shape) for x in xs]
        if any(sh != tuple(self.shape[1:]) for sh in shapes):  # item 0 fixes the shape of every item
            check_item_shapes([tuple(self.shape[1:]), *shapes], None, self.what, [0, *ids])
        return torch.stack(xs).to(self.device)

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
        out = DatasetInputs(self.dataset, device, self.random, self.what)
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
