"""The ``ctkd`` gate (Li et al., AAAI 2023): a learnable KD temperature trained by the student's own
optimizer through a gradient-reversal layer (:mod:`metagate.gates.temperature.reversal`), so it ascends the KD loss
while the student descends it, with the reversal strength on a cosine curriculum.

``--ctkd-variant global`` is the official code's single temperature; ``instance`` the paper's per-instance
net over the instance's predictions. The label/KD mix is the fixed gate's ``alpha`` (or another gate's,
composed in :mod:`metagate.gates.compose`).

The temperature's parameters are the gate's :meth:`~metagate.gates.Gate.student_parameters`: the trainer
adds them to the student's optimizer (same learning rate, schedule, momentum and weight decay, as the
official code's single SGD over student and temperature module) and keeps the gate's ``tau`` in the loss's
graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from metagate.errors import ConfigError
from metagate.gates.base import Gate, GateConfig, GateContext, GateOutput, UnitView
from metagate.gates.fixed import FixedMix, KDMixConfig
from metagate.gates.registry import register
from metagate.gates.temperature.itkd import TemperatureLog
from metagate.gates.temperature.reversal import (
    CTKD_T_MAX,
    CTKD_T_MIN,
    CTKD_THETA_INIT,
    GlobalTemperature,
    InstanceTemperature,
    check_range,
    cosine_curriculum,
)
from metagate.options import option

__all__ = ["CTKDConfig", "CTKDGate"]


@dataclass
class CTKDTemperatureConfig(GateConfig):
    """CTKD's learnable temperature (shared by ``ctkd`` and its compositions)."""

    ctkd_variant: str = option("global", "one learnable temperature (the official code) or a net per instance",
                               choices=("global", "instance"))
    ctkd_t_min: float = option(CTKD_T_MIN, "lowest temperature (> 0; official: 1)")
    ctkd_t_max: float = option(CTKD_T_MAX, "highest temperature (official: 1 + 20 = 21)")
    ctkd_theta_init: float = option(CTKD_THETA_INIT, "initial theta of T = t_min + (t_max - t_min) sigmoid(theta) "
                                                     "(official: 1, T = 15.6)")
    ctkd_curriculum_epochs: int = option(10, "epochs of the cosine curriculum of the reversal strength from 0 to "
                                             "1 (official: 10 of 240; 0: full strength from the start)")
    ctkd_hidden: int = option(64, "instance: hidden width of the temperature net")

    def __post_init__(self) -> None:
        super().__post_init__()
        check_range(self.ctkd_t_min, self.ctkd_t_max, ("--ctkd-t-min", "--ctkd-t-max"))
        if self.ctkd_curriculum_epochs < 0:
            raise ConfigError(f"--ctkd-curriculum-epochs must be >= 0, got {self.ctkd_curriculum_epochs}")
        if self.ctkd_hidden < 1:
            raise ConfigError(f"--ctkd-hidden must be >= 1, got {self.ctkd_hidden}")


@dataclass
class CTKDConfig(KDMixConfig, CTKDTemperatureConfig):
    """Options of the ``ctkd`` gate (``--alpha``: the label weight; ``--tau`` is not used)."""


@register("ctkd")
class CTKDGate(Gate):
    """Learnable temperature through gradient reversal (options: :class:`CTKDConfig`)."""

    config_class = CTKDConfig
    config: CTKDConfig
    trusted_weights = True

    def __init__(self, config: CTKDConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.alpha = self.config.label_weight
        self.module: nn.Module | None = None
        self._run: GateContext | None = None
        self._log: TemperatureLog | None = None
        self._mix = FixedMix(self.alpha)
        self.lam = 0.0

    def setup(self, run: GateContext) -> None:
        c = self.config
        self._run = run
        if self.module is None:
            if c.ctkd_variant == "global":
                self.module = GlobalTemperature(c.ctkd_t_min, c.ctkd_t_max, c.ctkd_theta_init)
            else:
                if run.bank is None:
                    raise ConfigError(f"gate {self.name!r} needs teachers; pass --teachers K >= 1")
                self.module = InstanceTemperature(run.bank.num_classes, c.ctkd_hidden, c.ctkd_t_min, c.ctkd_t_max,
                                                  c.ctkd_theta_init)
        self.module.to(device=run.device, dtype=run.dtype)
        self._log = TemperatureLog(run)

    def student_parameters(self) -> list[nn.Parameter]:
        assert self.module is not None, "call setup() first"
        return list(self.module.parameters())

    def curriculum(self) -> float:
        """The reversal strength now: the official curriculum at the 1-based epoch number."""
        run = self._run
        epoch = 0 if run is None else run.step // max(1, run.steps_per_epoch)
        return cosine_curriculum(epoch + 1, self.config.ctkd_curriculum_epochs)

    def temperature(self, view: UnitView) -> Tensor:
        """The temperature with its graph: a 0-dim tensor (global) or ``[N]`` (instance)."""
        assert self.module is not None, "call setup() first"
        self.lam = self.curriculum()
        if isinstance(self.module, GlobalTemperature):
            return self.module(self.lam)
        return self.module(view.student_log_probs, view.teacher_log_probs(1.0), self.lam)

    def weights(self, view: UnitView) -> GateOutput:
        if view.num_teachers == 0:
            raise ConfigError(f"gate {self.name!r} needs teachers; pass --teachers K >= 1")
        tau = self.temperature(view)  # a NaN temperature makes the loss NaN: the trainer names this gate
        if self._log is not None:
            self._log.record(view.unit_ids, tau)
        return GateOutput(self._mix(view), tau)

    def diagnostics(self) -> dict[str, float]:
        return {} if self._log is None else self._log.summary()

    def log(self, logger: Any, step: int) -> None:
        logger.scalar("temperature/lambda", self.lam, step)
        if self._log is not None:
            self._log.write(logger, step)

    def state_dict(self) -> dict[str, Any]:
        return {} if self.module is None else {"module": self.module.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.module is not None and "module" in state:
            self.module.load_state_dict(state["module"])

    def hparams(self) -> dict[str, Any]:
        return {**super().hparams(), "alpha": self.alpha}
