"""The gate interface (DESIGN.md, "Gate interface").

A gate maps a :class:`UnitView` of the current batch to weights ``W [N, 1+K]``
(column 0 = label, 1..K = teachers) and optionally a per-unit temperature.
Learning gates use :meth:`Gate.before_step` / :meth:`Gate.after_step`; their
parameters live in the gate (with their own optimizer), never in the student.
"""

from __future__ import annotations

import argparse
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

if TYPE_CHECKING:  # pragma: no cover
    from metagate.trainer import Trainer


@dataclass
class GateOutput:
    """What a gate decides for one batch.

    :param weights: ``[N, 1+K]`` non-negative weights (column 0 = label)
    :param tau: scalar or ``[N]`` KD temperature
    :param trusted: the weights are valid by construction (e.g. a softmax); the trainer then skips
        its per-step NaN/negative check of an outside driver's decision
    """

    weights: Tensor
    tau: Tensor | float = 1.0
    trusted: bool = False


@dataclass
class UnitView:
    """Everything a gate may look at for the units of one batch.

    Units are flattened: ``N = B * T`` (``T = 1`` for classification).

    :param student_logits: ``[N, C]`` (detached view for features; the loss uses the live tensor)
    :param teacher_logits: ``[N, K, C]`` or ``None``
    :param labels: ``[N]``
    :param mask: ``[N]`` 0/1
    :param ids: ``[B]`` training-unit ids (dataset indices) or ``None``
    :param seq_shape: ``(B, T)``
    :param progress: fraction of training done, in ``[0, 1]``
    """

    student_logits: Tensor
    teacher_logits: Tensor | None
    labels: Tensor
    mask: Tensor
    ids: Tensor | None
    seq_shape: tuple[int, int]
    progress: float = 0.0
    extras: dict[str, Any] = field(default_factory=dict)
    #: ``tau -> [N, K, C]`` teacher log-probabilities (the trainer serves them from the bank's cache)
    teacher_log_probs_fn: Callable[[float], Tensor] | None = None

    @property
    def num_teachers(self) -> int:
        return 0 if self.teacher_logits is None else int(self.teacher_logits.shape[1])

    @property
    def num_units(self) -> int:
        return int(self.labels.shape[0])

    @cached_property
    def student_log_probs(self) -> Tensor:
        """``[N, C]`` detached."""
        return F.log_softmax(self.student_logits.detach(), dim=-1)

    def teacher_log_probs(self, tau: float = 1.0) -> Tensor:
        """``[N, K, C]`` log-probabilities of the teachers at temperature ``tau``."""
        if self.teacher_log_probs_fn is not None:
            return self.teacher_log_probs_fn(tau)
        assert self.teacher_logits is not None
        return F.log_softmax(self.teacher_logits / tau, dim=-1)


@dataclass
class StepContext:
    """Handed to :meth:`Gate.before_step` / :meth:`Gate.after_step`.

    :param trainer: the shared trainer (student, optimizer, task, teacher bank)
    :param batch: the training batch
    :param view: the batch's :class:`UnitView`
    :param output: the gate's decision (set before ``after_step``)
    :param losses: ``[N, 1+K]`` unit losses of the real step (set before ``after_step``)
    :param step: global step index
    """

    trainer: Trainer
    batch: Any
    view: UnitView
    step: int
    output: GateOutput | None = None
    losses: Tensor | None = None


class Gate(ABC):
    """Base class of all gates. Subclasses register with :func:`metagate.gates.register`."""

    name: ClassVar[str] = "gate"
    #: whether the gate needs teacher logits (``ce`` does not)
    uses_teachers: ClassVar[bool] = True
    #: weights valid by construction (skip the per-step NaN/negative check)
    trusted_weights: ClassVar[bool] = False

    def setup(self, trainer: Trainer) -> None:  # noqa: B027 - optional hook
        """Called once by the trainer before training (sizes, device, data access)."""

    @abstractmethod
    def weights(self, view: UnitView) -> GateOutput:
        """Decide ``W [N, 1+K]`` (and ``tau``) for the units in ``view``."""

    def before_step(self, ctx: StepContext) -> None:  # noqa: B027
        """Hook before the weights are requested (meta: look-ahead)."""

    def after_step(self, ctx: StepContext) -> None:  # noqa: B027
        """Hook after the student's real step (policy: reward, update)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027
        pass

    def parameters(self) -> list[torch.nn.Parameter]:
        """The gate's own learnable parameters (never the student's)."""
        return []

    def hparams(self) -> dict[str, Any]:
        """Options to record in TensorBoard's HPARAMS."""
        return {}

    def log(self, logger: Any, step: int) -> None:  # noqa: B027
        """Write gate-specific scalars/histograms (called at the trainer's log interval)."""

    # -- command line -------------------------------------------------------------------------
    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:  # noqa: B027
        """Add this gate's options to the ``distill`` parser (flags must be unique)."""

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Gate:
        """Build the gate from parsed command-line arguments."""
        return cls()  # type: ignore[call-arg]
