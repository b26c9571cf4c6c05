"""Name -> gate class registry (configs are data; names pick classes)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

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


def option_owners() -> dict[str, list[str]]:
    """Gate option name -> the gates that take it."""
    owners: dict[str, list[str]] = {}
    for name, cls in sorted(GATES.items()):
        for opt in cls.config_class.option_names():
            owners.setdefault(opt, []).append(name)
    return owners


def gate_config(name: str, options: dict[str, Any] | None = None) -> Any:
    """The typed config of gate ``name`` from ``options``; an option of another gate, or of none, is a
    :class:`ConfigError` that names it and the gates that take it."""
    cls = get_gate_class(name).config_class
    opts = {k.replace("-", "_"): v for k, v in (options or {}).items()}
    foreign = sorted(set(opts) - cls.option_names())
    if foreign:
        owners = option_owners()
        parts = [f"{k!r} (an option of {', '.join(owners[k])})" if k in owners else f"{k!r} (no gate takes it)"
                 for k in foreign]
        raise ConfigError(f"gate {name!r} does not take option(s) {', '.join(parts)}; it takes: "
                          f"{', '.join(sorted(cls.option_names())) or 'no options'}")
    return cls.from_options(opts, what=f"gate {name!r}")
