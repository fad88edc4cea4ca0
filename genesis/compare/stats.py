"""The comparison's statistics: t-intervals over seeds, the paired bootstrap clustered by held-out chapter, Holm's
correction over the strategies compared, and the decision read from the corrected interval."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

PROCEED_AT = 0.05  # the design notes' threshold: > 5% relative improvement over the unmasked baseline


# Two-sided 95% Student t quantiles by degrees of freedom (no scipy dependency); 1.96 beyond 30.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}


def t_quantile(df: int) -> float:
    if df > 30:
        return 1.96
    return T_975[max(k for k in T_975 if k <= df)]  # conservative between table entries


def mean_ci(values: list[float]) -> tuple[float, float, float]:
    """(mean, low, high): a 95% t-interval over replicates; low = high = mean for a single value."""
    x = np.asarray(values, dtype=np.float64)
    m = float(x.mean())
    if len(x) < 2:
        return m, m, m
    half = t_quantile(len(x) - 1) * float(x.std(ddof=1)) / math.sqrt(len(x))
    return m, m - half, m + half


ALPHA = 0.05  # every interval is 95%, or its Holm level (holm_alphas)


def resample_counts(units: Sequence[str], samples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(counts, unit): counts (samples, distinct units) says how often each unit is drawn when a resample draws the
    distinct units (held-out chapters) with replacement, as many as there are, and takes all their items; unit
    (items,) is each item's column in counts."""
    names, unit = np.unique(np.asarray(units, dtype=str), return_inverse=True)
    n = len(names)
    drawn = rng.integers(0, n, size=(samples, n))
    counts = np.bincount((np.arange(samples)[:, None] * n + drawn).ravel(), minlength=samples * n)
    return counts.reshape(samples, n).astype(np.float64), unit


def _unit_sums(values: np.ndarray, unit: np.ndarray, n: int) -> np.ndarray:
    """(rows, units): each row's values summed per unit."""
    return np.stack([np.bincount(unit, weights=row, minlength=n) for row in np.atleast_2d(values)])


@dataclass
class PairedDraws:
    """One arm against the baseline on the same items: the bootstrap distributions of both arms' means, from the
    same resamples (paired)."""
    strategy: np.ndarray  # (seeds, items), rows paired by seed, columns by item
    baseline: np.ndarray
    units: int  # the distinct resampling units (chapters)
    means: tuple[np.ndarray, np.ndarray]  # (samples,) each: items averaged over seeds, units resampled
    seed_means: tuple[np.ndarray, np.ndarray]  # (samples,) each: seeds and units resampled

    def margin(self, threshold: float) -> np.ndarray:
        xs, bs = self.means
        return xs - (1 + threshold) * bs


def paired_draws(strategy: np.ndarray, baseline: np.ndarray, units: Sequence[str], samples: int = 2000,
                 seed: int = 0) -> PairedDraws:
    """strategy, baseline: (seeds, items) values (credits, log p), columns paired by item, rows paired by seed;
    units: each item's resampling unit (its chapter). Every resample draws units with replacement and takes all
    their items, the same draw for both arms; a resample's mean is over the items it took."""
    if strategy.shape != baseline.shape:
        raise ValueError(f"unpaired values: {strategy.shape} vs {baseline.shape}")
    if strategy.shape[1] != len(units) or not len(units):
        raise ValueError(f"{strategy.shape[1]} items but {len(units)} units")
    rng = np.random.Generator(np.random.PCG64(seed))
    n_seeds = strategy.shape[0]
    counts, unit = resample_counts(units, samples, rng)
    n = counts.shape[1]
    sizes = counts @ np.bincount(unit, minlength=n)  # (samples,) items taken
    means = tuple(counts @ _unit_sums(arm.mean(axis=0), unit, n)[0] / sizes for arm in (strategy, baseline))
    seed_rows = rng.integers(0, n_seeds, size=(samples, n_seeds))
    counts, _ = resample_counts(units, samples, rng)  # chapters drawn anew, the same for every resampled seed
    sizes = (counts @ np.bincount(unit, minlength=n))[:, None]
    seed_means = tuple(np.take_along_axis(counts @ _unit_sums(arm, unit, n).T / sizes, seed_rows, axis=1).mean(axis=1)
                       for arm in (strategy, baseline))
    return PairedDraws(strategy, baseline, n, means, seed_means)


def percentile_interval(values: np.ndarray, alpha: float = ALPHA) -> tuple[float, float]:
    if not np.isfinite(values).all():
        return float("nan"), float("nan")
    return float(np.percentile(values, 50 * alpha)), float(np.percentile(values, 100 - 50 * alpha))


def bootstrap_p(values: np.ndarray) -> float:
    """The two-sided bootstrap p-value of "the statistic is 0": twice the smaller share of resamples on either side
    of 0 (ties count on both), with the +1 that keeps it above 0."""
    below, above = int((values <= 0).sum()), int((values >= 0).sum())
    return min(1.0, 2 * (min(below, above) + 1) / (len(values) + 1))


def holm_adjust(p: dict[str, float]) -> dict[str, float]:
    """Holm's adjusted p-values: the k-th smallest of m is max over j <= k of min(1, (m - j + 1) p_(j))."""
    order = sorted(p, key=lambda name: p[name])  # stable: ties keep the strategies' order
    adjusted, running = {}, 0.0
    for rank, name in enumerate(order):
        running = max(running, min(1.0, (len(p) - rank) * p[name]))
        adjusted[name] = running
    return adjusted


def holm_alphas(p: dict[str, float], alpha: float = ALPHA) -> dict[str, float]:
    """The error level of each test's interval under Holm's step-down: the k-th smallest p-value (rank k of m) gets
    alpha / (m - k + 1) while Holm rejects ranks 1..k; from the first rank it does not reject, every later rank gets
    that rank's level too (so no interval clears 0 where Holm stopped)."""
    order = sorted(p, key=lambda name: p[name])
    levels, stopped = {}, None
    for rank, name in enumerate(order):
        level = alpha / (len(p) - rank) if stopped is None else stopped
        if stopped is None and p[name] > level:
            stopped = level
        levels[name] = level
    return levels


@dataclass
class BootstrapResult:
    diff: float  # strategy - baseline (a fraction for accuracies)
    diff_ci: tuple[float, float]
    relative: float  # strategy / baseline - 1
    relative_ci: tuple[float, float]
    seeds_relative_ci: tuple[float, float]  # seeds and chapters resampled
    decision: str
    p: float = float("nan")  # the bootstrap p-value of the decision's test (margin = 0)
    p_holm: float = float("nan")  # Holm-adjusted over the strategies compared
    alpha: float = ALPHA  # the intervals' error level (Holm's for the strategy's rank)
    seed_diff: tuple[float, float, float] = (float("nan"),) * 3  # per-seed differences: mean and 95% t-interval
    seeds_positive: int = 0  # seeds whose difference is above 0
    seeds: int = 0
    units: int = 0  # chapters resampled


def bootstrap_result(draws: PairedDraws, threshold: float, alpha: float = ALPHA) -> BootstrapResult:
    """The intervals at error level `alpha` and the decision: the interval of the margin `strategy - (1 + threshold)
    x baseline` above 0 -> proceed, at or below 0 -> do not proceed, else inconclusive. For a baseline above 0 that is
    the relative improvement's interval against +threshold; for a baseline at 0 it still answers."""
    xs, bs = draws.means
    x, b = float(draws.strategy.mean()), float(draws.baseline.mean())
    with np.errstate(divide="ignore", invalid="ignore"):
        relative = x / b - 1 if b > 0 else float("nan")
        rel_ci = percentile_interval(xs / bs - 1, alpha)
        seeds_rel_ci = percentile_interval(draws.seed_means[0] / draws.seed_means[1] - 1, alpha)
    low, high = percentile_interval(draws.margin(threshold), alpha)
    decision = "proceed" if low > 0 else "do not proceed" if high <= 0 else "inconclusive"
    per_seed = draws.strategy.mean(axis=1) - draws.baseline.mean(axis=1)
    p = bootstrap_p(draws.margin(threshold))
    return BootstrapResult(x - b, percentile_interval(xs - bs, alpha), relative, rel_ci, seeds_rel_ci, decision,
                           p, p, alpha, mean_ci(list(per_seed)), int((per_seed > 0).sum()), len(per_seed),
                           draws.units)


def paired_bootstrap(strategy: np.ndarray, baseline: np.ndarray, units: Sequence[str], samples: int = 2000,
                     seed: int = 0, threshold: float = PROCEED_AT, alpha: float = ALPHA) -> BootstrapResult:
    """One strategy against the baseline, alone (no correction): `paired_draws` then `bootstrap_result`."""
    return bootstrap_result(paired_draws(strategy, baseline, units, samples, seed), threshold, alpha)


def holm_tests(arms: dict[str, np.ndarray], baseline: np.ndarray | dict[str, np.ndarray], units: Sequence[str],
               samples: int = 2000, threshold: float = PROCEED_AT, alpha: float = ALPHA) -> dict[str, BootstrapResult]:
    """Every strategy against the baseline on the same resamples, Holm-corrected over the m = len(arms) tests: each
    test's p-value (margin = 0) is adjusted, and its intervals and decision are read at its rank's Holm level
    (`holm_alphas`). threshold 0 tests the difference itself. `baseline` is one array for every arm, or each arm's
    own (by the arms' names: a run's link head against the same run's cloze)."""
    draws = {name: paired_draws(arm, baseline[name] if isinstance(baseline, dict) else baseline, units, samples)
             for name, arm in arms.items()}
    p = {name: bootstrap_p(d.margin(threshold)) for name, d in draws.items()}
    adjusted, levels = holm_adjust(p), holm_alphas(p, alpha)
    results = {}
    for name, d in draws.items():
        results[name] = bootstrap_result(d, threshold, levels[name])
        results[name].p_holm = adjusted[name]
    return results
