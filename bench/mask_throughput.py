"""Masking throughput: the design notes' per-sample Dataset loop, Hugging Face's MLM collator and Genesis's
`ConnectiveMasker` (torch path on CPU and CUDA, fused Triton kernel on CUDA), on real KJV batches.

    python bench/mask_throughput.py                                     # CPU, one thread, default sizes
    python bench/mask_throughput.py --profile                           # + torch.profiler breakdown of one call
    python bench/mask_throughput.py --device cuda --json /tmp/cuda.json   # + torch path and kernel on the GPU
    python bench/mask_throughput.py --quick --sizes 2x64 --json /tmp/b.json   # smoke run (tests/test_bench.py)
    python bench/mask_throughput.py --chain --no-hf --sizes 64x1024       # + the Genesis rows with masking.chain on

Run from the repository root; the script puts the checkout on sys.path itself. Its parts run alone too:
bench/kernel_sweep.py (the kernel alone, CUDA graphs), bench/mask_profile.py (--profile), bench/step_share.py
(--step-share); bench/common.py is the harness they share.

Providers, all fed the same windows of the token cache (`genesis.data`, cpu.toml's data and tokenizer):
* loop        the seed design notes' Strategy 1/2/3 Datasets (bench/notes_baselines.py), collated like a DataLoader
              (`default_collate` of B items); timed: B x __getitem__ + stacking.
* hf-collator `transformers.DataCollatorForLanguageModeling` (MLM 15%, 80/10/10) on a PreTrainedTokenizerFast
              wrapping the project tokenizer, fed the B rows as tensors (its fastest input form).
* torch-cpu / torch-cuda   `ConnectiveMasker` with impl="torch", called as the trainer calls it (check_ids=False).
* triton-cuda `ConnectiveMasker` with impl="triton" (the fused kernel). Interpreter runs (TRITON_INTERPRET=1) are
              correctness checks only, never timed.
* NAME+chain  with --chain: each Genesis provider again with masking.chain = true (causal chains share their
              head's draw), checked like the others (a chained match's probability is its head's).

Checks run before anything is timed; the script exits 1 if one fails:
* kernel == torch path (`genesis.parity.check_parity`: every output equal): on CUDA, the compiled kernel against
  the torch path on CUDA (dense layout) and on the CPU (sparse); on the CPU, in a subprocess under
  TRITON_INTERPRET=1 (it must be set before the kernel is defined), skipped with a note without Triton;
* every provider's masking rate is what its configuration implies (bench/rate_checks.py): masked words vs the sum of
  the probabilities an independent plain-Python statement of its rules gives each occurrence, as a z-test; HF: 15%
  of non-special tokens selected, 80% of those replaced by [MASK], half of the rest kept.

Timing (bench/common.py): warm-up, then repeats interleaved round-robin over the providers of one size, in a new
random order every round (--order blocked times each provider's calls back to back instead, on warm caches), as
many as fit in --budget seconds per provider (between --min-repeats and --repeats); median and p10/p90. On CUDA each
call is timed with CUDA events after an L2 flush (device time) and again host-synchronised (wall time, what a step
pays).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    L2Flush,
    check_json_path,
    copy_bandwidth_gb_s,
    fmt_load,
    loadavg,
    log,
    machine_info,
    parse_size,
    parse_sizes,
    set_up_torch,
    source_hashes,
    time_all,
    write_json,
)
from bench.kernel_sweep import (  # noqa: E402
    kernel_graph_timing,
    kernel_maskers,
    kernel_variant,
    parse_powers,
    print_kernel_table,
)
from bench.mask_profile import print_profile, profile_torch_path  # noqa: E402
from bench.notes_baselines import notes_dataset  # noqa: E402
from bench.rate_checks import rate_checks  # noqa: E402
from bench.step_share import share_line, step_share  # noqa: E402
from bench.workloads import (  # noqa: E402
    DATA_SEED,
    SEED,
    STRATEGIES,
    Workload,
    bytes_moved,
    make_masker,
    make_workload,
    with_impl,
)
from genesis.config import ConfigError, load_config  # noqa: E402
from genesis.data import gather_windows, prepare, window_starts  # noqa: E402
from genesis.masking import ConnectiveMasker, MaskOutput  # noqa: E402
from genesis.parity import check_parity  # noqa: E402

DEFAULT_SIZES = "4x1024,64x1024,256x1024,1024x1024"
# the code this bench times: the masker, its batches, the kernel, the baselines and the harness
SOURCES = ["genesis.masking", "genesis.lexicon", "genesis.data", "genesis.kernels.mask", "bench.notes_baselines",
           "bench.workloads", "bench.common"]


# ----------------------------------------------------------------------------------------------------------------
# Providers


@dataclass
class Provider:
    name: str  # loop | hf-collator | torch-cpu | torch-cuda | triton-cuda, + "+chain" with masking.chain
    strategy: str  # uniform | weighted | structural | mlm-15% (HF: one measurement shown under every strategy)
    device: str
    call: Callable[[int], Any]  # call(i): mask batch i (cycling through the workload's batches), step i

    @property
    def key(self) -> tuple[str, str]:
        return self.name, self.strategy

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


def loop_provider(ds, strategy: str, work: Workload) -> Provider:
    collate = torch.utils.data.default_collate

    def call(i: int):
        random.seed(SEED * 1_000_003 + i)
        return collate([ds[int(s)] for s in work.starts[i % len(work.starts)]])  # [x (B, T), y (B, T)]

    return Provider("loop", strategy, "cpu", call)


def hf_provider(collator, work: Workload) -> Provider:
    return Provider("hf-collator", "mlm-15%", "cpu", lambda i: collator(work.hf_rows[i % len(work.hf_rows)]))


def genesis_provider(name: str, masker: ConnectiveMasker, strategy: str, work: Workload, device: str) -> Provider:
    batches = work.cuda if device == "cuda" else work.cpu

    def call(i: int) -> MaskOutput:
        b = batches[i % len(batches)]
        return masker(b.x, step=i, verse_start=b.verse_start)

    return Provider(name, strategy, device, call)


def make_hf_collator(tokenizer):
    """(collator, None), or (None, the reason) when transformers is not installed."""
    if importlib.util.find_spec("transformers") is None:
        return None, "transformers is not installed: hf-collator skipped (pip install transformers)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

        hf_tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer, mask_token="[MASK]", pad_token="<pad>",
                                         bos_token="<s>", eos_token="</s>")
        collator = DataCollatorForLanguageModeling(hf_tok, mlm=True, mlm_probability=0.15, seed=SEED,
                                                   return_tensors="pt")
    return collator, None


@dataclass
class Bench:
    """What every stage of a run shares: the arguments, the corpus, the HF collator and the Genesis maskers."""

    args: argparse.Namespace
    cfg: Any
    split: Any
    tok: Any
    collator: Any
    maskers: dict[tuple[str, str], ConnectiveMasker]
    tokens: list[int]  # the training split as the notes hold their corpus: a Python list
    punctuation: set[int]

    @property
    def hf(self) -> bool:
        return self.collator is not None

    def loop_dataset(self, strategy: str, T: int):
        return notes_dataset(strategy, self.tokens, np.asarray(self.split.verse_start), self.tok, T, self.punctuation)

    def providers(self, work: Workload, datasets: dict) -> dict:
        out = {("loop", s): loop_provider(datasets[s], s, work) for s in self.args.strategies}
        if self.collator is not None:
            out["hf-collator", "mlm-15%"] = hf_provider(self.collator, work)
        for (name, s), masker in self.maskers.items():
            out[name, s] = genesis_provider(name, masker, s, work, "cuda" if "cuda" in name else "cpu")
        return out


def build_maskers(args: argparse.Namespace, tok, masking_cfg) -> dict[tuple[str, str], ConnectiveMasker]:
    """Each provider's masker by (name, strategy); the torch path shares one masker across devices."""
    maskers = {}
    for s in args.strategies:
        maskers["torch-cpu", s] = make_masker(tok, masking_cfg, s, "torch")
        if args.device == "cuda":
            maskers["torch-cuda", s] = maskers["torch-cpu", s]
            maskers["triton-cuda", s] = with_impl(maskers["torch-cpu", s], "triton")
        if args.chain:
            for name in [n for n, strategy in maskers if strategy == s]:
                impl = "triton" if name.startswith("triton") else "torch"
                maskers[name + "+chain", s] = make_masker(tok, masking_cfg, s, impl, chain=True)
    return maskers


# ----------------------------------------------------------------------------------------------------------------
# Kernel == torch path, before the timing (the full cases are tests/test_masking.py's)


def parity_case(kernel: ConnectiveMasker, x: torch.Tensor, verse_start: torch.Tensor | None,
                against: list[str], overrides: dict, step: int) -> dict:
    """The kernel masker against the torch path on each device of `against`, at `step`."""
    torch_path = with_impl(kernel, "torch")
    differences = [f"torch path on {d}: {line}" for d in against
                   for line in check_parity(kernel, torch_path, x, verse_start, step=step, device_b=d)]
    masked = torch_path(x.cpu(), step=step, verse_start=None if verse_start is None else verse_start.cpu()).mask
    return {"strategy": kernel.config.strategy, "overrides": overrides, "shape": list(x.shape),
            "dtype": str(x.dtype), "verse_start": verse_start is not None, "equal": not differences,
            "differences": differences[:3], "masked_tokens": int(masked.sum())}


def interpret_check(path: str, strategies: list[str], quick: bool) -> int:
    """Child process, TRITON_INTERPRET=1: the kernel against the torch path on small real batches (CPU tensors).
    Writes JSON to path."""
    corpus = prepare(load_config("cpu.toml"), log=log)
    split, tok = corpus.splits["train"], corpus.tokenizer
    masking_cfg = load_config("cpu.toml").masking
    shape = (2, 300) if quick else (6, 500)  # T > BLOCK: two programs per row
    variants = [(s, {}, shape, torch.int64, True) for s in strategies]
    if not quick:
        variants += [(s, {}, (3, 301), torch.int64, False) for s in strategies]  # verse-initial from "\n" tokens
        variants += [("uniform", {"mask_prob": 1.0}, (2, 300), torch.int64, True),  # every match masked
                     ("structural", {"replacement": "bert"}, (2, 300), torch.int64, True),
                     ("weighted", {}, (2, 300), torch.int32, True),
                     ("structural", {"clause_length": "since_boundary"}, (1, 257), torch.int64, True),
                     ("weighted", {"chain": True}, (2, 300), torch.int64, True),  # one program walks each row
                     ("structural", {"chain": True, "replacement": "bert"}, (1, 257), torch.int32, False)]
    cases = []
    for strategy, overrides, (B, T), dtype, with_flags in variants:
        kernel = make_masker(tok, masking_cfg, strategy, "triton", **overrides)
        batch = gather_windows(split, window_starts(len(split), T, B, DATA_SEED, 3), T)
        cases.append(parity_case(kernel, batch.x.to(dtype), batch.verse_start if with_flags else None, ["cpu"],
                                 overrides, step=11))
    passed = all(c["equal"] for c in cases) and sum(c["masked_tokens"] for c in cases) > 0
    Path(path).write_text(json.dumps({"passed": passed, "cases": cases}))
    return 0


def kernel_check_interpreter(strategies: list[str], quick: bool) -> dict:
    if importlib.util.find_spec("triton") is None:
        return {"status": "skipped", "note": "Triton is not installed: kernel == torch path not checked", "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "interpret.json"
        env = dict(os.environ, TRITON_INTERPRET="1")
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--interpret-check", str(path),
               "--strategies", ",".join(strategies)] + (["--quick"] if quick else [])
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "note": "interpreter subprocess did not finish in 1200 s", "cases": []}
        if proc.returncode != 0 or not path.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            return {"status": "failed", "note": f"interpreter subprocess exited {proc.returncode}: {' | '.join(tail)}",
                    "cases": []}
        result = json.loads(path.read_text())
    status = "passed" if result["passed"] else "failed"
    return {"status": status, "note": "TRITON_INTERPRET=1 subprocess, small real KJV batches, kernel == torch path "
                                      "(correctness only, never timed)", "cases": result["cases"]}


def kernel_check_cuda(bench: Bench, workloads: list[Workload]) -> dict:
    """The compiled kernel against the torch path on CUDA and on the CPU, on the first batch of every size."""
    cases = []
    variants = [(s, {}) for s in bench.args.strategies] + [("structural", {"replacement": "bert"}),
                                                           ("weighted", {"chain": True})]
    for strategy, overrides in variants:
        kernel = make_masker(bench.tok, bench.cfg.masking, strategy, "triton", **overrides)
        for work in workloads if not overrides else workloads[:1]:
            gpu = work.cuda[0]
            for with_flags in (True, False):
                cases.append(parity_case(kernel, gpu.x, gpu.verse_start if with_flags else None, ["cuda", "cpu"],
                                         overrides, step=5))
    ok = all(c["equal"] for c in cases)
    return {"status": "passed" if ok else "failed", "cases": cases,
            "note": "compiled kernel (CUDA) == torch path on CUDA (dense) == torch path on CPU (sparse), every output"}


# ----------------------------------------------------------------------------------------------------------------
# Tables and targets


def build_rows(workloads: list[Workload], strategies: list[str], timings: dict, device: str,
               copy_bw: dict | None) -> list[dict]:
    rows = []
    for work in workloads:
        timing = timings[work.name]
        hf_key = ("hf-collator", "mlm-15%")
        for strategy in strategies:
            loop = timing.get(("loop", strategy))
            hf = timing.get(hf_key)
            genesis = ["torch-cpu"] + (["torch-cuda", "triton-cuda"] if device == "cuda" else [])
            names = ["loop", "hf-collator"] + genesis + [name + "+chain" for name in genesis]
            for name in names:
                key = hf_key if name == "hf-collator" else (name, strategy)
                if key not in timing:
                    continue
                t = timing[key]
                primary = t["device"] or t["wall"]  # CUDA providers: device time
                ms = primary["median"]
                row = {
                    "size": work.name, "B": work.B, "T": work.T, "tokens": work.tokens, "strategy": strategy,
                    "provider": name, "masking": "mlm-15%" if name == "hf-collator" else strategy,
                    "device": "cuda" if "cuda" in name else "cpu",
                    "timing": "cuda-events (L2 flushed)" if t["device"] else "wall",
                    "repeats": primary["n"], "ms_median": ms, "ms_p10": primary["p10"], "ms_p25": primary["p25"],
                    "ms_p75": primary["p75"], "ms_p90": primary["p90"], "ms_min": primary["min"],
                    "wall_ms_median": t["wall"]["median"], "tokens_per_s": work.tokens / ms * 1e3,
                    "ratio_to_loop": loop["wall"]["median"] / ms if loop else None,
                    "ratio_to_hf": hf["wall"]["median"] / ms if hf else None,
                    "gb_per_s": None, "pct_of_copy_bw": None,
                }
                if row["device"] == "cuda":
                    row["bytes_moved"] = bytes_moved(work)
                    row["gb_per_s"] = row["bytes_moved"] / ms / 1e6
                    if copy_bw:
                        row["pct_of_copy_bw"] = 100 * row["gb_per_s"] / copy_bw["gb_per_s"]
                rows.append(row)
    return rows


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x" if x < 10 else f"{x:.1f}x"


def print_table(rows: list[dict], device: str) -> None:
    head = (f"{'size':>10} {'strategy':<10} {'provider':<17} {'ms/batch median [p10, p90]':>30} {'n':>4} "
            f"{'Mtok/s':>8} {'x loop':>7} {'x HF':>7}")
    if device == "cuda":
        head += f" {'GB/s':>7} {'% copy':>6}"
    print(head)
    print("-" * len(head))
    last = None
    for r in rows:
        if last is not None and (r["size"], r["strategy"]) != last:
            print()
        last = (r["size"], r["strategy"])
        spread = f"{r['ms_median']:.3f} [{r['ms_p10']:.3f}, {r['ms_p90']:.3f}]"
        line = (f"{r['size']:>10} {r['strategy']:<10} {r['provider']:<17} {spread:>30} {r['repeats']:>4} "
                f"{r['tokens_per_s'] / 1e6:>8.2f} {fmt_ratio(r['ratio_to_loop']):>7} {fmt_ratio(r['ratio_to_hf']):>7}")
        if device == "cuda":
            gb = f"{r['gb_per_s']:.0f}" if r["gb_per_s"] else "-"
            pct = f"{r['pct_of_copy_bw']:.0f}%" if r["pct_of_copy_bw"] else "-"
            line += f" {gb:>7} {pct:>6}"
        print(line)


def evaluate_targets(rows: list[dict], share: dict | None, device: str, threads: int,
                     kernel_rows: list[dict] | None = None, order: str = "shuffled") -> list[dict]:
    def find(size, provider, strategy="structural"):
        return next((r for r in rows if r["size"] == size and r["provider"] == provider and r["strategy"] == strategy),
                    None)

    targets = []
    cpu = find("64x1024", "torch-cpu")
    note = f"{threads} thread(s), {order} order" + ("" if threads == 1 else " (the target is for one core)")
    for what, key, goal in (("the per-sample loop", "ratio_to_loop", 5.0), ("the HF collator", "ratio_to_hf", 20.0)):
        value = cpu[key] if cpu else None
        targets.append({"target": f"CPU torch path, structural, 64x1024, one core: >= {goal:g}x {what}",
                        "value": value, "met": None if value is None else value >= goal,
                        "note": note if cpu else "not measured: 64x1024 not among --sizes"})
    if device != "cuda":
        for text in ("kernel >= 60% of copy bandwidth at >= 1M tokens", "masking <= 0.5% of a high_vram step",
                     "torch path on CUDA within 5x of the kernel"):
            targets.append({"target": text, "value": None, "met": None, "note": "not measured: no GPU in this run"})
        return targets
    # the kernel's bandwidth: its own device time (graph replay; the best kernel variant, by its worst size and
    # strategy), else the per-call events of the default kernel
    by_variant: dict[str, list[float]] = {}
    for r in kernel_rows or []:
        if r["tokens"] >= 2**20:
            by_variant.setdefault(kernel_variant(r), []).append(r["pct_of_copy_bw"])
    big = bool(by_variant)
    if big:
        best = max(by_variant, key=lambda name: min(by_variant[name]))
        value, how = min(by_variant[best]), f"kernel alone, CUDA graph replay, best variant: {best}"
    else:
        per_call = [r for r in rows if r["provider"] == "triton-cuda" and r["tokens"] >= 2**20 and r["pct_of_copy_bw"]]
        big = bool(per_call)
        value = min((r["pct_of_copy_bw"] for r in per_call), default=None)
        how = "per call, host launch overhead included"
    targets.append({"target": "kernel >= 60% of copy bandwidth at >= 1M tokens (worst size, strategy)",
                    "value": value, "met": None if value is None else value >= 60,
                    "note": how if big else "not measured: no size with >= 1M tokens"})
    if share and share["device"].startswith("cuda"):
        value = share["masking_pct_of_step"]
        targets.append({"target": f"masking <= 0.5% of a {share['config']} step", "value": value,
                        "met": value <= 0.5, "note": f"{share['strategy']}, impl {share['impl']}"})
    else:
        targets.append({"target": "masking <= 0.5% of a high_vram step", "value": None, "met": None,
                        "note": "not measured: step share not run on CUDA"})
    gaps = []
    for r in rows:
        if r["provider"] == "torch-cuda":
            k = find(r["size"], "triton-cuda", r["strategy"])
            if k:
                gaps.append(r["ms_median"] / k["ms_median"])
    value = max(gaps, default=None)
    targets.append({"target": "torch path on CUDA within 5x of the kernel (worst size and strategy)", "value": value,
                    "met": None if value is None else value <= 5, "note": ""})
    return targets


def print_targets(targets: list[dict]) -> None:
    print("\ntargets:")
    for t in targets:
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        verdict = "n/a" if t["met"] is None else "met" if t["met"] else "NOT met"
        print(f"  {t['target']:<70} {value:>8}  {verdict:<7} {t['note']}")


def print_checks(checks: dict) -> None:
    k = checks["kernel_equals_torch"]
    print(f"check kernel == torch path: {k['status']} ({len(k['cases'])} cases) - {k['note']}")
    for case in (c for c in k["cases"] if not c["equal"]):
        print(f"  FAIL {case['strategy']} {case['overrides']} {case['shape']} {case['dtype']}: "
              + "; ".join(case["differences"]))
    for r in checks["rates"]:
        status = "ok  " if r["passed"] else "FAIL"
        print(f"check rate {status} {r['provider']:<12} {r['strategy']:<10} observed {r['observed']:>8.0f} expected "
              f"{r['expected']:>9.1f} +- {r['std']:>6.1f} (z {r['z']:+.2f}, {r['trials']} trials): {r['what']}"
              + (f" ERRORS: {'; '.join(r['errors'])}" if r["errors"] else ""))




# ----------------------------------------------------------------------------------------------------------------
# Arguments


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: loop, HF, torch path; cuda: also the torch path and the kernel on the GPU")
    p.add_argument("--strategies", default="weighted,structural", help=f"comma list of {', '.join(STRATEGIES)}")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma list of BxT (default {DEFAULT_SIZES})")
    p.add_argument("--repeats", type=int, default=50, help="most timed calls per provider and size")
    p.add_argument("--min-repeats", type=int, default=5,
                   help="fewest timed calls, whatever the budget (at most --repeats)")
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per provider and size")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed calls per provider and size (>= 1: the last one sizes the repeats to the budget)")
    p.add_argument("--order", choices=("shuffled", "blocked"), default="shuffled",
                   help="shuffled: providers interleaved in a new random order every round (a call may follow "
                        "another provider's, on cold caches); blocked: each provider's calls back to back (warm)")
    p.add_argument("--batches", type=int, default=4, help="distinct batches per size, cycled through")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: one core)")
    p.add_argument("--layout", choices=("view", "contiguous"), default="view",
                   help="view: batch.x as get_batch gives it (a (T+1)-strided view, as the trainer passes it); "
                        "contiguous: a contiguous copy")
    p.add_argument("--kernel-sizes", default="1024x1024,4096x1024",
                   help="CUDA: BxT sizes for timing the kernel alone (CUDA graph replay, bench/kernel_sweep.py)")
    p.add_argument("--kernel-blocks", default="64,128,256", help="CUDA: block sizes of kernel version 1 to time")
    p.add_argument("--kernel-windows", default="256,512", help="CUDA: window sizes of kernel version 2 to time")
    p.add_argument("--step-share", default=None, metavar="CONFIG",
                   help="time the trainer's steps with masking off/on for CONFIG (bench/step_share.py; default "
                        "cpu.toml on CPU, high_vram.toml on CUDA; 'none' skips)")
    p.add_argument("--step-strategy", default="structural", choices=STRATEGIES, help="masking strategy for the steps")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode for --step-share")
    p.add_argument("--profile", action="store_true", help="torch.profiler breakdown of the torch path "
                                                          "(bench/mask_profile.py)")
    p.add_argument("--profile-size", type=parse_size, default=(64, 1024), help="BxT for --profile")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face collator")
    p.add_argument("--chain", action="store_true",
                   help="also time every Genesis provider with masking.chain = true (rows NAME+chain)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: small check set, short interpreter check, 2 steps, budget <= 0.3 s")
    p.add_argument("--json", metavar="PATH", help="write the results, checks and machine info as JSON")
    p.add_argument("--interpret-check", metavar="PATH", help=argparse.SUPPRESS)  # child process mode


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/mask_throughput.py", description=" ".join(__doc__.split("\n")[:2]))
    add_arguments(p)
    args = p.parse_args(argv)
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = [s for s in args.strategies if s not in STRATEGIES]
    if bad or not args.strategies:
        p.error(f"--strategies: unknown {bad} (choose from {', '.join(STRATEGIES)})")
    args.sizes = parse_sizes(p, "--sizes", args.sizes)
    args.kernel_sizes = parse_sizes(p, "--kernel-sizes", args.kernel_sizes)
    args.kernel_blocks = parse_powers(p, "--kernel-blocks", args.kernel_blocks)
    args.kernel_windows = parse_powers(p, "--kernel-windows", args.kernel_windows)
    if not args.sizes:
        p.error("--sizes: no size given")
    for option in ("threads", "repeats", "batches", "steps", "warmup", "min_repeats"):
        if getattr(args, option) < 1:
            p.error(f"--{option.replace('_', '-')}: must be >= 1 (got {getattr(args, option)})")
    args.min_repeats = min(args.min_repeats, args.repeats)  # --repeats 2 means at most 2, as its help says
    if not args.budget >= 0:
        p.error(f"--budget: must be >= 0 seconds (got {args.budget})")
    check_json_path(p, args.json)
    if args.quick:
        args.budget, args.steps, args.warmup = min(args.budget, 0.3), min(args.steps, 2), min(args.warmup, 1)
    if args.step_share is None:
        args.step_share = "high_vram.toml" if args.device == "cuda" else "cpu.toml"
    if args.step_share != "none":
        try:
            load_config(args.step_share)  # a missing or bad config fails now, not after the timing
        except ConfigError as e:
            p.error(f"--step-share: {e}")
    return args


# ----------------------------------------------------------------------------------------------------------------
# main


def prepare_bench(args: argparse.Namespace) -> Bench:
    cfg = load_config("cpu.toml")
    corpus = prepare(cfg, log=log)
    split, tok = corpus.splits["train"], corpus.tokenizer
    collator, hf_note = (None, "skipped by --no-hf") if args.no_hf else make_hf_collator(tok)
    if hf_note:
        log(f"note: {hf_note}")
    args.notes = [hf_note] if hf_note else []
    maskers = build_maskers(args, tok, cfg.masking)
    punctuation = set(np.flatnonzero(maskers["torch-cpu", args.strategies[0]].lexicon.clause_boundary).tolist())
    return Bench(args, cfg, split, tok, collator, maskers, np.asarray(split.tokens).astype(np.int64).tolist(),
                 punctuation)


def run_checks(bench: Bench) -> tuple[dict, list[Workload]]:
    """The rate checks on their own batches, then the timed workloads and the kernel check on them."""
    args = bench.args
    check_B, check_T, check_n = (8, 1024, 4) if args.quick else (32, 1024, 16)
    log(f"checking: rates on {check_n} batches of {check_B}x{check_T}; kernel == torch path")
    check_work = make_workload(bench.split, check_B, check_T, check_n, DATA_SEED + 1, args.device, args.layout,
                               bench.hf)
    check_sets = {s: bench.loop_dataset(s, check_T) for s in args.strategies}
    rates = rate_checks(bench.providers(check_work, check_sets), check_sets, check_work,
                        bench.tok.get_vocab_size(with_added_tokens=True), bench.maskers, bench.collator)
    log("building workloads: " + ", ".join(f"{b}x{t}" for b, t in args.sizes))
    workloads = [make_workload(bench.split, b, t, args.batches, DATA_SEED, args.device, args.layout, bench.hf)
                 for b, t in args.sizes]
    if args.device == "cuda":
        kernel = kernel_check_cuda(bench, workloads)
    else:
        kernel = kernel_check_interpreter(args.strategies, args.quick)
    checks = {"kernel_equals_torch": kernel, "rates": rates,
              "passed": kernel["status"] != "failed" and all(r["passed"] for r in rates)}
    return checks, workloads


def time_workloads(bench: Bench, workloads: list[Workload]) -> tuple[list[dict], dict | None]:
    """The per-call table: every provider on every size; with the copy bandwidth on CUDA."""
    args = bench.args
    flush = L2Flush() if args.device == "cuda" else None
    copy_bw = copy_bandwidth_gb_s() if args.device == "cuda" else None
    timings = {}
    for work in workloads:
        log(f"timing {work.name} ({args.order} order) ...")
        datasets = {s: bench.loop_dataset(s, work.T) for s in args.strategies}
        timings[work.name] = time_all(list(bench.providers(work, datasets).values()), args.warmup, args.repeats,
                                      args.min_repeats, args.budget, flush, args.order, seed=SEED)
    del flush
    rows = build_rows(workloads, args.strategies, timings, args.device, copy_bw)
    print()
    print_table(rows, args.device)
    if copy_bw:
        print(f"\ndevice-to-device copy of 1 GiB: {copy_bw['gb_per_s']:.0f} GB/s (bytes read + written)")
    return rows, copy_bw


def run_extras(bench: Bench, copy_bw: dict | None) -> dict:
    """The kernel alone (CUDA), the share of a training step and the profile, as the arguments ask."""
    args, out = bench.args, {"kernel_only": None, "step_share": None, "profile": None}
    if args.device == "cuda" and args.kernel_sizes:
        log("timing the kernel alone: " + ", ".join(f"{b}x{t}" for b, t in args.kernel_sizes))
        big = [make_workload(bench.split, b, t, args.batches, DATA_SEED, "cuda", args.layout, False)
               for b, t in args.kernel_sizes]
        maskers = kernel_maskers(bench.maskers, args.strategies, bench.tok, bench.cfg.masking)
        out["kernel_only"] = kernel_graph_timing(maskers, big, args.kernel_blocks, args.kernel_windows, copy_bw)
        del big
        print_kernel_table(out["kernel_only"], copy_bw)
    if args.step_share.lower() != "none":
        log(f"step share: {args.step_share}, masking {args.step_strategy}, {args.steps} steps per mode")
        out["step_share"] = step_share(args.step_share, args.device, args.step_strategy, args.steps, args.warmup)
        print("\n" + share_line(out["step_share"]))
    if args.profile:
        B, T = args.profile_size
        strategy = "structural" if "structural" in args.strategies else args.strategies[0]
        name = "torch-cuda" if args.device == "cuda" else "torch-cpu"
        work = make_workload(bench.split, B, T, 1, DATA_SEED, args.device, args.layout, False)
        out["profile"] = profile_torch_path(bench.maskers[name, strategy], (work.cuda or work.cpu)[0], 10,
                                            args.device)
        out["profile"]["strategy"] = strategy
        print_profile(out["profile"])
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    set_up_torch(args.device, args.threads)
    if args.interpret_check:
        return interpret_check(args.interpret_check, args.strategies, args.quick)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if os.environ.pop("GENESIS_MASK_IMPL", None):
        log("note: GENESIS_MASK_IMPL ignored: each provider names its impl")
    info = machine_info(args.device)
    info["sha256"] = hashes = source_hashes(SOURCES, [__file__])  # now: the code that is about to be timed
    log(f"machine: {info['cpu']} ({info['cpu_count']} cores), {args.threads} torch thread(s), "
        f"load {fmt_load(info['loadavg_start'])}" + (f", GPU {info['gpu']}" if args.device == "cuda" else ""))
    bench = prepare_bench(args)
    checks, workloads = run_checks(bench)
    print_checks(checks)
    report: dict[str, Any] = {
        "machine": info, "args": {k: v for k, v in vars(args).items() if k not in ("interpret_check", "notes")},
        "notes": args.notes, "checks": checks,
        "maskers": {s: bench.maskers["torch-cpu", s].describe() for s in args.strategies}}
    if not checks["passed"]:
        print("error: a check failed; nothing was timed", file=sys.stderr)
        if args.json:
            write_json(args.json, report)
        return 1
    rows, copy_bw = time_workloads(bench, workloads)
    extras = run_extras(bench, copy_bw)
    targets = evaluate_targets(rows, extras["step_share"], args.device, args.threads, extras["kernel_only"],
                               args.order)
    print_targets(targets)
    info["loadavg_end"] = loadavg()
    print(f"\nload average (1, 5, 15 min) at start {fmt_load(info['loadavg_start'])}, at end "
          f"{fmt_load(info['loadavg_end'])} on {info['cpu_count']} cores; masking sources {hashes}")
    report.update(results=rows, copy_bandwidth=copy_bw, targets=targets, **extras)
    if args.json and write_json(args.json, report):
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
