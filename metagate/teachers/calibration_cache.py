"""The teachers' temperature fit and reliability table, cached with the teacher bank.

:func:`~metagate.teachers.build.fit_teacher_temperatures` fits one temperature per teacher on the clean ``meta``
split (and the ensemble's ``r``, the NLL/ECE report at τ = 1, 1.5 and τ*, and the reliability table), which
needs every teacher's logits on ``meta``: one forward pass of each teacher per run (seconds with SmolLM2 on the
lm task, in every compare cell). The result is kept in one JSON file beside the bank's other files, so a run
whose teachers and ``meta`` split are those of an earlier run reads it instead::

    calibration-<name>+<name>....json           a bank of cached logits (or of file teachers)
    calibration-<name>+<name>...-top<k>.json    the sparse top-k bank (lm), beside sparse-<names>-top<k>.safetensors

    {"format": "metagate-teacher-calibration", "version": FIT_VERSION, "fingerprint": ...,
     "calibration": {"names", "taus", "ensemble_tau", "stats", "calibrated"}, "reliability": [[...]] | null,
     "checksum": ...}

JSON only: nothing is unpickled; Python's float repr reads back the same double, so a loaded fit gives the
same numbers, bit for bit, as the run that computed it (the reliability table is float32, exact in a double).

The fingerprint hashes what the fit depends on: the teachers (the sparse bank's own fingerprint, which hashes
every teacher's weights; else each teacher's weights, or ``file`` for a teacher from a logits file, which is not
fitted), their names, the ``meta`` split's inputs and labels, and the scored fixed temperatures. ``FIT_VERSION``
names the fit's method (its search interval and grid, the reliability prior): it changes when they do.

The policy is the logits cache's (:mod:`metagate.teachers.cache`): a file of another fingerprint, or a damaged
one (fields missing, checksum), raises :class:`~metagate.errors.StaleCacheError` naming it (the user decides,
with ``--rebuild-cache``); a file of another ``FIT_VERSION`` is refitted. Writes are atomic and under the
directory's lock, and replace only a calibration-cache file (one that parses as JSON of this format): anything
else under the name (not JSON, a directory) is a ``StaleCacheError`` on reading and is never replaced, even with
``--rebuild-cache``; the user moves it away.
"""

from __future__ import annotations

import errno
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from metagate.calibration import FIT_METHOD, TeacherCalibration
from metagate.errors import StaleCacheError, StorageError
from metagate.io import atomic_write_text, not_a_regular_file, state_fingerprint
from metagate.teachers.cache import cache_lock

#: the ``format`` field of a calibration cache file
FORMAT = "metagate-teacher-calibration"
#: the fit's method (the search's settings; the reliability table's prior, features.teacher_reliability's default):
#: bump the leading number when the fit or the table is computed differently
FIT_VERSION = f"1; {FIT_METHOD}; reliability prior 1"
#: what the fingerprint covers, for the stale-cache error
COVERS = "teachers (names and weights), meta split and scored temperatures"
#: the fit and the reliability table (``None`` when unmeasured) of a cache file
Fit = tuple[TeacherCalibration, Tensor | None]


def calibration_file(names: Sequence[str], topk: int | None = None) -> str:
    """The cache file name of the fit of teachers ``names`` (``topk``: the sparse top-k bank's)."""
    return f"calibration-{'+'.join(names)}" + (f"-top{topk}" if topk else "") + ".json"


def _tensor_bytes(t: Any) -> bytes:
    digest = getattr(t, "content_digest", None)  # inputs read from a dataset (metagate.data.inputs)
    if digest is not None:
        return digest()
    return f"{t.dtype}{tuple(t.shape)}".encode() + np.ascontiguousarray(t.cpu().numpy()).tobytes()


def calibration_fingerprint(names: Sequence[str], teachers: Sequence[str], meta_x: Any, meta_y: Tensor,
                            scored_taus: Sequence[float]) -> str:
    """SHA-256 (first 16 hex) of what a fit depends on.

    :param teachers: the teachers' identity: the sparse bank's fingerprint, or one fingerprint per teacher
        (:func:`teacher_identities`)
    """
    h = hashlib.sha256()
    h.update(json.dumps({"names": list(names), "teachers": list(teachers), "taus": list(scored_taus)}).encode())
    h.update(_tensor_bytes(meta_x))
    h.update(_tensor_bytes(meta_y))
    return h.hexdigest()[:16]


def teacher_identities(modules: Sequence[nn.Module], num_teachers: int) -> list[str]:
    """Each module teacher's weights' fingerprint, then ``"file"`` for each teacher from a logits file."""
    return [state_fingerprint(m) for m in modules] + ["file"] * (num_teachers - len(modules))


def _payload_checksum(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def _read(path: Path) -> dict[str, Any] | None:
    """The file's fields when it parses as a calibration cache file; ``None`` when it is something else."""
    if not_a_regular_file(path) is not None:
        return None
    try:
        blob = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return blob if isinstance(blob, dict) and blob.get("format") == FORMAT else None


def _damaged(path: Path, why: str, fix: str = "Delete the file or pass --rebuild-cache to refit.") -> StaleCacheError:
    return StaleCacheError(f"damaged teacher calibration cache {path}: {why}. {fix}")


def _load(path: Path, fingerprint: str) -> Fit | None:
    """The fit at ``path`` when it matches; ``None`` when there is none or it is of another ``FIT_VERSION``."""
    if not (path.exists() or path.is_symlink()):
        return None
    why = not_a_regular_file(path)
    if why is not None:
        raise StaleCacheError(f"teacher calibration cache {path} {why}, not a cache file; move it away or choose "
                              "another --cache-dir")
    blob = _read(path)
    if blob is None:
        raise _damaged(path, "it is not a metagate calibration file (not JSON of that format)",
                       "Delete the file (it is not replaced) to refit.")
    if blob.get("version") != FIT_VERSION:  # an older fit's method: refitted and replaced
        return None
    if blob.get("fingerprint") != fingerprint:
        raise StaleCacheError(f"stale teacher calibration cache {path}: it was fitted for fingerprint "
                              f"{blob.get('fingerprint')}, but the current {COVERS} give {fingerprint}. Delete the "
                              "file or pass --rebuild-cache.")
    try:
        payload = {"calibration": blob["calibration"], "reliability": blob["reliability"]}
        if _payload_checksum(payload) != blob["checksum"]:
            raise _damaged(path, f"its checksum is {_payload_checksum(payload)}, the file recorded {blob['checksum']} "
                                 "(edited or damaged values)")
        cal = TeacherCalibration(**payload["calibration"])
        rel = None if payload["reliability"] is None else torch.tensor(payload["reliability"], dtype=torch.float32)
    except (KeyError, TypeError, ValueError) as e:
        raise _damaged(path, f"a field is missing or malformed ({type(e).__name__}: {e})") from e
    if len(cal.taus) != len(cal.names) or (rel is not None and (rel.ndim != 2 or rel.shape[0] != len(cal.names))):
        raise _damaged(path, f"{len(cal.taus)} temperatures / reliability {None if rel is None else tuple(rel.shape)} "
                             f"for {len(cal.names)} teachers")
    return cal, rel


def _check_replaceable(path: Path) -> None:
    """The writer rule: only a calibration cache file (of any version or fingerprint) is replaced."""
    if (path.exists() or path.is_symlink()) and _read(path) is None:
        why = not_a_regular_file(path) or "does not parse as one"
        raise StorageError(errno.EEXIST, f"will not replace {path}: it should be a metagate teacher calibration "
                                         f"cache file but {why}. It is left as it is; move it away or choose another "
                                         "--cache-dir")


def cached_fit(path: Path | None, fingerprint: str, fit: Callable[[], Fit], rebuild: bool = False) -> Fit:
    """The fit from ``path`` when its fingerprint matches (and its checksum holds), else ``fit()``'s, written to
    ``path`` (atomically, under the directory's lock).

    :param path: the cache file; ``None``: no cache (``fit()``)
    :param rebuild: refit even when the file matches (``--rebuild-cache``), and replace it
    :raises StaleCacheError: the file was fitted for other teachers or another meta split, or is damaged
    """
    if path is None:
        return fit()
    if not rebuild:
        got = _load(path, fingerprint)
        if got is not None:
            return got
    with cache_lock(path):
        if not rebuild:  # another process may have written it while this one waited
            got = _load(path, fingerprint)
            if got is not None:
                return got
        _check_replaceable(path)
        cal, rel = fit()
        payload = {"calibration": cal.as_dict(), "reliability": None if rel is None else rel.tolist()}
        blob = {"format": FORMAT, "version": FIT_VERSION, "fingerprint": fingerprint, **payload,
                "checksum": _payload_checksum(payload)}
        atomic_write_text(path, json.dumps(blob, indent=1) + "\n")
    return cal, rel
