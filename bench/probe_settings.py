"""The frozen link probe's settings, checked on one trained run: the probe refitted with other limits on its training
occurrences and its L-BFGS iterations, each setting's held-out accuracy (all items and the conjunctive set) and how
many item picks differ from the first setting's.

    python bench/probe_settings.py --checkpoint runs/compare-research_cpu/runs/none-seed1
    python bench/probe_settings.py --checkpoint RUN --settings 2000:300,8000:300 --json probe-settings.json

A setting is `occurrences:iterations`. Each runs `genesis.evaluate.evaluate_checkpoint` (every held-out item, 3
context verses, as the comparison evaluates) with its `probe_max_train` and
`genesis.evaluate.link_metric.fit_probe` given those limits; nothing is written to the run.
"""

from __future__ import annotations

import argparse
import functools
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from bench.common import check_json_path, machine_info, markdown_table, write_json  # noqa: E402
from genesis.errors import GenesisError, error_line  # noqa: E402


def parse_settings(text: str) -> list[tuple[int, int]]:
    settings = []
    for part in text.split(","):
        try:
            occurrences, iterations = (int(v) for v in part.split(":"))
        except ValueError:
            raise ValueError(f"--settings: {part!r} is not occurrences:iterations (e.g. 2000:300)") from None
        if occurrences < 1 or iterations < 1:
            raise ValueError(f"--settings: {part!r}: both must be >= 1")
        settings.append((occurrences, iterations))
    return settings


def probe_with(checkpoint: str, occurrences: int, iterations: int, context_verses: int, max_items: int = 0) -> dict:
    """The evaluation's link_probe entry with the probe fitted under these limits, and its per-item credits."""
    import genesis.evaluate.link_metric as link_metric
    from genesis.evaluate import evaluate_checkpoint

    fit = link_metric.fit_probe
    link_metric.fit_probe = functools.partial(fit, max_iter=iterations)
    try:
        result, _ = evaluate_checkpoint(checkpoint, None, "heldout", max_items, context_verses, "cpu", progress=False,
                                        probe_max_train=occurrences)
    finally:
        link_metric.fit_probe = fit
    probe, fitted = result["cloze"]["scorers"]["link_probe"], result["link"]["probe"]
    return {"occurrences": occurrences, "max_iter": iterations, "n_train": fitted["n_train"],
            "iterations": fitted["iterations"], "train_loss": fitted["train_loss"], "accuracy": probe["accuracy"],
            "conjunctive": probe["sets"]["conjunctive"]["accuracy"],
            "credit": [item["credit"]["link_probe"] for item in result["items"]["cloze"]]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--checkpoint", required=True, help="a run directory or its checkpoint.pt")
    p.add_argument("--settings", default="2000:300,2000:900,4000:300,8000:300,16000:300",
                   help="comma-separated occurrences:iterations")
    p.add_argument("--context-verses", type=int, default=3)
    p.add_argument("--max-items", type=int, default=0, help="held-out cloze items (0: all, as the comparison)")
    p.add_argument("--json", help="write the rows and machine info as JSON")
    args = p.parse_args(argv)
    try:
        settings = parse_settings(args.settings)
    except ValueError as e:
        p.error(str(e))
    check_json_path(p, args.json)
    try:
        rows = [probe_with(args.checkpoint, n, i, args.context_verses, args.max_items) for n, i in settings]
    except GenesisError as e:
        print(error_line(e), file=sys.stderr)
        return 2
    first = np.array(rows[0]["credit"])
    for row in rows:
        row["picks_changed"] = int((np.array(row.pop("credit")) != first).sum())
    print(markdown_table(["occurrences", "iterations (cap)", "accuracy %", "conjunctive %", "training loss",
                          "picks changed"],
                         [[r["n_train"], f"{r['iterations']} ({r['max_iter']})", f"{100 * r['accuracy']:.1f}",
                           f"{100 * r['conjunctive']:.1f}", f"{r['train_loss']:.3f}", r["picks_changed"]]
                          for r in rows]))
    if args.json:
        write_json(args.json, {"machine": machine_info("cpu"), "checkpoint": args.checkpoint, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
