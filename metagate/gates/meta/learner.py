"""The meta gate's learned weights: the parameterisation (:mod:`.params`), its meta update, and the log of the
updates' validation losses and hypergradient norms."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from metagate.errors import ConfigError
from metagate.features import NUM_FEATURES, unit_features, view_features
from metagate.gates.base import UnitView
from metagate.gates.meta.config import MetaConfig
from metagate.gates.meta.params import (
    WeightNet,
    WeightTable,
    expand_columns,
    init_row,
    learned_init,
    normalize_weights,
)

#: the largest meta table built (bytes of its raw rows); sequences have a row per token position
TABLE_MAX_BYTES = 2 << 30


def check_table_size(rows: int, cols: int, dtype: torch.dtype, limit: int = TABLE_MAX_BYTES) -> None:
    """Refuse a weight table that would not fit: a :class:`ConfigError` naming its size."""
    size = rows * cols * torch.empty((), dtype=dtype).element_size()
    if size > limit:
        raise ConfigError(f"--meta-param table needs {rows} units x {cols} columns = {size / 2**30:.2f} GiB "
                          f"(limit {limit / 2**30:.2f} GiB); use --meta-param net (weights from unit features) "
                          "or a smaller --subset")


class WeightLearner:
    """``W [N, 1+K]`` from a :class:`.params.WeightTable` or :class:`.params.WeightNet`, and its meta updates.

    The table takes plain SGD steps on the touched rows only (as AMAL); the net uses Adam. Neither reads or writes
    the student's ``.grad``.

    :param config: the gate's options
    :param num_teachers: ``K >= 1``
    :param num_train_units: rows of the table
    :param device: where the parameters live
    :param dtype: the student's parameter dtype
    """

    #: updates whose (loss, hypergradient) are kept before they are reduced into the log sums
    HIST_FLUSH = 256

    def __init__(self, config: MetaConfig, num_teachers: int, num_train_units: int, device: torch.device,
                 dtype: torch.dtype) -> None:
        c = config
        self.num_teachers, self.dtype, self.lr = num_teachers, dtype, c.lr
        self.columns, self.normalize = c.meta_columns, c.meta_normalize
        self.target_row = init_row(num_teachers, c.init_label, c.init_teacher(num_teachers))
        init = learned_init(self.target_row, self.columns)
        self.param: nn.Module
        if c.meta_param == "table":
            check_table_size(num_train_units, int(init.numel()), dtype)
            self.param = WeightTable(num_train_units, init, c.meta_transform)
        else:
            self.param = WeightNet(NUM_FEATURES, init, self.columns, c.meta_hidden)
        self.param.to(device=device, dtype=dtype)
        #: W is the table's raw rows themselves (AMAL's default): no autograd from W to the leaves
        self.raw_rows = (c.meta_param == "table" and c.meta_transform == "clamp" and self.columns == "all"
                         and self.normalize == "none")
        self.optimizer = torch.optim.Adam(self.param.parameters(), lr=self.lr)  # the net's; the table's is its own
        self.updates = 0
        #: (view, table rows after the latest meta update on it): the real step's W needs no gather
        self.pending: tuple[UnitView, Tensor] | None = None
        # (meta loss, hypergradient tensors) of recent updates, reduced in batches (no per-step work)
        self._hist: list[tuple[Tensor, list[Tensor]]] = []
        self._hist_done = 0  # leading entries of _hist already counted in the log sums
        self._log_loss: Tensor | float = 0.0
        self._log_norm: Tensor | float = 0.0
        self._log_n = 0

    # -- W -----------------------------------------------------------------------------------------
    def live(self, ids: Tensor | None, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor,
             progress: float, mask: Tensor | None = None, feats: Tensor | None = None
             ) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """``W [N, 1+K]`` with a graph to the leaves that the meta update moves (``feats``: the net's unit features
        when the caller has them, else computed from ``teacher_logits``).

        :return: ``(W, leaves, ids)``; leaves are the table's gathered rows (``[N, J]``) or the net's parameters
        """
        if isinstance(self.param, WeightTable):
            if ids is None:
                raise ConfigError("the meta table needs unit ids; use --meta-param net for batches without ids")
            leaf = self.param.rows(ids)
            raw, leaves = self.param.transform_rows(leaf), [leaf]
        else:
            if feats is None:
                assert teacher_logits is not None
                feats = unit_features(student_logits, teacher_logits, labels, progress)
            raw, leaves = self.param(feats.to(self.dtype)), list(self.param.parameters())
        w = expand_columns(raw, self.num_teachers, self.columns, self.target_row)
        return normalize_weights(w, self.normalize, self.target_row, mask), leaves, ids

    def of_view(self, view: UnitView) -> tuple[Tensor, list[Tensor], Tensor | None]:
        """:meth:`live` for the units of ``view``."""
        if not view.num_teachers:
            raise ConfigError("the meta gate needs teacher logits")
        # the table never reads the teachers: do not make the view gather them
        feats = None if isinstance(self.param, WeightTable) else view_features(view)
        # unit_ids: the example ids, or one row per token position of a sequence batch
        return self.live(view.unit_ids, view.student_logits, None, view.labels, view.progress, view.mask, feats)

    def decided(self, view: UnitView) -> Tensor:
        """The detached ``W`` of the real step on ``view``: the table rows the meta update just wrote on it, if
        any, else evaluated afresh."""
        pending, self.pending = self.pending, None
        if pending is not None and pending[0] is view and self.raw_rows:  # W is the rows just written
            return pending[1]
        with torch.no_grad():
            if pending is not None and pending[0] is view:
                assert isinstance(self.param, WeightTable)
                w = expand_columns(self.param.transform_rows(pending[1]), self.num_teachers, self.columns,
                                   self.target_row)
                return normalize_weights(w, self.normalize, self.target_row, view.mask)
            return self.of_view(view)[0].detach()

    # -- the meta update ---------------------------------------------------------------------------
    @staticmethod
    def grads_wrt(out: Tensor, leaves: list[Tensor], grad_out: Tensor | None = None,
                  retain_graph: bool = False) -> list[Tensor]:
        """``d out / d leaves`` (times ``grad_out``), zeros for leaves ``out`` does not reach."""
        return [torch.zeros_like(p) if g is None else g
                for p, g in zip(leaves, torch.autograd.grad(out, leaves, grad_out, retain_graph=retain_graph,
                                                            allow_unused=True))]

    @classmethod
    def leaf_grads(cls, w: Tensor, leaves: list[Tensor], dw: Tensor) -> list[Tensor]:
        """The leaves' gradients from ``dw = d loss / d W``."""
        if len(leaves) == 1 and w is leaves[0]:  # clamp table, all columns, no normalisation: W = rows
            return [dw]
        return cls.grads_wrt(w, leaves, dw)

    def apply(self, val: Tensor, leaves: list[Tensor], ids: Tensor | None, retain_graph: bool,
              view: UnitView | None = None) -> None:
        """Hypergradient of ``val`` w.r.t. ``leaves`` and one meta update."""
        self.apply_grads(val, self.grads_wrt(val, leaves, retain_graph=retain_graph), ids, view)

    def apply_grads(self, val: Tensor, grads: list[Tensor], ids: Tensor | None, view: UnitView | None) -> None:
        """One meta update (table rows or net) from the leaves' hypergradients.

        :param val: the look-ahead's validation loss (logged)
        :param view: the batch the rows belong to (their new values then serve its real step)
        """
        if isinstance(self.param, WeightTable):
            assert ids is not None
            rows = self.param.sgd_rows(ids, grads[0], self.lr)
            self.pending = (view, rows) if view is not None else None
        else:
            for p, g in zip(self.param.parameters(), grads):
                p.grad = g
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.updates += 1
        self._hist.append((val.detach(), grads))
        if len(self._hist) >= self.HIST_FLUSH:
            self._flush_hist()

    # -- log ---------------------------------------------------------------------------------------
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
        self._hist, self._hist_done = self._hist[-1:], 1  # keep the latest for last_hypergrad_norm

    @property
    def last_hypergrad_norm(self) -> float:
        """L2 norm of the latest hypergradient (w.r.t. the touched table rows or the net)."""
        return float(self._norm(self._hist[-1][1])) if self._hist else float("nan")

    def log(self, logger: Any, step: int) -> None:
        """Mean validation loss and hypergradient norm of the updates since the last call; the table's columns."""
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

    # -- state -------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"param": self.param.state_dict(), "optimizer": self.optimizer.state_dict(), "updates": self.updates}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.param.load_state_dict(state["param"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates = int(state["updates"])
