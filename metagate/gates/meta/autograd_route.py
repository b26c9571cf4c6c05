"""The reference routes: autograd through the virtual step's graph (``func``'s double backward, or ``higher``)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from metagate.gates.base import UnitView
from metagate.gates.meta.config import MetaConfig
from metagate.gates.meta.learner import WeightLearner
from metagate.gates.meta.lookahead import LossFn, func_lookahead_loss, higher_lookahead_loss
from metagate.gates.meta.route import Route
from metagate.gates.meta.sampler import ValSampler


class AutogradRoute(Route):
    """:func:`.lookahead.func_lookahead_loss` (``create_graph``), differentiated w.r.t. the gate's leaves; it
    reuses the real forward's logits (and keeps their graph for the real step) unless ``--meta-no-reuse``."""

    name = "autograd"

    def __init__(self, student: nn.Module, names: Sequence[str], learner: WeightLearner, sampler: ValSampler,
                 config: MetaConfig) -> None:
        super().__init__(student, names, learner, sampler, config)
        self.reuse = not config.meta_no_reuse

    def step(self, view: UnitView, x: Tensor, lr: float) -> None:
        learner = self.learner
        xv, yv = self.sampler.next()
        reuse = self.reuse and view.student_logits.requires_grad

        def loss_fn(z: Tensor) -> Tensor:
            return view.loss_columns(z, self.tau)

        for _ in range(self.inner_iters):
            w, leaves, ids = learner.of_view(view)
            val = self.lookahead_loss(view, w, loss_fn, x, xv, yv, lr, reuse)
            learner.apply(val, leaves, ids, retain_graph=reuse, view=view)
        return None

    def lookahead_loss(self, view: UnitView, w: Tensor, loss_fn: LossFn, x: Tensor, xv: Tensor, yv: Tensor,
                       lr: float, reuse: bool) -> Tensor:
        """The validation CE at the virtual parameters, differentiable w.r.t. ``w``."""
        return func_lookahead_loss(self.student, w, loss_fn, x, xv, yv, lr, self.names, view.mask,
                                   train_logits=view.student_logits if reuse else None)


class HigherRoute(AutogradRoute):
    """The same look-ahead through ``higher.innerloop_ctx`` (a forward of its own)."""

    name = "higher"

    def __init__(self, student: nn.Module, names: Sequence[str], learner: WeightLearner, sampler: ValSampler,
                 config: MetaConfig) -> None:
        super().__init__(student, names, learner, sampler, config)
        self.reuse = False

    def lookahead_loss(self, view: UnitView, w: Tensor, loss_fn: LossFn, x: Tensor, xv: Tensor, yv: Tensor,
                       lr: float, reuse: bool) -> Tensor:
        return higher_lookahead_loss(self.student, w, loss_fn, x, xv, yv, lr, self.names, view.mask)
