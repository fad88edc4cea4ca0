"""The comparison's Markdown report: one function per section, every number from ReportData."""

from __future__ import annotations

import argparse
import math
import os
import platform
import shlex
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

from genesis.config import load_config
from genesis.masking import connectives_of

from .cells import (
    accuracy_cell,
    breakdown_cell,
    diff_cell,
    fmt_ci,
    level_cell,
    p_cell,
    paired_cells,
    pct_interval,
    seed_cell,
    seed_paired,
)
from .data import CONTROL, METRICS, NO_TOP1_BELOW, UNIT_BOUNDS, ReportData, run_rates
from .plan import BASELINE, RUN_OVERRIDES, STRATEGIES
from .readout import bar_section, link_section, probe_section
from .stats import PROCEED_AT, BootstrapResult, mean_ci, paired_bootstrap

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
        cells = [accuracy_cell([r["accuracy"] for r in results])]
        cells += [accuracy_cell([r["breakdowns"]["class"].get(c, {}).get("accuracy", float("nan")) for r in results])
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
        f"{args.max_items} --context-verses {args.context_verses} --context-k {args.context_k} --probe-max-train "
        f"{args.probe_max_train} --bootstrap {args.bootstrap} --out {args.out}"
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
            cells = [fmt_ci(*mean_ci(data.values(m, strategy, item_set)), scale=m.scale, digits=m.digits,
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
                f"{diff_cell(res)} | {rel} {pct_interval(res.relative_ci)} | {pct_interval(res.seeds_relative_ci)}"
                f" | {level_cell(res.alpha)} | {p_cell(res)} | {seed_cell(res)} | **{res.decision}** |")
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
            lines.append(f"| {strategy} | {paired_cells(logp[strategy], 1, 3)} | "
                         f"{paired_cells(accuracy[strategy], 100, 2)} |")
    return lines


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
        cells = [fmt_ci(*mean_ci(per_seed(strategy, key)), scale=1, digits=3) for key in ("visible_loss",
                                                                                             "masked_loss", "gap")]
        for gap in gaps:
            if gap == "deletion_gap":
                cells += [fmt_ci(*mean_ci(per_seed(strategy, k)), scale=1, digits=3) for k in ("deleted_loss", gap)]
            cells += ["" if strategy == c else seed_paired(per_seed(strategy, gap), per_seed(c, gap))
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
        cells = [fmt_ci(*mean_ci([r[key] for r in rates]), scale=scale, digits=1, bounds=bounds)
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
    lines += link_section(data, args)
    lines += bar_section(data, args)
    lines += probe_section(data, args)
    lines += masked_context_section(data, args)
    lines += rates_section(data, args)
    lines += success_criteria_section(data.strategies, data.seeds, data.evaluated, decisions[chosen])
    lines += breakdown_section(data)
    lines += class_head_section(data.strategies, data.seeds, data.evaluated)
    lines += runs_section(data, args)
    return "\n".join(lines)
