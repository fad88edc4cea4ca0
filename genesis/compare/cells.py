"""The report's table cells: a mean over seeds with its t-interval, a bootstrap difference with its interval and
level, the seed-paired view."""

from __future__ import annotations

import math

from .stats import BootstrapResult, mean_ci


def fmt_ci(m: float, lo: float, hi: float, scale: float = 100.0, digits: int = 1, bounds=None) -> str:
    if bounds is not None:  # an accuracy's t-interval can leave [0, 1] with few seeds; the truth cannot
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    if lo == hi == m:
        return f"{scale * m:.{digits}f}"
    return f"{scale * m:.{digits}f} [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"


def breakdown_cell(results: list[dict], dim: str, group: str, scorer: str = "model_verse") -> str:
    """One cell of the class/position table: the group's cloze accuracy, mean over the seeds' eval.json results
    with its 95% t-interval (clipped to [0, 100]); "n/a" where a seed has no item in the group."""
    return accuracy_cell([r["cloze"]["scorers"][scorer]["breakdowns"][dim].get(group, {}).get("accuracy",
                                                                                             float("nan"))
                           for r in results])


def accuracy_cell(values: list[float]) -> str:
    """An accuracy's mean over seeds with its 95% t-interval, clipped to [0, 100]; "n/a" where a seed has none."""
    if any(math.isnan(v) for v in values):
        return "n/a"
    return fmt_ci(*mean_ci(values), bounds=(0.0, 1.0))


def pct_interval(ci: tuple[float, float], signed: bool = True) -> str:
    if any(math.isnan(v) for v in ci):
        return "n/a"
    sign = "+" if signed else ""
    return f"[{100 * ci[0]:{sign}.1f}%, {100 * ci[1]:{sign}.1f}%]"



def level_cell(alpha: float) -> str:
    return f"{100 * (1 - alpha):.4g}%"


def diff_cell(res: BootstrapResult, scale: float = 100, digits: int = 1) -> str:
    low, high = res.diff_ci
    return f"{scale * res.diff:+.{digits}f} [{scale * low:+.{digits}f}, {scale * high:+.{digits}f}]"


def seed_cell(res: BootstrapResult, scale: float = 100, digits: int = 1) -> str:
    """The seed-paired view: the mean of the per-seed differences, its 95% t-interval, the seeds above 0."""
    m, lo, hi = res.seed_diff
    interval = f" [{scale * lo:+.{digits}f}, {scale * hi:+.{digits}f}]" if res.seeds > 1 else ""
    return f"{scale * m:+.{digits}f}{interval}, {res.seeds_positive}/{res.seeds} > 0"


def p_cell(res: BootstrapResult) -> str:
    return f"{res.p:.3g} / {res.p_holm:.3g}"



def seed_paired(values: list[float], against: list[float], digits: int = 3) -> str:
    """Per-seed differences (the same seed: the same initialisation and batches): mean [95% t], seeds above 0."""
    diffs = [a - b for a, b in zip(values, against)]
    if any(math.isnan(d) for d in diffs):
        return "n/a"
    return f"{fmt_ci(*mean_ci(diffs), scale=1, digits=digits)}, {sum(d > 0 for d in diffs)}/{len(diffs)} > 0"


def paired_cells(res: BootstrapResult, scale: float = 100, digits: int = 1) -> str:
    """A paired test's four cells: Δ [CI], the CI's level, p / Holm p, the seed-paired Δ."""
    cells = (diff_cell(res, scale, digits), level_cell(res.alpha), p_cell(res), seed_cell(res, scale, digits))
    return " | ".join(cells)
