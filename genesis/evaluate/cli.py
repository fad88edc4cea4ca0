"""Connective evaluation of a trained run: next-token accuracy, cloze ranking, the link metric, baselines and plots.

    python -m genesis.evaluate --checkpoint runs/cpu/checkpoint.pt                  # the KJV held-out chapters
    python -m genesis.evaluate --checkpoint runs/cpu/checkpoint.pt --corpus asv     # same chapters, ASV wording
    python -m genesis.evaluate --checkpoint runs/cpu/checkpoint.pt --max-items 300 --out /tmp/eval --json /tmp/e.json
    python -m genesis.evaluate --checkpoint runs/cpu --max-items 300 --lm-eval-task runs/cpu/lm-eval-task

Writes OUT/eval.json (or --json), OUT/hardest_connectives.png, OUT/accuracy_by_clause_length.png,
OUT/confusion.png and OUT/accuracy_by_genre.png (and OUT/class_head_confusion.png for a model with a class head),
and prints the tables. OUT defaults to <run dir>/eval-<corpus>-<split>. With --lm-eval-task DIR it scores nothing and
writes the same cloze items as a local lm-evaluation-harness task instead (`genesis.evaluate.lm_eval_task`), and
prints the lm_eval command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from genesis.console import note
from genesis.device import flushed_denormals
from genesis.distributed import refuse_several_processes
from genesis.errors import check_at_least, run_cli
from genesis.evaluate.link_metric import PROBE_MAX_TRAIN
from genesis.evaluate.lm_eval_task import export_task
from genesis.evaluate.pipeline import evaluate_checkpoint
from genesis.evaluate.report import format_tables, write_json, write_plots
from genesis.evaluate.run import EvalError
from genesis.evaluate.scorers import DEFAULT_BATCH_TOKENS, DEFAULT_CONTEXT_K


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m genesis.evaluate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True,
                   help="a run's checkpoint.pt or a kept checkpoint-<step>.pt, or the run directory")
    p.add_argument("--corpus", help="kjv, asv or a corpus file (default: the run's corpus); split by the run's rules")
    p.add_argument("--split", default="heldout", choices=("heldout", "train"), help="which chapters (default heldout)")
    p.add_argument("--out", help="directory for eval.json and the plots (default <run dir>/eval-<corpus>-<split>)")
    p.add_argument("--json", help="where to write the JSON (default OUT/eval.json)")
    p.add_argument("--max-items", type=int, default=0, help="cap the cloze items, spread evenly (default 0: all)")
    p.add_argument("--context-verses", type=int, default=3,
                   help="up to this many preceding verses of the chapter as cloze context, as many as fit in the "
                        "model's seq_len with the verse (default 3; 0: the verse alone)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS, help="tokens per forward pass")
    p.add_argument("--context-k", type=int, default=DEFAULT_CONTEXT_K,
                   help=f"tokens after each connective for the masked-context loss (default {DEFAULT_CONTEXT_K})")
    p.add_argument("--probe-max-train", type=int, default=PROBE_MAX_TRAIN,
                   help=f"training occurrences the frozen link probe is fitted on, spread evenly over the training "
                        f"split (default {PROBE_MAX_TRAIN}; 0 = all)")
    p.add_argument("--lm-eval-task", metavar="DIR",
                   help="write the cloze items as lm-eval tasks genesis_cloze_all / genesis_cloze_conjunctive in DIR "
                        "(a YAML and a JSONL each) and print the lm_eval command, instead of evaluating")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with flushed_denormals():
        return _main(args, argv)


def _main(args: argparse.Namespace, argv) -> int:
    def body() -> int:
        refuse_several_processes("python -m genesis.evaluate")
        check_at_least(args, {"max_items": 0, "context_verses": 0, "probe_max_train": 0, "batch_tokens": 1,
                              "context_k": 1}, EvalError)
        if args.lm_eval_task:
            return _write_lm_eval_task(args)
        result, ctx = evaluate_checkpoint(args.checkpoint, args.corpus, args.split, args.max_items,
                                          args.context_verses, args.device, args.batch_tokens, not args.quiet,
                                          context_k=args.context_k, probe_max_train=args.probe_max_train)
        result["command"] = "python -m genesis.evaluate " + " ".join(argv if argv is not None else sys.argv[1:])
        run_dir = Path(result["checkpoint"]).parent
        corpus_name = Path(ctx.corpus).stem if ctx.corpus.lower() not in ("kjv", "asv") else ctx.corpus.lower()
        # a kept step checkpoint (checkpoint-<step>.pt) has its own folder: a learning curve keeps every point
        step = "" if Path(result["checkpoint"]).name == "checkpoint.pt" else f"-step{result['step']}"
        out_dir = Path(args.out) if args.out else run_dir / f"eval-{corpus_name}-{args.split}{step}"
        json_path = Path(args.json) if args.json else out_dir / "eval.json"
        plots = [] if args.no_plots else write_plots(result, out_dir)
        result["plots"] = [str(p) for p in plots]
        write_json(result, json_path)
        print(format_tables(result))
        print(f"\nwrote {json_path}" + "".join(f"\nwrote {p}" for p in plots))
        return 0

    try:
        return run_cli(body)
    except KeyboardInterrupt:
        return 130


def _write_lm_eval_task(args: argparse.Namespace) -> int:
    info = export_task(args.checkpoint, args.lm_eval_task, args.corpus, args.split, args.max_items,
                       args.context_verses, note if not args.quiet else lambda _: None)
    counts = ", ".join(f"{n:,} {name}" for name, n in info["n_items"].items())
    left = f"; left out, lm-eval would see other tokens: {info['left_out']}" if info["left_out"] else ""
    print(f"cloze items: {counts}{left}")
    print("".join(f"wrote {f}\n" for f in info["files"]), end="")
    print(f"the verse separator \"\\n\" is token {info['prefix_token_id']}: lm-eval's prefix_token_id for the "
          "items that open a chapter")
    print(f"run it on this run exported (python -m genesis.export --checkpoint {args.checkpoint} --out "
          f"{info['model_dir']}), or on any transformers model:")
    print(info["command"])
    return 0
