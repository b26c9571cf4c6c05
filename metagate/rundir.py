"""A directory metagate writes: marked as its own, locked while in use, replaced only after success.

Two kinds share the rules: a run directory (``kind="run"``, ``--logdir``, marker :data:`MARKER`) and a compare
output (``kind="compare"``, ``metagate compare --out``, marker :data:`COMPARE_MARKER`). Only a directory marked
with its own kind's marker (or a new or empty one) is ever used or replaced, so ``--overwrite`` cannot delete a
directory that is not metagate's, and a compare output is not taken for a run or the other way round. The
process using it holds an exclusive ``flock`` on the marker: a second one into the same directory fails with a
clear error naming the holder's pid instead of mixing files. ``--overwrite`` writes into a hidden sibling and
swaps it in only when the job finished; a failed or killed job leaves the old directory as it was.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from types import TracebackType
from typing import IO

from metagate.errors import ConfigError
from metagate.io import check_dir_path, clean_stale_tmp, ensure_dir, storage_error

MARKER = ".metagate-run"
COMPARE_MARKER = ".metagate-compare"
#: the marker file of each kind of directory, and what the kind is called in messages
MARKERS = {"run": MARKER, "compare": COMPARE_MARKER}
NOUNS = {"run": "metagate run directory", "compare": "metagate compare output"}
#: how to adopt a directory of the kind written before its marker existed
ADOPT = {"compare": " (a compare output of a metagate older than the marker is adopted by creating the empty file "
                    "{marker})"}


def _marker(kind: str) -> str:
    try:
        return MARKERS[kind]
    except KeyError:
        raise ValueError(f"unknown directory kind {kind!r}; one of {', '.join(MARKERS)}") from None


def is_run_dir(path: str | os.PathLike, kind: str = "run") -> bool:
    """``path`` is a directory of ``kind`` written by metagate (it holds that kind's marker)."""
    return (Path(path) / _marker(kind)).is_file()


def mark_run_dir(path: str | os.PathLike, kind: str = "run") -> Path:
    """Create ``path`` (if needed) as a metagate directory of ``kind``: a caller that writes its own files into a
    run directory before the run (``metagate compare``'s cell record) marks it first."""
    p = Path(path)
    ensure_dir(p, "--logdir")
    marker = p / _marker(kind)
    if not marker.exists():
        marker.write_text(json.dumps({f"metagate_{kind}": 1}))
    return p


def _is_empty_dir(path: Path) -> bool:
    return path.is_dir() and not any(path.iterdir())


def _try_lock(marker: Path) -> IO[str] | None:
    """Open and lock ``marker`` without blocking; ``None`` when another process holds it."""
    try:
        f = open(marker, "a+")  # noqa: SIM115 - held open for the lock's lifetime
    except OSError as e:
        raise storage_error(marker, e, "cannot create run marker") from e
    try:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        return None
    return f


def _holder(marker: Path) -> str:
    try:
        return f" (pid {json.loads(marker.read_text()).get('pid')})"
    except (OSError, ValueError, AttributeError):
        return ""


class RunDir:
    """Context manager that validates, marks and locks a run directory (or a compare output: ``kind``).

    ``work`` is where the run writes: the directory itself, or with ``overwrite`` of an existing run
    a sibling that :meth:`commit` swaps in. Leaving the block without :meth:`commit` discards the
    sibling (the old run stays).

    :param path: the run directory (``--logdir``)
    :param overwrite: replace an existing run (only a marked one)
    :param resume: continue it (an unmarked directory with a ``checkpoint.pt`` of an older metagate is adopted)
    :param kind: ``run`` or ``compare`` (its marker file, :data:`MARKERS`)
    """

    def __init__(self, path: str | os.PathLike, overwrite: bool = False, resume: bool = False,
                 option: str = "--logdir", kind: str = "run") -> None:
        self.path, self.overwrite, self.resume, self.option = Path(path), overwrite, resume, option
        self.kind, self.marker = kind, _marker(kind)
        self.work = self.path
        self._locks: list[IO[str]] = []
        self._committed = False

    def __enter__(self) -> RunDir:
        path = check_dir_path(self.path, self.option)
        existing = path.is_dir() and not _is_empty_dir(path)
        if existing and not is_run_dir(path, self.kind):
            if not (self.kind == "run" and self.resume and (path / "checkpoint.pt").is_file()):
                raise ConfigError(
                    f"{self.option} {path} exists and is not a {NOUNS[self.kind]} (it has no {self.marker} "
                    f"marker): refusing to write into{' or delete' if self.overwrite else ''} it; choose a new "
                    f"or empty directory{ADOPT.get(self.kind, '').format(marker=path / self.marker)}")
        try:
            if existing:
                self._lock(path)
            if existing and self.overwrite:
                self._clean_siblings()
                self.work = path.parent / f".{path.name}.new-{os.getpid()}"
                if self.work.exists():
                    shutil.rmtree(self.work)
            ensure_dir(self.work, self.option)
            if self.work != path or not existing:
                self._lock(self.work)
            clean_stale_tmp(self.work)
        except BaseException:
            self._release()
            raise
        return self

    def _lock(self, directory: Path) -> None:
        marker = directory / self.marker
        f = _try_lock(marker)
        if f is None:
            what = "run" if self.kind == "run" else self.kind
            raise ConfigError(f"{self.option} {self.path} is in use by another metagate {what}{_holder(marker)}; "
                              f"wait for it to finish or choose another {self.option}")
        try:
            f.seek(0)
            f.truncate()
            f.write(json.dumps({f"metagate_{self.kind}": 1, "pid": os.getpid()}))
            f.flush()
        except OSError as e:
            f.close()
            raise storage_error(marker, e) from e
        self._locks.append(f)

    def _clean_siblings(self) -> None:
        """Remove the hidden siblings of overwrites that were killed (their markers are no longer locked)."""
        for p in self.path.parent.glob(f".{self.path.name}.*-*"):
            if p.is_dir() and is_run_dir(p, self.kind):
                f = _try_lock(p / self.marker)
                if f is not None:
                    f.close()
                    shutil.rmtree(p, ignore_errors=True)

    def commit(self) -> None:
        """Make ``work`` the run directory (after an overwrite: swap it in, then delete the old run)."""
        if self.work == self.path:
            self._committed = True
            return
        old = self.path.parent / f".{self.path.name}.old-{os.getpid()}"
        try:
            os.rename(self.path, old)
            os.rename(self.work, self.path)
        except OSError as e:
            if old.exists() and not self.path.exists():
                os.rename(old, self.path)
            raise storage_error(self.path, e, f"cannot replace the old {self.kind} in") from e
        self.work = self.path
        self._committed = True
        shutil.rmtree(old, ignore_errors=True)

    def _release(self) -> None:
        for f in self._locks:
            f.close()
        self._locks.clear()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if not self._committed and self.work != self.path:
            shutil.rmtree(self.work, ignore_errors=True)
        self._release()
