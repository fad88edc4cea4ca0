"""Compare masking strategies: train each over several seeds, evaluate every run, write a Markdown report.

The command line of `python -m genesis.compare` (see the package's docstring): its options, and main, which plans the
runs, trains and evaluates them, and writes the report and its figures.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import threading
import time
from pathlib import Path

from genesis.device import flushed_denormals
from genesis.distributed import Interrupted, handle_interrupts, refuse_several_processes
from genesis.errors import check_at_least, run_cli
from genesis.evaluate import DEFAULT_CONTEXT_K, PROBE_MAX_TRAIN, resolve_device

from .data import ReportData, reportable
from .figures import write_report_figures
from .jobs import run_all
from .plan import BASELINE, DEFAULTS, STRATEGIES, CompareError, plan_runs
from .report import build_report


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
    p.add_argument("--probe-max-train", type=int, default=PROBE_MAX_TRAIN,
                   help=f"training occurrences the frozen link probe is fitted on, spread evenly (default "
                        f"{PROBE_MAX_TRAIN}; 0 = all)")
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
    # denormal floats slow x86 CPUs down (genesis.device.flushed_denormals); every strategy runs under the same setting
    with flushed_denormals():
        return _main(args, command)


def _main(args: argparse.Namespace, command: str) -> int:
    t0 = time.time()

    def body() -> int:
        refuse_several_processes("python -m genesis.compare")
        check_at_least(args, {"steps": 0, "max_items": 0, "context_verses": 0, "probe_max_train": 0, "bootstrap": 100,
                              "jobs": 1, "context_k": 1}, CompareError)
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
        return 0

    try:
        return run_cli(body)  # a broken pipe too (`| head`, a closed log): finished runs are kept
    except Interrupted as e:
        print(f"\ninterrupted ({e}): finished runs are kept; rerun the same command to continue", file=sys.stderr)
        return 128 + e.signum
    except KeyboardInterrupt:
        print("\ninterrupted: finished runs are kept; rerun the same command to continue", file=sys.stderr)
        return 130


def script() -> None:
    """The genesis-compare console script: main, then leave (as `python -m genesis.compare` does)."""
    leave(main())


def leave(code: int) -> None:
    """Exit with `code`. An evaluation still running in its thread (after an interrupt) would have the interpreter
    torn down under it, which aborts in torch's native code ("terminate called without an active exception", status
    -6 instead of 130): then the process leaves at once, its output flushed (eval.json is written atomically)."""
    if any(t.daemon and t.is_alive() for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    sys.exit(code)
