"""One-step look-ahead hypergradients as pure functions (three backends).

All backends compute the *outer* loss ``CE_val(theta')`` at the virtually updated student

    theta' = theta - lr * grad_theta  reduce_weighted(loss_fn(student(x)), W, mask)

as a scalar that is differentiable with respect to ``W`` (``[N, 1+K]``). The caller then
differentiates it w.r.t. whatever parameterises ``W``. The step is plain SGD (no momentum,
no weight decay), at the student's current learning rate.

* :func:`func_lookahead_loss` -- ``torch.func.functional_call`` with ``create_graph``; the
  look-ahead covers all parameters or a named subset (the rest held constant). It can reuse
  the logits of the real step's forward (``train_logits``) so the training batch is not
  forwarded twice.
* :func:`higher_lookahead_loss` -- the same through ``higher.innerloop_ctx`` (reference).
* :func:`closed_form_val_logits` -- AMAL's last-layer look-ahead in closed form: no
  second-order graph, only per-unit logit gradients and penultimate features. It needs the
  **feature protocol** of :mod:`metagate.models`: the student exposes ``features(x) -> [B, D]``
  and ``head`` (an ``nn.Linear(D, C)``) with ``forward(x) == head(features(x))``.
* :func:`jvp_lookahead_hypergrad` -- the ``func`` hypergradient by forward mode (no double backward); its
  Jacobian-vector product can come by hand from the real forward's activations (:mod:`.linearize`).

The gate's fast path for linear layers (the head, or a plain ReLU MLP) differentiates by hand:
:mod:`.analytic`.

Neither backend moves the real student's parameters or buffers: parameters are detached
copies, and batch-norm buffers are cloned (``func``) or snapshotted and restored
(``higher``: :func:`frozen_buffers`; closed form: :func:`features_and_logits`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import Tensor, nn
from torch.func import functional_call

from metagate.errors import ConfigError
from metagate.losses import reduce_weighted
from metagate.units import flat_logits, unit_ce

#: ``loss_fn(student_logits [N, C]) -> unit losses [N, 1+K]``
LossFn = Callable[[Tensor], Tensor]

_EYES: dict[tuple[int, torch.dtype, torch.device], Tensor] = {}


def _eye(num_classes: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    key = (num_classes, dtype, device)
    eye = _EYES.get(key)
    if eye is None:
        eye = _EYES[key] = torch.eye(num_classes, dtype=dtype, device=device)
    return eye


def one_hot(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """``[N, C]`` one-hot rows of ``dtype`` (rows of a cached identity: one op per call)."""
    return _eye(num_classes, dtype, labels.device).index_select(0, labels)


def one_hot_t(labels: Tensor, num_classes: int, dtype: torch.dtype) -> Tensor:
    """``[C, N]`` one-hot columns, contiguous (columns of the cached identity)."""
    return _eye(num_classes, dtype, labels.device).index_select(1, labels)


def cloned_buffers(model: nn.Module) -> dict[str, Tensor]:
    """Copies of ``model``'s buffers by name, for a ``functional_call`` whose batch-norm statistics must not move
    the real student's."""
    return {n: b.clone() for n, b in model.named_buffers()}


@contextmanager
def frozen_buffers(model: nn.Module) -> Iterator[None]:
    """Run a block and then restore every buffer of ``model`` that it changed.

    Only changed buffers are written back: batch-norm running statistics are saved for the
    backward pass of the real step's forward, and an in-place write would invalidate it.
    """
    saved = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, s in saved:
                if not torch.equal(b, s):
                    b.copy_(s)


def resolve_names(model: nn.Module, spec: str | Sequence[str]) -> list[str]:
    """Parameter names covered by the look-ahead.

    :param spec: ``all``; ``last`` (the ``head`` of the feature protocol, or else the last two
        parameter tensors); or prefixes, as a list or a comma-separated string (``"head,fc.1"``)
    :return: names in ``model.named_parameters()`` order
    """
    names = [n for n, _ in model.named_parameters()]
    if isinstance(spec, str):
        if spec == "all":
            return names
        if spec == "last":
            head = [n for n in names if n.startswith("head.")]
            return head or names[-2:]
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    chosen = [n for n in names if any(n == p or n.startswith(p.rstrip(".") + ".") for p in spec)]
    if not chosen:
        raise ConfigError(f"--meta-lookahead {','.join(spec)!r} matches no student parameter; "
                          f"parameters are: {', '.join(names)}")
    return chosen


def func_lookahead_loss(
    model: nn.Module,
    weights: Tensor,
    loss_fn: LossFn,
    x: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    lr: float,
    names: Sequence[str] | None = None,
    mask: Tensor | None = None,
    train_logits: Tensor | None = None,
) -> Tensor:
    """Validation CE after a virtual SGD step, via ``torch.func.functional_call``.

    :param model: the student (its parameters and buffers are not modified)
    :param weights: ``[N, 1+K]`` weights with a graph to what parameterises them
    :param loss_fn: ``logits [N, C] -> unit losses [N, 1+K]``
    :param x: ``[N, ...]`` training inputs (unused when ``train_logits`` is given)
    :param val_x: ``[M, ...]`` clean validation inputs
    :param val_y: ``[M]`` validation labels
    :param lr: virtual step size (the student's current learning rate)
    :param names: parameters stepped (``None`` = all); the others are held constant
    :param mask: ``[N]`` unit mask or ``None``
    :param train_logits: logits of ``x`` from the *real* forward at the current parameters
        (still attached to the student's graph); reused instead of a second forward. The
        caller must keep that graph alive (``retain_graph=True``) if it backpropagates it later.
    :return: scalar mean CE on ``(val_x, val_y)`` at ``theta'``, differentiable w.r.t. ``weights``
    """
    named = dict(model.named_parameters())
    names = list(named) if names is None else list(names)
    buffers = cloned_buffers(model)  # BN stats of the virtual step
    if train_logits is not None:
        leaves = [named[n] for n in names]
        logits = train_logits
    else:
        leaves = [named[n].detach().requires_grad_(True) for n in names]
        state = {n: p.detach() for n, p in named.items()}
        state.update(zip(names, leaves))
        state.update(buffers)
        logits = functional_call(model, state, (x,))
    inner = reduce_weighted(loss_fn(flat_logits(logits)), weights, mask, validate=False)  # sequences: token units
    grads = torch.autograd.grad(inner, leaves, create_graph=True, allow_unused=True)
    new = {n: p.detach() - lr * g for n, p, g in zip(names, leaves, grads) if g is not None}
    head = getattr(model, "head", None)
    if isinstance(head, nn.Linear) and callable(getattr(model, "features", None)) and \
            set(new) <= {"head.weight", "head.bias"}:
        # only the head moves: forward the validation batch's features once, without a graph
        hv, _ = features_and_logits(model, val_x)
        head_state = {n: p.detach() for n, p in head.named_parameters()}
        head_state.update({n[len("head."):]: v for n, v in new.items()})
        return F.cross_entropy(functional_call(head, head_state, (hv,)), val_y)
    state = {n: p.detach() for n, p in named.items()}
    state.update(new)
    state.update(buffers)
    return unit_ce(functional_call(model, state, (val_x,)), val_y)  # sequences: mean over real tokens


def jvp_lookahead_hypergrad(
    model: nn.Module,
    weights: Tensor,
    logit_grads: Tensor,
    x: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    lr: float,
    names: Sequence[str] | None = None,
    scale: Tensor | float = 1.0,
    train_logits: Tensor | None = None,
    product: str = "forward",
    step: float = 1e-3,
    jv_fn: Callable[[dict[str, Tensor]], Tensor] | None = None,
) -> tuple[Tensor, Tensor]:
    """The :func:`func_lookahead_loss` hypergradient without a second-order graph.

    The inner gradient is linear in ``W``: ``grad = J^T G`` with ``J = d z / d theta`` (the
    training logits) and ``G_i = scale_i sum_j w_ij g_ij`` (``g_ij``: :func:`kd_logit_gradients`).
    With ``v = grad_theta' CE_val(theta')`` the hypergradient is therefore

        d CE_val / d w_ij = -lr * scale_i * <g_ij, (J v)_i>

    and ``J v`` is one forward-mode product (``torch.func.jvp``). Cost: a first-order backward
    of the training batch (through the real forward's graph when ``train_logits`` is given, which
    is kept for the real step), a forward and backward of the validation batch at ``theta'``, and
    a forward-mode pass of the training batch; no double backward (which batch norm makes costly).
    Exact for losses whose per-unit logit gradients are ``logit_grads`` (the gate's loss columns).

    :param weights: ``[N, J]`` (used detached); :param logit_grads: ``[N, J, C]``
    :param x: training inputs ``[N, ...]`` (forwarded with cloned buffers for the product)
    :param scale: ``[N]`` or scalar reduction factor of each unit (``mask_i / sum mask``)
    :param train_logits: the real forward's logits of ``x`` (graph kept), else ``x`` is forwarded
    :param product: how ``J v`` is computed: ``forward`` (forward-mode AD, exact) or ``difference``
        (central difference ``(z(theta + e v) - z(theta - e v)) / 2e``: two plain forwards, which on
        CPU cost less than one forward-mode pass through convolutions and batch norm; error ``O(e^2)``)
    :param step: ``difference`` only: the parameter step ``e |v|`` relative to ``|theta|`` (of the moved
        parameters)
    :param jv_fn: ``forward`` only: ``J v`` of the training logits from the moved parameters' tangents by name
        (``[N, C]``), made by hand from the real forward's activations (:mod:`.linearize`); ``None``: forward mode
    :return: ``(val CE, d val CE / d weights [N, J])``, detached
    """
    named = dict(model.named_parameters())
    names = list(named) if names is None else list(names)
    s = scale.reshape(-1, 1) if torch.is_tensor(scale) else scale
    g = torch.bmm(weights.detach().unsqueeze(1), logit_grads).squeeze(1) * s  # dL/dz [N, C]
    const = {n: p.detach() for n, p in named.items()}
    with torch.enable_grad():
        if train_logits is None:
            leaves = [named[n].detach().requires_grad_(True) for n in names]
            state = {**const, **dict(zip(names, leaves)), **cloned_buffers(model)}
            train_logits = functional_call(model, state, (x,))
            grads = torch.autograd.grad(train_logits, leaves, g, allow_unused=True)
        else:
            grads = torch.autograd.grad(train_logits, [named[n] for n in names], g, retain_graph=True,
                                        allow_unused=True)
        moved = [n for n, gr in zip(names, grads) if gr is not None]
        new = [(const[n] - lr * gr).requires_grad_(True) for n, gr in zip(names, grads) if gr is not None]
        state = {**const, **dict(zip(moved, new)), **cloned_buffers(model)}
        val = F.cross_entropy(functional_call(model, state, (val_x,)), val_y)
        v = torch.autograd.grad(val, new)
    with torch.no_grad():
        if product == "difference":
            jv = _difference_product(model, const, moved, list(v), x, step)
        elif jv_fn is not None:
            jv = jv_fn(dict(zip(moved, v)))
        else:
            with fwAD.dual_level():  # forward mode: J v in one pass over the training batch
                state = {**const, **{n: fwAD.make_dual(const[n], t) for n, t in zip(moved, v)},
                         **cloned_buffers(model)}
                jv = fwAD.unpack_dual(functional_call(model, state, (x,))).tangent
        dw = torch.bmm(logit_grads, jv.unsqueeze(-1)).squeeze(-1) * (s * -lr)
    return val.detach(), dw


def _difference_product(model: nn.Module, const: dict[str, Tensor], moved: list[str], v: list[Tensor], x: Tensor,
                        step: float) -> Tensor:
    """``J v`` of the training logits by a central difference (buffers cloned; the same random stream for
    both forwards, so dropout draws the same masks)."""
    p_norm = torch.sqrt(sum((const[n] * const[n]).sum() for n in moved))
    v_norm = torch.sqrt(sum((t * t).sum() for t in v))
    e = float(step * p_norm.clamp_min(1.0) / v_norm.clamp_min(1e-30))
    outs = []
    with torch.random.fork_rng(devices=[x.device] if x.device.type == "cuda" else []):
        rng = torch.get_rng_state()
        for sign in (1.0, -1.0):
            torch.set_rng_state(rng)
            state = {**const, **{n: const[n] + (sign * e) * t for n, t in zip(moved, v)},
                     **cloned_buffers(model)}
            outs.append(functional_call(model, state, (x,)))
    return (outs[0] - outs[1]) / (2.0 * e)


def higher_lookahead_loss(
    model: nn.Module,
    weights: Tensor,
    loss_fn: LossFn,
    x: Tensor,
    val_x: Tensor,
    val_y: Tensor,
    lr: float,
    names: Sequence[str] | None = None,
    mask: Tensor | None = None,
) -> Tensor:
    """The same look-ahead through ``higher.innerloop_ctx`` with an SGD inner optimizer.

    Arguments as :func:`func_lookahead_loss` (no forward reuse). ``higher`` shares the real
    module's buffers, so they are snapshotted and restored around the virtual step.
    """
    import higher

    named = dict(model.named_parameters())
    names = list(named) if names is None else list(names)
    opt = torch.optim.SGD([named[n] for n in names], lr=lr)
    with frozen_buffers(model), higher.innerloop_ctx(model, opt, copy_initial_weights=True,
                                                     track_higher_grads=True) as (fmodel, diffopt):
        inner = reduce_weighted(loss_fn(fmodel(x)), weights, mask, validate=False)
        diffopt.step(inner)
        return F.cross_entropy(fmodel(val_x), val_y)


def kd_logit_gradients(logits: Tensor, teacher_logits: Tensor | None, labels: Tensor, tau: float,
                       teacher_log_probs: Tensor | None = None, student_log_probs: Tensor | None = None) -> Tensor:
    """Analytic :func:`logit_gradients` of :func:`metagate.losses.unit_losses` (scalar ``tau``).

    ``d CE / dz = softmax(z) - onehot(y)``; ``d tau^2 KL(p_t || softmax(z/tau)) / dz =
    tau * (softmax(z/tau) - softmax(t/tau))``.

    :param logits: ``[N, C]``; :param teacher_logits: ``[N, K, C]``; :param labels: ``[N]``
    :param teacher_log_probs: optional ``log_softmax(t / tau)`` ``[N, K, C]`` (the bank's cache);
        used instead of ``teacher_logits`` when given
    :param student_log_probs: optional ``log_softmax(logits)`` (e.g. the view's, which the real step
        reuses): its ``exp`` replaces a softmax
    :return: ``[N, 1+K, C]``
    """
    z = logits.detach()
    p_s = student_log_probs.detach().exp() if student_log_probs is not None else _softmax_rows(z)
    ce = p_s.sub_(one_hot(labels, z.shape[-1], z.dtype))
    q = _softmax_rows(z / tau)
    if teacher_log_probs is not None:
        p = teacher_log_probs.to(z.dtype).exp()
    else:
        assert teacher_logits is not None
        p = torch.softmax(teacher_logits.to(z.dtype) / tau, -1)
    kd = (q.unsqueeze(1) - p).mul_(tau)
    return torch.cat([ce.unsqueeze(1), kd], 1)


def _softmax_rows(z: Tensor) -> Tensor:
    """``softmax(z, -1)`` of ``[N, C]``, by the dim-0 kernel on the transposed view: faster on CPU when
    ``C`` is small (equal up to float rounding; the result has ``z``'s layout)."""
    return torch.softmax(z.t(), 0).t()


def logit_gradients(logits: Tensor, loss_fn: LossFn) -> Tensor:
    """Per-unit gradient of every loss column w.r.t. the unit's own logits.

    :param logits: ``[N, C]`` (detached inside)
    :return: ``[N, J, C]`` with ``J = 1+K`` loss columns
    """
    z = logits.detach().requires_grad_(True)
    with torch.enable_grad():
        losses = loss_fn(z)
        cols = [torch.autograd.grad(losses[:, j].sum(), z, retain_graph=j + 1 < losses.shape[1])[0]
                for j in range(losses.shape[1])]
    return torch.stack(cols, 1)


def closed_form_val_logits(
    weights: Tensor,
    logit_grads: Tensor,
    features: Tensor,
    val_features: Tensor,
    val_logits: Tensor,
    lr: float,
    scale: Tensor | float,
) -> Tensor:
    """Validation logits after a virtual SGD step of the last linear layer only (AMAL).

    With ``G_i = scale_i * sum_j w_ij g_ij`` (``g_ij`` the gradient of loss column ``j`` w.r.t.
    unit ``i``'s logits), the head's gradient is ``dW = G^T H`` and ``db = sum_i G_i``, so

        z_val' = z_val - lr * (H_val H^T + 1) G

    :param weights: ``[N, J]`` (differentiable)
    :param logit_grads: ``[N, J, C]`` from :func:`logit_gradients`
    :param features: ``[N, D]`` penultimate features of the training units
    :param val_features: ``[M, D]`` penultimate features of the validation batch
    :param val_logits: ``[M, C]`` validation logits at the current parameters
    :param lr: virtual step size
    :param scale: ``[N]`` or scalar reduction factor of each unit (``mask_i / sum mask``)
    :return: ``[M, C]`` shifted validation logits, differentiable w.r.t. ``weights``
    """
    s = scale.reshape(-1, 1) if torch.is_tensor(scale) else scale
    g = (weights.unsqueeze(-1) * logit_grads).sum(1) * s  # [N, C]
    kernel = val_features @ features.T + 1.0  # [M, N]
    return val_logits - lr * (kernel @ g)


def check_feature_protocol(model: nn.Module) -> None:
    """Raise :class:`ConfigError` unless ``model`` has ``features(x)`` and a linear ``head``."""
    if not (callable(getattr(model, "features", None)) and isinstance(getattr(model, "head", None), nn.Linear)):
        raise ConfigError(f"the closed-form meta backend needs a student with features(x) and a linear "
                          f"`head` (see metagate.models); {type(model).__name__} has none")


def forward_features(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """``(features(x), head(features(x)))`` of a feature-protocol model (moves BN stats in train mode)."""
    check_feature_protocol(model)
    h = model.features(x)  # type: ignore[operator]
    return h, model.head(h)  # type: ignore[operator]


def features_and_logits(model: nn.Module, x: Tensor) -> tuple[Tensor, Tensor]:
    """Penultimate features ``[B, D]`` and logits ``[B, C]`` in the model's current mode, with
    cloned buffers (``functional_call``): the real batch-norm statistics are neither moved nor
    written, so a pending backward of the real step stays valid. No gradient is recorded."""
    check_feature_protocol(model)
    if next(model.buffers(), None) is None:  # nothing to protect: call the protocol directly
        with torch.no_grad():
            h = model.features(x)  # type: ignore[operator]
            return h, model.head(h)  # type: ignore[operator]
    captured: list[Tensor] = []
    handle = model.head.register_forward_hook(lambda mod, inp, out: captured.append(inp[0]))  # type: ignore[union-attr]
    try:
        state = {n: p.detach() for n, p in model.named_parameters()}
        state.update(cloned_buffers(model))
        with torch.no_grad():
            z = functional_call(model, state, (x,))
    finally:
        handle.remove()
    return captured[-1], z
