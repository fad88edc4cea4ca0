"""Cloze scoring with context, timed: the evaluation without context (every candidate sequence run in full,
--context-verses 0) against the prefix-cached scorer with up to 3 preceding verses, on one trained run.

    python bench/eval_context.py --checkpoint runs/cpu
    python bench/eval_context.py --checkpoint /tmp/ctx-run --max-items 300 --repeats 5 --json eval-context.json

Times the cloze-model stage only (`genesis.evaluate.scorers.score_cloze_model`), the one stage that context makes
longer: the items, the baselines and the other metrics are built or skipped outside the timer. A case is
`path:verses` (path "full": every candidate sequence in full, the default scorer and the reference; "prefix": each
item's left context run once, its keys and values reused by every candidate). Checks before it times: on the items
of every verse count timed with "prefix", the prefix scorer gives the full scorer's scores within
PREFIX_PATH_TOLERANCE of the model's dtype and the same picks; it exits 1 and times nothing otherwise. Then
`--repeats` rounds, each running every case once, the order rotated round by round (a shared machine's slow
spells fall on every case alike); medians with [min, max]. Timings are reported, never asserted.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from bench.common import machine_info, markdown_table, write_json  # noqa: E402
from genesis.config import ConfigError  # noqa: E402
from genesis.corpus import CorpusError  # noqa: E402
from genesis.device import flushed_denormals, keep_freed_memory  # noqa: E402
from genesis.evaluate.pipeline import build_context  # noqa: E402
from genesis.evaluate.run import EvalError, load_run, model_max_len, resolve_device  # noqa: E402
from genesis.evaluate.scorers import DEFAULT_BATCH_TOKENS, PREFIX_PATH_TOLERANCE, score_cloze_model  # noqa: E402
from genesis.runs import RunError  # noqa: E402

PATHS = ("full", "prefix")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="a run's checkpoint.pt or its directory")
    p.add_argument("--cases", default="full:0,prefix:3,full:3",
                   help="comma-separated path:verses; the first is the baseline of the ratios "
                        "(default full:0,prefix:3,full:3)")
    p.add_argument("--max-items", type=int, default=0, help="cloze items, spread evenly (default 0: all)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds (default 5)")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (default 1)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto (default cpu)")
    p.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS, help="tokens per forward pass")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    try:
        args.cases = [(path, int(verses)) for path, verses in (c.split(":") for c in args.cases.split(","))]
    except ValueError:
        p.error(f"--cases: expected path:verses items, e.g. full:0,prefix:3 (got {args.cases!r})")
    if any(path not in PATHS or verses < 0 for path, verses in args.cases):
        p.error(f"--cases: paths are {', '.join(PATHS)} and verses >= 0 (got {args.cases})")
    if args.max_items < 0 or args.repeats < 1 or args.threads < 1 or args.batch_tokens < 1:
        p.error("--max-items must be >= 0, --repeats, --threads and --batch-tokens >= 1")
    return args


def tokens_run(cloze, path: str) -> int:
    """Tokens through the model's trunk: every sequence in full, or each prefix once plus the candidates' tails."""
    lengths = cloze.lengths()
    if path == "full":
        return int(lengths.sum())
    K = cloze.n_candidates
    answer_seq = np.arange(len(cloze.items)) * K + cloze.answer
    shared = cloze.prefix_shared
    tails = lengths[shared] - 1 - cloze.blank_start[shared]
    return int(cloze.blank_start[answer_seq].sum() + tails.sum() + lengths[~shared].sum())


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        return bench(args, argv)
    except (ConfigError, CorpusError, RunError, EvalError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def bench(args: argparse.Namespace, argv) -> int:
    torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    keep_freed_memory(device)  # as `python -m genesis.evaluate` does
    run = load_run(args.checkpoint, device)
    dtype = next(run.model.parameters()).dtype
    max_len = model_max_len(run.model)
    load_start = os.getloadavg()
    clozes = {verses: build_context(run.cfg, run.tokenizer, max_len, max_items=args.max_items, context_verses=verses,
                                    say=lambda *_: None).cloze
              for verses in dict.fromkeys(v for _, v in args.cases)}

    def score(path: str, verses: int):
        return score_cloze_model(run.model, clozes[verses], device, args.batch_tokens, progress=False, path=path)

    with flushed_denormals():
        checks = {}
        for verses in sorted({v for path, v in args.cases if path == "prefix"}):
            full, prefix = score("full", verses), score("prefix", verses)
            tolerance = PREFIX_PATH_TOLERANCE[dtype]
            pairs = ((full.verse, prefix.verse), (full.suffix, prefix.suffix))
            diff = max(float(np.abs(a - b).max()) for a, b in pairs)
            # a pick may change only where the reference's best two are closer than the two paths can differ
            margins = [np.diff(np.sort(a, axis=1)[:, -2:], axis=1)[:, 0] for a, _ in pairs]
            same = all(np.array_equal(a.argmax(1)[m > 2 * tolerance], b.argmax(1)[m > 2 * tolerance])
                       for (a, b), m in zip(pairs, margins))
            changed = sum(int((a.argmax(1) != b.argmax(1)).sum()) for a, b in pairs)
            checks[verses] = {"max_abs_diff_nats": diff, "tolerance_nats": tolerance, "picks_changed": changed,
                              "ok": same and diff <= tolerance}
            print(f"check, {verses} verses: prefix vs full scores within {diff:.2e} nats (tolerance {tolerance:.0e}), "
                  f"{changed} picks of {2 * len(full.verse)} changed" + ("" if same else ", beyond a near-tie"))
        if not all(c["ok"] for c in checks.values()):
            print("check failed: nothing timed", file=sys.stderr)
            return 1
        for path, verses in args.cases:  # warm-up: one untimed run of each
            score(path, verses)
        times: dict[tuple[str, int], list[float]] = {case: [] for case in args.cases}
        for r in range(args.repeats):
            for case in args.cases[r % len(args.cases):] + args.cases[: r % len(args.cases)]:
                t0 = time.perf_counter()
                score(*case)
                times[case].append(time.perf_counter() - t0)
    load_end = os.getloadavg()

    base = statistics.median(times[args.cases[0]])
    rows = []
    for path, verses in args.cases:
        cloze, t = clozes[verses], times[(path, verses)]
        rows.append({"path": path, "context_verses": verses, "items": len(cloze.items),
                     "sequences": len(cloze.tokens), "tokens_run": tokens_run(cloze, path), "times_s": t,
                     "median_s": statistics.median(t), "min_s": min(t), "max_s": max(t),
                     "ratio": statistics.median(t) / base})
    print(f"\ncloze-model scoring only, {run.checkpoint} (step {run.step}), {device}, {args.threads} thread(s), "
          f"{args.repeats} rounds; load {load_start[0]:.2f} -> {load_end[0]:.2f}")
    print(markdown_table(
        ("scorer", "context verses", "items", "sequences", "tokens run (unpadded)", "s median [min, max]", "ms/item",
         "x first"),
        ((row["path"], row["context_verses"], f"{row['items']:,}", f"{row['sequences']:,}", f"{row['tokens_run']:,}",
          f"{row['median_s']:.2f} [{row['min_s']:.2f}, {row['max_s']:.2f}]",
          f"{1000 * row['median_s'] / row['items']:.1f}", f"{row['ratio']:.2f}") for row in rows)))
    if args.json:
        out = {"command": "python bench/eval_context.py " + " ".join(argv if argv is not None else sys.argv[1:]),
               "checkpoint": str(run.checkpoint), "run_identity": run.identity, "device": str(device),
               "dtype": str(dtype), "threads": args.threads, "batch_tokens": args.batch_tokens,
               "max_items": args.max_items, "repeats": args.repeats, "machine": machine_info(device),
               "load_1min": [load_start[0], load_end[0]], "checks": checks, "cases": rows}
        if write_json(args.json, out):
            print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
