"""Tasks: clean/noisy splits, a student factory and teacher specs.

A task holds in-memory tensors (built-in tasks are small enough) and splits them:

* ``train`` -- possibly with injected label noise (``corrupted`` records which units),
* ``meta``  -- clean validation that learned gates may train on,
* ``select`` -- clean validation used only to choose hyperparameters/checkpoints,
* ``test``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from metagate.checks import check_labels
from metagate.errors import ConfigError, InputError


@dataclass
class Batch:
    """One mini-batch. ``ids`` index the split's units; ``mask`` is ``None`` for classification.

    :param x: ``[B, ...]`` inputs
    :param y: ``[B]`` (or ``[B, T]`` for sequences) labels
    :param ids: ``[B]`` unit ids
    :param mask: ``[B, T]`` or ``None``
    """

    x: Tensor
    y: Tensor
    ids: Tensor
    mask: Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        m = None if self.mask is None else self.mask.to(device, non_blocking=True)
        return Batch(self.x.to(device, non_blocking=True), self.y.to(device, non_blocking=True),
                     self.ids.to(device, non_blocking=True), m)

    def __len__(self) -> int:
        return int(self.x.shape[0])


@dataclass
class Split:
    """A labelled split kept as tensors."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.shape[0] != self.y.shape[0]:
            raise InputError(f"split has {self.x.shape[0]} inputs but {self.y.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.y.shape[0])


@dataclass
class TeacherSpec:
    """How to build one teacher (trained by the project, see :mod:`metagate.teachers.training`)."""

    name: str
    factory: Callable[[], nn.Module]
    epochs: int = 10
    lr: float = 1e-3
    batch_size: int = 128


@dataclass
class Task:
    """A built-in or user task.

    :param name: registry name
    :param num_classes: ``C``
    :param train: training split (labels possibly noisy)
    :param meta: clean validation part gates may learn from
    :param select: clean validation part for model selection only
    :param test: test split
    :param corrupted: ``[N_train]`` bool, True where the label was corrupted
    :param clean_train_labels: ``[N_train]`` the labels before noise
    :param students: arch name -> factory
    :param teacher_specs: teachers the task trains (first ``K`` are used)
    :param info: free-form facts about the task (noise, data seed, variant, ...); read by the trainer:
        ``info["unit_classes"]``, ``name -> [N_train]`` (``[N_train, L]`` on sequences) bool masks of classes of
        training units, whose KD shares and label weight the run logs per class (``gate/share_<name>_t<k>``)
    """

    name: str
    num_classes: int
    train: Split
    meta: Split
    select: Split
    test: Split
    corrupted: Tensor
    clean_train_labels: Tensor
    students: dict[str, Callable[[], nn.Module]]
    teacher_specs: list[TeacherSpec]
    default_student: str = "mlp"
    info: dict[str, object] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("train", "meta", "select", "test"):
            split = getattr(self, name)
            if len(split) == 0:
                raise InputError(f"task {self.name!r}: the {name!r} split is empty")
            check_labels(split.y, self.num_classes, f"{name} labels")

    @property
    def key(self) -> str:
        """A short, file-system-safe identity of data + noise (for caches and run names)."""
        return (f"{self.name}{self.info.get('variant', '')}-{self.info.get('noise_type', 'none')}"
                f"{self.info.get('noise', 0)}-d{self.info.get('data_seed', 0)}")

    def fingerprint(self) -> str:
        """Hash of the training inputs and (noisy) labels: changes when the data changes."""
        h = hashlib.sha256()
        for t in (self.train.x, self.train.y):
            digest = getattr(t, "content_digest", None)  # inputs read from a dataset (metagate.data.inputs)
            h.update(digest() if digest is not None else np.ascontiguousarray(t.cpu().numpy()).tobytes())
        return h.hexdigest()[:16]

    def make_student(self, arch: str | None = None) -> nn.Module:
        arch = arch or self.default_student
        if arch not in self.students:
            raise ConfigError(f"task {self.name!r} has no student {arch!r}; choose from {sorted(self.students)}")
        return self.students[arch]()


def inject_noise(
    labels: Tensor, num_classes: int, rate: float, kind: str, generator: torch.Generator
) -> tuple[Tensor, Tensor]:
    """Corrupt a ``rate`` fraction of ``labels``.

    ``symmetric``: a corrupted label is redrawn uniformly from the *other* classes.
    ``pairflip``: class ``c`` becomes ``(c + 1) % C``.

    :return: noisy labels ``[N]``, corrupted mask ``[N]`` (bool)
    """
    if not 0.0 <= rate < 1.0:
        raise ConfigError(f"--noise must be in [0, 1), got {rate}")
    if kind not in ("symmetric", "pairflip"):
        raise ConfigError(f"--noise-type must be symmetric or pairflip, got {kind!r}")
    n = labels.shape[0]
    corrupted = torch.zeros(n, dtype=torch.bool)
    if rate == 0:
        return labels.clone(), corrupted
    idx = torch.randperm(n, generator=generator)[: int(round(rate * n))]
    corrupted[idx] = True
    noisy = labels.clone()
    if kind == "symmetric":
        shift = torch.randint(1, num_classes, (idx.numel(),), generator=generator)
    else:
        shift = torch.ones(idx.numel(), dtype=torch.long)
    noisy[idx] = (labels[idx] + shift) % num_classes
    return noisy, corrupted


def stratified_split(labels: Tensor, fraction: float, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Indices ``(rest, held_out)`` with ``fraction`` of every class held out."""
    held, rest = [], []
    for c in torch.unique(labels).tolist():
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        k = int(round(fraction * idx.numel()))
        held.append(idx[:k])
        rest.append(idx[k:])
    return torch.cat(rest).sort().values, torch.cat(held).sort().values


def build_task(
    name: str,
    x_train: Tensor,
    y_train: Tensor,
    x_test: Tensor,
    y_test: Tensor,
    num_classes: int,
    students: dict[str, Callable[[], nn.Module]],
    teacher_specs: list[TeacherSpec],
    noise: float = 0.0,
    noise_type: str = "symmetric",
    val_fraction: float = 0.1,
    data_seed: int = 0,
    default_student: str = "mlp",
) -> Task:
    """Split off clean validation (stratified, halved into meta/select), then add noise to train."""
    if not 0.0 < val_fraction < 1.0:
        raise ConfigError(f"--val-fraction must be in (0, 1), got {val_fraction}")
    check_labels(y_train, num_classes, "training labels")
    check_labels(y_test, num_classes, "test labels")
    g = torch.Generator().manual_seed(1_000_003 * data_seed + 17)
    rest, val = stratified_split(y_train, val_fraction, g)
    if val.numel() < 2:
        raise InputError(f"validation split is empty: {val.numel()} unit(s) from val_fraction={val_fraction}")
    meta_idx, select_idx = stratified_split(y_train[val], 0.5, g)
    val_meta, val_select = val[meta_idx], val[select_idx]
    clean = y_train[rest]
    noisy, corrupted = inject_noise(clean, num_classes, noise, noise_type, g)
    return Task(
        name=name,
        num_classes=num_classes,
        train=Split(x_train[rest], noisy),
        meta=Split(x_train[val_meta], y_train[val_meta]),
        select=Split(x_train[val_select], y_train[val_select]),
        test=Split(x_test, y_test),
        corrupted=corrupted,
        clean_train_labels=clean,
        students=students,
        teacher_specs=teacher_specs,
        default_student=default_student,
        info={"noise": noise, "noise_type": noise_type, "data_seed": data_seed, "val_fraction": val_fraction},
    )
