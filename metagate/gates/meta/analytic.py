"""Look-ahead hypergradients written out by hand over linear layers (no autograd, no second-order graph).

Two cases are covered, both exactly what the ``func`` backend computes (tested to 1e-10):

* the **head** of any feature-protocol student (:mod:`metagate.models`): AMAL's closed form, and
  ``func`` with ``--meta-lookahead last``;
* **any layers of a plain ReLU MLP** (:func:`plain_mlp_layers`): ``func`` over all parameters or a
  subset.

Notation: linear layers ``l = 1..L`` (the head last) with ReLU between them,
``u_l = a_{l-1} W_l^T + b_l`` and ``a_l = relu(u_l)``; ``a_{l-1}`` are the training batch's inputs
of layer ``l`` at the current parameters (``[N, in_l]``, from the real forward), ``a'_{l-1}`` the
validation batch's (``[M, in_l]``). The virtual SGD step (size ``lr``) on the W-weighted training
loss moves the stepped layers by

    W_l' = W_l - D_l^T a_{l-1},    b_l' = b_l - sum_i D_l,i,
    D_L = lr * G   (G_i = s_i sum_j w_ij g_ij,  g_ij = d loss_ij / d logits_i,  s_i = mask_i / sum mask),
    D_{l-1} = (D_l W_l) * 1[a_{l-1} > 0],

and the validation batch is forwarded at theta': ``u_l' = a'_{l-1} W_l'^T + b_l'``. Its CE is
differentiated by hand. With ``e_L = softmax(u_L') - onehot(y_val)`` (``M * d CE / d u_L'``) and
``e_{l-1} = (e_l W_l') * 1[u_{l-1}' > 0]``,

    r_l = a_{l-1} (e_l^T a'_{l-1})^T + 1 sum_m e_l,m        (-M d CE / d D_l, through layer l's step)
    t_l = r_l + (t_{l-1} * 1[a_{l-1} > 0]) W_l^T             (plus through the layers below)

so ``d CE / d w_ij = -(lr s_i / M) <g_ij, t_L,i>``. The lowest stepped layer's validation input is
a constant of the step; when that layer is wide (an MLP's input layer) its large products are
replaced by the data kernel ``K = a'_0 a_0^T`` (``[M, N]``, one product of the size of a forward):
``u_1' = a'_0 W_1^T + b_1 - K D_1 - 1 sum D_1`` and ``r_1 = K^T e_1 + 1 sum e_1``. The look-ahead
over all layers of a one-hidden-layer MLP then costs two products of the input layer's size
(the validation forward and ``K``) instead of four.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagate.gates.meta.lookahead import one_hot_t
from metagate.models import MLP, FeatureModel

#: ``grad * 1[act > 0]`` in one kernel (ReLU's backward)
_relu_mask = torch.ops.aten.threshold_backward


def plain_mlp_layers(model: nn.Module) -> list[nn.Linear] | None:
    """The linear layers (head last) of a :class:`metagate.models.MLP` without batch norm, whose
    ``features`` is exactly ``Flatten, (Linear, ReLU)*``; ``None`` for any other student."""
    if not isinstance(model, MLP) or type(model).features is not MLP.features \
            or type(model).forward is not FeatureModel.forward or next(model.buffers(), None) is not None:
        return None
    mods = list(model.body)
    if not mods or not isinstance(mods[0], nn.Flatten) or (mods[0].start_dim, mods[0].end_dim) != (1, -1) \
            or len(mods) % 2 != 1:
        return None
    pairs = [mods[i : i + 2] for i in range(1, len(mods), 2)]
    if not all(isinstance(a, nn.Linear) and type(b) is nn.ReLU for a, b in pairs):
        return None
    return [a for a, _ in pairs] + [model.head]


class LinearLookahead:
    """The look-ahead of one step over a stack of linear layers with ReLU between them (head last).

    Built once per step (the constants: weights, the kernel); :meth:`hypergrad` then runs once per
    inner iteration. Use both under ``torch.no_grad()`` (the layers' parameters are used as they are).
    Everything is computed feature-major (``[features, units]``, e.g. logits as ``[C, M]``): CPU matrix
    products with ``C`` output rows are faster than with ``C`` output columns, and so is the softmax
    over dim 0.

    :param layers: the layers from the lowest stepped one up to the head
    :param train_inputs: each layer's training-batch input at the current parameters (``[N, in_l]``)
    :param val_input: the lowest layer's validation input ``[M, in_1]`` (nothing below it moves)
    :param stepped: per layer, whether its (weight, bias) take the virtual step
    """

    def __init__(self, layers: Sequence[nn.Linear], train_inputs: Sequence[Tensor], val_input: Tensor,
                 stepped: Sequence[tuple[bool, bool]]) -> None:
        self.w = [lin.weight for lin in layers]
        self.b = [lin.bias for lin in layers]
        self.a = list(train_inputs)
        self.stepped = [(sw, sb and b is not None) for (sw, sb), b in zip(stepped, self.b)]
        self.val_t = val_input.t()
        n, m = self.a[0].shape[0], val_input.shape[0]
        out0, in0 = self.w[0].shape
        # data kernel for the lowest layer when it is cheaper than forming its step explicitly
        self.kernel = self.stepped[0][0] and m * n * (in0 + 2 * out0) < (2 * n + m) * in0 * out0
        self.K = self._centered_kernel(val_input) if self.kernel else None  # [M, N]
        self.base_t = _affine_t(self.w[0], self.b[0], self.val_t) if (self.kernel or not self.stepped[0][0]) \
            else None

    def _centered_kernel(self, val_input: Tensor) -> Tensor:
        """``K - (rank-one terms)``: the kernel of the inputs centred on the training batch's mean ``mu``.

        ``K = Kc + k_val 1^T + 1 k_train^T + k_c 1 1^T`` with ``Kc = (a'_0 - mu)(a_0 - mu)^T``. Raw image inputs
        share a large common part (e.g. the background), so ``K``'s entries are large and nearly equal; in
        float32 their rounding would swamp the small differences the look-ahead depends on. The rank-one
        terms are applied separately (exactly).
        """
        mu = self.a[0].mean(0)
        xc, vc = self.a[0] - mu, val_input - mu
        self.k_val, self.k_train, self.k_c = vc @ mu, xc @ mu, mu @ mu
        return vc @ xc.t()

    def hypergrad(self, d_top: Tensor, val_y: Tensor) -> tuple[Tensor, Tensor]:
        """Validation CE at theta' and its gradient w.r.t. the step ``D_L = lr * G`` (``-t_L^T / M``).

        Training-side quantities of the hidden layers are unit-major (``[N, out_l]``, like the inputs
        ``a_{l-1}`` whose ReLU masks they take: an elementwise op over mixed layouts is several times slower),
        validation-side ones and the head's feature-major.

        :param d_top: ``[C, N]`` ``(lr * G)^T``, the step's gradient w.r.t. the training logits
        :param val_y: ``[M]`` validation labels
        :return: ``(val CE, d CE / d D_L^T [C, N])``
        """
        w, a, top = self.w, self.a, len(self.w) - 1
        if not top and self.base_t is None:  # the head's weight moves: the common case, written out
            return self._head(d_top, val_y)
        d: list[Tensor] = [d_top.t()] * (top + 1)  # unit-major [N, out_l]
        for lay in range(top, 0, -1):  # the step's deltas down to the lowest stepped layer
            d[lay - 1] = _relu_mask(d[lay] @ w[lay], a[lay], 0.0)
        xs, ws = self._forward(d)
        lsm = torch.log_softmax(xs[-1], 0)  # [C, M]
        val = F.nll_loss(lsm.t(), val_y)
        e = lsm.exp_().sub_(one_hot_t(val_y, lsm.shape[0], lsm.dtype))
        r: list[Tensor | None] = [None] * (top + 1)
        for lay in range(top, -1, -1):
            r[lay] = self._direct(lay, e, xs[lay])
            if lay:
                e = _relu_mask(ws[lay].t() @ e, xs[lay], 0.0)
        t = r[0]
        for lay in range(1, top + 1):  # through the step's deltas of the layers below
            below = None if t is None else _relu_mask(t, a[lay], 0.0)  # [N, in_l]
            rl = r[lay]
            if below is None:
                t = rl
            elif lay == top:
                t = w[lay] @ below.t() if rl is None else torch.addmm(rl, w[lay], below.t())
            else:
                t = below @ w[lay].t() if rl is None else torch.addmm(rl, below, w[lay].t())
        assert t is not None
        return val, t * (-1.0 / val_y.shape[0])

    def _head(self, d: Tensor, val_y: Tensor) -> tuple[Tensor, Tensor]:
        """:meth:`hypergrad` when the stack is the head alone and its weight moves (fewer Python steps)."""
        h, x, b, sb = self.a[0], self.val_t, self.b[0], self.stepped[0][1]
        wl = torch.addmm(self.w[0], d, h, alpha=-1)
        if b is None:
            u = wl @ x
        else:
            u = torch.addmm((b - d.sum(1) if sb else b).unsqueeze(1), wl, x)
        lsm = torch.log_softmax(u, 0)
        val = F.nll_loss(lsm.t(), val_y)
        e = lsm.exp_().sub_(one_hot_t(val_y, lsm.shape[0], lsm.dtype))
        grad_w = e @ x.t()
        m = -1.0 / val_y.shape[0]
        return val, (torch.addmm(e.sum(1, keepdim=True), grad_w, h.t(), beta=m, alpha=m) if sb
                     else (grad_w @ h.t()).mul_(m))

    def _forward(self, d: list[Tensor]) -> tuple[list[Tensor], list[Tensor]]:
        """Validation forward at theta': every layer's input (then the logits), ``[in_l, M]``, and the
        layers' weights at theta'."""
        xs, ws = [self.val_t], []
        for lay, (sw, sb) in enumerate(self.stepped):
            x, dl = xs[-1], d[lay]
            if lay == 0 and self.base_t is not None:
                if sw:  # u' = base - K D - [bias] 1 sum D, with K's rank-one terms written out
                    assert self.K is not None
                    s0 = dl.sum(0)
                    col = torch.addmv(s0 * (self.k_c + sb), dl.t(), self.k_train)
                    u = torch.addr(torch.addmm(self.base_t - col.unsqueeze(1), dl.t(), self.K.t(), alpha=-1),
                                   s0, self.k_val, alpha=-1)
                else:
                    u = self.base_t if not sb else self.base_t - dl.sum(0).unsqueeze(1)
                ws.append(self.w[0])  # unused: nothing below the lowest layer
            else:
                wl = torch.addmm(self.w[lay], dl.t(), self.a[lay], alpha=-1) if sw else self.w[lay]
                bl = self.b[lay]
                if sb:
                    assert bl is not None
                    bl = bl - dl.sum(0)
                u = _affine_t(wl, bl, x)
                ws.append(wl)
            xs.append(torch.relu(u) if lay + 1 < len(self.stepped) else u)
        return xs, ws

    def _direct(self, lay: int, e: Tensor, x: Tensor) -> Tensor | None:
        """``r_l``: through layer ``l``'s own step (``None`` when it does not move); ``[C, N]`` for the head,
        else unit-major ``[N, out_l]``."""
        sw, sb = self.stepped[lay]
        if not (sw or sb):
            return None
        top = lay == len(self.w) - 1
        e_sum = e.sum(1, keepdim=True)  # [out, 1]
        n = self.a[lay].shape[0]
        if not sw:
            return e_sum.expand(-1, n) if top else e_sum.t().expand(n, -1)
        if lay == 0 and self.K is not None:  # K^T e (unit-major), or e K (the head), K's rank-one terms apart
            es = e_sum.squeeze(1)
            c = torch.addmv(es * (self.k_c + sb), e, self.k_val)  # [out]
            if top:
                return torch.addr(torch.addmm(c.unsqueeze(1), e, self.K), es, self.k_train)
            return torch.addr(torch.addmm(c.unsqueeze(0), self.K.t(), e.t()), self.k_train, es)
        grad_w = e @ x.t()  # [out, in]
        if top:
            return torch.addmm(e_sum, grad_w, self.a[lay].t()) if sb else grad_w @ self.a[lay].t()
        return torch.addmm(e_sum.t(), self.a[lay], grad_w.t()) if sb else self.a[lay] @ grad_w.t()


def _affine_t(w: Tensor, b: Tensor | None, x_t: Tensor) -> Tensor:
    """``(x W^T + b)^T`` from ``x^T`` ``[in, M]``: ``[out, M]``."""
    return w @ x_t if b is None else torch.addmm(b.unsqueeze(1), w, x_t)


def linear_hypergrad(lookahead: LinearLookahead, weights: Tensor, logit_grads: Tensor, val_y: Tensor, lr: float,
                     scale: Tensor | float) -> tuple[Tensor, Tensor]:
    """Validation CE after the virtual step and its gradient w.r.t. ``W``, by hand.

    :param lookahead: the step's :class:`LinearLookahead`
    :param weights: ``[N, J]``
    :param logit_grads: ``[N, J, C]`` per-unit gradients of each loss column w.r.t. the logits
        (:func:`metagate.gates.meta.lookahead.kd_logit_gradients`)
    :param val_y: ``[M]`` validation labels
    :param lr: virtual step size
    :param scale: ``[N]`` or scalar reduction factor of each unit (``mask_i / sum mask``)
    :return: ``(val CE, d val CE / d weights [N, J])`` (run under ``torch.no_grad()``)
    """
    s = scale.reshape(-1, 1, 1) if torch.is_tensor(scale) else scale
    g = logit_grads * (s * lr)  # each unit's share of the step
    d = torch.bmm(weights.unsqueeze(1), g).squeeze(1)  # lr * G  [N, C]
    val, t = lookahead.hypergrad(d.t(), val_y)
    return val, torch.bmm(g, t.t().unsqueeze(2)).squeeze(2)
