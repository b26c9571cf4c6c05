"""Teacher logits per target token for sequence tasks: the per-token bank, its token table and the top-k form.

Only real (unmasked) training tokens are stored, packed as ``[M, K, V]`` in the order of
``task.train.y != <pad>`` (row-major); a ``[N_train, L]`` index maps each (example, position) to its row
and every padded position to one extra all-zero row (uniform teachers there -- padding is masked
anyway). Lookups return the flattened ``[B * L, K, V]`` the shared loop's units need.

On disk (:mod:`metagate.teachers.cache`) a teacher's token logits are float16 ``[M, V]``, or their top-k form.

**Top-k form** keeps each token's ``k`` largest log-probabilities; the remainder mass
``r = 1 - sum(top-k probabilities)`` is spread uniformly over the other ``V - k`` classes when the
bank is rebuilt. For a student distribution ``q``, the KL to the rebuilt ``p~`` differs from the KL to the
true ``p`` by at most ``r * (log(V - k) + max_tail log q - min_tail log q)`` (:func:`topk_kl_bound`;
the tail entropy moves by at most ``r log(V - k)``, the cross term by at most ``r`` times the spread of
``log q`` over the tail), at temperature 1. The kept log-probabilities are stored in float32 (float16
rounding of values near ``log p = -10`` moves the KL by more than the bound allows for large ``k``);
the ids take one byte while ``V <= 256``: 5 bytes per kept entry against 2 per class in the float16 form.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from metagate.checks import check_finite, check_topk
from metagate.teachers.bank import TeacherBank, rows
from metagate.units import PAD_ID

if TYPE_CHECKING:  # pragma: no cover
    from metagate.data.task import Task


class SeqTeacherBank(TeacherBank):
    """Teachers' per-token logits of the training examples, looked up by example id.

    :param token_logits: ``[M, K, V]`` for the ``M`` real training tokens (float16 storage is kept;
        lookups return float32)
    :param token_index: ``[N_train, L]`` row of each position in ``token_logits`` (padding: ``M``)
    :param names: ``K`` teacher names
    """

    def __init__(self, token_logits: Tensor, token_index: Tensor, names: list[str]) -> None:
        if token_logits.ndim != 3:
            raise ValueError(f"token logits must be [M, K, V], got {tuple(token_logits.shape)}")
        check_finite("teacher logits", token_logits)
        pad_row = torch.zeros(1, *token_logits.shape[1:], dtype=token_logits.dtype, device=token_logits.device)
        self.logits = torch.cat([token_logits, pad_row])
        self.token_index: Tensor = token_index.to(self.logits.device)
        self.names = list(names)
        self._log_probs: dict[float, Tensor] = {}

    @property
    def num_units(self) -> int:
        """Training examples covered (the trainer compares it with ``len(task.train)``)."""
        return int(self.token_index.shape[0])

    def lookup(self, ids: Tensor) -> Tensor:
        """``[B * L, K, V]`` float32 logits of examples ``ids``."""
        return self.logits.index_select(0, rows(self.token_index, ids).reshape(-1)).float()

    def log_probs(self, tau: float) -> Tensor:
        """``[M + 1, K, V]`` float32 ``log_softmax(logits / tau)`` per stored token, once per temperature."""
        lp = self._log_probs.get(float(tau))
        if lp is None:
            lp = self._log_probs[float(tau)] = torch.log_softmax(self.logits.float() / float(tau), -1)
        return lp

    def unit_log_probs(self, tau: float, ids: Tensor) -> Tensor:
        """``[B * L, K, V]`` teacher log-probabilities at ``tau`` of examples ``ids``' tokens."""
        return self.log_probs(tau).index_select(0, rows(self.token_index, ids).reshape(-1))

    def unit_right(self, clean_labels: Tensor) -> Tensor:
        """``[N_train * L, K]`` bool: each teacher's top token is the clean label (False on padding)."""
        top = self.logits.argmax(-1).index_select(0, self.token_index.reshape(-1))
        lab = clean_labels.to(top.device).reshape(-1, 1)
        return (top == lab) & (lab != PAD_ID)

    def to(self, device: torch.device | str) -> SeqTeacherBank:
        if self.logits.device == torch.device(device):
            return self
        return SeqTeacherBank(self.logits[:-1].to(device), self.token_index, self.names)


def token_index(mask: Tensor) -> Tensor:
    """``[N, L]`` row of each real token in the row-major packing of ``mask``; padding gets ``M``."""
    flat = mask.reshape(-1)
    m = int(flat.sum())
    idx = torch.full_like(flat, m, dtype=torch.long)
    idx[flat] = torch.arange(m)
    return idx.view(mask.shape)


def topk_compress(log_probs: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The ``k`` largest log-probabilities of each row (float32) and their class ids (uint8 for ``V <= 256``,
    int16 up to ``V = 32,768``, else int32: a 49,152-token LM vocabulary would wrap around in int16).

    :raises ConfigError: ``k < 1`` or ``k >= V`` (nothing would be saved)
    """
    v = log_probs.shape[-1]
    check_topk(k, v)
    vals, idx = log_probs.float().topk(k, -1)
    return vals, idx.to(torch.uint8 if v <= 256 else torch.int16 if v <= 32768 else torch.int32)


def topk_expand(values: Tensor, indices: Tensor, vocab: int) -> Tensor:
    """Full log-probabilities ``[..., V]`` from a top-k form: the stored entries, and the remainder mass
    ``1 - sum exp(values)`` spread uniformly over the other ``V - k`` classes (then renormalised, which
    only absorbs rounding)."""
    vals = values.float()
    k = vals.shape[-1]
    rest = (1.0 - vals.exp().sum(-1, keepdim=True)).clamp_min(1e-12) / (vocab - k)
    out = rest.log().expand(*vals.shape[:-1], vocab).clone()
    out.scatter_(-1, indices.long(), vals)
    return torch.log_softmax(out, -1)


def topk_kl_bound(teacher_log_probs: Tensor, student_log_probs: Tensor, k: int) -> Tensor:
    """Per-row bound on ``|KL(p~ || q) - KL(p || q)|`` for the top-``k`` rebuild ``p~`` of ``p`` (see the
    module docstring). Shapes ``[..., V]``; returns ``[...]``."""
    v = teacher_log_probs.shape[-1]
    top = teacher_log_probs.topk(k, -1).indices
    tail = torch.ones_like(teacher_log_probs, dtype=torch.bool).scatter_(-1, top, False)
    r = (teacher_log_probs.exp() * tail).sum(-1)
    lq = student_log_probs
    spread = lq.masked_fill(~tail, float("-inf")).amax(-1) - lq.masked_fill(~tail, float("inf")).amin(-1)
    return r * (torch.log(torch.tensor(float(v - k))) + spread)


@torch.no_grad()
def token_logits(teacher: nn.Module, task: Task, device: torch.device | str = "cpu",
                 batch_size: int = 512) -> Tensor:
    """``[M, V]`` teacher-forced logits of the real training tokens (eval mode, CPU float32)."""
    teacher.eval().to(device)
    x, mask = task.train.x, task.train.y != PAD_ID
    out = []
    for i in range(0, len(x), batch_size):
        lg = teacher(x[i : i + batch_size].to(device)).float().cpu()
        out.append(lg[mask[i : i + batch_size]])
    return torch.cat(out)
