"""Temperature scaling of the teachers (Guo et al., ICML 2017, "On Calibration of Modern Neural Networks").

One temperature per teacher, ``tau_k = argmin_tau NLL(softmax(t_k / tau), y)`` on the clean ``meta`` split
(per token on sequence tasks, padding ignored), and one more for the teachers used together as one gauge
(HKD's ensemble): ``r = argmin_r NLL(mean_k softmax(t_k / (tau_k r)), y)`` -- the ensemble of the calibrated
teachers, calibrated as an ensemble.

The fit is a bounded 1-D search on ``log tau``: a grid over ``[TAU_MIN, TAU_MAX]`` then golden-section search
around its best point. A single teacher's NLL is convex in ``1/tau`` (a log-sum-exp minus a linear term), so
it has one minimum on the log scale; the ensemble's need not, hence the grid first. Deterministic, float64,
no optimizer state.

Calibrated teachers are a bank whose logits are divided by ``tau_k`` (:func:`metagate.teachers.build.calibrated_bank`); a gate then
reads them at temperature 1. The bank keeps the fit in ``bank.calibration`` (a :class:`TeacherCalibration`); the fit
is cached with the bank under the teachers' and the ``meta`` split's fingerprint
(:mod:`metagate.teachers.calibration_cache`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metagate.errors import InputError
from metagate.metrics import ece_mce
from metagate.seq_models import PAD

if TYPE_CHECKING:  # pragma: no cover
    from metagate.data.task import Split

#: the search interval of a temperature
TAU_MIN, TAU_MAX = 0.02, 50.0
_GRID = 61  # grid points on log tau before the golden-section refinement
_GOLDEN_STEPS = 60  # bracket shrinks by 0.618 per step: far below float tolerance on the log scale
#: the search's settings, part of a cached fit's version (:mod:`metagate.teachers.calibration_cache`): a cached
#: fit of other settings is refitted
FIT_METHOD = f"log-tau grid {_GRID} on [{TAU_MIN}, {TAU_MAX}] + {_GOLDEN_STEPS} golden-section steps"


def _flatten(logits: Tensor, labels: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """``[..., (K,) C]`` logits and ``[...]`` labels -> the real units only (mask, or labels >= 0), float64."""
    lead = labels.shape
    if tuple(logits.shape[: len(lead)]) != tuple(lead):
        raise InputError(f"logits {tuple(logits.shape)} do not start with the labels' shape {tuple(lead)}")
    keep = (labels >= 0) if mask is None else mask.bool() & (labels >= 0)
    x = logits[keep].double()
    y = labels[keep].long()
    if y.numel() == 0:
        raise InputError("no real unit to calibrate on (every label is padding)")
    if not torch.isfinite(x).all():
        raise InputError("teacher logits to calibrate hold NaN or infinite values")
    return x, y


def nll_at(logits: Tensor, labels: Tensor, tau: float, mask: Tensor | None = None) -> float:
    """Mean NLL of ``softmax(logits / tau)`` (``logits [..., C]``, ``labels [...]``; padding ignored)."""
    x, y = _flatten(logits, labels, mask)
    return float(F.cross_entropy(x / tau, y))


def ensemble_nll_at(logits: Tensor, labels: Tensor, tau: float, mask: Tensor | None = None) -> float:
    """Mean NLL of the ensemble ``mean_k softmax(logits_k / tau)`` (``logits [..., K, C]``)."""
    x, y = _flatten(logits, labels, mask)
    return _ensemble_nll(x, y, tau)


def _ensemble_nll(x: Tensor, y: Tensor, tau: float) -> float:
    lp = torch.logsumexp(F.log_softmax(x / tau, -1), dim=-2) - math.log(x.shape[-2])  # log mean_k p_k
    return float(F.nll_loss(lp, y))


def _minimise_log_tau(f: Any, lo: float = TAU_MIN, hi: float = TAU_MAX) -> float:
    """``argmin f(tau)`` over ``[lo, hi]``: a grid on ``log tau``, then golden section in the best point's bracket."""
    grid = torch.linspace(math.log(lo), math.log(hi), _GRID, dtype=torch.float64).tolist()
    vals = [f(math.exp(u)) for u in grid]
    i = min(range(len(vals)), key=vals.__getitem__)
    a, b = grid[max(i - 1, 0)], grid[min(i + 1, len(grid) - 1)]
    g = (math.sqrt(5.0) - 1.0) / 2.0
    c, d = b - g * (b - a), a + g * (b - a)
    fc, fd = f(math.exp(c)), f(math.exp(d))
    for _ in range(_GOLDEN_STEPS):
        if fc <= fd:
            b, d, fd = d, c, fc
            c = b - g * (b - a)
            fc = f(math.exp(c))
        else:
            a, c, fc = c, d, fd
            d = a + g * (b - a)
            fd = f(math.exp(d))
    return math.exp((a + b) / 2.0)


def fit_temperature(logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> float:
    """The temperature minimising the NLL of one model's ``softmax(logits / tau)`` on ``labels``.

    :param logits: ``[N, C]`` or per token ``[B, T, C]``
    :param labels: ``[N]`` or ``[B, T]``; negative labels (padding) are ignored
    :param mask: optional ``[N]`` / ``[B, T]`` 1 for real units
    """
    x, y = _flatten(logits, labels, mask)
    return _minimise_log_tau(lambda t: float(F.cross_entropy(x / t, y)))


def fit_ensemble_temperature(logits: Tensor, labels: Tensor, mask: Tensor | None = None) -> float:
    """The one temperature minimising the NLL of the ensemble ``mean_k softmax(logits_k / tau)``.

    :param logits: ``[N, K, C]`` or ``[B, T, K, C]``
    """
    x, y = _flatten(logits, labels, mask)
    return _minimise_log_tau(lambda t: _ensemble_nll(x, y, t))


def nll_ece(probs: Tensor, labels: Tensor) -> tuple[float, float]:
    """Mean NLL and ECE (15 equal-width bins, :func:`metagate.metrics.ece_mce`) of ``probs [M, C]``."""
    nll = float(-probs.double().gather(1, labels.view(-1, 1)).clamp_min(1e-300).log().mean())
    return nll, ece_mce(probs.double(), labels)[0]


@dataclass
class TeacherCalibration:
    """The fit of :func:`calibrate_teachers` and its scores on the split it was fitted on.

    :param names: the teachers, in the bank's order
    :param taus: ``tau_k`` per teacher (1.0 for a teacher without logits on the split: not calibrated)
    :param ensemble_tau: ``r``, the ensemble of the calibrated teachers calibrated as one gauge
    :param stats: per teacher ``{"nll_tau1", "ece_tau1", "nll", "ece", ...}`` on the split (``nll``/``ece``: at
        ``tau_k``), and under ``"ensemble"`` the raw ensemble at 1 and the calibrated ensemble at ``r``
    :param calibrated: per teacher, whether it had logits on the split
    """

    names: list[str]
    taus: list[float]
    ensemble_tau: float
    stats: dict[str, dict[str, float]] = field(default_factory=dict)
    calibrated: list[bool] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def calibrate_teachers(logits: Tensor, labels: Tensor, names: list[str], mask: Tensor | None = None,
                       extra_taus: tuple[float, ...] = (), calibrated: list[bool] | None = None
                       ) -> TeacherCalibration:
    """Fit ``tau_k`` per teacher and the ensemble's ``r`` on a clean split; score NLL and ECE before and after.

    :param logits: ``[M, K, C]`` (or ``[B, T, K, C]``) the teachers' logits on the split
    :param labels: ``[M]`` (or ``[B, T]`` with ``mask``; negative labels count as padding too)
    :param extra_taus: more fixed temperatures to score (e.g. 1.5, HKD's fixed one): ``nll_tau1.5`` ...
    :param calibrated: which teachers to fit (the others keep ``tau = 1``); default all
    """
    x, y = _flatten(logits, labels, mask)
    if x.ndim != 3 or x.shape[1] != len(names):
        raise InputError(f"teacher logits must be [M, K={len(names)}, C] on the split, got {tuple(x.shape)}")
    fit = calibrated if calibrated is not None else [True] * len(names)
    taus = [fit_temperature(x[:, k], y) if fit[k] else 1.0 for k in range(len(names))]
    stats: dict[str, dict[str, float]] = {}
    for k, n in enumerate(names):
        if not fit[k]:
            continue  # no logits on the split: nothing to score
        st: dict[str, float] = {}
        for label, t in (("tau1", 1.0), *((f"tau{e:g}", e) for e in extra_taus), ("", taus[k])):
            nll, ece = nll_ece(torch.softmax(x[:, k] / t, -1), y)
            st["nll" + (f"_{label}" if label else "")], st["ece" + (f"_{label}" if label else "")] = nll, ece
        stats[n] = st
    tk = torch.tensor(taus, dtype=torch.float64).view(1, -1, 1)
    cal = x / tk
    if not all(fit):  # the ensemble needs every teacher's logits on the split
        return TeacherCalibration(list(names), taus, 1.0, stats, list(fit))
    r = fit_ensemble_temperature(cal, y)
    ens: dict[str, float] = {}
    for label, z, t in (("tau1", x, 1.0), *((f"tau{e:g}", x, e) for e in extra_taus), ("", cal, r)):
        nll, ece = nll_ece(torch.softmax(z / t, -1).mean(1), y)
        ens["nll" + (f"_{label}" if label else "")], ens["ece" + (f"_{label}" if label else "")] = nll, ece
    stats["ensemble"] = ens
    return TeacherCalibration(list(names), taus, r, stats, list(fit))


@torch.no_grad()
def split_logits(modules: list[nn.Module], split: Split, device: torch.device | str = "cpu",
                 batch_size: int = 512) -> tuple[Tensor, Tensor]:
    """The teachers' logits on a split, ``([M, K, C], [M])``: one row per example, or per real token of a
    sequence split (teacher forcing; padding tokens dropped)."""
    outs = []
    for m in modules:
        m.eval().to(device)
        outs.append(torch.cat([m(split.x[i : i + batch_size].to(device)).float().cpu()
                               for i in range(0, len(split.x), batch_size)]))
    lg = torch.stack(outs, dim=-2)  # [N, K, C] or [B, T, K, C]
    y = split.y
    if lg.ndim == 4:
        keep = y != PAD
        return lg[keep], y[keep]
    return lg, y


def calibration_record(cal: TeacherCalibration) -> dict[str, float]:
    """Flat scalars of a fit for the run's metrics, TensorBoard and HPARAMS (teachers by index, as every
    teacher tag): ``teachers/tau_teacher{k}``, ``teachers/meta_nll_tau1_teacher{k}``, ``teachers/meta_ece_teacher{k}``
    (at ``tau_k``) ..., and the ensemble's ``teachers/ensemble_tau``, ``teachers/meta_nll_tau1_ensemble`` ..."""
    out: dict[str, float] = {}
    for k, (n, t) in enumerate(zip(cal.names, cal.taus)):
        out[f"teachers/tau_teacher{k}"] = t
        for key, v in cal.stats.get(n, {}).items():
            out[f"teachers/meta_{key}_teacher{k}"] = v
    out["teachers/ensemble_tau"] = cal.ensemble_tau
    for key, v in cal.stats.get("ensemble", {}).items():
        out[f"teachers/meta_{key}_ensemble"] = v
    return out
