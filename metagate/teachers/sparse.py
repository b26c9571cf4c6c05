"""A sparse top-k teacher bank for language models: per token, each teacher's top-k token ids and
log-probabilities plus its log-probability of the gold (next) token, never densified to ``[tokens, V]``.

Memory and disk are ``O(tokens * K * k)``: ``k`` ids (int32) and ``k`` log-probabilities (float32, or float16 /
bfloat16 on request) per token and teacher, one float32 gold log-probability, and the token itself (int32, to
check that a batch reads the positions the bank scored). A dense float16 bank would need ``2 * V`` bytes per
token and teacher (98 KB for ``V = 49,152``); measured in the README.

On disk one ``.safetensors`` file: the tensors ``tokens [N]``, ``offsets [S+1]``, ``ids [N, K, k]``,
``logprobs [N, K, k]``, ``gold [N, K]``, and metadata (``vocab_size``, ``k``, teacher names, ``tail``,
``fingerprint``). The fingerprint hashes the token sequences, ``k`` and every teacher's weights; a file
whose fingerprint does not match the data and teachers at hand is a :class:`~metagate.errors.StaleCacheError`,
never silently rebuilt or overwritten.

Position ``t`` of a sequence holds the teacher's distribution *after* reading tokens ``0..t``: the
prediction of token ``t + 1`` (``transformers``' causal convention; :func:`metagate.losses.gated_kd` with
``shift=True`` pairs it with label ``t + 1``). The gold log-probability at ``t`` is that of token ``t + 1``
(0 at a sequence's last position, which has no next token and no loss).

This module needs torch and safetensors only (not ``transformers``): a teacher is any module whose output
is logits ``[B, T, V]`` or has ``.logits``.

The bank protocol (:class:`~metagate.teachers.bank.TeacherBank`): the units are the ``N`` tokens; a batch's
rows (:meth:`SparseBank.lookup`, :meth:`SparseBank.unit_log_probs`) are rebuilt ``[n, K, V]`` from their
top-k entries with the tail spread uniformly; :attr:`SparseBank.token_index` maps (sequence, position) to a
row; :meth:`SparseBank.unit_right` reads each row's top-1 entry (its argmax). The whole-table reads,
:attr:`SparseBank.logits` and :meth:`SparseBank.log_probs` (``[N, K, V]``), are refused with an
:class:`~metagate.errors.InputError`: the gates that summarise the teachers over a whole split at setup
cannot run from a sparse bank.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagate.errors import InputError, StaleCacheError
from metagate.io import atomic_write_bytes, state_fingerprint
from metagate.losses import IGNORE_INDEX, SparseTeacher, sparse_log_probs_at
from metagate.teachers.bank import TeacherBank

__all__ = ["SparseBank", "score_sparse", "sparse_fingerprint", "cached_sparse_bank", "forward_logits"]

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def forward_logits(model: nn.Module, input_ids: Tensor, attention_mask: Tensor | None = None) -> Tensor:
    """``[B, T, V]`` logits of a causal LM (a ``transformers`` model's ``.logits``, or a plain module's output)."""
    out = model(input_ids=input_ids, attention_mask=attention_mask) if attention_mask is not None \
        else model(input_ids=input_ids)
    logits = getattr(out, "logits", out)
    if not torch.is_tensor(logits) or logits.ndim != 3:
        raise InputError(f"a teacher must return logits [B, T, V] (or an output with .logits), got "
                         f"{getattr(logits, 'shape', type(logits).__name__)}")
    return logits


def _as_sequences(input_ids: Tensor | Sequence[Tensor], attention_mask: Tensor | None) -> list[Tensor]:
    if torch.is_tensor(input_ids):
        if input_ids.ndim != 2:
            raise InputError(f"input_ids must be [S, T] or a list of 1-D sequences, got {tuple(input_ids.shape)}")
        if attention_mask is None:
            return [row for row in input_ids]
        return [row[m.bool()] for row, m in zip(input_ids, attention_mask)]
    seqs = [torch.as_tensor(s).reshape(-1) for s in input_ids]
    if any(s.numel() == 0 for s in seqs):
        raise InputError("a sequence to score is empty")
    return seqs


def sparse_fingerprint(sequences: Sequence[Tensor], teachers: Sequence[nn.Module], k: int) -> str:
    """SHA-256 (first 16 hex) of the token sequences, ``k`` and every teacher's weights."""
    h = hashlib.sha256()
    h.update(f"k={k};n={len(sequences)}".encode())
    for s in sequences:
        h.update(str(s.numel()).encode())
        h.update(s.to(torch.int64).contiguous().numpy().tobytes())
    for t in teachers:
        h.update(state_fingerprint(t).encode())
    return h.hexdigest()[:16]


@dataclass(eq=False)
class SparseBank(TeacherBank):
    """Top-k teacher distributions of ``S`` token sequences (``N`` tokens in all), ``K`` teachers; a
    :class:`~metagate.teachers.bank.TeacherBank` whose units are the tokens (see the module docstring).

    :param tokens: ``[N]`` int32, the sequences back to back
    :param offsets: ``[S+1]`` int64, sequence ``i`` is ``tokens[offsets[i]:offsets[i+1]]``
    :param ids: ``[N, K, k]`` int32 top-k token ids
    :param logprobs: ``[N, K, k]`` their log-probabilities (temperature 1)
    :param gold: ``[N, K]`` float32 the log-probability of the next token
    """

    tokens: Tensor
    offsets: Tensor
    ids: Tensor
    logprobs: Tensor
    gold: Tensor
    vocab_size: int
    names: list[str]
    fingerprint: str = ""
    tail: str = "bucket"

    @property
    def num_teachers(self) -> int:
        return int(self.ids.shape[1])

    @property
    def num_units(self) -> int:
        """``N``: the tokens held."""
        return int(self.tokens.numel())

    @property
    def num_classes(self) -> int:
        return int(self.vocab_size)

    # -- the bank protocol -------------------------------------------------------------------------------
    @property
    def logits(self) -> Tensor:  # type: ignore[override]
        raise InputError(f"a sparse top-k bank holds no [N, K, V] logits table (N = {self.num_units} tokens, "
                         f"V = {self.vocab_size}); a gate that reads the whole table at setup cannot run from it")

    def log_probs(self, tau: float) -> Tensor:
        raise InputError(f"a sparse top-k bank builds no [N, K, V] log-probability table (N = {self.num_units} "
                         f"tokens, V = {self.vocab_size}); read a batch's rows with unit_log_probs")

    @property
    def token_index(self) -> Tensor:  # type: ignore[override]
        """``[S, L]`` row of each (sequence, position), ``L`` the longest sequence; past a sequence's end
        the row ``N`` (no token: :meth:`lookup` gives it uniform teachers)."""
        lengths = self.offsets[1:] - self.offsets[:-1]
        pos = torch.arange(int(lengths.max()) if lengths.numel() else 0)
        idx = self.offsets[:-1].unsqueeze(1) + pos
        return torch.where(pos < lengths.unsqueeze(1), idx, torch.full_like(idx, self.num_units))

    def unit_log_probs(self, tau: float, ids: Tensor) -> Tensor:
        """``[n, K, V]`` log-probabilities at ``tau`` of token rows ``ids`` (1-D; row ``N`` is uniform),
        rebuilt from the top-k entries with the tail spread uniformly."""
        ids = torch.as_tensor(ids).reshape(-1).to(torch.int64).cpu()
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) > self.num_units):
            raise InputError(f"token rows reach {int(ids.max())} but the sparse bank holds {self.num_units} tokens")
        pad = ids == self.num_units
        safe = ids.clamp_max(max(self.num_units - 1, 0))
        te = SparseTeacher(self.ids[safe].to(torch.int64), self.logprobs[safe].float(), tail="uniform")
        out = sparse_log_probs_at(te, self.vocab_size, tau)
        return torch.where(pad.reshape(-1, 1, 1), torch.full_like(out, -math.log(self.vocab_size)), out)

    def lookup(self, ids: Tensor) -> Tensor:
        """``[n, K, V]`` logits of token rows ``ids``: the rebuilt log-probabilities at temperature 1."""
        return self.unit_log_probs(1.0, ids)

    def unit_right(self, clean_labels: Tensor) -> Tensor | None:
        """``[N, K]`` bool: each teacher's top-1 entry is the token's label (``clean_labels [N]``, the next
        token, ``-100`` where there is none: False there); ``None`` when the labels do not cover the tokens."""
        lab = clean_labels.reshape(-1).cpu()
        if lab.numel() != self.num_units:
            return None
        return (self.ids[:, :, 0].to(torch.int64) == lab.unsqueeze(1)) & (lab != IGNORE_INDEX).unsqueeze(1)

    def next_tokens(self) -> Tensor:
        """``[N]`` the token after each position, ``-100`` at each sequence's last (the labels of the rows)."""
        nxt = torch.cat([self.tokens[1:].to(torch.int64), torch.full((1,), IGNORE_INDEX)])
        nxt[(self.offsets[1:] - 1).clamp_min(0)] = IGNORE_INDEX
        return nxt

    def to(self, device: torch.device | str) -> SparseBank:
        """The bank's tensors on ``device`` (lookups return rows on the device of the batch they are asked for)."""
        device = torch.device(device)
        if self.ids.device == device:
            return self
        return SparseBank(*(t.to(device) for t in (self.tokens, self.offsets, self.ids, self.logprobs, self.gold)),
                          self.vocab_size, list(self.names), self.fingerprint, self.tail)

    @property
    def k(self) -> int:
        return int(self.ids.shape[2])

    @property
    def num_sequences(self) -> int:
        return int(self.offsets.numel() - 1)

    @property
    def nbytes(self) -> int:
        """Bytes of every tensor held (what the bank costs in memory; the file adds only its header)."""
        return sum(t.numel() * t.element_size() for t in (self.tokens, self.offsets, self.ids, self.logprobs, self.gold))

    def teachers(self, seq_ids: Tensor, input_ids: Tensor, attention_mask: Tensor | None = None) -> list[SparseTeacher]:
        """One :class:`~metagate.losses.SparseTeacher` ``[B, T, k]`` per teacher for a right-padded batch.

        :param seq_ids: ``[B]`` the batch's sequence indices into the bank
        :param input_ids: ``[B, T]`` the batch's tokens: the real ones (``attention_mask``, or the sequence's
            length) must be the bank's, else the bank was scored for other positions or another tokenizer
        """
        seq_ids = torch.as_tensor(seq_ids).reshape(-1).to(torch.int64).cpu()
        b, t = input_ids.shape
        if seq_ids.numel() != b:
            raise InputError(f"{seq_ids.numel()} sequence ids for a batch of {b} sequences")
        if seq_ids.numel() and (int(seq_ids.min()) < 0 or int(seq_ids.max()) >= self.num_sequences):
            raise InputError(f"sequence ids reach {int(seq_ids.max())} but the sparse bank holds "
                             f"{self.num_sequences} sequences")
        start, lengths = self.offsets[seq_ids], self.offsets[seq_ids + 1] - self.offsets[seq_ids]
        pos = torch.arange(t)
        real = pos.unsqueeze(0) < lengths.unsqueeze(1)
        if attention_mask is not None:
            n_real = attention_mask.sum(1).cpu()
            if not torch.equal(n_real, lengths.clamp_max(t)):
                bad = int((n_real != lengths.clamp_max(t)).nonzero()[0, 0])
                raise InputError(f"sequence {int(seq_ids[bad])} has {int(lengths[bad])} tokens in the sparse bank "
                                 f"but {int(n_real[bad])} in the batch (a bank scored for other token positions)")
        rows = (start.unsqueeze(1) + pos.clamp_max((lengths - 1).clamp_min(0).unsqueeze(1))).reshape(-1)
        want = torch.where(real, input_ids.cpu(), torch.zeros_like(input_ids.cpu()))
        have = torch.where(real, self.tokens[rows].reshape(b, t).to(want.dtype), torch.zeros_like(want))
        if not torch.equal(want, have):
            i, j = (want != have).nonzero()[0].tolist()
            raise InputError(f"sequence {int(seq_ids[i])} position {j}: the batch has token {int(want[i, j])}, "
                             f"the sparse bank scored {int(have[i, j])} (another tokenizer or other text)")
        dev = input_ids.device
        ids = self.ids[rows].reshape(b, t, self.num_teachers, self.k).to(dev, torch.int64)
        lp = self.logprobs[rows].reshape(b, t, self.num_teachers, self.k).to(dev, torch.float32)
        gold = self.gold[rows].reshape(b, t, self.num_teachers).to(dev)
        return [SparseTeacher(ids[:, :, j], lp[:, :, j], gold[:, :, j], self.tail) for j in range(self.num_teachers)]

    # -- disk --------------------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> None:
        """Write one ``.safetensors`` file atomically (a crash leaves any previous file intact)."""
        from safetensors.torch import save

        meta = {"vocab_size": str(self.vocab_size), "names": json.dumps(self.names), "fingerprint": self.fingerprint,
                "tail": self.tail, "format": "metagate-sparse-bank-1"}
        tensors = {"tokens": self.tokens, "offsets": self.offsets, "ids": self.ids, "logprobs": self.logprobs,
                   "gold": self.gold}
        atomic_write_bytes(path, save({k: v.contiguous().cpu() for k, v in tensors.items()}, metadata=meta))

    @classmethod
    def load(cls, path: str | os.PathLike, fingerprint: str | None = None) -> SparseBank:
        """Read a bank; with ``fingerprint``, a file made for other data or teachers is a StaleCacheError."""
        from safetensors import safe_open

        path = Path(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}  # noqa: SIM118 - safe_open has no iter
        except Exception as e:  # safetensors raises its own error types on a bad header
            raise InputError(f"{path} is not a sparse teacher bank (safetensors): {e}") from e
        need = {"tokens", "offsets", "ids", "logprobs", "gold"}
        if meta.get("format") != "metagate-sparse-bank-1" or not need <= set(tensors):
            raise InputError(f"{path} is not a metagate sparse teacher bank (tensors {sorted(tensors)})")
        if fingerprint is not None and meta.get("fingerprint") != fingerprint:
            raise StaleCacheError(f"stale sparse bank {path}: it was scored for fingerprint {meta.get('fingerprint')}, "
                                  f"the current text and teachers give {fingerprint}; move it away to rescore")
        bank = cls(tensors["tokens"], tensors["offsets"], tensors["ids"], tensors["logprobs"], tensors["gold"],
                   int(meta["vocab_size"]), json.loads(meta["names"]), meta.get("fingerprint", ""),
                   meta.get("tail", "bucket"))
        n = bank.tokens.numel()
        if bank.ids.shape[0] != n or bank.logprobs.shape != bank.ids.shape or bank.gold.shape != bank.ids.shape[:2] \
                or int(bank.offsets[-1]) != n:
            raise InputError(f"{path}: inconsistent sparse bank shapes (tokens {n}, ids {tuple(bank.ids.shape)}, "
                             f"logprobs {tuple(bank.logprobs.shape)}, gold {tuple(bank.gold.shape)})")
        return bank


@torch.no_grad()
def score_sparse(
    teachers: Sequence[nn.Module],
    input_ids: Tensor | Sequence[Tensor],
    k: int,
    names: Sequence[str] | None = None,
    attention_mask: Tensor | None = None,
    batch_size: int = 8,
    tail: str = "bucket",
    logprob_dtype: str = "float32",
    vocab_size: int | None = None,
) -> SparseBank:
    """Run each teacher once over the sequences and keep its top-k per token (one batch at a time: the
    dense ``[batch, T, V]`` logits of one batch exist only while it is scored).

    :param teachers: causal LMs (``transformers`` or plain modules returning ``[B, T, V]`` logits), in eval mode
    :param input_ids: ``[S, T]`` (with ``attention_mask`` for right padding) or a list of 1-D token sequences
    :param k: entries kept per token, ``1 <= k < V``
    :param vocab_size: the student's vocabulary size, when known: a teacher with another is an error naming both
    """
    if logprob_dtype not in _DTYPES:
        raise InputError(f"logprob_dtype must be one of {sorted(_DTYPES)}, got {logprob_dtype!r}")
    if tail not in ("bucket", "uniform"):
        raise InputError(f"tail must be 'bucket' or 'uniform', got {tail!r}")
    if not teachers:
        raise InputError("score_sparse needs at least one teacher")
    names = list(names) if names is not None else [f"teacher{j}" for j in range(len(teachers))]
    if len(names) != len(teachers):
        raise InputError(f"{len(names)} names for {len(teachers)} teachers")
    seqs = _as_sequences(input_ids, attention_mask)
    lengths = torch.tensor([s.numel() for s in seqs], dtype=torch.int64)
    offsets = torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])
    n = int(offsets[-1])
    n_teachers = len(teachers)
    ids = logprobs = None
    gold = torch.zeros(n, n_teachers)
    vocab = vocab_size
    for j, teacher in enumerate(teachers):
        device = next(iter(teacher.parameters()), torch.empty(0)).device
        for i in range(0, len(seqs), batch_size):
            chunk = seqs[i : i + batch_size]
            t = max(s.numel() for s in chunk)
            x = torch.zeros(len(chunk), t, dtype=torch.int64)
            m = torch.zeros(len(chunk), t, dtype=torch.int64)
            for r, s in enumerate(chunk):
                x[r, : s.numel()], m[r, : s.numel()] = s, 1
            logp = F.log_softmax(forward_logits(teacher, x.to(device), m.to(device)).float(), -1).cpu()
            v = logp.shape[-1]
            if vocab is None:
                vocab = v
            if v != vocab:
                who = "the student" if vocab_size is not None else "the first teacher"
                raise InputError(f"vocabulary mismatch: teacher {names[j]!r} has V = {v} tokens, {who} V = {vocab} "
                                 "(distillation needs one tokenizer)")
            if not 1 <= k < v:
                raise InputError(f"top-k needs 1 <= k < V: got k = {k} for a vocabulary of V = {v} (k >= V is the "
                                 "dense teacher; pass its logits instead)")
            if ids is None:
                ids = torch.zeros(n, n_teachers, k, dtype=torch.int32)
                logprobs = torch.zeros(n, n_teachers, k, dtype=_DTYPES[logprob_dtype])
            top_v, top_i = logp.topk(k, -1)
            nxt = torch.cat([x[:, 1:], torch.zeros_like(x[:, :1])], 1)
            g = logp.gather(-1, nxt.unsqueeze(-1)).squeeze(-1)
            for r, s in enumerate(chunk):
                lo, length = int(offsets[i + r]), s.numel()
                ids[lo : lo + length, j] = top_i[r, :length].to(torch.int32)
                logprobs[lo : lo + length, j] = top_v[r, :length].to(logprobs.dtype)
                gold[lo : lo + length - 1, j] = g[r, : length - 1]
    assert ids is not None and logprobs is not None and vocab is not None
    return SparseBank(torch.cat(seqs).to(torch.int32), offsets, ids, logprobs, gold, int(vocab), names,
                      sparse_fingerprint(seqs, teachers, k), tail)


def cached_sparse_bank(
    path: str | os.PathLike,
    teachers: Sequence[nn.Module],
    input_ids: Tensor | Sequence[Tensor],
    k: int,
    **score_options,
) -> SparseBank:
    """The bank at ``path`` if it was scored for these sequences, teachers and ``k``; scored and saved there
    when the file does not exist. A file for other data is a StaleCacheError (it is the user's: never
    overwritten)."""
    path = Path(path)
    seqs = _as_sequences(input_ids, score_options.get("attention_mask"))
    if path.exists():
        return SparseBank.load(path, fingerprint=sparse_fingerprint(seqs, teachers, k))
    bank = score_sparse(teachers, input_ids, k, **score_options)
    bank.save(path)
    return bank
