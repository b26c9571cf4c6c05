"""What may stand for a teacher, three ways, mixed freely in one bank (:func:`metagate.teachers.build.build_bank`):

* trained by the project: a :class:`~metagate.data.task.TeacherSpec` (trained through the shared loop,
  checkpoint and logits cached as in :mod:`metagate.teachers.training`),
* a user's pretrained ``nn.Module``: frozen, put in eval mode, its training-split logits cached by the
  cache's fingerprint rules (:mod:`metagate.teachers.cache`: data, unit ids and weights),
* precomputed logits: a file path (:mod:`metagate.teachers.files`), or an ``[N, C]`` tensor / array whose
  row ``i`` is training unit ``i``.

Teachers are *cached* by default: each one's logits are computed once for the fixed training inputs. Inputs
that change every epoch (random augmentation) make such a cache wrong: :func:`online` marks a module teacher
to be run in the step on the step's inputs instead (:mod:`metagate.teachers.online`), and a training dataset that
marks its transform random (``random_transform = True``) is refused with any cached teacher.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
from torch import Tensor, nn

from metagate.data.task import TeacherSpec
from metagate.errors import ConfigError, InputError
from metagate.teachers.files import read_teacher_file


@dataclass
class OnlineTeacher:
    """A module teacher run in the step on the step's inputs (never cached): see :func:`online`."""

    module: nn.Module


def online(module: nn.Module) -> OnlineTeacher:
    """Mark a pretrained module as an *online* teacher: frozen, eval mode, its logits computed in every step on
    that step's inputs (for a dataset whose random transform changes the inputs every epoch)."""
    if not isinstance(module, nn.Module):
        raise ConfigError(f"online() takes an nn.Module teacher, got {type(module).__name__}")
    return OnlineTeacher(module)


#: what may stand for one teacher
TeacherLike = Union[nn.Module, TeacherSpec, str, os.PathLike, Tensor, np.ndarray, OnlineTeacher]
#: the kinds of teacher, for errors
_KINDS = (nn.Module, TeacherSpec, str, os.PathLike, Tensor, np.ndarray, OnlineTeacher)


def freeze(module: nn.Module) -> nn.Module:
    """``module`` in eval mode with every parameter's ``requires_grad`` off (in place)."""
    for p in module.parameters():
        p.requires_grad_(False)
    return module.eval()


def teacher_name(teacher: TeacherLike, index: int) -> str:
    """A default name: the spec's name, the file's stem, the module's class, or ``tensor<i>``."""
    if isinstance(teacher, TeacherSpec):
        return teacher.name
    if isinstance(teacher, (str, os.PathLike)):
        return Path(teacher).stem
    if isinstance(teacher, OnlineTeacher):
        return f"{type(teacher.module).__name__.lower()}{index}"
    if isinstance(teacher, nn.Module):
        return f"{type(teacher).__name__.lower()}{index}"
    return f"tensor{index}"


def named_teachers(teachers: Sequence[TeacherLike] | Mapping[str, TeacherLike],
                   names: Sequence[str] | None = None) -> list[tuple[str, TeacherLike]]:
    """``(name, teacher)`` pairs from a list (default names) or a ``{name: teacher}`` mapping; names are unique
    (each names its cache file)."""
    if isinstance(teachers, Mapping):
        pairs = [(str(k), v) for k, v in teachers.items()]
    else:
        if isinstance(teachers, _KINDS):
            teachers = [teachers]
        teachers = list(teachers)
        if names is not None and len(names) != len(teachers):
            raise ConfigError(f"{len(names)} teacher names for {len(teachers)} teachers")
        pairs = [(names[i] if names else teacher_name(t, i), t) for i, t in enumerate(teachers)]
    seen: set[str] = set()
    for n, t in pairs:
        if n in seen:
            raise ConfigError(f"two teachers are named {n!r}; give teacher names (or a {{name: teacher}} mapping)")
        seen.add(n)
        if not isinstance(t, _KINDS):
            raise ConfigError(f"teacher {n!r} is a {type(t).__name__}; a teacher is an nn.Module, a TeacherSpec, "
                              "a logits file path, an [N, C] tensor or online(module)")
    return pairs


def teacher_classes(teacher: TeacherLike, x: Tensor, device: torch.device | str = "cpu") -> int | None:
    """The class count a teacher outputs (a module: one forward on two inputs), ``None`` when only the run
    can say (a top-k file without ``num_classes``, a spec)."""
    if isinstance(teacher, OnlineTeacher):
        teacher = teacher.module
    if isinstance(teacher, nn.Module):
        freeze(teacher).to(device)
        with torch.no_grad():
            return int(teacher(x[:2].to(device)).shape[-1])
    if isinstance(teacher, (str, os.PathLike)):
        return read_teacher_file(teacher).file_classes
    if isinstance(teacher, (Tensor, np.ndarray)):
        return int(teacher.shape[-1]) if teacher.ndim == 2 else None
    return None


def refuse_cached_with_random(teachers: Sequence[tuple[str, TeacherLike]], what: str = "train") -> None:
    """A training dataset with a random transform takes online teachers only (a cache would be wrong)."""
    cached = [n for n, t in teachers if not isinstance(t, OnlineTeacher)]
    if cached:
        raise InputError(f"{what}: the dataset marks its transform random (random_transform=True), but teacher "
                         f"{cached[0]!r} is cached: its logits are computed once for fixed inputs, and the "
                         "augmentation changes the inputs every epoch, so the cached logits would be wrong. Give "
                         "module teachers as metagate.online(module) (computed in the step), or drop the random "
                         "transform")
