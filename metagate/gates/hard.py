"""HKD: hard gate knowledge distillation (Lee et al., EMNLP 2022).

Per unit, learn from the label *or* from the teachers. The student is judged
over-confident -- and then learns from the teachers -- when its probability of a
reference token exceeds the temperature-calibrated teachers' probability of the
same token. At sentence level the comparison is on summed (optionally
length-normalised) log-probabilities over the unmasked tokens of a sequence.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from metagate.errors import ConfigError
from metagate.gates.base import Gate, GateConfig, GateContext, GateOutput, UnitView
from metagate.gates.registry import register
from metagate.options import option


def hard_gate_decision(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    mask: Tensor,
    level: str = "token",
    reference: str = "gold",
    teacher_tau: float = 1.5,
    length_norm: bool = False,
) -> Tensor:
    """The HKD gate as a pure function.

    :param student_logits: ``[B, T, C]``
    :param teacher_logits: ``[B, T, K, C]``
    :param labels: ``[B, T]`` gold tokens
    :param mask: ``[B, T]`` 1 for real tokens, 0 for padding
    :param level: ``token`` or ``sentence``
    :param reference: ``gold`` (the label) or ``pred`` (the student's argmax)
    :param teacher_tau: temperature applied to the teachers before comparing
    :param length_norm: sentence level: divide summed log-probabilities by the length
    :return: ``[B, T]`` float gate, 1 = learn from the teachers, 0 = from the label;
        padded tokens get 0
    """
    with torch.no_grad():
        log_ps = F.log_softmax(student_logits.float(), -1)
        log_pt = F.log_softmax(teacher_logits.float() / teacher_tau, -1)
        return hard_gate_from_log_probs(log_ps, log_pt, labels, mask, level, reference, length_norm)


def hard_gate_from_log_probs(
    student_log_probs: Tensor,
    teacher_log_probs: Tensor,
    labels: Tensor,
    mask: Tensor,
    level: str = "token",
    reference: str = "gold",
    length_norm: bool = False,
) -> Tensor:
    """:func:`hard_gate_decision` on log-probabilities (teachers already at their temperature).

    :param student_log_probs: ``[B, T, C]``
    :param teacher_log_probs: ``[B, T, K, C]``
    """
    ref = labels if reference == "gold" else student_log_probs.argmax(-1)
    ref = ref.clamp_min(0).unsqueeze(-1)  # padding may hold -100
    log_ps = student_log_probs.gather(-1, ref).squeeze(-1)
    p_t = teacher_log_probs.exp().mean(-2)  # mean probability over teachers
    log_pt = p_t.gather(-1, ref).squeeze(-1).clamp_min(1e-30).log()
    m = mask.to(log_ps.dtype)
    if level == "token":
        gate = (log_ps > log_pt).to(log_ps.dtype)
    elif level == "sentence":
        s_sum, t_sum = (log_ps * m).sum(-1), (log_pt * m).sum(-1)
        if length_norm:
            n = m.sum(-1).clamp_min(1)
            s_sum, t_sum = s_sum / n, t_sum / n
        gate = (s_sum > t_sum).to(log_ps.dtype).unsqueeze(-1).expand_as(log_ps)
    else:
        raise ConfigError(f"hard gate level must be token or sentence, got {level!r}")
    return gate * m


@dataclass
class HardConfig(GateConfig):
    """Options of the ``hard`` gate (HKD)."""

    hard_level: str = option("token", "gate per token or per sentence", choices=("token", "sentence"))
    hard_reference: str = option("gold", "reference token: the label or the student's argmax",
                                 choices=("gold", "pred"))
    hard_tau: float = option(1.5, "teacher temperature for the gate and the KD target (> 0)")
    hard_length_norm: bool = option(False, "length-normalise sentence-level log-probabilities")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.hard_tau > 0:
            raise ConfigError(f"--hard-tau must be > 0, got {self.hard_tau}")


@register("hard")
class HardGate(Gate):
    """HKD hard gate. Teacher columns share the KD weight equally (options: :class:`HardConfig`)."""

    config_class = HardConfig
    trusted_weights = True

    def __init__(self, config: HardConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        c = self.config
        self.level, self.reference = c.hard_level, c.hard_reference
        self.teacher_tau, self.length_norm = c.hard_tau, c.hard_length_norm
        self._gold_log_pt: Tensor | None = None  # [N_train] teachers' log p(label), fast path
        self._rows: tuple[Tensor, Tensor] | None = None

    def setup(self, run: GateContext) -> None:
        """With gold references on one-unit-per-example data, the teachers' side of the rule is a
        constant per training unit: compute it once (the per-step work is then one gather)."""
        bank = run.bank
        if bank is None or self.reference != "gold" or getattr(bank, "online", False):
            return  # online teachers change with the step's inputs: the per-step path
        y = run.train_y
        if y.ndim != 1:
            return
        p_t = bank.log_probs(self.teacher_tau).exp().mean(1)  # [N, C]
        # the bank may live in pinned CPU memory (bank.HostBank): the [N] result goes to the run's device
        self._gold_log_pt = p_t.gather(1, y.to(p_t.device).unsqueeze(1)).squeeze(1).clamp_min(1e-30).log().to(y.device)
        k = bank.num_teachers
        dtype = run.dtype  # weight rows in the student's dtype
        label_row = torch.zeros(1 + k, device=y.device, dtype=dtype)
        label_row[0] = 1.0
        teacher_row = torch.full((1 + k,), 1.0 / k, device=y.device, dtype=dtype)
        teacher_row[0] = 0.0
        self._rows = (label_row, teacher_row)

    def weights(self, view: UnitView) -> GateOutput:
        if view.teacher_logits is None:
            raise ConfigError("the hard gate needs at least one teacher")
        if self._gold_log_pt is not None and view.ids is not None and view.seq_shape[1] == 1:
            assert self._rows is not None
            log_ps = view.student_log_probs.gather(1, view.labels.unsqueeze(1))  # reused by the CE column
            over = log_ps > self._gold_log_pt[view.ids].unsqueeze(1)
            w = torch.where(over, self._rows[1], self._rows[0])
            return GateOutput(w, self.teacher_tau)
        b, t = view.seq_shape
        k, c = view.teacher_logits.shape[1:]
        g = hard_gate_from_log_probs(
            view.student_log_probs.reshape(b, t, c),
            view.teacher_log_probs(self.teacher_tau).reshape(b, t, k, c),
            view.labels.reshape(b, t),
            view.mask.reshape(b, t),
            self.level,
            self.reference,
            self.length_norm,
        ).reshape(-1, 1)
        w = torch.cat([1.0 - g, g.expand(-1, k) / k], dim=1).to(view.student_logits.dtype)
        return GateOutput(w, self.teacher_tau)
