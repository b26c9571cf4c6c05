"""The forward-mode look-ahead (students with batch norm): a first-order backward and a Jacobian-vector product
instead of a double backward (:func:`.lookahead.jvp_lookahead_hypergrad`)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

from metagate.gates.base import UnitView
from metagate.gates.meta.config import MetaConfig
from metagate.gates.meta.learner import WeightLearner
from metagate.gates.meta.linearize import Linearization, linear_chain
from metagate.gates.meta.lookahead import jvp_lookahead_hypergrad
from metagate.gates.meta.route import LogitGrads, Route
from metagate.gates.meta.sampler import ValSampler
from metagate.layout import channels_last


class JvpRoute(Route):
    """``J v`` by hand from the real forward's activations (:class:`.linearize.Linearization`: ``jvp-by-hand``),
    by forward-mode AD (``jvp-forward-mode``) or by a central difference of two forwards (``jvp-difference``).

    :param product: ``forward`` or ``difference``
    :param by_hand: ``forward`` only: the product by hand, when the student is a chain of supported modules that
        holds every moved parameter (:meth:`.linearize.Linearization.covers`) and the real forward is reused; a
        batch whose logits are not the hooked forward's still takes forward mode
    """

    def __init__(self, student: nn.Module, names: Sequence[str], learner: WeightLearner, sampler: ValSampler,
                 config: MetaConfig, product: str = "forward", by_hand: bool = False) -> None:
        super().__init__(student, names, learner, sampler, config)
        self.product, self.reuse = product, not config.meta_no_reuse
        self.conv = sampler.channels_last
        self.linearization: Linearization | None = None
        if by_hand:
            chain = linear_chain(student)
            assert chain is not None and product == "forward"
            self.linearization = Linearization(chain, self.names)
        self.name = "jvp-by-hand" if by_hand else f"jvp-{'difference' if product == 'difference' else 'forward-mode'}"

    def close(self) -> None:
        if self.linearization is not None:
            self.linearization.remove()

    def step(self, view: UnitView, x: Tensor, lr: float) -> LogitGrads:
        learner, lin = self.learner, self.linearization
        xv, yv = self.sampler.next()
        reuse = self.reuse and view.student_logits.requires_grad
        g = self.logit_grads(view, view.student_log_probs)
        scale = self.unit_scale(view.mask)
        # channels-last convs are faster for plain forwards (the difference product), but train-mode batch norm
        # on that layout is far less precise in float32, and forward mode is no faster on it: the exact product
        # keeps the batch as it is
        xt = channels_last(x) if self.conv and x.dim() == 4 and self.product == "difference" else x
        # J v by hand when the hooks kept the activations of view.student_logits; else forward mode
        jv_fn = lin.product(view.student_logits) if lin is not None and reuse else None
        if lin is not None:
            lin.active = False  # the look-ahead's own forwards keep nothing
        try:
            for _ in range(self.inner_iters):
                w, leaves, ids = learner.of_view(view)
                val, dw = jvp_lookahead_hypergrad(self.student, w, g, xt, xv, yv, lr, self.names, scale,
                                                  train_logits=view.student_logits if reuse else None,
                                                  product=self.product, jv_fn=jv_fn)
                learner.apply_grads(val, learner.leaf_grads(w, leaves, dw), ids, view)
        finally:
            if lin is not None:
                lin.active = True
        return view, g, scale
