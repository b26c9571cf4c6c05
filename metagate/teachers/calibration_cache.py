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

The policy is :func:`cached_json`'s, for any small JSON cache file of a :class:`JsonCache` kind (its format,
version, fields and error words): the fit here, the pretrained teachers' accuracies
(:mod:`metagate.teachers.pretrained`).
"""

from __future__ import annotations

import errno
import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor, nn

from metagate.calibration import FIT_METHOD, TeacherCalibration
from metagate.errors import StaleCacheError, StorageError
from metagate.io import atomic_write_text, not_a_regular_file, state_fingerprint
from metagate.teachers.bank import TeacherBank
from metagate.teachers.cache import cache_lock
from metagate.teachers.sparse_seq import SeqSparseBank


@dataclass(frozen=True)
class JsonCache:
    """One kind of small JSON cache file kept beside a bank (the policy of the module docstring): its ``format``
    field, the method ``version`` (another version is recomputed and replaced), the payload's fields (in the
    order their checksum reads them) and the words of its errors."""

    format: str
    version: str
    fields: tuple[str, ...]
    #: names the file in errors ("teacher calibration cache")
    what: str
    #: what the fingerprint covers, for the stale-cache error
    covers: str
    #: what the file is ("calibration": "not a metagate calibration file") and how it is redone ("refit")
    noun: str
    redo: str
    #: how its values were made ("fitted"), for the stale-cache error
    made: str

    def damaged(self, path: Path, why: str, fix: str | None = None) -> StaleCacheError:
        """The error naming a damaged file of this kind."""
        fix = fix or f"Delete the file or pass --rebuild-cache to {self.redo}."
        return StaleCacheError(f"damaged {self.what} {path}: {why}. {fix}")


#: the fit's method (the search's settings; the reliability table's prior, features.teacher_reliability's default):
#: bump the leading number when the fit or the table is computed differently
FIT_VERSION = f"2; {FIT_METHOD}; reliability prior 1, per real token on sequences"
#: the calibration cache file's kind
CALIBRATION = JsonCache(format="metagate-teacher-calibration", version=FIT_VERSION,
                        fields=("calibration", "reliability"), what="teacher calibration cache",
                        covers="teachers (names and weights), meta split and scored temperatures",
                        noun="calibration", redo="refit", made="fitted")
#: the ``format`` field of a calibration cache file
FORMAT = CALIBRATION.format
#: what the fingerprint covers, for the stale-cache error
COVERS = CALIBRATION.covers
#: the fit and the reliability table (``None`` when unmeasured) of a cache file
Fit = tuple[TeacherCalibration, Tensor | None]
T = TypeVar("T")


def bank_file(prefix: str, names: Sequence[str], topk: int | None = None) -> str:
    """The name of a JSON cache file kept beside the bank of teachers ``names`` (``topk``: the sparse top-k
    bank's): ``<prefix>-<name>+<name>...[-top<k>].json``."""
    return f"{prefix}-{'+'.join(names)}" + (f"-top{topk}" if topk else "") + ".json"


def calibration_file(names: Sequence[str], topk: int | None = None) -> str:
    """The cache file name of the fit of teachers ``names`` (``topk``: the sparse top-k bank's)."""
    return bank_file("calibration", names, topk)


def bank_identity(bank: TeacherBank, own: Callable[[], list[str]]) -> tuple[list[str], int | None]:
    """The teachers' identity in a cache key beside ``bank``, and the top-k of the file's name: a sparse bank's
    own fingerprint (it hashes every teacher's weights already, so SmolLM2's are not hashed twice), else
    ``own()`` (e.g. :func:`teacher_identities`)."""
    sparse = bank.sparse if isinstance(bank, SeqSparseBank) else None
    return ([sparse.fingerprint], sparse.k) if sparse is not None else (own(), None)


def _tensor_bytes(t: Any) -> bytes:
    digest = getattr(t, "content_digest", None)  # inputs read from a dataset (metagate.data.inputs)
    if digest is not None:
        return digest()
    return f"{t.dtype}{tuple(t.shape)}".encode() + np.ascontiguousarray(t.cpu().numpy()).tobytes()


def content_fingerprint(fields: dict[str, Any], tensors: Sequence[Any]) -> str:
    """SHA-256 (first 16 hex) of JSON ``fields`` and the tensors' dtypes, shapes and values (in order)."""
    h = hashlib.sha256()
    h.update(json.dumps(fields).encode())
    for t in tensors:
        h.update(_tensor_bytes(t))
    return h.hexdigest()[:16]


def calibration_fingerprint(names: Sequence[str], teachers: Sequence[str], meta_x: Any, meta_y: Tensor,
                            scored_taus: Sequence[float]) -> str:
    """SHA-256 (first 16 hex) of what a fit depends on.

    :param teachers: the teachers' identity: the sparse bank's fingerprint, or one fingerprint per teacher
        (:func:`teacher_identities`)
    """
    return content_fingerprint({"names": list(names), "teachers": list(teachers), "taus": list(scored_taus)},
                               [meta_x, meta_y])


def teacher_identities(modules: Sequence[nn.Module], num_teachers: int) -> list[str]:
    """Each module teacher's weights' fingerprint, then ``"file"`` for each teacher from a logits file."""
    return [state_fingerprint(m) for m in modules] + ["file"] * (num_teachers - len(modules))


def _payload_checksum(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload).encode()).hexdigest()[:16]


def _read(kind: JsonCache, path: Path) -> dict[str, Any] | None:
    """The file's fields when it parses as a cache file of ``kind``; ``None`` when it is something else."""
    if not_a_regular_file(path) is not None:
        return None
    try:
        blob = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return blob if isinstance(blob, dict) and blob.get("format") == kind.format else None


def _load(kind: JsonCache, path: Path, fingerprint: str, decode: Callable[[dict[str, Any], Path], T]) -> T | None:
    """The decoded payload at ``path`` when it matches; ``None`` when there is none or it is of another version."""
    if not (path.exists() or path.is_symlink()):
        return None
    why = not_a_regular_file(path)
    if why is not None:
        raise StaleCacheError(f"{kind.what} {path} {why}, not a cache file; move it away or choose "
                              "another --cache-dir")
    blob = _read(kind, path)
    if blob is None:
        raise kind.damaged(path, f"it is not a metagate {kind.noun} file (not JSON of that format)",
                           f"Delete the file (it is not replaced) to {kind.redo}.")
    if blob.get("version") != kind.version:  # an older method: recomputed and replaced
        return None
    if blob.get("fingerprint") != fingerprint:
        raise StaleCacheError(f"stale {kind.what} {path}: it was {kind.made} for fingerprint "
                              f"{blob.get('fingerprint')}, but the current {kind.covers} give {fingerprint}. Delete "
                              "the file or pass --rebuild-cache.")
    try:
        payload = {f: blob[f] for f in kind.fields}
        if _payload_checksum(payload) != blob["checksum"]:
            raise kind.damaged(path, f"its checksum is {_payload_checksum(payload)}, the file recorded "
                                     f"{blob['checksum']} (edited or damaged values)")
        return decode(payload, path)
    except (KeyError, TypeError, ValueError) as e:
        raise kind.damaged(path, f"a field is missing or malformed ({type(e).__name__}: {e})") from e


def _check_replaceable(kind: JsonCache, path: Path) -> None:
    """The writer rule: only a cache file of ``kind`` (of any version or fingerprint) is replaced."""
    if (path.exists() or path.is_symlink()) and _read(kind, path) is None:
        why = not_a_regular_file(path) or "does not parse as one"
        raise StorageError(errno.EEXIST, f"will not replace {path}: it should be a metagate {kind.what} "
                                         f"file but {why}. It is left as it is; move it away or choose another "
                                         "--cache-dir")


def cached_json(kind: JsonCache, path: Path | None, fingerprint: str, compute: Callable[[], T],
                encode: Callable[[T], dict[str, Any]], decode: Callable[[dict[str, Any], Path], T],
                rebuild: bool = False) -> T:
    """``decode`` of the payload at ``path`` when its fingerprint matches (and its checksum holds), else
    ``compute()``'s value, written to ``path`` as ``encode``'s payload (atomically, under the directory's lock).

    :param path: the cache file; ``None``: no cache (``compute()``)
    :param encode: the value's payload (a dict of ``kind.fields``, JSON)
    :param decode: the value of a payload read from ``path``; raises ``KeyError``/``TypeError``/``ValueError``
        (or ``kind.damaged``) on a malformed one
    :param rebuild: recompute even when the file matches (``--rebuild-cache``), and replace it
    :raises StaleCacheError: the file was computed for another fingerprint, or is damaged
    """
    if path is None:
        return compute()
    if not rebuild:
        got = _load(kind, path, fingerprint, decode)
        if got is not None:
            return got
    with cache_lock(path):
        if not rebuild:  # another process may have written it while this one waited
            got = _load(kind, path, fingerprint, decode)
            if got is not None:
                return got
        _check_replaceable(kind, path)
        value = compute()
        payload = encode(value)
        blob = {"format": kind.format, "version": kind.version, "fingerprint": fingerprint,
                **{f: payload[f] for f in kind.fields}, "checksum": _payload_checksum(payload)}
        atomic_write_text(path, json.dumps(blob, indent=1) + "\n")
    return value


def _encode_fit(fit: Fit) -> dict[str, Any]:
    cal, rel = fit
    return {"calibration": cal.as_dict(), "reliability": None if rel is None else rel.tolist()}


def _decode_fit(payload: dict[str, Any], path: Path) -> Fit:
    cal = TeacherCalibration(**payload["calibration"])
    rel = None if payload["reliability"] is None else torch.tensor(payload["reliability"], dtype=torch.float32)
    if len(cal.taus) != len(cal.names) or (rel is not None and (rel.ndim != 2 or rel.shape[0] != len(cal.names))):
        raise CALIBRATION.damaged(path, f"{len(cal.taus)} temperatures / reliability "
                                        f"{None if rel is None else tuple(rel.shape)} for {len(cal.names)} teachers")
    return cal, rel


def cached_fit(path: Path | None, fingerprint: str, fit: Callable[[], Fit], rebuild: bool = False) -> Fit:
    """The fit from ``path`` when its fingerprint matches (and its checksum holds), else ``fit()``'s, written to
    ``path`` (atomically, under the directory's lock).

    :param path: the cache file; ``None``: no cache (``fit()``)
    :param rebuild: refit even when the file matches (``--rebuild-cache``), and replace it
    :raises StaleCacheError: the file was fitted for other teachers or another meta split, or is damaged
    """
    return cached_json(CALIBRATION, path, fingerprint, fit, _encode_fit, _decode_fit, rebuild)
