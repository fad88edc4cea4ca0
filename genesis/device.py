"""Where a run computes: the one device resolver, the training device and dtype, torch.compile's switch, CPU
threads and allocator, autocast, and the denormal switch."""

from __future__ import annotations

import contextlib
import ctypes
import os
import platform
from collections.abc import Callable

import torch

from genesis.config import Config, ConfigError
from genesis.console import warn
from genesis.distributed import ONE_PROCESS, World
from genesis.errors import GenesisError, RunError


class DeviceError(GenesisError, ValueError):
    """A device name this machine cannot serve; the message is the reason, without who asked for it."""


def resolve_device(name: str) -> torch.device:
    """auto (CUDA if available, else the CPU), cpu, cuda, cuda:N or mps, checked here: a device torch would only
    refuse later (while loading a checkpoint, at the first tensor) is a DeviceError now."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise DeviceError("not a device here (auto, cpu, cuda, cuda:N or mps)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise DeviceError(f"there are {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise DeviceError("MPS is not available")
    return dev


def training_device(cfg: Config, world: World = ONE_PROCESS) -> tuple[torch.device, torch.dtype]:
    """The device and the autocast dtype of a training run. A GPU-sized config on a machine without CUDA runs in
    fp32, with one warning line that points to cpu.toml; a bf16 (or auto) config on a GPU without bf16 (before
    sm_80) runs in fp32, with one warning line. Under torchrun each process takes the GPU of its LOCAL_RANK."""
    t = cfg.training
    try:
        device = resolve_device(t.device)
    except DeviceError as e:
        raise ConfigError(f"{cfg.origin_of('training.device')}: training.device: {t.device!r} requested but {e}") \
            from None
    if device.type == "cuda" and world.distributed:
        if device.index is not None:
            raise ConfigError(f"{cfg.origin_of('training.device')}: training.device: {t.device!r} names one GPU, but "
                              f"{world.size} processes share this run: use 'cuda' or 'auto' (each process takes "
                              f"the GPU of its LOCAL_RANK; CUDA_VISIBLE_DEVICES chooses which GPUs)")
        if world.local_size > torch.cuda.device_count():  # every process checks: rank 0 then says it
            raise RunError(f"{world.local_size} processes on this machine (LOCAL_WORLD_SIZE), but it shows "
                           f"{torch.cuda.device_count()} CUDA device(s): start at most that many processes per machine "
                           f"(--nproc_per_node)")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if device.type == "cpu":
        flush_denormals()
    if device.type == "cpu" and t.expected_device == "cuda":
        warn(f"{cfg.source} is sized for a CUDA GPU and none is in use: running on the CPU in fp32 "
             f"without torch.compile (slow). For a CPU-sized run use --config cpu.toml")
    elif device.type == "cpu" and (t.dtype == "bf16" or t.compile is True):
        asked = " and ".join(x for x, on in (("training.dtype = 'bf16'", t.dtype == "bf16"),
                                              ("training.compile = true", t.compile is True)) if on)
        warn(f"{asked}: CUDA only; this run is on the CPU in fp32 without torch.compile")
    if device.type == "cuda" and t.dtype in ("auto", "bf16"):
        props = torch.cuda.get_device_properties(device)
        if torch.version.hip or props.major >= 8:  # bf16 tensor cores: Ampere (sm_80) and later, and ROCm
            return device, torch.bfloat16
        warn(f"{props.name} (sm_{props.major}{props.minor}) has no bf16 support: training.dtype = {t.dtype!r} "
             f"runs in fp32 instead (more memory and time per step); set training.dtype = \"fp32\" to silence this")
    return device, torch.float32


def triton_missing() -> str | None:
    """None when Triton imports (torch.compile's GPU backend generates Triton kernels), else why it does not."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else
        return f"Triton is not importable ({type(e).__name__}: {e})"
    return None


def use_compile(setting: bool | str, device: torch.device, log: Callable[[str], None] | None = None) -> bool:
    """Whether a run torch.compiles its model. training.compile = true: on CUDA (training_device warns that it is
    ignored on the CPU); false: never; "auto": on CUDA where Triton imports, else off, with one log line saying
    which and why."""
    if setting != "auto":
        return setting is True and device.type == "cuda"
    if device.type != "cuda":
        on, why = False, f"the {device.type} runs eager; torch.compile is used on CUDA with Triton"
    else:
        missing = triton_missing()
        on, why = missing is None, missing or "CUDA with Triton"
    if log is not None:
        log(f"compile: {'on' if on else 'off'} (training.compile = \"auto\": {why})")
    return on


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity where the OS has one)."""
    with contextlib.suppress(AttributeError):  # macOS, Windows
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def set_threads(threads: int, device: torch.device, log: Callable[[str], None]) -> None:
    """training.threads (0 keeps torch's default); on the CPU, one line suggesting fewer threads when the machine's
    1-minute load average is above its core count (other processes want the cores, and oversubscribed threads
    wait on each other; docs/training.md has a measurement)."""
    if threads:
        torch.set_num_threads(threads)
    cores = os.cpu_count()
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows has no load average
        return
    fewer = max(1, (cores or 1) // 2)
    if device.type == "cpu" and cores and load > cores and torch.get_num_threads() > fewer:
        log(f"cpu: the 1-minute load average is {load:.1f} on {cores} cores: other processes compete for them; "
            f"if steps are slow, try fewer threads (training.threads = {fewer}; torch uses {torch.get_num_threads()})")


# glibc's mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30


def keep_freed_memory(device: torch.device) -> bool:
    """On the CPU under glibc (Linux), keep freed memory up to 1 GiB in the process instead of handing every large
    block back to the kernel: glibc serves blocks above 32 MB (a step's (B, T, V) logits and their gradient) with
    mmap and frees them with munmap, so every step pays for page faults that zero them again (the losses are the
    same; the step times are in docs/training.md). Returns whether it applied; elsewhere (CUDA, macOS, Windows, musl)
    it does nothing."""
    if device.type != "cpu" or platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES))
    except (OSError, AttributeError):
        return False


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def flush_denormals(enabled: bool = True) -> None:
    """Flush denormal floats to zero on the CPU: tiny AdamW moments and activations make x86 CPUs up to 10x slower
    per step, with the same losses."""
    torch.set_flush_denormal(enabled)


@contextlib.contextmanager
def flushed_denormals():
    """`flush_denormals()` while the block runs, then torch's default again (torch has no getter for the setting)."""
    flush_denormals()
    try:
        yield
    finally:
        flush_denormals(False)
