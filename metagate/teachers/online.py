"""Online teachers: a teacher's logits computed in the step, on the step's inputs, instead of cached.

A cached teacher's logits are computed once for fixed training inputs; a random augmentation changes the inputs
every epoch, so a cache holds the logits of inputs the student never sees. An :class:`OnlineBank` mixes cached
columns (``[N, C]`` tables) with online ones (frozen modules): the trainer hands it each step's inputs
(:meth:`OnlineBank.set_step`) and a lookup of that step's unit ids runs the online teachers on them (once per
step, shared by every read). A lookup of other ids (the meta gate's full pass) reads those units' inputs by id.

Gates that summarise the teachers over the whole training split once at setup (the temperature gate's state,
Meta-Weight-Net features, the rule baselines, the diagnostics' teacher correctness) read :attr:`OnlineBank.logits`:
one pass of the online teachers over the training inputs as read by id. The hard gate takes its per-step path.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from metagate.teachers.bank import TeacherBank, rows


class OnlineBank(TeacherBank):
    """Teacher columns, each a cached ``[N, C]`` table or a frozen module run on the step's inputs.

    :param columns: one per teacher, in bank order
    :param names: the teachers' names
    :param inputs: the training inputs by unit id (a tensor or :class:`~metagate.data.inputs.DatasetInputs`)
    :param num_classes: ``C``
    """

    online = True

    def __init__(self, columns: list[Tensor | nn.Module], names: list[str], inputs: Any, num_classes: int,
                 batch_size: int = 1024) -> None:
        self.columns, self.names, self.inputs = list(columns), list(names), inputs
        self._c, self._n, self._bs = int(num_classes), len(inputs), batch_size
        self._step: tuple[Tensor, Tensor] | None = None  # (ids, x) of the current step
        self._memo: tuple[Tensor, Tensor] | None = None  # (ids, logits [B, K, C]) of the current step
        self._table: Tensor | None = None
        self._log_probs: dict[float, Tensor] = {}

    @property
    def num_units(self) -> int:
        return self._n

    @property
    def num_teachers(self) -> int:
        return len(self.columns)

    @property
    def num_classes(self) -> int:
        return self._c

    def set_step(self, x: Tensor, ids: Tensor) -> None:
        """The inputs of the step's units ``ids`` (the trainer calls this before the gate looks)."""
        self._step, self._memo = (ids, x), None

    @torch.no_grad()
    def compute(self, x: Tensor, ids: Tensor) -> Tensor:
        """``[B, K, C]``: cached columns gathered by ``ids``, online teachers run on ``x``."""
        cols = [rows(c, ids) if isinstance(c, Tensor) else c(x).float() for c in self.columns]
        return torch.stack(cols, 1)

    def lookup(self, ids: Tensor) -> Tensor:
        if self._step is not None and ids is self._step[0]:
            if self._memo is None or self._memo[0] is not ids:
                self._memo = (ids, self.compute(self._step[1], ids))
            return self._memo[1]
        return self.compute(self.inputs[ids], ids)

    def unit_log_probs(self, tau: float, ids: Tensor) -> Tensor:
        return torch.log_softmax(self.lookup(ids) / float(tau), -1)

    @property
    def logits(self) -> Tensor:  # type: ignore[override]
        """``[N, K, C]``: one pass of every teacher over the training inputs read by id (computed once)."""
        if self._table is None:
            dev = self.inputs.device if hasattr(self.inputs, "device") else torch.device("cpu")
            parts = [self.compute(self.inputs[a : a + self._bs], torch.arange(a, min(a + self._bs, self._n),
                                                                               device=dev))
                     for a in range(0, self._n, self._bs)]
            self._table = torch.cat(parts)
        return self._table

    def to(self, device: torch.device | str) -> OnlineBank:
        cols = [c.to(device) for c in self.columns]
        out = OnlineBank(cols, self.names, self.inputs.to(device), self._c, self._bs)
        out._table = None if self._table is None else self._table.to(device)
        return out
