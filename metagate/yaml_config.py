"""``--config run.yaml``: options as data (``yaml.safe_load``), never code, with bounded alias expansion."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from metagate.errors import ConfigError

#: nodes a document may expand to through its aliases (a "billion laughs" document expands to ~10^9)
MAX_NODES = 10_000
MAX_BYTES = 1 << 20


def _count_nodes(node: yaml.Node, path: str, budget: list[int]) -> None:
    budget[0] -= 1
    if budget[0] < 0:
        raise ConfigError(f"config {path} expands to more than {MAX_NODES} values (nested aliases?); refused")
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            _count_nodes(child, path, budget)
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            _count_nodes(key, path, budget)
            _count_nodes(value, path, budget)


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping of a YAML config file; keys with ``-`` are read as ``_``.

    :raises ConfigError: unreadable, not YAML, not a mapping, too large, or an alias bomb
    """
    p = Path(path)
    try:
        if p.stat().st_size > MAX_BYTES:
            raise ConfigError(f"config {path} is larger than {MAX_BYTES} bytes; refused")
        text = p.read_text()
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        if node is not None:
            _count_nodes(node, str(path), [MAX_NODES])
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read config {path}: {e}") from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config {path} must be a mapping of option -> value, got {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ConfigError(f"config {path}: option names must be strings, got {bad[0]!r}")
    out: dict[str, Any] = {}
    for k, v in data.items():
        if k in ("gate_options", "train") and isinstance(v, dict):
            v = {str(a).replace("-", "_"): b for a, b in v.items()}
        out[k.replace("-", "_")] = v
    return out
