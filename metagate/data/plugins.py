"""Tasks as plugins: a builder found through the ``metagate.tasks`` entry-point group, or named as
``package.module:builder``, so the command line finds a user's task without editing the project.

A package declares its task in its ``pyproject.toml``::

    [project.entry-points."metagate.tasks"]
    wine = "mypkg.tasks:wine_task"

A builder is called like the built-in ones, ``builder(noise=..., noise_type=..., data_seed=...,
val_fraction=..., **its options)`` -- only with the keywords its signature takes -- and returns a
:class:`~metagate.data.task.Task` (:func:`metagate.data.task.build_task` makes one from tensors).

Its options are a :class:`~metagate.data.TaskConfig` subclass set as the builder's ``config_class`` attribute
(``wine_task.config_class = WineConfig``): they become YAML keys and ``DistillConfig(task_options=...)`` keys,
and for an installed entry point command-line flags too; a builder that declares none takes ``data_dir``
(``--data-dir``) only, as before options were declared.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Any

from metagate.errors import ConfigError

GROUP = "metagate.tasks"


def entry_point_tasks() -> dict[str, EntryPoint]:
    """Task name -> entry point, for every installed distribution that declares one in :data:`GROUP`."""
    return {ep.name: ep for ep in entry_points(group=GROUP)}


def load_builder(name: str) -> Callable[..., Any] | None:
    """The builder ``package.module:attr`` names, or the entry point ``name``; ``None`` when neither exists.

    :raises ConfigError: the module does not import, has no such attribute, or it is not callable
    """
    if ":" in name:
        module, _, attr = name.partition(":")
        try:
            obj: Any = importlib.import_module(module)
        except ImportError as e:
            raise ConfigError(f"--task {name}: cannot import module {module!r} ({e})") from e
        for part in attr.split("."):
            if not hasattr(obj, part):
                raise ConfigError(f"--task {name}: module {module!r} has no attribute {attr!r}")
            obj = getattr(obj, part)
        where = f"--task {name}"
    else:
        ep = entry_point_tasks().get(name)
        if ep is None:
            return None
        try:
            obj = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin: name it and what went wrong
            raise ConfigError(f"task {name!r} (entry point {ep.value!r} in group {GROUP}) failed to load: "
                              f"{type(e).__name__}: {e}") from e
        where = f"task {name!r} (entry point {ep.value!r})"
    if not callable(obj):
        raise ConfigError(f"{where} is a {type(obj).__name__}, not a task builder")
    return obj


def call_builder(builder: Callable[..., Any], **kwargs: Any) -> Any:
    """``builder(**kwargs)`` with only the keywords it takes (all of them when it takes ``**kwargs``)."""
    params = inspect.signature(builder).parameters.values()
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        names = {p.name for p in params}
        kwargs = {k: v for k, v in kwargs.items() if k in names}
    return builder(**kwargs)
