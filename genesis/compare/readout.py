"""The report's sections on the hidden link read after the consequent: the link head and the frozen probe beside the
whole-verse cloze, the bar the readout strategy is held to, and what the probe says about each objective."""

from __future__ import annotations

import argparse

from .cells import diff_cell, fmt_ci, level_cell, p_cell, paired_cells, seed_cell, seed_paired
from .data import CLOZE_VERSE, HELDOUT_LOSS, LINK_HEAD, LINK_PROBE, Metric, ReportData
from .plan import BASELINE
from .stats import BootstrapResult, holm_tests, mean_ci

READOUT = "readout"  # the strategy the bar is set for: structural masking, the readout target and the link head
BAR_GAIN = 0.05  # the link head must reach 1.05 x the unmasked model's whole-verse cloze accuracy
LOSS_TOLERANCE = 0.02  # nats: the readout strategy's held-out loss may rise this much above the unmasked model's


def head_tests(data: ReportData, item_set: str, samples: int, own: bool) -> dict[str, BootstrapResult]:
    """Link head - whole-verse cloze, per strategy with a link head: against the same runs' cloze (own) or against
    the baseline's; chapter-clustered, Holm-corrected over those strategies. {} without items or heads."""
    heads = [s for s in data.strategies if data.has_credit(s, LINK_HEAD.field)]
    if not heads or not data.ids("cloze", item_set):
        return {}
    arms = {s: data.matrix(s, "cloze", LINK_HEAD.field, item_set) for s in heads}
    against = {s: data.matrix(s if own else BASELINE, "cloze", CLOZE_VERSE.field, item_set) for s in heads}
    return holm_tests(arms, against, data.units("cloze", item_set), samples, threshold=0.0)


def _probe_vs_cloze(data: ReportData, item_set: str, samples: int) -> dict[str, BootstrapResult]:
    """Frozen probe - whole-verse cloze of the same runs, every strategy; Holm-corrected over all of them."""
    arms = {s: data.matrix(s, "cloze", LINK_PROBE.field, item_set) for s in data.strategies}
    own = {s: data.matrix(s, "cloze", CLOZE_VERSE.field, item_set) for s in data.strategies}
    return holm_tests(arms, own, data.units("cloze", item_set), samples, threshold=0.0)


def _mean_cell(data: ReportData, metric: Metric, strategy: str, item_set: str) -> str:
    return fmt_ci(*mean_ci(data.values(metric, strategy, item_set)), scale=metric.scale, digits=metric.digits,
                  bounds=metric.bounds)


def link_section(data: ReportData, args: argparse.Namespace) -> list[str]:
    """Per strategy: the frozen probe's and the link head's accuracy beside the whole-verse cloze, and each paired
    against the same runs' cloze."""
    lines = ["", "## The hidden link after the consequent: link head and frozen probe beside the cloze", ""]
    if not all(data.has_credit(s, LINK_PROBE.field) for s in data.strategies):
        return lines + ["The eval.json files carry no frozen-probe credits (`cloze.scorers.link_probe`): no link "
                        "metrics in this report."]
    probe_info = (data.first.get("link") or {}).get("probe") or {}
    fitted_on = (f"{probe_info['n_train']:,} training occurrences, --probe-max-train {probe_info['max_train']}"
                 if "max_train" in probe_info and "n_train" in probe_info else "the training split")
    lines += ["On the cloze items, the item's connective masked and read at its readout position (the first clause "
              "stop or verse end after at least one word of what follows it): the frozen probe (a linear classifier "
              f"fitted on the final hidden states there of {fitted_on}; every run) and the link head (runs that "
              "train one) rank the item's candidate words; the whole-verse cloze is the LM's own. Mean over "
              f"{len(data.seeds)} seed(s) [95% t-interval]. Then each paired with the same runs' whole-verse cloze on "
              "the same items: Δ (points) with its chapter-clustered bootstrap interval at the Holm level of the "
              "strategy's rank (over the strategies in the column), p / Holm p, and the seed-paired Δ."]
    for item_set in data.sets:
        lines += ["", f"**{data.set_label(item_set)}**", ""]
        if not data.ids("cloze", item_set):
            lines.append("No cloze item in this set.")
            continue
        probe, head = _probe_vs_cloze(data, item_set, args.bootstrap), head_tests(data, item_set, args.bootstrap, True)
        lines += ["| strategy | cloze acc. % (verse) | probe acc. % | link head acc. % | Δ probe - cloze [CI] "
                  "| CI level | p / Holm p | seed-paired Δ | Δ link head - cloze [CI] | CI level | p / Holm p "
                  "| seed-paired Δ |", "|---" * 12 + "|"]
        for s in data.strategies:
            cells = [_mean_cell(data, m, s, item_set) for m in (CLOZE_VERSE, LINK_PROBE)]
            cells += [_mean_cell(data, LINK_HEAD, s, item_set) if s in head else "no link head", paired_cells(probe[s])]
            cells += [paired_cells(head[s])] if s in head else [""] * 4
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return lines


def _bar_unmeasured(data: ReportData) -> str | None:
    """Why the bar cannot be measured, or None."""
    if READOUT not in data.strategies:
        return f"No `{READOUT}` runs in this comparison: the bar is not measured."
    if not data.has_credit(READOUT, LINK_HEAD.field):
        return (f"The `{READOUT}` runs' eval.json files carry no link-head credits (`cloze.scorers.link_head`): the "
                "bar is not measured.")
    if not data.ids("cloze", data.decision_set):
        return "No cloze item: the bar is not measured."
    return None


def bar_verdict(data: ReportData, samples: int) -> dict | None:
    """The bar's three conditions on the decision's item set (the conjunctive items when tagged): the readout
    strategy's link head >= (1 + BAR_GAIN) x the baseline's whole-verse cloze (means over seeds and items); the
    Holm-corrected interval of their difference above 0; its held-out loss at most LOSS_TOLERANCE above the
    baseline's (mean over seeds; a lower loss passes). None where it cannot be measured (`_bar_unmeasured`)."""
    if _bar_unmeasured(data) is not None:
        return None
    item_set = data.decision_set
    head = float(data.matrix(READOUT, "cloze", LINK_HEAD.field, item_set).mean())
    cloze = float(data.matrix(BASELINE, "cloze", CLOZE_VERSE.field, item_set).mean())
    test = head_tests(data, item_set, samples, own=False)
    losses = {s: data.values(HELDOUT_LOSS, s, "all") for s in (READOUT, BASELINE)}
    loss_gap = float(mean_ci(losses[READOUT])[0] - mean_ci(losses[BASELINE])[0])
    conditions = {"ratio": head >= (1 + BAR_GAIN) * cloze, "interval": test[READOUT].diff_ci[0] > 0,
                  "loss": loss_gap <= LOSS_TOLERANCE}  # nan (a loss not logged) fails
    return {"item_set": item_set, "head": head, "cloze": cloze, "test": test[READOUT], "m": len(test),
            "losses": losses, "loss_gap": loss_gap, "conditions": conditions, "met": all(conditions.values())}


def bar_section(data: ReportData, args: argparse.Namespace) -> list[str]:
    """Whether the readout strategy's link head clears the bar, with the three numbers, either way."""
    lines = ["", f"## The bar: `{READOUT}`'s link head against `{BASELINE}`'s whole-verse cloze", "",
             f"Met when all three hold, on the held-out items of the {data.decision_set} set: (1) `{READOUT}`'s "
             f"link-head top-1 accuracy >= {1 + BAR_GAIN:.2f} x `{BASELINE}`'s whole-verse cloze accuracy on the "
             "same items (means over seeds and items); (2) the chapter-clustered paired bootstrap interval of their "
             "difference, Holm-corrected over the strategies with a link head (each against "
             f"`{BASELINE}`'s cloze), lies above 0; (3) `{READOUT}`'s held-out loss (end of training, mean over "
             f"seeds) is at most {LOSS_TOLERANCE} nats above `{BASELINE}`'s (a lower loss passes).", ""]
    why = _bar_unmeasured(data)
    if why is not None:
        return lines + [why]
    bar = bar_verdict(data, args.bootstrap)
    res, held = bar["test"], {True: "holds", False: "fails"}
    lines += ["| condition | measured | verdict |", "|---|---|---|",
              f"| (1) link head >= {1 + BAR_GAIN:.2f} x {BASELINE}'s cloze | {100 * bar['head']:.1f}% vs "
              f"{1 + BAR_GAIN:.2f} x {100 * bar['cloze']:.1f}% = {100 * (1 + BAR_GAIN) * bar['cloze']:.1f}% "
              f"| {held[bar['conditions']['ratio']]} |",
              f"| (2) corrected interval of the difference above 0 | Δ {diff_cell(res)} points at "
              f"{level_cell(res.alpha)} (Holm over m = {bar['m']}; p / Holm p {p_cell(res)}); seed-paired Δ "
              f"{seed_cell(res)} "
              f"| {held[bar['conditions']['interval']]} |",
              f"| (3) held-out loss at most {LOSS_TOLERANCE} nats above {BASELINE}'s | "
              f"{mean_ci(bar['losses'][READOUT])[0]:.3f} vs {mean_ci(bar['losses'][BASELINE])[0]:.3f}: "
              f"{bar['loss_gap']:+.3f} (seed-paired {seed_paired(*bar['losses'].values())}) "
              f"| {held[bar['conditions']['loss']]} |", ""]
    failed = [name for name, ok in bar["conditions"].items() if not ok]
    verdict = "**met**" if bar["met"] else f"**not met** (failed: {', '.join(failed)})"
    return lines + [f"The bar is {verdict}."]


def probe_section(data: ReportData, args: argparse.Namespace) -> list[str]:
    """The frozen probe per strategy against the baseline's probe, paired: how much of the link each objective leaves
    in the representation after the consequent."""
    if not all(data.has_credit(s, LINK_PROBE.field) for s in data.strategies):
        return []
    lines = ["", f"## What the probe says per objective: each strategy's probe against `{BASELINE}`'s", "",
             "The frozen probe's accuracy per strategy and Δ = strategy - baseline (points), chapter-clustered paired "
             "bootstrap at the Holm level of the strategy's rank (over the m strategies), p / Holm p, and the "
             "seed-paired Δ."]
    for item_set in data.sets:
        tests = data.tests("cloze", LINK_PROBE.field, item_set, args.bootstrap)
        lines += ["", f"**{data.set_label(item_set)}**", ""]
        if not data.ids("cloze", item_set):
            lines.append("No cloze item in this set.")
            continue
        lines += [f"| strategy | probe acc. % | Δ vs {BASELINE}'s probe [CI] | CI level | p / Holm p | seed-paired Δ |",
                  "|---|---|---|---|---|---|"]
        for s in data.strategies:
            paired = paired_cells(tests[s]) if s in tests else "(the baseline) | | |"
            lines.append(f"| {s} | {_mean_cell(data, LINK_PROBE, s, item_set)} | {paired} |")
    return lines
