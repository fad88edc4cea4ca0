"""The report's figures: each metric of the metrics table per strategy, and the runs' learning curves."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .data import METRICS, NO_TOP1_BELOW, Metric, ReportData
from .stats import mean_ci


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
