"""Train/eval mode switches that cost nothing when they cannot matter.

``Module.train()`` / ``.eval()`` walk every submodule (tens of microseconds); a reward measured every
few steps on a small MLP would pay that twice per measurement for nothing.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn

from metagate.models import FeatureModel

#: layers whose output does not depend on train/eval mode
MODE_FREE = (nn.Sequential, nn.Linear, nn.ReLU, nn.Flatten, nn.Identity, nn.Conv2d, nn.MaxPool2d, nn.Tanh, nn.GELU)


def is_mode_free(model: nn.Module) -> bool:
    """Whether ``model``'s output is the same in train and eval mode: made only of :data:`MODE_FREE`
    layers and built-in students (a :class:`~metagate.models.FeatureModel`'s own code never reads the
    mode), so no dropout and no batch norm."""
    return all(type(m) in MODE_FREE or isinstance(m, FeatureModel) for m in model.modules())


@contextmanager
def eval_mode(model: nn.Module, mode_free: bool | None = None) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode and restore its mode; no switch at all when it is mode-free.

    :param mode_free: :func:`is_mode_free` computed once by the caller (``None``: compute it)
    """
    if mode_free is None:
        mode_free = is_mode_free(model)
    if mode_free:
        yield model
        return
    was = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was)
