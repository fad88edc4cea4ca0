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

Statistics, per metric: the mean over seeds with a 95% t-interval (seeds are the replicates). Against the baseline
strategy (no masking), a paired bootstrap over cloze items: each item's credit is averaged over seeds, items are
resampled with replacement (the same draw for both strategies), and the 2.5/97.5 percentiles give the intervals of
the difference in cloze accuracy (whole-verse score) and of the relative improvement. The design notes' rule
"> 5% improvement over the unmasked baseline -> proceed" is read as a relative improvement: proceed when the
interval of `accuracy - 1.05 x baseline accuracy` lies above 0 (for a baseline above 0: the relative improvement's
interval lies above +5%), do not proceed when it lies at or below 0, inconclusive when it straddles 0. A second
interval resamples seeds (paired: the same seed means the same initialisation and batches) and then items, so
training noise counts too; it is reported next to the decision, not used for it.

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
import shlex
import signal
import subprocess
import sys
import threading
import time
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

# CPU defaults, sized for a 2-core machine (denormals flushed, see main): 7 strategies x 3 seeds of 120 cpu.toml
# steps, each evaluated at every held-out slot and on 300 cloze items. Held-out loss is evaluated once, at the end
# (training.eval_every=0). More steps, seeds or items: pass them, and expect proportionally longer.
DEFAULTS = {"config": "cpu.toml", "strategies": ",".join(STRATEGIES), "seeds": "1,2,3", "steps": 120,
            "max_items": 300, "context_verses": 0, "bootstrap": 2000}
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


@dataclass
class BootstrapResult:
    diff: float  # strategy - baseline, accuracy (fraction)
    diff_ci: tuple[float, float]
    relative: float  # strategy / baseline - 1
    relative_ci: tuple[float, float]
    seeds_relative_ci: tuple[float, float]  # seeds and items resampled
    decision: str


def paired_bootstrap(strategy: np.ndarray, baseline: np.ndarray, samples: int = 2000, seed: int = 0,
                     threshold: float = PROCEED_AT) -> BootstrapResult:
    """strategy, baseline: (seeds, items) credits, columns paired by item, rows paired by seed (equal counts).

    The decision reads the interval of the margin `strategy - (1 + threshold) * baseline`: proceed when it lies
    above 0, do not proceed when it lies at or below 0, inconclusive when it straddles 0. For a baseline above 0
    that is the relative improvement's interval against +threshold; for a baseline at 0 it still answers."""
    if strategy.shape != baseline.shape:
        raise ValueError(f"unpaired credits: {strategy.shape} vs {baseline.shape}")
    rng = np.random.Generator(np.random.PCG64(seed))
    n_seeds, n_items = strategy.shape
    x, b = strategy.mean(axis=0), baseline.mean(axis=0)  # per item, averaged over seeds
    items = rng.integers(0, n_items, size=(samples, n_items))
    xs, bs = x[items].mean(axis=1), b[items].mean(axis=1)
    seed_rows = rng.integers(0, n_seeds, size=(samples, n_seeds))
    items2 = rng.integers(0, n_items, size=(samples, n_items))
    xs2 = strategy[seed_rows[:, :, None], items2[:, None, :]].mean(axis=(1, 2))
    bs2 = baseline[seed_rows[:, :, None], items2[:, None, :]].mean(axis=(1, 2))

    def interval(values: np.ndarray) -> tuple[float, float]:
        if not np.isfinite(values).all():
            return float("nan"), float("nan")
        return float(np.percentile(values, 2.5)), float(np.percentile(values, 97.5))

    with np.errstate(divide="ignore", invalid="ignore"):
        relative = float(x.mean() / b.mean() - 1) if b.mean() > 0 else float("nan")
        rel_ci, rel2_ci = interval(xs / bs - 1), interval(xs2 / bs2 - 1)
    margin_low, margin_high = interval(xs - (1 + threshold) * bs)
    if margin_low > 0:
        decision = "proceed"
    elif margin_high <= 0:
        decision = "do not proceed"
    else:
        decision = "inconclusive"
    return BootstrapResult(float(x.mean() - b.mean()), interval(xs - bs), relative, rel_ci, rel2_ci, decision)


NOT_INFORMATIVE = "not informative at this scale"


@dataclass
class ScaleCheck:
    """Whether the unmasked baseline beats the Kneser-Ney trigram's whole-verse cloze on the same items: below that,
    the models have not learned enough language for masking's effect on them to mean anything."""
    baseline: float  # cloze accuracy (fraction), averaged over seeds and items
    trigram: float
    diff_ci: tuple[float, float]  # paired bootstrap 95% interval of baseline - trigram

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
                f"[{100 * self.diff_ci[0]:+.1f}, {100 * self.diff_ci[1]:+.1f}] (paired bootstrap over items, 95%). "
                f"{verdict}."]


def informative_scale(baseline: np.ndarray, trigram: np.ndarray, samples: int = 2000) -> ScaleCheck:
    """baseline, trigram: (seeds, items) whole-verse cloze credits, paired as for `paired_bootstrap` (the trigram's
    rows are equal: it does not depend on the seed)."""
    res = paired_bootstrap(baseline, trigram, samples, threshold=0.0)
    return ScaleCheck(float(baseline.mean()), float(trigram.mean()), res.diff_ci)


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


def eval_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_items": args.max_items, "context_verses": args.context_verses, "corpus": args.corpus,
            "context_k": args.context_k}


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


def _credits(result: dict, scorer: str) -> dict[str, float]:
    return {item["id"]: item["credit"][scorer] for item in result["items"]["cloze"]}


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


def build_report(runs: list[RunSpec], trained: dict[str, dict], evaluated: dict[str, dict],
                 args: argparse.Namespace, command: str, wall_s: float, missing: list[str] = ()) -> str:
    strategies = list(dict.fromkeys(r.strategy for r in runs))
    seeds = list(dict.fromkeys(r.seed for r in runs))
    first = evaluated[runs[0].name]
    # items common to every run (identical when the tokenizer is: the usual case)
    common = set(_credits(first, "model_verse"))
    for r in runs:
        common &= set(_credits(evaluated[r.name], "model_verse"))
    item_ids = sorted(common)

    def credit_matrix(strategy: str, scorer: str = "model_verse") -> np.ndarray:
        rows = []
        for seed in seeds:
            c = _credits(evaluated[f"{strategy}-seed{seed}"], scorer)
            rows.append([c[i] for i in item_ids])
        return np.array(rows, dtype=np.float64)

    # name -> (value from a run's eval.json and train.done, display scale, decimals, bounds)
    unit = (0.0, 1.0)
    metrics = {
        "next-token acc. %": (lambda e, t: e["next_token"]["accuracy"], 100, 2, unit),
        "next-token log p": (lambda e, t: e["next_token"]["mean_logprob"], 1, 3, None),
        "cloze acc. % (verse)": (lambda e, t: e["cloze"]["scorers"]["model_verse"]["accuracy"], 100, 1, unit),
        "cloze acc. % (suffix)": (lambda e, t: e["cloze"]["scorers"]["model_suffix"]["accuracy"], 100, 1, unit),
        "held-out loss": (lambda e, t: t["summary"].get("last_heldout_loss", float("nan")), 1, 3, None),
        "loss after connectives, visible": (lambda e, t: e["masked_context"]["visible_loss"], 1, 3, None),
        "… masked": (lambda e, t: e["masked_context"]["masked_loss"], 1, 3, None),
        "… gap": (lambda e, t: e["masked_context"]["gap"], 1, 3, None),
    }
    cfg_steps = load_config(args.config, None, runs[0].overrides).training.steps
    total_train = sum(t.get("train_s", 0) for t in trained.values())
    total_eval = sum(e.get("eval_s", 0) for e in evaluated.values())
    lines = [
        "# Connective masking: strategy comparison",
        "",
        f"Produced by `{command}`",
        "",
        f"Equivalent full command: `python -m genesis.compare --config {args.config} --strategies "
        f"{','.join(strategies)} --seeds {','.join(map(str, seeds))} --steps {args.steps} --max-items "
        f"{args.max_items} --context-verses {args.context_verses} --context-k {args.context_k} --bootstrap "
        f"{args.bootstrap} --out {args.out}"
        + "".join(f" --set {shlex.quote(s)}" for s in args.set) + (f" --corpus {args.corpus}" if args.corpus else "")
        + "`",
        "",
        f"- config: `{args.config}`, training.steps = {cfg_steps}, overrides for every run: "
        f"{', '.join(f'`{s}`' for s in (*RUN_OVERRIDES, *args.set))}; CPU denormals flushed to zero "
        "(`torch.set_flush_denormal(True)`: ~10x faster training steps on this CPU)",
        "- strategies: " + "; ".join(f"**{s}** = {', '.join(f'`{o}`' for o in STRATEGIES[s])}" for s in strategies),
        f"- seeds: {', '.join(map(str, seeds))} (`training.seed`, which also seeds masking)",
        f"- evaluation: {first['corpus']} {first['split']}, next-token on {first['next_token']['n']} connective slots, "
        f"cloze on {len(item_ids)} items x {first['cloze']['n_candidates']} candidates "
        f"(--max-items {args.max_items}, --context-verses {args.context_verses}); bootstrap {args.bootstrap} resamples",
        f"- machine: {platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"device {first.get('device', '?')}; {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- wall time of this invocation: {wall_s / 60:.1f} min; compute recorded for all runs: training "
        f"{total_train / 60:.1f} min, evaluation {total_eval / 60:.1f} min",
        *([f"- **incomplete**: left out {', '.join(missing)} (a run that failed or did not finish, or a run "
            "unpaired without it); rerun the same command to complete them"] if missing else []),
        "",
        "## Metrics per strategy",
        "",
        f"Mean over {len(seeds)} seed(s), with a 95% t-interval across seeds where there are two or more. Next-token "
        "accuracy: all pieces of the connective are the argmax (teacher-forced). Cloze: the original connective ranks "
        "first among all lexicon words (whole-verse or suffix-only log-likelihood). Log p: mean log-probability of "
        "the connective's pieces (nats). Loss: the held-out loss logged at the end of training. Loss after "
        f"connectives: the mean loss (nats) on the {args.context_k} tokens after each held-out connective with the "
        "connectives visible, with every held-out connective masked in the input, and the gap (masked - visible): "
        "what masking trains is reading on when a connective is hidden, so it should close the gap.",
    ]
    top1 = [evaluated[r.name]["next_token"]["accuracy"] for r in runs]
    if max(top1) < 0.005:
        lines += ["", "Note: top-1 next-token accuracy at connective positions is below 0.5% in every run: at this "
                  "training budget the models never rank a connective first there (they predict *and*, *the*, "
                  "punctuation), so the log p column carries the next-token comparison."]
    lines += ["", "| strategy | " + " | ".join(metrics) + " |", "|---" * (len(metrics) + 1) + "|"]
    for strategy in strategies:
        cells = []
        for get, scale, digits, bounds in metrics.values():
            values = [get(evaluated[f"{strategy}-seed{s}"], trained[f"{strategy}-seed{s}"]) for s in seeds]
            cells.append(_fmt_ci(*mean_ci(values), scale=scale, digits=digits, bounds=bounds))
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")

    scorers = first["cloze"]["scorers"]
    lines += [
        "",
        "## Baselines on the same cloze items",
        "",
        "Model-independent; trained on the runs' training split.",
        "",
        "| baseline | cloze accuracy % |",
        "|---|---|",
        f"| majority connective | {100 * scorers['majority']['accuracy']:.1f} |",
        "| majority given position (verse-initial / inside) | "
        f"{100 * scorers['positional_majority']['accuracy']:.1f} |",
        f"| Kneser-Ney token trigram, whole verse | {100 * scorers['kn3_verse']['accuracy']:.1f} |",
        f"| Kneser-Ney token trigram, suffix only | {100 * scorers['kn3_suffix']['accuracy']:.1f} |",
        f"| chance | {100 / first['cloze']['n_candidates']:.1f} |",
    ]
    scale = informative_scale(credit_matrix(BASELINE), credit_matrix(BASELINE, "kn3_verse"), args.bootstrap)
    lines += [*scale.lines(), "",
        f"## Decision: > {100 * PROCEED_AT:.0f}% improvement over `{BASELINE}`?",
        "",
        "Paired bootstrap over cloze items (whole-verse score, each item's credit averaged over seeds). "
        f"**proceed** if the 95% interval of `accuracy - {1 + PROCEED_AT:.2f} x baseline accuracy` lies above 0 "
        f"(for a baseline above 0: the relative improvement's interval lies above +{100 * PROCEED_AT:.0f}%), "
        "**do not proceed** if it lies at or below 0, **inconclusive** if it straddles 0. The seeds+items interval "
        "also resamples seeds (training noise); it is shown, not used for the decision.",
        "",
        f"| strategy | cloze acc. % | Δ vs {BASELINE} (points) [95% CI] | relative Δ [95% CI] "
        "| relative Δ, seeds+items | decision |",
        "|---|---|---|---|---|---|",
    ]
    base = credit_matrix(BASELINE)
    decisions = {}
    for strategy in strategies:
        if strategy == BASELINE:
            continue
        res = paired_bootstrap(credit_matrix(strategy), base, args.bootstrap)
        if not scale.informative:
            res.decision = NOT_INFORMATIVE
        decisions[strategy] = res
        rel = "n/a" if math.isnan(res.relative) else f"{100 * res.relative:+.1f}%"
        lines.append(
            f"| {strategy} | {100 * credit_matrix(strategy).mean():.1f} | {100 * res.diff:+.1f} "
            f"[{100 * res.diff_ci[0]:+.1f}, {100 * res.diff_ci[1]:+.1f}] | {rel} {_pct_interval(res.relative_ci)} | "
            f"{_pct_interval(res.seeds_relative_ci)} | **{res.decision}** |")
    lines.append(f"| {BASELINE} (baseline) | {100 * base.mean():.1f} | | | | |")
    lines += success_criteria_section(strategies, seeds, evaluated, decisions)

    lines += ["", "## Cloze accuracy by class and position (whole-verse score)", "",
              f"Mean over {len(seeds)} seed(s), with a 95% t-interval across seeds where there are two or more.", ""]
    groups = [("class", g) for g in first["cloze"]["scorers"]["model_verse"]["breakdowns"]["class"]]
    groups += [("position", g) for g in first["cloze"]["scorers"]["model_verse"]["breakdowns"]["position"]]
    lines += ["| strategy | " + " | ".join(f"{g} (n={scorers['model_verse']['breakdowns'][d][g]['n']})"
                                           for d, g in groups) + " |",
              "|---" * (len(groups) + 1) + "|"]
    for strategy in strategies:
        cells = [breakdown_cell([evaluated[f"{strategy}-seed{s}"] for s in seeds], dim, group) for dim, group in groups]
        lines.append(f"| {strategy} | " + " | ".join(cells) + " |")
    for name, scorer in (("KN trigram", "kn3_verse"), ("majority", "majority")):
        cells = [f"{100 * scorers[scorer]['breakdowns'][d].get(g, {}).get('accuracy', float('nan')):.1f}"
                 for d, g in groups]
        lines.append(f"| *{name}* | " + " | ".join(cells) + " |")

    lines += class_head_section(strategies, seeds, evaluated)
    lines += ["", "## Runs", "", "| run | steps | held-out loss | next-token % | cloze % (verse) | train s | eval s |",
              "|---|---|---|---|---|---|---|"]
    for r in runs:
        e, t = evaluated[r.name], trained[r.name]
        lines.append(f"| {r.name} | {t['summary'].get('steps', '?')} | "
                     f"{t['summary'].get('last_heldout_loss', float('nan')):.3f} | "
                     f"{100 * e['next_token']['accuracy']:.2f} | "
                     f"{100 * e['cloze']['scorers']['model_verse']['accuracy']:.1f} | {t.get('train_s', 0):.0f}"
                     f"{'*' if t.get('resumed') else ''} | {e.get('eval_s', 0):.0f} |")
    if any(trained[r.name].get("resumed") for r in runs):
        lines += ["", "\\* resumed after an interrupt: train s counts the last segment only."]
    lines += ["", f"Run directories: `{Path(args.out) / 'runs'}`; each holds eval.json with per-item credits.", ""]
    return "\n".join(lines)


# The figure of metrics per strategy: (title, value from a run's eval.json and train.done, display scale, the cloze
# scorer whose baselines are drawn)
FIGURE_METRICS = (
    ("next-token accuracy (%)", lambda e, t: e["next_token"]["accuracy"], 100, None),
    ("next-token mean log p (nats)", lambda e, t: e["next_token"]["mean_logprob"], 1, None),
    ("cloze accuracy, whole verse (%)", lambda e, t: e["cloze"]["scorers"]["model_verse"]["accuracy"], 100, "verse"),
    ("cloze accuracy, suffix only (%)", lambda e, t: e["cloze"]["scorers"]["model_suffix"]["accuracy"], 100, "suffix"),
    ("held-out loss (end of training)", lambda e, t: t["summary"].get("last_heldout_loss", float("nan")), 1, None),
)


def write_report_figures(runs: list[RunSpec], trained: dict[str, dict], evaluated: dict[str, dict],
                         out_dir: Path, prefix: str = "") -> str:
    """strategy_metrics.png (each metric per strategy: the mean over seeds with its 95% t-interval, every seed as a
    dot, the cloze baselines as lines) and learning_curves.png (genesis.plot's figure of every run) in `out_dir`,
    beside report.md (their names prefixed by `prefix`); returns the report's Markdown section that links them."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from genesis.plot import PlotError, plot_curves, read_curves

    strategies = list(dict.fromkeys(r.strategy for r in runs))
    seeds = list(dict.fromkeys(r.seed for r in runs))
    scorers = evaluated[runs[0].name]["cloze"]["scorers"]
    fig = Figure(figsize=(4.2 * len(FIGURE_METRICS), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    x = np.arange(len(strategies))
    for k, (title, get, scale, cloze) in enumerate(FIGURE_METRICS):
        ax = fig.add_subplot(1, len(FIGURE_METRICS), k + 1)
        for i, strategy in enumerate(strategies):
            values = [scale * get(evaluated[f"{strategy}-seed{s}"], trained[f"{strategy}-seed{s}"]) for s in seeds]
            mean, low, high = mean_ci(values)
            if scale == 100:  # an accuracy's t-interval can leave [0, 100] with few seeds; the truth cannot
                low, high = max(low, 0.0), min(high, 100.0)
            ax.errorbar([i], [mean], yerr=[[mean - low], [high - mean]], fmt="o", color=f"C{i % 10}", capsize=6,
                        markersize=7, lw=1.5)
            ax.scatter(np.full(len(values), i + 0.12), values, s=12, color=f"C{i % 10}", alpha=0.6)
        if cloze is not None:
            for name, scorer, style in (("KN trigram", f"kn3_{cloze}", "--"), ("majority", "majority", ":")):
                if scorer in scorers:
                    ax.axhline(scale * scorers[scorer]["accuracy"], color="gray", ls=style, lw=1, label=name)
            ax.legend(fontsize=7, loc="best")
        ax.set_xticks(x, strategies, rotation=20)
        ax.set_xlim(-0.5, len(strategies) - 0.5)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(f"Per strategy: mean over {len(seeds)} seed(s) with its 95% t-interval (dots: the seeds)",
                 fontsize=10)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_dir / f"{prefix}strategy_metrics.png", dpi=110)
    lines = ["", "## Figures", "", "Each metric per strategy: the mean over seeds with its 95% t-interval, every seed "
             "as a dot, and the cloze baselines (KN trigram, majority connective) as lines.", "",
             f"![metrics per strategy]({prefix}strategy_metrics.png)", ""]
    try:
        curves = [read_curves(str(r.run_dir)) for r in runs]
    except PlotError:  # a run without metrics.jsonl (a run directory from elsewhere): no curves
        return "\n".join(lines)
    for r, c in zip(runs, curves):
        c.label = r.name
    plot_curves(curves, out_dir / f"{prefix}learning_curves.png")
    lines += ["The runs' learning curves, from their metrics.jsonl (`python -m genesis.plot`).", "",
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
                   help="preceding verses given as cloze context (default 0)")
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
        report = build_report(shown, trained, evaluated, args, command, time.time() - t0, missing)
        report_path = Path(args.report) if args.report else Path(args.out) / "report.md"
        # beside a report named otherwise than report.md (docs/compare-NAME.md), the figures carry its name
        prefix = "" if report_path.name == "report.md" else f"{report_path.stem}-"
        report += write_report_figures(shown, trained, evaluated, report_path.parent, prefix)
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
