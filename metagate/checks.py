"""Input validation shared by the loop, the teacher bank and the gates."""

from __future__ import annotations

import torch
from torch import Tensor

from metagate.errors import InputError


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
