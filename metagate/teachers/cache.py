"""The teacher cache: the files teachers leave under ``cache_dir/<task key>/``, and the one rule that loads,
checks and writes them.

Layout::

    teacher-<name>.pt         {"state", "task_fingerprint", "select_acc", "test_acc", "epoch", ...}
    logits-<name>.pt          {"fingerprint", "logits" [N_train, C] float32, "teacher", "checksum"}
    tokens-<name>.pt          {"fingerprint", "logits" [M, V] float16, "teacher", "checksum"}
    tokens-<name>-top<k>.pt   {"fingerprint", "values" [M, k] float32, "indices" [M, k] uint8/int16/int32, "vocab" V,
                               "teacher", "checksum"}
    calibration-<names>.json  the teachers' temperature fit and reliability table on ``meta``
                              (:mod:`metagate.teachers.calibration_cache`: JSON, same rules)
    .teachers.lock            held while a file of the directory is computed and written

``teacher-*`` are the checkpoints of teachers trained by the project (:mod:`metagate.teachers.training`); the
others hold a teacher's logits for the training units (``M`` real tokens for a sequence task). A logits file's
fingerprint hashes the training data, the unit ids, the teacher's weights and the storage form; its checksum the
stored tensors (dtype, shape, bytes). :func:`load_or_compute` is the one loader: a fingerprint that differs, or
tensors that are not the ones written, raise :class:`~metagate.errors.StaleCacheError` (the user decides, with
``--rebuild-cache``); a file of an older version, without a checksum, is recomputed.

Writer rule: the cache writes only its own files, under the names above, atomically (a temporary file, then
``os.replace``) and under the directory's lock (one process computes; another waits, then reads what the first
wrote; the temporary files of writes that were killed are removed under it). It replaces an existing file only when that file is a teacher-cache file of the same kind
(:func:`check_replaceable`: ``--rebuild-cache``, ``--retrain-teachers``, an older version's file) and refuses
anything else under that name (a user's file, a directory, a FIFO), naming it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from metagate.checks import check_finite
from metagate.errors import CheckpointError, InputError, StaleCacheError, StorageError
from metagate.io import atomic_save, file_lock, not_a_regular_file, safe_load, state_fingerprint, tensor_checksum
from metagate.teachers.bank import teacher_logits
from metagate.teachers.sequence import token_logits, topk_compress, topk_expand
from metagate.units import PAD_ID

if TYPE_CHECKING:  # pragma: no cover
    from metagate.data.task import Task

#: the lock file of a task's cache directory
LOCK = ".teachers.lock"
#: how the temporary files of the cache's own files begin (a crashed write leaves one behind)
OWN_TMP = (".teacher-", ".logits-", ".tokens-", ".calibration-")
#: what a stale or damaged logits file's error tells the user to do
FIX = "Delete the file or pass --rebuild-cache to recompute it."
#: tensor key -> (allowed dtypes, rows, name of the columns): what a logits file stores
Expect = dict[str, tuple[tuple[torch.dtype, ...], int, str]]


def default_cache_dir() -> Path:
    """``$METAGATE_CACHE`` or ``~/.cache/metagate``."""
    return Path(os.environ.get("METAGATE_CACHE", Path.home() / ".cache" / "metagate"))


def teacher_file(name: str) -> str:
    """The cache file name of a project-trained teacher's checkpoint."""
    return f"teacher-{name}.pt"


def logits_file(name: str) -> str:
    """The cache file name of a teacher's ``[N_train, C]`` logits."""
    return f"logits-{name}.pt"


def token_logits_file(name: str, topk: int | None = None) -> str:
    """The cache file name of a teacher's token logits (full float16, or the top-k form)."""
    return f"tokens-{name}-top{topk}.pt" if topk else f"tokens-{name}.pt"


def cache_file(cache_dir: str | os.PathLike | None, task: Task, name: str) -> Path | None:
    """``cache_dir/<task key>/<name>``; ``None`` without a cache."""
    return None if cache_dir is None else Path(cache_dir) / task.key / name


@contextlib.contextmanager
def cache_lock(path: Path | None) -> Iterator[None]:
    """Hold the lock of ``path``'s cache directory (created if missing; nothing without a cache), and remove the
    temporary files interrupted writes of the cache's own files left there (no writer runs while it is held)."""
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(path.parent / LOCK):
        for pattern in (".*.pt.*.tmp", ".*.json.*.tmp"):  # atomic writes' temporary names: .<file>.<random>.tmp
            for tmp in path.parent.glob(pattern):
                if tmp.name.startswith(OWN_TMP) and tmp.is_file():
                    tmp.unlink(missing_ok=True)
        yield


def logits_fingerprint(task_fingerprint: str, ids: Tensor, teacher: nn.Module) -> str:
    """Hash of (data, unit ids, teacher checkpoint)."""
    h = hashlib.sha256()
    h.update(task_fingerprint.encode())
    h.update(ids.cpu().numpy().tobytes())
    h.update(state_fingerprint(teacher).encode())
    return h.hexdigest()[:16]


def check_replaceable(path: Path, key: str, what: str) -> None:
    """The writer rule: an existing file at a cache name is replaced only when it is a teacher-cache file of this
    kind (it loads weights-only as a dict holding ``key``).

    :raises StorageError: anything else is there (named, and left as it is)
    """
    if not (path.exists() or path.is_symlink()):
        return
    why = not_a_regular_file(path)
    if why is None:
        try:
            blob = safe_load(path, what)
            why = None if isinstance(blob, dict) and key in blob else "is not one (no " + repr(key) + ")"
        except CheckpointError as e:
            why = f"does not load as one ({e})"
    if why is not None:
        raise StorageError(errno.EEXIST, f"will not replace {path}: it should be a metagate {what} but {why}. It is "
                                         "left as it is; move it away or choose another --cache-dir")


def blob_checksum(blob: dict[str, Any], keys: Any) -> str:
    """The checksum of a cache file's tensors (``keys`` in order)."""
    return "-".join(tensor_checksum(blob[k]) for k in keys)


def _load(path: Path, fingerprint: str, what: str, covers: str, expect: Expect) -> dict[str, Any] | None:
    """The file's blob when it matches; ``None`` when it is missing or of an older version (no checksum)."""
    if not (path.exists() or path.is_symlink()):
        return None
    why = not_a_regular_file(path)
    if why is not None:
        raise StaleCacheError(f"{what} {path} {why}, not a cache file; move it away or choose another --cache-dir")
    blob = safe_load(path, what)
    if not isinstance(blob, dict) or blob.get("fingerprint") != fingerprint:
        got = blob.get("fingerprint") if isinstance(blob, dict) else None
        raise StaleCacheError(f"stale teacher cache {path}: it was computed for fingerprint {got}, but the current "
                              f"{covers} give {fingerprint}. Delete the file or pass --rebuild-cache.")
    if "checksum" not in blob:  # caches of older versions have none: they are recomputed
        return None
    for key, (dtypes, n, cols) in expect.items():
        t = blob.get(key)
        if not torch.is_tensor(t) or t.dtype not in dtypes or t.ndim != 2 or t.shape[0] != n:
            got = f"{t.dtype} {tuple(t.shape)}" if torch.is_tensor(t) else type(t).__name__
            want = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
            raise StaleCacheError(f"damaged teacher cache {path}: {key} are {got}, expected {want} [{n}, {cols}]. "
                                  f"{FIX}")
    got = blob_checksum(blob, expect)
    if got != blob["checksum"]:
        raise StaleCacheError(f"damaged teacher cache {path}: the {' and '.join(expect)}' checksum is {got}, the file "
                              f"recorded {blob['checksum']} (zeroed, shifted or flipped values). {FIX}")
    return blob


def load_or_compute(path: Path | None, fingerprint: str, compute: Callable[[], dict[str, Any]], *, what: str,
                    covers: str, expect: Expect, rebuild: bool = False) -> dict[str, Any]:
    """A logits file's contents: from ``path`` when its fingerprint matches and its tensors are the ones written,
    else ``compute()``'s, written to ``path`` with the fingerprint and the checksum (the writer rule above).

    :param what: how errors name the file (``"teacher logits cache"``)
    :param covers: what the fingerprint hashes, for the stale-cache error
    :param expect: the stored tensors: key -> (allowed dtypes, rows, name of the columns)
    :param rebuild: recompute even when the file matches
    :raises StaleCacheError: the file was computed for other data, ids, weights or storage form, or is damaged
    """
    if path is not None and not rebuild:
        blob = _load(path, fingerprint, what, covers, expect)
        if blob is not None:
            return blob
    with cache_lock(path):
        if path is not None and not rebuild:  # another process may have written it while this one waited
            blob = _load(path, fingerprint, what, covers, expect)
            if blob is not None:
                return blob
        if path is not None:
            check_replaceable(path, "fingerprint", what)
        blob = compute()
        if path is not None:
            atomic_save({"fingerprint": fingerprint, **blob, "checksum": blob_checksum(blob, expect)}, path)
    return blob


def cached_logits(teacher: nn.Module, name: str, task: Task, cache_dir: Path | None,
                  device: torch.device | str = "cpu", rebuild: bool = False,
                  task_fingerprint: str | None = None) -> Tensor:
    """``[N_train, C]`` training-split logits of ``teacher``, from the cache when it matches, else computed and
    cached.

    :param task_fingerprint: ``task.fingerprint()`` when the caller already has it (hashing the data is the
        costly part)
    :raises StaleCacheError: the cached logits were computed for other data, ids or weights, or are damaged
    """
    n = len(task.train)
    fp = logits_fingerprint(task_fingerprint or task.fingerprint(), torch.arange(n), teacher)

    def compute() -> dict[str, Any]:
        logits = teacher_logits(teacher, task.train.x, device)
        check_finite(f"logits of teacher {name!r}", logits)
        return {"logits": logits, "teacher": name}

    blob = load_or_compute(cache_file(cache_dir, task, logits_file(name)), fp, compute, what="teacher logits cache",
                           covers="data, unit ids and teacher checkpoint",
                           expect={"logits": ((torch.float32,), n, "C")}, rebuild=rebuild)
    return blob["logits"]


def cached_token_logits(teacher: nn.Module, name: str, task: Task, cache_dir: Path | None,
                        device: torch.device | str = "cpu", rebuild: bool = False, topk: int | None = None,
                        task_fingerprint: str | None = None) -> Tensor:
    """``[M, V]`` logits (float16; with ``topk``, float32 log-probabilities rebuilt from the top-k form) of one
    teacher's real training tokens, from the cache when it matches, else computed and cached.

    :raises StaleCacheError: the cached file was computed for other data, ids, weights or storage form, or is
        damaged
    :raises InputError: the teacher's vocabulary differs from the task's
    """
    v = task.num_classes
    m = int((task.train.y != PAD_ID).sum())
    fp = logits_fingerprint(task_fingerprint or task.fingerprint(), torch.arange(len(task.train)), teacher)
    fp += f"-top{topk}" if topk else ""

    def compute() -> dict[str, Any]:
        logits = token_logits(teacher, task, device)
        if logits.shape[-1] != v:
            raise InputError(f"vocabulary mismatch: teacher {name!r} outputs {logits.shape[-1]} target tokens, "
                             f"the task's (and the student's) target vocabulary has {v}")
        check_finite(f"logits of teacher {name!r}", logits)
        if topk:
            values, indices = topk_compress(torch.log_softmax(logits, -1), topk)
            return {"values": values, "indices": indices, "vocab": v, "teacher": name}
        return {"logits": logits.to(torch.float16), "teacher": name}

    expect: Expect = ({"values": ((torch.float32,), m, "k"), "indices": ((torch.uint8, torch.int16, torch.int32), m, "k")}
                      if topk else {"logits": ((torch.float16,), m, "V")})
    blob = load_or_compute(cache_file(cache_dir, task, token_logits_file(name, topk)), fp, compute,
                           what="teacher token-logits cache",
                           covers="data, unit ids, teacher checkpoint and storage form", expect=expect, rebuild=rebuild)
    if topk:
        return topk_expand(blob["values"], blob["indices"], int(blob["vocab"]))
    return blob["logits"]
