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

Each is a constant per training unit: computed once in :meth:`setup` from the cached teacher logits and the
(noisy) training labels, one row gather per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from metagate.errors import ConfigError
from metagate.gates.base import Gate, GateConfig, GateContext, GateOutput, UnitView
from metagate.gates.fixed import KDMixConfig
from metagate.gates.registry import register
from metagate.options import option


class _TableGate(Gate):
    """A gate whose weights are a fixed ``[N_train, 1+K]`` table built in :meth:`setup`."""

    trusted_weights = True
    baseline = True  # a non-learned rule (metagate compare's "best baseline" candidates)

    def setup(self, run: GateContext) -> None:
        if run.bank is None or run.num_teachers < 1:
            raise ConfigError(f"gate {self.name!r} needs at least one teacher (--teachers K >= 1)")
        self.alpha = self.config.label_weight  # type: ignore[attr-defined]
        self.tau = self.config.temperature  # type: ignore[attr-defined]
        probs = run.bank.log_probs(1.0).exp().to(run.device)  # [N, K, C] at temperature 1 (the rule's view)
        self._table = self.table(probs, run.train_y.to(run.device)).to(run.dtype)

    def table(self, probs: Tensor, labels: Tensor) -> Tensor:
        raise NotImplementedError

    def weights(self, view: UnitView) -> GateOutput:
        if view.ids is None:
            raise ConfigError(f"gate {self.name!r} needs unit ids (its weights are per training unit)")
        return GateOutput(self._table.index_select(0, view.ids), self.tau)

    def hparams(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "tau": self.tau}


def label_filter_table(probs: Tensor, labels: Tensor, alpha: float) -> Tensor:
    """``[N, 1+K]``: ``(alpha, (1-alpha)/K, ...)`` where the ensemble's argmax is the label, else ``(0, 1/K, ...)``."""
    k = probs.shape[1]
    agree = probs.mean(1).argmax(-1) == labels
    w = torch.empty(labels.shape[0], 1 + k, dtype=probs.dtype, device=probs.device)
    w[:, 0] = torch.where(agree, alpha, 0.0)
    w[:, 1:] = ((1.0 - w[:, 0]) / k).unsqueeze(1)
    return w


def conf_teachers_table(probs: Tensor, labels: Tensor, alpha: float) -> Tensor:
    """``[N, 1+K]``: ``(alpha, (1-alpha) p_k(y) / sum_j p_j(y))``."""
    p_y = probs.gather(2, labels.view(-1, 1, 1).expand(-1, probs.shape[1], 1)).squeeze(2)  # [N, K]
    share = p_y / p_y.sum(1, keepdim=True).clamp_min(1e-30)
    return torch.cat([torch.full_like(share[:, :1], alpha), (1.0 - alpha) * share], dim=1)


def ca_mkd_attention(probs: Tensor, labels: Tensor) -> Tensor:
    """``[N, K]`` CA-MKD's teacher weights ``a_k = (1 - softmax_k(CE_k)) / (K - 1)``, ``CE_k = -log p_k(y)`` (each
    row sums to 1; a teacher confident in the label gets the most)."""
    k = probs.shape[1]
    if k < 2:
        raise ConfigError(f"ca-mkd weighs teachers against each other: it needs K >= 2 teachers, got {k}")
    p_y = probs.gather(2, labels.view(-1, 1, 1).expand(-1, k, 1)).squeeze(2)  # [N, K]
    ce = -p_y.clamp_min(1e-30).log()
    return (1.0 - F.softmax(ce, dim=1)) / (k - 1)


def ca_mkd_table(probs: Tensor, labels: Tensor, label_weight: float = 1.0, kd_weight: float = 1.0,
                 mass: str = "code") -> Tensor:
    """``[N, 1+K]`` CA-MKD's rows: ``mass="code"`` ``(gamma, alpha a_k / K)`` as Rorozhl/CA-MKD's loss (its KD sum is
    divided by ``bsz * teacher_num``); ``"unit"`` the same row scaled to sum to 1 (ours, equal mass with ``fixed``)."""
    a = ca_mkd_attention(probs, labels)
    w = torch.cat([torch.full_like(a[:, :1], label_weight), kd_weight * a / a.shape[1]], dim=1)
    if mass == "unit":
        w = w / w.sum(1, keepdim=True).clamp_min(1e-30)
    elif mass != "code":
        raise ConfigError(f"--ca-mkd-mass must be code or unit, got {mass!r}")
    return w


@dataclass
class LabelFilterConfig(KDMixConfig):
    """Options of the ``label-filter`` gate (``alpha`` where the teachers agree with the label)."""


@register("label-filter")
class LabelFilterGate(_TableGate):
    """Label weight cut to 0 where the teacher ensemble's top class disagrees with the label."""

    config_class = LabelFilterConfig

    def table(self, probs: Tensor, labels: Tensor) -> Tensor:
        return label_filter_table(probs, labels, self.alpha)


@dataclass
class ConfTeachersConfig(KDMixConfig):
    """Options of the ``conf-teachers`` gate."""


@register("conf-teachers")
class ConfTeachersGate(_TableGate):
    """Each teacher weighted by its probability of the label (confidence-aware multi-teacher KD)."""

    config_class = ConfTeachersConfig

    def table(self, probs: Tensor, labels: Tensor) -> Tensor:
        return conf_teachers_table(probs, labels, self.alpha)


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

    def table(self, probs: Tensor, labels: Tensor) -> Tensor:
        c = self.config
        return ca_mkd_table(probs, labels, c.ca_mkd_label_weight, c.ca_mkd_kd_weight,  # type: ignore[attr-defined]
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

    def table(self, probs: Tensor, labels: Tensor) -> Tensor:
        w = torch.zeros(labels.shape[0], 1 + probs.shape[1], dtype=probs.dtype, device=probs.device)
        w[:, 0] = self.alpha
        w[:, 1 + self._index] = 1.0 - self.alpha
        return w

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "best_teacher": self.config.best_teacher}  # type: ignore[attr-defined]
