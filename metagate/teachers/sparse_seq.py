"""The sparse top-k bank in the shared loop: a language-modelling task's teachers, scored once into a
:class:`~metagate.teachers.sparse.SparseBank` and read by the core :class:`~metagate.trainer.Trainer` per token.

The shared loop asks a sequence bank for the ``[B * L, K, V]`` rows of a batch's *example* ids
(:class:`~metagate.teachers.sequence.SeqTeacherBank`'s protocol); :class:`SeqSparseBank` maps each (example,
position) to its sparse-bank row through ``token_index [N_train, L]`` and rebuilds those rows alone from their
top-k entries, so no ``[tokens, V]`` table exists (at ``V = 49,152`` a dense float16 bank of the lm task's
training text would take about 9 GB per teacher).

The sparse bank scores the training inputs ``x`` (the right-padded rows, id 0 padding); its position ``t``
holds the teacher's prediction of the token after ``x[t]``: the unit ``y[t]``.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor, nn

from metagate.errors import InputError
from metagate.losses import SparseTeacher, sparse_log_prob_of, uniform_tail_kl, uniform_tail_log_probs
from metagate.teachers.bank import TeacherBank, rows
from metagate.teachers.sparse import SparseBank, cached_sparse_bank
from metagate.units import PAD_ID

#: top-k entries compared at once when the teachers' mean distribution's top class is sought (memory bound)
_TOP_CHUNK = 1 << 22


class SeqSparseBank(TeacherBank):
    """A :class:`SparseBank` over the training examples' tokens, looked up by example id.

    :param sparse: the bank of the ``N_train`` training rows (sequence ``i`` = the real tokens of ``x[i]``)
    :param token_index: ``[N_train, L]`` sparse-bank row of each (example, position); padding: ``sparse.num_units``
    :param taus: per teacher, a temperature its rows are read at on top of the asked one (the calibrated
        teachers, :func:`~metagate.teachers.build.calibrated_bank`); ``None``: 1
    """

    whole_table = False
    closed_form_kd = True

    def __init__(self, sparse: SparseBank, token_index: Tensor, taus: list[float] | None = None) -> None:
        self.sparse = sparse
        self.token_index = token_index.cpu()
        self.names = list(sparse.names)
        self.taus = taus
        self._next: Tensor | None = None

    @property
    def logits(self) -> Tensor:  # type: ignore[override]
        return self.sparse.logits  # raises: no whole table

    def log_probs(self, tau: float) -> Tensor:
        return self.sparse.log_probs(tau)  # raises: no whole table

    @property
    def num_units(self) -> int:
        return int(self.token_index.shape[0])

    @property
    def num_teachers(self) -> int:
        return self.sparse.num_teachers

    @property
    def num_classes(self) -> int:
        return self.sparse.num_classes

    def _rows(self, ids: Tensor) -> Tensor:
        return rows(self.token_index, ids.cpu()).reshape(-1)

    def lookup(self, ids: Tensor) -> Tensor:
        """``[B * L, K, V]`` logits (the rebuilt log-probabilities at temperature 1) of examples ``ids``."""
        return self.unit_log_probs(1.0, ids)

    def unit_log_probs(self, tau: float, ids: Tensor) -> Tensor:
        """``[B * L, K, V]`` log-probabilities at ``tau`` of examples ``ids``' tokens (padding: uniform)."""
        r = self._rows(ids)
        if self.taus is None:
            return self.sparse.unit_log_probs(tau, r).to(ids.device)
        return torch.stack([self.sparse.unit_log_probs(tau * t, r)[:, j] for j, t in enumerate(self.taus)],
                           1).to(ids.device)

    def _top_k_rows(self, ids: Tensor, device: torch.device | str, real: Tensor | None = None
                    ) -> tuple[Tensor, Tensor, list[tuple[Tensor, Tensor, float]]]:
        """The stored entries of the token units of examples ``ids`` (their rows ``real`` only, when given):
        ``(padding [n] bool, the sparse-bank row of each unit (padding: the last row) [n], per teacher its top-k
        ids [n, k] int64 and log-probabilities [n, k] float32 on ``device`` and its own temperature)``."""
        r = self._rows(ids)
        if real is not None:
            r = r[real.cpu()]
        n_tok = self.sparse.num_units
        safe = r.clamp_max(max(n_tok - 1, 0))
        per_teacher = [(self.sparse.ids[safe, j].to(device=device, dtype=torch.int64),
                        self.sparse.logprobs[safe, j].to(device=device, dtype=torch.float32), self._tau(j))
                       for j in range(self.num_teachers)]
        return (r >= n_tok).to(device), safe, per_teacher

    def unit_kd(self, ids: Tensor, log_q: Tensor, tau: float, real: Tensor | None = None) -> Tensor:
        """``[n, K]`` each teacher's ``KL(p_tau || q)`` in closed form from its top-k entries (the uniform-tail
        rebuild of :meth:`unit_log_probs`, equal to the KL against those rows without building them; a
        calibrated teacher at ``tau`` times its own temperature); padding rows: the uniform teacher's."""
        pad, _, per_teacher = self._top_k_rows(ids, log_q.device, real)
        kl = torch.stack([uniform_tail_kl(log_q, top, lp, tau * t) for top, lp, t in per_teacher], 1)
        if bool(pad.any()):  # KL(uniform || q) = -log V - mean log q
            uniform = -math.log(self.num_classes) - log_q.mean(-1)
            kl = torch.where(pad.unsqueeze(1), uniform.unsqueeze(1), kl)
        return kl

    def unit_teacher_features(self, ids: Tensor, log_ps: Tensor, labels: Tensor) -> Tensor:
        """``[n, K, 6]`` the teacher columns of :func:`metagate.features.unit_features` for the token units of
        examples ``ids`` against the student's float32 log-probabilities ``log_ps [n, V]``, from the top-k entries
        (:func:`~metagate.features.uniform_tail_teacher_features`; a calibrated teacher at its own temperature);
        padding rows: the uniform teacher's, as on the rebuilt rows."""
        from metagate.features import FEATURE_HIGH, uniform_tail_teacher_features

        v = self.num_classes
        pad, _, per_teacher = self._top_k_rows(ids, log_ps.device)
        out = torch.stack([uniform_tail_teacher_features(log_ps, top, lp, labels, t) for top, lp, t in per_teacher], 1)
        if bool(pad.any()):  # the uniform teacher: confidence and p(label) 1/V, entropy and CE 1, argmax token 0
            log_v = math.log(v)
            kl = ((-log_v - log_ps.mean(-1)) / log_v).clamp(0, FEATURE_HIGH)
            agree = (labels.clamp_min(0) == 0).float()
            one = torch.ones_like(kl)
            uni = torch.stack([one / v, one / v, one, one, kl, agree], -1).unsqueeze(1)
            out = torch.where(pad.view(-1, 1, 1), uni, out)
        return out

    def _tau(self, j: int) -> float:
        return 1.0 if self.taus is None else float(self.taus[j])

    def unit_label_probs(self, ids: Tensor, labels: Tensor) -> Tensor:
        """``[n, K]`` each teacher's probability (temperature 1; a calibrated bank's own) of the label of each
        token unit of examples ``ids``: :meth:`unit_token_log_probs` of the labels."""
        return self.unit_token_log_probs(ids, labels).exp()

    def unit_token_log_probs(self, ids: Tensor, tokens: Tensor, tau: float = 1.0) -> Tensor:
        """``[n, K]`` each teacher's log-probability at ``tau`` (a calibrated bank: times its own) of one token per
        token unit of examples ``ids``: the stored gold log-probability where the token is the next token the
        bank scored (exact), else the token's value in the uniform-tail rebuild (its top-k entry, or the tail);
        ``-log V`` on padding. ``O(n K k)``: no ``[n, V]`` row is built."""
        pad, safe, per_teacher = self._top_k_rows(ids, "cpu")
        lab = tokens.reshape(-1).cpu().to(torch.int64)
        if lab.numel() != pad.numel():
            raise InputError(f"{lab.numel()} tokens for {pad.numel()} token units")
        if self._next is None:
            self._next = self.sparse.next_tokens()
        gold = ~pad & (self._next[safe] == lab)
        cols = []
        for j, (top, lp, t) in enumerate(per_teacher):
            te = SparseTeacher(top, lp, self.sparse.gold[safe, j].float(), "uniform")
            cols.append(sparse_log_prob_of(te, self.num_classes, lab, tau * t, gold=gold))
        out = torch.stack(cols, 1).masked_fill(pad.unsqueeze(1), -math.log(self.num_classes))
        return out.to(tokens.device)

    def unit_ensemble_top(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """``([n], [n])`` the top probability of the teachers' mean distribution and its token (the smallest id
        on a tie) per token unit of examples ``ids``, from the top-k entries alone: every teacher gives a token
        outside its top-k its tail value, so the top is one of the ``K k`` stored ids (padding: ``1 / V``, 0)."""
        r = self._rows(ids)
        n_tok, k, kk = self.sparse.num_units, self.sparse.k, self.num_teachers
        size = max(1, _TOP_CHUNK // (kk * kk * k))
        vals, tops = [], []
        for a in range(0, r.numel(), size):
            part = r[a : a + size]
            pad = part >= n_tok
            safe = part.clamp_max(max(n_tok - 1, 0))
            top_ids = self.sparse.ids[safe].to(torch.int64)  # [n, K, k]
            cand = top_ids.reshape(-1, kk * k)  # every teacher's top-k: the candidates
            cols = []
            for j in range(kk):
                t, u = uniform_tail_log_probs(self.sparse.logprobs[safe, j].float(), self.num_classes, self._tau(j))
                sorted_ids, order = top_ids[:, j].sort(-1)
                pos = torch.searchsorted(sorted_ids, cand).clamp_max(k - 1)  # where a candidate sits in teacher j's
                hit = sorted_ids.gather(1, pos) == cand
                cols.append(torch.where(hit, t.exp().gather(1, order).gather(1, pos), u.exp().unsqueeze(1)))
            score = torch.stack(cols, -1).mean(-1)  # [n, K k] the teachers' mean probability of each candidate
            best = score.max(1, keepdim=True).values
            tok = torch.where(score == best, cand, torch.full_like(cand, self.num_classes)).min(1).values
            vals.append(torch.where(pad, 1.0 / self.num_classes, best.squeeze(1)).float())
            tops.append(torch.where(pad, torch.zeros_like(tok), tok))
        return torch.cat(vals).to(ids.device), torch.cat(tops).to(ids.device)

    def unit_right(self, clean_labels: Tensor) -> Tensor:
        """``[N_train * L, K]`` bool: each teacher's top-1 entry is the clean label (False on padding)."""
        idx = self.token_index.reshape(-1)
        safe = idx.clamp_max(max(self.sparse.num_units - 1, 0))
        top = self.sparse.ids[safe, :, 0].to(torch.int64)
        lab = clean_labels.reshape(-1, 1).cpu()
        return (top == lab) & (lab != PAD_ID) & (idx < self.sparse.num_units).unsqueeze(1)

    def to(self, device: torch.device | str) -> SeqSparseBank:  # noqa: ARG002 - the protocol's signature
        """The same bank: its tensors stay on the CPU and a batch's rows are moved to the batch's device."""
        return self


def training_sequences(x: Tensor) -> tuple[list[Tensor], Tensor]:
    """The real tokens of each right-padded row of ``x [N, L]`` (id 0 is padding; a row's real tokens come
    first) and ``token_index [N, L]`` of their packing."""
    real = x != PAD_ID
    lengths = real.sum(1)
    if not torch.equal(real, torch.arange(x.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)):
        raise InputError("a training row has padding (id 0) before a real token; the sparse bank needs "
                         "right-padded rows")
    offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    n = int(offsets[-1])
    idx = torch.where(real, offsets[:-1].unsqueeze(1) + torch.arange(x.shape[1]), torch.full_like(x, n))
    return [row[m] for row, m in zip(x, real)], idx


def sparse_bank_file(names: Sequence[str], k: int) -> str:
    """The cache file name of the sparse bank of teachers ``names`` at top-``k``."""
    return f"sparse-{'+'.join(names)}-top{k}.safetensors"


def sparse_seq_bank(teachers: Sequence[nn.Module], names: Sequence[str], x: Tensor, k: int,
                    path: str | os.PathLike | None = None, batch_size: int = 8) -> SeqSparseBank:
    """The teachers' top-``k`` bank of the training inputs ``x [N, L]``: read from ``path`` when it was scored
    for these inputs, teachers and ``k``, else scored (and saved at ``path``); a file for other inputs or
    teachers is a :class:`~metagate.errors.StaleCacheError`."""
    seqs, index = training_sequences(x)
    if path is None:
        from metagate.teachers.sparse import score_sparse

        sparse = score_sparse(list(teachers), seqs, k, names=list(names), batch_size=batch_size, tail="uniform")
    else:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        sparse = cached_sparse_bank(path, list(teachers), seqs, k, names=list(names), batch_size=batch_size,
                                    tail="uniform")
    return SeqSparseBank(sparse, index)
