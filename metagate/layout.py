"""Memory layouts that make the CPU kernels of small students faster (same values)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


def channels_last(x: Tensor) -> Tensor:
    """``x [B, C, H, W]`` with channels-last strides (a zero-copy restride when ``C == 1``)."""
    b, c, h, w = x.shape
    if c == 1:
        return x.contiguous().as_strided(x.shape, (h * w, 1, w, 1))
    return x.contiguous(memory_format=torch.channels_last)


def is_conv(model: nn.Module) -> bool:
    """Whether ``model`` has 2-d convolutions (its image inputs run faster channels-last)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def for_model(model: nn.Module, x: Tensor) -> Tensor:
    """A fixed input batch laid out for ``model``: channels-last images for a conv student, where the CPU
    conv and max-pool kernels are about twice as fast as on NCHW; anything else unchanged."""
    return channels_last(x) if x.dim() == 4 and is_conv(model) else x
