"""The comparison's runs: the strategies, one RunSpec per (strategy, seed), and the run directory's record of the
settings it was trained and evaluated with (run.json, eval.json's compare_settings)."""

from __future__ import annotations

import argparse
import hashlib
import json
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from genesis.config import load_config, to_dict, to_toml
from genesis.errors import GenesisError
from genesis.evaluate import write_json
from genesis.runs import CHECKPOINT, RunError, flat_settings, read_checkpoint, unread_keys

# name -> the overrides that define it. The first entry is the baseline every other strategy is tested against.
STRATEGIES: dict[str, tuple[str, ...]] = {
    "none": ("masking.enabled=false",),
    "uniform": ("masking.enabled=true", "masking.strategy=uniform"),
    "weighted": ("masking.enabled=true", "masking.strategy=weighted"),
    "structural": ("masking.enabled=true", "masking.strategy=structural"),
    # the design notes' multi-task strategy: structural masking plus the connective-type head at masked positions
    "structural_head": ("masking.enabled=true", "masking.strategy=structural", "model.class_head=true"),
    # the hidden link named after what it links: the masker's readout target and a link head read after the consequent
    "readout": ("masking.enabled=true", "masking.strategy=structural", "masking.readout=true", "model.link_head=true"),
    "chain": ("masking.enabled=true", "masking.strategy=structural", "masking.chain=true"),
    "adaptive": ("masking.enabled=true", "masking.strategy=weighted", "masking.adaptive=true"),
    "random": ("masking.enabled=true", "masking.strategy=random", "masking.control_reference=structural"),
}
BASELINE = next(iter(STRATEGIES))


# CPU defaults, sized for a 2-core machine (denormals flushed, see main): 9 strategies x 3 seeds of 120 cpu.toml
# steps, each evaluated at every held-out slot and on 300 cloze items, each with up to 3 preceding verses of its
# chapter (so "Therefore" follows what it concludes). Held-out loss is evaluated once, at the end
# (training.eval_every=0). More steps, seeds or items: pass them, and expect proportionally longer.
DEFAULTS = {"config": "cpu.toml", "strategies": ",".join(STRATEGIES), "seeds": "1,2,3", "steps": 120,
            "max_items": 300, "context_verses": 3, "bootstrap": 2000}
RUN_OVERRIDES = ("training.eval_every=0",)  # applied to every run before the user's --set, so --set can undo them


class CompareError(GenesisError):
    """A problem with the comparison's settings or its output directory, phrased as one line."""


@dataclass
class RunSpec:
    strategy: str
    seed: int
    overrides: list[str]
    run_dir: Path

    @property
    def name(self) -> str:
        return f"{self.strategy}-seed{self.seed}"


def read_json(path: Path) -> dict | None:
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


# What an eval.json holds: 2 = items tagged conjunctive, masked context with the deletion variant; 3 = also the cloze
# scorers link_probe (every run) and link_head (runs with a link head); 4 = the probe fitted on up to 8,000 training
# occurrences (3: 2,000). An eval.json of another format is evaluated again rather than reported with fields missing
# or measured otherwise.
EVAL_FORMAT = 4


def eval_settings(args: argparse.Namespace) -> dict[str, Any]:
    return {"max_items": args.max_items, "context_verses": args.context_verses, "corpus": args.corpus,
            "context_k": args.context_k, "eval_format": EVAL_FORMAT}


def _same_settings(saved: dict, cfg, source: Path) -> bool:
    """Whether a config dict saved by an earlier invocation describes `cfg`'s run: the same value for every key it
    reads, a key it lacks counting as that key's default (added to Genesis since; the run had the default). A
    CompareError if the saved dict is damaged."""
    try:
        was = flat_settings(saved, source)
    except RunError as e:
        raise CompareError(f"{e}; remove the run directory or use another --out") from None
    now = flat_settings(to_dict(cfg))
    ignore = {"training.out_dir"} | unread_keys(was, now)
    return {k: v for k, v in was.items() if k not in ignore} == {k: v for k, v in now.items() if k not in ignore}


def check_run_dir(spec: RunSpec, args: argparse.Namespace):
    """The run's Config; the run directory is claimed for these settings (run.json), or must already hold them.

    run.json records the resolved config and its fingerprint. Where the fingerprint differs, the settings are
    compared key by key (keys Genesis added since count as their defaults); a run.json from before configs were
    recorded in it is compared through the config in its run's checkpoint, when there is one."""
    cfg = load_config(args.config, None, spec.overrides)
    fingerprint = _fingerprint(to_toml(cfg))
    info_path = spec.run_dir / "run.json"
    info = read_json(info_path)
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
