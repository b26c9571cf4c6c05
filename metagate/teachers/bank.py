"""The teacher bank: frozen teachers' logits for the training units, looked up by unit id.

:class:`TeacherBank` is the base every bank derives from, and its class docstring is the bank protocol: what
the trainer and the gates may read of any bank, with the optional features (per-token index, online columns,
right/wrong diagnostics) declared there with their defaults instead of probed with ``hasattr``. This module
sits below the trainer (it imports nothing of it); building a bank lives in :mod:`metagate.teachers.build`,
its disk cache in :mod:`metagate.teachers.cache`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from metagate.checks import check_finite
from metagate.diagnostics import teacher_right

if TYPE_CHECKING:  # pragma: no cover
    from metagate.calibration import TeacherCalibration


class TeacherBank:
    """Frozen teachers' logits for the training units, looked up by unit id; the bank protocol.

    Every bank answers:

    * ``names``, :attr:`num_units` (training examples covered), :attr:`num_teachers` ``K``,
      :attr:`num_classes` ``C`` (``V`` for a sequence task);
    * :meth:`lookup` and :meth:`unit_log_probs`: the ``[B, K, C]`` rows of a batch's unit ids (the step's
      path: every gate reads the teachers of a batch through these);
    * :meth:`to`: the bank on a device.

    Optional features, declared here with the value a bank without them has:

    * :attr:`token_index`: ``[N_train, L]`` row of each (example, position) for a per-token bank (a sequence
      task, :class:`~metagate.teachers.sequence.SeqTeacherBank`); ``None`` for a per-example bank;
    * :attr:`online` and :meth:`set_step`: ``True`` for a bank whose teachers run on each step's inputs
      (:class:`~metagate.teachers.online.OnlineBank`); the trainer hands every bank each step's inputs, and
      a cached bank ignores them;
    * :meth:`unit_right`: each teacher's per-unit correctness against the clean labels (ground truth for the
      diagnostics only; ``None`` when the bank cannot say);
    * :attr:`closed_form_kd` with :meth:`unit_kd`, :meth:`unit_token_log_probs` and :meth:`unit_teacher_features`:
      a bank that answers the step's KD columns, one token's log-probability per unit and the unit features
      without its ``[n, K, V]`` rows (the sparse top-k bank); ``False``, and the three raise, for every other;
    * :attr:`reliability`: the ``[K, C]`` held-out reliability table (``None``: unmeasured).

    Whole-split reads, :attr:`logits` ``[N, K, C]`` and :meth:`log_probs` (one table per temperature), serve
    gates that summarise the teachers over the training split at setup (the temperature gate's state,
    Meta-Weight-Net features, the hard gate's constant gold path) and the default :meth:`unit_right`. The
    per-unit summaries :meth:`unit_label_probs` (each teacher's probability of the label) and
    :meth:`unit_ensemble_top` (the teachers' mean distribution's top class) serve the rule baselines and the
    oracle rows; they read the bank a chunk of examples at a time. The sparse top-k bank
    (:class:`~metagate.teachers.sparse_seq.SeqSparseBank`, large vocabularies; :attr:`whole_table` False)
    never materialises ``[N, V]``: it implements the counts, :meth:`lookup` / :meth:`unit_log_probs` (a batch's
    ``[n, K, V]`` rows rebuilt from its stored top-k entries), the two summaries from its top-k entries and gold
    log-probabilities, :meth:`to`, :attr:`token_index` and :meth:`unit_right` (its top-1 entry is a row's
    argmax), and raises a clear error from :attr:`logits` / :meth:`log_probs` for the gates that need the
    whole table.

    :param logits: ``[N, K, C]``
    :param names: ``K`` teacher names
    """

    #: per-token banks: ``[N_train, L]`` row of each (example, position); ``None``: one unit per example
    token_index: Tensor | None = None
    #: the teachers run on each step's inputs (:meth:`set_step`); ``False``: logits cached for fixed inputs
    online: bool = False
    #: the teachers' temperature fit on the clean ``meta`` split (``teachers.build.fit_teacher_temperatures``)
    calibration: TeacherCalibration | None = None
    #: the logits are the calibrated teachers' (``teachers.build.calibrated_bank``): read them at temperature 1
    calibrated: bool = False
    #: :attr:`logits` / :meth:`log_probs` can be read (``False``: a sparse top-k bank, batch rows and summaries only)
    whole_table: bool = True
    #: :meth:`unit_kd` gives the KD columns in closed form (the step then never reads :meth:`unit_log_probs`)
    closed_form_kd: bool = False
    #: ``[K, C]`` P(teacher right | teacher predicts c) on the clean ``meta`` split
    #: (:func:`metagate.features.teacher_reliability`; set by ``teachers.build.fit_teacher_temperatures`` when every
    #: teacher has logits on ``meta``); ``None``: unmeasured
    reliability: Tensor | None = None

    def __init__(self, logits: Tensor, names: list[str]) -> None:
        if logits.ndim != 3:
            raise ValueError(f"teacher logits must be [N, K, C], got {tuple(logits.shape)}")
        check_finite("teacher logits", logits)
        self.logits, self.names = logits, list(names)
        self._log_probs: dict[float, Tensor] = {}

    @property
    def num_units(self) -> int:
        return int(self.logits.shape[0])

    @property
    def num_teachers(self) -> int:
        return int(self.logits.shape[1])

    @property
    def num_classes(self) -> int:
        return int(self.logits.shape[2])

    def lookup(self, ids: Tensor) -> Tensor:
        """``[B, K, C]`` logits of units ``ids``."""
        return rows(self.logits, ids)

    def log_probs(self, tau: float) -> Tensor:
        """``[N, K, C]`` ``log_softmax(logits / tau)``, computed once per temperature."""
        lp = self._log_probs.get(float(tau))
        if lp is None:
            lp = self._log_probs[float(tau)] = torch.log_softmax(self.logits / float(tau), -1)
        return lp

    def unit_log_probs(self, tau: float, ids: Tensor) -> Tensor:
        """``[B, K, C]`` log-probabilities at ``tau`` of units ``ids`` (a sequence bank flattens its tokens)."""
        return rows(self.log_probs(tau), ids)

    def unit_kd(self, ids: Tensor, log_q: Tensor, tau: float, real: Tensor | None = None) -> Tensor:
        """``[n, K]`` ``KL(p_k,tau || q)`` of each teacher against the student's log-probabilities ``log_q``
        ``[n, V]`` in closed form, without building ``[n, K, V]``; read only when :attr:`closed_form_kd` is set
        (the sparse top-k bank), else the step reads :meth:`unit_log_probs`. ``real``: the rows of the units of
        examples ``ids`` that ``log_q`` holds (``None``: all)."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-form KD columns (closed_form_kd is False)")

    def unit_token_log_probs(self, ids: Tensor, tokens: Tensor, tau: float = 1.0) -> Tensor:
        """``[n, K]`` each teacher's log-probability at ``tau`` of one token per unit of examples ``ids``
        (``tokens``: flattened in the units' order), without building ``[n, K, V]``; read only when
        :attr:`closed_form_kd` is set (HKD's gauge on the sparse top-k bank), else gates read :meth:`unit_log_probs`."""
        raise NotImplementedError(f"{type(self).__name__} reads no single tokens (closed_form_kd is False)")

    def unit_teacher_features(self, ids: Tensor, log_ps: Tensor, labels: Tensor) -> Tensor:
        """``[n, K, 6]`` the teacher columns of :func:`metagate.features.unit_features` of the units of examples
        ``ids`` against the student's float32 log-probabilities ``log_ps [n, V]``, without building ``[n, K, V]``;
        read only when :attr:`closed_form_kd` is set, else the features read :meth:`lookup`'s rows."""
        raise NotImplementedError(f"{type(self).__name__} has no closed-form unit features (closed_form_kd is False)")

    def unit_label_probs(self, ids: Tensor, labels: Tensor) -> Tensor:
        """``[n, K]`` each teacher's probability (temperature 1, or the calibrated bank's own) of the label of
        each unit of examples ``ids`` (``labels``: their ``[B]`` labels, or ``[B, L]`` tokens, flattened in
        the units' order), read from the whole table a chunk of examples at a time."""
        out = []
        for part, lab in _chunks(self, ids, labels):
            probs = self._table_rows(part).exp()
            lab = lab.reshape(-1).to(probs.device)
            out.append(probs.gather(2, lab.view(-1, 1, 1).expand(-1, probs.shape[1], 1)).squeeze(2))
        return torch.cat(out).to(labels.device)

    def unit_ensemble_top(self, ids: Tensor) -> tuple[Tensor, Tensor]:
        """``([n], [n])`` the top probability of the teachers' mean distribution (temperature 1) and its class
        (the first on a tie), per unit of examples ``ids``, a chunk of examples at a time."""
        vals, tops = [], []
        for part, _ in _chunks(self, ids, ids):
            mean = self._table_rows(part).exp().mean(1)
            top = mean.argmax(-1)
            vals.append(mean.gather(1, top.unsqueeze(1)).squeeze(1))
            tops.append(top)
        return torch.cat(vals).to(ids.device), torch.cat(tops).to(ids.device)

    def _table_rows(self, ids: Tensor) -> Tensor:
        """``[n, K, C]`` rows of :meth:`log_probs` at temperature 1 for the units of examples ``ids``."""
        lp = self.log_probs(1.0)
        if self.token_index is None:
            return rows(lp, ids.to(lp.device))
        return lp.index_select(0, rows(self.token_index, ids.to(self.token_index.device)).reshape(-1).to(lp.device))

    def set_step(self, x: Tensor, ids: Tensor) -> None:
        """The inputs ``x`` of the step's units ``ids``, before the gate looks (an online bank runs its teachers
        on them; cached logits do not depend on them)."""

    def unit_right(self, clean_labels: Tensor) -> Tensor | None:
        """``[N_train, K]`` bool: each teacher's top class is the unit's clean label; ``None`` when the labels
        do not cover the bank's units."""
        if self.logits.shape[0] != clean_labels.shape[0]:
            return None
        return teacher_right(self.logits, clean_labels)

    def to(self, device: torch.device | str) -> TeacherBank:
        """The bank on ``device``; on CUDA, when the logits do not fit (:func:`fits_on_gpu`), a
        :class:`HostBank` in pinned CPU memory serving lookups on the GPU."""
        device = torch.device(device)
        if self.logits.device == device:
            return self
        out = HostBank(self.logits, self.names, device) if device.type == "cuda" and not fits_on_gpu(
            self.logits, device) else TeacherBank(self.logits.to(device), self.names)
        out.reliability = self.reliability
        return out


def fits_on_gpu(t: Tensor, device: torch.device, share: float = 0.25) -> bool:
    """Whether ``t`` and one per-temperature log-probability copy of it take at most ``share`` of the GPU's free
    memory (the student, its activations and the optimizer need the rest)."""
    free, _ = torch.cuda.mem_get_info(device)
    return 2 * t.numel() * t.element_size() <= share * free


class HostBank(TeacherBank):
    """Teacher logits too large for the GPU: kept in pinned CPU memory, the rows of a batch gathered on the CPU
    and copied to ``device`` asynchronously."""

    def __init__(self, logits: Tensor, names: list[str], device: torch.device) -> None:
        super().__init__(logits.cpu().pin_memory(), names)
        self.device = device

    def lookup(self, ids: Tensor) -> Tensor:
        return rows(self.logits, ids.cpu()).pin_memory().to(self.device, non_blocking=True)

    def unit_log_probs(self, tau: float, ids: Tensor) -> Tensor:
        return rows(self.log_probs(tau), ids.cpu()).pin_memory().to(self.device, non_blocking=True)

    def to(self, device: torch.device | str) -> TeacherBank:
        return self if torch.device(device) == self.device else TeacherBank(self.logits, self.names).to(device)


#: elements (units x teachers x classes) of the probability rows one chunk of a per-unit summary may hold
SUMMARY_CHUNK = 1 << 24


def _chunks(bank: TeacherBank, ids: Tensor, labels: Tensor) -> list[tuple[Tensor, Tensor]]:
    """``ids`` and their ``labels`` cut into chunks whose rows hold at most :data:`SUMMARY_CHUNK` elements (one
    chunk for every classification split of this project: its decisions are those of the whole table)."""
    per_example = (1 if bank.token_index is None else int(bank.token_index.shape[1])) * bank.num_teachers \
        * bank.num_classes
    size = max(1, SUMMARY_CHUNK // max(per_example, 1))
    return [(ids[a : a + size], labels[a : a + size]) for a in range(0, int(ids.shape[0]), size)]


def rows(table: Tensor, ids: Tensor) -> Tensor:
    """``table[ids]``; ``index_select`` for 1-D ids (several times faster than advanced indexing on CPU)."""
    return table.index_select(0, ids) if ids.ndim == 1 else table[ids]


@torch.no_grad()
def teacher_logits(teacher: nn.Module, x: Tensor, device: torch.device | str = "cpu",
                   batch_size: int = 1024) -> Tensor:
    """``[N, C]`` logits of a frozen teacher in eval mode (CPU result)."""
    teacher.eval().to(device)
    return torch.cat([teacher(x[i : i + batch_size].to(device)).float().cpu() for i in range(0, len(x), batch_size)])
