"""Non-learned rules for the jobs the learned gates do -- the baselines a learned gate must beat.

* ``label-filter`` (noisy labels): the label weight is cut to 0 where the teacher ensemble's top class
  disagrees with the label, the unit then learns from the teachers alone;
* ``best-teacher`` (several teachers): all KD weight on the one teacher with the best accuracy on ``select``
  (``metagate compare`` picks it from the teachers' ``select`` accuracy);
* ``conf-teachers`` (several teachers): each teacher weighted by its probability of the label,
  ``w_k = (1 - alpha) p_k(y) / sum_j p_j(y)`` (the softmax over teachers of ``-CE(t_k, y)``). This is *not*
  CA-MKD: the two agree only for two teachers (for ``p(y) = (.9, .05, .05)`` it gives ``(.9, .05, .05)``,
  CA-MKD ``(.49, .26, .26)``);
* ``ca-mkd`` (several teachers): confidence-aware multi-teacher KD as published (Zhang, Chen and Wang,
  ICASSP 2022), see :class:`CAMKDGate`.

Each is a constant per training unit (a token on a sequence task): computed once in :meth:`setup` from two
per-unit summaries of the teacher bank and the (noisy) training labels, one row gather per step. The
summaries (:class:`RuleInputs`: each teacher's probability of the label, the top class of the teachers' mean
distribution) are read from the bank a chunk of examples at a time
(:meth:`~metagate.teachers.bank.TeacherBank.unit_label_probs`, :meth:`~metagate.teachers.bank.TeacherBank.unit_ensemble_top`),
so a sparse top-k bank (the ``lm`` task) serves them from its top-k entries and gold log-probabilities
without a ``[tokens, V]`` table; the same rules run per batch on probability rows (:meth:`_TableGate.table`,
``GatedKDTrainer``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from metagate.errors import ConfigError
from metagate.gates.base import Gate, GateConfig, GateContext, GateOutput, UnitView
from metagate.gates.fixed import KDMixConfig
from metagate.gates.registry import register
from metagate.options import option

if TYPE_CHECKING:  # pragma: no cover
    from metagate.teachers.bank import TeacherBank


class RuleInputs:
    """What a rule reads of ``n`` units' teachers at temperature 1, each computed on first use:
    :attr:`label_probs` ``[n, K]`` each teacher's probability of the unit's label and :attr:`ensemble_top`
    ``[n]`` the top class of the teachers' mean distribution (the first on a tie).

    :param labels: ``[n]`` the units' (noisy) labels
    :param num_teachers: ``K``
    :param dtype: the dtype the rows are built in (the probabilities')
    """

    def __init__(self, labels: Tensor, num_teachers: int, dtype: torch.dtype,
                 label_probs: Callable[[], Tensor], ensemble_top: Callable[[], Tensor]) -> None:
        self.labels, self.num_teachers, self.dtype = labels, num_teachers, dtype
        self._label_probs_fn, self._ensemble_top_fn = label_probs, ensemble_top

    @property
    def num_units(self) -> int:
        return int(self.labels.shape[0])

    @property
    def device(self) -> torch.device:
        return self.labels.device

    @cached_property
    def label_probs(self) -> Tensor:
        return self._label_probs_fn()

    @cached_property
    def ensemble_top(self) -> Tensor:
        return self._ensemble_top_fn()

    @classmethod
    def from_probs(cls, probs: Tensor, labels: Tensor) -> RuleInputs:
        """From probability rows ``probs [n, K, C]`` (a batch's, or a whole dense table)."""
        k = probs.shape[1]
        return cls(labels, k, probs.dtype,
                   lambda: probs.gather(2, labels.view(-1, 1, 1).expand(-1, k, 1)).squeeze(2),
                   lambda: probs.mean(1).argmax(-1))

    @classmethod
    def from_bank(cls, bank: TeacherBank, ids: Tensor, labels: Tensor) -> RuleInputs:
        """From a bank's per-unit summaries of examples ``ids`` (``labels`` their ``[B]`` or ``[B, L]`` labels;
        the units are their tokens, flattened, on a sequence bank); read in chunks, never a ``[tokens, V]`` table."""
        return cls(labels.reshape(-1), bank.num_teachers, torch.float32,
                   lambda: bank.unit_label_probs(ids, labels).float(),
                   lambda: bank.unit_ensemble_top(ids)[1].to(labels.device))


class _TableGate(Gate):
    """A gate whose weights are a fixed ``[N_train_units, 1+K]`` table built in :meth:`setup` (one row per
    training unit: an example, or a token position of a sequence task), from :class:`RuleInputs`."""

    trusted_weights = True
    baseline = True  # a non-learned rule (metagate compare's "best baseline" candidates)

    def setup(self, run: GateContext) -> None:
        if run.bank is None or run.num_teachers < 1:
            raise ConfigError(f"gate {self.name!r} needs at least one teacher (--teachers K >= 1)")
        self.alpha = self.config.label_weight  # type: ignore[attr-defined]
        self.tau = self.config.temperature  # type: ignore[attr-defined]
        labels = run.train_y.to(run.device)
        ids = torch.arange(labels.shape[0], device=run.device)
        self._table = self.rule(RuleInputs.from_bank(run.bank, ids, labels)).to(run.dtype)

    def table(self, probs: Tensor, labels: Tensor) -> Tensor:
        """``[n, 1+K]`` the rule's rows from the teachers' probability rows ``probs [n, K, C]`` (per batch)."""
        return self.rule(RuleInputs.from_probs(probs, labels))

    def rule(self, inputs: RuleInputs) -> Tensor:
        """``[n, 1+K]`` the rule's rows for the units of ``inputs``."""
        raise NotImplementedError

    def weights(self, view: UnitView) -> GateOutput:
        if view.ids is None:
            raise ConfigError(f"gate {self.name!r} needs unit ids (its weights are per training unit)")
        return GateOutput(self._table.index_select(0, view.unit_ids), self.tau)

    def hparams(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "tau": self.tau}


def label_filter_rows(inputs: RuleInputs, alpha: float) -> Tensor:
    """``[n, 1+K]``: ``(alpha, (1-alpha)/K, ...)`` where the ensemble's top class is the label, else ``(0, 1/K, ...)``."""
    k = inputs.num_teachers
    agree = inputs.ensemble_top == inputs.labels
    w = torch.empty(inputs.num_units, 1 + k, dtype=inputs.dtype, device=inputs.device)
    w[:, 0] = torch.where(agree, alpha, 0.0)
    w[:, 1:] = ((1.0 - w[:, 0]) / k).unsqueeze(1)
    return w


def label_filter_table(probs: Tensor, labels: Tensor, alpha: float) -> Tensor:
    """``[N, 1+K]`` :func:`label_filter_rows` from probability rows ``probs [N, K, C]``."""
    return label_filter_rows(RuleInputs.from_probs(probs, labels), alpha)


def conf_teachers_rows(p_y: Tensor, alpha: float) -> Tensor:
    """``[N, 1+K]``: ``(alpha, (1-alpha) p_k(y) / sum_j p_j(y))`` from ``p_y [N, K]``."""
    share = p_y / p_y.sum(1, keepdim=True).clamp_min(1e-30)
    return torch.cat([torch.full_like(share[:, :1], alpha), (1.0 - alpha) * share], dim=1)


def conf_teachers_table(probs: Tensor, labels: Tensor, alpha: float) -> Tensor:
    """``[N, 1+K]`` :func:`conf_teachers_rows` from probability rows ``probs [N, K, C]``."""
    return conf_teachers_rows(RuleInputs.from_probs(probs, labels).label_probs, alpha)


def ca_mkd_attention_of(p_y: Tensor) -> Tensor:
    """``[N, K]`` CA-MKD's teacher weights ``a_k = (1 - softmax_k(CE_k)) / (K - 1)``, ``CE_k = -log p_k(y)`` from
    ``p_y [N, K]`` (each row sums to 1; a teacher confident in the label gets the most)."""
    k = p_y.shape[1]
    if k < 2:
        raise ConfigError(f"ca-mkd weighs teachers against each other: it needs K >= 2 teachers, got {k}")
    ce = -p_y.clamp_min(1e-30).log()
    return (1.0 - F.softmax(ce, dim=1)) / (k - 1)


def ca_mkd_attention(probs: Tensor, labels: Tensor) -> Tensor:
    """``[N, K]`` :func:`ca_mkd_attention_of` from probability rows ``probs [N, K, C]``."""
    return ca_mkd_attention_of(RuleInputs.from_probs(probs, labels).label_probs)


def ca_mkd_rows(p_y: Tensor, label_weight: float = 1.0, kd_weight: float = 1.0, mass: str = "code") -> Tensor:
    """``[N, 1+K]`` CA-MKD's rows from ``p_y [N, K]``: ``mass="code"`` ``(gamma, alpha a_k / K)`` as
    Rorozhl/CA-MKD's loss (its KD sum is divided by ``bsz * teacher_num``); ``"unit"`` the same row scaled to sum
    to 1 (ours, equal mass with ``fixed``)."""
    a = ca_mkd_attention_of(p_y)
    w = torch.cat([torch.full_like(a[:, :1], label_weight), kd_weight * a / a.shape[1]], dim=1)
    if mass == "unit":
        w = w / w.sum(1, keepdim=True).clamp_min(1e-30)
    elif mass != "code":
        raise ConfigError(f"--ca-mkd-mass must be code or unit, got {mass!r}")
    return w


def ca_mkd_table(probs: Tensor, labels: Tensor, label_weight: float = 1.0, kd_weight: float = 1.0,
                 mass: str = "code") -> Tensor:
    """``[N, 1+K]`` :func:`ca_mkd_rows` from probability rows ``probs [N, K, C]``."""
    return ca_mkd_rows(RuleInputs.from_probs(probs, labels).label_probs, label_weight, kd_weight, mass)


@dataclass
class LabelFilterConfig(KDMixConfig):
    """Options of the ``label-filter`` gate (``alpha`` where the teachers agree with the label)."""


@register("label-filter")
class LabelFilterGate(_TableGate):
    """Label weight cut to 0 where the teacher ensemble's top class disagrees with the label."""

    config_class = LabelFilterConfig

    def rule(self, inputs: RuleInputs) -> Tensor:
        return label_filter_rows(inputs, self.alpha)


@dataclass
class ConfTeachersConfig(KDMixConfig):
    """Options of the ``conf-teachers`` gate."""


@register("conf-teachers")
class ConfTeachersGate(_TableGate):
    """Each teacher weighted by its probability of the label (confidence-aware multi-teacher KD)."""

    config_class = ConfTeachersConfig

    def rule(self, inputs: RuleInputs) -> Tensor:
        return conf_teachers_rows(inputs.label_probs, self.alpha)


@dataclass
class CAMKDConfig(GateConfig):
    """Options of the ``ca-mkd`` gate; the defaults are Rorozhl/CA-MKD's (``scripts/run.sh``: ``-r 1 -a 1``,
    ``--kd_T 4``)."""

    ca_mkd_label_weight: float = option(1.0, "ca-mkd: weight of the label CE (the code's gamma, -r)")
    ca_mkd_kd_weight: float = option(1.0, "ca-mkd: weight of the teachers' KD sum (the code's alpha, -a)")
    ca_mkd_tau: float = option(4.0, "ca-mkd: KD temperature (the code's kd_T), Hinton's tau^2 KL")
    ca_mkd_mass: str = option("code", "ca-mkd: code = rows (gamma, alpha a_k / K) as the published loss; unit = the "
                              "same rows scaled to sum to 1 (ours: fixed's mass)", choices=("code", "unit"))

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("ca_mkd_label_weight", "ca_mkd_kd_weight"):
            if getattr(self, name) < 0:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(self, name)}")
        if not self.ca_mkd_tau > 0:
            raise ConfigError(f"--ca-mkd-tau must be > 0, got {self.ca_mkd_tau}")

    @property
    def label_weight(self) -> float:
        return self.ca_mkd_label_weight

    @property
    def temperature(self) -> float:
        return self.ca_mkd_tau


@register("ca-mkd")
class CAMKDGate(_TableGate):
    """CA-MKD (Zhang, Chen and Wang, "Confidence-Aware Multi-Teacher Knowledge Distillation", ICASSP 2022), its
    logit-level teacher weighting as the authors' code computes it (github.com/Rorozhl/CA-MKD, commit
    c2f39a9f, ``helper/loops.py``, ``ensemble_method == 'CAMKD'``; ``distiller_zoo/KD.py`` ``DistillKL``)::

        loss_t    = [CE(logit_t, target) for each teacher]            # per unit, temperature 1
        attention = (1 - softmax(loss_t, dim=teachers)) / (K - 1)
        loss_div  = sum(attention * T^2 KL(softmax(t/T) || softmax(s/T))) / (bsz * K)
        loss      = gamma * CE(s, target) + alpha * loss_div            # gamma = alpha = 1, T = 4 (scripts/run.sh)

    so unit ``i``'s row is ``(gamma, alpha a_ik / K)``; the total mass is ``gamma + alpha / K``, not 1. What is
    not here: the paper's intermediate-feature term (``--distill inter``, weighted by the same attention with
    ``-b 50``) -- this project distils logits only. The target is the (noisy) training label, as in the code;
    the weights are a constant per training unit (the teachers are frozen). Our variation (an option):
    ``--ca-mkd-mass unit`` scales the rows to sum to 1.
    """

    config_class = CAMKDConfig

    def rule(self, inputs: RuleInputs) -> Tensor:
        c = self.config
        return ca_mkd_rows(inputs.label_probs, c.ca_mkd_label_weight, c.ca_mkd_kd_weight,  # type: ignore[attr-defined]
                           c.ca_mkd_mass)  # type: ignore[attr-defined]

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), **{f.name: getattr(self.config, f.name) for f in self.config.option_fields()}}


@dataclass
class BestTeacherConfig(KDMixConfig):
    """Options of the ``best-teacher`` gate."""

    best_teacher: str | None = option(None, "best-teacher: the teacher's name (unset: metagate compare picks the "
                                            "teacher with the best select accuracy)")


@register("best-teacher")
class BestTeacherGate(_TableGate):
    """All KD weight on one teacher, the one with the best accuracy on ``select``."""

    config_class = BestTeacherConfig

    @staticmethod
    def choose(teacher_stats: list[dict[str, Any]]) -> dict[str, Any]:
        """The options ``metagate compare`` sets from the teachers' stats: the best ``select`` accuracy (a
        planted teacher without one is never chosen; ties go to the first)."""
        scored = [(s.get("select_acc", float("nan")), -i, s["name"]) for i, s in enumerate(teacher_stats)]
        scored = [t for t in scored if t[0] == t[0]]
        if not scored:
            raise ConfigError("best-teacher: no teacher has a select accuracy to choose by")
        return {"best_teacher": max(scored)[2]}

    def setup(self, run: GateContext) -> None:
        name = self.config.best_teacher  # type: ignore[attr-defined]
        if name is None:
            raise ConfigError("gate 'best-teacher' needs --best-teacher NAME (metagate compare chooses it on select)")
        if run.bank is None or name not in run.bank.names:
            raise ConfigError(f"--best-teacher {name!r} is not one of the teachers "
                              f"({', '.join(run.bank.names) if run.bank else 'none'})")
        self._index = run.bank.names.index(name)
        super().setup(run)

    def rule(self, inputs: RuleInputs) -> Tensor:
        w = torch.zeros(inputs.num_units, 1 + inputs.num_teachers, dtype=inputs.dtype, device=inputs.device)
        w[:, 0] = self.alpha
        w[:, 1 + self._index] = 1.0 - self.alpha
        return w

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "best_teacher": self.config.best_teacher}  # type: ignore[attr-defined]
