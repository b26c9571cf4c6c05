"""The command line's option groups, generated from the config dataclasses, and the config they build.

``cli.py``, ``compare.py`` and ``train_policy.py`` import this module (one way: it imports none of them).
Every generated flag defaults to ``None`` ("not set"): a set flag overrides a ``--config`` YAML value, which
overrides the dataclass default.
"""

from __future__ import annotations

import argparse
from typing import Any

from metagate.data import task_config_classes, task_names, task_option_owners
from metagate.data.plugins import GROUP as TASK_GROUP
from metagate.errors import ConfigError
from metagate.gates import GATES, option_owners
from metagate.options import Options, add_options, set_options
from metagate.run import DistillConfig
from metagate.trainer import TrainConfig
from metagate.yaml_config import read_yaml

#: DistillConfig fields that are not data options (the gate and the run directory have flags of their own)
RUN_FIELDS = {"gate", "logdir", "resume", "overwrite"}
#: TrainConfig fields without a flag of their own (``--no-progress`` is the flag of ``progress``)
HIDDEN_TRAIN = {"progress", "eval_test_every_epoch"}


class HelpFormatter(argparse.HelpFormatter):
    """Wider help columns; defaults are written into each help text once (by :func:`add_options`)."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=36)


def add_data_arguments(p: argparse.ArgumentParser) -> None:
    """Task, data, teachers and cache options (:class:`DistillConfig`), then every task's own options
    (:func:`add_task_arguments`)."""
    g = p.add_argument_group("task and data")
    add_options(g, DistillConfig, skip=RUN_FIELDS | {"student"})
    set_help(p, "task", task_help())
    add_options(g, TrainConfig, only={"device"})
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False, default=None,
                   help="hide progress bars")
    add_task_arguments(p)


def add_task_arguments(p: argparse.ArgumentParser) -> None:
    """Every known task's options (built-in and installed plugins), each once, grouped by the config class
    that declares it (a ``package.module:builder`` task's options are YAML keys / ``task_options`` only)."""
    done: set[str] = set()
    owners = task_option_owners()
    seen: dict[type, None] = {}
    for cls in task_config_classes().values():
        seen.setdefault(cls, None)
    for cls in seen:
        own = cls.option_names() - done
        if not own:
            continue
        tasks = sorted({t for n in own for t in owners.get(n, [])})
        title = f"task {', '.join(tasks)}: {(cls.__doc__ or cls.__name__).strip().splitlines()[0]}"
        add_options(p.add_argument_group(title), cls, only=own, done=done)


def task_help() -> str:
    """``--task``'s help, listing the tasks installed when the parser is built."""
    return (f"task: {' | '.join(task_names())} (built-in and installed through the '{TASK_GROUP}' entry points), "
            f"or a builder named as package.module:function (default: {DistillConfig.task!r})")


def set_help(p: argparse.ArgumentParser, dest: str, text: str) -> None:
    """Replace the help text of the option that stores ``dest``."""
    for action in p._actions:
        if action.dest == dest:
            action.help = text


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """Student and optimisation options (:class:`TrainConfig`)."""
    g = p.add_argument_group("student training")
    add_options(g, DistillConfig, only={"student"})
    add_options(g, TrainConfig, skip=HIDDEN_TRAIN | {"device"})


def gate_config_classes() -> list[type[Options]]:
    """Every config class that declares a gate option, each once, in a stable order."""
    seen: dict[type, None] = {}
    for cls in {id(c): c for c in GATES.values()}.values():
        for base in reversed(cls.config_class.__mro__):
            if isinstance(base, type) and issubclass(base, Options) and base.__dict__.get("__annotations__"):
                seen.setdefault(base, None)
    return list(seen)


def add_gate_arguments(p: argparse.ArgumentParser) -> None:
    """Every registered gate's options, each once, grouped by the config class that declares it."""
    done: set[str] = set()
    for cls in gate_config_classes():
        own = set(cls.__dict__.get("__annotations__", {})) - done
        if not own:
            continue
        owners = option_owners()
        gates = sorted({g for n in own for g in owners.get(n, [])})
        title = f"{', '.join(gates)}: {(cls.__doc__ or cls.__name__).strip().splitlines()[0]}"
        add_options(p.add_argument_group(title), cls, only=own, done=done)


def gate_option_names() -> set[str]:
    return set(option_owners())


def task_option_names() -> set[str]:
    return set(task_option_owners())


def config_from_args(args: argparse.Namespace, gate: str | None = None, seed: int | None = None,
                     logdir: str | None = None, strict: bool = True) -> DistillConfig:
    """Build a :class:`DistillConfig` from parsed flags over a ``--config`` YAML file over the defaults.

    :param gate: the gate (default ``--gate``)
    :param strict: an option the gate does not take is an error (``False``: dropped, as a compare of several
        gates shares its options; the caller checks that some gate takes each)
    """
    values: dict[str, Any] = read_yaml(args.config) if getattr(args, "config", None) else {}
    for cls in (DistillConfig, TrainConfig):
        values.update(set_options(args, cls))
    values.update({n: getattr(args, n) for n in gate_option_names() | task_option_names()
                   if getattr(args, n, None) is not None})
    if getattr(args, "progress", None) is not None:
        values["progress"] = args.progress
    gate_name = gate or values.get("gate") or getattr(args, "gate", None) or "fixed"
    values.pop("gate", None)
    return build_config(values, gate_name, seed=seed, logdir=logdir, strict=strict)


def build_config(values: dict[str, Any], gate: str, seed: int | None = None, logdir: str | None = None,
                 strict: bool = True) -> DistillConfig:
    """Sort flat option values into a :class:`DistillConfig`: run fields, ``train`` fields, the task's options
    and gate options (flat, or under ``task_options`` / ``gate_options`` / ``train`` as in a YAML file). Task
    options are those of the built-in and installed tasks, and of a ``package.module:builder`` task named in
    ``values`` (loaded to read its config); a key of none of them is a :class:`ConfigError`."""
    values = dict(values)
    train = dict(_mapping(values.pop("train", None), "train"))
    gate_opts = dict(_mapping(values.pop("gate_options", None), "gate_options"))
    task_opts = dict(_mapping(values.pop("task_options", None), "task_options"))
    run_names, train_names, gate_names = DistillConfig.option_names(), TrainConfig.option_names(), gate_option_names()
    task_names_ = task_option_names() | _plugin_option_names(values.get("task"))
    distill: dict[str, Any] = {}
    for k, v in values.items():
        if k in run_names:
            distill[k] = v
        elif k in train_names:
            train[k] = v
        elif k in task_names_:
            task_opts[k] = v
        elif k in gate_names:
            gate_opts[k] = v
        else:
            raise ConfigError(f"unknown option {k!r}: not an option of the run, the training, a task or any gate")
    if seed is not None:
        train["seed"] = seed
    if logdir is not None:
        distill["logdir"] = logdir
    if not strict:
        from metagate.gates import get_gate_class

        takes = get_gate_class(gate).config_class.option_names()
        gate_opts = {k: v for k, v in gate_opts.items() if k in takes}
    return DistillConfig(gate=gate, gate_options=gate_opts, task_options=task_opts,
                         train=TrainConfig.from_options(train, what="train"), **distill)


def _mapping(value: Any, name: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a mapping of option -> value, got {value!r}")
    return value


def _plugin_option_names(task: Any) -> set[str]:
    """The options of a ``package.module:builder`` task (not among the known tasks until it is loaded)."""
    if not isinstance(task, str) or ":" not in task:
        return set()
    from metagate.data import task_config_class

    return task_config_class(task).option_names()
