"""Several processes (torchrun) and stopping: the launch's World, the process group and its collectives, and the
signal handling that lets every process stop at the same step and save one checkpoint."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading

import torch

from genesis.console import first_line
from genesis.errors import RunError

SIGNALS = (signal.SIGINT, signal.SIGTERM)


# ----------------------------------------------------------------------------------------------------------------
# Signals: stop at a step boundary, with a checkpoint


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived (Ctrl-C, a job scheduler's stop): the loop saves a checkpoint and re-raises."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_held: list[int] | None = None  # inside `signals_held()`: the signals that arrived, raised when it ends


def _interrupt(signum, frame):
    if _held is not None:
        _held.append(signum)
        return
    raise Interrupted(signum)


def handle_interrupts() -> None:
    """Turn SIGINT and SIGTERM into `Interrupted`: a shell starts background jobs with SIGINT ignored, and
    schedulers stop jobs with SIGTERM; either way the training loop saves a checkpoint before exiting."""
    for signum in SIGNALS:
        signal.signal(signum, _interrupt)


@contextlib.contextmanager
def interrupts_handled():
    """`handle_interrupts()` for the duration of the block (main thread only), then the previous handlers."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {signum: signal.getsignal(signum) for signum in SIGNALS}
    handle_interrupts()
    try:
        yield
    finally:
        for signum, handler in previous.items():
            if handler is not None:  # None: installed outside Python, cannot be put back
                signal.signal(signum, handler)


@contextlib.contextmanager
def signals_held():
    """Hold SIGINT and SIGTERM (as handled by `handle_interrupts`) until the block ends, then raise `Interrupted`.

    Around the optimizer step, the step counter and the step's log record, so that a checkpoint never pairs the
    weights after step N with the count N - 1 (a resume would then train step N twice) nor lacks step N's record;
    around a checkpoint save, so that a second Ctrl-C does not cut it short."""
    global _held
    outer, _held = _held, (_held if _held is not None else [])
    try:
        yield
    finally:
        pending, _held = _held, outer  # one store: a signal lands either in `pending` or is raised at once
    if pending and outer is None:
        raise Interrupted(pending[0])


# ----------------------------------------------------------------------------------------------------------------
# Several processes (torchrun): data-parallel training, one process per GPU


@dataclasses.dataclass(frozen=True)
class World:
    """This process's place in a launch: rank, local rank (its GPU on this machine), the number of processes, and
    the number on this machine."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the process that logs and writes the run directory."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


ONE_PROCESS = World()  # a run without torchrun


def world_from_env(environ=os.environ) -> World:
    """The World torchrun describes in WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE; one process when
    WORLD_SIZE is unset."""
    if "WORLD_SIZE" not in environ:
        return ONE_PROCESS
    values = {}
    for name, default in (("WORLD_SIZE", None), ("RANK", None), ("LOCAL_RANK", "0"), ("LOCAL_WORLD_SIZE", "1")):
        raw = environ.get(name, default)
        try:
            values[name] = int(raw)
        except (TypeError, ValueError):
            raise RunError(f"{name}={raw!r}: not an integer (torchrun sets WORLD_SIZE, RANK and LOCAL_RANK; with "
                           f"WORLD_SIZE set, RANK must be set too)") from None
    world = World(rank=values["RANK"], local_rank=values["LOCAL_RANK"], size=values["WORLD_SIZE"],
                  local_size=max(values["LOCAL_WORLD_SIZE"], values["LOCAL_RANK"] + 1))
    if world.size < 1 or not 0 <= world.rank < world.size or world.local_rank < 0:
        raise RunError(f"WORLD_SIZE={world.size}, RANK={world.rank}, LOCAL_RANK={world.local_rank}: not a valid "
                       f"launch (need 0 <= RANK < WORLD_SIZE and LOCAL_RANK >= 0)")
    return world


def error_prefix(environ=os.environ) -> str | None:
    """How this process prints an error of a torchrun launch: rank 0 plainly, the first process on each other
    machine as "[rank N] " (an error only that machine has: a missing file, fewer GPUs), any other not at all (None).
    Errors every process meets, such as a bad config, are raised by all of them, so rank 0's line tells it."""
    rank, local_rank = environ.get("RANK", "0"), environ.get("LOCAL_RANK", "0")
    if not (rank.isdigit() and local_rank.isdigit()) or int(rank) == 0:
        return ""
    return f"[rank {rank}] " if int(local_rank) == 0 else None


class PeerStopped(RunError):
    """A collective failed: another process of the launch has stopped (an error, a kill, out of memory)."""

    @classmethod
    def after(cls, e: BaseException, saved: str = "") -> PeerStopped:
        """From the collective's error: in a few words (gloo's text without its source path, to the end of its
        first sentence), then what was saved."""
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if text.startswith("[") and "] " in text:
            text = text.split("] ", 1)[1]
        text = text.split(". ")[0].rstrip(".")[:160]
        return cls(f"another process of this run stopped ({text})" + (f"; {saved}" if saved else ""))


_cpu_group = None  # a gloo process group (long timeout) for the prepare barrier and the per-step stop vote


@contextlib.contextmanager
def process_group(world: World, device: torch.device):
    """torch.distributed set up for the block (NCCL on CUDA, gloo on the CPU) when there are several processes and
    no process group yet; taken down after it."""
    global _cpu_group
    import datetime

    import torch.distributed as dist

    if not world.distributed or dist.is_initialized():
        yield
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend, rank=world.rank, world_size=world.size,
                                device_id=device if device.type == "cuda" else None)
        # on the CPU, so that a vote never waits for the GPU; long, for rank 0 tokenizing a large corpus meanwhile
        _cpu_group = dist.new_group(backend="gloo", timeout=datetime.timedelta(hours=2))
    except (ValueError, RuntimeError) as e:  # no MASTER_ADDR/MASTER_PORT, an unreachable rendezvous
        raise RunError(f"cannot start {world.size} processes ({backend}): {first_line(e)} (start several "
                       f"processes with torchrun, e.g. torchrun --standalone --nproc_per_node=2 -m genesis.train "
                       f"...)") from None
    try:
        yield
    finally:
        _cpu_group = None
        dist.destroy_process_group()


def refuse_several_processes(command: str) -> None:
    """A RunError when started as one of several processes (torchrun): `command` runs as one. Rank 0 says so; the
    other processes exit with the same status, silently."""
    world = world_from_env()
    if world.distributed:
        if error_prefix() is None:
            raise SystemExit(2)
        raise RunError(f"{command} runs as one process, but it was started as one of {world.size} "
                       f"(WORLD_SIZE={world.size}, as torchrun sets): run it with python -m, without torchrun")


def collective_failed(e: BaseException) -> bool:
    """Whether `e` is a collective that failed because another process is gone (gloo: the connection closed)."""
    import torch.distributed as dist

    text = str(e)
    return isinstance(e, getattr(dist, "DistError", ())) or (
        isinstance(e, RuntimeError) and ("gloo" in text and "onnection" in text or "NCCL" in text))


def all_sum(values: list[torch.Tensor], world: World) -> list[torch.Tensor]:
    """The sums over all processes of 0-d tensors (one collective), or the values themselves in one process."""
    if not world.distributed:
        return values
    import torch.distributed as dist

    stacked = torch.stack([v.detach().double() for v in values])
    dist.all_reduce(stacked)
    return list(stacked.unbind(0))


def _any_process(flag: bool) -> bool:
    """Whether `flag` is true in any process (a vote on the CPU: no GPU sync)."""
    import torch.distributed as dist

    vote = torch.tensor([int(flag)])
    dist.all_reduce(vote, op=dist.ReduceOp.MAX, group=_cpu_group)
    return bool(vote.item())


def broadcast_steps(steps: set[int]) -> set[int]:
    """Rank 0's set of steps, on every process."""
    import torch.distributed as dist

    box = [sorted(steps)]
    dist.broadcast_object_list(box, src=0, group=_cpu_group)
    return set(box[0])


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier(group=_cpu_group)


@contextlib.contextmanager
def signals_deferred():
    """Several processes: SIGINT and SIGTERM are only recorded (in `_held`) for the block, and the processes vote at
    every step (`stop_vote`), so that all of them stop at the same point and none is left waiting in a collective
    for one that has gone: the GPUs of NCCL processes run ahead of their host threads by different amounts, and a
    process that left mid-step would hang the others inside CUDA, where no Python signal handler runs."""
    global _held
    outer, _held = _held, []
    try:
        yield _held  # what is still in it when the block ends normally arrived after the last vote
    finally:
        _held = outer


def stop_vote(world: World) -> None:
    """Raise Interrupted in every process when any of them has received a signal (inside `signals_deferred`)."""
    if world.distributed and _any_process(bool(_held)):
        raise Interrupted(_held[0] if _held else signal.SIGTERM)


