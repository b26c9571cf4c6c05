"""Synthetic teacher banks: planted teacher quality without training teachers (tests, benchmarks).

Each synthetic teacher is right on a chosen set of classes (or with a chosen probability) and
confidently wrong elsewhere, so the quality of a teacher can vary per instance.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from metagate.data.task import Task
from metagate.errors import ConfigError
from metagate.teachers.bank import TeacherBank


def synthetic_bank(
    task: Task,
    accuracies: Sequence[float] = (0.95, 0.9),
    good_classes: Sequence[Sequence[int] | None] | None = None,
    adversarial: bool = True,
    sharpness: float = 5.0,
    noise_std: float = 1.0,
    seed: int = 0,
) -> TeacherBank:
    """Teacher logits ``[N_train, K, C]`` built from the task's *clean* training labels.

    :param accuracies: per teacher, the probability of pointing at the true class
        (on the teacher's ``good_classes``; elsewhere it points at a random wrong class)
    :param good_classes: per teacher, the classes it knows (``None`` = all)
    :param adversarial: append a planted teacher: teacher 0 with its classes cyclically shifted by one
    :param sharpness: logit margin of the pointed-at class
    :param noise_std: Gaussian logit noise
    """
    if not accuracies:
        raise ConfigError("synthetic_bank needs at least one teacher accuracy")
    g = torch.Generator().manual_seed(seed)
    y = task.clean_train_labels
    n, c = y.shape[0], task.num_classes
    good_classes = list(good_classes) if good_classes is not None else [None] * len(accuracies)
    if len(good_classes) != len(accuracies):
        raise ConfigError("good_classes must have one entry per teacher")
    logits, names = [], []
    for j, (acc, classes) in enumerate(zip(accuracies, good_classes)):
        knows = torch.ones(n, dtype=torch.bool) if classes is None else torch.isin(y, torch.tensor(list(classes)))
        right = (torch.rand(n, generator=g) < acc) & knows
        wrong = (y + torch.randint(1, c, (n,), generator=g)) % c
        target = torch.where(right, y, wrong)
        lg = noise_std * torch.randn(n, c, generator=g)
        lg[torch.arange(n), target] += sharpness
        logits.append(lg)
        names.append(f"synthetic{j}")
    if adversarial:
        perm = (torch.arange(c) - 1) % c
        logits.append(logits[0][:, perm])
        names.append("adv-synthetic0")
    return TeacherBank(torch.stack(logits, 1), names)
