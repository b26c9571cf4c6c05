"""Small students and teachers in plain torch.

**Feature protocol** (used by last-layer look-aheads such as the closed-form meta
backend): a model exposes ``features(x) -> [B, D]`` (penultimate activations)
and ``head`` (an ``nn.Linear(D, C)``), with ``forward(x) == head(features(x))``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class FeatureModel(nn.Module):
    """Base: ``forward = head(features(x))``."""

    head: nn.Linear

    def features(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


class MLP(FeatureModel):
    """Flatten, hidden ReLU layers, linear head.

    :param in_dim: flattened input size
    :param hidden: hidden widths, e.g. ``(128,)``
    :param num_classes: ``C``
    :param batch_norm: add BatchNorm1d after each hidden linear layer
    """

    def __init__(self, in_dim: int, hidden: Sequence[int], num_classes: int, batch_norm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Flatten()]
        d = in_dim
        for h in hidden:
            layers.append(nn.Linear(d, h))
            if batch_norm:
                layers.append(nn.BatchNorm1d(h))
            layers.append(nn.ReLU())
            d = h
        self.body = nn.Sequential(*layers)
        self.head = nn.Linear(d, num_classes)

    def features(self, x: Tensor) -> Tensor:
        return self.body(x)


class CNN(FeatureModel):
    """Two conv blocks (conv-BN-ReLU-pool), a hidden FC layer, linear head.

    :param in_channels: input channels
    :param size: input height = width
    :param width: channels of the first conv (second has ``2 * width``)
    :param num_classes: ``C``
    :param hidden: FC width
    """

    def __init__(self, in_channels: int, size: int, width: int, num_classes: int, hidden: int = 128) -> None:
        super().__init__()
        pool = 2 if size >= 16 else 1  # 8x8 digits: keep resolution in block 1
        self.conv = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1),
            nn.BatchNorm2d(width),
            nn.ReLU(),
            nn.MaxPool2d(pool),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.BatchNorm2d(2 * width),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        out = size // pool // 2
        self.fc = nn.Sequential(nn.Flatten(), nn.Linear(2 * width * out * out, hidden), nn.ReLU())
        self.head = nn.Linear(hidden, num_classes)
        self.in_channels, self.size = in_channels, size

    def features(self, x: Tensor) -> Tensor:
        if x.ndim == 2:  # flat input
            x = x.view(-1, self.in_channels, self.size, self.size)
        return self.fc(self.conv(x))


class PermutedTeacher(nn.Module):
    """An adversarial teacher: a good teacher whose class outputs are cyclically shifted.

    Output class ``c`` carries the base teacher's logit for class ``c - shift``, so it is
    confidently wrong on every example while looking as sharp as the base teacher.
    """

    def __init__(self, base: nn.Module, num_classes: int, shift: int = 1) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("perm", (torch.arange(num_classes) - shift) % num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x)[..., self.perm]  # classes are the last dimension (tokens too)
