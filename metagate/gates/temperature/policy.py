"""Per-instance temperature policies (ITKD, Zhang et al. 2024): the state, the Gaussian policy and the
mapping from actions to temperatures, shared by the in-loop gate, the gymnasium env and the SB3 policy.

Facts from the official code (Zhengbo-Zhang/ITKD): the state of an instance is the student's top-1
probability, the teacher's top-1 probability and the student's top-1 minus top-2 margin (their code takes
``kthvalue(p, 2)``, the second *smallest* probability; the margin means the second *largest*, used here);
the actor is an MLP whose mean ``mu`` is squashed by ``tanh`` with a state-independent ``sigma``
(``exp(-0.5)`` at the start), and the temperature is ``T = 10 * sigmoid(mu + eps * sigma)``.

Here the range is configurable, ``T = t_min + (t_max - t_min) * sigmoid(a)`` with ``a`` clipped to
``[-ACTION_BOUND, ACTION_BOUND]`` (the env's action box), and ``mu`` is not squashed (the sigmoid
bounds ``T`` already; ``tanh`` would confine the mean temperature to the middle of the range). The head's
bias starts at the action whose temperature is ``init`` (ITKD warms up at ``T = 4``).

Shapes: ``B`` units, ``K`` teachers, ``S`` state features (:data:`NUM_STATE`). Observations are
``[..., B, 1, S]`` (one "slot" where teacher weighting has ``K``), so the REINFORCE learner, which
concatenates episodes along the unit axis, and :class:`~metagate.policies.core.TeacherGaussian` serve both.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagate.errors import ConfigError
from metagate.features import FEATURE_HIGH, FEATURE_NAMES, NUM_FEATURES, TeacherFeatureCache, unit_features
from metagate.gates.temperature.reversal import check_range, range_temperature
from metagate.policies.core import TeacherGaussian

ITKD_FEATURES = ("itkd_s_top1", "itkd_t_top1", "itkd_s_margin")
STATE_NAMES = ITKD_FEATURES + tuple(f"mean_{n}" for n in FEATURE_NAMES)
NUM_STATE = len(STATE_NAMES)
ACTION_BOUND = 6.0  # sigmoid(6) = 0.9975: the action box covers all but the ends of the range
ITKD_T_MIN, ITKD_T_MAX, ITKD_T_INIT = 1.0, 10.0, 4.0

__all__ = ["ACTION_BOUND", "ITKD_FEATURES", "NUM_STATE", "STATE_NAMES", "TemperatureState", "TemperaturePolicy",
           "action_temperature", "temperature_action", "temperature_state"]


def action_temperature(action: Tensor, t_min: float, t_max: float) -> Tensor:
    """Actions (any shape) -> temperatures ``t_min + (t_max - t_min) sigmoid(clip(a))``."""
    return range_temperature(action.clamp(-ACTION_BOUND, ACTION_BOUND), t_min, t_max)


def temperature_action(tau: float, t_min: float, t_max: float) -> float:
    """The action whose temperature is ``tau`` (the inverse of :func:`action_temperature`)."""
    p = min(max((tau - t_min) / (t_max - t_min), 1e-6), 1 - 1e-6)
    return max(-ACTION_BOUND, min(ACTION_BOUND, math.log(p / (1 - p))))


@torch.no_grad()
def temperature_state(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor,
                      progress: float = 0.0) -> Tensor:
    """The state ``[N, 1, S]`` of every unit (reference implementation; the gate uses :class:`TemperatureState`).

    Columns: the ITKD state (student top-1 probability, top-1 probability of the teachers' mean
    distribution, student top-1 minus the second largest probability), then the project's unit features
    (:func:`metagate.features.unit_features`) averaged over teachers; all clamped to ``[0, FEATURE_HIGH]``.
    """
    ps = F.softmax(student_logits.detach().float(), -1)
    pt = F.softmax(teacher_logits.detach().float(), -1).mean(1)
    top2 = ps.topk(2, -1).values
    itkd = torch.stack([top2[:, 0], pt.max(-1).values, top2[:, 0] - top2[:, 1]], -1)
    pooled = unit_features(student_logits, teacher_logits, labels, progress).mean(1)
    return torch.cat([itkd, pooled], -1).clamp_(0.0, FEATURE_HIGH).unsqueeze(1)


class TemperatureState:
    """:func:`temperature_state` of training units, fast: the project's feature cache plus each unit's
    (fixed) teacher top-1 probability, computed once.

    :param teacher_logits: ``[N, K, C]`` of all training units
    :param labels: ``[N]`` their (possibly noisy) labels
    :param cache: an existing feature cache of the same logits and labels (else one is built)
    """

    def __init__(self, teacher_logits: Tensor, labels: Tensor, cache: TeacherFeatureCache | None = None) -> None:
        self.cache = TeacherFeatureCache(teacher_logits, labels) if cache is None else cache
        with torch.no_grad():
            self.t_top1 = F.softmax(teacher_logits.detach().float(), -1).mean(1).max(-1).values  # [N]

    def flat_state(self, log_ps: Tensor, ids: Tensor, progress: float = 0.0) -> Tensor:
        """``[B, 1, S]`` from the student's detached float32 log-probabilities ``[B, C]``."""
        k = self.cache.num_teachers
        feats = self.cache.flat_features(log_ps, ids, progress).view(-1, k, NUM_FEATURES)
        pooled = feats.mean(1) if k > 1 else feats[:, 0]
        # the student's confidence and margin are features 6 and 7 of every teacher's row
        itkd = torch.stack([pooled[:, 6], self.t_top1.index_select(0, ids), pooled[:, 7]], -1)
        return torch.cat([itkd, pooled], -1).unsqueeze(1)

    def state(self, student_logits: Tensor, ids: Tensor, progress: float = 0.0) -> Tensor:
        with torch.no_grad():
            return self.flat_state(F.log_softmax(student_logits.detach().float(), -1), ids, progress)


class TemperatureHead(nn.Module):
    """MLP over the state: ``[..., S] -> [..., H] -> [..., H] -> [...]`` (the mean action)."""

    def __init__(self, num_state: int = NUM_STATE, hidden: int = 32, init_action: float = 0.0) -> None:
        super().__init__()
        self.num_state = int(num_state)
        self.net = nn.Sequential(nn.Linear(num_state, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                                 nn.Linear(hidden, 1))
        nn.init.normal_(self.net[4].weight, std=0.01)  # start near one temperature for every unit
        nn.init.constant_(self.net[4].bias, float(init_action))

    def forward(self, x: Tensor) -> Tensor:
        """:param x: ``[..., B, 1, S]``. :return: ``[..., B, 1]``."""
        if x.shape[-1] != self.num_state:
            raise ValueError(f"expected {self.num_state} state features, got {x.shape[-1]}")
        return self.net(x).squeeze(-1)


class TemperaturePolicy(nn.Module):
    """Gaussian policy over per-unit temperature actions (the in-loop REINFORCE policy).

    :param t_min: lowest temperature (> 0)
    :param t_max: highest temperature (> t_min)
    :param init: the temperature every unit starts near
    :param hidden: MLP width
    :param log_std: initial per-unit log-std (ITKD: -0.5; ``None``: off)
    :param shared_log_std: initial log-std of the noise shared by a batch's units and held over an
        episode (``None``: off)
    """

    def __init__(self, t_min: float = ITKD_T_MIN, t_max: float = ITKD_T_MAX, init: float = ITKD_T_INIT,
                 hidden: int = 32, log_std: float | None = None, shared_log_std: float | None = -0.5,
                 num_state: int = NUM_STATE) -> None:
        super().__init__()
        check_range(t_min, t_max, ("--temp-min", "--temp-max"))
        if not t_min < init < t_max:
            raise ConfigError(f"--temp-init must lie in (--temp-min, --temp-max) = ({t_min}, {t_max}), got {init}")
        if log_std is None and shared_log_std is None:
            raise ConfigError("the temperature policy needs per-unit or shared exploration noise")
        self.t_min, self.t_max = float(t_min), float(t_max)
        self.net = TemperatureHead(num_state, hidden, temperature_action(init, t_min, t_max))
        self.unit_log_std = nn.Parameter(torch.tensor(float(log_std))) if log_std is not None else None
        self.shared_log_std = nn.Parameter(torch.tensor(float(shared_log_std))) if shared_log_std is not None \
            else None

    @property
    def num_state(self) -> int:
        return self.net.num_state

    def mean_action(self, state: Tensor) -> Tensor:
        """``[..., B, 1]`` mean actions for states ``[..., B, 1, S]``."""
        return self.net(state)

    def distribution(self, state: Tensor) -> TeacherGaussian:
        return TeacherGaussian(self.mean_action(state), self.unit_log_std, self.shared_log_std)

    def temperature(self, action: Tensor) -> Tensor:
        """Actions ``[B, 1]`` -> temperatures ``[B]``."""
        return action_temperature(action.reshape(-1), self.t_min, self.t_max)
