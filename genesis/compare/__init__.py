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
interrupted from its checkpoint; a run directory holding other settings is an error, never silently reused (a
head's settings count only while the head is on). The
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

The hidden link read after the consequent: each strategy's frozen probe and link head (where it trains one) beside
its whole-verse cloze, paired as above; the bar set for the `readout` strategy (its link head >= 1.05 x `none`'s
whole-verse cloze on the conjunctive items, the Holm-corrected interval of the difference above 0, its held-out loss
at most 0.02 nats above `none`'s), stated met or not met with the three numbers; and each strategy's probe against
`none`'s.

Adding a strategy is one line in STRATEGIES: a name and the --set overrides that define it.

The package, by concern: stats (intervals, the clustered bootstrap, Holm), plan (strategies, runs, run directories),
jobs (training processes, the evaluation thread, run_all), data (what the report reads, the metrics table), cells and
report (the Markdown sections), readout (the link sections and the bar), figures, cli (the options and main;
`python -m genesis.compare` runs it).
"""

from .cells import breakdown_cell
from .cli import leave, main, parse_args
from .data import CONTROL, ITEM_SETS, METRICS, NO_TOP1_BELOW, Metric, ReportData, chapter_of, reportable, run_rates
from .figures import figure_metrics, write_report_figures
from .jobs import (
    Evaluation,
    Training,
    evaluate_run,
    finish_training,
    reusable_eval,
    run_all,
    start_training,
    stop_training,
    train_command,
)
from .plan import (
    BASELINE,
    DEFAULTS,
    EVAL_FORMAT,
    RUN_OVERRIDES,
    STRATEGIES,
    CompareError,
    RunSpec,
    check_run_dir,
    eval_settings,
    plan_runs,
)
from .readout import BAR_GAIN, LOSS_TOLERANCE, READOUT, bar_verdict
from .report import NOT_INFORMATIVE, ScaleCheck, build_report, informative_scale
from .stats import (
    ALPHA,
    PROCEED_AT,
    BootstrapResult,
    PairedDraws,
    bootstrap_p,
    bootstrap_result,
    holm_adjust,
    holm_alphas,
    holm_tests,
    mean_ci,
    paired_bootstrap,
    paired_draws,
    percentile_interval,
    resample_counts,
    t_quantile,
)

__all__ = [
    "ALPHA", "BAR_GAIN", "BASELINE", "CONTROL", "DEFAULTS", "EVAL_FORMAT", "ITEM_SETS", "LOSS_TOLERANCE", "METRICS",
    "NOT_INFORMATIVE", "NO_TOP1_BELOW", "PROCEED_AT", "READOUT", "RUN_OVERRIDES", "STRATEGIES", "BootstrapResult",
    "CompareError", "Evaluation", "Metric", "PairedDraws", "ReportData", "RunSpec", "ScaleCheck", "Training",
    "bar_verdict", "bootstrap_p", "bootstrap_result", "breakdown_cell", "build_report", "chapter_of", "check_run_dir",
    "eval_settings", "evaluate_run", "figure_metrics", "finish_training", "holm_adjust", "holm_alphas", "holm_tests",
    "informative_scale", "leave", "main", "mean_ci", "paired_bootstrap", "paired_draws", "parse_args",
    "percentile_interval", "plan_runs", "reportable", "resample_counts", "reusable_eval", "run_all", "run_rates",
    "start_training", "stop_training", "t_quantile", "train_command", "write_report_figures",
]
