"""The ``meta`` gate: per-unit loss mixing learned by a one-step look-ahead (ALM-KD / AMAL, L2RW, Meta-Weight-Net).

Before the real step, the gate takes a virtual SGD step of the student on the ``W``-weighted loss of the training
batch (at the student's current learning rate), measures the clean CE of a ``meta``-split batch at the virtual
parameters, and moves its own parameters against the hypergradient. The real step then uses the updated ``W``
(detached by the trainer).

The gate wires together its learned weights (:mod:`.learner` over :mod:`.params`), the validation batches
(:mod:`.sampler`), the schedule (:mod:`.schedule`) and the route that computes the hypergradient (:mod:`.routes`,
chosen once at setup). The student's ``.grad`` is never touched by the meta step (only ``torch.autograd.grad``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from metagate.errors import ConfigError
from metagate.gates.base import Gate, GateContext, GateOutput, StepContext, UnitView
from metagate.gates.meta.config import MetaConfig
from metagate.gates.meta.learner import WeightLearner
from metagate.gates.meta.linear_route import LinearRoute
from metagate.gates.meta.lookahead import resolve_names
from metagate.gates.meta.route import LogitGrads, Route
from metagate.gates.meta.routes import build_route, choose_route
from metagate.gates.meta.sampler import ValSampler
from metagate.gates.meta.schedule import MetaSchedule
from metagate.gates.registry import register
from metagate.layout import is_conv


@register("meta")
class MetaGate(Gate):
    """Bilevel per-unit weights over (label, teacher 1..K); options: :class:`.config.MetaConfig`.

    ``meta_param``: ``table`` (AMAL, per unit id) or ``net`` (Meta-Weight-Net over unit features); ``meta_columns``:
    ``all`` (label and every teacher), ``split`` (label vs one shared teacher weight) or ``label`` (label weight
    only; teachers held at ``meta_init_teacher``); ``meta_lookahead``: the parameters of the virtual step;
    ``meta_no_reuse``: the ``func`` backend runs the autograd reference path (double backward, or forward mode with
    batch norm) with a forward of its own instead of reusing the real step's.

    After :meth:`setup`, :attr:`route` names how the hypergradient is computed (one of
    :data:`.routes.ROUTES`) and :attr:`route_reason` says why; :meth:`use_route` replaces it (e.g. by the
    ``autograd`` reference).
    """

    config_class = MetaConfig
    config: MetaConfig
    # set by setup
    learner: WeightLearner
    sampler: ValSampler
    strategy: Route  #: the route's strategy object

    #: positive by construction (clamped table, sigmoid/softmax, sigmoid net); a NaN still surfaces in the
    #: trainer's finite-loss check, which then runs the weight check
    trusted_weights = True

    def __init__(self, config: MetaConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.schedule = MetaSchedule(self.config.meta_schedule, self.config.meta_every)
        self.tau = self.config.meta_tau
        self.route: str | None = None  #: the route's short name (set by setup)
        self.route_reason = ""  #: why setup chose it
        self._last_pass_epoch = -1
        self._route_logged = False
        self._grads: LogitGrads | None = None  # the latest look-ahead's, for the real step on its batch

    def setup(self, run: GateContext) -> None:
        c = self.config
        if run.num_teachers < 1:
            raise ConfigError("the meta gate needs at least one teacher (--teachers K >= 1)")
        student = run.student
        dtype = next(student.parameters()).dtype
        self.learner = WeightLearner(c, run.num_teachers, run.num_train_units, run.device, dtype)
        self.names = resolve_names(student, c.lookahead)
        val_batch_size = c.meta_val_batch or (1000 if self.schedule.kind == "amal" else run.batch_size)
        self.sampler = ValSampler(run.meta, val_batch_size, run.seed, run.device, dtype, conv=is_conv(student))
        self.student = student
        route, reason = choose_route(student, c, self.names)
        self.use_route(route, reason)

    def use_route(self, route: str, reason: str = "chosen by use_route") -> None:
        """Compute the hypergradient by ``route`` from now on (after :meth:`setup`; e.g. ``autograd``: the
        reference double backward, reusing the real forward unless ``--meta-no-reuse``).

        :raises ConfigError: an unknown route, or one that cannot serve this student (:func:`.routes.build_route`)
        """
        strategy = build_route(route, self.student, self.names, self.learner, self.sampler, self.config)
        if self.route is not None:  # release the hooks of the route it replaces
            self.strategy.close()
        self.strategy, self.route, self.route_reason = strategy, strategy.name, reason

    # -- weights ---------------------------------------------------------------------------------------
    def weights(self, view: UnitView) -> GateOutput:
        w = self.learner.decided(view)
        if view.is_sequence:  # padding tokens get no weight (the reduction masks them anyway)
            w = w * view.mask.to(w.dtype).unsqueeze(1)
        return self._output(view, w)

    def _output(self, view: UnitView, w: Tensor) -> GateOutput:
        """The decision, with the real step's logit gradient ``scale_i sum_j w_ij g_ij`` when this batch's
        look-ahead left its per-column gradients (the trainer then skips differentiating the loss columns)."""
        grads, self._grads = self._grads, None
        if grads is None or grads[0] is not view or grads[1].dtype != w.dtype:
            return GateOutput(w, self.tau)
        _, g, scale = grads
        with torch.no_grad():
            lg = torch.bmm(w.unsqueeze(1), g).squeeze(1)
            lg = lg.mul_(scale.unsqueeze(1) if torch.is_tensor(scale) else scale)
        return GateOutput(w, self.tau, logit_grad=lg)

    # -- meta updates ----------------------------------------------------------------------------------
    def before_step(self, ctx: StepContext) -> None:
        run = ctx.run
        epoch, in_epoch = ctx.step // run.steps_per_epoch, ctx.step % run.steps_per_epoch
        if self.schedule.full_pass(epoch, in_epoch) and epoch != self._last_pass_epoch:
            self._last_pass_epoch = epoch
            self.amal_pass(run)
        if self.schedule.per_step(ctx.step):
            self.meta_step(ctx.view, ctx.batch.x, run.lr)

    def meta_step(self, view: UnitView, x: Tensor, lr: float) -> None:
        """Look-ahead(s) on one training batch and updates of the gate's parameters (:meth:`.route.Route.step`)."""
        self._grads = self.strategy.step(view, x, lr)

    def amal_pass(self, run: GateContext) -> None:
        """AMAL's periodic full pass (closed form; :meth:`.linear_route.LinearRoute.amal_pass`)."""
        if not isinstance(self.strategy, LinearRoute):
            raise ConfigError(f"the AMAL pass needs the closed-form (linear) route, not {self.route!r}")
        self.strategy.amal_pass(run)

    # -- bookkeeping -----------------------------------------------------------------------------------
    @property
    def param(self) -> nn.Module:
        """The weight parameterisation (:class:`.params.WeightTable` or :class:`.params.WeightNet`)."""
        return self.learner.param

    @property
    def updates(self) -> int:
        """Meta updates so far."""
        return self.learner.updates

    @property
    def last_hypergrad_norm(self) -> float:
        """L2 norm of the latest hypergradient (w.r.t. the touched table rows or the net)."""
        return self.learner.last_hypergrad_norm

    def parameters(self) -> list[nn.Parameter]:
        return [] if self.route is None else list(self.learner.param.parameters())  # [] before setup

    def state_dict(self) -> dict[str, Any]:
        return {**self.learner.state_dict(), "last_pass_epoch": self._last_pass_epoch,
                **self.sampler.state_dict(prefix="val_")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.learner.load_state_dict(state)
        self._last_pass_epoch = int(state["last_pass_epoch"])
        self.sampler.load_state_dict(state, prefix="val_")

    def hparams(self) -> dict[str, Any]:
        # the resolved values of the options left unset, and the route setup chose
        c = self.config
        learner = getattr(self, "learner", None)
        init = {} if learner is None else {"meta_init_label": float(learner.target_row[0]),
                                           "meta_init_teacher": float(learner.target_row[1])}
        return {**super().hparams(), "meta_backend": c.backend, "meta_lr": c.lr, "meta_inner_iters": c.inner_iters,
                "meta_route": self.route, **init}

    def log(self, logger: Any, step: int) -> None:
        if not self._route_logged:
            logger.text("meta/route", f"{self.route}: {self.route_reason}", step,
                        description="how the meta gate computes its hypergradient (chosen at setup), and why")
            self._route_logged = True
        self.learner.log(logger, step)
