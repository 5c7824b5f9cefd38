"""Confidence intervals for comparisons of runs: paired over seeds, Student's t.

A comparison of A with B pairs seed k of A with seed k of B (same data order, same initial weights where the
configs allow), so the seed-to-seed variation they share cancels. The 95% interval of the mean difference is
mean(d) ± t(0.975, n-1) · sd(d) / sqrt(n) over the n pairs; a difference is claimed only when that interval
excludes zero. Ratios (throughput) are compared as differences of logarithms and shown as factors.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Student's t, two-sided 95% (the 0.975 quantile), by degrees of freedom 1-30 (standard tables)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_Z975 = 1.959964


def t975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` degrees of freedom (tables to 30, then the Cornish-Fisher
    expansion around the normal quantile, within 1e-3 of the exact value there)."""
    if df < 1:
        raise ValueError(f"need at least 1 degree of freedom (got {df})")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    return z + (z ** 3 + z) / (4 * df) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * df ** 2)


def mean_sd(xs: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (n - 1; 0 for a single value)."""
    mean = sum(xs) / len(xs)
    return mean, math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0


@dataclass(frozen=True)
class Interval:
    """A mean with its 95% confidence interval [low, high] over n values."""
    mean: float
    low: float
    high: float
    n: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def mean_interval(xs: list[float]) -> Interval | None:
    """The 95% t interval of the mean of `xs`; None for fewer than two values (no spread to estimate)."""
    if len(xs) < 2:
        return None
    mean, sd = mean_sd(xs)
    half = t975(len(xs) - 1) * sd / math.sqrt(len(xs))
    return Interval(mean, mean - half, mean + half, len(xs))


def paired_difference(a: list[float], b: list[float]) -> Interval | None:
    """Interval of mean(a_k - b_k) over pairs k (a and b in the same seed order)."""
    if len(a) != len(b):
        raise ValueError(f"paired values need the same count (got {len(a)} and {len(b)})")
    return mean_interval([x - y for x, y in zip(a, b)])


def paired_ratio(a: list[float], b: list[float]) -> Interval | None:
    """Interval of the geometric-mean ratio a_k / b_k over pairs k, as factors (1.0 = no change)."""
    if any(x <= 0 for x in a + b):
        raise ValueError("ratios need positive values")
    logs = paired_difference([math.log(x) for x in a], [math.log(y) for y in b])
    if logs is None:
        return None
    return Interval(math.exp(logs.mean), math.exp(logs.low), math.exp(logs.high), logs.n)


def loss_noise(losses: list[float], window: int = 9) -> float | None:
    """How erratic a loss curve is: the standard deviation of log(loss) around its centred moving average
    (`window` logged values), over the second half of the curve (the first half is dominated by the descent).
    0 for a smooth curve; 0.1 means the logged loss strays ~10% from its local trend. None if too short."""
    logs = [math.log(x) for x in losses if x > 0]
    half = window // 2
    tail = list(range(max(half, len(logs) // 2), len(logs) - half))
    if len(tail) < 2:
        return None
    residuals = [logs[i] - sum(logs[i - half:i + half + 1]) / window for i in tail]
    return mean_sd(residuals)[1]
