"""Vanilla KD (Hinton et al. 2015): constant label/KD split, equal teacher weights."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from metagate.errors import ConfigError
from metagate.gates.base import Gate, GateConfig, GateOutput, UnitView
from metagate.gates.registry import register
from metagate.options import option


def fixed_weights(num_units: int, num_teachers: int, alpha: float, device: Any, dtype: Any) -> torch.Tensor:
    """``[N, 1+K]`` rows ``(alpha, (1-alpha)/K, ...)``; ``K = 0`` gives a single label column."""
    if num_teachers == 0:
        return torch.ones(num_units, 1, device=device, dtype=dtype)
    row = torch.full((1 + num_teachers,), (1.0 - alpha) / num_teachers, device=device, dtype=dtype)
    row[0] = alpha
    return row.expand(num_units, -1)


class FixedMix:
    """The constant ``[N, 1+K]`` label/teacher split of a gate that learns only something else (the
    temperature gates): built once per batch shape and dtype, padding tokens of a sequence batch zeroed."""

    def __init__(self, alpha: float) -> None:
        self.alpha = alpha
        self._cache: dict[tuple, torch.Tensor] = {}

    def __call__(self, view: UnitView, mask_padding: bool = True) -> torch.Tensor:
        key = (view.num_units, view.num_teachers, view.student_logits.device, view.student_logits.dtype)
        w = self._cache.get(key)
        if w is None:  # constant: build once per shape
            w = self._cache[key] = fixed_weights(view.num_units, view.num_teachers, self.alpha, key[2], key[3])
        if mask_padding and view.is_sequence:
            w = w * view.mask.to(w.dtype).unsqueeze(1)
        return w


@dataclass
class KDMixConfig(GateConfig):
    """The label weight and the KD temperature, shared by the gates that keep a constant label/KD split
    (``fixed``, ``reinforce``, ``policy``)."""

    alpha: float | None = option(None, "weight of the label CE column, in [0, 1] (policy: unset takes the value "
                                       "its policy was trained with)", shown="0.5")
    tau: float | None = option(None, "KD temperature, > 0 (policy: unset takes the value its policy was "
                                     "trained with)", shown="4.0")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.alpha is not None and not 0.0 <= self.alpha <= 1.0:
            raise ConfigError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.tau is not None and not self.tau > 0:
            raise ConfigError(f"--tau must be > 0, got {self.tau}")

    @property
    def label_weight(self) -> float:
        return 0.5 if self.alpha is None else self.alpha

    @property
    def temperature(self) -> float:
        return 4.0 if self.tau is None else self.tau


@dataclass
class FixedConfig(KDMixConfig):
    """Options of the ``fixed`` gate."""


@register("fixed")
class FixedGate(Gate):
    """Label weight ``alpha``, teachers share ``1 - alpha`` equally, one temperature ``tau``."""

    config_class = FixedConfig
    trusted_weights = True

    def __init__(self, config: FixedConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.alpha, self.tau = self.config.label_weight, self.config.temperature
        self._mix = FixedMix(self.alpha)

    def weights(self, view: UnitView) -> GateOutput:
        return GateOutput(self._mix(view, mask_padding=False), self.tau)  # the reduce masks padding

    def hparams(self) -> dict[str, Any]:
        return {"alpha": self.alpha, "tau": self.tau}


@dataclass
class CEConfig(GateConfig):
    """The ``ce`` gate has no options."""


@register("ce")
class CEGate(FixedGate):
    """No teacher: the degenerate fixed gate with ``alpha = 1``."""

    config_class = CEConfig  # type: ignore[assignment]
    uses_teachers = False

    def __init__(self, config: CEConfig | None = None, **options: Any) -> None:
        Gate.__init__(self, config, **options)
        self.alpha, self.tau = 1.0, 1.0
        self._mix = FixedMix(self.alpha)

    def hparams(self) -> dict[str, Any]:
        return {}
