"""Gates made of gates: each part decides one thing of the same step.

A :class:`ComposedGate` has a *mix* part (the label weight and the total teacher weight of every unit:
``fixed``, ``hard``, ``meta``), optionally a *teachers* part (the distribution over teachers inside that KD
share: ``reinforce`` / ``policy``) and optionally a *temperature* part (``temperature``, ``ctkd``). Per step
every part's hooks run (``before_step``: the meta look-ahead; ``after_step``: a policy's reward) and
:meth:`ComposedGate.weights` combines their decisions; each part learns from its own signal.

Registered compositions: ``meta+policy`` and ``{hard,meta}+{temperature,ctkd}``. A composition's options
are the union of its parts' (one config class inheriting each part's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from metagate.gates.base import Gate, GateConfig, GateContext, GateOutput, StepContext, UnitView
from metagate.gates.hard import HardConfig, HardGate
from metagate.gates.meta import MetaGate
from metagate.gates.meta.config import MetaConfig
from metagate.gates.policy import PolicyConfig, PolicyGate, ReinforceConfig, ReinforceGate
from metagate.gates.registry import register
from metagate.gates.temperature.ctkd import CTKDGate, CTKDTemperatureConfig
from metagate.gates.temperature.itkd import TemperatureConfig, TemperatureGate
from metagate.policies.core import split_kd_share

__all__ = ["ComposedGate", "MetaPolicyGate"]


def _subset(config: Any, cls: type) -> dict[str, Any]:
    """The options of ``config`` that ``cls`` declares (a part's options the composition leaves out, e.g.
    ``ctkd``'s ``alpha`` under a meta mix, keep their defaults)."""
    return {n: getattr(config, n) for n in cls.option_names() if hasattr(config, n)}


def _part(cls: type[Gate], config: Any) -> Gate:
    return cls(cls.config_class.from_options(_subset(config, cls.config_class), what=f"gate {cls.name!r}"))


class ComposedGate(Gate):
    """The mix of one gate, the teacher distribution of another, the temperature of a third (see the module).

    Subclasses name the part classes (:attr:`mix_class`, :attr:`teachers_class`, :attr:`temperature_class`)
    or override :meth:`build_parts`. When the temperature part replaces the mix's ``tau``, the mix's
    ``logit_grad`` (the meta gate's, computed at its own temperature) is dropped and the trainer
    differentiates the loss itself.
    """

    mix_class: ClassVar[type[Gate]]
    teachers_class: ClassVar[type[Gate] | None] = None
    temperature_class: ClassVar[type[Gate] | None] = None

    def __init__(self, config: GateConfig | None = None, **options: Any) -> None:
        super().__init__(config, **options)
        self.mix, self.teachers, self.temperature = self.build_parts()
        self.parts = [p for p in (self.mix, self.teachers, self.temperature) if p is not None]
        self.trusted_weights = all(p.trusted_weights for p in self.parts)  # type: ignore[misc]

    @property
    def teacher_calibration(self) -> str | None:
        """A part asking for calibrated teachers (``hard``'s default) asks for the whole composition."""
        return next((p.teacher_calibration for p in self.parts if p.teacher_calibration), None)

    def build_parts(self) -> tuple[Gate, Gate | None, Gate | None]:
        tc, pc = self.teachers_class, self.temperature_class
        return (_part(self.mix_class, self.config), None if tc is None else _part(tc, self.config),
                None if pc is None else _part(pc, self.config))

    def setup(self, run: GateContext) -> None:
        for p in self.parts:
            p.setup(run)

    def before_step(self, ctx: StepContext) -> None:
        for p in self.parts:
            p.before_step(ctx)

    def weights(self, view: UnitView) -> GateOutput:
        m = self.mix.decide(view)
        w, tau, grad = m.weights, m.tau, m.logit_grad
        if self.teachers is not None:
            kd = self.teachers.decide(view).weights[:, 1:]
            probs = kd / kd.sum(1, keepdim=True).clamp_min(1e-12)
            no_teacher = kd.sum(1) <= 0  # a selection policy chose no teacher: keep the mix's row as it is
            mixed = split_kd_share(w[:, 0], probs, kd_share=w[:, 1:].sum(1))
            w = torch.where(no_teacher.unsqueeze(1), w, mixed) if bool(no_teacher.any()) else mixed
            grad = None
        if self.temperature is not None:
            tau, grad = self.temperature.decide(view).tau, None
        return GateOutput(w, tau, trusted=m.trusted, logit_grad=grad, student_tau=m.student_tau)

    def after_step(self, ctx: StepContext) -> None:
        for p in self.parts:
            p.after_step(ctx)

    def parameters(self) -> list[nn.Parameter]:
        return [q for p in self.parts for q in p.parameters()]

    def student_parameters(self) -> list[nn.Parameter]:
        return [q for p in self.parts for q in p.student_parameters()]

    def state_dict(self) -> dict[str, Any]:
        return {role: p.state_dict() for role, p in self._roles()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for role, p in self._roles():
            p.load_state_dict(state[role])

    def _roles(self) -> list[tuple[str, Gate]]:
        # meta+policy checkpoints name the teacher part "policy"
        return [(r, p) for r, p in (("meta" if isinstance(self.mix, MetaGate) else "mix", self.mix),
                                    ("policy", self.teachers), ("temperature", self.temperature)) if p is not None]

    def hparams(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for p in self.parts:
            out.update(p.hparams())
        return out

    def log(self, logger: Any, step: int) -> None:
        for p in self.parts:
            p.log(logger, step)

    def diagnostics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for p in self.parts:
            out.update(p.diagnostics())
        return out


@dataclass
class MetaPolicyConfig(MetaConfig, PolicyConfig, ReinforceConfig):
    """Options of ``meta+policy``: the meta gate's, and the policy's (``reinforce``, or ``policy`` when
    ``--policy PATH`` is given)."""


@register("meta+policy")
class MetaPolicyGate(ComposedGate):
    """The meta gate learns the label/KD split, a policy weights the teachers inside it.

    Per step: the meta gate's look-ahead (``before_step``) and weights give each unit's label weight
    and total teacher weight (the sum of its teacher columns; ``--meta-columns split`` learns exactly
    that); the policy gate (``reinforce``, or ``policy`` with ``--policy PATH``) gives the per-unit
    distribution over teachers; :func:`split_kd_share` combines them. Both learn in the same step:
    the meta gate from its look-ahead (which uses its own teacher columns), the policy from the
    validation reward of its episodes.
    """

    config_class = MetaPolicyConfig
    config: MetaPolicyConfig
    mix_class = MetaGate

    def build_parts(self) -> tuple[Gate, Gate | None, Gate | None]:
        teachers = PolicyGate if self.config.policy else ReinforceGate
        return _part(MetaGate, self.config), _part(teachers, self.config), None

    @property
    def meta(self) -> Gate:
        return self.mix

    @property
    def policy_gate(self) -> Gate:
        assert self.teachers is not None
        return self.teachers


def register_composition(mix: type[Gate], mix_config: type, temperature: type[Gate], temperature_config: type,
                         mix_text: str, temperature_text: str) -> type[ComposedGate]:
    """Register ``{mix}+{temperature}``: the mix gate's label/KD split with the temperature part's ``tau``.

    :param mix_config: the mix's options; :param temperature_config: the temperature part's own options (without
        the label/KD mix it has as a gate of its own)
    """
    name = f"{mix.name}+{temperature.name}"
    look_ahead = " (the look-ahead scores its weights at ``--meta-tau``)" if issubclass(mix, MetaGate) else ""
    config = dataclass(type(f"{mix.__name__[:-4]}{temperature.__name__[:-4]}Config", (mix_config, temperature_config),
                            {"__doc__": f"Options of ``{name}``: {mix_text}, {temperature_text}.",
                             "__module__": __name__}))
    gate = type(f"{mix.__name__[:-4]}{temperature.__name__}", (ComposedGate,),
                {"__doc__": f"{mix_text[0].upper()}{mix_text[1:]} with {temperature_text}{look_ahead}.",
                 "__module__": __name__, "config_class": config, "mix_class": mix, "temperature_class": temperature})
    return register(name)(gate)


for _mix, _mix_config, _mix_text in ((HardGate, HardConfig, "HKD's label-or-teachers mix (``hard``)"),
                                     (MetaGate, MetaConfig, "the meta gate's mix")):
    for _temp, _temp_config, _temp_text in (
            (TemperatureGate, TemperatureConfig, "per-unit temperatures from the ``temperature`` gate's policy"),
            (CTKDGate, CTKDTemperatureConfig, "CTKD's learnable temperature")):
        register_composition(_mix, _mix_config, _temp, _temp_config, _mix_text, _temp_text)
