"""The exact Jacobian-vector product of a supported student's logits, from the real forward's activations.

The forward-mode look-ahead (:func:`.lookahead.jvp_lookahead_hypergrad`) needs ``J v``: the derivative of the
training batch's logits along a direction ``v`` of the moved parameters. Forward-mode AD recomputes the primal
forward beside the tangent (on CPU, through convolutions and batch norm, several times a plain forward). Here the
tangent is propagated by hand through a chain of supported modules, reading the primal activations that forward
hooks kept from the real step's forward: no primal is recomputed, and the reductions are our own (see the batch-norm rule).

Tangent rules (``u``: a module's input, ``t``: its tangent, ``dW, db``: the tangents of its moved parameters,
zero for constant ones; a module below every moved parameter has ``t = 0``):

* ``Conv2d`` / ``Linear``: ``t_out = f(u; dW, db) + f(t; W)`` (the second only when ``t`` is nonzero);
* ``BatchNorm`` with batch statistics (train mode): ``x = (u - mean) r``, ``r = (var_biased + eps)^-1/2`` over
  every dimension but the channels, ``dx = r (t - mean(t) - x mean(x t))``, ``t_out = gamma dx + dgamma x +
  dbeta``; with running statistics (eval mode): ``dx = r t``;
* ``ReLU``: ``t * 1[out > 0]``; ``MaxPool2d``: ``t`` gathered at the forward's argmax (the indices autograd
  saved, else those of ``max_pool2d_with_indices``: the same tie-breaking); ``Flatten``: a reshape.

Supported students (:func:`linear_chain`): :class:`metagate.models.CNN` and :class:`metagate.models.MLP` (with or
without batch norm) whose ``features``/``forward`` are the library's own, built from the modules above. Any other
student keeps forward-mode AD.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagate.gates.meta.capture import ForwardCapture, Kept
from metagate.models import CNN, MLP, FeatureModel

#: module types with a tangent rule (exact types: a subclass may change ``forward``)
SUPPORTED: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.ReLU,
                                          nn.MaxPool2d, nn.Flatten)

#: ``grad * 1[act > 0]`` in one kernel (ReLU's backward)
_relu_mask = torch.ops.aten.threshold_backward

#: ``J v``: tangents of the moved parameters by name -> ``[N, C]`` tangent of the logits
ProductFn = Callable[[dict[str, Tensor]], Tensor]


def linear_chain(model: nn.Module) -> list[tuple[str, nn.Module]] | None:
    """The modules whose composition is ``model``'s forward, head last, with their qualified names.

    :return: ``[(name, module)]`` in forward order, or ``None`` when the student is not a library CNN/MLP built
        only from :data:`SUPPORTED` modules (the caller then keeps forward-mode AD)
    """
    if not isinstance(model, FeatureModel) or type(model).forward is not FeatureModel.forward:
        return None
    if type(model).features is CNN.features and isinstance(model, CNN):
        bodies = ["conv", "fc"]  # the flat-input reshape comes before the first module: its input is kept
    elif type(model).features is MLP.features and isinstance(model, MLP):
        bodies = ["body"]
    else:
        return None
    chain: list[tuple[str, nn.Module]] = []
    for body in bodies:
        seq = getattr(model, body, None)
        if not isinstance(seq, nn.Sequential):
            return None
        for name, mod in seq.named_modules(prefix=body):
            if type(mod) is nn.Sequential:  # containers: their children follow in forward order
                continue
            if type(mod) not in SUPPORTED or (type(mod) is nn.ReLU and mod.inplace):  # in place: inputs overwritten
                return None
            if isinstance(mod, nn.MaxPool2d) and mod.return_indices:
                return None
            chain.append((name, mod))
    if type(model.head) is not nn.Linear:
        return None
    chain.append(("head", model.head))
    return chain


def _kept_output(module: nn.Module, output: Tensor) -> Tensor | None:
    """What a tangent rule reads besides the input: max-pooling's argmax (the indices autograd saved, if any;
    else ``None`` and the rule recomputes them), every other module's output."""
    if isinstance(module, nn.MaxPool2d):
        gf = output.grad_fn
        return getattr(gf, "_saved_result1", None) if type(gf).__name__ == "MaxPool2DWithIndicesBackward0" else None
    return output.detach()


class Linearization(ForwardCapture):
    """``J v`` of the student's logits from the activations of its real forward (kept by forward hooks).

    Only the modules from the lowest one with a moved parameter are hooked (below it every tangent is zero).

    :param chain: from :func:`linear_chain`
    :param moved: names of the parameters that take the virtual step (the tangent's support)
    """

    def __init__(self, chain: Sequence[tuple[str, nn.Module]], moved: Sequence[str]) -> None:
        stepped = set(moved)
        names = [[f"{name}.{p}" if f"{name}.{p}" in stepped else None for p in ("weight", "bias")]
                 for name, _ in chain]
        low = min(i for i, nm in enumerate(names) if any(nm))
        self.names = names[low:]
        super().__init__([m for _, m in chain[low:]], extra=_kept_output)

    @staticmethod
    def covers(chain: Sequence[tuple[str, nn.Module]] | None, moved: Sequence[str]) -> bool:
        """Whether every moved parameter belongs to a module of ``chain`` (else the product would miss it)."""
        if chain is None or not moved:
            return False
        own = {f"{name}.{p}" for name, m in chain for p, _ in m.named_parameters(recurse=False)}
        return set(moved) <= own

    def product(self, logits: Tensor) -> ProductFn | None:
        """``J v`` at the forward that made ``logits``, or ``None`` when the kept activations are not all from
        that forward (another forward ran since, or capture was paused): the caller then runs forward mode.

        :param logits: ``[N, C]`` the real forward's logits (the head's output)
        """
        kept = self.kept_for(logits)
        if kept is None:
            return None
        return lambda tangents: chain_jvp(self.mods, self.names, kept, tangents)


def chain_jvp(mods: Sequence[nn.Module], names: Sequence[Sequence[str | None]],
              kept: Sequence[Kept], tangents: dict[str, Tensor]) -> Tensor:
    """The tangent of the chain's output along ``tangents`` (run under ``torch.no_grad()``).

    :param mods: the chain's modules from the lowest one that moves
    :param names: per module, the names of its moved (weight, bias), ``None`` when constant
    :param kept: per module, what its hook kept from one forward (``extra``: its output, or max-pooling's indices)
    :param tangents: the moved parameters' tangents by name (shapes of the parameters)
    :return: the output's tangent (``[N, C]`` logits)
    """
    t: Tensor | None = None
    for i, mod in enumerate(mods):
        _, u, extra, training = kept[i]
        nw, nb = names[i]
        dw = tangents.get(nw) if nw is not None else None
        db = tangents.get(nb) if nb is not None else None
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            assert extra is not None
            t = _affine_tangent(mod, u, extra, t, dw, db)
        elif isinstance(mod, nn.modules.batchnorm._BatchNorm):
            t = _batch_norm_tangent(mod, u, t, dw, db, training)
        elif t is None:  # parameter-free modules carry a zero tangent as zero
            continue
        elif isinstance(mod, nn.ReLU):
            assert extra is not None
            t = _relu_mask(t, extra, 0.0)
        elif isinstance(mod, nn.MaxPool2d):
            t = _pool_tangent(mod, u, t, extra)
        else:  # Flatten
            t = t.flatten(mod.start_dim, mod.end_dim)
    if t is None:  # no moved parameter had a tangent
        head_out = kept[-1].extra
        assert head_out is not None
        return torch.zeros_like(head_out)
    return t


def _affine_tangent(mod: nn.Conv2d | nn.Linear, u: Tensor, out: Tensor, t: Tensor | None, dw: Tensor | None,
                    db: Tensor | None) -> Tensor | None:
    """``f(u; dW, db) + f(t; W)`` of a convolution or linear layer ``f`` (``None``: a zero tangent).

    :param u: the layer's input (``[N, C_in, H, W]`` or ``[N, in]``); :param out: its output (for the shape)
    :param t: the input's tangent, shaped as ``u``
    """
    f = _conv if isinstance(mod, nn.Conv2d) else _linear
    if dw is not None and dw.stride() != mod.weight.stride():
        # dW in the weight's own layout: a channels-last dW (the gradient of the channels-last validation pass) can
        # make the convolution's output channels-last, and elementwise ops over mixed layouts are several times slower
        dw = torch.empty_like(mod.weight).copy_(dw)
    res = f(mod, u, dw, db) if dw is not None else None
    if t is not None:
        inner = f(mod, t, mod.weight, db if dw is None else None)
        res = inner if res is None else res.add_(inner)
    elif res is None and db is not None:  # a moved bias alone, nothing moving below
        res = db.reshape([1, -1] + [1] * (out.dim() - 2)).expand_as(out).clone()
    return res


def _conv(mod: nn.Conv2d, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``mod``'s convolution with weight ``w`` and bias ``b`` (its own stride, padding, dilation, groups)."""
    return mod._conv_forward(x, w, b)


def _linear(mod: nn.Linear, x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
    """``x w^T + b`` (``mod`` only for the signature shared with :func:`_conv`)."""
    return F.linear(x, w, b)


def _batch_norm_tangent(mod: nn.modules.batchnorm._BatchNorm, u: Tensor, t: Tensor | None, dgamma: Tensor | None,
                        dbeta: Tensor | None, training: bool) -> Tensor | None:
    """Tangent of batch norm's output.

    With batch statistics (train mode, or no running statistics) the mean and variance depend on ``u``:
    ``dx = r (t - mean(t) - x mean(x t))``. The statistics are recomputed from ``u`` by our own two-pass
    reductions in ``u``'s layout (the CPU kernel on channels-last float32 loses precision).

    :param u: the input ``[N, C, ...]``; :param t: its tangent (``None``: zero)
    :param dgamma: ``[C]`` tangent of the scale; :param dbeta: ``[C]`` of the shift
    :param training: the module's mode during the forward
    """
    dims = [0] + list(range(2, u.dim()))
    shape = [1, -1] + [1] * (u.dim() - 2)
    batch = training or mod.running_mean is None
    # x = uc r with uc = u - mean: uc is formed (when x enters the tangent) and r folded into x's coefficient
    need_x = dgamma is not None or (batch and t is not None)
    uc = None
    if batch:  # two passes (mean, then the centred square): var_mean's Welford kernel is much slower on NCHW
        uc = u - u.mean(dims, keepdim=True)
        r = torch.rsqrt((uc * uc).mean(dims) + mod.eps)
    else:
        assert mod.running_mean is not None and mod.running_var is not None
        r = torch.rsqrt(mod.running_var + mod.eps)
        if need_x:
            uc = u - mod.running_mean.reshape(shape)
    gamma_r = r if mod.weight is None else mod.weight * r
    # t_out = a t + b x + c with per-channel a, b, c; the batch statistics' terms fold into b and c:
    # gamma r (t - mean(t) - x mean(x t)) = gamma r t - (gamma r mean(x t)) x - gamma r mean(t)
    b, c = dgamma, dbeta
    if t is not None and batch:
        assert uc is not None
        m_xt = (uc * t).mean(dims) * r
        b = -gamma_r * m_xt if b is None else b - gamma_r * m_xt
        m_t = t.mean(dims)
        c = -gamma_r * m_t if c is None else c - gamma_r * m_t
    out = uc.mul_((b * r).reshape(shape)) if b is not None and uc is not None else None  # in place: uc is ours
    if t is not None:
        out = t * gamma_r.reshape(shape) if out is None else out.addcmul_(t, gamma_r.reshape(shape))
    if c is not None:
        out = c.reshape(shape).expand_as(u).clone() if out is None else out.add_(c.reshape(shape))
    return out


def _pool_tangent(mod: nn.MaxPool2d, u: Tensor, t: Tensor, indices: Tensor | None) -> Tensor:
    """``t`` at the forward's argmax of each window (indices into each ``H x W`` plane).

    :param u: the pooling's input ``[N, C, H, W]`` (pooled again for the indices when autograd kept none)
    :param indices: ``[N, C, H', W']`` from the forward's graph, or ``None``
    """
    if indices is None:
        _, indices = F.max_pool2d(u, mod.kernel_size, mod.stride, mod.padding, mod.dilation, mod.ceil_mode,
                                  return_indices=True)
    n, c = t.shape[:2]
    return t.reshape(n, c, -1).gather(2, indices.reshape(n, c, -1)).reshape(indices.shape)
