"""Atomic writes, directory checks, file locks and safe checkpoint loading (``weights_only=True``)."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import os
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

import torch
from torch import nn

from metagate.errors import CheckpointError, StorageError


def storage_error(path: str | os.PathLike, e: OSError, what: str = "cannot write") -> StorageError:
    """An :class:`OSError` as a :class:`StorageError` that names ``path`` and says what went wrong."""
    reasons = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
               errno.EPERM: "permission denied", errno.ENOTDIR: "a parent is a file, not a directory",
               errno.EISDIR: "it is a directory", errno.EEXIST: "it exists and is not a directory"}
    reason = reasons.get(e.errno or -1, e.strerror or str(e))
    return StorageError(e.errno or 0, f"{what} {path}: {reason}")


def check_dir_path(path: str | os.PathLike, option: str) -> Path:
    """Raise :class:`StorageError` naming ``option`` when ``path`` is a file or lies under one."""
    path = Path(path)
    for p in (path, *path.parents):  # the nearest existing ancestor decides
        if p.exists() or p.is_symlink():
            if not p.is_dir():
                where = "is a file" if p == path else f"lies under {p}, which is a file"
                raise StorageError(errno.ENOTDIR, f"{option} {path} {where}, not a directory")
            break
    return path


def ensure_dir(path: str | os.PathLike, option: str) -> Path:
    """Create directory ``path`` (and parents); a clear :class:`StorageError` naming ``option`` when it is a
    file, lies under a file, or cannot be created or written."""
    path = check_dir_path(path, option)
    existing = next((p for p in (path, *path.parents) if p.is_dir()), None)
    if existing is not None and not os.access(existing, os.W_OK | os.X_OK):
        where = "" if existing == path else f" ({existing} is read-only)"
        raise StorageError(errno.EACCES, f"{option} {path} is not writable{where}")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise storage_error(path, e, f"{option}: cannot create") from e
    return path


def _atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], None]) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise storage_error(path, e) from e
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the mode a plain open() would
        os.replace(tmp, path)
    except OSError as e:
        _unlink_quietly(tmp)
        raise storage_error(path, e) from e
    except BaseException:
        _unlink_quietly(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _unlink_quietly(path: str | os.PathLike) -> None:
    with contextlib.suppress(OSError):
        os.unlink(path)


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """``torch.save`` to a temporary file in the same directory, then ``os.replace``.

    A crash mid-write leaves the previous file intact (and a ``.<name>.*.tmp`` that
    :func:`clean_stale_tmp` removes); a failed write raises :class:`StorageError` naming the path.
    """
    _atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write a binary file atomically (temporary file + ``os.replace``; a crash leaves any previous file)."""
    _atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file atomically (temporary file + ``os.replace``)."""
    _atomic_write(path, lambda f: f.write(text.encode()))


def clean_stale_tmp(directory: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of interrupted atomic writes (call while holding the directory's lock)."""
    removed = []
    for p in Path(directory).glob(".*.tmp"):
        if p.is_file():
            _unlink_quietly(p)
            removed.append(p)
    return removed


@contextlib.contextmanager
def file_lock(path: str | os.PathLike, blocking: bool = True) -> Iterator[IO[str] | None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing; never deleted, so every process locks the
    same inode). Non-blocking: yields ``None`` when another process holds it."""
    path = Path(path)
    try:
        f = open(path, "a+")  # noqa: SIM115 - the lock lives as long as the file stays open
    except OSError as e:
        raise storage_error(path, e, "cannot create lock file") from e
    try:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        except BlockingIOError:
            yield None
            return
        yield f
    finally:
        f.close()  # closing releases the lock


def safe_load(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """Load with ``weights_only=True``; corrupt or foreign files raise :class:`CheckpointError`."""
    path = Path(path)
    why = not_a_regular_file(path)  # a FIFO would block torch.load, a device never end
    if why is not None:
        raise CheckpointError(f"{what} {path} {why}")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any unpickling failure means corrupt/unsafe
        raise CheckpointError(f"{what} {path} is corrupt or not a metagate file ({type(e).__name__}: {e})"
                              ) from e


def not_a_regular_file(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be read as a file, told without opening it (a FIFO blocks its reader, a device such as
    ``/dev/zero`` never ends): ``"does not exist"``, ``"is a directory"``, ``"is a FIFO (named pipe)"``, ``"is a
    symlink to /dev/zero, a character device"`` ...; ``None`` for a regular file (also through symlinks)."""
    try:
        mode = os.stat(path).st_mode  # follows symlinks; never opens the file
    except FileNotFoundError:
        return f"is a symlink to {os.readlink(path)}, which does not exist" if os.path.islink(path) \
            else "does not exist"
    except OSError as e:
        return f"cannot be read ({e.strerror or e})"
    if stat.S_ISREG(mode):
        return None
    kind = ("a directory" if stat.S_ISDIR(mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(mode)
            else "a character device" if stat.S_ISCHR(mode) else "a block device" if stat.S_ISBLK(mode)
            else "a socket" if stat.S_ISSOCK(mode) else "not a regular file")
    return f"is a symlink to {os.path.realpath(path)}, {kind}" if os.path.islink(path) else f"is {kind}"


def tensor_checksum(t: torch.Tensor) -> str:
    """SHA-256 (first 16 hex) of a tensor's dtype, shape and bytes."""
    h = hashlib.sha256()
    h.update(f"{t.dtype}{tuple(t.shape)}".encode())
    h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def state_fingerprint(module: nn.Module) -> str:
    """SHA-256 (first 16 hex) of a module's state dict: names, shapes and values."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(str(tuple(v.shape)).encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]
