"""Training-step throughput: the Genesis Llama against transformers' LlamaForCausalLM of the same dimensions.

    python bench/train_throughput.py                                   # CPU: cpu.toml's model, eager, both sides
    python bench/train_throughput.py --micro-batches 16 --threads 2    # CPU: one micro-batch, both cores
    python bench/train_throughput.py --device cuda --config high_vram.toml --micro-batches 4,8,16,32 \\
        --modes genesis-eager,genesis-compiled,hf-eager,hf-compiled --json train.json

One process, the same random token batches for every side, the same optimizer (the trainer's AdamW with the
config's settings: weight decay on matrices, fused on CUDA) and the same loss (fp32 cross-entropy over the
(B, T, V) logits). A step is forward, backward, optimizer step and zero_grad; on CUDA the forward runs under bf16
autocast. It checks before it times: both models
have the same parameter count and, with the same weights, the same loss on one batch, and every side's first step
has that loss. Reported per (mode, micro-batch): ms/step (median, p10, p90), tokens/s, peak memory (CUDA), and MFU =
model FLOPs per token x tokens/s / the matmul peak measured in this run (bf16 on CUDA, fp32 on the CPU). Model FLOPs
per token: 6 x matmul parameters (every Linear, the output head included; the embedding lookup is no matmul) +
12 x layers x dim x seq_len for attention's scores and weighted sum (PaLM's count, causal halving not applied).
A micro-batch that does not fit is reported as out of memory and the run goes on. Timings are reported, never
asserted (tests/test_bench.py runs a smoke run).
"""

from __future__ import annotations

import argparse
import contextlib
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from bench.common import machine_info, set_up_torch, summarize, sync, write_json  # noqa: E402
from genesis.config import ConfigError, load_config  # noqa: E402
from genesis.model import Llama, ModelArgs  # noqa: E402
from genesis.step import make_optimizer  # noqa: E402

MODES = ("genesis-eager", "genesis-compiled", "hf-eager", "hf-compiled")


class BenchError(Exception):
    """A bad option or an unusable environment, phrased as one line."""


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="cpu.toml", help="the model dimensions and vocabulary size (default cpu.toml)")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu or cuda")
    p.add_argument("--micro-batches", default=None,
                   help="comma-separated micro-batch sizes (default: the config's training.micro_batch)")
    p.add_argument("--modes", default=None, help=f"comma-separated, from {', '.join(MODES)} "
                   "(default: the eager pair on the CPU, all four on CUDA)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per (mode, micro-batch) (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation happens there; default 3)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="also write the report as JSON here")
    args = p.parse_args(argv)
    try:
        args.cfg = load_config(args.config)
    except ConfigError as e:
        p.error(str(e))
    if args.device not in ("auto", "cpu", "cuda"):
        p.error(f"--device must be auto, cpu or cuda (got {args.device!r})")
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda: this torch has no usable CUDA device")
    try:
        sizes = args.micro_batches or str(args.cfg.training.micro_batch)
        args.sizes = [int(s) for s in sizes.split(",")]
    except ValueError:
        p.error(f"--micro-batches expects comma-separated integers (got {args.micro_batches!r})")
    if any(s < 1 for s in args.sizes):
        p.error(f"--micro-batches must be >= 1 (got {args.micro_batches})")
    default_modes = "genesis-eager,hf-eager" if args.device == "cpu" else ",".join(MODES)
    args.mode_list = (args.modes or default_modes).split(",")
    unknown = [m for m in args.mode_list if m not in MODES]
    if unknown:
        p.error(f"--modes: unknown {', '.join(unknown)} (choose from {', '.join(MODES)})")
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    if args.threads is not None and args.threads < 1:
        p.error(f"--threads must be >= 1 (got {args.threads})")
    return args


# ----------------------------------------------------------------------------------------------------------------
# The two models, with the same weights

def genesis_model(args: ModelArgs) -> Llama:
    torch.manual_seed(0)
    return Llama(args)


def hf_model(args: ModelArgs, genesis: Llama):
    """transformers' LlamaForCausalLM with Genesis's dimensions and a copy of its weights (genesis.export's mapping),
    with SDPA attention, as Genesis's."""
    from genesis.export import to_transformers

    model = to_transformers(genesis)
    model.config._attn_implementation = "sdpa"
    return model


def matmul_params(model: torch.nn.Module) -> int:
    """Parameters that take part in a matmul per token: every Linear (the output head too, tied or not)."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def flops_per_token(args: ModelArgs, model: Llama) -> int:
    return 6 * matmul_params(model) + 12 * args.n_layers * args.dim * args.seq_len


# ----------------------------------------------------------------------------------------------------------------
# One side's step

def loss_fn(kind: str, model, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    logits = model(x)[0] if kind == "genesis" else model(input_ids=x).logits  # (B, T, V)
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.reshape(-1))


def batches(args: ModelArgs, size: int, count: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The same (x, y) batches for every side: random ids (throughput does not depend on which ids they are)."""
    g = torch.Generator().manual_seed(size)
    out = []
    for _ in range(count):
        w = torch.randint(0, args.vocab_size, (size, args.seq_len + 1), generator=g)
        out.append((w[:, :-1].to(device), w[:, 1:].to(device)))
    return out


def run_side(mode: str, margs: ModelArgs, training, size: int, steps: int, warmup: int,
             device: torch.device) -> dict:
    kind, how = mode.split("-")
    base = genesis_model(margs)
    model = base if kind == "genesis" else hf_model(margs, base)
    model.to(device).train()
    optimizer = make_optimizer(model, training, device)  # the trainer's AdamW, with the config's settings
    step_model = torch.compile(model) if how == "compiled" else model
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else contextlib.nullcontext()
    data = batches(margs, size, 4, device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    times, losses = [], []
    for i in range(warmup + steps):
        x, y = data[i % len(data)]
        sync(device)
        t0 = time.perf_counter()
        with amp:
            loss = loss_fn(kind, step_model, x, y)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync(device)
        if i >= warmup:
            times.append((time.perf_counter() - t0) * 1e3)
        losses.append(loss.item())
    ms = summarize(times)
    row = {"mode": mode, "micro_batch": size, "tokens": size * margs.seq_len, "steps": steps,
           "ms_median": round(ms["median"], 3), "ms_p10": round(ms["p10"], 3), "ms_p90": round(ms["p90"], 3),
           "tokens_per_s": round(size * margs.seq_len / ms["median"] * 1e3, 1),
           "first_loss": round(losses[0], 4), "last_loss": round(losses[-1], 4)}
    if device.type == "cuda":
        row["peak_mem_gb"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 3)
    del model, step_model, optimizer, base
    return row


# ----------------------------------------------------------------------------------------------------------------
# Checks and the peak

def check_same_model(margs: ModelArgs, device: torch.device) -> dict:
    """Same parameter count, and with the same weights the same fp32 loss on one batch."""
    genesis = genesis_model(margs).to(device)
    hf = hf_model(margs, genesis).to(device)
    n_genesis = sum(p.numel() for p in genesis.parameters())
    n_hf = sum(p.numel() for p in hf.parameters())
    x, y = batches(margs, 2, 1, device)[0]
    with torch.no_grad():
        a, b = loss_fn("genesis", genesis, x, y).item(), loss_fn("hf", hf, x, y).item()
    passed = n_genesis == n_hf and abs(a - b) <= 1e-4 * max(1.0, abs(a))
    return {"params_genesis": n_genesis, "params_hf": n_hf, "loss_genesis": round(a, 6), "loss_hf": round(b, 6),
            "passed": passed}


def same_start(results: list[dict], bf16: bool) -> dict:
    """Every side starts from the same weights and batch, so its first loss is the same (up to bf16 rounding under
    autocast) and finite."""
    done = [r for r in results if "error" not in r]
    tol = 2e-2 if bf16 else 1e-4
    passed = all(math.isfinite(r["first_loss"]) and math.isfinite(r["last_loss"]) for r in done)
    for size in {r["micro_batch"] for r in done}:
        first = [r["first_loss"] for r in done if r["micro_batch"] == size]
        passed &= max(first) - min(first) <= tol * max(1.0, abs(first[0]))
    return {"passed": passed, "runs": len(done), "tolerance": tol}


def matmul_peak(device: torch.device) -> dict:
    """The best of a few square matmuls: bf16 8192^3 on CUDA, fp32 1024^3 on the CPU (FLOP/s)."""
    n, dtype = (8192, torch.bfloat16) if device.type == "cuda" else (1024, torch.float32)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    best = math.inf
    for _ in range(8):
        sync(device)
        t0 = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return {"n": n, "dtype": str(dtype).removeprefix("torch."), "flops_per_s": 2 * n**3 / best}


def format_table(report: dict) -> str:
    lines = [f"{'mode':<18} {'micro':>5} {'ms/step':>9} {'p10-p90':>17} {'tokens/s':>11} {'MFU %':>6} {'mem GB':>7} "
             f"{'vs HF':>6}"]
    for r in report["results"]:
        if "error" in r:
            lines.append(f"{r['mode']:<18} {r['micro_batch']:>5} {r['error']}")
            continue
        spread = f"{r['ms_p10']:.1f}-{r['ms_p90']:.1f}"
        ratio = f"{r['vs_hf']:.2f}x" if r.get("vs_hf") else ""
        lines.append(f"{r['mode']:<18} {r['micro_batch']:>5} {r['ms_median']:>9.2f} {spread:>17} "
                     f"{r['tokens_per_s']:>11,.0f} {r['mfu'] * 100:>6.1f} {r.get('peak_mem_gb', ''):>7} {ratio:>6}")
    return "\n".join(lines)


def verdicts(report: dict) -> list[str]:
    """One line per Genesis row that has a transformers peer: which side is faster, and by how much."""
    lines = []
    for r in report["results"]:
        if r.get("vs_hf"):
            peer = "hf-" + r["mode"].split("-")[1]
            peer_row = next(p for p in report["results"]
                            if p["mode"] == peer and p.get("micro_batch") == r["micro_batch"])
            faster = "faster" if r["vs_hf"] >= 1 else "slower"
            ratio = r["vs_hf"] if r["vs_hf"] >= 1 else 1 / r["vs_hf"]
            lines.append(f"verdict: {r['mode']} is {ratio:.2f}x {faster} than {peer} at micro-batch {r['micro_batch']} "
                         f"({r['tokens_per_s']:,.0f} vs {peer_row['tokens_per_s']:,.0f} tokens/s, as in the table)")
    return lines


def check_lines(checks: dict) -> list[str]:
    lines = []
    if "same_model" in checks:
        c = checks["same_model"]
        lines.append(f"check same model: {'passed' if c['passed'] else 'FAILED'} ({c['params_genesis']:,} parameters "
                     f"each; fp32 loss on one batch {c['loss_genesis']} vs {c['loss_hf']})")
    c = checks["same_start"]
    lines.append(f"check same start: {'passed' if c['passed'] else 'FAILED'} (every side's first loss equal within "
                 f"{c['tolerance']:g} relative, and finite, over {c['runs']} runs)")
    return lines


def main(argv=None) -> int:
    args = parse_args(argv)
    set_up_torch(args.device, args.threads)
    device = torch.device(args.device)
    if any(m.startswith("hf") for m in args.mode_list):
        try:
            import transformers  # noqa: F401
        except ImportError:
            print("error: the hf-* modes need transformers (pip install transformers), or pass --modes "
                  "genesis-eager", file=sys.stderr)
            return 2
    cfg = args.cfg
    margs = ModelArgs.from_config(cfg.model, cfg.tokenizer.vocab_size)
    margs.n_classes = 0  # the LM step only: transformers' model has no class head
    report = {"config": args.config, "device": str(device), "machine": machine_info(device),
              "model": {k: getattr(margs, k) for k in ("vocab_size", "n_layers", "dim", "n_heads", "n_kv_heads",
                                                        "ffn_dim", "seq_len", "tie_embeddings")}}
    checks = {"same_model": check_same_model(margs, device)} if any(m.startswith("hf") for m in args.mode_list) else {}
    peak = matmul_peak(device)
    flops = flops_per_token(margs, genesis_model(margs))
    report.update(peak=peak, flops_per_token=flops, results=[])
    print(f"model: {margs.n_layers} layers x {margs.dim}, seq {margs.seq_len}, vocab {margs.vocab_size}; "
          f"{flops / 1e6:.1f} MFLOP/token; measured {peak['dtype']} matmul peak {peak['flops_per_s'] / 1e12:.2f} "
          f"TFLOP/s on {report['machine'].get('gpu', 'the CPU')} ({device})", flush=True)
    if checks and not checks["same_model"]["passed"]:
        print(f"error: the two models differ: {checks['same_model']}", file=sys.stderr)
        return 1
    for size in args.sizes:
        for mode in args.mode_list:
            try:
                row = run_side(mode, margs, cfg.training, size, args.steps, args.warmup, device)
            except torch.OutOfMemoryError:
                row = {"mode": mode, "micro_batch": size, "error": "out of memory"}
                torch.cuda.empty_cache()
            if "error" not in row:
                row["mfu"] = round(flops * row["tokens_per_s"] / peak["flops_per_s"], 4)
            report["results"].append(row)
            print(f"  {mode} micro-batch {size}: {row.get('ms_median', row.get('error'))} ms/step", flush=True)
    for row in report["results"]:  # each side against HF's with the same compile setting and micro-batch
        peer = next((r for r in report["results"] if r["micro_batch"] == row.get("micro_batch") and "error" not in r
                     and r["mode"] == "hf-" + row["mode"].split("-")[1]), None)
        if peer and "error" not in row and row["mode"].startswith("genesis"):
            row["vs_hf"] = round(row["tokens_per_s"] / peer["tokens_per_s"], 3)
    checks["same_start"] = same_start(report["results"], bf16=device.type == "cuda")
    report["checks"] = checks
    print(format_table(report))
    print("\n".join(check_lines(checks) + verdicts(report)))
    if not checks["same_start"]["passed"]:
        print(f"error: the sides' losses differ or are not finite: {checks['same_start']}", file=sys.stderr)
    if args.json and not write_json(args.json, report):
        return 1
    return 0 if all(c["passed"] for c in checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
