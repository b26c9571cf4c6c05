"""Teachers whose logits come from files: another framework, a model that is not torch, a large model's
offline outputs.

A teacher-logits file holds one teacher's outputs for the training units, ``[N, C]``, or ``[N, T, V]`` per target
token for a sequence task (``T`` the task's padded target length, ``V`` its target vocabulary; padded
positions are ignored; top-k arrays are then ``[N, T, k]`` and ``remainder [N, T]``):

* ``.npy`` -- one array: full logits (or log-probabilities); row ``i`` is training unit ``i``.
* ``.npz``, ``.pt``, ``.safetensors`` -- named arrays (a ``.pt`` file may also be a bare tensor of full logits):

  ====================  =====================================================================
  ``logits [N, C]``     full logits or log-probabilities, or
  ``indices [N, k]``    top-k: class indices (integers, distinct within a row),
  ``log_probs [N, k]``  their log-probabilities,
  ``remainder [N]``     optional: the probability mass of the other ``C - k`` classes
                        (default ``1 - sum(exp(log_probs))``),
  ``num_classes``       optional: ``C`` (a scalar; checked against the run's class count),
  ``ids [N]``           optional: the unit id of each row (any order); without it row ``i`` is unit ``i``.
  ====================  =====================================================================

Files are read without executing code: ``np.load(allow_pickle=False)``, ``torch.load(weights_only=True)``,
``safetensors`` (needs the ``safetensors`` package: ``pip install safetensors``).

**Top-k reconstruction.** A top-k row becomes a full ``[C]`` log-probability row: the ``k`` stored classes
keep their log-probabilities and the remainder mass is spread uniformly over the ``C - k`` other classes
(each gets ``remainder / (C - k)``, at least :data:`TAIL_FLOOR` so that no log-probability is ``-inf``);
the row is then renormalised (``log_softmax``). Log-probabilities are valid logits: the bank's
``log_softmax(logits / tau)`` of a reconstructed row is the tempered reconstructed distribution. The
uniform tail is the maximum-entropy completion of what the file knows; it is exact when the true tail is
uniform and otherwise loses only the tail's shape (digits CNN teachers, k = 5 of 10 classes, top-5 mass 0.87:
mean KL(full || rebuilt) 0.011 at ``tau`` 1, 0.0025 at ``tau`` 4).

Every problem is an :class:`~metagate.errors.InputError` that names the file and both sizes: wrong
length, wrong class count (or ``T`` / ``V``), non-finite values, unknown / duplicate / missing unit ids, top-k
with ``k >= C``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from metagate.errors import InputError
from metagate.io import not_a_regular_file, safe_load

#: the smallest probability a class outside a top-k row gets (keeps every log-probability finite)
TAIL_FLOOR = 1e-12
#: how far ``sum(exp(top-k log_probs)) + remainder`` may stray from 1 (files written in half precision)
MASS_TOLERANCE = 1e-2
FORMATS = (".npy", ".npz", ".pt", ".safetensors")
KEYS = ("logits", "indices", "log_probs", "remainder", "num_classes", "ids")


@dataclass
class TeacherArrays:
    """The arrays of one teacher-logits file (or tensor), not yet checked against the data.

    Either ``logits`` (full) or ``indices`` + ``log_probs`` (+ ``remainder``) (top-k) is set.
    """

    source: str
    logits: Tensor | None = None
    indices: Tensor | None = None
    log_probs: Tensor | None = None
    remainder: Tensor | None = None
    num_classes: int | None = None
    ids: Tensor | None = None

    @property
    def topk(self) -> bool:
        return self.logits is None

    @property
    def num_rows(self) -> int:
        return int((self.logits if self.logits is not None else self.log_probs).shape[0])  # type: ignore[union-attr]

    @property
    def file_classes(self) -> int | None:
        """``C`` (``V``) as the file states it (full logits' width, or ``num_classes`` of a top-k file)."""
        return int(self.logits.shape[-1]) if self.logits is not None else self.num_classes

    @property
    def seq_len(self) -> int | None:
        """``T`` of a per-token ``[N, T, V]`` file (``None``: ``[N, C]``)."""
        t = self.logits if self.logits is not None else self.log_probs
        return int(t.shape[1]) if t is not None and t.ndim == 3 else None


def read_teacher_file(path: str | os.PathLike) -> TeacherArrays:
    """The arrays of a teacher-logits file, with their shapes and values checked (not yet the data's sizes)."""
    path = Path(path)
    why = not_a_regular_file(path)  # said without opening it: a FIFO would block, a device never end
    if why is not None:
        raise InputError(f"teacher logits file {path} {why}" + ("" if why == "does not exist" else
                                                                ", not a regular file"))
    suffix = path.suffix.lower()
    if suffix == ".npy":
        return teacher_arrays({"logits": _np_load(path)}, str(path))
    if suffix == ".npz":
        with _np_load(path) as z:
            return teacher_arrays({k: z[k] for k in z.files}, str(path))
    if suffix == ".pt":
        blob = safe_load(path, "teacher logits file")
        return teacher_arrays(blob if isinstance(blob, dict) else {"logits": blob}, str(path))
    if suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:
            raise InputError(f"reading {path} needs the safetensors package: pip install safetensors "
                             "(or save the logits as .npy, .npz or .pt)") from None
        try:
            arrays = dict(load_file(str(path)))
        except Exception as e:  # noqa: BLE001 - a corrupt header raises safetensors' own SafetensorError
            raise InputError(f"teacher logits file {path} is not a readable safetensors file "
                             f"({type(e).__name__}: {e})") from e
        return teacher_arrays(arrays, str(path))
    raise InputError(f"teacher logits file {path}: unknown format {suffix or '(no suffix)'!r}; use one of "
                     f"{', '.join(FORMATS)}")


def _np_load(path: Path) -> Any:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:  # pickled object arrays are refused here too
        raise InputError(f"teacher logits file {path} is not a readable numpy file: {e}") from e


def _tensor(value: Any, source: str, key: str) -> Tensor:
    if isinstance(value, Tensor):
        return value.detach().cpu()
    if isinstance(value, (np.ndarray, np.generic, int, float)):
        arr = np.asarray(value)
        if arr.dtype.kind not in "iufb":
            raise InputError(f"{source}: {key!r} has dtype {arr.dtype}, expected numbers")
        return torch.from_numpy(np.ascontiguousarray(arr))
    raise InputError(f"{source}: {key!r} is a {type(value).__name__}, expected an array or tensor")


def teacher_arrays(blob: dict[str, Any], source: str) -> TeacherArrays:
    """Check and convert the named arrays of a teacher (a file's contents, or arrays given in Python).

    :param source: how errors name it (the file's path)
    """
    unknown = sorted(set(blob) - set(KEYS))
    if unknown:
        raise InputError(f"{source}: unknown key(s) {', '.join(map(repr, unknown))}; a teacher-logits file holds "
                         f"{', '.join(KEYS)}")
    t = {k: _tensor(v, source, k) for k, v in blob.items()}
    full, topk = "logits" in t, ("indices" in t or "log_probs" in t)
    if full == topk:
        raise InputError(f"{source}: give either 'logits' [N, C] (full) or 'indices' + 'log_probs' [N, k] (top-k)"
                         f", found {', '.join(sorted(t)) or 'nothing'}")
    out = TeacherArrays(source)
    if "num_classes" in t:
        if t["num_classes"].numel() != 1 or t["num_classes"].dtype.is_floating_point:
            raise InputError(f"{source}: 'num_classes' must be one integer, got shape {tuple(t['num_classes'].shape)}")
        out.num_classes = int(t["num_classes"].item())
    if full:
        out.logits = _float_matrix(t["logits"], source, "logits")
        n = out.logits.shape[0]
        if out.num_classes is not None and out.num_classes != out.logits.shape[-1]:
            raise InputError(f"{source}: 'logits' has {out.logits.shape[-1]} classes but 'num_classes' says "
                             f"{out.num_classes}")
    else:
        if "indices" not in t or "log_probs" not in t:
            raise InputError(f"{source}: a top-k file needs both 'indices' and 'log_probs' [N, k]")
        out.log_probs = _float_matrix(t["log_probs"], source, "log_probs")
        idx = t["indices"]
        if idx.dtype.is_floating_point or idx.dtype == torch.bool:
            raise InputError(f"{source}: 'indices' must be integers, got {idx.dtype}")
        if tuple(idx.shape) != tuple(out.log_probs.shape):
            raise InputError(f"{source}: 'indices' has shape {tuple(idx.shape)} but 'log_probs' has "
                             f"{tuple(out.log_probs.shape)}")
        out.indices = idx.long()
        n = out.log_probs.shape[0]
        if (out.log_probs > 1e-6).any():
            r = int((out.log_probs > 1e-6).reshape(n, -1).any(1).nonzero()[0])
            raise InputError(f"{source}: 'log_probs' must be log-probabilities (<= 0); row {r} has "
                             f"{float(out.log_probs[r].max()):g}")
        if "remainder" in t:
            want = tuple(out.log_probs.shape[:-1])
            rem = t["remainder"].double()
            if rem.ndim == len(want) + 1 and rem.shape[-1] == 1:
                rem = rem.squeeze(-1)
            if tuple(rem.shape) != want:
                raise InputError(f"{source}: 'remainder' has shape {tuple(t['remainder'].shape)}, expected "
                                 f"{list(want)} (one mass per row of 'log_probs')")
            _check_finite(rem, source, "remainder")
            out.remainder = rem
        srt = out.indices.sort(-1).values
        dup = (srt[..., 1:] == srt[..., :-1]).any(-1).reshape(n, -1).any(1)
        if dup.any():
            r = int(dup.nonzero()[0])
            raise InputError(f"{source}: row {r} of 'indices' repeats a class ({srt[r].tolist()})")
    if "ids" in t:
        ids = t["ids"]
        if ids.dtype.is_floating_point or ids.ndim != 1:
            raise InputError(f"{source}: 'ids' must be a 1-D integer array, got {ids.dtype} {tuple(ids.shape)}")
        if ids.shape[0] != n:
            raise InputError(f"{source}: 'ids' has {ids.shape[0]} entries but the file has {n} rows")
        out.ids = ids.long()
    return out


def _float_matrix(x: Tensor, source: str, key: str) -> Tensor:
    if x.ndim not in (2, 3):
        raise InputError(f"{source}: {key!r} must be [N, C] (rows = units) or [N, T, V] (per-token, sequence "
                         f"tasks), got shape {tuple(x.shape)}")
    if not x.dtype.is_floating_point:
        raise InputError(f"{source}: {key!r} must be floating point, got {x.dtype}")
    _check_finite(x, source, key)
    return x.float()


def _check_finite(x: Tensor, source: str, key: str) -> None:
    bad = ~torch.isfinite(x)
    if bad.any():
        first = int(bad.reshape(x.shape[0], -1).any(1).nonzero()[0]) if x.ndim else 0
        raise InputError(f"{source}: {key!r} holds {int(bad.sum())} NaN/inf value(s) of {x.numel()}, first in row "
                         f"{first}")


def topk_log_probs(indices: Tensor, log_probs: Tensor, remainder: Tensor | None, num_classes: int,
                   source: str = "top-k teacher") -> Tensor:
    """``[N, C]`` log-probabilities from a top-k row set: the remainder spread uniformly over the other
    ``C - k`` classes (at least :data:`TAIL_FLOOR` each), renormalised (module docstring)."""
    n, k = log_probs.shape
    if k >= num_classes:
        raise InputError(f"{source} stores the top {k} of {num_classes} classes: top-k needs k < C "
                         f"(store the full logits instead)")
    if int(indices.min()) < 0 or int(indices.max()) >= num_classes:
        bad = int(indices.min()) if int(indices.min()) < 0 else int(indices.max())
        raise InputError(f"{source}: class index {bad} in 'indices' is outside [0, {num_classes}) "
                         f"({num_classes} classes)")
    top_mass = log_probs.double().exp().sum(1)
    if remainder is None:
        remainder = (1.0 - top_mass).clamp_min(0.0)
    else:
        remainder = remainder.double()
    if (remainder < 0).any() or (remainder > 1 + MASS_TOLERANCE).any():
        r = int(((remainder < 0) | (remainder > 1 + MASS_TOLERANCE)).nonzero()[0])
        raise InputError(f"{source}: 'remainder' must be a probability mass in [0, 1]; row {r} has "
                         f"{float(remainder[r]):g}")
    off = (top_mass + remainder - 1.0).abs()
    if (off > MASS_TOLERANCE).any():
        r = int((off > MASS_TOLERANCE).nonzero()[0])
        raise InputError(f"{source}: row {r}'s top-{k} probabilities ({float(top_mass[r]):.4f}) plus its remainder "
                         f"({float(remainder[r]):.4f}) sum to {float(top_mass[r] + remainder[r]):.4f}, not 1")
    tail = (remainder / (num_classes - k)).clamp_min(TAIL_FLOOR).log()
    full = tail.unsqueeze(1).expand(n, num_classes).clone()
    full.scatter_(1, indices, log_probs.double())
    return torch.log_softmax(full, 1).float()


def topk_arrays(logits: Tensor, k: int) -> dict[str, Tensor]:
    """The top-k form of full logits ``[N, C]`` (``indices``, ``log_probs``, ``remainder``), e.g. to write a
    compact teacher file: ``torch.save(topk_arrays(logits, 5), "teacher.pt")``."""
    lp = torch.log_softmax(logits.double(), -1)
    top, idx = lp.topk(k, -1)
    return {"indices": idx, "log_probs": top.float(), "remainder": (1 - top.exp().sum(-1)).clamp_min(0).float()}


def align_rows(arrays: TeacherArrays, unit_ids: Tensor, known_ids: Tensor | None = None) -> Tensor:
    """The file row of each training unit: ``[N_train]`` row indices.

    :param unit_ids: ``[N_train]`` the training units' ids, in training-split order
    :param known_ids: ids of the data's other units (validation, test): rows for them are ignored, rows for an
        id in neither are an error
    """
    n, source = int(unit_ids.shape[0]), arrays.source
    m = arrays.num_rows
    if arrays.ids is None:
        if m != n:
            raise InputError(f"{source} has {m} rows but the training split has {n} units (row i is unit i; "
                             "store an 'ids' array to key rows by unit id)")
        return torch.arange(n)
    fids = arrays.ids.numpy()
    order = np.argsort(fids, kind="stable")
    srt = fids[order]
    dup = srt[1:][srt[1:] == srt[:-1]]
    if dup.size:
        raise InputError(f"{source}: {dup.size} duplicate unit id(s) in 'ids', first {int(dup[0])} "
                         f"({m} rows, {m - dup.size} distinct ids)")
    uids = unit_ids.cpu().numpy()
    known = uids if known_ids is None else np.concatenate([uids, known_ids.cpu().numpy()])
    unknown = fids[~np.isin(fids, known)]
    if unknown.size:
        raise InputError(f"{source}: {unknown.size} of its {m} unit id(s) are not in the data, first "
                         f"{int(unknown[0])} (the training split has {n} units, ids {int(uids.min())}.."
                         f"{int(uids.max())})")
    pos = np.searchsorted(srt, uids).clip(0, m - 1)
    found = srt[pos] == uids
    if not found.all():
        missing = uids[~found]
        raise InputError(f"{source} covers {int(found.sum())} of the {n} training units; {missing.size} missing, "
                         f"first id {int(missing[0])}")
    return torch.from_numpy(order[pos])


def teacher_table(arrays: TeacherArrays, unit_ids: Tensor, num_classes: int, known_ids: Tensor | None = None,
                  what: str = "the task") -> Tensor:
    """``[N_train, C]`` float32 logits (full) or reconstructed log-probabilities (top-k) for the training units.

    :param num_classes: the run's ``C``
    :param what: who fixes ``C``, for the error (``"the student"``, ``"the other teachers"``)
    """
    got = arrays.file_classes
    if arrays.seq_len is not None:
        raise InputError(f"{arrays.source} is a per-token [N, T, V] file (T = {arrays.seq_len}) but {what} has one "
                         "unit per example: give [N, C]")
    if got is not None and got != num_classes:
        raise InputError(f"{arrays.source} has {got} classes but {what} has {num_classes}")
    rows = align_rows(arrays, unit_ids, known_ids)
    if arrays.logits is not None:
        return arrays.logits.index_select(0, rows).contiguous()
    assert arrays.indices is not None and arrays.log_probs is not None
    rem = None if arrays.remainder is None else arrays.remainder.index_select(0, rows)
    return topk_log_probs(arrays.indices.index_select(0, rows), arrays.log_probs.index_select(0, rows), rem,
                          num_classes, arrays.source)


def token_table(arrays: TeacherArrays, unit_ids: Tensor, mask: Tensor, vocab: int,
                known_ids: Tensor | None = None) -> Tensor:
    """``[M, V]`` per-token logits (full) or rebuilt log-probabilities (top-k) of the ``M`` real training tokens, in
    the row-major order of ``mask`` (:mod:`metagate.teachers.sequence`'s packing), from an ``[N, T, V]`` file.

    :param mask: ``[N_train, T]`` the real (unpadded) target positions
    :param vocab: the task's target vocabulary size ``V``
    """
    src, (n, t) = arrays.source, tuple(mask.shape)
    if arrays.seq_len is None:
        raise InputError(f"{src} is [N, C] but the task is a sequence task: a teacher file holds per-token logits "
                         f"[N, T, V] = [{n}, {t}, {vocab}]")
    if arrays.seq_len != t:
        raise InputError(f"{src} has T = {arrays.seq_len} positions per unit but the task's padded target length "
                         f"is {t}")
    got = arrays.file_classes
    if got is not None and got != vocab:
        raise InputError(f"vocabulary mismatch: {src} has V = {got} target tokens but the task's (and the "
                         f"student's) target vocabulary has {vocab}")
    rows = align_rows(arrays, unit_ids, known_ids)
    keep = mask.to(rows.device)
    if arrays.logits is not None:
        return arrays.logits.index_select(0, rows)[keep].contiguous()
    assert arrays.indices is not None and arrays.log_probs is not None
    rem = None if arrays.remainder is None else arrays.remainder.index_select(0, rows)[keep]
    return topk_log_probs(arrays.indices.index_select(0, rows)[keep], arrays.log_probs.index_select(0, rows)[keep],
                          rem, vocab, src)


def file_logits(path: str | os.PathLike, unit_ids: Tensor, num_classes: int, known_ids: Tensor | None = None,
                what: str = "the task") -> Tensor:
    """``[N_train, C]`` logits of a teacher-logits file for the training units (:func:`teacher_table`)."""
    return teacher_table(read_teacher_file(path), unit_ids, num_classes, known_ids, what)
