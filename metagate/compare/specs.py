"""Gate specs of a compare: ``name`` or ``name:option=value,...``, each labelled by its own text.

Two specs of one gate (``meta:meta_param=net meta:meta_param=table``) are two rows of every output.
Every spec is checked -- gate known, each option one of *that* gate's options, the gate buildable with
them -- before anything runs, so a typo fails in a second instead of after an hour of other cells.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from metagate.bench import parse_gate_spec
from metagate.errors import ConfigError
from metagate.gates import get_gate_class

#: gates that learn nothing about the units (the rules a learned gate must beat); a gate class may
#: also declare ``baseline = True`` itself
RULE_GATES = frozenset({"ce", "fixed", "hard"})


@dataclass(frozen=True)
class GateSpec:
    """One row of a compare.

    :param label: the spec as written (whitespace removed): the row's name in every output
    :param gate: the registered gate name
    :param options: gate options given in the spec (they override the compare's own flags)
    """

    label: str
    gate: str
    options: dict[str, Any] = field(default_factory=dict, hash=False)

    @property
    def is_baseline(self) -> bool:
        return is_baseline(self.gate)

    @property
    def slug(self) -> str:
        """A file-system-safe form of the label (run directories)."""
        return "".join(c if c.isalnum() or c in "-_.=" else "_" for c in self.label.replace(":", "__"))


def is_baseline(gate: str) -> bool:
    """Whether ``gate`` is a non-learned rule (``fixed``, ``hard``, the tuned and rule baselines)."""
    return gate in RULE_GATES or bool(getattr(get_gate_class(gate), "baseline", False))


def refuse_repeated_options(text: str, label: str) -> None:
    """``fixed:alpha=0.3,alpha=0.5`` would run with the last value under a label naming both: refuse it.

    :raises ConfigError: naming the spec and the option given twice
    """
    _, _, rest = label.partition(":")
    seen: set[str] = set()
    for item in filter(None, rest.split(",")):
        key = item.partition("=")[0].replace("-", "_")
        if key in seen:
            raise ConfigError(f"--gates {text!r}: option {key!r} is given twice; give each option once")
        seen.add(key)


def parse_specs(texts: list[str], base_options: dict[str, Any] | None = None) -> list[GateSpec]:
    """Parse and check every ``--gates`` entry (see :func:`metagate.bench.parse_gate_spec`).

    :param base_options: the compare's own gate flags (``--alpha 0.1``), under every spec's options

    :raises ConfigError: an unknown gate, an option the gate does not have, a bad value, or a label twice
    """
    from metagate.run import build_gate

    specs: list[GateSpec] = []
    for text in texts:
        label = "".join(text.split())
        refuse_repeated_options(text, label)
        name, opts = parse_gate_spec(label)
        try:
            takes = get_gate_class(name).config_class.option_names()
            shared = {k: v for k, v in (base_options or {}).items() if k in takes}
            build_gate(name, {**shared, **opts})  # option names, types, ranges, files: before anything runs
        except ConfigError as e:
            raise ConfigError(f"--gates {text!r}: {e}") from None
        specs.append(GateSpec(label, name, opts))
    seen: set[str] = set()
    for s in specs:
        if s.label in seen:
            raise ConfigError(f"--gates lists {s.label!r} twice")
        seen.add(s.label)
    if not specs:
        raise ConfigError("--gates needs at least one gate")
    return specs
