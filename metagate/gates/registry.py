"""Name -> gate class registry (configs are data; names pick classes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from metagate.errors import ConfigError

T = TypeVar("T")
GATES: dict[str, type] = {}


def register(name: str) -> Callable[[T], T]:
    """Class decorator: make a gate available as ``--gate NAME``."""

    def deco(cls: T) -> T:
        if name in GATES and GATES[name] is not cls:
            raise ConfigError(f"gate {name!r} registered twice")
        GATES[name] = cls  # type: ignore[assignment]
        cls.name = name  # type: ignore[attr-defined]
        return cls

    return deco


def get_gate_class(name: str) -> type:
    try:
        return GATES[name]
    except KeyError:
        raise ConfigError(f"unknown gate {name!r}; choose from {', '.join(sorted(GATES))}") from None
