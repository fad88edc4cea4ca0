"""Learning curves of several runs on one figure, from their metrics.jsonl.

    python -m genesis.plot runs/uniform runs/structural                     # writes learning_curves.png
    python -m genesis.plot runs/a runs/b runs/c --out /tmp/curves.png

Panels, each drawn where at least one run has two or more points of it: training loss (every log step), held-out
loss, and at each evaluation the held-out connectives' next-token accuracy and mean log p, and the class head's
held-out accuracy. A metric with one point per run (runs that evaluate only at the end) is no curve: it is printed as
a table instead, and where no metric has a curve no PNG is written. A run is labelled by its directory name (by its
path where two runs share a name). RUN is a run directory or its metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from genesis.errors import GenesisError, run_cli

METRICS = "metrics.jsonl"
# (record kind, key, panel title, y scale): the panels in reading order
PANELS = [
    ("train", "loss", "training loss", 1.0),
    ("eval", "heldout_loss", "held-out loss", 1.0),
    ("eval", "heldout_connective_accuracy", "held-out connectives: next-token accuracy (%)", 100.0),
    ("eval", "heldout_connective_logprob", "held-out connectives: mean log p", 1.0),
    ("eval", "heldout_class_accuracy", "held-out class head: accuracy at masked tokens (%)", 100.0),
]


class PlotError(GenesisError, ValueError):
    """A run that cannot be plotted, phrased as one line."""


@dataclass
class Curves:
    label: str
    path: Path
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)  # key -> (steps, values)


def read_curves(run: str) -> Curves:
    """The run's curves: for each PANELS key, the (step, value) pairs of the records that carry it."""
    path = Path(run)
    if path.is_dir():
        path = path / METRICS
    if not path.is_file():
        where = f"no {METRICS} in it" if path.parent.is_dir() and path.name == METRICS else "not found"
        raise PlotError(f"{run}: {where} (give a run directory or its {METRICS})")
    curves = Curves(label=path.parent.name, path=path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise PlotError(f"{path}: cannot read ({e})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise PlotError(f"{path}:{number}: not a JSON record (a damaged {METRICS}?)") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("step"), int):
            raise PlotError(f"{path}:{number}: not a Genesis metrics record (no integer step)")
        for kind, key, _, _ in PANELS:
            value = rec.get(key)
            if rec.get("kind") == kind and isinstance(value, (int, float)) and not isinstance(value, bool):
                steps, values = curves.series.setdefault(key, ([], []))
                steps.append(rec["step"])
                values.append(float(value))
    if not curves.series:
        raise PlotError(f"{path}: no training or evaluation records yet")
    return curves


def distinct_labels(runs: list[Curves]) -> None:
    """Runs sharing a directory name are labelled by their paths instead."""
    names = [r.label for r in runs]
    for r in runs:
        if names.count(r.label) > 1:
            r.label = str(r.path.parent)


def curve_panels(runs: list[Curves]) -> tuple[list[tuple], list[tuple]]:
    """The PANELS entries that some run has as a curve (two or more points), and those every run that has them has
    at one point only."""
    present = [p for p in PANELS if any(p[1] in r.series for r in runs)]
    curves = [p for p in present if any(len(r.series.get(p[1], ([], []))[0]) > 1 for r in runs)]
    return curves, [p for p in present if p not in curves]


def single_point_table(runs: list[Curves], panels: list[tuple]) -> str:
    """The one value per run of each of `panels`, as a plain-text table (run, step, value)."""
    width = max(len(r.label) for r in runs)
    lines = []
    for _, key, title, scale in panels:
        lines.append(f"{title}:")
        for r in runs:
            if key in r.series:
                (step,), (value,) = r.series[key]
                lines.append(f"  {r.label:<{width}}  step {step:>7,}  {value * scale:.4g}")
    return "\n".join(lines)


def plot_curves(runs: list[Curves], out: Path) -> Path | None:
    """One PNG with a panel per metric that some run has as a curve (`curve_panels`); None, and nothing written,
    where there is none. matplotlib's Agg backend (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels, _ = curve_panels(runs)
    if not panels:
        return None
    cols = 2 if len(panels) > 1 else 1
    rows = (len(panels) + cols - 1) // cols
    fig = Figure(figsize=(6.4 * cols, 3.8 * rows), layout="constrained")
    FigureCanvasAgg(fig)
    # colour, marker and dash pattern all differ by run: runs that coincide (0% accuracy early on) stay visible
    styles = [dict(color=f"C{i % 10}", marker="osD^vPX*"[i % 8], linestyle=("-", "--", "-.", ":")[i % 4])
              for i in range(len(runs))]
    handles = {}
    for i, (_, key, title, scale) in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1)
        for run, style in zip(runs, styles):
            if key in run.series:
                steps, values = run.series[key]
                (line,) = ax.plot(steps, [v * scale for v in values], label=run.label, linewidth=1.4,
                                  markersize=4 if len(steps) <= 30 else 0, markerfacecolor="none", **style)
                handles.setdefault(run.label, line)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if scale == 100.0:  # percentages: from just below 0 (a flat 0% line stays visible), not from -0.04
            top = max(ax.get_ylim()[1], 1.0)
            ax.set_ylim(-0.03 * top, top)
    fig.legend(list(handles.values()), list(handles), loc="outside upper center", ncols=min(len(handles), 4),
               fontsize=9, frameon=False)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    return out


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m genesis.plot", description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", metavar="RUN", help="run directories (or their metrics.jsonl)")
    p.add_argument("--out", default="learning_curves.png", help="the PNG to write (default learning_curves.png)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    return run_cli(lambda: _plot(args))


def _plot(args: argparse.Namespace) -> int:
    if not args.out.lower().endswith(".png"):
        raise PlotError(f"--out {args.out}: name a .png file")
    runs = [read_curves(run) for run in args.runs]
    distinct_labels(runs)
    out = plot_curves(runs, Path(args.out))
    _, single = curve_panels(runs)
    plural = "s" * (len(runs) != 1)
    print(f"wrote {out} ({len(runs)} run{plural})" if out else
          f"no curve to draw: every metric has one point per run ({len(runs)} run{plural}); no PNG written")
    if single:
        print(f"one point per run, not plotted:\n{single_point_table(runs, single)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
