"""The statistics the reports state beside their numbers: rank correlation with a permutation p-value
and an approximate 95 % interval, and differences of means with an interval and a permutation p-value.

Studies here have few seeds (n = 3 per cell is typical), so the tests are exact where they can be:
a permutation test enumerates every relabelling when there are at most EXACT_LIMIT of them, and
draws ROUNDS at random (seeded, so a report is reproducible) otherwise. With n = 3 against 3 there
are 20 relabellings: no difference can reach p < 0.1, and the reports say so rather than hide it.
"""

from __future__ import annotations

import itertools
import math
import random
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

EXACT_LIMIT = 50_000
ROUNDS = 20_000
Z975 = statistics.NormalDist().inv_cdf(0.975)


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their mean rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    result = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for k in range(start, end + 1):
            result[order[k]] = (start + end) / 2 + 1
        start = end + 1
    return result


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation (ties get their mean rank); nan below 3 pairs or without spread."""
    if len(xs) < 3:
        return math.nan
    rx, ry = ranks(xs), ranks(ys)
    if len(set(rx)) < 2 or len(set(ry)) < 2:
        return math.nan
    return statistics.correlation(rx, ry)


def correlation_p(xs: Sequence[float], ys: Sequence[float], seed: int = 0) -> float:
    """Two-sided permutation p-value of Spearman's ρ: the share of orderings of `ys` whose |ρ| is at
    least the observed one (every ordering for n <= 8, else ROUNDS random ones)."""
    observed = spearman(xs, ys)
    if math.isnan(observed):
        return math.nan
    target = abs(observed) - 1e-12
    ys = list(ys)
    if math.factorial(len(ys)) <= EXACT_LIMIT:
        orders = list(itertools.permutations(ys))
        return sum(abs(spearman(xs, o)) >= target for o in orders) / len(orders)
    rng = random.Random(seed)
    hits = 0
    for _ in range(ROUNDS):
        rng.shuffle(ys)
        hits += abs(spearman(xs, ys)) >= target
    return (hits + 1) / (ROUNDS + 1)


def correlation_interval(rho: float, n: int) -> tuple[float, float]:
    """Approximate 95 % interval of Spearman's ρ from n pairs: Fisher's z = atanh(ρ) with the
    standard error sqrt((1 + ρ²/2) / (n - 3)) of Bonett and Wright (2000, Psychometrika 65:23-28);
    (nan, nan) below 4 pairs or at |ρ| = 1. It says which correlations the data leave open, where
    the p-value says only whether 0 is among them."""
    if n < 4 or math.isnan(rho) or abs(rho) >= 1.0:
        return math.nan, math.nan
    z, se = math.atanh(rho), math.sqrt((1 + rho * rho / 2) / (n - 3))
    return math.tanh(z - Z975 * se), math.tanh(z + Z975 * se)


@dataclass(frozen=True)
class Difference:
    """mean(a) - mean(b), Welch's 95 % interval for it, and a two-sided permutation p-value."""

    estimate: float
    low: float
    high: float
    p: float
    n_a: int
    n_b: int

    def describe(self, digits: int = 2) -> str:
        interval = "" if math.isnan(self.low) else f", 95 % interval [{self.low:.{digits}f}, {self.high:.{digits}f}]"
        return f"{self.estimate:+.{digits}f}{interval}, permutation p = {self.p:.3g} (n = {self.n_a} and {self.n_b})"


def difference(a: Sequence[float], b: Sequence[float], seed: int = 0) -> Difference:
    """The difference of the means of `a` and `b` with Welch's t interval (nan with fewer than two
    values on a side) and the permutation p-value of |mean(a) - mean(b)| over every split of the
    pooled values into groups of their sizes (random splits beyond EXACT_LIMIT)."""
    a, b = list(a), list(b)
    estimate = statistics.fmean(a) - statistics.fmean(b)
    low = high = math.nan
    if len(a) > 1 and len(b) > 1:
        va, vb = statistics.variance(a) / len(a), statistics.variance(b) / len(b)
        se = math.sqrt(va + vb)
        if se > 0:
            df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
            half = _t_quantile(0.975, df) * se
            low, high = estimate - half, estimate + half
        else:
            low = high = estimate
    pooled = a + b
    target = abs(estimate) - 1e-12
    size = math.comb(len(pooled), len(a))

    def gap(chosen: Sequence[int]) -> float:
        inside = set(chosen)
        first = [pooled[i] for i in chosen]
        second = [pooled[i] for i in range(len(pooled)) if i not in inside]
        return abs(statistics.fmean(first) - statistics.fmean(second))

    if size <= EXACT_LIMIT:
        splits = list(itertools.combinations(range(len(pooled)), len(a)))
        p = sum(gap(s) >= target for s in splits) / len(splits)
    else:
        rng = random.Random(seed)
        hits = sum(gap(rng.sample(range(len(pooled)), len(a))) >= target for _ in range(ROUNDS))
        p = (hits + 1) / (ROUNDS + 1)
    return Difference(estimate, low, high, p, len(a), len(b))


def _t_quantile(probability: float, df: float) -> float:
    from scipy.stats import t

    return float(t.ppf(probability, df))
