"""Training batches from a torch ``DataLoader`` instead of the in-memory split (data on disk, ``num_workers``, a
dataset's transform run every epoch).

:class:`WithIds` gives any map-style dataset's items their unit ids (the index); :class:`LoaderTrainer` is
the shared :class:`~metagate.trainer.Trainer` with only its batch source replaced: the loader visits the
units in the same per-(seed, epoch) order as the in-memory path, so with a deterministic dataset both give
the same student bit for bit. The in-memory path stays the default of the built-in tasks (the trainer itself
is unchanged).

What reads the training inputs by unit id outside the batches (``train_x``: the meta gate's full pass, module
teachers' logits) reads the dataset's items (:class:`~metagate.data.inputs.DatasetInputs`); online teachers
(:mod:`metagate.teachers.online`) run on each batch's inputs.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, TensorDataset, default_collate

from metagate.data.task import Batch
from metagate.errors import InputError
from metagate.trainer import Trainer


class WithIds(Dataset):
    """``dataset[i]`` as ``(x, y, i)``: the unit id rides along with every item."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> tuple[Any, Any, int]:
        item = self.dataset[i]
        return item[0], item[1], i

    def __getitems__(self, ids: list[int] | Tensor) -> Any:
        """A batch's items (the DataLoader's batched fetch): a ``TensorDataset`` is gathered in one index per
        tensor, any other dataset item by item."""
        if isinstance(self.dataset, TensorDataset) and len(self.dataset.tensors) >= 2:
            idx = torch.as_tensor(ids, dtype=torch.long)
            return Gathered(self.dataset.tensors[0].index_select(0, idx), self.dataset.tensors[1].index_select(0, idx),
                            idx)
        return [self[i] for i in (ids.tolist() if torch.is_tensor(ids) else ids)]


class Gathered(tuple):
    """``(x, y, ids)`` of a batch already stacked by :meth:`WithIds.__getitems__`."""

    def __new__(cls, x: Tensor, y: Tensor, ids: Tensor) -> Gathered:
        return super().__new__(cls, (x, y, ids))


def collate(batch: Any) -> Any:
    """The default collation, except for a batch :class:`WithIds` already stacked."""
    return tuple(batch) if isinstance(batch, Gathered) else default_collate(batch)


class EpochOrder(Sampler[Tensor]):
    """The in-memory path's batches of one epoch (``randperm`` seeded by ``(seed, epoch)``, cut into batches),
    each a tensor of unit ids: no per-id Python loop in the loader."""

    def __init__(self, n: int, seed: int, batch_size: int) -> None:
        self.n, self.seed, self.batch_size, self.epoch = n, seed, batch_size, 0

    def __len__(self) -> int:
        return -(-self.n // self.batch_size)

    def __iter__(self) -> Iterator[Tensor]:
        g = torch.Generator().manual_seed(1_000_003 * self.seed + self.epoch)
        return iter(torch.randperm(self.n, generator=g).split(self.batch_size))


class LoaderTrainer(Trainer):
    """:class:`~metagate.trainer.Trainer` whose training batches come from a ``DataLoader`` over ``dataset``.

    :param dataset: map-style, ``len(dataset) == len(task.train)``, item ``i`` = training unit ``i`` as
        ``(x, y)``
    :param num_workers: the loader's worker processes
    """

    def __init__(self, *args: Any, dataset: Dataset, num_workers: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        n = len(self.task.train)
        if len(dataset) != n:  # type: ignore[arg-type]
            raise InputError(f"the loader's dataset has {len(dataset)} items but the training split has {n} "  # type: ignore[arg-type]
                             "units")
        if num_workers < 0:
            raise InputError(f"num_workers must be >= 0, got {num_workers}")
        self.sampler = EpochOrder(n, self.config.seed, self.config.batch_size)
        self.loader = DataLoader(WithIds(dataset), batch_sampler=self.sampler,
                                 num_workers=num_workers, pin_memory=self.device.type == "cuda", collate_fn=collate,
                                 persistent_workers=num_workers > 0)

    def epoch_batches(self, epoch: int) -> Iterator[Batch]:
        self.sampler.epoch = epoch
        for x, y, ids in self.loader:
            yield Batch(_float(x).to(self.device, non_blocking=True), y.long().to(self.device, non_blocking=True),
                        ids.long().to(self.device, non_blocking=True))


def _float(x: Tensor) -> Tensor:
    return x.float() if x.is_floating_point() else x
