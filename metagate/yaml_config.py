"""``--config run.yaml``: options as data (``yaml.safe_load``), never code, with bounded alias expansion."""

from __future__ import annotations

import os
import stat
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


def _kind(mode: int) -> str:
    for test, what in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def read_yaml(path: str | Path) -> dict[str, Any]:
    """The mapping of a YAML config file; keys with ``-`` are read as ``_``.

    Only a regular file is read (a FIFO, a device such as ``/dev/zero`` or a directory is refused without
    opening it for reading), and no more than :data:`MAX_BYTES` bytes of it. Relative paths *in* the file
    (``logdir``, ``cache_dir``, ``teacher_file``, ...) are resolved against the current directory, as the
    same flags on the command line are, not against the file's directory.

    :raises ConfigError: not a regular file, unreadable, not YAML, not a mapping, too large, or an alias bomb
    """
    p = Path(path)
    try:
        st = p.stat()  # follows a symlink: a link to /dev/zero is a device
        if not stat.S_ISREG(st.st_mode):
            raise ConfigError(f"config {path} is {_kind(st.st_mode)}, not a regular file; refused")
        if st.st_size > MAX_BYTES:
            raise ConfigError(f"config {path} is larger than {MAX_BYTES} bytes; refused")
        # O_NONBLOCK: should the path be swapped for a FIFO after the check, opening it does not wait for a writer
        fd = os.open(p, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                raise ConfigError(f"config {path} is not a regular file; refused")
            raw = f.read(MAX_BYTES + 1)  # the cap holds even if the file grew after the check
        if len(raw) > MAX_BYTES:
            raise ConfigError(f"config {path} is larger than {MAX_BYTES} bytes; refused")
        text = raw.decode("utf-8")
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
        if k in ("gate_options", "task_options", "train") and isinstance(v, dict):
            v = {str(a).replace("-", "_"): b for a, b in v.items()}
        out[k.replace("-", "_")] = v
    return out
