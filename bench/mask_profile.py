"""Where a torch-path masking call spends its time: torch.profiler over the masker's public call (aten ops by self
time and input shapes, split into ops over the full (B, T) batch and ops over the candidates and tables), and the
two public layouts of the torch path (`genesis.masking.mask_torch`, sparse and dense) timed directly on the same
batch.

    python bench/mask_profile.py                                   # CPU, 64x1024, structural
    python bench/mask_profile.py --device cuda --size 1024x1024 --json profile.json

`bench/mask_throughput.py --profile` runs the same profile after its table. The profiler itself adds a little time
per op: the unprofiled median is the call's cost.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    check_json_path,
    log,
    machine_info,
    parse_size,
    set_up_torch,
    source_hashes,
    sync,
    write_json,
)
from bench.workloads import DATA_SEED, STRATEGIES, make_masker, make_workload  # noqa: E402
from genesis.config import load_config  # noqa: E402
from genesis.data import Batch, prepare  # noqa: E402
from genesis.masking import ConnectiveMasker, mask_torch  # noqa: E402

LAYOUTS = ("sparse", "dense")


def median_ms(fn, calls: int, device: str) -> float:
    """Median wall ms of `fn(i)` over `calls` calls, host-synchronised."""
    walls = []
    for i in range(calls):
        sync(device)
        t0 = time.perf_counter()
        fn(i)
        sync(device)
        walls.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(walls))


def layout_times(masker: ConnectiveMasker, batch: Batch, calls: int, device: str) -> list[dict]:
    """Each public layout of the torch path on the batch (warmed up first): median ms per call."""
    tables = masker.tables(device)
    rows = []
    for layout in LAYOUTS:
        def call(i: int, layout=layout) -> None:
            mask_torch(batch.x, batch.verse_start, tables, masker.seed, i, masker.rank, 0, layout=layout)

        for i in range(3):
            call(i)
        rows.append({"layout": layout, "ms_median": median_ms(call, max(calls, 5), device)})
    return rows


def profile_torch_path(masker: ConnectiveMasker, batch: Batch, calls: int, device: str) -> dict:
    """torch.profiler over `calls` masker calls, per call, each inside record_function("masker"); with the
    unprofiled median of the call and the layouts timed directly (layout_times)."""
    from torch.profiler import ProfilerActivity, profile, record_function

    def call(i: int) -> None:
        masker(batch.x, step=i, verse_start=batch.verse_start)

    for i in range(3):
        call(i)
    unprofiled = median_ms(call, max(calls, 5), device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    with profile(activities=activities, record_shapes=True) as prof:
        t0 = time.perf_counter()
        for i in range(calls):
            with record_function("masker"):
                call(i)
        sync(device)
        profiled_ms = (time.perf_counter() - t0) * 1e3 / calls
    n_tokens = batch.x.numel()
    ops = [e for e in prof.key_averages(group_by_input_shape=True) if e.key.startswith("aten::")]

    def full_batch(e) -> bool:  # an input as large as the batch: work proportional to B*T
        return any(shape and math.prod(shape) >= n_tokens for shape in (e.input_shapes or []))

    def group(selected) -> dict:
        return {"op_calls": sum(e.count for e in selected) / calls,
                "self_ms": sum(e.self_cpu_time_total for e in selected) / calls / 1e3}

    top = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {
        "calls": calls, "shape": list(batch.x.shape), "impl": masker.impl(batch.x.device),
        "unprofiled_ms_median": unprofiled, "profiled_ms": profiled_ms, "aten": group(ops),
        "full_batch_ops": group([e for e in ops if full_batch(e)]),
        "candidate_ops": group([e for e in ops if not full_batch(e)]),
        "layouts": layout_times(masker, batch, calls, device),
        "top_ops": [{"name": e.key, "shapes": [list(x) for x in (e.input_shapes or []) if x],
                     "calls": e.count / calls, "self_ms": e.self_cpu_time_total / calls / 1e3,
                     "us_per_op": e.self_cpu_time_total / max(e.count, 1)} for e in top],
    }


def print_profile(prof: dict) -> None:
    a, f, c = prof["aten"], prof["full_batch_ops"], prof["candidate_ops"]
    print(f"\ntorch path profile, {prof['shape'][0]}x{prof['shape'][1]} {prof.get('strategy', '')}, per call: "
          f"{prof['unprofiled_ms_median']:.2f} ms unprofiled (median), {prof['profiled_ms']:.2f} ms profiled")
    print(f"  aten ops: {a['op_calls']:.0f} calls, {a['self_ms']:.2f} ms self | over the full batch: "
          f"{f['op_calls']:.0f} calls, {f['self_ms']:.2f} ms | over candidates and tables: {c['op_calls']:.0f} calls, "
          f"{c['self_ms']:.2f} ms | outside aten ops (Python, numpy, profiler): "
          f"{prof['profiled_ms'] - a['self_ms']:.2f} ms")
    print("  layouts (mask_torch, unprofiled median): "
          + ", ".join(f"{r['layout']} {r['ms_median']:.2f} ms" for r in prof["layouts"]))
    print(f"  {'aten op':<26} {'input shapes':<34} {'calls':>5} {'self ms':>8} {'us/op':>7}")
    for op in prof["top_ops"]:
        shapes = " ".join("x".join(map(str, s)) for s in op["shapes"])[:34]
        print(f"  {op['name']:<26} {shapes:<34} {op['calls']:>5.0f} {op['self_ms']:>8.3f} {op['us_per_op']:>7.1f}")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/mask_profile.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--size", type=parse_size, default=(64, 1024), help="BxT of the profiled batch")
    p.add_argument("--strategy", choices=STRATEGIES, default="structural")
    p.add_argument("--calls", type=int, default=10, help="profiled calls")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", metavar="PATH", help="write the profile and machine info as JSON")
    args = p.parse_args(argv)
    if args.calls < 1 or args.threads < 1:
        p.error("--calls and --threads must be >= 1")
    check_json_path(p, args.json)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    set_up_torch(args.device, args.threads)
    info = machine_info(args.device)
    info["sha256"] = source_hashes(["genesis.masking"], [__file__])
    cfg = load_config("cpu.toml")
    corpus = prepare(cfg, log=log)
    masker = make_masker(corpus.tokenizer, cfg.masking, args.strategy, "torch")
    work = make_workload(corpus.splits["train"], *args.size, 1, DATA_SEED, args.device, "view", False)
    prof = profile_torch_path(masker, (work.cuda or work.cpu)[0], args.calls, args.device)
    prof["strategy"] = args.strategy
    print_profile(prof)
    if args.json and write_json(args.json, {"machine": info, "args": vars(args), "profile": prof}):
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
