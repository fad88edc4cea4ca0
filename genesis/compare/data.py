"""What the report reads, gathered once: every run's per-item values on the items common to all runs, the item sets,
the metrics table that the report's tables and its figures share, and the realised masking rates."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .plan import BASELINE, CompareError, RunSpec
from .stats import BootstrapResult, holm_tests

ITEM_ID = re.compile(r"(?P<chapter>.+ \d+):\d+@\d+")  # "1 Samuel 3:4@10": book chapter:verse @ offset


def chapter_of(item_id: str) -> str:
    """The held-out chapter an item comes from: "Romans 5:1@0" -> "Romans 5" (book names may hold spaces and
    digits)."""
    match = ITEM_ID.fullmatch(item_id)
    if match is None:
        raise CompareError(f"item id {item_id!r}: expected 'Book chapter:verse@offset' (an eval.json of another kind?)")
    return match["chapter"]


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
CLOZE_VERSE = Metric("cloze acc. % (verse)", "cloze accuracy, whole verse (%)", "cloze", "model_verse", 100, 1,
                     UNIT_BOUNDS, "verse")
HELDOUT_LOSS = Metric("held-out loss", "held-out loss (end of training)", "run", "last_heldout_loss", 1, 3)
METRICS = (
    Metric("next-token acc. %", "next-token accuracy (%)", "next_token", "credit", 100, 2, UNIT_BOUNDS),
    Metric("next-token log p", "next-token mean log p (nats)", "next_token", "logprob", 1, 3),
    CLOZE_VERSE,
    Metric("cloze acc. % (suffix)", "cloze accuracy, suffix only (%)", "cloze", "model_suffix", 100, 1, UNIT_BOUNDS,
           "suffix"),
    HELDOUT_LOSS,
)
# the hidden link read at the readout position, on the cloze items: a frozen linear probe (every run) and the link
# head (runs that train one); eval.json's cloze scorers link_probe and link_head
LINK_PROBE = Metric("probe acc. %", "frozen link probe accuracy (%)", "cloze", "link_probe", 100, 1, UNIT_BOUNDS)
LINK_HEAD = Metric("link head acc. %", "link head accuracy (%)", "cloze", "link_head", 100, 1, UNIT_BOUNDS)


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

    def has_credit(self, strategy: str, scorer: str) -> bool:
        """Whether every run of the strategy credits the cloze scorer on every common item (link_head: runs with a
        link head; any scorer: eval.json files of the current format)."""
        return all(scorer in self._by_id[f"{strategy}-seed{s}"]["cloze"][i]["credit"] for s in self.seeds
                   for i in self.items["cloze"])

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



def reportable(runs: list[RunSpec], evaluated: dict[str, dict]) -> tuple[list[RunSpec], list[str]]:
    """The runs a report can pair (the seeds whose baseline run finished, the strategies that finished all of
    them) and the names of the runs it must leave out."""
    seeds = [r.seed for r in runs if r.strategy == BASELINE and r.name in evaluated]
    strategies = {r.strategy for r in runs}
    complete = {s for s in strategies if all(f"{s}-seed{seed}" in evaluated for seed in seeds)} if seeds else set()
    shown = [r for r in runs if r.strategy in complete and r.seed in seeds]
    return shown, [r.name for r in runs if r not in shown]
