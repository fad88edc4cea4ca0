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
change: genesis.runs.RESUME_MAY_CHANGE; the number of processes with grad_accum, keeping their product).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import torch

from genesis import console
from genesis.config import Config, ConfigError, check_config, describe, load_config, to_dict, to_toml
from genesis.console import Progress, first_line, log, warn
from genesis.curriculum import Curriculum
from genesis.data import SPLITS, Corpus, TokenSplit, get_batch, prepare
from genesis.device import autocast, keep_freed_memory, set_threads, training_device, use_compile
from genesis.distributed import (
    Interrupted,
    PeerStopped,
    World,
    all_sum,
    barrier,
    broadcast_steps,
    collective_failed,
    error_prefix,
    handle_interrupts,
    interrupts_handled,
    process_group,
    signals_deferred,
    signals_held,
    stop_vote,
    world_from_env,
)
from genesis.errors import run_cli, write_failure
from genesis.heldout import HeldoutConnectives, evaluate_loss
from genesis.model import Llama, ModelArgs, build_model, check_memory, out_of_memory
from genesis.records import HEAD_STATS, eval_record, heads_of, train_record
from genesis.runs import (
    CHECKPOINT,
    METRICS,
    RunError,
    RunLock,
    SaveError,
    claim_run_dir,
    keep_step_checkpoint,
    kept_checkpoint,
    open_metrics,
    read_checkpoint,
    resume_changes,
    save_checkpoint,
    setup_run_dir,
    strict_json,
    write_atomic,
)
from genesis.step import NonFiniteError, NonFiniteGuard, accumulate_gradients, head_labels, lr_at, make_optimizer
from genesis.tensorboard import TensorBoardWriter, check_tensorboard


@dataclass
class Claim:
    """What a training process holds from before its Run exists to its end: rank 0's lock on the run directory, and
    whether the checkpoint has been saved for the way the run is stopping."""

    lock: RunLock | None = None
    saved: bool = False


# ----------------------------------------------------------------------------------------------------------------
# Setup


def check_windows(corpus: Corpus, cfg: Config) -> None:
    """Each split must hold one window of seq_len + 1 tokens (inputs and shifted targets)."""
    T = cfg.model.seq_len
    for name in SPLITS:
        n = len(corpus.splits[name])
        if n < T + 1:
            raise ConfigError(f"{cfg.origin_of('model.seq_len')}: model.seq_len: {T} needs at least {T + 1} tokens "
                              f"in each split, but the {name} split of {cfg.data.corpus} has {n}")


@dataclass
class Run:
    """A training run between its steps: built by `setup`, advanced by `train_step`, `evaluate` and `save`."""

    cfg: Config
    world: World
    device: torch.device
    amp: Any  # the autocast context of every forward pass
    run_dir: Path
    model: Llama
    eval_model: torch.nn.Module  # the model, compiled on CUDA with training.compile
    step_model: torch.nn.Module  # eval_model, in DistributedDataParallel under several processes
    optimizer: torch.optim.Optimizer
    masker: Any  # the ConnectiveMasker, or None without masking
    train_data: TokenSplit
    heldout: TokenSplit
    heldout_connectives: HeldoutConnectives
    start: int  # the step this invocation starts from: a resumed run's checkpoint step, else 0
    metrics: IO[str] | None  # rank 0's metrics.jsonl; the other processes write nothing
    evaluated: set[int]  # the steps metrics.jsonl holds a held-out evaluation of
    progress: Progress
    curriculum: Curriculum  # connective loss weights, adaptive weights, the plateau schedule (state in checkpoints)
    completed: int = 0  # optimizer steps taken so far: what a checkpoint records
    # from optimizer.step until the step's record is written: an error there may leave half-updated weights, or
    # weights without their record; nothing is saved then (the last checkpoint stays, with all its records)
    updating: bool = False
    summary: dict = field(default_factory=dict)
    t_last: float = 0.0  # when the last log line was written (less evaluations since)
    steps_since: int = 0  # the steps since then
    guard: NonFiniteGuard | None = None  # takes the optimizer step unless the loss or gradient norm is non-finite
    saved_step: int | None = None  # the step of the checkpoint in the run directory (None: none yet)
    tensorboard: TensorBoardWriter | None = None  # rank 0's event files with training.tensorboard
    claim: Claim = field(default_factory=Claim)  # the run directory's lock, and whether the run's end was saved


def setup(cfg: Config, run_dir: Path, resume: bool, world: World, device: torch.device,
          amp_dtype: torch.dtype, claim: Claim) -> Run:
    """Data, masker, model and optimizer, the checkpoint loaded on --resume, and the run directory written (claimed
    in `claim`)."""
    t = cfg.training
    amp = autocast(device, amp_dtype)
    torch.manual_seed(t.seed)
    ckpt = None
    if resume and world.main:  # before reading the checkpoint: no other process writes it meanwhile
        claim.lock = claim_run_dir(run_dir, resume, log)
    if resume:
        ckpt = read_checkpoint(run_dir / CHECKPOINT, device, need=("model", "optimizer", "step"))
        if "config" in ckpt:  # checkpoints from before configs were saved in them are not checked
            for line in resume_changes(ckpt["config"], to_dict(cfg), run_dir / CHECKPOINT,
                                       ckpt.get("processes", 1), world.size):
                log(line)

    if not world.main:
        barrier(world)  # rank 0 tokenizes and builds the caches; the others then read them
    corpus: Corpus = prepare(cfg, log=log)
    if world.main:
        barrier(world)
    check_windows(corpus, cfg)
    check_memory(cfg, corpus.tokenizer.get_vocab_size(with_added_tokens=True), device)  # before the run dir
    tok = corpus.tokenizer
    train_data, heldout = corpus.splits["train"], corpus.splits["heldout"]
    masker = None
    if cfg.masking.enabled:  # built before the run directory: a masking setting that cannot run leaves nothing
        masker = build_masker(cfg, tok, train_data, device, ckpt, run_dir / CHECKPOINT)
    heldout_connectives = heldout_connectives_of(cfg, tok, heldout, masker)
    log(f"data: {cfg.data.corpus} | train {len(train_data):,} tokens | held-out {len(heldout):,} tokens "
        f"| vocab {tok.get_vocab_size(with_added_tokens=True):,} | cache {corpus.cache_dir}")

    # the link head names the masker's lexicon entries, the index space of its out.readout
    args = ModelArgs.from_config(cfg.model, tok.get_vocab_size(with_added_tokens=True),
                                 link_words=len(masker.lexicon.words) if masker is not None else 0)
    model = build_model(args, device, cfg)
    if world.main and not resume:  # once the model is built: a run that cannot start leaves no run directory
        claim.lock = claim_run_dir(run_dir, resume, log)
    model.grad_checkpointing = t.grad_checkpointing
    processes = f" x {world.size} processes (DDP)" if world.distributed else ""
    log(f"model: {model.num_params() / 1e6:.2f} M parameters | {args.n_layers} layers x {args.dim} | "
        f"{args.n_heads} heads | seq {args.seq_len} | device {device}{processes} | "
        f"{str(amp_dtype).replace('torch.', '')}")
    optimizer = make_optimizer(model, t, device)

    start, resumed, skipped = 0, ckpt is not None, []
    if resumed:
        try:
            model.load_state_dict(ckpt["model"])
        except Exception as e:  # RuntimeError: other shapes; TypeError/AttributeError: not a state dict
            raise RunError(f"{run_dir / CHECKPOINT}: does not fit this config's model ({first_line(e)})") from None
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
        except Exception as e:  # ValueError: other parameter groups; KeyError: not an optimizer state
            raise RunError(f"{run_dir / CHECKPOINT}: its optimizer state does not fit this config's model "
                           f"({first_line(e)})") from None
        start, skipped = ckpt["step"], ckpt.get("nonfinite_skipped", [])
        curriculum_state = ckpt.get("curriculum", {})
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
            log(f"nothing to do: the checkpoint is at step {start} and training.steps = {t.steps}; to train on, "
                f"resume with --set training.steps=N (N > {start})")
    eval_model = model
    if use_compile(t.compile, device, log):
        eval_model = torch.compile(model)
    step_model = eval_model
    if world.distributed:  # after torch.compile, as nanoGPT does; it broadcasts rank 0's weights to the others
        from torch.nn.parallel import DistributedDataParallel

        step_model = DistributedDataParallel(eval_model, device_ids=[device.index] if device.type == "cuda" else None)

    curriculum = Curriculum(cfg, masker, device)
    if resumed:
        curriculum.load_state_dict(curriculum_state, main=world.main)
    evaluated, metrics, tensorboard = set(), None, None
    if world.main:
        metrics, evaluated = open_metrics(run_dir, start, resumed)
        tensorboard = TensorBoardWriter(run_dir, start if resumed else None) if t.tensorboard else None
    if resumed and world.distributed:  # every process must agree on which evaluations are still to come
        evaluated = broadcast_steps(evaluated)
    run = Run(cfg=cfg, world=world, device=device, amp=amp, run_dir=run_dir, model=model, eval_model=eval_model,
              step_model=step_model, optimizer=optimizer, masker=masker, train_data=train_data, heldout=heldout,
              heldout_connectives=heldout_connectives, start=start, metrics=metrics, evaluated=evaluated,
              progress=Progress(t.steps, enabled=world.main, keep=False), curriculum=curriculum, completed=start,
              summary={"run_dir": str(run_dir)}, t_last=time.time(), tensorboard=tensorboard, claim=claim,
              guard=NonFiniteGuard(optimizer, t.skip_nonfinite, skipped), saved_step=start if resumed else None)
    if masker is not None and masker.control_arm is not None and not resumed:  # a resumed run keeps its step-0 one
        record(run, {"kind": "control", "step": 0, **masker.control_arm.record()})
    return run


def heldout_connectives_of(cfg: Config, tok: Any, heldout: TokenSplit, masker: Any) -> HeldoutConnectives:
    """The connectives of the held-out evaluation windows: a per-connective accuracy at every evaluation (the real
    connectives, also under the control arm, whose masker's lexicon holds its control words)."""
    from genesis.masking import resolve_lexicon

    if masker is None:
        lexicon = resolve_lexicon(tok, cfg.masking)
    else:
        lexicon = masker.reference_lexicon if masker.control_arm is not None else masker.lexicon
    return HeldoutConnectives.find(heldout, cfg, lexicon)


def build_masker(cfg: Config, tok: Any, train_data: TokenSplit, device: torch.device, ckpt: dict | None,
                 checkpoint: Path) -> Any:
    """The run's ConnectiveMasker on `device` (its impl chosen now); for strategy = "random" the control arm's,
    chosen from the training split, and on --resume checked against the words and p the checkpoint recorded."""
    from genesis.masking import ConnectiveMasker

    seed = cfg.masking.seed if cfg.masking.seed is not None else cfg.training.seed
    if cfg.masking.strategy != "random":
        masker = ConnectiveMasker.from_tokenizer(tok, cfg.masking, mask_token=cfg.tokenizer.mask_token, seed=seed,
                                                 check_ids=False, log=log)
    else:
        masker = ConnectiveMasker.control(tok, cfg.masking, train_data.tokens, verse_start=train_data.verse_start,
                                          seq_len=cfg.model.seq_len, mask_token=cfg.tokenizer.mask_token, seed=seed,
                                          check_ids=False, log=log, warn=warn)
        recorded = (ckpt or {}).get("control")
        if recorded is not None:
            now = masker.control_arm.record()
            if recorded["words"] != now["words"] or not math.isclose(recorded["probability"], now["probability"],
                                                                     rel_tol=1e-9):
                raise RunError(f"{checkpoint}: the control arm now chooses other words or p than it recorded (p "
                               f"{now['probability']:.6g} vs {recorded['probability']:.6g}): the training split or "
                               f"the tokenizer changed; start a new run")
    log(masker.describe())
    if masker.control_arm is not None:  # the words and p, for a reader of the run's log
        log(masker.control_arm.describe())
    return masker.to(device)


# ----------------------------------------------------------------------------------------------------------------
# The step


def train_step(run: Run, step: int) -> None:
    """Optimizer step `step` + 1: forward/backward over this process's micro-batches (masked by the masker), the
    update, and at a log step its record and console line."""
    t, world, model, masker = run.cfg.training, run.world, run.model, run.masker
    B, T, k = t.micro_batch, run.cfg.model.seq_len, t.grad_accum
    stop_vote(world)
    lr = lr_at(step, t)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    micro_batches, masked, loss_weights, firsts = [], [], [], []
    for micro in range(world.rank * k, (world.rank + 1) * k):  # this process's micro-batches
        batch = get_batch(run.train_data, B, T, t.seed, step, rank=0, micro=micro, device=run.device)
        x = batch.x
        if masker is not None:
            out = masker(x, step=step, verse_start=batch.verse_start, row_offset=micro * B)
            x = out.input_ids
            masked.append((out, batch.x))  # counted only at log steps: ~10 small ops saved per step
        micro_batches.append((x, batch.y, *(head_labels(model, out) if masker is not None else ())))
        weights, first = run.curriculum.micro_batch(batch.x, batch.y)
        loss_weights.append(weights)
        firsts.append(first)
    observe = None
    if run.curriculum.adaptive:
        def observe(i, logits):
            run.curriculum.observe(logits, micro_batches[i][1], firsts[i])
    loss, *head_stats = accumulate_gradients(run.step_model, micro_batches, run.amp, t.class_loss_weight,
                                             loss_weights if run.curriculum.loss_weight != 1.0 else None, observe,
                                             t.link_loss_weight)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else 1e30)
    values = step_values(run, step + 1, loss, head_stats, masked)
    adapt_counts = all_sum([run.curriculum.counts], world)[0] if run.curriculum.adapt_due(step + 1) else None
    # the step's record, the weights and the step count change together: a checkpoint at step N always comes with
    # step N's record, so a resumed run's metrics.jsonl equals the uninterrupted run's
    with signals_held():
        run.updating = True
        run.guard.step(step + 1, loss, grad_norm)  # the optimizer step, unless either is non-finite
        run.completed = step + 1
        run.optimizer.zero_grad(set_to_none=True)
        check_finite(run, sync=values is not None)  # at a log step, after its sync: free
        if adapt_counts is not None:
            adapt_step(run, run.completed, adapt_counts)
        log_step(run, run.completed, values, lr, grad_norm)
        run.updating = False


def adapt_step(run: Run, done: int, counts: torch.Tensor) -> None:
    """masking.adaptive: update the masker's weights from the step's summed counters; record the changed ones."""
    observed = int(counts[1].sum())  # before the update: in one process `counts` are the counters it resets
    changed = run.curriculum.adapt(counts)
    rec = {"kind": "adapt", "step": done, "observed": observed,
           "weights": {word: new for word, (_, new) in changed.items()}}
    record(run, rec)
    shown = ", ".join(f"{word} {old:.3g}->{new:.3g}" for word, (old, new) in list(changed.items())[:12])
    more = f" (+{len(changed) - 12} more)" if len(changed) > 12 else ""
    run.progress.clear()
    log(f"adapt step {done} | {observed} connective targets | {len(changed)} weights changed"
        + (f": {shown}{more}" if changed else ""))


def step_values(run: Run, done: int, loss: torch.Tensor, head_stats: tuple[torch.Tensor, torch.Tensor],
                masked: list) -> dict[str, float] | None:
    """At a log step, the loss, the masker's counts (`ConnectiveMasker.stats`, by name) and the class and link
    heads' statistics (`records.HEAD_STATS`: "class_loss_sum", "class_correct", ...), summed over the processes
    (their one collective: before the optimizer step, so that a failed one leaves the weights of step `completed`);
    None at other steps."""
    t = run.cfg.training
    if not (done % t.log_every == 0 or done == t.steps):
        return None
    values = {"loss": loss}
    if run.masker is not None:
        mask_stats = [run.masker.stats(out, ids) for out, ids in masked]
        values.update({key: sum(s[key] for s in mask_stats) for key in mask_stats[0]})
    for name, stats in zip(HEAD_STATS, head_stats):
        if name in heads_of(run.model):
            values.update(zip(HEAD_STATS[name], stats.unbind()))
    return dict(zip(values, (v.item() for v in all_sum(list(values.values()), run.world))))


def log_step(run: Run, done: int, values: dict[str, float] | None, lr: float, grad_norm: torch.Tensor) -> None:
    """The train record and console line of a log step (`values` from `step_values`). The record first: once it is
    written, step `done` is complete (`updating` ends), even if the console line fails (a closed pipe)."""
    run.steps_since += 1
    if values is None:
        return
    if run.device.type == "cuda":
        torch.cuda.synchronize()
    rec, line = train_record(run, done, values, lr, grad_norm, (time.time() - run.t_last) / run.steps_since)
    if run.curriculum.watch_loss(done, rec["loss"]):
        rec["plateau_step"] = done
        line += f" | plateau: masking starts ramping at step {done}"
    record(run, rec)
    run.updating = False
    run.t_last, run.steps_since = time.time(), 0
    run.progress.clear()
    log(line)


def record(run: Run, rec: dict) -> None:
    """One line of metrics.jsonl, flushed (rank 0 only), and its scalars in the TensorBoard event files."""
    if run.world.main:
        try:
            run.metrics.write(strict_json(rec) + "\n")
            run.metrics.flush()
        except OSError as e:  # a full disk: the step's record is lost, so the step is not saved either
            path = run.run_dir / METRICS
            raise RunError(f"{path}: cannot write the record of step {rec['step']} ({write_failure(e, path)}); "
                           f"training stopped, {kept_checkpoint(run.run_dir / CHECKPOINT, run.saved_step)}") from None
        if run.tensorboard is not None:
            run.tensorboard.write(rec)


# ----------------------------------------------------------------------------------------------------------------
# Evaluate and save


def evaluate(run: Run, step: int) -> None:
    """The held-out evaluation of step `step`: its record and console line."""
    result = evaluate_loss(run.eval_model, run.heldout, run.cfg, run.device, run.amp, run.world, run.masker,
                           run.heldout_connectives)
    run.summary.setdefault("first_heldout_loss", result["loss"])
    run.summary["last_heldout_loss"] = result["loss"]
    rec, line = eval_record(result, step)
    record(run, rec)
    run.evaluated.add(step)
    log(line)


def save(run: Run, every_process: bool = True) -> None:
    """The checkpoint of step `completed` (rank 0 writes it), and its checkpoint-<step>.pt with keep_checkpoints;
    first the steps not checked for non-finite values yet (a NonFiniteError then saves nothing). `every_process`: all
    processes call it (the adaptive counters are summed over them: one collective); else rank 0 alone saves its own
    counters."""
    check_finite(run)
    counts = None
    if run.curriculum.adaptive and run.world.distributed and every_process:
        counts = all_sum([run.curriculum.counts], run.world)[0]
    extra = {"nonfinite_skipped": run.guard.skipped, "curriculum": run.curriculum.state_dict(counts)}
    if run.masker is not None and run.masker.control_arm is not None:  # what --resume checks its own choice against
        extra["control"] = run.masker.control_arm.record()
    save_checkpoint(run.run_dir / CHECKPOINT, run.model, run.optimizer, run.completed, run.cfg, run.world,
                    extra=extra, saved_step=run.saved_step)
    run.saved_step = run.completed
    if run.world.main:
        keep_step_checkpoint(run.run_dir / CHECKPOINT, run.completed, run.cfg.training.keep_checkpoints)


def check_finite(run: Run, sync: bool = True) -> None:
    """The guard's check of the steps since the last: a line per skipped step; a NonFiniteError (nothing saved)
    beyond training.skip_nonfinite."""
    try:
        lines = run.guard.check(sync)
    except NonFiniteError as e:
        kept = (f"its checkpoint of step {run.saved_step} is kept in {run.run_dir / CHECKPOINT}"
                if run.saved_step is not None else "before its first checkpoint: nothing saved")
        raise NonFiniteError(f"{e}; training stopped, {kept} (lower training.lr, or set training.skip_nonfinite to "
                             f"skip such steps)") from None
    for line in lines:
        warn(line)


def save_and_raise(run: Run, e: BaseException) -> None:
    """Save the checkpoint of step `completed` after an interrupt, then raise it (marked as saved)."""
    run.progress.clear()
    if run.world.distributed and run.device.type == "cuda":
        # every process's queued GPU work, collectives included, finishes before any of them leaves: rank 0's save
        # needs the last all-reduce, which needs everyone
        torch.cuda.synchronize()
    try:
        with signals_held():  # a second Ctrl-C does not cut the save short (it is raised after it)
            save(run)
            run.claim.saved = True
            log(f"interrupted: checkpoint at step {run.completed} saved to {run.run_dir / CHECKPOINT}; "
                f"continue with --resume")
    except (KeyboardInterrupt, Interrupted) as again:
        again.checkpoint_saved = True  # main() tells an interrupt before the loop (nothing saved) from these
        raise
    e.checkpoint_saved = True
    raise e


def save_after_error(run: Run, e: Exception) -> str:
    """After an error outside the optimizer step (the weights are those of step `completed`): save them, so that
    --resume continues once the cause is fixed. What to tell the user."""
    run.progress.clear()
    if not run.world.main:
        return ""
    if run.world.distributed and run.device.type == "cuda" and collective_failed(e):
        # NCCL does not stop the host: this process may have queued later steps behind an all-reduce that will
        # never finish, or that was aborted half-way. Those weights cannot be trusted, nor waited for.
        return "the last checkpoint saved before is kept (after a failed NCCL collective the weights are not)"
    try:
        with signals_held():
            save(run, every_process=False)
            run.claim.saved = True
    except (KeyboardInterrupt, Interrupted):  # raised once the save is done (torchrun stopping the others)
        pass
    except Exception as again:  # a full disk, a dead GPU
        return f"the checkpoint of step {run.completed} could not be saved ({first_line(again)})"
    return f"checkpoint at step {run.completed} saved to {run.run_dir / CHECKPOINT}; continue with --resume"


# ----------------------------------------------------------------------------------------------------------------
# The loop


def train_loop(run: Run) -> dict:
    """Steps from `start` to training.steps, evaluating and saving on schedule; the last step's evaluation and
    checkpoint; a checkpoint also when a signal or an error outside the optimizer step stops it."""
    t, world = run.cfg.training, run.world
    # Several processes vote on stopping at every step (and evaluation round) instead of stopping where the signal
    # finds each of them, and save while signals stay deferred; one process stops at once.
    with signals_deferred() if world.distributed else contextlib.nullcontext([]) as late:
        try:
            start = run.start
            if t.eval_every and start % t.eval_every == 0 and start < t.steps and start not in run.evaluated:
                evaluate(run, start)  # step 0; or the step a resumed run was stopped at, during its evaluation
            run.t_last = time.time()
            for step in range(run.start, t.steps):
                train_step(run, step)
                if t.eval_every and (run.completed % t.eval_every == 0 or run.completed == t.steps):
                    run.progress.clear()
                    t_eval = time.time()
                    evaluate(run, run.completed)
                    run.t_last += time.time() - t_eval  # ms_per_step counts training steps only
                if t.checkpoint_every and run.completed % t.checkpoint_every == 0 and run.completed != t.steps:
                    save(run)
                run.progress.update(run.completed, run.start)
            run.progress.clear()
            if run.completed not in run.evaluated:  # eval_every = 0, or a resumed run stopped during this evaluation
                evaluate(run, run.completed)
            with signals_held():
                save(run)
                run.claim.saved = True
        except (KeyboardInterrupt, Interrupted) as e:
            save_and_raise(run, e)
        except (NonFiniteError, SaveError):  # one line; the checkpoint saved before stays as it is
            raise
        except Exception as e:
            reason = out_of_memory(e)
            if run.updating:
                if reason:
                    raise RunError(oom_line(run, reason, "the last checkpoint saved before is kept")) from None
                raise
            if reason and run.completed == run.start:  # no step taken: nothing worth saving (lower the batch)
                raise RunError(oom_line(run, reason, "nothing saved")) from None
            saved = save_after_error(run, e)
            if reason:
                raise RunError(oom_line(run, reason, saved or "rank 0 saves the run")) from None
            if world.distributed and collective_failed(e):
                raise PeerStopped.after(e, saved) from None
            if saved:
                warn(f"training stopped after step {run.completed} by the error below; {saved}")
            raise
        finally:
            if world.main:
                with contextlib.suppress(OSError):  # every record is flushed: nothing is lost
                    run.metrics.close()
                    if run.tensorboard is not None:
                        run.tensorboard.close()
    return finish(run, late)


def oom_line(run: Run, reason: str, saved: str) -> str:
    """The one line of an out-of-memory error in a step or an evaluation."""
    hint = "" if run.cfg.training.grad_checkpointing else ", or set training.grad_checkpointing = true"
    return (f"out of memory in step {run.completed + 1} on {run.device} ({reason}): lower training.micro_batch "
            f"(raise training.grad_accum to keep the step) or model.seq_len{hint}; {saved}")


def finish(run: Run, late: list[int]) -> dict:
    """The summary of a finished run; `Interrupted` for a signal after the last vote (several processes), during
    the final evaluation or save."""
    if late:
        interrupted = Interrupted(late[0])
        interrupted.checkpoint_saved = True
        log(f"interrupted after the last step: checkpoint at step {run.completed} saved to "
            f"{run.run_dir / CHECKPOINT}")
        raise interrupted
    run.summary["steps"] = run.completed
    log(f"done: {run.summary['steps']} steps | checkpoint {run.run_dir / CHECKPOINT}")
    return run.summary


# ----------------------------------------------------------------------------------------------------------------
# main


def train(cfg: Config, run_dir: Path, resume: bool = False) -> dict:
    """The training loop. Returns a summary (first and last held-out loss, steps, run directory).

    SIGINT and SIGTERM save a checkpoint at any point (`Interrupted` is then raised): in a training step, in an
    evaluation, after the last step. A resumed run continues the step count; one that finds every step done but no
    evaluation of the last step writes it, so metrics.jsonl always ends with the held-out loss of the last step.

    Under torchrun (WORLD_SIZE > 1) the processes train one model data-parallel (DDP): micro-batch j of a step goes
    to process j // grad_accum, its data and masks the same as micro-batch j of a one-process run with grad_accum
    x processes micro-batches; rank 0 logs and writes the run directory."""
    check_config(cfg)  # a Config built in code has not been through load_config's checks across sections
    check_tensorboard(cfg)  # before the run directory: a missing package is one line
    world = world_from_env()
    quiet, console.quiet = console.quiet, console.quiet or not world.main
    try:
        with interrupts_handled():
            return _train(cfg, Path(run_dir), resume, world)
    finally:
        console.quiet = quiet


def _train(cfg: Config, run_dir: Path, resume: bool, world: World) -> dict:
    claim = Claim()
    device, amp_dtype = training_device(cfg, world)
    set_threads(cfg.training.threads, device, log)
    keep_freed_memory(device)
    try:
        with process_group(world, device):
            try:
                run = setup(cfg, run_dir, resume, world, device, amp_dtype, claim)
                return train_loop(run)
            except Exception as e:
                if isinstance(e, Interrupted) or not (world.distributed and collective_failed(e)):
                    raise
                raise PeerStopped.after(e) from None  # while starting: nothing to save yet
    except (KeyboardInterrupt, Interrupted) as e:
        if claim.saved:  # e.g. torchrun's own SIGINT after the terminal's, during the teardown: the checkpoint is saved
            e.checkpoint_saved = True
        raise
    finally:
        if claim.lock is not None:
            claim.lock.release() if resume else claim.lock.abandon(run_dir)  # a failed start leaves no directory


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m genesis.train", description=__doc__.split("\n")[0])
    p.add_argument("--config", required=True, help="a config path, or a bare name from configs/ (cpu.toml)")
    p.add_argument("--mode", help="named preset over model/training keys (microscope, tiny, or [modes.NAME])")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a config key")
    p.add_argument("--out", help="run directory (default: training.out_dir, else runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in the run directory from its checkpoint")
    p.add_argument("--show-config", action="store_true", help="print the resolved config (and all keys) and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    handle_interrupts()
    prefix = error_prefix()  # under torchrun rank 0 speaks for the run

    def say(msg: str) -> None:
        if prefix is not None:
            print(prefix + msg, file=sys.stderr)

    def body() -> int:
        cfg = load_config(args.config, args.mode, args.set)
        if args.show_config:
            if prefix == "":
                print(to_toml(cfg))
                print("# all keys, with defaults:\n" + "\n".join("# " + line for line in describe()))
                sys.stdout.flush()
            return 0
        train(cfg, setup_run_dir(cfg, args.out, args.resume), resume=args.resume)
        return 0

    # `--show-config | head`: the reader is gone, nothing more to say; a training run says why it stopped
    stopped = None if args.show_config else "error: standard output was closed (broken pipe): training stopped"
    try:
        return run_cli(body, say, broken_pipe=stopped)
    except (Interrupted, KeyboardInterrupt) as e:
        if not getattr(e, "checkpoint_saved", False):
            say("interrupted before the first training step: nothing to save; run the same command again")
        return 128 + e.signum if isinstance(e, Interrupted) else 130


if __name__ == "__main__":
    sys.exit(main())
