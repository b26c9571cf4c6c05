"""Statistics over seeds: mean ± std and paired differences with 95% intervals.

Cells of one seed share the data draw and the teachers, so two gates are compared *paired*: the
difference per seed, then its mean and a Student-t interval over seeds (or a percentile bootstrap of
the mean difference). With ``n`` seeds the t-interval is ``d̄ ± t_{0.975, n-1} · s_d / √n``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np
from scipy import stats as sps  # scikit-learn's own dependency

from metagate.errors import ConfigError


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (``ddof=1``; 0 for one value), NaN values skipped."""
    v = np.asarray([x for x in values if not math.isnan(x)], dtype=np.float64)
    if v.size == 0:
        return float("nan"), float("nan")
    return float(v.mean()), float(v.std(ddof=1)) if v.size > 1 else 0.0


@dataclass
class Interval:
    """A paired difference ``a - b`` over ``n`` seeds: mean, interval ``[lo, hi]`` at ``level``."""

    mean: float
    lo: float
    hi: float
    n: int
    level: float = 0.95
    method: str = "t"

    def as_dict(self) -> dict[str, float | int | str]:
        return asdict(self)


def t_quantile(q: float, df: int) -> float:
    """The ``q`` quantile of Student's t with ``df`` degrees of freedom."""
    return float(sps.t.ppf(q, df))


def paired_t(a: Sequence[float], b: Sequence[float], level: float = 0.95) -> Interval:
    """Mean of ``a_i - b_i`` with its Student-t interval (NaN bounds for a single pair)."""
    d = _diffs(a, b)
    n = d.size
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0, level, "t")
    m = float(d.mean())
    if n < 2:
        return Interval(m, float("nan"), float("nan"), n, level, "t")
    half = t_quantile(0.5 + level / 2, n - 1) * float(d.std(ddof=1)) / math.sqrt(n)
    return Interval(m, m - half, m + half, n, level, "t")


def paired_bootstrap(a: Sequence[float], b: Sequence[float], level: float = 0.95, samples: int = 10_000,
                     seed: int = 0) -> Interval:
    """Mean of ``a_i - b_i`` with a percentile-bootstrap interval: seeds resampled with replacement
    ``samples`` times (a seeded generator: the same numbers every time)."""
    if samples < 1:
        raise ConfigError(f"--bootstrap-samples must be >= 1, got {samples}")
    d = _diffs(a, b)
    n = d.size
    if n == 0:
        return Interval(float("nan"), float("nan"), float("nan"), 0, level, "bootstrap")
    idx = np.random.default_rng(seed).integers(0, n, size=(samples, n))
    means = d[idx].mean(1)
    lo, hi = np.quantile(means, [0.5 - level / 2, 0.5 + level / 2])
    return Interval(float(d.mean()), float(lo), float(hi), n, level, "bootstrap")


def _diffs(a: Sequence[float], b: Sequence[float]) -> np.ndarray:
    if len(a) != len(b):
        raise ValueError(f"paired samples differ in length: {len(a)} vs {len(b)}")
    d = np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64)
    return d[~np.isnan(d)]


def paired(a: Sequence[float], b: Sequence[float], method: str = "t", level: float = 0.95,
           samples: int = 10_000) -> Interval:
    """:func:`paired_t` or :func:`paired_bootstrap`."""
    if method == "t":
        return paired_t(a, b, level)
    if method == "bootstrap":
        return paired_bootstrap(a, b, level, samples)
    raise ConfigError(f"--interval must be t or bootstrap, got {method!r}")
