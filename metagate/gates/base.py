"""The gate interface (docs/design.md, "The gate contract").

A gate maps a :class:`UnitView` of the current batch to weights ``W [N, 1+K]``
(column 0 = label, 1..K = teachers) and optionally a per-unit temperature.
Learning gates use :meth:`Gate.before_step` / :meth:`Gate.after_step`; their
parameters live in the gate (with their own optimizer), never in the student.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagate.errors import ConfigError
from metagate.losses import closed_form_columns, unit_losses
from metagate.options import Options, option_values

if TYPE_CHECKING:  # pragma: no cover
    from metagate.data.task import Split
    from metagate.teachers.bank import TeacherBank


@dataclass
class GateOutput:
    """What a gate decides for one batch.

    :param weights: ``[N, 1+K]`` non-negative weights (column 0 = label)
    :param tau: scalar or ``[N]`` KD temperature
    :param trusted: the weights are valid by construction (e.g. a softmax); the trainer then skips its
        per-step NaN/negative check. A gate whose every decision is valid by construction sets its class
        attribute :attr:`Gate.trusted_weights`, which :meth:`Gate.decide` copies here; an outside driver
        (the env) sets it on its own decision
    :param student_tau: the student's temperature in the KD columns; ``None`` (the default): ``tau`` as
        well, Hinton's ``tau**2 * KL(softmax(t/tau) || softmax(s/tau))``; a number ``s`` gives
        ``s**2 * KL(softmax(t/tau) || softmax(z/s))`` (``1.0``: the student at its own temperature against
        the tempered teacher, as HKD trains it)
    :param logit_grad: optional capability: ``[N, C]`` the gradient of the weighted loss (the trainer's reduction included) w.r.t.
        the student's logits at these weights and ``tau``, when the gate already has it (the meta gate's
        look-ahead computes the per-column gradients anyway). The trainer then backpropagates it from the
        logits instead of differentiating the loss columns again; it must be exact (tested against autograd)
    """

    weights: Tensor
    tau: Tensor | float = 1.0
    trusted: bool = False
    logit_grad: Tensor | None = None
    student_tau: float | None = None


class UnitView:
    """Everything a gate may look at for the units of one batch.

    Units are flattened: ``N = B * T`` (``T = 1`` for classification). Teacher tensors are served
    lazily: the trainer hands a lookup into the teacher bank, so a gate that never reads raw teacher
    logits (e.g. ``fixed``) costs no gather.

    :param student_logits: ``[N, C]`` the live logits (gates read them detached)
    :param teacher_logits: ``[N, K, C]``, ``None`` (no teachers), or a zero-argument callable
        returning them on first access
    :param labels: ``[N]``
    :param mask: ``[N]`` 0/1
    :param ids: ``[B]`` training-unit ids (dataset indices) or ``None``
    :param seq_shape: ``(B, T)``
    :param progress: fraction of training done, in ``[0, 1]``
    :param extras: free-form additions for gates that compose
    :param teacher_log_probs_fn: ``tau -> [N, K, C]`` teacher log-probabilities (the trainer serves
        them from the bank's per-temperature cache)
    :param num_teachers: ``K`` when ``teacher_logits`` is a callable
    """

    def __init__(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | Callable[[], Tensor] | None,
        labels: Tensor,
        mask: Tensor,
        ids: Tensor | None,
        seq_shape: tuple[int, int],
        progress: float = 0.0,
        extras: dict[str, Any] | None = None,
        teacher_log_probs_fn: Callable[[float], Tensor] | None = None,
        num_teachers: int | None = None,
    ) -> None:
        self.student_logits, self.labels, self.mask, self.ids = student_logits, labels, mask, ids
        self.seq_shape, self.progress = seq_shape, progress
        self.extras: dict[str, Any] = {} if extras is None else extras
        self.teacher_log_probs_fn = teacher_log_probs_fn
        #: ``(tau, tokens [N]) -> [N, K]``: the teachers' log-probabilities of one token per unit (the trainer
        #: sets it for a bank that reads them without its ``[N, K, C]`` rows)
        self.teacher_token_log_probs_fn: Callable[[float, Tensor], Tensor] | None = None
        #: ``(log_q [N, C], tau) -> [N, K]`` the teachers' ``KL(p_tau || q)`` in closed form (a sparse bank's):
        #: :meth:`loss_columns` then builds no ``[N, K, C]`` rows
        self.teacher_kd_fn: Callable[[Tensor, float], Tensor] | None = None
        #: ``(log_ps [N, C], labels [N]) -> [N, K, 6]`` the teacher columns of the unit features from a bank that
        #: computes them without its ``[N, K, C]`` rows (:func:`metagate.features.view_features`)
        self.teacher_features_fn: Callable[[Tensor, Tensor], Tensor] | None = None
        if callable(teacher_logits):
            if num_teachers is None:
                raise ValueError("num_teachers is required with a lazy teacher lookup")
            self._teacher_lookup: Callable[[], Tensor] | None = teacher_logits
            self._teacher_logits: Tensor | None = None
            self._k = int(num_teachers)
        else:
            self._teacher_lookup = None
            self._teacher_logits = teacher_logits
            self._k = 0 if teacher_logits is None else int(teacher_logits.shape[1])
        self._student_log_probs: Tensor | None = None

    @property
    def teacher_logits(self) -> Tensor | None:
        """``[N, K, C]`` or ``None``."""
        if self._teacher_logits is None and self._teacher_lookup is not None:
            self._teacher_logits = self._teacher_lookup()
        return self._teacher_logits

    @property
    def num_teachers(self) -> int:
        return self._k

    @property
    def num_units(self) -> int:
        return int(self.labels.shape[0])

    @property
    def is_sequence(self) -> bool:
        """Whether the units are the ``T > 1`` tokens of ``B`` sequences."""
        return self.seq_shape[1] > 1

    @property
    def unit_ids(self) -> Tensor | None:
        """``[N]`` global training-unit ids: the example ids, or ``id * T + t`` for each token of a sequence
        batch (the rows of a per-token table of ``B_train * T`` units); ``None`` without ids."""
        ids = self.ids
        if ids is None or not self.is_sequence:
            return ids
        t = self.seq_shape[1]
        return (ids.unsqueeze(1) * t + torch.arange(t, device=ids.device)).reshape(-1)

    @property
    def student_log_probs_graph(self) -> Tensor:
        """``[N, C]`` student log-probabilities *with* their graph; the trainer reuses them for the
        CE column when a gate has asked for them (one log-softmax per step)."""
        if self._student_log_probs is None:
            self._student_log_probs = F.log_softmax(self.student_logits, dim=-1)
        return self._student_log_probs

    @property
    def student_log_probs(self) -> Tensor:
        """``[N, C]`` detached student log-probabilities."""
        return self.student_log_probs_graph.detach()

    @property
    def made_student_log_probs(self) -> Tensor | None:
        """The log-softmax (with graph) if a gate has asked for it, else ``None`` -- never computes it."""
        return self._student_log_probs

    def teacher_log_probs(self, tau: float = 1.0) -> Tensor:
        """``[N, K, C]`` log-probabilities of the teachers at temperature ``tau``."""
        if self.teacher_log_probs_fn is not None:
            return self.teacher_log_probs_fn(tau)
        t = self.teacher_logits
        assert t is not None
        return F.log_softmax(t / tau, dim=-1)

    def loss_columns(self, student_logits: Tensor, tau: float) -> Tensor:
        """``[N, 1+K]`` the one equation's columns of ``student_logits`` (e.g. a look-ahead's, with graph) against
        this view's labels and teachers at ``tau``: :func:`~metagate.losses.unit_losses` on the teachers' rows, or
        the bank's closed form when it has one (the same values)."""
        if self.teacher_kd_fn is not None and not torch.is_tensor(tau):
            return closed_form_columns(student_logits, self.labels, self.teacher_kd_fn, float(tau))
        return unit_losses(student_logits, self.teacher_logits, self.labels, tau, validate=False)

    def teacher_token_log_probs(self, tau: float, tokens: Tensor) -> Tensor:
        """``[N, K]`` each teacher's log-probability at temperature ``tau`` of one token per unit (``tokens``
        ``[N]``, in range): from the bank without the ``[N, K, C]`` rows when it can (a sparse top-k bank),
        else gathered from :meth:`teacher_log_probs`."""
        if self.teacher_token_log_probs_fn is not None:
            return self.teacher_token_log_probs_fn(tau, tokens)
        lp = self.teacher_log_probs(tau)
        return lp.gather(2, tokens.reshape(-1, 1, 1).expand(-1, lp.shape[1], 1)).squeeze(2)


class GateContext(Protocol):
    """What a gate may use of the run (the trainer provides it; gates never import the trainer).

    Read-only for gates. ``train_x``/``train_y`` are the training split on ``device``, indexed by unit id;
    ``meta`` is the clean split learned gates may train on (never ``select``).
    """

    student: nn.Module
    device: torch.device
    bank: TeacherBank | None
    train_x: Tensor
    train_y: Tensor
    meta: Split
    #: ``[num_train_units]`` bool, the units whose label was corrupted: ground truth for diagnostics only (a
    #: gate's log or ``diagnostics``), never for a decision
    corrupted: Tensor
    #: each teacher's top class against the clean label ``[num_train_units, K]`` (``None`` without a bank): ground
    #: truth for the oracle gates only (kind ``oracle``, never a baseline), like ``corrupted``
    teacher_right: Tensor | None

    @property
    def dtype(self) -> torch.dtype: ...  # the student's parameter dtype

    @property
    def num_teachers(self) -> int: ...

    @property
    def num_train_units(self) -> int: ...

    @property
    def seed(self) -> int: ...

    @property
    def batch_size(self) -> int: ...

    @property
    def steps_per_epoch(self) -> int: ...

    @property
    def total_steps(self) -> int: ...

    @property
    def step(self) -> int: ...

    @property
    def lr(self) -> float: ...  # the student's current learning rate (the look-ahead's step size)

    @property
    def progress(self) -> float: ...  # fraction of training done, in [0, 1]


@dataclass
class StepContext:
    """Handed to :meth:`Gate.before_step` / :meth:`Gate.after_step`.

    :param run: the run's :class:`GateContext`
    :param batch: the training batch
    :param view: the batch's :class:`UnitView`
    :param output: the gate's decision (set before ``after_step``)
    :param losses: ``[N, 1+K]`` unit losses of the real step (set before ``after_step``)
    :param step: global step index
    """

    run: GateContext
    batch: Any
    view: UnitView
    step: int
    output: GateOutput | None = None
    losses: Tensor | None = None


@dataclass
class GateConfig(Options):
    """Base of the gates' option dataclasses (one subclass per gate; see :mod:`metagate.options`)."""


class Gate(ABC):
    """Base class of all gates. Subclasses register with :func:`metagate.gates.register` and declare their
    options as a :class:`GateConfig` subclass in :attr:`config_class`.

    :param config: the gate's options; or give them as keyword arguments (field names)
    """

    name: ClassVar[str] = "gate"
    #: the gate's option dataclass (the command line, YAML keys and HPARAMS come from it)
    config_class: ClassVar[type[GateConfig]] = GateConfig
    #: whether the gate needs teacher logits (``ce`` does not)
    uses_teachers: ClassVar[bool] = True
    #: every decision's weights are valid by construction (skip the per-step NaN/negative check)
    trusted_weights: ClassVar[bool] = False
    #: ``"temperature"``: the gate reads temperature-scaled teachers (the run hands it the calibrated bank)
    teacher_calibration: str | None = None

    def __init__(self, config: GateConfig | None = None, **options: Any) -> None:
        if config is None:
            config = self.config_class.from_options(options, what=f"gate {self.name!r}")  # type: ignore[assignment]
        elif options:
            raise ConfigError(f"gate {self.name!r}: pass a config or options, not both")
        if not isinstance(config, self.config_class):
            raise ConfigError(f"gate {self.name!r} takes a {self.config_class.__name__}, "
                              f"got {type(config).__name__}")
        self.config = config

    def setup(self, run: GateContext) -> None:  # noqa: B027 - optional hook
        """Called once by the trainer before training (sizes, device, data access)."""

    @abstractmethod
    def weights(self, view: UnitView) -> GateOutput:
        """Decide ``W [N, 1+K]`` (and ``tau``) for the units in ``view``."""

    def decide(self, view: UnitView) -> GateOutput:
        """:meth:`weights`, marked ``trusted`` when the class guarantees valid weights (what the trainer calls)."""
        out = self.weights(view)
        if self.trusted_weights and not out.trusted:
            out.trusted = True
        return out

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

    def student_parameters(self) -> list[torch.nn.Parameter]:
        """Parameters the *student's* optimizer trains (CTKD's temperature): the trainer adds them as a
        parameter group after :meth:`setup` and keeps the gate's ``tau`` in the loss's graph, so the loss's
        gradient reaches them through ``tau``. Empty for every other gate (their ``tau`` is detached)."""
        return []

    def hparams(self) -> dict[str, Any]:
        """Options to record in TensorBoard's HPARAMS: the config's fields (gates add resolved values)."""
        return option_values(self.config)

    def diagnostics(self) -> dict[str, float]:
        """Gate-specific numbers for the run's final metrics (``diag/...``; e.g. the temperatures chosen)."""
        return {}

    def log(self, logger: Any, step: int) -> None:  # noqa: B027
        """Write gate-specific scalars/histograms (called at the trainer's log interval)."""
