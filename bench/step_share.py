"""The share of a training step that masking takes: the trainer's own step (`genesis.train.train_step` on a Run
from `genesis.train.setup`: stop vote, LR schedule, the masker, curriculum weights, forward and backward, clip, the
non-finite guard and the optimizer) with masking off and on, alternating in one process, and the masker's calls
alone on the same batches.

    python bench/step_share.py --config cpu.toml --steps 10
    python bench/step_share.py --config high_vram.toml --device cuda --json share.json

One run of the config is set up in a temporary directory with masking.enabled = true and --strategy, and
model.class_head = false (the head needs masking, so it would be in one mode only). Log steps, which add the
masker's counts and a host sync, fall outside the timed steps (training.log_every is set past them); so do
evaluations and checkpoints, which the training loop runs between steps. `bench/mask_throughput.py` runs this
after its table (--step-share CONFIG).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from bench.common import check_json_path, log, machine_info, set_up_torch, summarize, sync, write_json  # noqa: E402
from bench.workloads import STRATEGIES  # noqa: E402
from genesis.config import ConfigError, load_config  # noqa: E402


@contextlib.contextmanager
def trainer_run(config: str, overrides: list[str]) -> Iterator:
    """(Run, autocast dtype) of `config` as `genesis.train` sets it up (one process, a temporary run directory), its
    console lines silenced; the run directory's lock released and its metrics file closed on exit."""
    from genesis import console
    from genesis.device import keep_freed_memory, training_device
    from genesis.distributed import World
    from genesis.train import Claim, setup

    cfg = load_config(config, overrides=overrides)
    device, amp_dtype = training_device(cfg)
    keep_freed_memory(device)
    claim, quiet = Claim(), console.quiet
    with tempfile.TemporaryDirectory(prefix="genesis-step-share-") as tmp:
        console.quiet = True
        try:
            run = setup(cfg, Path(tmp) / "run", False, World(), device, amp_dtype, claim)
        finally:
            console.quiet = quiet
        try:
            yield run, amp_dtype
        finally:
            if run.metrics is not None:
                run.metrics.close()
            if claim.lock is not None:
                claim.lock.release()


def step_ms(run, step: int) -> float:
    """Wall ms of the trainer's step `step` on `run`, host-synchronised."""
    from genesis.train import train_step

    sync(run.device)
    t0 = time.perf_counter()
    train_step(run, step)
    sync(run.device)
    return (time.perf_counter() - t0) * 1e3


def masking_ms(run, step: int) -> float:
    """Wall ms of the masker's calls of step `step` on `run` (its micro-batches, gathered outside the timer)."""
    from genesis.data import get_batch

    t, masker = run.cfg.training, run.masker
    B, T = t.micro_batch, run.cfg.model.seq_len
    batches = [get_batch(run.train_data, B, T, t.seed, step, rank=0, micro=m, device=run.device)
               for m in range(t.grad_accum)]
    sync(run.device)
    t0 = time.perf_counter()
    for micro, batch in enumerate(batches):
        masker(batch.x, step=step, verse_start=batch.verse_start, row_offset=micro * B)
    sync(run.device)
    return (time.perf_counter() - t0) * 1e3


def step_share(config: str, device: str, strategy: str, steps: int, warmup: int) -> dict:
    """Median step time with masking off and on, and of the masking calls alone. One Run, one model: an off step is
    the same trainer step with the run's masker taken out (what masking.enabled = false runs), so the difference is
    the masker's; the steps alternate, so that drift in the machine's load hits both modes alike."""
    total = warmup + steps
    base = load_config(config)
    overrides = [f"training.device={device}", f"training.steps={max(base.training.steps, total + 1)}",
                 f"training.log_every={total + 1}", "training.tensorboard=false", "masking.enabled=true",
                 f"masking.strategy={strategy}", "model.class_head=false"]
    with trainer_run(config, overrides) as (run, amp_dtype):
        masker, times = run.masker, {"off": [], "on": [], "alone": []}
        try:
            for i in range(total):
                run.masker = None
                off = step_ms(run, i)
                run.masker = masker
                sample = {"off": off, "on": step_ms(run, i), "alone": masking_ms(run, i)}
                for mode, ms in sample.items():
                    if i >= warmup:
                        times[mode].append(ms)
        finally:
            run.masker = masker
        t, dev, params = run.cfg.training, run.device, run.model.num_params()
        T = run.cfg.model.seq_len
    off_s, on_s, alone_s = (summarize(times[mode]) for mode in ("off", "on", "alone"))
    return {
        "config": config, "device": str(dev), "dtype": str(amp_dtype).replace("torch.", ""), "strategy": strategy,
        "impl": masker.impl(dev), "micro_batch": t.micro_batch, "seq_len": T, "grad_accum": t.grad_accum,
        "tokens_per_step": t.micro_batch * T * t.grad_accum, "params_m": round(params / 1e6, 2),
        "step": "genesis.train.train_step",
        "step_ms_masking_off": off_s, "step_ms_masking_on": on_s, "masking_ms_per_step": alone_s,
        "ratio_on_off": on_s["median"] / off_s["median"],
        "masking_pct_of_step": 100 * alone_s["median"] / on_s["median"],
        "difference_pct_of_step": 100 * (on_s["median"] - off_s["median"]) / on_s["median"],
    }


def share_line(share: dict) -> str:
    """The one-line summary the bench scripts print."""
    return (f"step share ({share['config']}, {share['device']} {share['dtype']}, {share['tokens_per_step']} tokens "
            f"per step, masking {share['strategy']} via {share['impl']}): step "
            f"{share['step_ms_masking_off']['median']:.1f} ms masking off, "
            f"{share['step_ms_masking_on']['median']:.1f} ms on (x{share['ratio_on_off']:.3f}); masking alone "
            f"{share['masking_ms_per_step']['median']:.2f} ms = {share['masking_pct_of_step']:.2f}% of the step")


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/step_share.py", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="cpu.toml", help="the training config (default cpu.toml)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--strategy", choices=STRATEGIES, default="structural", help="masking strategy of the on run")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per mode first")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--json", metavar="PATH", help="write the result and machine info as JSON")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0 or args.threads < 1:
        p.error("--steps and --threads must be >= 1, --warmup >= 0")
    try:
        load_config(args.config)
    except ConfigError as e:
        p.error(f"--config: {e}")
    check_json_path(p, args.json)
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    set_up_torch(args.device, args.threads)
    info = machine_info(args.device)
    share = step_share(args.config, args.device, args.strategy, args.steps, args.warmup)
    print(share_line(share))
    if args.json and write_json(args.json, {"machine": info, "args": vars(args), "step_share": share}):
        log(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
