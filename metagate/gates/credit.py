"""Per-(unit, teacher) credit for teacher-weighting policies: the look-ahead hypergradient of the clean validation
loss with respect to each unit's teacher weights (issue 28).

The meta gate's closed-form last-layer look-ahead (:mod:`metagate.gates.meta.analytic`) gives, for one training
batch and the weights ``W [N, 1+K]`` the student is about to train on, ``d CE_val(theta'(W)) / d W`` exactly:
``theta'`` is one plain SGD step of the student's head on the ``W``-weighted loss at the current learning rate,
``CE_val`` the student's CE on a batch of the clean ``meta`` split at ``theta'``. Its teacher columns, centred over
the teachers of each unit, are a dense credit: ``A_ik = -(d_ik - mean_k d_ik)`` says how much the validation loss
falls when unit ``i`` moves KD mass to teacher ``k`` from the others (the row's mass unchanged).

Cost: the training side reuses the real forward's head inputs (a forward hook), the validation side is one
forward of a ``meta`` batch without a graph, plus a few products of the head's size.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from metagate.errors import ConfigError
from metagate.gates.base import GateContext, UnitView
from metagate.gates.meta.analytic import LinearLookahead, linear_hypergrad
from metagate.gates.meta.capture import ForwardCapture
from metagate.gates.meta.linear_route import head_protocol
from metagate.gates.meta.lookahead import features_and_logits, kd_logit_gradients
from metagate.gates.meta.sampler import ValSampler
from metagate.layout import is_conv

__all__ = ["HeadCredit", "centred_credit"]


def centred_credit(hypergrad: Tensor) -> Tensor:
    """``[N, K]`` credit from ``d CE_val / d W [N, 1+K]``: minus the teacher columns centred over each unit's
    teachers (positive: moving mass to that teacher lowers the validation loss)."""
    d = hypergrad[:, 1:]
    return -(d - d.mean(-1, keepdim=True))


class HeadCredit:
    """The closed-form look-ahead over the student's head, for a policy's weights.

    :param run: the run (its student must have the feature protocol: ``features(x)`` and a linear ``head``)
    :param tau: the KD temperature of the teacher columns
    :param val_batch: size of the ``meta`` batch each look-ahead is scored on
    :param what: the option that asked for the credit (named in errors)
    """

    def __init__(self, run: GateContext, tau: float, val_batch: int, what: str = "--rl-credit hypergradient") -> None:
        student = run.student
        self.what = what
        if not head_protocol(student):
            raise ConfigError(f"{what} needs a student with features(x) and a linear head "
                              f"(metagate.models MLP/CNN); {type(student).__name__} has not")
        self.student, self.tau = student, float(tau)
        self.dtype = next(student.parameters()).dtype
        self.sampler = ValSampler(run.meta, val_batch, run.seed, run.device, self.dtype, conv=is_conv(student))
        self.capture = ForwardCapture([student.head])
        head = student.head
        assert isinstance(head, nn.Linear)
        self.head = head
        self.stepped = [(True, head.bias is not None)]

    def close(self) -> None:
        self.capture.remove()

    @torch.no_grad()
    def hypergrad(self, view: UnitView, weights: Tensor, lr: float, x: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``(CE_val at theta'(W), d CE_val / d W [N, 1+K])`` for the batch of ``view``.

        :param weights: ``[N, 1+K]`` the weights the student will train on
        :param lr: the virtual step size (the student's current learning rate)
        :param x: the batch's inputs, forwarded again when the real forward's head input was not kept
        """
        if view.is_sequence:
            raise ConfigError(f"{self.what} credits whole units; sequences are not supported")
        kept = self.capture.kept_for(view.student_logits)
        if kept is not None:
            h = kept[0].input
        elif x is not None:
            h = features_and_logits(self.student, x)[0]
        else:
            raise ValueError("the head's input of this batch was not kept and no inputs were given")
        tlp = view.teacher_log_probs(self.tau) if view.teacher_log_probs_fn is not None else None
        if tlp is not None and tlp.dtype != self.dtype:
            tlp = None
        g = kd_logit_gradients(view.student_logits, None if tlp is not None else view.teacher_logits, view.labels,
                               self.tau, tlp)
        xv, yv = self.sampler.next()
        hv = features_and_logits(self.student, xv)[0]
        lookahead = LinearLookahead([self.head], [h.to(self.dtype)], hv.to(self.dtype), self.stepped)
        return linear_hypergrad(lookahead, weights.to(self.dtype), g, yv, lr, 1.0 / view.num_units)
