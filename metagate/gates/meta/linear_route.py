"""The look-ahead by hand over linear layers (:mod:`.analytic`): a plain ReLU MLP's layers, or the head of a
feature-protocol student (the closed form, and ``func`` over the head)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagate.gates.base import GateContext, UnitView
from metagate.gates.meta.analytic import LinearLookahead, linear_hypergrad, plain_mlp_layers
from metagate.gates.meta.capture import ForwardCapture
from metagate.gates.meta.config import MetaConfig
from metagate.gates.meta.learner import WeightLearner
from metagate.gates.meta.lookahead import (
    closed_form_val_logits,
    features_and_logits,
    forward_features,
    kd_logit_gradients,
)
from metagate.gates.meta.route import LogitGrads, Route
from metagate.gates.meta.sampler import ValSampler


def head_protocol(student: nn.Module) -> bool:
    """Whether ``student`` has the feature protocol: ``features(x)`` and a linear ``head``."""
    return callable(getattr(student, "features", None)) and isinstance(getattr(student, "head", None), nn.Linear)


def linear_layers(student: nn.Module, names: Sequence[str]) -> tuple[list[nn.Linear], bool] | None:
    """The layers a hand-written look-ahead over ``names`` runs through, and whether they are all of a plain ReLU MLP
    (else they are the head of a feature-protocol student); ``None`` when there are none."""
    mlp = plain_mlp_layers(student)
    if mlp is not None:
        return mlp, True
    if head_protocol(student) and set(names) <= {"head.weight", "head.bias"}:  # always so for closed-form
        return [student.head], False  # type: ignore[list-item]
    return None


def stepped_layers(student: nn.Module, layers: Sequence[nn.Linear], names: Sequence[str]
                   ) -> tuple[list[tuple[bool, bool]], int]:
    """Per layer, whether its (weight, bias) take the virtual step, and the index of the lowest one that moves."""
    by_id = {id(p): n for n, p in student.named_parameters()}
    stepped = [(by_id[id(lin.weight)] in names, lin.bias is not None and by_id[id(lin.bias)] in names)
               for lin in layers]
    return stepped, min(i for i, st in enumerate(stepped) if any(st))


class LinearRoute(Route):
    """The look-ahead written out by hand over a stack of linear layers: from the lowest one that moves up to the
    head. Forward hooks keep the real forward's inputs of its layers; autograd runs only from ``W`` to the table
    rows / net when ``W`` is not the rows themselves."""

    name = "linear"

    def __init__(self, student: nn.Module, names: Sequence[str], learner: WeightLearner, sampler: ValSampler,
                 config: MetaConfig) -> None:
        super().__init__(student, names, learner, sampler, config)
        found = linear_layers(student, self.names)
        assert found is not None, "choose_route picks this route only for linear layers"
        layers, is_mlp = found
        self.fit = config.meta_fit
        stepped, low = stepped_layers(student, layers, self.names)
        self.stack, self.stepped = layers[low:], stepped[low:]
        self.below: list[nn.Linear] | None = layers[:low] if is_mlp else None  # None: features(x) under the head
        #: the stack's inputs in the real forward
        self.capture = ForwardCapture(self.stack)

    def close(self) -> None:
        self.capture.remove()

    def step(self, view: UnitView, x: Tensor, lr: float) -> LogitGrads:
        learner = self.learner
        lsm = view.student_log_probs  # made with its graph: the real step reuses it for its CE column
        with torch.no_grad():
            # the training side first, while the real forward's tensors are still in cache
            g = self.logit_grads(view, lsm)
            scale = self.unit_scale(view.mask)
            train_inputs = self._train_inputs(view, x)
            xv, yv = self.sampler.next()
            lookahead = LinearLookahead(self.stack, train_inputs, self._val_input(xv), self.stepped)
            for _ in range(self.inner_iters):
                if learner.raw_rows and view.ids is not None:
                    w = learner.param.raw.index_select(0, view.ids)  # type: ignore[union-attr]
                    val, dw = linear_hypergrad(lookahead, w, g, yv, lr, scale)
                    learner.apply_grads(val, [dw], view.ids, view)
                    continue
                with torch.enable_grad():  # a graph from W to the net / transformed rows
                    w, leaves, ids = learner.of_view(view)
                val, dw = linear_hypergrad(lookahead, w, g, yv, lr, scale)
                learner.apply_grads(val, learner.leaf_grads(w, leaves, dw), ids, view)
        return view, g, scale

    def _train_inputs(self, view: UnitView, x: Tensor) -> list[Tensor]:
        """The stack's inputs in the real forward that made ``view.student_logits`` (kept by the hooks), or, when
        those logits came from elsewhere, from a forward of ``x`` without a graph."""
        kept = self.capture.kept_for(view.student_logits)
        if kept is not None:
            return [k.input for k in kept]
        if self.below is None:
            return [features_and_logits(self.student, x)[0]]
        a, ins = x.reshape(view.num_units, -1), []
        for lin in self.below + self.stack:  # under no_grad
            ins.append(a)
            a = F.linear(a, lin.weight, lin.bias).relu_()
        return ins[len(self.below):]

    def _val_input(self, xv: Tensor) -> Tensor:
        """The lowest stacked layer's input for the validation batch at the current parameters."""
        if self.below is None:  # the head of a feature-protocol student (batch-norm statistics untouched)
            return features_and_logits(self.student, xv)[0]
        a = xv.reshape(xv.shape[0], -1)
        for lin in self.below:  # under no_grad
            a = F.linear(a, lin.weight, lin.bias).relu_()
        return a

    def amal_pass(self, run: GateContext) -> None:
        """AMAL's periodic full pass (closed form, student frozen in eval mode; see :mod:`.schedule`): per group of
        ``meta_fit`` training batches, ``inner_iters`` updates on one validation batch."""
        student, bank, learner = run.student, run.bank, self.learner
        bs, n = run.batch_size, run.num_train_units
        was_training = student.training
        student.eval()
        try:
            for start in range(0, n, bs * self.fit):
                parts: list[tuple[Tensor, ...]] = []
                for b0 in range(start, min(start + bs * self.fit, n), bs):
                    ids = torch.arange(b0, min(b0 + bs, n), device=run.device)
                    with torch.no_grad():
                        h, z = forward_features(student, run.train_x[ids])
                    assert bank is not None
                    t, y = bank.lookup(ids), run.train_y[ids]
                    g = kd_logit_gradients(z, t, y, self.tau)
                    scale = torch.full((ids.numel(),), 1.0 / ids.numel(), device=z.device, dtype=z.dtype)
                    parts.append((ids, h, z, t, y, g, scale))
                ids, h, z, t, y, g, scale = (torch.cat(c) for c in zip(*parts))
                xv, yv = self.sampler.next()
                with torch.no_grad():
                    hv, zv = forward_features(student, xv)
                for _ in range(self.inner_iters):
                    w, leaves, _ = learner.live(ids, z, t, y, run.progress)
                    val = F.cross_entropy(closed_form_val_logits(w, g, h, hv, zv, run.lr, scale), yv)
                    learner.apply(val, leaves, ids, retain_graph=False)
            learner.pending = None
        finally:
            student.train(was_training)
