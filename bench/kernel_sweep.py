"""The fused masking kernel alone, on CUDA: device time per launch with the host out of the number, over block
sizes of version 1 and window sizes of version 2, as GB/s and as a share of the card's copy bandwidth.

    python bench/kernel_sweep.py --sizes 1024x1024,4096x1024 --json sweep.json
    python bench/kernel_sweep.py --strategies structural --blocks 128 --windows 256,512

`calls` launches (cycling through a size's batches) are captured in one CUDA graph and replayed `replays` times
between events; the median per launch is what the kernel costs once a trainer keeps the GPU busy (the per-call
table of bench/mask_throughput.py includes the host's launch overhead). It checks before it times: each strategy's
kernel masker against the torch path on the first batch of each size (`genesis.parity.check_parity`).
`bench/mask_throughput.py --device cuda` runs this sweep after its own table (--kernel-sizes, --kernel-blocks,
--kernel-windows).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    check_json_path,
    copy_bandwidth_gb_s,
    event_ms,
    log,
    machine_info,
    parse_sizes,
    source_hashes,
    summarize,
    write_json,
)
from bench.workloads import (  # noqa: E402
    DATA_SEED,
    STRATEGIES,
    Workload,
    bytes_moved,
    make_masker,
    make_workload,
    with_impl,
)
from genesis.config import load_config  # noqa: E402
from genesis.data import prepare  # noqa: E402
from genesis.masking import ConnectiveMasker  # noqa: E402
from genesis.parity import check_parity  # noqa: E402


def kernel_maskers(maskers: dict, strategies: list[str], tokenizer, masking_cfg) -> dict[str, ConnectiveMasker]:
    """The kernel maskers to time alone, by row label: each strategy's, and structural with causal chains (the
    `chain` strategy of genesis.compare; the --chain masker where there is one) when structural is timed."""
    out = {s: maskers["triton-cuda", s] for s in strategies}
    if "structural" in strategies:
        key = "triton-cuda+chain", "structural"
        out["structural+chain"] = (maskers[key] if key in maskers
                                   else make_masker(tokenizer, masking_cfg, "structural", "triton", chain=True))
    return out


def graph_ms(launch, calls: int, replays: int) -> list[float]:
    """ms per launch of `launch(i)`, i < calls, captured in one CUDA graph (compiled and warmed up outside it),
    one sample per replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for i in range(3):
            launch(i)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(calls):
            launch(i)
    graph.replay()
    torch.cuda.synchronize()
    samples = [event_ms(graph.replay) / calls for _ in range(replays)]
    del graph
    torch.cuda.empty_cache()
    return samples


def kernel_graph_timing(maskers: dict[str, ConnectiveMasker], workloads: list[Workload], blocks: list[int],
                        windows: list[int], copy_bw: dict, calls: int = 20, replays: int = 15) -> list[dict]:
    """One row per size, masker (by row label, see kernel_maskers) and kernel variant: version 1 at each of
    `blocks`, version 2 at each of `windows`."""
    from genesis.kernels.experimental.mask_v2 import connective_mask_triton_v2
    from genesis.kernels.mask import DEFAULT_BLOCK, connective_mask_triton

    rows = []
    variants = [(1, block) for block in blocks] + [(2, window) for window in windows]
    for work in workloads:
        for strategy, masker in maskers.items():
            tables = masker.tables("cuda")
            for version, size in variants:
                def launch(i: int, work=work, tables=tables, masker=masker, version=version, size=size) -> None:
                    b = work.cuda[i % len(work.cuda)]
                    if version == 1:
                        connective_mask_triton(b.x, b.verse_start, tables, masker.seed, i, masker.rank, 0, block=size)
                    else:
                        connective_mask_triton_v2(b.x, b.verse_start, tables, masker.seed, i, masker.rank, 0,
                                                  window=size)

                ms = summarize(graph_ms(launch, calls, replays))
                moved = bytes_moved(work)
                rows.append({"size": work.name, "tokens": work.tokens, "strategy": strategy, "version": version,
                             "block": size if version == 1 else None, "window": size if version == 2 else None,
                             "default": version == 1 and size == DEFAULT_BLOCK, "us_median": 1e3 * ms["median"],
                             "us_p10": 1e3 * ms["p10"], "us_p90": 1e3 * ms["p90"], "bytes_moved": moved,
                             "gb_per_s": moved / ms["median"] / 1e6,
                             "pct_of_copy_bw": 100 * moved / ms["median"] / 1e6 / copy_bw["gb_per_s"],
                             "timing": f"CUDA graph of {calls} launches x {replays} replays"})
    return rows


def kernel_variant(row: dict) -> str:
    """A kernel-alone row's variant: "v1 b128" (version 1, block 128) or "v2 w256" (version 2, window 256)."""
    return f"v1 b{row['block']}" if row["version"] == 1 else f"v2 w{row['window']}"


def print_kernel_table(rows: list[dict], copy_bw: dict) -> None:
    print(f"\nkernel alone (CUDA graph replay, no host overhead); copy bandwidth {copy_bw['gb_per_s']:.0f} GB/s")
    head = (f"{'size':>10} {'strategy':<16} {'kernel':>9} {'us/launch median [p10, p90]':>30} {'GB/s':>7} "
            f"{'% copy':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        spread = f"{r['us_median']:.1f} [{r['us_p10']:.1f}, {r['us_p90']:.1f}]"
        mark = "*" if r["default"] else " "
        print(f"{r['size']:>10} {r['strategy']:<16} {kernel_variant(r):>8}{mark} {spread:>30} {r['gb_per_s']:>7.0f} "
              f"{r['pct_of_copy_bw']:>5.0f}%")
    print("(v1 bN: version 1, N positions per program; v2 wN: version 2, a window of N tokens; * the default)")


def parse_powers(p: argparse.ArgumentParser, option: str, text: str) -> list[int]:
    """A comma list of Triton block or window sizes: powers of two >= 16."""
    try:
        values = [int(b) for b in text.split(",") if b.strip()]
    except ValueError:
        p.error(f"{option}: expected a comma list of integers (got {text!r})")
    if any(v < 16 or v & (v - 1) for v in values):
        p.error(f"{option}: each value must be a power of two >= 16 (got {text!r})")
    return values


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/kernel_sweep.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1024x1024,4096x1024", help="comma list of BxT")
    p.add_argument("--strategies", default="weighted,structural", help=f"comma list of {', '.join(STRATEGIES)}")
    p.add_argument("--blocks", default="64,128,256", help="block sizes of kernel version 1")
    p.add_argument("--windows", default="256,512", help="window sizes of kernel version 2")
    p.add_argument("--batches", type=int, default=4, help="distinct batches per size, cycled through")
    p.add_argument("--json", metavar="PATH", help="write the rows and machine info as JSON")
    args = p.parse_args(argv)
    args.sizes = parse_sizes(p, "--sizes", args.sizes)
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    if not args.strategies or any(s not in STRATEGIES for s in args.strategies):
        p.error(f"--strategies: choose from {', '.join(STRATEGIES)} (got {args.strategies})")
    args.blocks, args.windows = parse_powers(p, "--blocks", args.blocks), parse_powers(p, "--windows", args.windows)
    if args.batches < 1:
        p.error(f"--batches: must be >= 1 (got {args.batches})")
    check_json_path(p, args.json)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("error: the kernel sweep needs a CUDA GPU", file=sys.stderr)
        return 2
    info = machine_info("cuda")
    info["sha256"] = source_hashes(["genesis.masking", "genesis.kernels.mask", "genesis.kernels.experimental.mask_v2"],
                                   [__file__])
    cfg = load_config("cpu.toml")
    corpus = prepare(cfg, log=log)
    split, tok = corpus.splits["train"], corpus.tokenizer
    plain = {("triton-cuda", s): make_masker(tok, cfg.masking, s, "triton") for s in args.strategies}
    maskers = kernel_maskers(plain, args.strategies, tok, cfg.masking)
    workloads = [make_workload(split, b, t, args.batches, DATA_SEED, "cuda", "view", False) for b, t in args.sizes]
    failed = [f"{name} {work.name}: {d}" for work in workloads for name, m in maskers.items()
              for d in check_parity(m, with_impl(m, "torch"), work.cuda[0].x,
                                    work.cuda[0].verse_start, step=5)]
    if failed:
        print("error: kernel != torch path, nothing timed: " + "; ".join(failed[:5]), file=sys.stderr)
        return 1
    copy_bw = copy_bandwidth_gb_s()
    rows = kernel_graph_timing(maskers, workloads, args.blocks, args.windows, copy_bw)
    print_kernel_table(rows, copy_bw)
    if args.json and write_json(args.json, {"machine": info, "args": vars(args), "copy_bandwidth": copy_bw,
                                            "kernel_only": rows}):
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
