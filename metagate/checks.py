"""Input validation shared by the loop, the teacher bank and the gates."""

from __future__ import annotations

import torch
from torch import Tensor

from metagate.errors import ConfigError, InputError


def check_finite(name: str, x: Tensor) -> None:
    """Raise if ``x`` holds NaN or inf, naming the tensor."""
    if not torch.isfinite(x).all():
        bad = (~torch.isfinite(x)).sum().item()
        raise InputError(f"{name} contain {bad} NaN/inf value(s)")


def check_labels(labels: Tensor, num_classes: int, name: str = "labels") -> None:
    """Raise if any label is outside ``[0, num_classes)``."""
    if labels.numel() == 0:
        return
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0 or hi >= num_classes:
        raise InputError(f"{name} out of range: found [{lo}, {hi}] but the task has {num_classes} classes")


def check_teacher_shape(student_logits: Tensor, teacher_logits: Tensor) -> None:
    """Teacher logits ``[N, K, C]`` must match student logits ``[N, C]`` (``metagate.losses`` validates with it)."""
    if teacher_logits.ndim != 3:
        raise InputError(f"teacher logits must be [N, K, C], got shape {tuple(teacher_logits.shape)}")
    n, c = student_logits.shape
    if teacher_logits.shape[0] != n:
        raise InputError(f"teacher logits cover {teacher_logits.shape[0]} units but the student has {n}")
    if teacher_logits.shape[2] != c:
        raise InputError(
            f"class-count mismatch: teachers output {teacher_logits.shape[2]} classes, student outputs {c}"
        )


def check_topk(k: int, vocab: int) -> None:
    """:raises ConfigError: ``k < 1`` or ``k >= V`` (the top-k form would save nothing)"""
    if not 1 <= k < vocab:
        raise ConfigError(f"--topk must be in [1, V) = [1, {vocab}) for a vocabulary of {vocab} tokens, got {k}")


def nonfinite_inputs(name: str, x: object, ids: Tensor | None = None) -> str | None:
    """What is non-finite in floating inputs ``x [N, ...]``, naming the units (their ``ids``, else positions);
    ``None`` when all is finite (or ``x`` is not a floating tensor: token ids, a dataset read by id)."""
    if not torch.is_tensor(x) or not x.is_floating_point() or x.numel() == 0:
        return None
    finite = torch.isfinite(x)
    if bool(finite.all()):
        return None
    rows = (~finite).reshape(x.shape[0], -1).any(1).nonzero().reshape(-1)
    units = rows if ids is None else ids.reshape(-1)[rows.to(ids.device)]
    shown = ", ".join(str(int(u)) for u in units[:5].tolist())
    more = f" (and {rows.numel() - 5} more)" if rows.numel() > 5 else ""
    return f"{name} hold {int((~finite).sum())} NaN/inf value(s) in {rows.numel()} unit(s): unit id(s) {shown}{more}"


def check_finite_inputs(name: str, x: object, ids: Tensor | None = None) -> None:
    """Raise :class:`InputError` if floating inputs hold NaN/inf (:func:`nonfinite_inputs`)."""
    msg = nonfinite_inputs(name, x, ids)
    if msg is not None:
        raise InputError(msg)
