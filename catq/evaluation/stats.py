"""Interval math for `catq eval`: every accuracy comes with a 95% interval and its n.

- A rate of yes/no outcomes (one per prompt: reference correct, answer present) gets the Wilson
  score interval: unlike the normal approximation it stays inside [0, 1] and is sensible at
  0/n and n/n, which small eval sets hit often.
- A mean of per-prompt fractions (single-sample accuracy = each prompt's share of correct
  rollouts; pass@g) gets a percentile bootstrap over prompts: the rollouts of one prompt are
  correlated, so prompts, not rollouts, are the unit that is resampled.
- A difference between two policy versions on the same prompts gets a paired bootstrap.

The bootstrap is seeded, so the same results give the same intervals.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

Z95 = 1.959963984540054
BOOTSTRAP_RESAMPLES = 2000


def interval(value: float, low: float, high: float, n: int) -> dict:
    """The one shape an interval has in results.json, tables and plots."""
    return {"value": value, "low": low, "high": high, "n": n}


def wilson(successes: int, n: int, z: float = Z95) -> dict:
    """Wilson score interval of successes/n; n = 0 gives nan with an empty interval."""
    if n == 0:
        return interval(math.nan, math.nan, math.nan, 0)
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends: no rounding residue
    high = 1.0 if successes == n else min(1.0, centre + half)
    return interval(p, low, high, n)


def bootstrap_mean(values: Sequence[float], seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """Mean of per-prompt values with a 95% percentile bootstrap over prompts."""
    n = len(values)
    if n == 0:
        return interval(math.nan, math.nan, math.nan, 0)
    rng = random.Random(seed)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    return interval(sum(values) / n, _percentile(means, 0.025), _percentile(means, 0.975), n)


def mean_interval(values: Sequence[float], seed: int = 0) -> dict:
    """Wilson when every value is 0 or 1 (a rate), else the bootstrap (a mean of fractions)."""
    if all(v in (0, 1) for v in values):
        return wilson(int(sum(values)), len(values))
    return bootstrap_mean(values, seed)


def paired_difference(after: Sequence[float], before: Sequence[float], seed: int = 0,
                      resamples: int = BOOTSTRAP_RESAMPLES) -> dict:
    """mean(after - before) over the same prompts, with a paired percentile bootstrap."""
    if len(after) != len(before):
        raise ValueError("a paired difference needs the same prompts on both sides")
    return bootstrap_mean([a - b for a, b in zip(after, before)], seed, resamples)


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Unbiased pass@k from n samples of which ``correct`` are right (Chen et al., 2021):
    the chance that k of the n, drawn without replacement, include a right one."""
    if k > n:
        raise ValueError(f"pass@{k} needs at least {k} samples, got {n}")
    if n - correct < k:
        return 1.0
    return 1.0 - math.comb(n - correct, k) / math.comb(n, k)


def _percentile(sorted_values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    pos = q * (len(sorted_values) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)
