"""Per-(unit, teacher) credit for teacher-weighting policies: the look-ahead hypergradient of the clean validation
loss with respect to each unit's teacher weights (issue 28).

The meta gate's closed-form last-layer look-ahead (:mod:`metagate.gates.meta.analytic`) gives, for one training
batch and the weights ``W [N, 1+K]`` the student is about to train on, ``d CE_val(theta'(W)) / d W`` exactly:
``theta'`` is one plain SGD step of the student's head on the ``W``-weighted loss at the current learning rate,
``CE_val`` the student's CE on a batch of the clean ``meta`` split at ``theta'``. Its teacher columns, centred over
the teachers of each unit, are a dense credit: ``A_ik = -(d_ik - mean_k d_ik)`` says how much the validation loss
falls when unit ``i`` moves KD mass to teacher ``k`` from the others (the row's mass unchanged).

Sequences (g2p): the units are the real tokens. A seq2seq student's head (:mod:`metagate.seq_models`) sees
``[B, T, H]`` inputs; the look-ahead runs on the ``B*T`` token rows of the view with the real step's reduction
(each real token's share ``mask_i / sum mask``; padding rows take no part and get zero credit), and scores
``theta'`` by the CE over the real tokens of a ``meta`` batch of words (padding excluded, as ``unit_ce``).

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
from metagate.units import PAD_ID

__all__ = ["HeadCredit", "centred_credit"]


def centred_credit(hypergrad: Tensor) -> Tensor:
    """``[N, K]`` credit from ``d CE_val / d W [N, 1+K]``: minus the teacher columns centred over each unit's
    teachers (positive: moving mass to that teacher lowers the validation loss)."""
    d = hypergrad[:, 1:]
    return -(d - d.mean(-1, keepdim=True))


class HeadCredit:
    """The closed-form look-ahead over the student's head, for a policy's weights.

    :param run: the run (its student must have the feature protocol: ``features(x)`` and a linear ``head``; a
        seq2seq student's ``features`` are per token, ``[B, T, H]``)
    :param tau: the KD temperature of the teacher columns
    :param val_batch: size of the ``meta`` batch each look-ahead is scored on
    :param what: the option that asked for the credit (named in errors)
    """

    def __init__(self, run: GateContext, tau: float, val_batch: int, what: str = "--rl-credit hypergradient") -> None:
        student = run.student
        self.what = what
        if not head_protocol(student):
            raise ConfigError(f"{what} needs a student with features(x) and a linear head "
                              f"(metagate.models MLP/CNN, metagate.seq_models); {type(student).__name__} has not")
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

        On a sequence batch the rows are the view's ``B*T`` token units: padding rows (``view.mask`` 0) take no
        part in the step and their rows of the result are 0; ``CE_val`` is the mean over the real tokens of the
        ``meta`` batch.

        :param weights: ``[N, 1+K]`` the weights the student will train on
        :param lr: the virtual step size (the student's current learning rate)
        :param x: the batch's inputs, forwarded again when the real forward's head input was not kept
        """
        kept = self.capture.kept_for(view.student_logits)
        if kept is not None:
            h = kept[0].input
        elif x is not None:
            h = features_and_logits(self.student, x)[0]
        else:
            raise ValueError("the head's input of this batch was not kept and no inputs were given")
        xv, yv = self.sampler.next()
        hv = features_and_logits(self.student, xv)[0]
        if h.dim() == 2:  # whole units: every row takes part, each with 1/N of the step
            g = self._logit_grads(view, None)
            lookahead = LinearLookahead([self.head], [h.to(self.dtype)], hv.to(self.dtype), self.stepped)
            return linear_hypergrad(lookahead, weights.to(self.dtype), g, yv, lr, 1.0 / view.num_units)
        # token units [B, T, H] -> the batch's real tokens, each with its share of the real step's masked mean
        mask = view.mask.reshape(-1)
        real = mask > 0
        h = h.reshape(-1, h.shape[-1])[real]
        g = self._logit_grads(view, real)
        scale = mask[real].to(self.dtype) / mask.to(self.dtype).sum()
        val_real = yv.reshape(-1) != PAD_ID  # the validation CE: mean over real tokens (as unit_ce)
        hv, yv = hv.reshape(-1, hv.shape[-1])[val_real], yv.reshape(-1)[val_real]
        lookahead = LinearLookahead([self.head], [h.to(self.dtype)], hv.to(self.dtype), self.stepped)
        val, dw_real = linear_hypergrad(lookahead, weights[real].to(self.dtype), g, yv, lr, scale)
        dw = dw_real.new_zeros(view.num_units, dw_real.shape[1])  # padding rows: no part in the step, no credit
        dw[real] = dw_real
        return val, dw

    def decision_hypergrad(self, view: UnitView, weights: Tensor, lr: float, x: Tensor | None = None,
                           per_word: bool = False) -> tuple[Tensor, Tensor]:
        """:meth:`hypergrad` w.r.t. a policy's decisions: ``weights [n, 1+K]`` has one row per decision -- per unit
        (classification), per real token in unit order (sequences), or per word (``per_word``: every token of word
        ``b`` trains on row ``b``, so its hypergradient is the sum of its tokens'); the result has the same rows."""
        if not view.is_sequence:
            return self.hypergrad(view, weights, lr, x)
        t = view.seq_shape[1]
        if per_word:
            val, dw = self.hypergrad(view, weights.repeat_interleave(t, 0), lr, x)
            return val, dw.view(-1, t, dw.shape[1]).sum(1)  # padding rows are 0
        real = view.mask.reshape(-1) > 0
        val, dw = self.hypergrad(view, weights.new_zeros(view.num_units, weights.shape[1]).index_put_((real,), weights),
                                 lr, x)
        return val, dw[real]

    def _logit_grads(self, view: UnitView, rows: Tensor | None) -> Tensor:
        """``[N, 1+K, C]`` per-unit logit gradients of the loss columns (:func:`kd_logit_gradients`), of the units
        ``rows`` (a bool mask) only when given."""
        tlp = view.teacher_log_probs(self.tau) if view.teacher_log_probs_fn is not None else None
        if tlp is not None and tlp.dtype != self.dtype:
            tlp = None
        t = None if tlp is not None else view.teacher_logits
        z, y = view.student_logits, view.labels
        if rows is not None:
            z, y = z[rows], y[rows]
            tlp, t = (None if tlp is None else tlp[rows]), (None if t is None else t[rows])
        return kd_logit_gradients(z, t, y, self.tau, tlp)
