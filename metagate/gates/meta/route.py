"""The common base of the hypergradient routes: one look-ahead and its meta updates per call of :meth:`Route.step`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence

from torch import Tensor, nn

from metagate.gates.base import UnitView
from metagate.gates.meta.config import MetaConfig
from metagate.gates.meta.learner import WeightLearner
from metagate.gates.meta.lookahead import kd_logit_gradients
from metagate.gates.meta.sampler import ValSampler

#: ``(view, per-column logit gradients [N, J, C], unit scale)`` of a look-ahead: the real step's logit gradient is
#: then one product away (:attr:`metagate.gates.base.GateOutput.logit_grad`)
LogitGrads = tuple[UnitView, Tensor, Tensor | float]


class Route(ABC):
    """How the meta gate computes its hypergradient (chosen once at setup: :func:`.routes.choose_route`).

    :param student: the student (never moved by a route: parameters are read, buffers cloned or restored)
    :param names: the parameters of the virtual step
    :param learner: the learned weights and their meta update
    :param sampler: the validation batches
    :param config: the gate's options
    """

    #: the short name (:attr:`metagate.gates.meta.MetaGate.route`)
    name: str = "route"

    def __init__(self, student: nn.Module, names: Sequence[str], learner: WeightLearner, sampler: ValSampler,
                 config: MetaConfig) -> None:
        self.student, self.names, self.learner, self.sampler = student, list(names), learner, sampler
        self.tau, self.inner_iters, self.dtype = config.meta_tau, config.inner_iters, learner.dtype
        self._scale_key: tuple[int, int] | None = None
        self._scale: Tensor | float | None = None

    @abstractmethod
    def step(self, view: UnitView, x: Tensor, lr: float) -> LogitGrads | None:
        """Look-ahead(s) on one training batch and ``inner_iters`` updates of the gate's weights.

        :param view: the batch's view; ``view.student_logits`` from the real forward
        :param x: the batch's inputs ``[N, ...]`` (forwarded again unless the route reuses the real forward)
        :param lr: virtual step size (the student's current learning rate)
        :return: the per-column logit gradients when the route computed them (else ``None``)
        """

    def close(self) -> None:  # noqa: B027 - routes without hooks have nothing to release
        """Remove what the route attached to the student (forward hooks)."""

    def logit_grads(self, view: UnitView, student_log_probs: Tensor | None = None) -> Tensor:
        """``[N, 1+K, C]`` per-unit logit gradients of every loss column (analytic).

        :param student_log_probs: the view's student log-probabilities, if made (saves a softmax)
        """
        tlp = view.teacher_log_probs(self.tau) if view.teacher_log_probs_fn is not None else None
        if tlp is not None and tlp.dtype != self.dtype:  # keep a float64 student's gradients exact
            tlp = None
        return kd_logit_gradients(view.student_logits, None if tlp is not None else view.teacher_logits,
                                  view.labels, self.tau, tlp, student_log_probs)

    def unit_scale(self, mask: Tensor) -> Tensor | float:
        """``mask / sum(mask)``, a plain ``1/N`` when nothing is masked (cached while the trainer hands the same,
        unmodified mask tensor: one host sync per new mask, none per step)."""
        key = (id(mask), mask._version)
        if key != self._scale_key or self._scale is None:
            m = mask.to(self.dtype)
            self._scale = 1.0 / m.numel() if bool((m == 1).all()) else m / m.sum().clamp_min(1)
            self._scale_key, self._scale_mask = key, mask  # the reference keeps the id valid
        return self._scale
