"""HKD: hard gate knowledge distillation (Lee et al., EMNLP 2022).

Per unit, learn from the label *or* from the teachers. The student is judged
over-confident -- and then learns from the teachers -- when its probability of a
reference token exceeds the temperature-calibrated teachers' probability of the
same token. At sentence level the comparison is on summed (optionally
length-normalised) log-probabilities over the unmasked tokens of a sequence.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from metagate.errors import ConfigError
from metagate.gates.base import Gate, GateOutput, UnitView
from metagate.gates.registry import register


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
        ref = labels if reference == "gold" else student_logits.argmax(-1)
        ref = ref.clamp_min(0)  # padding may hold -100
        log_ps = F.log_softmax(student_logits.float(), -1).gather(-1, ref.unsqueeze(-1)).squeeze(-1)
        p_t = F.softmax(teacher_logits.float() / teacher_tau, -1).mean(-2)  # mean over teachers
        log_pt = p_t.gather(-1, ref.unsqueeze(-1)).squeeze(-1).clamp_min(1e-30).log()
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


@register("hard")
class HardGate(Gate):
    """HKD hard gate. Teacher columns share the KD weight equally.

    :param level: ``token`` | ``sentence`` (identical for classification)
    :param reference: ``gold`` | ``pred``
    :param teacher_tau: teacher temperature for the gate and the KD target (default 1.5)
    :param length_norm: length-normalise sentence-level scores
    """

    trusted_weights = True

    def __init__(
        self, level: str = "token", reference: str = "gold", teacher_tau: float = 1.5, length_norm: bool = False
    ) -> None:
        if level not in ("token", "sentence"):
            raise ConfigError(f"--hard-level must be token or sentence, got {level!r}")
        if reference not in ("gold", "pred"):
            raise ConfigError(f"--hard-reference must be gold or pred, got {reference!r}")
        if not teacher_tau > 0:
            raise ConfigError(f"--hard-tau must be > 0, got {teacher_tau}")
        self.level, self.reference = level, reference
        self.teacher_tau, self.length_norm = float(teacher_tau), bool(length_norm)

    def weights(self, view: UnitView) -> GateOutput:
        if view.teacher_logits is None:
            raise ConfigError("the hard gate needs at least one teacher")
        b, t = view.seq_shape
        k, c = view.teacher_logits.shape[1:]
        g = hard_gate_decision(
            view.student_logits.detach().reshape(b, t, c),
            view.teacher_logits.reshape(b, t, k, c),
            view.labels.reshape(b, t),
            view.mask.reshape(b, t),
            self.level,
            self.reference,
            self.teacher_tau,
            self.length_norm,
        ).reshape(-1, 1)
        w = torch.cat([1.0 - g, g.expand(-1, k) / k], dim=1).to(view.student_logits.dtype)
        return GateOutput(w, self.teacher_tau)

    def hparams(self) -> dict[str, Any]:
        return {
            "hard_level": self.level,
            "hard_reference": self.reference,
            "hard_tau": self.teacher_tau,
            "hard_length_norm": self.length_norm,
        }

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("hard gate (HKD)")
        g.add_argument("--hard-level", choices=["token", "sentence"], default="token",
                       help="hard: gate per token or per sentence (default: token)")
        g.add_argument("--hard-reference", choices=["gold", "pred"], default="gold",
                       help="hard: reference token, the label or the student's argmax (default: gold)")
        g.add_argument("--hard-tau", type=float, default=1.5,
                       help="hard: teacher temperature for gate and KD target (default: 1.5)")
        g.add_argument("--hard-length-norm", action="store_true",
                       help="hard: length-normalise sentence-level log-probabilities")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> HardGate:
        return cls(args.hard_level, args.hard_reference, args.hard_tau, args.hard_length_norm)
