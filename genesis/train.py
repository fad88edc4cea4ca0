"""Train a Llama-style model on a Bible corpus, optionally masking connectives inside the step.

    python -m genesis.train --config cpu.toml                      # tiny model, minutes on a CPU
    python -m genesis.train --config high_vram.toml                # the "microscope" model on a 12 GB GPU
    python -m genesis.train --config cpu.toml --set masking.enabled=true --set masking.strategy=structural
    python -m genesis.train --config cpu.toml --out runs/a --resume   # continue runs/a from its checkpoint
    python -m genesis.train --config cpu.toml --show-config        # print the resolved config and exit
    torchrun --standalone --nproc_per_node=2 -m genesis.train --config high_vram.toml   # one process per GPU (DDP)

A run directory (default runs/<config name>) receives config.toml (resolved), tokenizer.json, metrics.jsonl (one
JSON record per log step and per evaluation; it ends with the held-out loss of the last step) and checkpoint.pt
(model, optimizer, step, config; written atomically, also on Ctrl-C or SIGTERM during training and on an error
outside the optimizer step). --resume continues it with the same settings (run length, logging and the device may
change: RESUME_MAY_CHANGE; the number of processes with grad_accum, keeping their product).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import pickle
import signal
import sys
import threading
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from genesis.config import Config, ConfigError, check_config, describe, load_config, to_dict, to_toml
from genesis.corpus import CorpusError
from genesis.data import SPLITS, Corpus, TokenSplit, eval_starts, gather_windows, get_batch, prepare
from genesis.model import Llama, ModelArgs, build_model, check_memory, class_loss
from genesis.tokenizer import TokenizerError

CHECKPOINT = "checkpoint.pt"
SIGNALS = (signal.SIGINT, signal.SIGTERM)


class RunError(Exception):
    """A problem with the run directory or the checkpoint, phrased as one line."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived (Ctrl-C, a job scheduler's stop): the loop saves a checkpoint and re-raises."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_held: list[int] | None = None  # inside `signals_held()`: the signals that arrived, raised when it ends
_saved = False  # the running training's checkpoint has been saved for the way it is stopping


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


_quiet = False  # set on processes other than rank 0 of a torchrun launch: one process speaks for the run


def log(msg: str) -> None:
    if not _quiet:
        print(msg, flush=True)


def warn(msg: str) -> None:
    if not _quiet:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


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


def world_from_env(environ=os.environ) -> World:
    """The World torchrun describes in WORLD_SIZE, RANK, LOCAL_RANK and LOCAL_WORLD_SIZE; one process when
    WORLD_SIZE is unset."""
    if "WORLD_SIZE" not in environ:
        return World()
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
        raise RunError(f"cannot start {world.size} processes ({backend}): {_first_line(e)} (start several "
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


def _collective_failed(e: BaseException) -> bool:
    """Whether `e` is a collective that failed because another process is gone (gloo: the connection closed)."""
    import torch.distributed as dist

    text = str(e)
    return isinstance(e, getattr(dist, "DistError", ())) or (
        isinstance(e, RuntimeError) and ("gloo" in text and "onnection" in text or "NCCL" in text))


def _all_sum(values: list[torch.Tensor], world: World) -> list[torch.Tensor]:
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


def _broadcast_steps(steps: set[int]) -> set[int]:
    """Rank 0's set of steps, on every process."""
    import torch.distributed as dist

    box = [sorted(steps)]
    dist.broadcast_object_list(box, src=0, group=_cpu_group)
    return set(box[0])


def _barrier(world: World) -> None:
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


# ----------------------------------------------------------------------------------------------------------------
# Setup


def resolve_device(cfg: Config, world: World = World()) -> tuple[torch.device, torch.dtype]:
    """The device and the autocast dtype. A GPU-sized config on a machine without CUDA runs in fp32, with one
    warning line that points to cpu.toml; a bf16 (or auto) config on a GPU without bf16 (before sm_80) runs in fp32,
    with one warning line. Under torchrun each process takes the GPU of its LOCAL_RANK."""
    t = cfg.training
    want = t.device
    if want == "auto":
        want = "cuda" if torch.cuda.is_available() else "cpu"
    if want.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"{cfg.source}: training.device: {want!r} requested but CUDA is not available")
    device = torch.device(want)
    if device.type == "cuda" and world.distributed:
        if device.index is not None:
            raise ConfigError(f"{cfg.origin_of('training.device')}: training.device: {want!r} names one GPU, but "
                              f"{world.size} processes share this run: use 'cuda' or 'auto' (each process takes "
                              f"the GPU of its LOCAL_RANK; CUDA_VISIBLE_DEVICES chooses which GPUs)")
        if world.local_size > torch.cuda.device_count():  # every process checks: rank 0 then says it
            raise RunError(f"{world.local_size} processes on this machine (LOCAL_WORLD_SIZE), but it shows "
                           f"{torch.cuda.device_count()} CUDA device(s): start at most that many processes per machine "
                           f"(--nproc_per_node)")
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    if device.type == "cpu":
        # Denormal floats (tiny AdamW moments late in a run) cost x86 CPUs up to 10x per step: a cpu.toml step took
        # 4.3 s instead of 0.45 s on a 2-core machine, with the same losses. Flush them to zero.
        torch.set_flush_denormal(True)
    if device.type == "cpu" and t.expected_device == "cuda":
        warn(f"{cfg.source} is sized for a CUDA GPU and none is in use: running on the CPU in fp32 "
             f"without torch.compile (slow). For a CPU-sized run use --config cpu.toml")
    elif device.type == "cpu" and (t.dtype == "bf16" or t.compile):
        asked = " and ".join(x for x, on in (("training.dtype = 'bf16'", t.dtype == "bf16"),
                                              ("training.compile = true", t.compile)) if on)
        warn(f"{asked}: CUDA only; this run is on the CPU in fp32 without torch.compile")
    if device.type == "cuda" and t.dtype in ("auto", "bf16"):
        props = torch.cuda.get_device_properties(device)
        if torch.version.hip or props.major >= 8:  # bf16 tensor cores: Ampere (sm_80) and later, and ROCm
            return device, torch.bfloat16
        warn(f"{props.name} (sm_{props.major}{props.minor}) has no bf16 support: training.dtype = {t.dtype!r} "
             f"runs in fp32 instead (more memory and time per step); set training.dtype = \"fp32\" to silence this")
    return device, torch.float32


def lr_at(step: int, cfg) -> float:
    """Linear warm-up to cfg.lr over warmup_steps, then cosine decay to min_lr at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only (norm gains and embeddings of size 1-D are not decayed)."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(cfg.beta1, cfg.beta2), fused=device.type == "cuda")


def autocast(device: torch.device, dtype: torch.dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------------
# The step

HELDOUT_MASK_STEP = 2**32 - 1  # the masker's step for held-out windows: a counter no training step uses


def accumulate_gradients(model, micro_batches, amp, class_weight: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward/backward over the micro-batches of one optimizer step; the LM gradients equal those of one batch made
    of all of them (each loss is a mean over its tokens, so each is divided by the number of micro-batches).
    Under DDP the processes' gradients are averaged, once per step.

    A micro-batch is (x, y), or (x, y, classes) for a model with a class head: its loss is then the LM loss plus
    class_weight x the head's mean cross-entropy at that micro-batch's labelled (masked) positions. That term is a
    mean per micro-batch, also divided by their number: its gradient depends on how a step is split into
    micro-batches (not on how they are shared out among processes), as the masked counts differ between them.

    Returns this process's mean LM loss as a 0-d tensor and the class head's (cross-entropy sum, correct, labelled)
    over the micro-batches as a (3,) tensor (zeros without a head), with no host sync."""
    total, class_stats = None, None
    k = len(micro_batches)
    no_sync = getattr(model, "no_sync", None)  # DistributedDataParallel: all-reduce once, in the last backward
    for i, batch in enumerate(micro_batches):
        with no_sync() if no_sync is not None and i < k - 1 else contextlib.nullcontext():
            with amp:
                _, loss, *head = model(*batch)
            objective = loss if not head else loss + class_weight * head[0].loss
            (objective / k).backward()
        total = loss.detach() / k if total is None else total + loss.detach() / k
        if head:
            c = head[0]
            stats = torch.stack([c.loss.detach() * c.count, c.correct.float(), c.count.float()])
            class_stats = stats if class_stats is None else class_stats + stats
    return total, class_stats if class_stats is not None else torch.zeros(3, device=total.device)


@dataclass
class HeldoutConnectives:
    """The connective words in the held-out evaluation windows (fixed for a run), found by
    `genesis.lexicon.find_matches` on each window and the token after it (so a word that continues past the window
    is no match, as in the whole stream), for a per-connective next-token accuracy at every evaluation. One entry
    per piece of every word that lies in its window with a token before it."""

    words: list[str]  # the lexicon's words, by entry
    window: np.ndarray  # (P,) int64: the window (index into eval_starts) of each piece
    col: np.ndarray  # (P,) int64: the input column that predicts the piece (the piece's column - 1)
    occurrence: np.ndarray  # (P,) int64: the word occurrence the piece belongs to, 0..N-1 in window order
    entry: np.ndarray  # (N,) int64: the lexicon entry of each occurrence

    @classmethod
    def find(cls, data: TokenSplit, cfg: Config, lexicon) -> HeldoutConnectives:
        T, B = cfg.model.seq_len, cfg.training.micro_batch
        window, col, occurrence, entry = [], [], [], []
        for w, start in enumerate(eval_starts(len(data), T, cfg.training.eval_batches * B).tolist()):
            for s, length, e in cls.in_window(np.asarray(data.tokens[start : start + T + 1], dtype=np.int64), lexicon):
                window += [w] * length
                col += range(s - 1, s - 1 + length)
                occurrence += [len(entry)] * length
                entry.append(e)
        arrays = (np.array(a, dtype=np.int64) for a in (window, col, occurrence, entry))
        return cls(list(lexicon.words), *arrays)

    @staticmethod
    def in_window(tokens: np.ndarray, lexicon) -> list[tuple[int, int, int]]:
        """(start, length, entry) of the connectives scored in a window of T = len(tokens) - 1 inputs: matched with
        the window's last target token after it, so that a word going on past the window is no connective (for|ged),
        as in the whole stream genesis.evaluate matches on; a word needs a token before it and all its pieces in
        the window."""
        from genesis.lexicon import find_matches

        T = len(tokens) - 1
        return [(s, n, e) for s, n, e in find_matches(tokens, lexicon) if s >= 1 and s + n <= T]

    def batch(self, first: int, count: int) -> slice:
        """The pieces of windows first .. first + count - 1 (contiguous: the pieces are in window order)."""
        lo, hi = np.searchsorted(self.window, [first, first + count])
        return slice(int(lo), int(hi))


@torch.no_grad()
def evaluate_loss(model, data: TokenSplit, cfg: Config, device, amp, world: World = World(), masker=None,
                  connectives: HeldoutConnectives | None = None) -> dict:
    """{"loss": mean next-token loss} over evenly spaced held-out windows (the same windows at every evaluation).
    Several processes share the windows out, batch by batch, vote on stopping before each round and sum their totals.

    For a model with a class head (and the run's masker), also the head's mean cross-entropy and accuracy at the
    masked tokens of the same windows masked by the masker — at a fixed step, so the same tokens at every evaluation
    ("class_loss", "class_accuracy", "class_tokens"): a second pass over each batch, through the trunk and the head
    only. The loss is always that of the unmasked text.

    With `connectives`, also the next-token accuracy at every connective word of the windows (unmasked), per lexicon
    entry, scored as genesis.evaluate scores it: a word counts when every piece is the argmax (teacher-forced), ties
    sharing the credit, and the mean log-probability of the word ("connective_accuracy", "connective_logprob",
    "connective_words", "by_connective": word -> {accuracy, logprob, n})."""
    model.eval()
    T, B = cfg.model.seq_len, cfg.training.micro_batch
    starts = eval_starts(len(data), T, cfg.training.eval_batches * B)
    head = masker is not None and getattr(model, "class_head", None) is not None
    sums = torch.zeros(5 if head else 2, device=device)  # loss x tokens, tokens[, class loss sum, correct, labelled]
    E = len(connectives.words) if connectives is not None else 0
    per_entry = torch.zeros(3, E, dtype=torch.float64, device=device)  # credit, log p, words
    n_batches = math.ceil(len(starts) / B)
    for first in range(0, n_batches, world.size):  # a round: a batch per process, the last ones maybe none
        stop_vote(world)
        i = (first + world.rank) * B
        if i >= len(starts):
            continue
        batch = gather_windows(data, starts[i : i + B], T, device)
        with amp:
            logits, loss = model(batch.x, batch.y)
        sums[0] += loss.float() * batch.x.numel()
        sums[1] += batch.x.numel()
        if E:
            per_entry += _connective_credit(logits, batch.y, connectives, i, B, E)
        if head:
            out = masker(batch.x, step=HELDOUT_MASK_STEP, verse_start=batch.verse_start, row_offset=i)
            with amp:  # the head alone: the output head's (B, T, V) logits are not needed in this pass
                c = class_loss(model.class_head(model.hidden(out.input_ids)), out.classes)
            sums[2:] += torch.stack([c.loss * c.count, c.correct, c.count])
    model.train()
    (packed,) = _all_sum([torch.cat([sums.double(), per_entry.flatten()])], world)  # one collective
    sums, per_entry = packed[: len(sums)].tolist(), packed[len(sums) :].view(3, E)
    # divided in Python: the same numbers from one process as from several
    result = {"loss": sums[0] / sums[1]}
    if E:
        credit, logprob, words = per_entry.tolist()
        n = round(sum(words))
        result.update(connective_accuracy=sum(credit) / n if n else None,
                      connective_logprob=sum(logprob) / n if n else None, connective_words=n, by_connective={
                          connectives.words[e]: {"accuracy": credit[e] / words[e], "logprob": logprob[e] / words[e],
                                                 "n": round(words[e])}
                          for e in range(E) if words[e]})
    if head:
        labelled = sums[4]
        result.update(class_loss=sums[2] / labelled if labelled else None,
                      class_accuracy=sums[3] / labelled if labelled else None, class_tokens=round(labelled))
    return result


def piece_scores(picked: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For logits (P, V) and their true tokens (P,): each piece's credit — 1/m when the true token is one of m tokens
    sharing the maximal logit, else 0 (the expected accuracy of a random tie-break) — and its log-probability, both
    float64. genesis.evaluate's next-token metric and the trainer's held-out connectives score with it."""
    best = picked.max(dim=-1).values
    true = picked.gather(1, target[:, None]).squeeze(1)
    ties = (picked == best[:, None]).sum(dim=-1)
    credit = (true == best).double() / ties.double()
    return credit, torch.log_softmax(picked, dim=-1).gather(1, target[:, None]).squeeze(1).double()


def _connective_credit(logits: torch.Tensor, targets: torch.Tensor, connectives: HeldoutConnectives, first: int,
                       count: int, E: int) -> torch.Tensor:
    """(3, E) float64: the credit, the summed log-probability and the number of connective words per lexicon entry
    in windows first .. first + count - 1 of an evaluation, from their logits (B, T, V) and targets (B, T)."""
    pieces = connectives.batch(first, count)
    if pieces.start == pieces.stop:
        return torch.zeros(3, E, dtype=torch.float64, device=logits.device)
    rows = torch.from_numpy(connectives.window[pieces] - first).to(logits.device)
    cols = torch.from_numpy(connectives.col[pieces]).to(logits.device)
    piece_credit, piece_logprob = piece_scores(logits[rows, cols].float(), targets[rows, cols])
    occurrence = connectives.occurrence[pieces]
    local = torch.from_numpy(occurrence - occurrence[0]).to(logits.device)
    n_words = int(occurrence[-1] - occurrence[0] + 1)
    # the product over a word's pieces, as a sum of logs (a credit of 0 gives -inf, hence 0)
    word_credit = torch.zeros(n_words, dtype=torch.float64, device=logits.device).index_add_(
        0, local, piece_credit.log()).exp()
    word_logprob = torch.zeros(n_words, dtype=torch.float64, device=logits.device).index_add_(0, local, piece_logprob)
    entry = torch.from_numpy(connectives.entry[occurrence[0] : occurrence[-1] + 1]).to(logits.device)
    out = torch.zeros(3, E, dtype=torch.float64, device=logits.device)
    out[0].index_add_(0, entry, word_credit)
    out[1].index_add_(0, entry, word_logprob)
    out[2].index_add_(0, entry, torch.ones_like(word_credit))
    return out


class Progress:
    """A one-line progress bar on stderr, only when attached to a terminal."""

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.enabled, self.t0 = total, enabled and sys.stderr.isatty(), time.time()

    def update(self, step: int, start: int) -> None:
        if not self.enabled:
            return
        frac = step / self.total
        done = max(step - start, 1)
        eta = (time.time() - self.t0) / done * (self.total - step)
        bar = "#" * int(30 * frac)
        sys.stderr.write(f"\r[{bar:<30}] {step}/{self.total}  eta {eta:5.0f}s ")
        sys.stderr.flush()

    def clear(self) -> None:
        if self.enabled:
            sys.stderr.write("\r" + " " * 60 + "\r")


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def save_checkpoint(path: Path, model, optimizer, step: int, cfg: Config, world: World = World()) -> None:
    """Atomic: written to a temporary file, then renamed over the old checkpoint. Rank 0 writes it (every process
    holds the same weights); the others return at once."""
    if not world.main:
        return
    raw = getattr(model, "_orig_mod", model)
    state = {
        "model": raw.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "model_args": vars(raw.args),
        "config": to_dict(cfg),
        "processes": world.size,
    }
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    torch.save(state, tmp)
    os.replace(tmp, path)


# Settings a resumed run may change: how long it runs, how often it logs, evaluates and saves, and where and how
# fast it runs. Anything else (data, tokenizer, model, optimizer, masking, seeds) would make the resumed run train
# something other than what the checkpoint trained.
RESUME_MAY_CHANGE = frozenset({
    "training.steps", "training.eval_every", "training.eval_batches", "training.log_every",
    "training.checkpoint_every", "training.compile", "training.grad_checkpointing", "training.device",
    "training.dtype", "training.expected_device", "training.out_dir", "data.cache_dir", "masking.impl",
})


def _flatten(d: dict, prefix: str = "") -> dict:
    """section.key -> value of a config dict's sections."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and key != "connectives":  # a connectives table compares whole
            out.update(_flatten(value, f"{prefix}{key}."))
        elif prefix:
            out[prefix + key] = value
    return out


def flat_settings(config: dict, source: str | os.PathLike = "the config") -> dict:
    """section.key -> value of a config dict (genesis.config.to_dict form), every key Genesis has now included: a key
    the dict lacks was added to Genesis after it was written, and the run that wrote it had its default (a key it
    has that Genesis no longer has stays, and counts as a difference). A RunError naming `source` if the dict is
    not a table of section tables (a damaged file)."""
    sections = ("data", "tokenizer", "model", "training", "masking")
    if not isinstance(config, dict) or any(not isinstance(config.get(k, {}), dict) for k in sections):
        raise RunError(f"{source}: its recorded config is not a table of [data], [model], ... tables (damaged?)")
    defaults = _flatten({k: v for k, v in to_dict(Config()).items() if k in sections})
    return {**defaults, **_flatten({k: config[k] for k in sections if k in config})}


def resume_changes(saved: dict, now: dict, path: Path, saved_processes: int = 1, processes: int = 1) -> list[str]:
    """Lines naming the settings a resumed run changes (those in RESUME_MAY_CHANGE); a RunError naming every other
    setting that differs from the checkpoint's config.

    The number of processes may change with training.grad_accum when their product, the micro-batches of a step,
    stays the same: micro-batch j of a step is the same data and the same masks whichever process takes it."""
    was, new = flat_settings(saved, path), flat_settings(now)
    was["processes"], new["processes"] = saved_processes, processes
    changed = sorted(k for k in was.keys() | new.keys() if was.get(k) != new.get(k))
    accum = "training.grad_accum"
    same_step = was.get(accum, 1) * saved_processes == new.get(accum, 1) * processes
    refused = [k for k in changed if k not in RESUME_MAY_CHANGE and not (k in ("processes", accum) and same_step)]

    def show(key: str) -> str:
        return f"{key} {was.get(key, '(unset)')!r} -> {new.get(key, '(unset)')!r}"

    if refused:
        hint = ""
        if any(k in ("processes", accum) for k in refused):
            hint = (f"; the processes x training.grad_accum, the micro-batches of a step, must stay "
                    f"{was.get(accum, 1) * saved_processes}")
        raise RunError(f"{path}: --resume with other settings than the run's: {', '.join(map(show, refused))} "
                       f"(a resumed run continues the same training; use --out DIR for a new run){hint}")
    lines = [f"resume: {show(k)}" for k in changed if k != "training.out_dir"]  # out_dir: the run's own config.toml
    if "training.steps" in changed:
        lines.append(f"resume: the learning-rate schedule now ends at step {new['training.steps']}")
    return lines


def write_atomic(path: Path, text: str) -> None:
    """Written to a temporary file, then renamed over `path`: never a half-written file."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise RunError(f"{path}: cannot write ({e.strerror or e})") from None


def trim_metrics(path: Path, step: int) -> set[int]:
    """On resume: drop the records past the checkpoint's `step` from metrics.jsonl (a run killed without a chance
    to save, e.g. SIGKILL or out of memory, logged steps it will train again) and lines cut short by a kill.
    Returns the steps that keep a held-out evaluation (a resumed run does not repeat them)."""
    kept, evaluated = [], set()
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int) or rec["step"] > step:
                continue
            kept.append(line)
            if rec.get("kind") == "eval" and "heldout_loss" in rec:
                evaluated.add(rec["step"])
    write_atomic(path, "".join(line + "\n" for line in kept))
    return evaluated


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def read_checkpoint(path: str | os.PathLike, device="cpu", need=("model", "model_args", "step")) -> dict:
    """The checkpoint dict, with the keys in `need`; a missing, truncated or foreign file is one RunError line."""
    if not Path(path).is_file():
        raise RunError(f"{path}: checkpoint not found")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is no checkpoint of ours
        raise RunError(f"{path}: not a checkpoint (not the zip archive torch.save writes: another kind of file, "
                       f"or one cut short)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:  # objects beyond tensors and plain data: not written by Genesis
        raise RunError(f"{path}: not a Genesis checkpoint (it holds objects other than tensors and plain data)") \
            from None
    except Exception as e:  # torch raises RuntimeError, EOFError, ... for a damaged archive
        raise RunError(f"{path}: not a readable checkpoint ({_first_line(e)})") from None
    if not isinstance(ckpt, dict):
        raise RunError(f"{path}: not a Genesis checkpoint (a {type(ckpt).__name__}, not a dict)")
    missing = [key for key in need if key not in ckpt]
    if missing:
        raise RunError(f"{path}: not a Genesis checkpoint (missing {', '.join(missing)})")
    step = ckpt.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise RunError(f"{path}: not a Genesis checkpoint (step is {step!r})")
    return ckpt


def load_model(path: str | os.PathLike, device="cpu") -> tuple[Llama, dict]:
    """A model from a checkpoint, and the checkpoint dict (config, step)."""
    ckpt = read_checkpoint(path, device)
    try:
        model = Llama(ModelArgs(**ckpt["model_args"])).to(device)
        model.load_state_dict(ckpt["model"])
    except Exception as e:  # TypeError (bad model_args), RuntimeError (weights of another shape), ...
        raise RunError(f"{path}: the weights do not fit the checkpoint's model_args ({_first_line(e)})") from None
    return model, ckpt


# ----------------------------------------------------------------------------------------------------------------
# main


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m genesis.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="a config path, or a bare name from configs/ (cpu.toml)")
    p.add_argument("--mode", help="named preset over model/training keys (microscope, tiny, or [modes.NAME])")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key")
    p.add_argument("--out", help="run directory (default: training.out_dir, else runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in the run directory from its checkpoint")
    p.add_argument("--show-config", action="store_true", help="print the resolved config (and all keys) and exit")
    return p.parse_args(argv)


def setup_run_dir(cfg: Config, out: str | None, resume: bool) -> Path:
    """The run directory, checked; `train()` creates it once the data and the config are known to fit."""
    run_dir = Path(out or cfg.training.out_dir or Path("runs") / cfg.name)
    where = "--out" if out else "training.out_dir" if cfg.training.out_dir else "run directory"
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{run_dir}: {where} names an existing file, not a directory")
    ckpt = run_dir / CHECKPOINT
    if resume and not ckpt.is_file():
        raise RunError(f"{run_dir}: --resume given but there is no {CHECKPOINT} to resume from")
    if not resume and ckpt.is_file():
        raise RunError(f"{run_dir} already holds a run ({CHECKPOINT}); pass --resume to continue it, "
                       f"or --out DIR for a new run")
    return run_dir


def make_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, permission denied, a read-only file system
        raise RunError(f"{run_dir}: cannot create the run directory ({e.strerror or e})") from None


def check_windows(corpus: Corpus, cfg: Config) -> None:
    """Each split must hold one window of seq_len + 1 tokens (inputs and shifted targets)."""
    T = cfg.model.seq_len
    for name in SPLITS:
        n = len(corpus.splits[name])
        if n < T + 1:
            raise ConfigError(f"{cfg.origin_of('model.seq_len')}: model.seq_len: {T} needs at least {T + 1} tokens "
                              f"in each split, but the {name} split of {cfg.data.corpus} has {n}")


def train(cfg: Config, run_dir: Path, resume: bool = False) -> dict:
    """The training loop. Returns a summary (first and last held-out loss, steps, run directory).

    SIGINT and SIGTERM save a checkpoint at any point (`Interrupted` is then raised): in a training step, in an
    evaluation, after the last step. A resumed run continues the step count; one that finds every step done but no
    evaluation of the last step writes it, so metrics.jsonl always ends with the held-out loss of the last step.

    Under torchrun (WORLD_SIZE > 1) the processes train one model data-parallel (DDP): micro-batch j of a step goes
    to process j // grad_accum, its data and masks the same as micro-batch j of a one-process run with grad_accum
    x processes micro-batches; rank 0 logs and writes the run directory."""
    global _quiet
    check_config(cfg)  # a Config built in code has not been through load_config's checks across sections
    world = world_from_env()
    quiet, _quiet = _quiet, _quiet or not world.main
    try:
        with interrupts_handled():
            return _train(cfg, Path(run_dir), resume, world)
    finally:
        _quiet = quiet


def _train(cfg: Config, run_dir: Path, resume: bool, world: World) -> dict:
    device, amp_dtype = resolve_device(cfg, world)
    try:
        with process_group(world, device):
            try:
                return _train_in(cfg, run_dir, resume, world, device, amp_dtype)
            except Exception as e:
                if isinstance(e, Interrupted) or not (world.distributed and _collective_failed(e)):
                    raise
                raise PeerStopped.after(e) from None  # while starting: nothing to save yet
    except (KeyboardInterrupt, Interrupted) as e:
        if _saved:  # e.g. torchrun's own SIGINT after the terminal's, during the teardown: the checkpoint is saved
            e.checkpoint_saved = True
        raise


def _train_in(cfg: Config, run_dir: Path, resume: bool, world: World, device: torch.device,
              amp_dtype: torch.dtype) -> dict:
    global _saved
    t = cfg.training
    _saved = False
    amp = autocast(device, amp_dtype)
    torch.manual_seed(t.seed)
    ckpt = None
    if resume:
        ckpt = read_checkpoint(run_dir / CHECKPOINT, device, need=("model", "optimizer", "step"))
        if "config" in ckpt:  # checkpoints from before configs were saved in them are not checked
            for line in resume_changes(ckpt["config"], to_dict(cfg), run_dir / CHECKPOINT,
                                       ckpt.get("processes", 1), world.size):
                log(line)

    if not world.main:
        _barrier(world)  # rank 0 tokenizes and builds the caches; the others then read them
    corpus: Corpus = prepare(cfg, log=log)
    if world.main:
        _barrier(world)
    check_windows(corpus, cfg)
    check_memory(cfg, corpus.tokenizer.get_vocab_size(with_added_tokens=True), device)  # before the run dir
    tok = corpus.tokenizer
    masker = None
    if cfg.masking.enabled:  # built before the run directory: a masking setting that cannot run leaves nothing
        from genesis.masking import ConnectiveMasker

        masker = ConnectiveMasker.from_tokenizer(tok, cfg.masking, mask_token=cfg.tokenizer.mask_token,
                                                 seed=cfg.masking.seed if cfg.masking.seed is not None else t.seed,
                                                 check_ids=False, log=log).to(device)  # .to: impl chosen now
        log(masker.describe())
    if world.main:
        make_run_dir(run_dir)
    train_data, heldout = corpus.splits["train"], corpus.splits["heldout"]
    # the connectives of the held-out evaluation windows: a per-connective accuracy at every evaluation
    from genesis.masking import resolve_lexicon

    lexicon = masker.lexicon if masker is not None else resolve_lexicon(tok, cfg.masking)
    heldout_connectives = HeldoutConnectives.find(heldout, cfg, lexicon)
    log(f"data: {cfg.data.corpus} | train {len(train_data):,} tokens | held-out {len(heldout):,} tokens "
        f"| vocab {tok.get_vocab_size(with_added_tokens=True):,} | cache {corpus.cache_dir}")

    args = ModelArgs.from_config(cfg.model, tok.get_vocab_size(with_added_tokens=True))
    model = build_model(args, device, cfg)
    model.grad_checkpointing = t.grad_checkpointing
    processes = f" x {world.size} processes (DDP)" if world.distributed else ""
    log(f"model: {model.num_params() / 1e6:.2f} M parameters | {args.n_layers} layers x {args.dim} | "
        f"{args.n_heads} heads | seq {args.seq_len} | device {device}{processes} | "
        f"{str(amp_dtype).replace('torch.', '')}")
    optimizer = make_optimizer(model, t, device)

    start, resumed = 0, ckpt is not None
    if resumed:
        try:
            model.load_state_dict(ckpt["model"])
        except Exception as e:  # RuntimeError: other shapes; TypeError/AttributeError: not a state dict
            raise RunError(f"{run_dir / CHECKPOINT}: does not fit this config's model ({_first_line(e)})") from None
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except Exception as e:  # ValueError: other parameter groups; KeyError: not an optimizer state
            raise RunError(f"{run_dir / CHECKPOINT}: its optimizer state does not fit this config's model "
                           f"({_first_line(e)})") from None
        start = ckpt["step"]
        del ckpt  # the weights now live in the model; do not keep a second copy for the whole run
    # written once the checkpoint (if any) is known to fit: a refused --resume leaves the run as it was
    if world.main:
        write_atomic(run_dir / "tokenizer.json", tok.to_str(pretty=True))  # what tok.save writes
        # with the run directory as out_dir: `--config runs/x/config.toml --resume` finds the run it came from
        ran = dataclasses.replace(cfg, training=dataclasses.replace(t, out_dir=str(run_dir)))
        write_atomic(run_dir / "config.toml", to_toml(ran))
    if resumed:
        log(f"resumed from {run_dir / CHECKPOINT} at step {start}")
        if start >= t.steps:
            log(f"nothing to do: the checkpoint is at step {start} and training.steps = {t.steps}")
    eval_model = model
    if t.compile and device.type == "cuda":
        eval_model = torch.compile(model)
    step_model = eval_model
    if world.distributed:  # after torch.compile, as nanoGPT does; it broadcasts rank 0's weights to the others
        from torch.nn.parallel import DistributedDataParallel

        step_model = DistributedDataParallel(eval_model, device_ids=[device.index] if device.type == "cuda" else None)

    evaluated = set()
    metrics = None  # rank 0's metrics.jsonl; the other processes write nothing
    if world.main:
        evaluated = trim_metrics(run_dir / "metrics.jsonl", start) if resumed else set()
        try:
            metrics = (run_dir / "metrics.jsonl").open("a" if resumed else "w", encoding="utf-8")
        except OSError as e:
            raise RunError(f"{run_dir / 'metrics.jsonl'}: cannot write ({e.strerror or e})") from None
    if resumed and world.distributed:  # every process must agree on which evaluations are still to come
        evaluated = _broadcast_steps(evaluated)

    def record(rec: dict) -> None:
        if world.main:
            metrics.write(json.dumps(rec) + "\n")
            metrics.flush()

    summary: dict = {"run_dir": str(run_dir)}

    def run_eval(step: int) -> None:
        result = evaluate_loss(eval_model, heldout, cfg, device, amp, world, masker, heldout_connectives)
        loss = result["loss"]
        summary.setdefault("first_heldout_loss", loss)
        summary["last_heldout_loss"] = loss
        rec = {"kind": "eval", "step": step, "heldout_loss": loss, "heldout_ppl": math.exp(min(loss, 50))}
        line = f"eval step {step} | held-out loss {loss:.4f} | ppl {rec['heldout_ppl']:.2f}"
        if result.get("connective_words"):
            rec.update({f"heldout_{key}": result[key]
                        for key in ("connective_accuracy", "connective_logprob", "connective_words", "by_connective")})
            line += (f" | {result['connective_words']} connectives: next-token "
                     f"{100 * result['connective_accuracy']:.1f}%, log p {result['connective_logprob']:.2f}")
        if "class_loss" in result:
            rec.update({f"heldout_{key}": result[key] for key in ("class_loss", "class_accuracy", "class_tokens")})
            if result["class_tokens"]:
                line += (f" | class head: loss {result['class_loss']:.3f}, accuracy "
                         f"{100 * result['class_accuracy']:.1f}% at {result['class_tokens']} masked tokens")
        record(rec)
        evaluated.add(step)
        log(line)

    B, T, k = t.micro_batch, cfg.model.seq_len, t.grad_accum
    t_last, steps_since = time.time(), 0  # the steps since the last log line, and when that was (less evaluations)

    def step_values(done: int, loss: torch.Tensor, class_stats: torch.Tensor, masked: list) -> list[float] | None:
        """At a log step, the loss, the masked counts and the class head's statistics summed over the processes
        (their one collective: before the optimizer step, so that a failed one leaves the weights of step
        `completed`); None at other steps."""
        if not (done % t.log_every == 0 or done == t.steps):
            return None
        values = [loss]
        if masker is not None:
            mask_stats = [masker.stats(out, ids) for out, ids in masked]
            values += [sum(s[key] for s in mask_stats) for key in ("masked_tokens", "masked_words")]
        if model.class_head is not None:
            values += list(class_stats.unbind())
        return [v.item() for v in _all_sum(values, world)]

    def log_step(done: int, values: list[float] | None, lr: float, grad_norm: torch.Tensor) -> None:
        """The train record and console line of a log step (`values` from `step_values`). The record first: once it
        is written, step `done` is complete (`updating` ends), even if the console line fails (a closed pipe)."""
        nonlocal t_last, steps_since, updating
        steps_since += 1
        if values is None:
            return
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = (time.time() - t_last) / steps_since
        tokens = B * T * k * world.size
        rec = {"kind": "train", "step": done, "loss": values[0] / world.size, "lr": lr,
               "grad_norm": grad_norm.item(), "tokens_per_s": tokens / dt, "ms_per_step": dt * 1000}
        line = (f"step {done:>6}/{t.steps} | loss {rec['loss']:.4f} | lr {lr:.2e} | grad {rec['grad_norm']:.3f}"
                f" | {rec['tokens_per_s'] / 1e3:8.1f}k tok/s | {rec['ms_per_step']:7.1f} ms/step")
        if masker is not None:
            rec["masked_fraction"] = values[1] / tokens
            rec["masked_connectives"] = round(values[2])
            line += (f" | masked {100 * rec['masked_fraction']:.2f}% of tokens, "
                     f"{rec['masked_connectives']} connectives")
        if model.class_head is not None:  # over this step's masked tokens (every piece of a masked word)
            labelled = values[5]
            rec["class_loss"] = values[3] / labelled if labelled else None
            rec["class_accuracy"] = values[4] / labelled if labelled else None
            if labelled:
                line += f" | class loss {rec['class_loss']:.3f} acc {100 * rec['class_accuracy']:.1f}%"
        if device.type == "cuda":
            rec["mem_gb"] = torch.cuda.max_memory_allocated() / 1e9
            line += f" | mem {rec['mem_gb']:.1f} GB"
        record(rec)
        updating = False
        t_last, steps_since = time.time(), 0
        progress.clear()
        log(line)

    def save_and_raise(e: BaseException) -> None:
        """Save the checkpoint of step `completed` after an interrupt, then raise it (marked as saved)."""
        global _saved
        progress.clear()
        if world.distributed and device.type == "cuda":
            # every process's queued GPU work, collectives included, finishes before any of them leaves: rank 0's
            # save needs the last all-reduce, which needs everyone
            torch.cuda.synchronize()
        try:
            with signals_held():  # a second Ctrl-C does not cut the save short (it is raised after it)
                save_checkpoint(run_dir / CHECKPOINT, model, optimizer, completed, cfg, world)
                _saved = True
                log(f"interrupted: checkpoint at step {completed} saved to {run_dir / CHECKPOINT}; "
                    f"continue with --resume")
        except (KeyboardInterrupt, Interrupted) as again:
            again.checkpoint_saved = True  # main() tells an interrupt before the loop (nothing saved) from these
            raise
        e.checkpoint_saved = True
        raise e

    def save_after_error(e: Exception) -> str:
        """After an error outside the optimizer step (the weights are those of step `completed`): save them, so that
        --resume continues once the cause is fixed. What to tell the user."""
        global _saved
        progress.clear()
        if not world.main:
            return ""
        if world.distributed and device.type == "cuda" and _collective_failed(e):
            # NCCL does not stop the host: this process may have queued later steps behind an all-reduce that will
            # never finish, or that was aborted half-way. Those weights cannot be trusted, nor waited for.
            return "the last checkpoint saved before is kept (after a failed NCCL collective the weights are not)"
        try:
            with signals_held():
                save_checkpoint(run_dir / CHECKPOINT, model, optimizer, completed, cfg, world)
                _saved = True
        except (KeyboardInterrupt, Interrupted):  # raised once the save is done (torchrun stopping the others)
            pass
        except Exception as again:  # a full disk, a dead GPU
            return f"the checkpoint of step {completed} could not be saved ({_first_line(again)})"
        return f"checkpoint at step {completed} saved to {run_dir / CHECKPOINT}; continue with --resume"

    progress = Progress(t.steps, enabled=world.main)
    completed = start  # optimizer steps taken so far: what a checkpoint records
    # from optimizer.step until the step's record is written: an error there may leave half-updated weights, or
    # weights without their record; nothing is saved then (the last checkpoint stays, with all its records)
    updating = False
    # Several processes vote on stopping at every step (and evaluation round) instead of stopping where the signal
    # finds each of them, and save while signals stay deferred; one process stops at once.
    with signals_deferred() if world.distributed else contextlib.nullcontext([]) as late:
        try:
            if t.eval_every and start % t.eval_every == 0 and start < t.steps and start not in evaluated:
                run_eval(start)  # step 0; or the step a resumed run was stopped at, during its evaluation
            t_last = time.time()
            for step in range(start, t.steps):
                stop_vote(world)
                lr = lr_at(step, t)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                micro_batches, masked = [], []
                for micro in range(world.rank * k, (world.rank + 1) * k):  # this process's micro-batches
                    batch = get_batch(train_data, B, T, t.seed, step, rank=0, micro=micro, device=device)
                    x = batch.x
                    if masker is not None:
                        out = masker(x, step=step, verse_start=batch.verse_start, row_offset=micro * B)
                        x = out.input_ids
                        masked.append((out, batch.x))  # counted only at log steps: ~10 small ops saved per step
                    micro_batches.append((x, batch.y) if model.class_head is None else (x, batch.y, out.classes))
                loss, class_stats = accumulate_gradients(step_model, micro_batches, amp, t.class_loss_weight)
                grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                           t.grad_clip if t.grad_clip > 0 else 1e30)
                values = step_values(step + 1, loss, class_stats, masked)
                # the step's record, the weights and the step count change together: a checkpoint at step N always
                # comes with step N's record, so a resumed run's metrics.jsonl equals the uninterrupted run's
                with signals_held():
                    updating = True
                    optimizer.step()
                    completed = step + 1
                    optimizer.zero_grad(set_to_none=True)
                    log_step(completed, values, lr, grad_norm)
                    updating = False
                if t.eval_every and (completed % t.eval_every == 0 or completed == t.steps):
                    progress.clear()
                    t_eval = time.time()
                    run_eval(completed)
                    t_last += time.time() - t_eval  # ms_per_step counts training steps only
                if t.checkpoint_every and completed % t.checkpoint_every == 0 and completed != t.steps:
                    save_checkpoint(run_dir / CHECKPOINT, model, optimizer, completed, cfg, world)
                progress.update(completed, start)
            progress.clear()
            if completed not in evaluated:  # eval_every = 0, or a resumed run stopped during this evaluation
                run_eval(completed)
            with signals_held():
                save_checkpoint(run_dir / CHECKPOINT, model, optimizer, completed, cfg, world)
                _saved = True
        except (KeyboardInterrupt, Interrupted) as e:
            save_and_raise(e)
        except Exception as e:
            if updating:
                raise
            saved = save_after_error(e)
            if world.distributed and _collective_failed(e):
                raise PeerStopped.after(e, saved) from None
            if saved:
                warn(f"training stopped after step {completed} by the error below; {saved}")
            raise
        finally:
            if world.main:
                with contextlib.suppress(OSError):  # every record is flushed: nothing is lost
                    metrics.close()
    if late:  # several processes: a signal after the last vote, during the final evaluation or save
        interrupted = Interrupted(late[0])
        interrupted.checkpoint_saved = True
        log(f"interrupted after the last step: checkpoint at step {completed} saved to {run_dir / CHECKPOINT}")
        raise interrupted
    summary["steps"] = completed
    log(f"done: {summary['steps']} steps | checkpoint {run_dir / CHECKPOINT}")
    return summary


def main(argv=None) -> int:
    from genesis.masking import MaskingError

    args = parse_args(argv)
    handle_interrupts()
    prefix = error_prefix()  # under torchrun rank 0 speaks for the run

    def say(msg: str) -> None:
        if prefix is not None:
            print(prefix + msg, file=sys.stderr)

    try:
        cfg = load_config(args.config, args.mode, args.set)
        if args.show_config:
            if prefix == "":
                print(to_toml(cfg))
                print("# all keys, with defaults:\n" + "\n".join("# " + line for line in describe()))
                sys.stdout.flush()
            return 0
        run_dir = setup_run_dir(cfg, args.out, args.resume)
        train(cfg, run_dir, resume=args.resume)
    except (ConfigError, CorpusError, TokenizerError, RunError, MaskingError) as e:
        say(f"error: {e}")
        return 2
    except BrokenPipeError:  # `--show-config | head`: the reader is gone; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        if not args.show_config:
            say("error: standard output was closed (broken pipe): training stopped")
        return 141
    except OSError as e:  # a cache or run directory that cannot be written, a full disk
        say(f"error: {e.filename or ''}: {e.strerror or e}")
        return 2
    except (Interrupted, KeyboardInterrupt) as e:
        if not getattr(e, "checkpoint_saved", False):
            say("interrupted before the first training step: nothing to save; run the same command again")
        return 128 + e.signum if isinstance(e, Interrupted) else 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
