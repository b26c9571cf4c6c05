"""Parameterisations of the meta gate's weights ``W [N, 1+K]``.

* :class:`WeightTable` (AMAL): one learnable entry per training unit and loss column,
  indexed by unit id. Transforms: ``clamp`` (AMAL: raw weights, projected to
  ``[1e-7, 2)`` after every update), ``sigmoid`` (``2 * sigmoid(raw)``) or ``softmax``
  (a softmax over the columns, scaled to the initial row sum).
* :class:`WeightNet` (Meta-Weight-Net style): a small MLP over the unit features of
  :mod:`metagate.features` (``[N, K, F]``). One encoder is shared by all teachers, so it
  is permutation-equivariant and serves any ``K``; it generalises to unseen units and tokens.

``columns="all"`` learns every column; ``columns="split"`` learns only the label/KD split
(two values per unit: the label weight and one weight shared by every teacher), which
leaves the teacher mix to another gate; ``columns="label"`` learns only the label weight and
holds every teacher at its initial weight (the teachers' signal is kept on every unit).

:func:`normalize_weights` optionally rescales the weights within a batch.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from metagate.errors import ConfigError

CLAMP_MIN, CLAMP_MAX = 1e-7, 2.0 - 1e-7
SIGMOID_SCALE = 2.0


def init_row(num_teachers: int, init_label: float, init_teacher: float) -> Tensor:
    """``[1+K]`` initial weights: ``(init_label, init_teacher, ..., init_teacher)``."""
    row = torch.full((1 + num_teachers,), float(init_teacher))
    row[0] = float(init_label)
    return row


def expand_columns(w: Tensor, num_teachers: int, columns: str, init: Tensor | None = None) -> Tensor:
    """Learned columns to ``[N, 1+K]``.

    ``all``: unchanged; ``split``: ``[N, 2]``, the teacher value repeated; ``label``: ``[N, 1]``,
    the teachers held at their initial weights ``init[1:]``.
    """
    if columns == "all":
        return w
    if columns == "split":
        return torch.cat([w[:, :1], w[:, 1:2].expand(-1, num_teachers)], 1)
    assert init is not None, "columns='label' needs the initial row"
    return torch.cat([w[:, :1], init[1:].to(w).expand(w.shape[0], -1)], 1)


def learned_init(init: Tensor, columns: str) -> Tensor:
    """The learned part of the initial row for ``columns`` (``all`` | ``split`` | ``label``)."""
    if columns not in ("all", "split", "label"):
        raise ConfigError(f"--meta-columns must be all, split or label, got {columns!r}")
    return {"all": init, "split": init[:2], "label": init[:1]}[columns]


def _check_init(init: Tensor, upper: float) -> None:
    if not ((init > 0) & (init < upper)).all():
        raise ConfigError(f"--meta-init-label/--meta-init-teacher must be in (0, {upper:g}), got {init.tolist()}")


class WeightTable(nn.Module):
    """A weight per training unit and learned column.

    :param num_units: training units ``N_train``
    :param init: ``[J]`` initial weights of a row (``J = 1+K``, or 2 for ``split``)
    :param transform: ``clamp`` | ``sigmoid`` | ``softmax``
    """

    def __init__(self, num_units: int, init: Tensor, transform: str = "clamp") -> None:
        super().__init__()
        if transform not in ("clamp", "sigmoid", "softmax"):
            raise ConfigError(f"--meta-transform must be clamp, sigmoid or softmax, got {transform!r}")
        self.transform = transform
        init = init.double()
        if transform == "clamp":
            _check_init(init, CLAMP_MAX)
            raw = init
        elif transform == "sigmoid":
            _check_init(init, SIGMOID_SCALE)
            p = init / SIGMOID_SCALE
            raw = torch.log(p / (1 - p))
        else:
            _check_init(init, math.inf)
            raw = init.log()
        self.register_buffer("total", init.sum().float())
        self.raw = nn.Parameter(raw.float().repeat(num_units, 1))

    def forward(self, ids: Tensor) -> Tensor:
        """``[n, J]`` weights of the units ``ids``."""
        return self.transform_rows(self.raw[ids])

    def transform_rows(self, r: Tensor) -> Tensor:
        """Weights from raw rows ``[n, J]``."""
        if self.transform == "clamp":
            return r
        if self.transform == "sigmoid":
            return SIGMOID_SCALE * torch.sigmoid(r)
        return torch.softmax(r, -1) * self.total

    def rows(self, ids: Tensor) -> Tensor:
        """Raw rows of ``ids`` as a fresh leaf (so a hypergradient is ``[n, J]``, not table-sized)."""
        return self.raw.detach().index_select(0, ids).requires_grad_(True)

    def sgd_rows(self, ids: Tensor, grad: Tensor, lr: float) -> Tensor:
        """Plain SGD on rows ``ids`` (repeated ids accumulate), then AMAL's projection (``clamp``).

        :return: the updated raw rows ``[n, J]`` (equal to ``raw[ids]`` afterwards)
        """
        if torch.is_grad_enabled():  # a no_grad decorator would cost more than the caller's usual no_grad
            with torch.no_grad():
                return self.sgd_rows(ids, grad, lr)
        # index_select / index_copy_: several times cheaper than advanced indexing and __setitem__ on CPU
        self.raw.index_add_(0, ids, grad.to(self.raw.dtype).mul(-lr))  # index_add_'s alpha is slower
        rows = self.raw.index_select(0, ids)
        if self.transform == "clamp":
            self.raw.index_copy_(0, ids, rows.clamp_(CLAMP_MIN, CLAMP_MAX))  # repeated ids: equal rows
        return rows

    @torch.no_grad()
    def project(self) -> None:
        """AMAL's projection of the whole table (``clamp`` only)."""
        if self.transform == "clamp":
            self.raw.clamp_(CLAMP_MIN, CLAMP_MAX)


class WeightNet(nn.Module):
    """Meta-Weight-Net over unit features, permutation-equivariant in the teachers.

    ``h_k = enc(f_k)`` for each teacher's features ``f_k`` (``[N, K, F]``); a teacher's weight
    is ``2 * sigmoid(a(h_k))`` (``all``) and the label's ``2 * sigmoid(b(mean_k h_k))``. With
    ``split``, the teachers' shared weight is ``2 * sigmoid(a(mean_k h_k))``. Output biases start
    at the initial weights, output slopes near zero, so the net starts at ``init``.

    :param num_features: ``F``
    :param init: ``[J]`` initial row (label first); teachers must share one value
    :param columns: ``all`` | ``split`` | ``label``
    :param hidden: encoder width
    """

    def __init__(self, num_features: int, init: Tensor, columns: str = "all", hidden: int = 32) -> None:
        super().__init__()
        _check_init(init, SIGMOID_SCALE)
        self.columns = columns
        self.enc = nn.Sequential(nn.Linear(num_features, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU())
        self.label_out = nn.Linear(hidden, 1)
        self.teacher_out = nn.Linear(hidden, 1)
        p = init.double() / SIGMOID_SCALE
        logit = torch.log(p / (1 - p))
        with torch.no_grad():
            for lin, b in ((self.label_out, logit[0]), (self.teacher_out, logit[-1])):
                lin.weight.normal_(0.0, 1e-2)
                lin.bias.fill_(float(b))

    def forward(self, feats: Tensor) -> Tensor:
        """:param feats: ``[N, K, F]`` -> weights ``[N, 1+K]`` (``all``) or ``[N, 2]`` (``split``)."""
        h = self.enc(feats)  # [N, K, H]
        pooled = h.mean(1)
        label = self.label_out(pooled)  # [N, 1]
        if self.columns == "label":
            return SIGMOID_SCALE * torch.sigmoid(label)
        teach = self.teacher_out(h).squeeze(-1) if self.columns == "all" else self.teacher_out(pooled)
        return SIGMOID_SCALE * torch.sigmoid(torch.cat([label, teach], 1))


def normalize_weights(w: Tensor, mode: str, target: Tensor, mask: Tensor | None = None) -> Tensor:
    """Rescale weights within a batch.

    :param w: ``[N, 1+K]``
    :param mode: ``none``; ``unit`` (each row scaled to sum to ``target.sum()``);
        ``column`` (each column scaled so its mean over the batch's units equals ``target[j]``:
        the gate keeps the global label/teacher mix and only moves weight between units)
    :param target: ``[1+K]`` the reference row (the initial weights)
    :param mask: ``[N]`` unit mask for the column means
    """
    if mode == "none":
        return w
    target = target.to(w)
    if mode == "unit":
        return w * (target.sum() / w.sum(1, keepdim=True).clamp_min(1e-12))
    if mode == "column":
        if mask is None:
            mean = w.mean(0)
        else:
            m = mask.to(w).reshape(-1, 1)
            mean = (w * m).sum(0) / m.sum().clamp_min(1)
        return w * (target / mean.clamp_min(1e-12))
    raise ConfigError(f"--meta-normalize must be none, unit or column, got {mode!r}")
