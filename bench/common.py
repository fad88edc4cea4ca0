"""The harness every bench script shares: machine info, source hashes (on demand), timing with warm/cold control,
summaries, the GPU's copy bandwidth, and JSON/Markdown writing. Scripts import it as `bench.common` after putting
the checkout on sys.path, so that they run from a checkout without installing."""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import importlib.util
import json
import os
import platform
import random
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# What ran, and where


def loadavg() -> list[float] | None:
    return list(os.getloadavg()) if hasattr(os, "getloadavg") else None


def cpu_model() -> str:
    """The CPU's model string from /proc/cpuinfo, else what `platform` knows."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or ""


def git_state() -> dict:
    """The checkout's commit, and the tracked files with uncommitted edits (the commit alone does not say what ran)."""
    info: dict[str, Any] = {}
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10)
        if status.returncode == 0:
            info["git_dirty"] = sorted(line[3:] for line in status.stdout.splitlines())
    return info


def machine_info(device: str | torch.device) -> dict:
    """The machine, the versions and the command of this process; the GPU's name and memory on CUDA."""
    info = {
        "cpu": cpu_model(), "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(),
        "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
        "numpy": np.__version__, "loadavg_start": loadavg(),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    for module in ("triton", "transformers"):
        info[module] = __import__(module).__version__ if importlib.util.find_spec(module) is not None else None
    if torch.device(device).type == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    capability=f"{props.major}.{props.minor}")
    return {**info, **git_state()}


def source_hashes(modules: Iterable[str], scripts: Iterable[str | Path] = ()) -> dict[str, str]:
    """sha256 (12 hex digits) of the code a run times, read from the files the modules are imported from (a second
    checkout beside an editable install can import another copy): a package counts as all its .py files. Named by
    their path in this checkout, with an "(imported from)" entry where the file lies elsewhere. Modules are located,
    not imported (Triton may be missing)."""
    hashes = {}
    for module in modules:
        spec = importlib.util.find_spec(module)
        if spec is None or not spec.origin:
            continue
        origin = Path(spec.origin).resolve()
        files = sorted(origin.parent.rglob("*.py")) if spec.submodule_search_locations else [origin]
        where = origin.parent if spec.submodule_search_locations else origin
        digest = hashlib.sha256()
        for file in files:
            digest.update(file.read_bytes())
        name = str(where.relative_to(ROOT)) if where.is_relative_to(ROOT) else module
        hashes[name] = digest.hexdigest()[:12]
        if not where.is_relative_to(ROOT):
            hashes[name + " (imported from)"] = str(where)
    for script in scripts:
        path = Path(script).resolve()
        hashes[str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)] = \
            hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return hashes


def fmt_load(load: list[float] | None) -> str:
    return "n/a" if load is None else " ".join(f"{v:.2f}" for v in load)


# ----------------------------------------------------------------------------------------------------------------
# Timing


class Timed(Protocol):
    """What `time_all` times: `call(i)` does unit of work i; `key` names it; `cuda` says where it runs."""

    key: Any
    cuda: bool

    def call(self, i: int) -> Any: ...


def set_up_torch(device: str | torch.device, threads: int | None) -> None:
    """Torch as the bench runs it: `threads` CPU threads (None: torch's default), and on the CPU denormals flushed
    to zero, as training on the CPU does (genesis.device)."""
    from genesis.device import flush_denormals

    if threads is not None:
        torch.set_num_threads(threads)
    if torch.device(device).type == "cpu":
        flush_denormals()


def sync(device: str | torch.device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def event_ms(fn: Callable[[], Any]) -> float:
    """Device time of `fn()` between two CUDA events (ms), the host synchronised after it."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


class L2Flush:
    """Zeroes a buffer larger than the L2 cache before a device-timed call (as triton.testing.do_bench does): reads
    come from HBM, and the memset lets the host enqueue the timed call before the GPU reaches it."""

    def __init__(self):
        self.buffer = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")

    def __call__(self) -> None:
        self.buffer.zero_()


def time_call(item: Timed, i: int, flush: L2Flush | None) -> tuple[float, float | None]:
    """(wall ms, device ms or None). CUDA: one call with events after an L2 flush, one host-synchronised call."""
    device_ms = None
    if item.cuda:
        torch.cuda.synchronize()
        flush()
        device_ms = event_ms(lambda: item.call(i))
    t0 = time.perf_counter()
    item.call(i)
    if item.cuda:
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3, device_ms


def summarize(samples: Sequence[float]) -> dict:
    q = np.percentile(np.array(samples), [10, 25, 50, 75, 90])
    return {"n": len(samples), "median": float(q[2]), "p10": float(q[0]), "p25": float(q[1]), "p75": float(q[3]),
            "p90": float(q[4]), "min": float(min(samples))}


def time_all(items: list[Timed], warmup: int, repeats: int, min_repeats: int, budget_s: float,
             flush: L2Flush | None, order: str = "shuffled", seed: int = 0) -> dict:
    """Warm every item up, then time it; each gets as many repeats as fit its budget (between min_repeats and
    repeats, sized by its last warm-up call). Returns {key: {"wall": summary, "device": summary or None}}.

    shuffled: round-robin, every round in a new (seeded) random order, so each item is timed after each of the
    others about equally often: a short call that follows a long one of another item finds the caches cold, and a
    fixed cyclic order would give that penalty to whichever item comes next.
    blocked: each item's repeats back to back (warm caches; what timeit or torch.utils.benchmark report)."""
    counts, wall, device = {}, {p.key: [] for p in items}, {p.key: [] for p in items}
    for p in items:
        ms = 0.0
        for i in range(warmup):
            ms, _ = time_call(p, i, flush)
        counts[p.key] = int(min(repeats, max(min_repeats, budget_s * 1e3 / max(ms, 1e-3))))

    def record(p: Timed, r: int) -> None:
        w, d = time_call(p, warmup + r, flush)
        wall[p.key].append(w)
        if d is not None:
            device[p.key].append(d)

    if order == "blocked":
        for p in items:
            for r in range(counts[p.key]):
                record(p, r)
    else:
        shuffled, shuffle = list(items), random.Random(seed).shuffle
        for r in range(max(counts.values(), default=0)):
            shuffle(shuffled)
            for p in shuffled:
                if r < counts[p.key]:
                    record(p, r)
    return {p.key: {"wall": summarize(wall[p.key]), "device": summarize(device[p.key]) if device[p.key] else None}
            for p in items}


def copy_bandwidth_gb_s() -> dict:
    """Device-to-device copy of 1 GiB: bytes read + written per second (the card's practical ceiling)."""
    src = torch.ones(256 * 2**20, dtype=torch.int32, device="cuda")
    dst = torch.empty_like(src)
    samples = [event_ms(functools.partial(dst.copy_, src)) for _ in range(23)][3:]  # 3 warm-ups
    ms = float(np.median(samples))
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    torch.cuda.empty_cache()
    return {"bytes": moved, "ms": ms, "gb_per_s": moved / ms / 1e6}


# ----------------------------------------------------------------------------------------------------------------
# Arguments and output


def parse_size(text: str) -> tuple[int, int]:
    """"64x1024" -> (64, 1024)."""
    try:
        b, t = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected BxT, like 64x1024") from None
    if b < 1 or t < 1:
        raise argparse.ArgumentTypeError(f"size {text!r}: B and T must be >= 1")
    return b, t


def parse_sizes(p: argparse.ArgumentParser, option: str, text: str) -> list[tuple[int, int]]:
    """A comma list of BxT sizes; a bad one is `p.error`, naming the option."""
    try:
        return [parse_size(s.strip()) for s in text.split(",") if s.strip()]
    except argparse.ArgumentTypeError as e:
        p.error(f"{option}: {e}")


def check_json_path(p: argparse.ArgumentParser, path: str | None) -> None:
    """--json PATH must be writable: fail when parsed, not after the timing."""
    if not path:
        return
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        p.error(f"--json {path}: cannot create its directory ({e.strerror or e})")
    if target.is_dir() or not os.access(target.parent, os.W_OK):
        p.error(f"--json {path}: not a writable file path")


def write_json(path: str | Path, report: dict) -> bool:
    """The JSON report; if it cannot be written, it goes to stdout instead, so that a long run is never lost."""
    text = json.dumps(report, indent=1, default=str) + "\n"
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    except OSError as e:
        print(f"error: --json {path}: cannot write ({e.strerror or e}); the report follows on stdout",
              file=sys.stderr)
        print(text)
        return False
    return True


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A Markdown table: the header, its rule, one line per row (cells already formatted)."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)
