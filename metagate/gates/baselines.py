"""Non-learned rules for the jobs the learned gates do -- the baselines a learned gate must beat.

* ``label-filter`` (noisy labels): the label weight is cut to 0 where the teacher ensemble's top class
  disagrees with the label, the unit then learns from the teachers alone;
* ``best-teacher`` (several teachers): all KD weight on the one teacher with the best accuracy on ``select``
  (``metagate compare`` picks it from the teachers' ``select`` accuracy);
* ``conf-teachers`` (several teachers): each teacher weighted by its probability of the label,
  ``w_k = (1 - alpha) p_k(y) / sum_j p_j(y)`` -- the softmax over teachers of ``-CE(t_k, y)`` that
  confidence-aware multi-teacher KD (CA-MKD, Zhang et al. 2022) uses.

Each is a constant per training unit: computed once in :meth:`setup` from the cached teacher logits and the
(noisy) training labels, one row gather per step.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from metagate.errors import ConfigError
from metagate.gates.base import Gate, GateContext, GateOutput, UnitView
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
