"""The ``meta`` gate: per-unit loss mixing learned by a one-step look-ahead (ALM-KD / AMAL,
L2RW, Meta-Weight-Net).

Before the real step, the gate takes a virtual SGD step of the student on the ``W``-weighted
loss of the training batch (at the student's current learning rate), measures the clean CE
of a ``meta``-split batch at the virtual parameters, and moves its own parameters against
the hypergradient. The real step then uses the updated ``W`` (detached by the trainer).

The gate's parameters (:mod:`.params`) have their own optimizer (plain SGD for the table, as
AMAL; Adam for the net); the student's ``.grad`` is never touched by the meta step (only
``torch.autograd.grad`` is used) and the trainer detaches ``W`` for the real step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagate.errors import ConfigError
from metagate.features import NUM_FEATURES, unit_features
from metagate.gates.base import Gate, GateContext, GateOutput, StepContext, UnitView
from metagate.gates.meta.analytic import LinearLookahead, linear_hypergrad, plain_mlp_layers
from metagate.gates.meta.capture import ForwardCapture
from metagate.gates.meta.config import MetaConfig
from metagate.gates.meta.linearize import Linearization, linear_chain
from metagate.gates.meta.lookahead import (
    check_feature_protocol,
    closed_form_val_logits,
    features_and_logits,
    forward_features,
    func_lookahead_loss,
    higher_lookahead_loss,
    jvp_lookahead_hypergrad,
    kd_logit_gradients,
    resolve_names,
)
from metagate.gates.meta.params import (
    WeightNet,
    WeightTable,
    expand_columns,
    init_row,
    learned_init,
    normalize_weights,
)
from metagate.gates.meta.schedule import MetaSchedule
from metagate.gates.registry import register
from metagate.layout import channels_last, is_conv
from metagate.losses import unit_losses


@register("meta")
class MetaGate(Gate):
    """Bilevel per-unit weights over (label, teacher 1..K); options: :class:`.config.MetaConfig`.

    ``meta_param``: ``table`` (AMAL, per unit id) or ``net`` (Meta-Weight-Net over unit features);
    ``meta_columns``: ``all`` (label and every teacher), ``split`` (label vs one shared teacher weight) or
    ``label`` (label weight only; teachers held at ``meta_init_teacher``); ``meta_lookahead``: the parameters
    of the virtual step; ``meta_no_reuse``: the ``func`` backend runs the autograd reference path (double
    backward, or forward mode with batch norm) with a forward of its own instead of reusing the real step's.
    """


    config_class = MetaConfig

    def __init__(self, config: MetaConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        c = self.config
        self.product, self.meta_lr, self.inner_iters = c.meta_product, c.lr, c.inner_iters
        self.param_kind, self.backend, self.columns, self.transform = c.meta_param, c.backend, c.meta_columns, \
            c.meta_transform
        self.lookahead = "last" if self.backend == "closed-form" else c.meta_lookahead
        self.schedule = MetaSchedule(c.meta_schedule, c.meta_every)
        self.tau, self.init_label, self.init_teacher = c.meta_tau, c.meta_init_label, c.meta_init_teacher
        self.normalize, self.val_batch, self.hidden = c.meta_normalize, c.meta_val_batch, c.meta_hidden
        self.fit, self.reuse_forward = c.meta_fit, not c.meta_no_reuse
        self.param: nn.Module | None = None
        self._last_pass_epoch = -1
        self.updates = 0
        self._log_loss: Tensor | float = 0.0
        self._log_norm: Tensor | float = 0.0
        self._log_n = 0
        # (meta loss, hypergradient tensors) of recent updates, reduced in batches (no per-step work)
        self._hist: list[tuple[Tensor, list[Tensor]]] = []
        self._hist_done = 0  # leading entries of _hist already counted in the log sums
        self._pending: tuple[UnitView, Tensor] | None = None  # table rows after the meta update
        # (view, per-column logit gradients [N, J, C], unit scale) of the latest look-ahead: the real step's
        # logit gradient is then one product away (GateOutput.logit_grad)
        self._grads: tuple[UnitView, Tensor, Tensor | float] | None = None
        self._scale_key: tuple[int, int] | None = None
        self._scale: Tensor | float | None = None
        # the hand-written ("linear") look-ahead: its layers, what moves, and the real forward's inputs
        self._stack: list[nn.Linear] = []
        self._below: list[nn.Linear] | None = None  # MLP layers under the stack; None: features(x)
        self._stepped: list[tuple[bool, bool]] = []
        self._capture: ForwardCapture | None = None  # the stack's inputs in the real forward
        # the forward-mode route's J v by hand from the real forward's activations (None: forward-mode AD)
        self._lin: Linearization | None = None

    # -- setup -----------------------------------------------------------------------------------
    def setup(self, run: GateContext) -> None:
        self.run = run
        k = run.num_teachers
        if k < 1:
            raise ConfigError("the meta gate needs at least one teacher (--teachers K >= 1)")
        student = run.student
        self.dtype = next(student.parameters()).dtype
        self.num_teachers = k
        self.target_row = init_row(k, self.init_label, self.init_teacher)
        init = learned_init(self.target_row, self.columns)
        if self.param_kind == "table":
            self.param = WeightTable(run.num_train_units, init, self.transform)
        else:
            self.param = WeightNet(NUM_FEATURES, init, self.columns, self.hidden)
        self.param.to(device=run.device, dtype=self.dtype)
        # W is the table's raw rows themselves (AMAL's default): no autograd from W to the leaves
        self._raw_rows = (self.param_kind == "table" and self.transform == "clamp" and self.columns == "all"
                          and self.normalize == "none")
        # the table takes plain SGD steps on the touched rows only (as AMAL); the net uses Adam
        self.optimizer = torch.optim.Adam(self.param.parameters(), lr=self.meta_lr)
        self.names = resolve_names(student, self.lookahead)
        meta = run.meta
        self.meta_x, self.meta_y = meta.x.to(run.device, self.dtype), meta.y.to(run.device)
        self._gen = torch.Generator().manual_seed(7919 + int(run.seed))
        # shuffled once into a contiguous copy: each validation batch is then a slice (no gather, no copy)
        perm = torch.randperm(len(meta), generator=self._gen).to(run.device)
        self.meta_x, self.meta_y = self.meta_x.index_select(0, perm), self.meta_y.index_select(0, perm)
        self._order: Tensor = torch.empty(0, dtype=torch.long)  # start of each batch of the pass
        self._pos = 0  # the next batch of the pass; an empty order starts a pass
        # image batches of a conv student go channels-last: the same values, but the CPU conv/pool kernels
        # of the validation forward are ~2x faster than on NCHW (max-pooling NCHW is the slow part). The
        # price, with train-mode batch norm in float32: validation gradients within ~2e-3 (relative) of
        # float64 instead of ~4e-5, far below the minibatch noise of a hypergradient
        self._conv = self.meta_x.dim() == 4 and is_conv(student)
        # batch norm makes the double backward of the create_graph look-ahead costly (many elementwise
        # ops on the activations): with it, the func backend takes the forward-mode route (same result);
        # without it (plain MLPs) the double backward is the cheaper one
        self._forward_mode = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in student.modules())
        vb = self.val_batch or (1000 if self.schedule.kind == "amal" else run.batch_size)
        self._vb = min(vb, len(meta))
        if self.backend == "closed-form":
            check_feature_protocol(student)
        self._route = self._choose_route(student)

    def _choose_route(self, student: nn.Module) -> str:
        """How the look-ahead is computed: ``linear`` (by hand, :mod:`.analytic`: the head of a feature-protocol
        student, or any layers of a plain ReLU MLP), ``jvp`` (forward mode, with batch norm; its product by hand,
        :mod:`.linearize`, when the student is a chain of supported modules and the real forward is reused),
        ``autograd`` (``func``'s double backward) or ``higher``."""
        if self.backend == "higher":
            return "higher"
        if self.backend == "func" and not self.reuse_forward:  # the reference path, with a forward of its own
            return "jvp" if self._forward_mode else "autograd"
        mlp = plain_mlp_layers(student)
        if mlp is not None:
            self._setup_linear(student, mlp, is_mlp=True)
            return "linear"
        if callable(getattr(student, "features", None)) and isinstance(getattr(student, "head", None), nn.Linear) \
                and set(self.names) <= {"head.weight", "head.bias"}:  # always so for closed-form
            self._setup_linear(student, [student.head], is_mlp=False)
            return "linear"
        if not self._forward_mode:
            return "autograd"
        chain = linear_chain(student)
        if self.backend == "func" and self.product == "forward" and Linearization.covers(chain, self.names):
            assert chain is not None
            self._lin = Linearization(chain, self.names)
        return "jvp"

    def _setup_linear(self, student: nn.Module, layers: list[nn.Linear], is_mlp: bool) -> None:
        """The stack of the hand-written look-ahead: ``layers`` (a plain MLP's, or the head alone) from the lowest
        one that moves; forward hooks keep the real forward's inputs of its layers.

        :param is_mlp: ``layers`` are all the layers of a plain MLP (else the head of a feature-protocol student)
        """
        names = {id(p): n for n, p in student.named_parameters()}
        stepped = [(names[id(lin.weight)] in self.names, lin.bias is not None and names[id(lin.bias)] in self.names)
                   for lin in layers]
        low = min(i for i, st in enumerate(stepped) if any(st))
        self._stack, self._stepped = layers[low:], stepped[low:]
        self._below = layers[:low] if is_mlp else None
        self._capture = ForwardCapture(self._stack)

    def _next_val(self) -> tuple[Tensor, Tensor]:
        """The next ``meta``-split batch (seeded); never ``select``.

        The split was shuffled once at setup; each pass starts at a random offset below the batch size
        and visits the contiguous batches after it in a random order, so batches are slices (a gather
        of a 128x784 batch costs ~50 us, 5% of a small MLP's step) and their members still mix
        between passes.
        """
        if self._pos >= len(self._order):
            n, vb = len(self.meta_y), self._vb
            offset = int(torch.randint(0, n - vb + 1 if n < 2 * vb else vb, (1,), generator=self._gen))
            chunks = (n - offset) // vb
            self._order = offset + vb * torch.randperm(chunks, generator=self._gen)
            self._pos = 0
        a = int(self._order[self._pos])
        self._pos += 1
        xv, yv = self.meta_x[a : a + self._vb], self.meta_y[a : a + self._vb]
        return (channels_last(xv) if self._conv else xv), yv

    # -- weights ---------------------------------------------------------------------------------
    def live_weights(self, ids: Tensor | None, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor,
                     progress: float, mask: Tensor | None = None) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """``W [N, 1+K]`` with a graph to the leaves that the meta update moves.

        :return: ``(W, leaves, ids)``; leaves are the table's gathered rows (``[N, J]``) or the
            net's parameters
        """
        assert self.param is not None, "setup() first"
        if isinstance(self.param, WeightTable):
            if ids is None:
                raise ConfigError("the meta table needs unit ids; use --meta-param net for batches without ids")
            leaf = self.param.rows(ids)
            raw, leaves = self.param.transform_rows(leaf), [leaf]
        else:
            assert teacher_logits is not None
            feats = unit_features(student_logits, teacher_logits, labels, progress).to(self.dtype)
            raw, leaves = self.param(feats), list(self.param.parameters())
        w = expand_columns(raw, self.num_teachers, self.columns, self.target_row)
        return normalize_weights(w, self.normalize, self.target_row, mask), leaves, ids

    def _view_weights(self, view: UnitView) -> tuple[Tensor, list[Tensor], Tensor | None]:
        if not view.num_teachers:
            raise ConfigError("the meta gate needs teacher logits")
        # the table never reads the teachers' logits: do not make the view gather them
        t = None if isinstance(self.param, WeightTable) else view.teacher_logits
        return self.live_weights(view.ids, view.student_logits, t, view.labels, view.progress,
                                 view.mask)

    def weights(self, view: UnitView) -> GateOutput:
        pending, self._pending = self._pending, None
        if pending is not None and pending[0] is view and self._raw_rows:  # W is the rows just written
            return self._output(view, pending[1])
        with torch.no_grad():
            if pending is not None and pending[0] is view:  # the table rows the meta update just wrote
                assert self.param is not None
                w = expand_columns(self.param.transform_rows(pending[1]), self.num_teachers, self.columns,
                                   self.target_row)
                w = normalize_weights(w, self.normalize, self.target_row, view.mask)
            else:
                w = self._view_weights(view)[0].detach()
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

    #: positive by construction (clamped table, sigmoid/softmax, sigmoid net); a NaN still surfaces in
    #: the trainer's finite-loss check, which then runs the weight check
    trusted_weights = True

    # -- meta updates ----------------------------------------------------------------------------
    def before_step(self, ctx: StepContext) -> None:
        tr = ctx.run
        epoch, in_epoch = ctx.step // tr.steps_per_epoch, ctx.step % tr.steps_per_epoch
        if self.schedule.full_pass(epoch, in_epoch) and epoch != self._last_pass_epoch:
            self._last_pass_epoch = epoch
            self.amal_pass(tr)
        if self.schedule.per_step(ctx.step):
            self.meta_step(ctx.view, ctx.batch.x, tr.lr)

    def meta_step(self, view: UnitView, x: Tensor, lr: float) -> None:
        """Look-ahead(s) on one training batch and updates of the gate's parameters.

        :param view: the batch's view; ``view.student_logits`` from the real forward
        :param x: the batch's inputs ``[N, ...]`` (forwarded again unless the forward is reused)
        :param lr: virtual step size
        """
        if self._route == "linear":
            self._linear_step(view, x, lr)
            return
        student = self.run.student
        xv, yv = self._next_val()
        reuse = self.backend == "func" and self.reuse_forward and view.student_logits.requires_grad
        if self._route == "jvp":  # first-order backward + Jacobian-vector product
            g = self._logit_grads(view, view.student_log_probs)
            scale = self._unit_scale(view.mask)
            self._grads = (view, g, scale)
            # channels-last convs are ~2x faster for plain forwards (the difference product), but train-mode
            # batch norm on that layout is ~100x less precise in float32 (relative error 1e-4 vs 4e-7), and
            # forward mode is no faster on it: the exact product keeps the batch as it is
            xt = channels_last(x) if self._conv and x.dim() == 4 and self.product == "difference" else x
            # J v by hand from the real forward's activations (~4x cheaper than forward mode, as precise: its batch
            # norm reductions are its own), when the hooks kept those of view.student_logits; else forward mode
            jv_fn = self._lin.product(view.student_logits) if self._lin is not None and reuse else None
            if self._lin is not None:
                self._lin.active = False  # the look-ahead's own forwards keep nothing
            try:
                for _ in range(self.inner_iters):
                    w, leaves, ids = self._view_weights(view)
                    val, dw = jvp_lookahead_hypergrad(student, w, g, xt, xv, yv, lr, self.names, scale,
                                                      train_logits=view.student_logits if reuse else None,
                                                      product=self.product, jv_fn=jv_fn)
                    self._apply_grads(val, self._leaf_grads(w, leaves, dw), ids, view)
            finally:
                if self._lin is not None:
                    self._lin.active = True
            return

        def loss_fn(z: Tensor) -> Tensor:
            return unit_losses(z, view.teacher_logits, view.labels, self.tau, validate=False)

        for _ in range(self.inner_iters):
            w, leaves, ids = self._view_weights(view)
            if self._route == "autograd":
                val = func_lookahead_loss(student, w, loss_fn, x, xv, yv, lr, self.names, view.mask,
                                          train_logits=view.student_logits if reuse else None)
            else:
                val = higher_lookahead_loss(student, w, loss_fn, x, xv, yv, lr, self.names, view.mask)
            self._apply(val, leaves, ids, retain_graph=reuse, view=view)

    def _linear_step(self, view: UnitView, x: Tensor, lr: float) -> None:
        """The look-ahead by hand (:mod:`.analytic`); autograd only from ``W`` to the table rows / net
        when ``W`` is not the rows themselves."""
        lsm = view.student_log_probs  # made with its graph: the real step reuses it for its CE column
        with torch.no_grad():
            # the training side first, while the real forward's tensors are still in cache
            g = self._logit_grads(view, lsm)
            scale = self._unit_scale(view.mask)
            self._grads = (view, g, scale)
            train_inputs = self._train_inputs(view, x)
            xv, yv = self._next_val()
            la = LinearLookahead(self._stack, train_inputs, self._val_input(xv), self._stepped)
            for _ in range(self.inner_iters):
                if self._raw_rows and view.ids is not None:
                    w = self.param.raw.index_select(0, view.ids)  # type: ignore[union-attr]
                    val, dw = linear_hypergrad(la, w, g, yv, lr, scale)
                    self._apply_grads(val, [dw], view.ids, view)
                    continue
                with torch.enable_grad():  # a graph from W to the net / transformed rows
                    w, leaves, ids = self._view_weights(view)
                val, dw = linear_hypergrad(la, w, g, yv, lr, scale)
                self._apply_grads(val, self._leaf_grads(w, leaves, dw), ids, view)

    def _train_inputs(self, view: UnitView, x: Tensor) -> list[Tensor]:
        """The stack's inputs in the real forward that made ``view.student_logits`` (kept by the hooks),
        or, when those logits came from elsewhere, from a forward of ``x`` without a graph."""
        n = view.num_units
        kept = self._capture.kept_for(view.student_logits) if self._capture is not None else None
        if kept is not None:
            return [k.input for k in kept]
        student = self.run.student
        if self._below is None:
            return [features_and_logits(student, x)[0]]
        a, ins = x.reshape(n, -1), []
        for lin in self._below + self._stack:  # under no_grad
            ins.append(a)
            a = F.linear(a, lin.weight, lin.bias).relu_()
        return ins[len(self._below):]

    def _val_input(self, xv: Tensor) -> Tensor:
        """The lowest stacked layer's input for the validation batch at the current parameters."""
        if self._below is None:  # the head of a feature-protocol student (batch-norm statistics untouched)
            return features_and_logits(self.run.student, xv)[0]
        a = xv.reshape(xv.shape[0], -1)
        for lin in self._below:  # under no_grad
            a = F.linear(a, lin.weight, lin.bias).relu_()
        return a

    def _logit_grads(self, view: UnitView, student_log_probs: Tensor | None = None) -> Tensor:
        """``[N, 1+K, C]`` per-unit logit gradients of every loss column (analytic).

        :param student_log_probs: the view's student log-probabilities, if made (saves a softmax)
        """
        tlp = view.teacher_log_probs(self.tau) if view.teacher_log_probs_fn is not None else None
        if tlp is not None and tlp.dtype != self.dtype:  # keep a float64 student's gradients exact
            tlp = None
        return kd_logit_gradients(view.student_logits, None if tlp is not None else view.teacher_logits,
                                  view.labels, self.tau, tlp, student_log_probs)

    def _unit_scale(self, mask: Tensor) -> Tensor | float:
        """``mask / sum(mask)``, a plain ``1/N`` when nothing is masked (cached while the trainer hands
        the same, unmodified mask tensor: one host sync per new mask, none per step)."""
        key = (id(mask), mask._version)
        if key != self._scale_key or self._scale is None:
            m = mask.to(self.dtype)
            self._scale = 1.0 / m.numel() if bool((m == 1).all()) else m / m.sum().clamp_min(1)
            self._scale_key, self._scale_mask = key, mask  # the reference keeps the id valid
        return self._scale

    @staticmethod
    def _grads_wrt(out: Tensor, leaves: list[Tensor], grad_out: Tensor | None = None,
               retain_graph: bool = False) -> list[Tensor]:
        """``d out / d leaves`` (times ``grad_out``), zeros for leaves ``out`` does not reach."""
        return [torch.zeros_like(p) if g is None else g
                for p, g in zip(leaves, torch.autograd.grad(out, leaves, grad_out, retain_graph=retain_graph,
                                                            allow_unused=True))]

    @classmethod
    def _leaf_grads(cls, w: Tensor, leaves: list[Tensor], dw: Tensor) -> list[Tensor]:
        if len(leaves) == 1 and w is leaves[0]:  # clamp table, all columns, no normalisation: W = rows
            return [dw]
        return cls._grads_wrt(w, leaves, dw)

    def _apply(self, val: Tensor, leaves: list[Tensor], ids: Tensor | None, retain_graph: bool,
               view: UnitView | None = None) -> None:
        """Hypergradient of ``val`` w.r.t. ``leaves`` and one meta update (table rows or net)."""
        self._apply_grads(val, self._grads_wrt(val, leaves, retain_graph=retain_graph), ids, view)

    def _apply_grads(self, val: Tensor, grads: list[Tensor], ids: Tensor | None, view: UnitView | None) -> None:
        assert self.param is not None
        if isinstance(self.param, WeightTable):
            assert ids is not None
            rows = self.param.sgd_rows(ids, grads[0], self.meta_lr)
            self._pending = (view, rows) if view is not None else None
        else:
            for p, g in zip(self.param.parameters(), grads):
                p.grad = g
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        self._hist.append((val.detach(), grads))
        if len(self._hist) >= self.HIST_FLUSH:
            self._flush_hist()

    #: updates whose (loss, hypergradient) are kept before they are reduced into the log sums
    HIST_FLUSH = 256

    @staticmethod
    def _norm(grads: list[Tensor]) -> Tensor:
        return torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))

    def _flush_hist(self) -> None:
        """Reduce the kept updates into the log sums: a few batched ops, no host sync."""
        new = self._hist[self._hist_done:]
        if not new:
            return
        losses = torch.stack([v for v, _ in new])
        if all(len(g) == 1 for _, g in new):  # the table: one [n, J] tensor per update
            norms = torch.stack(torch._foreach_norm([g[0] for _, g in new]))
        else:
            norms = torch.stack([self._norm(g) for _, g in new])
        self._log_loss = self._log_loss + losses.sum()
        self._log_norm = self._log_norm + norms.sum()
        self._log_n += len(new)
        self._hist, self._hist_done = self._hist[-1:], 1  # keep the latest for last_meta_loss/_norm

    @property
    def last_meta_loss(self) -> float:
        """Validation CE at the look-ahead of the latest meta update."""
        return float(self._hist[-1][0]) if self._hist else float("nan")

    @property
    def last_hypergrad_norm(self) -> float:
        """L2 norm of the latest hypergradient (w.r.t. the touched table rows or the net)."""
        return float(self._norm(self._hist[-1][1])) if self._hist else float("nan")

    def amal_pass(self, run: GateContext) -> None:
        """AMAL's periodic full pass (closed form, student frozen in eval mode; see :mod:`.schedule`)."""
        student, bank = run.student, run.bank
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
                    t, y = bank.lookup(ids), run.train_y[ids]
                    g = kd_logit_gradients(z, t, y, self.tau)
                    scale = torch.full((ids.numel(),), 1.0 / ids.numel(), device=z.device, dtype=z.dtype)
                    parts.append((ids, h, z, t, y, g, scale))
                ids, h, z, t, y, g, scale = (torch.cat(c) for c in zip(*parts))
                xv, yv = self._next_val()
                with torch.no_grad():
                    hv, zv = forward_features(student, xv)
                for _ in range(self.inner_iters):
                    w, leaves, _ = self.live_weights(ids, z, t, y, run.progress)
                    val = F.cross_entropy(closed_form_val_logits(w, g, h, hv, zv, run.lr, scale), yv)
                    self._apply(val, leaves, ids, retain_graph=False)
            self._pending = None
        finally:
            student.train(was_training)

    # -- bookkeeping -----------------------------------------------------------------------------
    def parameters(self) -> list[nn.Parameter]:
        return [] if self.param is None else list(self.param.parameters())

    def state_dict(self) -> dict[str, Any]:
        assert self.param is not None
        return {"param": self.param.state_dict(), "optimizer": self.optimizer.state_dict(),
                "updates": self.updates, "last_pass_epoch": self._last_pass_epoch,
                "val_rng": self._gen.get_state(), "val_order": self._order, "val_pos": self._pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        assert self.param is not None
        self.param.load_state_dict(state["param"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates, self._last_pass_epoch = int(state["updates"]), int(state["last_pass_epoch"])
        self._gen.set_state(state["val_rng"])
        self._order, self._pos = state["val_order"], int(state["val_pos"])

    def hparams(self) -> dict[str, Any]:
        # the resolved values of the options left unset
        return {**super().hparams(), "meta_backend": self.backend, "meta_lr": self.meta_lr,
                "meta_inner_iters": self.inner_iters}

    def log(self, logger: Any, step: int) -> None:
        self._flush_hist()
        if self._log_n:
            logger.scalar("meta/loss", float(self._log_loss) / self._log_n, step)
            logger.scalar("meta/hypergrad_norm", float(self._log_norm) / self._log_n, step)
        logger.scalar("meta/updates", float(self.updates), step)
        if isinstance(self.param, WeightTable):
            raw = self.param.raw.detach()
            for j in range(raw.shape[1]):
                logger.histogram(f"meta/table_raw/col{j}", raw[:, j], step)
        self._log_loss, self._log_norm, self._log_n = 0.0, 0.0, 0
