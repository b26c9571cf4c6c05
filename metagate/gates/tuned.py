"""``fixed-tuned``: vanilla KD with ``alpha``, ``tau`` and the student's lr chosen by a grid on ``select``.

The grid runs in ``metagate compare`` (each point is a ``fixed`` run; the best ``select`` accuracy wins, ties
to the lower ``select`` NLL) and the grid with every point's score and the choice go into the outputs. Run
alone (``metagate distill --gate fixed-tuned``) it is the ``fixed`` gate at ``--alpha``/``--tau``.
"""

from __future__ import annotations

from dataclasses import dataclass

from metagate.errors import ConfigError
from metagate.gates.fixed import FixedGate, KDMixConfig
from metagate.gates.registry import register
from metagate.options import option


def parse_grid(flag: str, text: str) -> list[float]:
    """``"0.1/0.5/0.9"`` (or commas outside a gate spec) -> ``[0.1, 0.5, 0.9]``."""
    try:
        values = [float(v) for v in text.replace(",", "/").split("/") if v.strip()]
    except ValueError:
        raise ConfigError(f"{flag} must be numbers separated by '/', got {text!r}") from None
    if not values:
        raise ConfigError(f"{flag} is empty")
    return values


@dataclass
class FixedTunedConfig(KDMixConfig):
    """Options of the ``fixed-tuned`` gate: the grid tuned on ``select``."""

    alpha_grid: str = option("0.1/0.5/0.9", "fixed-tuned: label weights tried, '/'-separated")
    tau_grid: str = option("2/4", "fixed-tuned: KD temperatures tried, '/'-separated")
    lr_scales: str = option("0.5/1/2", "fixed-tuned: student learning rates tried, as multiples of --lr")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not all(0.0 <= a <= 1.0 for a in parse_grid("--alpha-grid", self.alpha_grid)):
            raise ConfigError(f"--alpha-grid values must be in [0, 1], got {self.alpha_grid!r}")
        if not all(t > 0 for t in parse_grid("--tau-grid", self.tau_grid)):
            raise ConfigError(f"--tau-grid values must be > 0, got {self.tau_grid!r}")
        if not all(s > 0 for s in parse_grid("--lr-scales", self.lr_scales)):
            raise ConfigError(f"--lr-scales values must be > 0, got {self.lr_scales!r}")

    def grid(self, lr: float) -> list[dict[str, float]]:
        """Every ``{alpha, tau, lr}`` point, in a fixed order."""
        return [{"alpha": a, "tau": t, "lr": lr * s} for a in parse_grid("--alpha-grid", self.alpha_grid)
                for t in parse_grid("--tau-grid", self.tau_grid) for s in parse_grid("--lr-scales", self.lr_scales)]


@register("fixed-tuned")
class FixedTunedGate(FixedGate):
    """``fixed`` at the grid point chosen on ``select`` (by ``metagate compare``)."""

    config_class = FixedTunedConfig  # type: ignore[assignment]
    baseline = True
    tuned_on_select = True  # metagate compare runs the grid (compare/tuning.py)
