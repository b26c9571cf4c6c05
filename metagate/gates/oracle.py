"""Oracle gates: what a perfect gate could gain, from the ground truth a real gate never sees.

They read the run's recorded truth -- which training labels were corrupted (``GateContext.corrupted``) and which
teacher's top class is the clean label on each unit (``GateContext.teacher_right``) -- so they are never
baselines: ``metagate compare`` shows them as kind ``oracle`` and never picks one as the best baseline. A
learned gate's row reports the share of an oracle's gain over ``fixed`` it captures (the headroom).

* ``oracle-filter`` (the label/KD split): ``fixed``'s row ``(alpha, (1-alpha)/K, ...)`` on clean units, label
  weight 0 and the teachers ``1/K`` each on the truly corrupted units (a perfect ``label-filter``);
* ``oracle-teachers`` (the choice between teachers): label weight ``alpha`` as ``fixed``, the KD weight
  ``1 - alpha`` split equally among the teachers whose top class is the unit's clean label; where no teacher is
  right, equally among all (``fixed``'s row: nothing to choose).

Both keep ``fixed``'s total weight 1 per unit. One row per training unit: an example, or a token position of a
sequence task (the truth is recorded per token there; on the ``lm`` task's sparse bank a teacher is right where
its top-1 entry is the clean token).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from metagate.errors import ConfigError
from metagate.gates.base import GateContext
from metagate.gates.baselines import RuleInputs, _TableGate
from metagate.gates.fixed import KDMixConfig
from metagate.gates.registry import register


def oracle_filter_table(corrupted: Tensor, num_teachers: int, alpha: float) -> Tensor:
    """``[N, 1+K]``: ``(alpha, (1-alpha)/K, ...)`` on clean units, ``(0, 1/K, ...)`` on corrupted ones."""
    c = corrupted.bool()
    w = torch.empty(c.shape[0], 1 + num_teachers, dtype=torch.float64, device=c.device)
    w[:, 0] = torch.where(c, 0.0, alpha)
    w[:, 1:] = ((1.0 - w[:, 0]) / num_teachers).unsqueeze(1)
    return w


def oracle_teachers_table(right: Tensor, alpha: float) -> Tensor:
    """``[N, 1+K]``: ``(alpha, (1-alpha) r_k / sum_j r_j)`` with ``r`` each teacher's correctness against the clean
    label; a unit no teacher gets right splits ``1 - alpha`` equally."""
    r = right.to(torch.float64)
    none = r.sum(1, keepdim=True) == 0
    r = torch.where(none, torch.ones_like(r), r)
    share = r / r.sum(1, keepdim=True)
    return torch.cat([torch.full_like(share[:, :1], alpha), (1.0 - alpha) * share], dim=1)


class _OracleGate(_TableGate):
    baseline = False
    oracle = True  # shown in a compare, never its best baseline

    def setup(self, run: GateContext) -> None:
        self._run = run
        super().setup(run)

    def truth(self, name: str) -> Tensor:
        value = getattr(self._run, name, None)
        if value is None:
            raise ConfigError(f"gate {self.name!r} reads the recorded truth {name!r} of the training units, which "
                              "this run does not provide (the trainer provides it on a task with recorded clean "
                              "labels)")
        if value.ndim < 1 or value.shape[0] != self._run.num_train_units:
            raise ConfigError(f"gate {self.name!r} needs the truth {name!r} per training unit ("
                              f"{self._run.num_train_units}), got shape {tuple(value.shape)}")
        return value


@dataclass
class OracleConfig(KDMixConfig):
    """Options of the oracle gates (``alpha`` and ``tau`` as ``fixed``)."""


@register("oracle-filter")
class OracleFilterGate(_OracleGate):
    """Label weight 0 on the truly corrupted units (the recorded noise), ``fixed`` elsewhere."""

    config_class = OracleConfig

    def rule(self, inputs: RuleInputs) -> Tensor:
        return oracle_filter_table(self.truth("corrupted"), inputs.num_teachers, self.alpha).to(inputs.dtype)


@register("oracle-teachers")
class OracleTeachersGate(_OracleGate):
    """All KD weight on the teachers right against the clean label, equal among them; label weight as ``fixed``."""

    config_class = OracleConfig

    def rule(self, inputs: RuleInputs) -> Tensor:
        return oracle_teachers_table(self.truth("teacher_right"), self.alpha).to(inputs.dtype)
