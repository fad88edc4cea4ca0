"""Compare masking strategies: train each over several seeds, evaluate every run, write a Markdown report.

    python -m genesis.compare                        # the CPU defaults (see DEFAULTS)
    python -m genesis.compare --strategies none,structural --seeds 1,2,3 --steps 0 --max-items 0   # full runs
    python -m genesis.compare --config high_vram.toml --steps 0 --out runs/compare-gpu
    python -m genesis.compare --config research_cpu.toml --steps 0 --max-items 0 --jobs 2   # informative, hours

Every run lives in OUT/runs/<strategy>-seed<seed>/: a normal `genesis.train` run directory (trained by a
`python -m genesis.train` process from compare.toml, its resolved config; up to --jobs at once, output in train.log)
plus run.json (its settings), train.done (written when training finished) and eval.json
(`genesis.evaluate`'s result, written atomically when the evaluation finished, with the step and a hash of the
weights it measured). Rerunning the same command skips what is done (an eval.json counts as done only while it
matches the evaluation settings and the checkpoint now in the run directory) and resumes a run whose training was
interrupted from its checkpoint; a run directory holding other settings is an error, never silently reused. The
report goes to OUT/report.md (or --report).

Statistics, per metric: the mean over seeds with a 95% t-interval (seeds are the replicates), on each item set:
`conjunctive` (the items eval.json tags as connectives in their discourse sense) and `all`; eval.json files without
the tag give `all` only, and the report says so. Against the baseline strategy (no masking), a paired bootstrap
clustered by held-out chapter (an item's chapter comes from its id, "1 Samuel 3:4@10" -> "1 Samuel 3"): each item's
value is averaged over seeds, a resample draws the chapters with replacement and takes all their items, the same draw
for both arms; the percentiles give the intervals of the difference and of the relative improvement. Holm's
correction runs over the m strategies compared (per metric and item set): each strategy's bootstrap p-value is
Holm-adjusted, and its intervals are read at the level of its rank, 1 - 0.05 / (m - k + 1) for the k-th smallest
p-value while Holm rejects, and from the first rank it does not reject on, that rank's level for every later one.
Beside every bootstrap interval, the seed-paired view: the t-interval of the per-seed differences (the same seed
means the same initialisation and batches) and how many are above 0. The design notes' rule "> 5% improvement over
the unmasked baseline -> proceed" is read as a relative improvement, on the cloze (whole-verse score) of the
conjunctive set (of all items when untagged): proceed when the corrected interval of `accuracy - 1.05 x baseline
accuracy` lies above 0, do not proceed when it lies at or below 0, inconclusive when it straddles 0. The same test of
the difference (threshold 0) is made on next-token log p and accuracy at the connectives. A seeds+chapters interval
(seeds resampled too) is shown, not used for the decision. The report also gives each strategy's masked-context gap
against `none` and against the `random` control (seed-paired), and the realised masking rates from each run's
metrics.jsonl.

The comparison is informative only where the unmasked baseline beats the Kneser-Ney trigram's whole-verse cloze
accuracy on the same items (the paired-bootstrap interval of baseline - trigram lies above 0); otherwise every
decision reads "not informative at this scale".

Adding a strategy is one line in STRATEGIES: a name and the --set overrides that define it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from contextlib import suppress
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np
import torch

from genesis.config import ConfigError, load_config, to_dict, to_toml
from genesis.corpus import CorpusError
from genesis.device import flushed_denormals
from genesis.distributed import Interrupted, handle_interrupts, refuse_several_processes
from genesis.evaluate import (
    DEFAULT_CONTEXT_K,
    EvalContext,
    EvalError,
    checkpoint_identity,
    evaluate_checkpoint,
    resolve_device,
    write_json,
)
from genesis.masking import connectives_of
from genesis.runs import CHECKPOINT, RunError, flat_settings, read_checkpoint
from genesis.tokenizer import TokenizerError

# name -> the overrides that define it. The first entry is the baseline every other strategy is tested against.
STRATEGIES: dict[str, tuple[str, ...]] = {
    "none": ("masking.enabled=false",),
    "uniform": ("masking.enabled=true", "masking.strategy=uniform"),
    "weighted": ("masking.enabled=true", "masking.strategy=weighted"),
    "structural": ("masking.enabled=true", "masking.strategy=structural"),
    # the design notes' multi-task strategy: structural masking plus the connective-type head at masked positions
    "structural_head": ("masking.enabled=true", "masking.strategy=structural", "model.class_head=true"),
    "chain": ("masking.enabled=true", "masking.strategy=structural", "masking.chain=true"),
    "adaptive": ("masking.enabled=true", "masking.strategy=weighted", "masking.adaptive=true"),
    "random": ("masking.enabled=true", "masking.strategy=random", "masking.control_reference=structural"),
}
BASELINE = next(iter(STRATEGIES))
PROCEED_AT = 0.05  # the design notes' threshold: > 5% relative improvement over the unmasked baseline

# CPU defaults, sized for a 2-core machine (denormals flushed, see main): 8 strategies x 3 seeds of 120 cpu.toml
# steps, each evaluated at every held-out slot and on 300 cloze items, each with up to 3 preceding verses of its
# chapter (so "Therefore" follows what it concludes). Held-out loss is evaluated once, at the end
# (training.eval_every=0). More steps, seeds or items: pass them, and expect proportionally longer.
DEFAULTS = {"config": "cpu.toml", "strategies": ",".join(STRATEGIES), "seeds": "1,2,3", "steps": 120,
            "max_items": 300, "context_verses": 3, "bootstrap": 2000}
RUN_OVERRIDES = ("training.eval_every=0",)  # applied to every run before the user's --set, so --set can undo them

# Two-sided 95% Student t quantiles by degrees of freedom (no scipy dependency); 1.96 beyond 30.
T_975 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228,
         12: 2.179, 15: 2.131, 20: 2.086, 25: 2.060, 30: 2.042}


class CompareError(Exception):
    """A problem with the comparison's settings or its output directory, phrased as one line."""


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
ITEM_ID = re.compile(r"(?P<chapter>.+ \d+):\d+@\d+")  # "1 Samuel 3:4@10": book chapter:verse @ offset


def chapter_of(item_id: str) -> str:
    """The held-out chapter an item comes from: "Romans 5:1@0" -> "Romans 5" (book names may hold spaces and
    digits)."""
    match = ITEM_ID.fullmatch(item_id)
    if match is None:
        raise CompareError(f"item id {item_id!r}: expected 'Book chapter:verse@offset' (an eval.json of another kind?)")
    return match["chapter"]


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


def holm_tests(arms: dict[str, np.ndarray], baseline: np.ndarray, units: Sequence[str], samples: int = 2000,
               threshold: float = PROCEED_AT, alpha: float = ALPHA) -> dict[str, BootstrapResult]:
    """Every strategy against the baseline on the same resamples, Holm-corrected over the m = len(arms) tests: each
    test's p-value (margin = 0) is adjusted, and its intervals and decision are read at its rank's Holm level
    (`holm_alphas`). threshold 0 tests the difference itself."""
    draws = {name: paired_draws(arm, baseline, units, samples) for name, arm in arms.items()}
    p = {name: bootstrap_p(d.margin(threshold)) for name, d in draws.items()}
    adjusted, levels = holm_adjust(p), holm_alphas(p, alpha)
    results = {}
    for name, d in draws.items():
        results[name] = bootstrap_result(d, threshold, levels[name])
        results[name].p_holm = adjusted[name]
    return results


NOT_INFORMATIVE = "not informative at this scale"


@dataclass
class ScaleCheck:
    """Whether the unmasked baseline beats the Kneser-Ney trigram's whole-verse cloze on the same items: below that,
    the models have not learned enough language for masking's effect on them to mean anything."""
    baseline: float  # cloze accuracy (fraction), averaged over seeds and items
    trigram: float
    diff_ci: tuple[float, float]  # paired bootstrap 95% interval of baseline - trigram
    units: int = 0  # held-out chapters resampled

    @property
    def informative(self) -> bool:
        return self.diff_ci[0] > 0

    def lines(self) -> list[str]:
        verdict = ("**informative**: the interval lies above 0" if self.informative else
                   f"**{NOT_INFORMATIVE}**: the interval does not lie above 0, so the models have not learned enough "
                   f"language for the decision below to say anything about masking; every strategy's decision reads "
                   f"*{NOT_INFORMATIVE}*. Scale up: more training steps (`--steps`; `--config research_cpu.toml` "
                   f"trains cpu.toml's model 2000 steps) and a larger model (`--set model.dim=...`, "
                   f"`model.n_layers`; `--config research_gpu.toml` on a GPU)")
        return ["", f"## Informative? `{BASELINE}` against the Kneser-Ney trigram", "",
                f"`{BASELINE}` (no masking) {100 * self.baseline:.1f}% vs the trigram's {100 * self.trigram:.1f}% "
                f"whole-verse cloze accuracy on the same items: Δ {100 * (self.baseline - self.trigram):+.1f} points "
                f"[{100 * self.diff_ci[0]:+.1f}, {100 * self.diff_ci[1]:+.1f}] (paired bootstrap over {self.units} "
                f"held-out chapters, 95%). "
                f"{verdict}."]


def informative_scale(baseline: np.ndarray, trigram: np.ndarray, units: Sequence[str],
                      samples: int = 2000) -> ScaleCheck:
    """baseline, trigram: (seeds, items) whole-verse cloze credits, paired as for `paired_draws` (the trigram's rows
    are equal: it does not depend on the seed); units: each item's chapter."""
    res = paired_bootstrap(baseline, trigram, units, samples, threshold=0.0)
    return ScaleCheck(float(baseline.mean()), float(trigram.mean()), res.diff_ci, res.units)


# ----------------------------------------------------------------------------------------------------------------
# Runs


@dataclass
class RunSpec:
    strategy: str
    seed: int
    overrides: list[str]
    run_dir: Path

    @property
    def name(self) -> str:
        return f"{self.strategy}-seed{self.seed}"


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def last_heldout_loss(done: dict, run_dir: Path) -> float:
    """From the training summary, else the last eval record of metrics.jsonl (a resumed run that had nothing left
    to train logs no new evaluation)."""
    if "last_heldout_loss" in done["summary"]:
        return done["summary"]["last_heldout_loss"]
    loss = float("nan")
    try:
        for line in (run_dir / "metrics.jsonl").read_text().splitlines():
            record = json.loads(line)
            if record.get("kind") == "eval":
                loss = record["heldout_loss"]
    except (OSError, json.JSONDecodeError, KeyError):
        pass
    return loss


def _fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def plan_runs(args: argparse.Namespace) -> list[RunSpec]:
    strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown:
        raise CompareError(f"--strategies: unknown {', '.join(unknown)} (known: {', '.join(STRATEGIES)})")
    if BASELINE not in strategies:
        strategies.insert(0, BASELINE)  # every comparison is against the unmasked baseline
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise CompareError(f"--seeds: expected comma-separated integers (got {args.seeds!r})") from None
    if not seeds or len(set(seeds)) != len(seeds):
        raise CompareError(f"--seeds: expected distinct integers (got {args.seeds!r})")
    common = [*RUN_OVERRIDES, *args.set]
    if args.steps:
        common.append(f"training.steps={args.steps}")
    runs = []
    for strategy in strategies:
        for seed in seeds:
            overrides = [*common, *STRATEGIES[strategy], f"training.seed={seed}"]
            runs.append(RunSpec(strategy, seed, overrides, Path(args.out) / "runs" / f"{strategy}-seed{seed}"))
    return runs


# What an eval.json holds: 2 = items tagged conjunctive, masked context with the deletion variant. An eval.json of
# another format is evaluated again rather than reported with fields missing.
EVAL_FORMAT = 2


def eval_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_items": args.max_items, "context_verses": args.context_verses, "corpus": args.corpus,
            "context_k": args.context_k, "eval_format": EVAL_FORMAT}


def _same_settings(saved: dict, cfg, source: Path) -> bool:
    """Whether a config dict saved by an earlier invocation describes `cfg`'s run: the same value for every key, a
    key it lacks counting as that key's default (added to Genesis since; the run had the default). A CompareError
    if the saved dict is damaged."""
    ignore = {"training.out_dir"}
    try:
        was = flat_settings(saved, source)
    except RunError as e:
        raise CompareError(f"{e}; remove the run directory or use another --out") from None
    now = flat_settings(to_dict(cfg))
    return {k: v for k, v in was.items() if k not in ignore} == {k: v for k, v in now.items() if k not in ignore}


def check_run_dir(spec: RunSpec, args: argparse.Namespace):
    """The run's Config; the run directory is claimed for these settings (run.json), or must already hold them.

    run.json records the resolved config and its fingerprint. Where the fingerprint differs, the settings are
    compared key by key (keys Genesis added since count as their defaults); a run.json from before configs were
    recorded in it is compared through the config in its run's checkpoint, when there is one."""
    cfg = load_config(args.config, None, spec.overrides)
    fingerprint = _fingerprint(to_toml(cfg))
    info_path = spec.run_dir / "run.json"
    info = _read_json(info_path)
    if info is not None and not isinstance(info, dict):
        raise CompareError(f"{info_path}: not a run record (damaged?); remove the run directory or use another --out")
    if info is not None and info.get("fingerprint") != fingerprint:
        saved, source = info.get("config"), info_path
        if saved is None and (spec.run_dir / CHECKPOINT).is_file():
            source = spec.run_dir / CHECKPOINT
            with suppress(RunError):
                saved = read_checkpoint(source, need=("config",)).get("config")
        if saved is None:
            raise CompareError(f"{spec.run_dir}: holds a run whose settings cannot be read (its run.json records "
                               f"none and its checkpoint is missing or unreadable); use another --out (or remove it)")
        if not _same_settings(saved, cfg, source):
            raise CompareError(f"{spec.run_dir}: holds a run with other settings; use another --out (or remove it)")
        info = None  # the same run, recorded by an older Genesis: record it again, as this one writes it
    if info is None:
        spec.run_dir.mkdir(parents=True, exist_ok=True)
        write_json({"strategy": spec.strategy, "seed": spec.seed, "overrides": spec.overrides,
                    "fingerprint": fingerprint, "config": to_dict(cfg)}, info_path)
    return cfg


RUN_CONFIG = "compare.toml"  # the run's resolved config, as `genesis.train --config` reads it
LOG_TAIL = 15  # lines of a failed run's train.log shown on the terminal


def train_command(spec: RunSpec, resume: bool) -> list[str]:
    """The `genesis.train` command line that trains (or resumes) one run from its config file."""
    return [sys.executable, "-m", "genesis.train", "--config", str(spec.run_dir / RUN_CONFIG),
            "--out", str(spec.run_dir), *(["--resume"] if resume else [])]


def usable_cores() -> int:
    with suppress(AttributeError):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES entries (names it gives, else indices)."""
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return listed
    return [str(i) for i in range(torch.cuda.device_count())]


def run_env(cfg, slot: int, jobs: int) -> dict[str, str]:
    """The environment of the training process in job slot `slot` (0 .. jobs - 1): the same Genesis code as this
    process; on GPUs one visible device, round-robin over the slots (several slots share a device when there are
    more slots than devices); on the CPU, with several jobs, the cores shared out (torch's intra-op threads)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    gpus = visible_gpus() if cfg.training.device in ("auto", "cuda") and torch.cuda.is_available() else []
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    elif jobs > 1:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(max(1, usable_cores() // jobs))
    return env


@dataclass
class Training:
    """One `genesis.train` process of the comparison."""
    spec: RunSpec
    head: str  # "[k/n] name", the run's prefix on the terminal
    slot: int
    resumed: bool
    process: subprocess.Popen
    log: Any  # the open train.log the process writes to
    t0: float


def start_training(spec: RunSpec, cfg, head: str, slot: int, jobs: int) -> Training:
    """Start training one run in its own process (its output appended to the run's train.log), resuming from its
    checkpoint if an earlier invocation was interrupted. The process has its own session: a Ctrl-C reaches this
    process only, which then stops the runs (`stop_training`)."""
    resume = (spec.run_dir / CHECKPOINT).is_file()
    (spec.run_dir / RUN_CONFIG).write_text(to_toml(cfg))
    log = (spec.run_dir / "train.log").open("a")
    process = subprocess.Popen(train_command(spec, resume), stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, env=run_env(cfg, slot, jobs), start_new_session=True)
    return Training(spec, head, slot, resume, process, log, time.time())


def finish_training(job: Training) -> dict:
    """The record written to train.done (the marker that makes later invocations skip the run) once its process
    exited with status 0."""
    job.log.close()
    summary = {"run_dir": str(job.spec.run_dir),
               "steps": read_checkpoint(job.spec.run_dir / CHECKPOINT, need=("step",))["step"]}
    done = {"summary": summary, "train_s": round(time.time() - job.t0, 1), "resumed": job.resumed}
    done["summary"]["last_heldout_loss"] = last_heldout_loss(done, job.spec.run_dir)
    write_json(done, job.spec.run_dir / "train.done")
    return done


def stop_training(jobs: list[Training]) -> None:
    """SIGTERM to every training process still running (each saves its checkpoint), then wait for them."""
    for job in jobs:
        if job.process.poll() is None:
            job.process.send_signal(signal.SIGTERM)
    for job in jobs:
        with suppress(Exception):
            job.process.wait()
        job.log.close()


def log_tail(path: Path, lines: int = LOG_TAIL) -> str:
    try:
        return "\n".join("    " + line for line in path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"    ({path}: {e.strerror or e})"


def reusable_eval(spec: RunSpec, args: argparse.Namespace) -> dict | None:
    """The run's eval.json if it still answers: computed with these evaluation settings from the checkpoint that is
    in the run directory now (`genesis.evaluate.run_identity`: same step, same hash of weights, config and
    tokenizer). A checkpoint changed since (training continued or redone, a file copied in) or an eval.json from
    before identities were recorded means evaluating again; rewriting identical weights does not."""
    old = _read_json(spec.run_dir / "eval.json")
    if old is None or old.get("compare_settings") != eval_settings(args):
        return None
    try:
        identity = checkpoint_identity(spec.run_dir / CHECKPOINT)
    except Exception:  # missing, truncated, foreign: not the one measured; evaluating it reports the error in one line
        return None
    return old if old.get("checkpoint_identity") == identity else None


def evaluate_run(spec: RunSpec, args: argparse.Namespace, ctx: EvalContext | None) -> tuple[dict, EvalContext | None]:
    """Evaluate one trained run and write its eval.json; the context is shared between runs."""
    path = spec.run_dir / "eval.json"
    settings = eval_settings(args)
    t0 = time.time()
    result, ctx = evaluate_checkpoint(spec.run_dir / CHECKPOINT, args.corpus, "heldout", args.max_items,
                                      args.context_verses, args.device, args.batch_tokens, progress=True, ctx=ctx,
                                      context_k=args.context_k)
    result["compare_settings"] = settings
    result["eval_s"] = round(time.time() - t0, 1)
    write_json(result, path)
    return result, ctx


# ----------------------------------------------------------------------------------------------------------------
# The report


ITEM_SETS = ("conjunctive", "all")  # the connective-sense tag's set (eval.json items' "conjunctive") and every item
CONTROL = "random"  # the control arm: masks non-connective words at a strategy's rate (sees the mask token too)
UNIT_BOUNDS = (0.0, 1.0)


@dataclass(frozen=True)
class Metric:
    """A column of the metrics table and a panel of the figure."""
    name: str
    title: str
    kind: str  # "cloze" / "next_token": a mean over that kind's items (of the item set); "run": of the held-out text
    field: str  # the item's value: a cloze scorer's credit, next-token "credit" or "logprob"; or the summary's key
    scale: float
    digits: int
    bounds: tuple[float, float] | None = None  # an accuracy's interval is clipped to what the truth can be
    baselines: str | None = None  # the figure draws the cloze baselines of this scoring ("verse" or "suffix")


# an accuracy below this in every run is reported as "the models never rank it first", and gets no figure panel
NO_TOP1_BELOW = 0.005
METRICS = (
    Metric("next-token acc. %", "next-token accuracy (%)", "next_token", "credit", 100, 2, UNIT_BOUNDS),
    Metric("next-token log p", "next-token mean log p (nats)", "next_token", "logprob", 1, 3),
    Metric("cloze acc. % (verse)", "cloze accuracy, whole verse (%)", "cloze", "model_verse", 100, 1, UNIT_BOUNDS,
           "verse"),
    Metric("cloze acc. % (suffix)", "cloze accuracy, suffix only (%)", "cloze", "model_suffix", 100, 1, UNIT_BOUNDS,
           "suffix"),
    Metric("held-out loss", "held-out loss (end of training)", "run", "last_heldout_loss", 1, 3),
)


class ReportData:
    """What every section of the report and its figures read, gathered once: the strategies and seeds, every run's
    per-item values on the items common to all runs, the item sets, and each metric's per-seed values."""

    def __init__(self, runs: list[RunSpec], trained: dict[str, dict], evaluated: dict[str, dict]):
        self.runs, self.trained, self.evaluated = runs, trained, evaluated
        self.strategies = list(dict.fromkeys(r.strategy for r in runs))
        self.seeds = list(dict.fromkeys(r.seed for r in runs))
        self.first = evaluated[runs[0].name]
        self._by_id = {r.name: {kind: {item["id"]: item for item in evaluated[r.name].get("items", {}).get(kind, [])}
                                for kind in ("cloze", "next_token")} for r in runs}
        self.items = {}  # kind -> the first run's items common to every run, by id (identical when tokenizers are)
        for kind in ("cloze", "next_token"):
            tables = [self._by_id[r.name][kind] for r in runs]
            self.items[kind] = {i: tables[0][i] for i in sorted(set(tables[0]).intersection(*tables[1:]))}
        # tagged only when every item of every run says which sense it is (eval.json files from before the tag lack it)
        self.tagged = bool(self.items["cloze"]) and all(
            isinstance(item.get("conjunctive"), bool) for table in self._by_id.values() for items in table.values()
            for item in items.values())
        self.sets = ITEM_SETS if self.tagged else ("all",)
        self.decision_set = "conjunctive" if self.tagged and self.ids("cloze", "conjunctive") else "all"
        self._matrices: dict[tuple, np.ndarray] = {}

    def ids(self, kind: str, item_set: str) -> list[str]:
        return [i for i, item in self.items[kind].items() if item_set == "all" or item["conjunctive"]]

    def units(self, kind: str, item_set: str) -> list[str]:
        """Each item's resampling unit: its held-out chapter."""
        return [chapter_of(i) for i in self.ids(kind, item_set)]

    def matrix(self, strategy: str, kind: str, field: str, item_set: str) -> np.ndarray:
        """(seeds, items): the field's value per seed and item of the set, rows in seed order, columns in id order."""
        key = (strategy, kind, field, item_set)
        if key not in self._matrices:
            ids = self.ids(kind, item_set)
            rows = [[self._by_id[f"{strategy}-seed{s}"][kind][i]["credit"][field] if kind == "cloze" else
                     self._by_id[f"{strategy}-seed{s}"][kind][i][field] for i in ids] for s in self.seeds]
            self._matrices[key] = np.array(rows, dtype=np.float64).reshape(len(self.seeds), len(ids))
        return self._matrices[key]

    def values(self, metric: Metric, strategy: str, item_set: str) -> list[float]:
        """The metric's value per seed: the mean over the set's items, or the run's own (held-out loss)."""
        if metric.kind == "run":
            return [self.trained[f"{strategy}-seed{s}"]["summary"].get(metric.field, float("nan")) for s in self.seeds]
        m = self.matrix(strategy, metric.kind, metric.field, item_set)
        return list(m.mean(axis=1)) if m.shape[1] else [float("nan")] * len(self.seeds)

    def scorer_accuracy(self, scorer: str, item_set: str) -> float:
        """A model-independent cloze scorer's accuracy (trigram, majority) on the set's items."""
        m = self.matrix(BASELINE, "cloze", scorer, item_set)
        return float(m[0].mean()) if m.shape[1] else float("nan")

    def tests(self, kind: str, field: str, item_set: str, samples: int,
              threshold: float = 0.0) -> dict[str, BootstrapResult]:
        """Every strategy against the baseline on the set's items: chapter-clustered, Holm-corrected (`holm_tests`)."""
        if not self.ids(kind, item_set):
            return {}
        arms = {s: self.matrix(s, kind, field, item_set) for s in self.strategies if s != BASELINE}
        return holm_tests(arms, self.matrix(BASELINE, kind, field, item_set), self.units(kind, item_set), samples,
                          threshold)

    def set_label(self, item_set: str) -> str:
        n = {kind: len(self.ids(kind, item_set)) for kind in ("cloze", "next_token")}
        return (f"{item_set} items ({n['cloze']} cloze items in {len(set(self.units('cloze', item_set)))} chapters, "
                f"{n['next_token']} next-token slots)")


def run_rates(run_dir: Path) -> dict[str, Any] | None:
    """Realised masking over training, from the run's metrics.jsonl train records (every log step): the share of
    connective words masked (sum of masked_connectives / sum of connective_words; nan where the records do not count
    connective_words), masked tokens per 1,000 (the mean masked_fraction), and the adaptive weights as the last adapt
    record of each word left them. None without metrics.jsonl or without masking records."""
    try:
        records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    except (OSError, json.JSONDecodeError):
        return None
    train = [r for r in records if r.get("kind") == "train" and "masked_fraction" in r]
    if not train:
        return None
    masked = sum(r.get("masked_connectives", 0) for r in train)
    counted = [r["connective_words"] for r in train if "connective_words" in r]
    weights: dict[str, float] = {}
    for r in records:
        if r.get("kind") == "adapt":
            weights.update(r.get("weights", {}))
    return {"connective_share": masked / sum(counted) if len(counted) == len(train) and sum(counted) else float("nan"),
            "per_1000": 1000 * float(np.mean([r["masked_fraction"] for r in train])),
            "masked_per_step": masked / len(train), "adapted": weights}


def _fmt_ci(m: float, lo: float, hi: float, scale: float = 100.0, digits: int = 1, bounds=None) -> str:
    if bounds is not None:  # an accuracy's t-interval can leave [0, 1] with few seeds; the truth cannot
        lo, hi = max(lo, bounds[0]), min(hi, bounds[1])
    if lo == hi == m:
        return f"{scale * m:.{digits}f}"
    return f"{scale * m:.{digits}f} [{scale * lo:.{digits}f}, {scale * hi:.{digits}f}]"


def breakdown_cell(results: list[dict], dim: str, group: str, scorer: str = "model_verse") -> str:
    """One cell of the class/position table: the group's cloze accuracy, mean over the seeds' eval.json results
    with its 95% t-interval (clipped to [0, 100]); "n/a" where a seed has no item in the group."""
    return _accuracy_cell([r["cloze"]["scorers"][scorer]["breakdowns"][dim].get(group, {}).get("accuracy",
                                                                                             float("nan"))
                           for r in results])


def _accuracy_cell(values: list[float]) -> str:
    """An accuracy's mean over seeds with its 95% t-interval, clipped to [0, 100]; "n/a" where a seed has none."""
    if any(math.isnan(v) for v in values):
        return "n/a"
    return _fmt_ci(*mean_ci(values), bounds=(0.0, 1.0))


def _pct_interval(ci: tuple[float, float], signed: bool = True) -> str:
    if any(math.isnan(v) for v in ci):
        return "n/a"
    sign = "+" if signed else ""
    return f"[{100 * ci[0]:{sign}.1f}%, {100 * ci[1]:{sign}.1f}%]"


def class_head_section(strategies: list[str], seeds: list[int], evaluated: dict[str, dict]) -> list[str]:
    """The class head's accuracy (the connective's type from the mask token, every held-out slot) of the
    strategies that train one, per class, against the majority class; nothing when none does."""
    heads = [s for s in strategies if all("class_head" in evaluated[f"{s}-seed{seed}"] for seed in seeds)]
    if not heads:
        return []
    sample = evaluated[f"{heads[0]}-seed{seeds[0]}"]["class_head"]
    labels = list(sample["model"]["breakdowns"]["class"])
    by_class = sample["model"]["breakdowns"]["class"]
    lines = ["", "## Class head: the connective's type from the mask token", "",
             f"Mean over {len(seeds)} seed(s), with a 95% t-interval across seeds where there are two or more; every "
             f"held-out connective slot ({sample['model']['n']}), its first token masked.", "",
             "| strategy | all | " + " | ".join(f"{c} (n={by_class[c]['n']})" for c in labels) + " |",
             "|---" * (len(labels) + 2) + "|"]
    for strategy in heads:
        results = [evaluated[f"{strategy}-seed{seed}"]["class_head"]["model"] for seed in seeds]
        cells = [_accuracy_cell([r["accuracy"] for r in results])]
        cells += [_accuracy_cell([r["breakdowns"]["class"].get(c, {}).get("accuracy", float("nan")) for r in results])
                  for c in labels]
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    majority = sample["majority_class"]
    lines.append(f"| *majority class ({majority['class']})* | {100 * majority['accuracy']:.1f} | "
                 + " | ".join(f"{100 * majority['breakdowns']['class'][c]['accuracy']:.1f}" for c in labels) + " |")
    return lines


# The design notes' success criteria (Phase 1: per-connective accuracy; the decision point is the Decision table's)
CRITERIA = (("therefore", 0.75), ("but", 0.85))
CRITERIA_GAP = 0.10  # Phase 2: the accuracy gap between "therefore" and "but" narrows below 10 points


def word_accuracy(result: dict, word: str) -> tuple[float, int]:
    """(accuracy, n) of one connective word in a scorer's result (next_token or a cloze scorer); nan, 0 if absent."""
    group = result.get("breakdowns", {}).get("word", {}).get(word)
    return (group["accuracy"], group["n"]) if group else (float("nan"), 0)


def success_criteria_section(strategies: list[str], seeds: list[int], evaluated: dict[str, dict],
                             decisions: dict[str, BootstrapResult]) -> list[str]:
    """The design notes' criteria, measured per strategy (mean over seeds) and marked met or not: > 75% on
    "therefore" and > 85% on "but" (next-token and cloze), their gap < 10 points (Phase 2), and > 5% over the
    baseline (the decision above)."""
    def mean_word(strategy: str, kind: str, word: str) -> tuple[float, int]:
        pairs = []
        for seed in seeds:
            e = evaluated[f"{strategy}-seed{seed}"]
            pairs.append(word_accuracy(e["next_token"] if kind == "next" else e["cloze"]["scorers"]["model_verse"],
                                       word))
        return float(np.mean([a for a, _ in pairs])), pairs[0][1]

    def cell(value: float, n: int, at: float) -> str:
        if math.isnan(value):
            return "n/a"
        return f"{100 * value:.1f} (n={n}) {'met' if value > at else 'not met'}"

    (w1, t1), (w2, t2) = CRITERIA
    lines = ["", "## The design notes' success criteria", "",
             f"Phase 1: > {100 * t1:.0f}% accuracy on *{w1}*, > {100 * t2:.0f}% on *{w2}*; Phase 2: the gap between "
             f"them < {100 * CRITERIA_GAP:.0f} points; the decision point: > {100 * PROCEED_AT:.0f}% improvement "
             f"over the baseline (the decision above). Accuracy as measured here, mean over {len(seeds)} seed(s): "
             "next-token (the connective is the model's first choice, all pieces, teacher-forced) and cloze (it ranks "
             "first among the lexicon's words, whole verse).", "",
             f"| strategy | next-token *{w1}* % | next-token *{w2}* % | cloze *{w1}* % | cloze *{w2}* % "
             f"| cloze gap ({w2} - {w1}) | > {100 * PROCEED_AT:.0f}% over {BASELINE} |",
             "|---|---|---|---|---|---|---|"]
    for strategy in strategies:
        n1, n2 = mean_word(strategy, "next", w1), mean_word(strategy, "next", w2)
        c1, c2 = mean_word(strategy, "cloze", w1), mean_word(strategy, "cloze", w2)
        gap = c2[0] - c1[0]
        gap_cell = "n/a" if math.isnan(gap) else f"{100 * gap:+.1f} {'met' if abs(gap) < CRITERIA_GAP else 'not met'}"
        res = decisions.get(strategy)
        decision = "(the baseline)" if strategy == BASELINE else (
            f"{'met' if res.decision == 'proceed' else 'not met'} ({res.decision})")
        lines.append(f"| {strategy} | {cell(*n1, t1)} | {cell(*n2, t2)} | {cell(*c1, t1)} | {cell(*c2, t2)} | "
                     f"{gap_cell} | {decision} |")
    return lines


def _level(alpha: float) -> str:
    return f"{100 * (1 - alpha):.4g}%"


def _diff_cell(res: BootstrapResult, scale: float = 100, digits: int = 1) -> str:
    low, high = res.diff_ci
    return f"{scale * res.diff:+.{digits}f} [{scale * low:+.{digits}f}, {scale * high:+.{digits}f}]"


def _seed_cell(res: BootstrapResult, scale: float = 100, digits: int = 1) -> str:
    """The seed-paired view: the mean of the per-seed differences, its 95% t-interval, the seeds above 0."""
    m, lo, hi = res.seed_diff
    interval = f" [{scale * lo:+.{digits}f}, {scale * hi:+.{digits}f}]" if res.seeds > 1 else ""
    return f"{scale * m:+.{digits}f}{interval}, {res.seeds_positive}/{res.seeds} > 0"


def _p_cell(res: BootstrapResult) -> str:
    return f"{res.p:.3g} / {res.p_holm:.3g}"


def header_section(data: ReportData, args: argparse.Namespace, command: str, wall_s: float,
                   missing: list[str]) -> list[str]:
    first, strategies, seeds = data.first, data.strategies, data.seeds
    cfg_steps = load_config(args.config, None, data.runs[0].overrides).training.steps
    total_train = sum(t.get("train_s", 0) for t in data.trained.values())
    total_eval = sum(e.get("eval_s", 0) for e in data.evaluated.values())
    chapters = len(set(data.units("cloze", data.decision_set)))
    return [
        "# Connective masking: strategy comparison", "", f"Produced by `{command}`", "",
        f"Equivalent full command: `python -m genesis.compare --config {args.config} --strategies "
        f"{','.join(strategies)} --seeds {','.join(map(str, seeds))} --steps {args.steps} --max-items "
        f"{args.max_items} --context-verses {args.context_verses} --context-k {args.context_k} --bootstrap "
        f"{args.bootstrap} --out {args.out}"
        + "".join(f" --set {shlex.quote(s)}" for s in args.set) + (f" --corpus {args.corpus}" if args.corpus else "")
        + "`",
        "",
        f"- config: `{args.config}`, training.steps = {cfg_steps}, overrides for every run: "
        f"{', '.join(f'`{s}`' for s in (*RUN_OVERRIDES, *args.set))}; CPU denormals flushed to zero "
        "(`torch.set_flush_denormal(True)`)",
        "- strategies: " + "; ".join(f"**{s}** = {', '.join(f'`{o}`' for o in STRATEGIES[s])}" for s in strategies),
        f"- seeds: {', '.join(map(str, seeds))} (`training.seed`, which also seeds masking)",
        f"- evaluation: {first['corpus']} {first['split']}, next-token on {len(data.items['next_token'])} connective "
        f"slots, cloze on {len(data.items['cloze'])} items x {first['cloze']['n_candidates']} candidates "
        f"(--max-items {args.max_items}, --context-verses {args.context_verses}); bootstrap {args.bootstrap} resamples",
        f"- statistics: resampling unit = held-out chapters ({chapters} for the cloze items of the decision's set, "
        f"{data.decision_set}); correction = Holm over the m = {len(strategies) - 1} strategies compared (per metric "
        "and item set); the seed-paired interval (t over the per-seed differences) beside every bootstrap interval",
        (f"- items: every metric on the conjunctive set (connectives in their discourse sense) and on all items; the "
         f"decision reads the {data.decision_set} set" + ("" if data.decision_set == "conjunctive" else
                                                            " (no cloze item is conjunctive)") if data.tagged else
         "- items: not tagged by connective sense (the eval.json files carry no `conjunctive` field), so every metric "
         "is on all items and the decision reads all items"),
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"device {first.get('device', '?')}; {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- wall time of this invocation: {wall_s / 60:.1f} min; compute recorded for all runs: training "
        f"{total_train / 60:.1f} min, evaluation {total_eval / 60:.1f} min",
        *([f"- **incomplete**: left out {', '.join(missing)} (a run that failed or did not finish, or a run "
            "unpaired without it); rerun the same command to complete them"] if missing else []),
    ]


def metrics_section(data: ReportData) -> list[str]:
    """Each metric's mean over seeds with its t-interval, per strategy, one table per item set (the held-out loss,
    a property of the whole held-out text, in the `all` table only)."""
    lines = ["", "## Metrics per strategy", "",
             f"Mean over {len(data.seeds)} seed(s), with a 95% t-interval across seeds where there are two or more. "
             "Next-token accuracy: all pieces of the connective are the argmax (teacher-forced). Cloze: the original "
             "connective ranks first among all lexicon words (whole-verse or suffix-only log-likelihood). Log p: "
             "mean log-probability of the connective's pieces (nats). Loss: the held-out loss logged at the end of "
             "training."]
    top1 = [v for s in data.strategies for v in data.values(METRICS[0], s, "all")]
    if max(top1) < NO_TOP1_BELOW:
        lines += ["", "Note: top-1 next-token accuracy at connective positions is below 0.5% in every run: at this "
                  "training budget the models never rank a connective first there (they predict *and*, *the*, "
                  "punctuation), so the log p column carries the next-token comparison."]
    for item_set in data.sets:
        metrics = [m for m in METRICS if m.kind != "run" or item_set == "all"]
        lines += ["", f"**{data.set_label(item_set)}**", "",
                  "| strategy | " + " | ".join(m.name for m in metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
        for strategy in data.strategies:
            cells = [_fmt_ci(*mean_ci(data.values(m, strategy, item_set)), scale=m.scale, digits=m.digits,
                             bounds=m.bounds) for m in metrics]
            lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    return lines


def baselines_section(data: ReportData) -> list[str]:
    scorers = (("majority connective", "majority"),
               ("majority given position (verse-initial / inside)", "positional_majority"),
               ("Kneser-Ney token trigram, whole verse", "kn3_verse"),
               ("Kneser-Ney token trigram, suffix only", "kn3_suffix"))
    lines = ["", "## Baselines on the same cloze items", "", "Model-independent; trained on the runs' training split.",
             "", "| baseline | " + " | ".join(f"{s} % " for s in data.sets) + "|", "|---" * (len(data.sets) + 1) + "|"]
    for name, scorer in scorers:
        lines.append(f"| {name} | " + " | ".join(f"{100 * data.scorer_accuracy(scorer, s):.1f}" for s in data.sets)
                     + " |")
    lines.append("| chance | " + " | ".join(f"{100 / data.first['cloze']['n_candidates']:.1f}" for _ in data.sets)
                 + " |")
    return lines


def decision_section(data: ReportData, decisions: dict[str, dict[str, BootstrapResult]]) -> list[str]:
    lines = ["", f"## Decision: > {100 * PROCEED_AT:.0f}% improvement over `{BASELINE}`?", "",
             "Paired bootstrap of cloze accuracy (whole-verse score, each item's credit averaged over seeds), "
             "resampling held-out chapters with all their items, the same draw for both arms. Holm's correction over "
             "the m strategies: each strategy's p-value (of its margin being 0) is Holm-adjusted, and its intervals "
             "are read at the level of its rank (the k-th smallest p of m: 1 - 0.05/(m - k + 1); from the first rank "
             "Holm does not reject, that rank's level for every later one). "
             f"**proceed** if the corrected interval of `accuracy - {1 + PROCEED_AT:.2f} x baseline accuracy` lies "
             f"above 0 (for a baseline above 0: the relative improvement's interval lies above +{100 * PROCEED_AT:.0f}"
             "%), **do not proceed** if it lies at or below 0, **inconclusive** if it straddles 0. Beside it: the "
             "seeds+chapters interval (seeds resampled too, at the same level) and the seed-paired Δ (the mean of the "
             "per-seed differences with its 95% t-interval, uncorrected, and how many seeds are above 0); they are "
             "shown, not used for the decision."]
    for item_set in data.sets:
        base = data.matrix(BASELINE, "cloze", "model_verse", item_set)
        role = "the decision" if item_set == data.decision_set else "shown, not the decision"
        lines += ["", f"**{data.set_label(item_set)}**: {role}", ""]
        if not base.size:
            lines.append("No cloze item in this set.")
            continue
        lines += [f"| strategy | cloze acc. % | Δ vs {BASELINE} (points) [CI] | relative Δ [CI] "
                  "| relative Δ, seeds+chapters [CI] | CI level | p / Holm p | seed-paired Δ (points) | decision |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for strategy, res in decisions[item_set].items():
            rel = "n/a" if math.isnan(res.relative) else f"{100 * res.relative:+.1f}%"
            lines.append(
                f"| {strategy} | {100 * data.matrix(strategy, 'cloze', 'model_verse', item_set).mean():.1f} | "
                f"{_diff_cell(res)} | {rel} {_pct_interval(res.relative_ci)} | {_pct_interval(res.seeds_relative_ci)}"
                f" | {_level(res.alpha)} | {_p_cell(res)} | {_seed_cell(res)} | **{res.decision}** |")
        lines.append(f"| {BASELINE} (baseline) | {100 * base.mean():.1f} | | | | | | | |")
    return lines


def next_token_section(data: ReportData, args: argparse.Namespace) -> list[str]:
    """The design notes' own metric, tested as the cloze is: log p and accuracy at every connective slot."""
    if not data.items["next_token"]:
        return ["", "## Next-token at connectives: paired tests", "",
                "The eval.json files carry no per-slot next-token values (`items.next_token`): no paired test."]
    lines = ["", f"## Next-token at connectives: paired tests against `{BASELINE}`", "",
             "The design notes' own metric at every held-out connective slot: the mean log p of the connective's "
             "pieces (nats) and next-token accuracy (points). Δ = strategy - baseline with its chapter-clustered "
             "paired bootstrap interval at the Holm level of the strategy's rank (over the m strategies, per metric "
             "and item set; the level is given), the p-value of Δ = 0 and its Holm adjustment, and beside it the "
             "seed-paired Δ (mean of the per-seed differences, 95% t-interval, seeds above 0)."]
    for item_set in data.sets:
        logp = data.tests("next_token", "logprob", item_set, args.bootstrap)
        accuracy = data.tests("next_token", "credit", item_set, args.bootstrap)
        lines += ["", f"**{data.set_label(item_set)}**", ""]
        if not logp:
            lines.append("No next-token slot in this set.")
            continue
        lines += ["| strategy | Δ log p [CI] | CI level | p / Holm p | seed-paired Δ log p | Δ accuracy (points) [CI] "
                  "| CI level | p / Holm p | seed-paired Δ accuracy |", "|---|---|---|---|---|---|---|---|---|"]
        for strategy in logp:
            lp, acc = logp[strategy], accuracy[strategy]
            lines.append(f"| {strategy} | {_diff_cell(lp, 1, 3)} | {_level(lp.alpha)} | {_p_cell(lp)} | "
                         f"{_seed_cell(lp, 1, 3)} | {_diff_cell(acc, 100, 2)} | {_level(acc.alpha)} | {_p_cell(acc)} | "
                         f"{_seed_cell(acc, 100, 2)} |")
    return lines


def _seed_paired(values: list[float], against: list[float], digits: int = 3) -> str:
    """Per-seed differences (the same seed: the same initialisation and batches): mean [95% t], seeds above 0."""
    diffs = [a - b for a, b in zip(values, against)]
    if any(math.isnan(d) for d in diffs):
        return "n/a"
    return f"{_fmt_ci(*mean_ci(diffs), scale=1, digits=digits)}, {sum(d > 0 for d in diffs)}/{len(diffs)} > 0"


def masked_context_section(data: ReportData, args: argparse.Namespace) -> list[str]:
    def per_seed(strategy: str, key: str) -> list[float]:
        return [data.evaluated[f"{strategy}-seed{s}"]["masked_context"].get(key, float("nan")) for s in data.seeds]

    controls = [BASELINE, *([CONTROL] if CONTROL in data.strategies and CONTROL != BASELINE else [])]
    deletion = all("deletion_gap" in data.evaluated[r.name]["masked_context"] for r in data.runs)
    gaps = ["gap", *(["deletion_gap"] if deletion else [])]
    columns = ["visible", "masked", "gap", *[f"gap - {c}'s" for c in controls]]
    if deletion:
        columns += ["deleted", "deletion gap", *[f"deletion gap - {c}'s" for c in controls]]
    lines = ["", "## Loss after connectives: the masked-context control", "",
             f"The mean loss (nats) on the {args.context_k} tokens after each held-out connective: visible, with every "
             "held-out connective replaced by the mask token, and the gap (masked - visible); "
             + ("deleted (the connective removed instead) and its gap (deleted - visible); " if deletion else "")
             + "mean over seeds [95% t-interval]. A strategy's gap against a control is seed-paired (its seed s minus "
             f"the control's seed s): mean [95% t-interval], seeds above 0. `{BASELINE}` never saw the mask token as "
             f"an input, so its gap also measures an unfamiliar input; `{CONTROL}` sees it as often without hiding "
             "connectives.", ""]
    if CONTROL not in controls:
        lines += [f"No `{CONTROL}` runs in this comparison: the gaps against the control are not measured.", ""]
    if not deletion:
        lines += ["No deletion variant: the eval.json files carry no `deletion_gap` (evaluated before it existed).", ""]
    lines += ["| strategy | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for strategy in data.strategies:
        cells = [_fmt_ci(*mean_ci(per_seed(strategy, key)), scale=1, digits=3) for key in ("visible_loss",
                                                                                             "masked_loss", "gap")]
        for gap in gaps:
            if gap == "deletion_gap":
                cells += [_fmt_ci(*mean_ci(per_seed(strategy, k)), scale=1, digits=3) for k in ("deleted_loss", gap)]
            cells += ["" if strategy == c else _seed_paired(per_seed(strategy, gap), per_seed(c, gap))
                      for c in controls]
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    return lines


def rates_section(data: ReportData, args: argparse.Namespace) -> list[str]:
    """Realised masking per strategy (`run_rates`), and the final adaptive weights where a strategy adapts them."""
    lines = ["", "## Realised masking rates", "",
             "From each run's metrics.jsonl train records (every log step): the share of connective words masked "
             "(masked connectives / connective words in the batches) and masked tokens per 1,000 tokens; mean over "
             "seeds [95% t-interval].", "", "| strategy | connective words masked % | masked tokens per 1,000 "
             "| masked connectives per logged step |", "|---|---|---|---|"]
    adaptive, uncounted = [], False
    for strategy in data.strategies:
        spec = next(r for r in data.runs if r.strategy == strategy)
        cfg = load_config(args.config, None, spec.overrides).masking
        rates = [run_rates(r.run_dir) for r in data.runs if r.strategy == strategy]
        if not cfg.enabled or any(r is None for r in rates):
            lines.append(f"| {strategy} | {'no masking' if not cfg.enabled else 'n/a (no masking records)'} | | |")
            continue
        uncounted |= any(math.isnan(r["connective_share"]) for r in rates)
        cells = [_fmt_ci(*mean_ci([r[key] for r in rates]), scale=scale, digits=1, bounds=bounds)
                 for key, scale, bounds in (("connective_share", 100, UNIT_BOUNDS), ("per_1000", 1, (0, 1000)),
                                            ("masked_per_step", 1, (0, math.inf)))]
        lines.append(f"| {strategy} | " + " | ".join("n/a" if "nan" in c else c for c in cells) + " |")
        if cfg.adaptive:
            adaptive.append((strategy, connectives_of(cfg), [r["adapted"] for r in rates]))
    if uncounted:
        lines += ["", "n/a: the train records do not count `connective_words` (trained before they did), so the share "
                  "of connective words masked cannot be computed; the per-1,000 rate is."]
    for strategy, initial, adapted in adaptive:
        final = {w: float(np.mean([a.get(w, weight) for a in adapted])) for w, (weight, _) in initial.items()}
        changed = sorted((w for w in final if any(w in a for a in adapted)), key=lambda w: -final[w])
        lines += ["", f"**{strategy}**: final adaptive weights, mean over {len(adapted)} seed(s) (initial in "
                  "parentheses): " + (", ".join(f"*{w}* {final[w]:.2f} ({initial[w][0]:.2f})" for w in changed)
                                      or "none changed")
                  + f"; {len(final) - len(changed)} other words at their initial weights."]
    return lines


def breakdown_section(data: ReportData) -> list[str]:
    """Cloze accuracy by class and position, from each run's eval.json breakdowns (all items)."""
    seeds, scorers = data.seeds, data.first["cloze"]["scorers"]
    lines = ["", "## Cloze accuracy by class and position (whole-verse score, all items)", "",
             f"Mean over {len(seeds)} seed(s), with a 95% t-interval across seeds where there are two or more.", ""]
    groups = [("class", g) for g in scorers["model_verse"]["breakdowns"]["class"]]
    groups += [("position", g) for g in scorers["model_verse"]["breakdowns"]["position"]]
    lines += ["| strategy | " + " | ".join(f"{g} (n={scorers['model_verse']['breakdowns'][d][g]['n']})"
                                           for d, g in groups) + " |",
              "|---" * (len(groups) + 1) + "|"]
    for strategy in data.strategies:
        cells = [breakdown_cell([data.evaluated[f"{strategy}-seed{s}"] for s in seeds], dim, group)
                 for dim, group in groups]
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    for name, scorer in (("KN trigram", "kn3_verse"), ("majority", "majority")):
        cells = [f"{100 * scorers[scorer]['breakdowns'][d].get(g, {}).get('accuracy', float('nan')):.1f}"
                 for d, g in groups]
        lines.append(f"| *{name}* | " + " | ".join(cells) + " |")
    return lines


def runs_section(data: ReportData, args: argparse.Namespace) -> list[str]:
    lines = ["", "## Runs", "", "| run | steps | held-out loss | next-token % | cloze % (verse) | train s | eval s |",
             "|---|---|---|---|---|---|---|"]
    for r in data.runs:
        e, t = data.evaluated[r.name], data.trained[r.name]
        lines.append(f"| {r.name} | {t['summary'].get('steps', '?')} | "
                     f"{t['summary'].get('last_heldout_loss', float('nan')):.3f} | "
                     f"{100 * e['next_token']['accuracy']:.2f} | "
                     f"{100 * e['cloze']['scorers']['model_verse']['accuracy']:.1f} | {t.get('train_s', 0):.0f}"
                     f"{'*' if t.get('resumed') else ''} | {e.get('eval_s', 0):.0f} |")
    if any(data.trained[r.name].get("resumed") for r in data.runs):
        lines += ["", "\\* resumed after an interrupt: train s counts the last segment only."]
    return lines + ["", f"Run directories: `{Path(args.out) / 'runs'}`; each holds eval.json with per-item credits.",
                    ""]


def build_report(data: ReportData, args: argparse.Namespace, command: str, wall_s: float,
                 missing: list[str] = ()) -> str:
    """The Markdown report: one section per function, every number from `data`."""
    chosen = data.decision_set
    scale = informative_scale(data.matrix(BASELINE, "cloze", "model_verse", chosen),
                              data.matrix(BASELINE, "cloze", "kn3_verse", chosen), data.units("cloze", chosen),
                              args.bootstrap)
    decisions = {s: data.tests("cloze", "model_verse", s, args.bootstrap, PROCEED_AT) for s in data.sets}
    if not scale.informative:
        for results in decisions.values():
            for res in results.values():
                res.decision = NOT_INFORMATIVE
    lines = header_section(data, args, command, wall_s, list(missing))
    lines += metrics_section(data)
    lines += baselines_section(data)
    lines += scale.lines()
    lines += decision_section(data, decisions)
    lines += next_token_section(data, args)
    lines += masked_context_section(data, args)
    lines += rates_section(data, args)
    lines += success_criteria_section(data.strategies, data.seeds, data.evaluated, decisions[chosen])
    lines += breakdown_section(data)
    lines += class_head_section(data.strategies, data.seeds, data.evaluated)
    lines += runs_section(data, args)
    return "\n".join(lines)


def figure_metrics(data: ReportData, item_set: str) -> list[Metric]:
    """The METRICS that have something to show on `item_set`: a finite value in some run, and for an accuracy, one
    of at least NO_TOP1_BELOW (an accuracy of ~0 everywhere is the metrics table's note, not a panel)."""
    shown = []
    for metric in METRICS:
        values = np.array([v for s in data.strategies for v in data.values(metric, s, item_set)], dtype=np.float64)
        finite = values[np.isfinite(values)]
        if len(finite) and (metric.bounds is None or finite.max() >= NO_TOP1_BELOW):
            shown.append(metric)
    return shown


def _strategy_figure(data: ReportData, metrics: list[Metric], path: Path) -> list[str]:
    """strategy_metrics.png: a panel per metric in a grid; returns the report's lines that link it."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    strategies, chosen = data.strategies, data.decision_set
    cols = 2 if len(metrics) in (2, 4) else min(len(metrics), 3)
    rows = -(-len(metrics) // max(cols, 1))
    fig = Figure(figsize=(4.6 * cols, 3.9 * rows + 0.5), layout="constrained")
    FigureCanvasAgg(fig)
    for k, metric in enumerate(metrics):
        ax = fig.add_subplot(rows, cols, k + 1)
        for i, strategy in enumerate(strategies):
            values = [metric.scale * v for v in data.values(metric, strategy, chosen)]
            mean, low, high = mean_ci(values)
            if metric.bounds:  # an accuracy's t-interval can leave [0, 100] with few seeds; the truth cannot
                low, high = max(low, metric.scale * metric.bounds[0]), min(high, metric.scale * metric.bounds[1])
            ax.errorbar([i], [mean], yerr=[[mean - low], [high - mean]], fmt="o", color=f"C{i % 10}", capsize=6,
                        markersize=7, lw=1.5)
            ax.scatter(np.full(len(values), i + 0.12), values, s=12, color=f"C{i % 10}", alpha=0.6)
        if metric.baselines is not None:
            for name, scorer, style in (("KN trigram", f"kn3_{metric.baselines}", "--"), ("majority", "majority", ":")):
                ax.axhline(metric.scale * data.scorer_accuracy(scorer, chosen), color="gray", ls=style, lw=1,
                           label=name)
            ax.legend(fontsize=7, loc="best")
        ax.set_xticks(np.arange(len(strategies)), strategies, rotation=20)
        ax.set_xlim(-0.5, len(strategies) - 0.5)
        ax.set_title(metric.title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Per strategy, {chosen} items: mean over {len(data.seeds)} seed(s) with its 95% t-interval "
                 "(dots: the seeds)", fontsize=10)
    fig.savefig(path, dpi=110)
    left_out = [m.title for m in METRICS if m not in metrics]
    why = f"no value, or an accuracy below {100 * NO_TOP1_BELOW:g}% in every run"
    return [f"Each metric per strategy on the {chosen} items (the numbers of the metrics table): the mean over seeds "
            "with its 95% t-interval, every seed as a dot, and the cloze baselines (KN trigram, majority connective) "
            "as lines." + (f" Left out, with nothing to show ({why}): {', '.join(left_out)}." if left_out else ""),
            "", f"![metrics per strategy]({path.name})", ""]


def write_report_figures(data: ReportData, out_dir: Path, prefix: str = "") -> str:
    """strategy_metrics.png (each metric of `figure_metrics` per strategy on the decision's item set, in a grid: the
    mean over seeds with its 95% t-interval, every seed as a dot, the cloze baselines as lines) and
    learning_curves.png (genesis.plot's figure of every run; left out, and an older one removed, where every metric
    has one point per run) in `out_dir`, beside report.md (their names prefixed by `prefix`); returns the report's
    Markdown section that links them."""
    from genesis.plot import PlotError, curve_panels, plot_curves, read_curves

    out_dir.mkdir(parents=True, exist_ok=True)
    lines = ["", "## Figures", ""]
    metrics = figure_metrics(data, data.decision_set)
    if metrics:
        lines += _strategy_figure(data, metrics, out_dir / f"{prefix}strategy_metrics.png")
    else:
        (out_dir / f"{prefix}strategy_metrics.png").unlink(missing_ok=True)  # an older report's
        lines += ["No metric has values to draw per strategy.", ""]
    try:
        curves = [read_curves(str(r.run_dir)) for r in data.runs]
    except PlotError:  # a run without metrics.jsonl (a run directory from elsewhere): no curves
        return "\n".join(lines)
    for r, c in zip(data.runs, curves):
        c.label = r.name
    png = out_dir / f"{prefix}learning_curves.png"
    drawn, single = curve_panels(curves)
    if plot_curves(curves, png) is None:
        png.unlink(missing_ok=True)  # an older report's figure would describe other runs
        return "\n".join(lines + ["Every run has one point per metric in its metrics.jsonl (evaluated once, at the "
                                  "end): no learning curves; the end-of-training values are in the tables above.", ""])
    one_point = f" Evaluated once per run, so not curves: {', '.join(p[2] for p in single)} (in the tables above)."
    lines += ["The runs' learning curves, from their metrics.jsonl (`python -m genesis.plot`): "
              f"{', '.join(p[2] for p in drawn)}." + (one_point if single else ""), "",
              f"![learning curves]({prefix}learning_curves.png)", ""]
    return "\n".join(lines)


class Evaluation:
    """`evaluate_run` in a daemon thread (an interrupt does not wait for it; eval.json is written atomically, so an
    unfinished one leaves nothing). CPU denormals are flushed in the thread too: the setting is per thread."""

    def __init__(self, spec: RunSpec, args: argparse.Namespace, ctx: EvalContext | None):
        self.spec = spec
        self._out: tuple | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(spec, args, ctx), daemon=True,
                                        name=f"evaluate {spec.name}")
        self._thread.start()

    def _run(self, spec: RunSpec, args: argparse.Namespace, ctx: EvalContext | None) -> None:
        try:
            with flushed_denormals():
                self._out = evaluate_run(spec, args, ctx)
        except BaseException as e:  # handed to the main thread by result()
            self._error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> tuple[dict, EvalContext | None]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._out


def run_all(runs: list[RunSpec], args: argparse.Namespace, t0: float) -> tuple[dict, dict, list[str]]:
    """Train (up to args.jobs processes at once) and evaluate (in this process, one run at a time, as each run's
    training ends) every run not done yet. An evaluation runs in a thread while this loop goes on polling, so a job
    slot whose training ends during an evaluation is filled at once. Returns the train.done and eval.json records
    of the runs that finished and the names of those whose training failed: a failure is reported with its log's
    tail, the others go on."""
    trained, evaluated, failed = {}, {}, []
    waiting, ready = [], []  # runs to train; trained runs to evaluate
    for k, spec in enumerate(runs, start=1):
        head = f"[{k}/{len(runs)}] {spec.name}"
        cfg = check_run_dir(spec, args)  # every run's settings checked before any training starts
        done = _read_json(spec.run_dir / "train.done")
        if done is not None and not (spec.run_dir / CHECKPOINT).is_file():
            print(f"{head}: training was done but {CHECKPOINT} is gone: training again", flush=True)
            (spec.run_dir / "train.done").unlink()  # an interrupted retraining must not pass for a finished one
            done = None
        if done is not None:
            print(f"{head}: training done, skipping", flush=True)
            trained[spec.name] = done
            ready.append((head, spec))
        else:
            waiting.append((head, spec, cfg))
    running: list[Training] = []
    evaluation: Evaluation | None = None
    ctx = None
    try:
        while waiting or running or ready or evaluation:
            free = [slot for slot in range(args.jobs) if slot not in {job.slot for job in running}]
            while free and waiting:
                head, spec, cfg = waiting.pop(0)
                job = start_training(spec, cfg, head, free.pop(0), args.jobs)
                running.append(job)
                print(f"{head}: {'resuming training' if job.resumed else 'training'} "
                      f"({time.time() - t0:.0f} s elapsed; log {spec.run_dir / 'train.log'})", flush=True)
            for job in [j for j in running if j.process.poll() is not None]:
                running.remove(job)
                if job.process.returncode == 0:
                    trained[job.spec.name] = finish_training(job)
                    print(f"{job.head}: trained in {trained[job.spec.name]['train_s']:.0f} s", flush=True)
                    ready.append((job.head, job.spec))
                else:
                    job.log.close()
                    failed.append(job.spec.name)
                    log = job.spec.run_dir / "train.log"
                    print(f"{job.head}: training failed (exit status {job.process.returncode}); the last lines of "
                          f"{log}:\n{log_tail(log)}", file=sys.stderr, flush=True)
            if evaluation is not None and evaluation.done():
                evaluated[evaluation.spec.name], ctx = evaluation.result()  # an evaluation's error is raised here
                evaluation = None
            if ready and evaluation is None:
                head, spec = ready.pop(0)
                reused = reusable_eval(spec, args)
                if reused is not None:
                    print(f"{head}: evaluation done, skipping", flush=True)
                    evaluated[spec.name] = reused
                else:
                    print(f"{head}: evaluating ({time.time() - t0:.0f} s elapsed)", flush=True)
                    evaluation = Evaluation(spec, args, ctx)
            elif running or evaluation:
                time.sleep(0.2)
    finally:
        stop_training(running)  # an interrupt or an error here: the runs in training save their checkpoints
    return trained, evaluated, failed


def reportable(runs: list[RunSpec], evaluated: dict[str, dict]) -> tuple[list[RunSpec], list[str]]:
    """The runs a report can pair (the seeds whose baseline run finished, the strategies that finished all of
    them) and the names of the runs it must leave out."""
    seeds = [r.seed for r in runs if r.strategy == BASELINE and r.name in evaluated]
    strategies = {r.strategy for r in runs}
    complete = {s for s in strategies if all(f"{s}-seed{seed}" in evaluated for seed in seeds)} if seeds else set()
    shown = [r for r in runs if r.strategy in complete and r.seed in seeds]
    return shown, [r.name for r in runs if r not in shown]


# ----------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m genesis.compare", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=DEFAULTS["config"], help="training config (default cpu.toml)")
    p.add_argument("--strategies", default=DEFAULTS["strategies"],
                   help=f"comma-separated, from {', '.join(STRATEGIES)} (default all; '{BASELINE}' is always added)")
    p.add_argument("--seeds", default=DEFAULTS["seeds"], help="comma-separated training seeds (default 1,2,3)")
    p.add_argument("--steps", type=int, default=DEFAULTS["steps"],
                   help="training.steps for every run (default 120; 0 keeps the config's)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a config override applied to every run (before the strategy's own)")
    p.add_argument("--max-items", type=int, default=DEFAULTS["max_items"],
                   help="cloze items, spread evenly over the held-out split (default 300; 0 = all)")
    p.add_argument("--context-verses", type=int, default=DEFAULTS["context_verses"],
                   help="preceding verses of the item's chapter given as cloze context (default 3)")
    p.add_argument("--corpus", default=None, help="evaluation corpus (default: the runs' own), e.g. asv")
    p.add_argument("--context-k", type=int, default=DEFAULT_CONTEXT_K,
                   help=f"tokens after each connective for the masked-context loss (default {DEFAULT_CONTEXT_K})")
    p.add_argument("--bootstrap", type=int, default=DEFAULTS["bootstrap"], help="bootstrap resamples (default 2000)")
    p.add_argument("--out", help="comparison directory (default runs/compare-<config name>)")
    p.add_argument("--report", help="Markdown report path (default OUT/report.md)")
    p.add_argument("--device", default="auto", help="evaluation device: auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-tokens", type=int, default=8192, help="tokens per evaluation forward pass")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs trained at once, each in its own process (default 1): on GPUs spread round-robin "
                        "over the visible devices, on the CPU with the cores shared out")
    args = p.parse_args(argv)
    if args.out is None:
        args.out = str(Path("runs") / f"compare-{Path(args.config).stem}")
    return args


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    command = "python -m genesis.compare" + (" " + shlex.join(argv) if argv else "")
    handle_interrupts()  # Ctrl-C or SIGTERM: the run in training saves its checkpoint, finished runs stay
    # Flushing denormals is what makes the CPU comparison fit in 30 minutes (genesis.device.flushed_denormals); every
    # strategy runs under the same setting.
    with flushed_denormals():
        return _main(args, command)


def _main(args: argparse.Namespace, command: str) -> int:
    t0 = time.time()
    try:
        refuse_several_processes("python -m genesis.compare")
        if args.steps < 0 or args.max_items < 0 or args.bootstrap < 100 or args.context_verses < 0:
            raise CompareError("--steps, --max-items and --context-verses must be >= 0, --bootstrap >= 100")
        if args.jobs < 1:
            raise CompareError(f"--jobs: expected at least 1 (got {args.jobs})")
        if args.context_k < 1:
            raise CompareError(f"--context-k: expected at least 1 (got {args.context_k})")
        resolve_device(args.device)  # a bad --device fails now, not after the first run's training
        runs = plan_runs(args)
        print(f"compare: {len(runs)} runs ({', '.join(r.name for r in runs)}) in {args.out}"
              + (f", {args.jobs} at a time" if args.jobs > 1 else ""), flush=True)
        trained, evaluated, failed = run_all(runs, args, t0)
        shown, missing = reportable(runs, evaluated)
        if not shown:
            raise CompareError(f"no report: no run of the baseline '{BASELINE}' finished")
        data = ReportData(shown, trained, evaluated)
        report = build_report(data, args, command, time.time() - t0, missing)
        report_path = Path(args.report) if args.report else Path(args.out) / "report.md"
        # beside a report named otherwise than report.md (docs/compare-NAME.md), the figures carry its name
        prefix = "" if report_path.name == "report.md" else f"{report_path.stem}-"
        report += write_report_figures(data, report_path.parent, prefix)
        report_path.parent.mkdir(parents=True, exist_ok=True)
        report_path.write_text(report)
        print(f"compare: wrote {report_path} ({(time.time() - t0) / 60:.1f} min)", flush=True)
        if failed:
            print(f"error: {len(failed)} run(s) failed: {', '.join(failed)} (their train.log is shown above; the "
                  f"report leaves out {', '.join(missing)}); rerun the same command to retry them", file=sys.stderr)
            return 1
    except (CompareError, ConfigError, CorpusError, TokenizerError, RunError, EvalError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    except Interrupted as e:
        print(f"\ninterrupted ({e}): finished runs are kept; rerun the same command to continue", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs are kept; rerun the same command to continue", file=sys.stderr)
        return 130
    return 0


def leave(code: int) -> None:
    """Exit with `code`. An evaluation still running in its thread (after an interrupt) would have the interpreter
    torn down under it, which aborts in torch's native code ("terminate called without an active exception", status
    -6 instead of 130): then the process leaves at once, its output flushed (eval.json is written atomically)."""
    if any(t.daemon and t.is_alive() for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)


if __name__ == "__main__":
    leave(main())
