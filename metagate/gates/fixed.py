"""Vanilla KD (Hinton et al. 2015): constant label/KD split, equal teacher weights."""

from __future__ import annotations

import argparse
from typing import Any

import torch

from metagate.errors import ConfigError
from metagate.gates.base import Gate, GateOutput, UnitView
from metagate.gates.registry import register


def fixed_weights(num_units: int, num_teachers: int, alpha: float, device: Any, dtype: Any) -> torch.Tensor:
    """``[N, 1+K]`` rows ``(alpha, (1-alpha)/K, ...)``; ``K = 0`` gives a single label column."""
    if num_teachers == 0:
        return torch.ones(num_units, 1, device=device, dtype=dtype)
    row = torch.full((1 + num_teachers,), (1.0 - alpha) / num_teachers, device=device, dtype=dtype)
    row[0] = alpha
    return row.expand(num_units, -1)


@register("fixed")
class FixedGate(Gate):
    """Label weight ``alpha``, teachers share ``1 - alpha`` equally, one temperature ``tau``.

    :param alpha: weight of the label CE column, in ``[0, 1]``
    :param tau: KD temperature (> 0)
    """

    trusted_weights = True

    def __init__(self, alpha: float = 0.5, tau: float = 4.0) -> None:
        if not 0.0 <= alpha <= 1.0:
            raise ConfigError(f"--alpha must be in [0, 1], got {alpha}")
        if not tau > 0:
            raise ConfigError(f"--tau must be > 0, got {tau}")
        self.alpha, self.tau = float(alpha), float(tau)
        self._cache: dict[tuple, torch.Tensor] = {}

    def weights(self, view: UnitView) -> GateOutput:
        key = (view.num_units, view.num_teachers, view.student_logits.device, view.student_logits.dtype)
        w = self._cache.get(key)
        if w is None:  # constant: build once per shape
            w = fixed_weights(view.num_units, view.num_teachers, self.alpha, key[2], key[3])
            self._cache[key] = w
        return GateOutput(w, self.tau)

    def hparams(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "tau": self.tau}

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        g = parser.add_argument_group("fixed gate")
        g.add_argument("--alpha", type=float, default=0.5, help="fixed: weight of the label CE (default: 0.5)")
        g.add_argument("--tau", type=float, default=4.0, help="fixed: KD temperature (default: 4.0)")

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> FixedGate:
        return cls(alpha=args.alpha, tau=args.tau)


@register("ce")
class CEGate(FixedGate):
    """No teacher: the degenerate fixed gate with ``alpha = 1``."""

    uses_teachers = False

    def __init__(self) -> None:
        super().__init__(alpha=1.0, tau=1.0)

    def hparams(self) -> dict[str, Any]:
        return {}

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        pass

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> CEGate:
        return cls()
