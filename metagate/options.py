"""Options as typed dataclass fields, written once (TRL-style configs).

Every option of a gate, of the student's training and of a run is one dataclass field declared with
:func:`option`: its default, its help text and (optionally) its choices. From these fields come the
command-line flags (``--name-with-dashes``, see :func:`add_options`), the YAML keys and the Python API
(the field names), and the run's HPARAMS (:func:`option_values`). Each config validates the *type* of
every value from its annotation when it is built (:meth:`Options.__post_init__`); subclasses add range
checks. "Was this option set?" is ``None``: command-line flags default to ``None`` and only set values
override a config file or a dataclass default.
"""

from __future__ import annotations

import argparse
import math
import os
import types
import typing
from dataclasses import MISSING, Field, dataclass, field, fields
from typing import Any

from metagate.errors import ConfigError


def option(default: Any, help: str, *, choices: tuple[str, ...] | list[str] | None = None,
           finite: bool = True, shown: str | None = None, metavar: str | None = None) -> Any:
    """A dataclass field that is also a command-line flag, a YAML key and an HPARAMS entry.

    :param default: the value when unset (``None`` for "unset: decided by the gate", say so in ``help``)
    :param help: one line; the default is appended once by the command line
    :param choices: the allowed values of a string option
    :param finite: refuse NaN and infinities for a float option
    :param shown: the default as ``--help`` shows it, when the field is ``None`` ("unset") but resolves to a
        value most of the time (say in ``help`` who resolves it otherwise)
    :param metavar: the flag's value name in ``--help``
    """
    return field(default=default, metadata={"help": help, "choices": tuple(choices) if choices else None,
                                            "finite": finite, "shown": shown, "metavar": metavar})


def same_as(cls: type, name: str, default: Any = MISSING) -> Any:
    """The option ``name`` of config class ``cls`` declared again in another config (its help and choices
    are written once, in ``cls``); ``default`` replaces ``cls``'s default (and drops its ``shown`` text)."""
    src = {f.name: f for f in fields(cls)}.get(name)
    if src is None or src.metadata.get("help") is None:
        raise TypeError(f"{cls.__name__} has no option {name!r}")
    meta = dict(src.metadata)
    if default is MISSING:
        default = src.default
    else:
        meta["shown"] = None
    return field(default=default, metadata=meta)


def flag(name: str) -> str:
    """``meta_lr`` -> ``--meta-lr``."""
    return "--" + name.replace("_", "-")


def _allowed(annotation: Any) -> tuple[set[type], bool]:
    """The value types an annotation admits, and whether it admits ``None``."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        return {a for a in args if a is not type(None)}, type(None) in args
    return {annotation if origin is None else origin}, annotation is type(None)


def check_value(owner: str, name: str, value: Any, annotation: Any, meta: dict[str, Any] | None = None) -> Any:
    """``value`` checked (and widened: int -> float) against ``annotation``; :class:`ConfigError` naming
    ``name`` (as its flag) and the value otherwise."""
    allowed, nullable = _allowed(annotation)
    where = f"{flag(name)} ({owner})"
    if value is None:
        if nullable:
            return None
        raise ConfigError(f"{where} must be set, got None")
    meta = meta or {}
    if bool in allowed:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where} must be true or false, got {value!r}")
    if float in allowed and str in allowed and isinstance(value, str):  # a number or one of the named choices
        choices = meta.get("choices") or ()
        if value in choices:
            return value
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{where} must be a number or one of {', '.join(choices)}, got {value!r}") from None
    if int in allowed and float not in allowed:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        if abs(value) > 2**63 - 1:
            raise ConfigError(f"{where} is out of range: {value!r}")
        return int(value)
    if float in allowed:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where} must be a number, got {value!r}")
        value = float(value)
        if meta.get("finite", True) and not math.isfinite(value):
            raise ConfigError(f"{where} must be finite, got {value!r}")
        return value
    if str in allowed:
        if isinstance(value, os.PathLike):
            value = os.fspath(value)
        if not isinstance(value, str):
            raise ConfigError(f"{where} must be a string, got {value!r}")
        choices = meta.get("choices")
        if choices and value not in choices:
            raise ConfigError(f"{where} must be one of {', '.join(choices)}, got {value!r}")
        return value
    if tuple in allowed:  # a repeatable string option (the flag may be given several times)
        if isinstance(value, (str, os.PathLike)):
            value = [value]
        if not isinstance(value, (list, tuple)) or not all(isinstance(v, (str, os.PathLike)) for v in value):
            raise ConfigError(f"{where} must be a list of strings, got {value!r}")
        return tuple(os.fspath(v) for v in value)
    if dict in allowed:
        if not isinstance(value, dict):
            raise ConfigError(f"{where} must be a mapping, got {value!r}")
        return value
    return value  # nested configs and other objects are checked by their own __post_init__


@dataclass
class Options:
    """Base of every config dataclass: type checks from the annotations at construction."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        owner = type(self).__name__
        for f in fields(self):
            if f.metadata.get("help") is None:  # not an option (e.g. a nested config)
                continue
            setattr(self, f.name, check_value(owner, f.name, getattr(self, f.name), hints[f.name], dict(f.metadata)))

    @classmethod
    def option_fields(cls) -> list[Field]:
        """The fields declared with :func:`option`, in declaration order."""
        return [f for f in fields(cls) if f.metadata.get("help") is not None]

    @classmethod
    def option_names(cls) -> set[str]:
        return {f.name for f in cls.option_fields()}

    @classmethod
    def text_option_names(cls) -> set[str]:
        """Options whose value is text only (a spec's ``alpha_grid=0.5`` is the text ``"0.5"``, not a number)."""
        hints = typing.get_type_hints(cls)
        return {f.name for f in cls.option_fields() if _allowed(hints[f.name])[0] == {str}}

    @classmethod
    def from_options(cls, options: dict[str, Any] | None = None, *, what: str | None = None) -> Options:
        """Build from a mapping of option names (``-`` or ``_``); unknown names are a :class:`ConfigError`."""
        opts = {k.replace("-", "_"): v for k, v in (options or {}).items()}
        unknown = sorted(set(opts) - cls.option_names())
        if unknown:
            raise ConfigError(f"unknown option(s) {', '.join(unknown)} for {what or cls.__name__}; it takes: "
                              f"{', '.join(sorted(cls.option_names())) or 'no options'}")
        return cls(**opts)


def option_values(config: Options, prefix: str = "") -> dict[str, Any]:
    """``{prefix + name: value}`` of every option (the run's HPARAMS)."""
    return {prefix + f.name: getattr(config, f.name) for f in config.option_fields()}


def default_text(f: Field) -> str:
    if f.metadata.get("shown") is not None:
        return str(f.metadata["shown"])
    d = f.default if f.default is not MISSING else None
    if isinstance(d, bool):
        return "on" if d else "off"
    if isinstance(d, tuple):
        return "none" if not d else ", ".join(d)
    return "unset" if d is None else repr(d) if isinstance(d, str) else f"{d:g}" if isinstance(d, float) else str(d)


def add_options(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type[Options],
                skip: set[str] | None = None, only: set[str] | None = None, done: set[str] | None = None) -> None:
    """One flag per option field of ``cls``; every flag defaults to ``None`` ("not set"), its help shows the
    dataclass default once.

    :param skip: field names to leave out; :param only: the field names to add (default all)
    :param done: names already added by another group (shared fields are added once); updated
    """
    hints = typing.get_type_hints(cls)
    for f in cls.option_fields():
        if (skip and f.name in skip) or (only is not None and f.name not in only) or (done is not None and
                                                                                     f.name in done):
            continue
        allowed, _ = _allowed(hints[f.name])
        helptext = f"{f.metadata['help']} (default: {default_text(f)})"
        if bool in allowed:
            parser.add_argument(flag(f.name), action="store_const", const=True, default=None, help=helptext)
        elif tuple in allowed:
            parser.add_argument(flag(f.name), action="append", default=None, help=helptext + "; repeatable",
                                metavar=f.metadata.get("metavar") or f.name.upper().split("_")[-1])
        else:
            if float in allowed and str in allowed:  # a number or a named choice: checked by check_value
                parser.add_argument(flag(f.name), type=str, default=None, help=helptext,
                                    metavar="{" + ",".join(f.metadata.get("choices") or ()) + ",NUMBER}")
            else:
                typ = int if int in allowed and float not in allowed else float if float in allowed else str
                parser.add_argument(flag(f.name), type=_parse(typ, f.name), default=None, help=helptext,
                                    choices=f.metadata.get("choices"), metavar=None if f.metadata.get("choices")
                                    else f.name.upper().split("_")[-1])
        if done is not None:
            done.add(f.name)


def _parse(typ: type, name: str) -> Any:
    """An argparse ``type=`` that names the flag in its error (argparse prints ``invalid value``)."""

    def parse(text: str) -> Any:
        try:
            return typ(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{flag(name)} expects {typ.__name__}, got {text!r}") from None

    parse.__name__ = typ.__name__
    return parse


def set_options(namespace: argparse.Namespace, cls: type[Options]) -> dict[str, Any]:
    """The options of ``cls`` that were given on the command line (not ``None``)."""
    return {n: getattr(namespace, n) for n in cls.option_names()
            if getattr(namespace, n, None) is not None}
