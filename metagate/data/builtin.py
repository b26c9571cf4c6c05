"""Built-in tasks whose data ship with installed packages (no downloads)."""

from __future__ import annotations

import gzip
import os
import struct
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from metagate.data.options import TaskConfig
from metagate.data.plugins import call_builder, entry_point_tasks, load_builder
from metagate.data.task import Task, TeacherSpec, build_task
from metagate.errors import ConfigError, InputError
from metagate.models import CNN, MLP
from metagate.options import flag, option

TASKS: dict[str, Callable[..., Task]] = {}
#: task name -> its options (the built-in tasks and those registered in Python)
TASK_CONFIGS: dict[str, type[TaskConfig]] = {}
#: tasks built in memory from a user's data (``metagate.api.prepare``), by their data-hashed name: a config can
#: name one (the compare engine's cells do), it takes no options, and it is not listed among the tasks to choose
PREPARED: dict[str, Task] = {}


def register_prepared(task: Task) -> None:
    """Make the in-memory ``task`` nameable by configs in this process (idempotent)."""
    PREPARED[task.name] = task


def register_task(name: str, config: type[TaskConfig] = TaskConfig
                  ) -> Callable[[Callable[..., Task]], Callable[..., Task]]:
    """Register a task builder ``f(noise, noise_type, data_seed, val_fraction, **options) -> Task`` that takes
    the options of ``config`` (a :class:`TaskConfig` subclass; the default: no options of its own)."""
    if not (isinstance(config, type) and issubclass(config, TaskConfig)):
        raise ConfigError(f"task {name!r}: config must be a TaskConfig subclass, got {config!r}")

    def deco(fn: Callable[..., Task]) -> Callable[..., Task]:
        TASKS[name] = fn
        TASK_CONFIGS[name] = config
        return fn

    return deco


def _unknown(name: str) -> ConfigError:
    return ConfigError(f"unknown task {name!r}; choose from {', '.join(task_names())}, or name a builder as "
                       "package.module:function")


def task_config_class(name: str) -> type[TaskConfig]:
    """The options of task ``name``: its registered config, or a plugin builder's ``config_class``
    (:class:`DataDirConfig`, ``data_dir`` only, when it declares none)."""
    if name in TASK_CONFIGS:
        return TASK_CONFIGS[name]
    if name in PREPARED:
        return TaskConfig
    builder = load_builder(name)
    if builder is None:
        raise _unknown(name)
    cls = getattr(builder, "config_class", DataDirConfig)  # undeclared: --data-dir, as plugins always got
    if not (isinstance(cls, type) and issubclass(cls, TaskConfig)):
        raise ConfigError(f"task {name!r}: its builder's config_class must be a metagate.data.TaskConfig "
                          f"subclass, got {cls!r}")
    return cls


def task_config_classes() -> dict[str, type[TaskConfig]]:
    """Task name -> config class, for the built-in tasks and the installed plugins that load (a plugin that
    fails to load is reported when it is chosen, not here)."""
    out = dict(TASK_CONFIGS)
    for name in sorted(set(entry_point_tasks()) - set(out)):
        try:
            out[name] = task_config_class(name)
        except ConfigError:
            continue
    return out


def task_option_owners() -> dict[str, list[str]]:
    """Task option name -> the tasks that take it."""
    owners: dict[str, list[str]] = {}
    for name, cls in sorted(task_config_classes().items()):
        for opt in cls.option_names():
            owners.setdefault(opt, []).append(name)
    return owners


def task_config(name: str, options: dict[str, Any] | None = None) -> TaskConfig:
    """The typed options of task ``name``; an option of another task, or of none, is a :class:`ConfigError`
    naming it and the tasks that take it."""
    cls = task_config_class(name)
    opts = {k.replace("-", "_"): v for k, v in (options or {}).items()}
    foreign = sorted(set(opts) - cls.option_names())
    if foreign:
        owners = task_option_owners()
        parts = [f"{flag(k)} (an option of task {', '.join(owners[k])})" if k in owners else
                 f"{flag(k)} (no task takes it)" for k in foreign]
        raise ConfigError(f"task {name!r} does not take option(s) {', '.join(parts)}; it takes: "
                          f"{', '.join(flag(n) for n in sorted(cls.option_names())) or 'no options of its own'}")
    return cls.from_options(opts, what=f"task {name!r}")  # type: ignore[return-value]


def task_names() -> list[str]:
    """Built-in tasks, then those installed through the ``metagate.tasks`` entry points."""
    return sorted(TASKS) + sorted(set(entry_point_tasks()) - set(TASKS))


def get_task(name: str, **kwargs: object) -> Task:
    """Build a task: registered by name, installed as an entry point, or named ``package.module:builder``
    (:mod:`metagate.data.plugins`)."""
    if name in PREPARED and name not in TASKS:
        return PREPARED[name]
    builder = TASKS.get(name) or load_builder(name)
    if builder is None:
        raise _unknown(name)
    task = call_builder(builder, **kwargs)
    if not isinstance(task, Task):
        raise ConfigError(f"task builder {name!r} returned a {type(task).__name__}, not a metagate Task")
    return task


TEACHER_WIDTHS = (16, 24, 32, 20, 28)


def image_models(size: int, num_classes: int, mlp_hidden: int, teacher_epochs: int, teacher_lr: float,
                 teacher_batch: int) -> tuple[dict[str, Callable[[], nn.Module]], list[TeacherSpec]]:
    """Students (``mlp``, ``mlp-bn``, ``cnn``) and CNN teachers of growing width for square 1-channel images.

    Teachers are CNNs (stronger than the default MLP student); students are small on purpose.
    """
    c = num_classes
    students: dict[str, Callable[[], nn.Module]] = {
        "mlp": partial(MLP, size * size, (mlp_hidden,), c),
        "mlp-bn": partial(MLP, size * size, (mlp_hidden,), c, True),
        "cnn": partial(CNN, 1, size, 8, c, 64),
    }
    teachers = [TeacherSpec(f"cnn{w}", partial(CNN, 1, size, w, c, 128), epochs=teacher_epochs, lr=teacher_lr,
                            batch_size=teacher_batch) for w in TEACHER_WIDTHS]
    return students, teachers


@dataclass
class DigitsConfig(TaskConfig):
    """digits: no options of its own."""


@register_task("digits", config=DigitsConfig)
def digits_task(
    noise: float = 0.0, noise_type: str = "symmetric", data_seed: int = 0, val_fraction: float = 0.1, **_: object
) -> Task:
    """scikit-learn's bundled 8x8 digits (1,797 images); 25% stratified test split."""
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = (x - 0.3) / 0.4
    y = torch.tensor(d.target, dtype=torch.long)
    from metagate.data.task import stratified_split

    train_idx, test_idx = stratified_split(y, 0.25, torch.Generator().manual_seed(12345))
    c = 10
    students, teachers = image_models(8, c, mlp_hidden=16, teacher_epochs=30, teacher_lr=2e-3, teacher_batch=64)
    return build_task("digits", x[train_idx], y[train_idx], x[test_idx], y[test_idx], c, students, teachers,
                      noise, noise_type, val_fraction, data_seed)


FASHION_DIRS = ("/usr/share/datasets/fashion-mnist",)


#: an idx file's values are read only up to its header's size (a gzip bomb stops there), at most this many
MAX_IDX_VALUES = 1 << 30


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An unsigned-byte idx array of ``ndim`` dimensions from a gzip file, read no further than its header says.

    :raises InputError: not gzip, a short/empty header, another type or dimension count, fewer or more
        values than the header gives
    """
    try:
        with gzip.open(path, "rb") as f:
            head = f.read(4)
            if len(head) < 4:
                raise InputError(f"idx file {path} is empty or truncated ({len(head)} header bytes of 4)")
            zero, dtype, nd = struct.unpack(">HBB", head)
            if zero != 0 or dtype != 0x08:
                raise InputError(f"{path} is not an unsigned-byte idx file")
            if nd != ndim:
                raise InputError(f"idx file {path} has {nd} dimensions, expected {ndim}")
            dims = f.read(4 * nd)
            if len(dims) < 4 * nd:
                raise InputError(f"idx file {path} is truncated inside its header")
            shape = struct.unpack(">" + "I" * nd, dims)
            expected = int(np.prod(shape, dtype=np.int64))
            if expected > MAX_IDX_VALUES:
                raise InputError(f"idx file {path} declares shape {shape} ({expected} values, limit {MAX_IDX_VALUES})")
            data = f.read(expected + 1)  # one more byte tells trailing data apart, and bounds the read
    except (OSError, EOFError, zlib.error) as e:
        raise InputError(f"cannot read idx file {path}: {e}") from e
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "longer than its header (trailing data)"
        raise InputError(f"idx file {path} is {what}: its header gives shape {shape} = {expected} values"
                         + (f", found {len(data)}" if len(data) < expected else ""))
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


def find_fashion_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The directory with Fashion-MNIST's four idx gzip files."""
    names = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
             "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
    candidates = [Path(data_dir)] if data_dir else [Path(p) for p in
                                                    (os.environ.get("METAGATE_FASHION_DIR"), *FASHION_DIRS) if p]
    for d in candidates:
        if all((d / n).is_file() for n in names):
            return d
    raise InputError(
        "Fashion-MNIST not found in " + ", ".join(map(str, candidates)) + ". Either install the Debian package "
        "(`apt-get install dataset-fashion-mnist`) or pass --data-dir DIR with the four idx .gz files "
        f"({', '.join(names)})."
    )


@dataclass
class DataDirConfig(TaskConfig):
    """A task that reads its data from a directory (the options of a plugin builder that declares none)."""

    data_dir: str | None = option(None, "directory with the task's data files (fashion: the idx .gz files; unset: "
                                  f"$METAGATE_FASHION_DIR or {FASHION_DIRS[0]})")


@dataclass
class FashionConfig(DataDirConfig):
    """fashion: where its data files are."""


@register_task("fashion", config=FashionConfig)
def fashion_task(
    noise: float = 0.0,
    noise_type: str = "symmetric",
    data_seed: int = 0,
    val_fraction: float = 0.1,
    data_dir: str | None = None,
    **_: object,
) -> Task:
    """Fashion-MNIST (60k train / 10k test, 28x28) from Debian's package or a user directory."""
    d = find_fashion_dir(data_dir)

    def load(prefix: str) -> tuple[torch.Tensor, torch.Tensor]:
        xp, yp = d / f"{prefix}-images-idx3-ubyte.gz", d / f"{prefix}-labels-idx1-ubyte.gz"
        xi, yi = _read_idx(xp, 3), _read_idx(yp, 1)
        if xi.shape[1:] != (28, 28):
            raise InputError(f"{xp} holds {xi.shape[1]}x{xi.shape[2]} images, Fashion-MNIST's are 28x28")
        if xi.shape[0] != yi.shape[0]:
            raise InputError(f"{xp} holds {xi.shape[0]} images but {yp} holds {yi.shape[0]} labels")
        if yi.size and int(yi.max()) > 9:
            raise InputError(f"{yp} holds label {int(yi.max())}; Fashion-MNIST has classes 0-9")
        x = (torch.from_numpy(xi.astype(np.float32) / 255.0) - 0.2860) / 0.3530
        return x.unsqueeze(1), torch.from_numpy(yi.astype(np.int64))

    xtr, ytr = load("train")
    xte, yte = load("t10k")
    c = 10
    students, teachers = image_models(28, c, mlp_hidden=128, teacher_epochs=8, teacher_lr=1e-3, teacher_batch=128)
    return build_task("fashion", xtr, ytr, xte, yte, c, students, teachers, noise, noise_type, val_fraction,
                      data_seed)
