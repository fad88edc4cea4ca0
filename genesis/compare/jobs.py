"""The comparison's jobs: `genesis.train` processes (up to --jobs at once), the evaluation thread, and run_all, which
trains and evaluates every run not done yet."""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from contextlib import suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from genesis.config import to_toml
from genesis.device import flushed_denormals, usable_cores
from genesis.evaluate import EvalContext, checkpoint_identity, evaluate_checkpoint, write_json
from genesis.runs import CHECKPOINT, read_checkpoint

from .plan import RunSpec, check_run_dir, eval_settings, last_heldout_loss, read_json

RUN_CONFIG = "compare.toml"  # the run's resolved config, as `genesis.train --config` reads it
LOG_TAIL = 15  # lines of a failed run's train.log shown on the terminal


def train_command(spec: RunSpec, resume: bool) -> list[str]:
    """The `genesis.train` command line that trains (or resumes) one run from its config file."""
    return [sys.executable, "-m", "genesis.train", "--config", str(spec.run_dir / RUN_CONFIG),
            "--out", str(spec.run_dir), *(["--resume"] if resume else [])]


def visible_gpus() -> list[str]:
    """The CUDA devices this process may use, as CUDA_VISIBLE_DEVICES entries (names it gives, else indices)."""
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    if "CUDA_VISIBLE_DEVICES" in os.environ:
        return listed
    return [str(i) for i in range(torch.cuda.device_count())]


def run_env(cfg, slot: int, jobs: int) -> dict[str, str]:
    """The environment of the training process in job slot `slot` (0 .. jobs - 1): the same Genesis code as this
    process; on GPUs one visible device, round-robin over the slots (several slots share a device when there are
    more slots than devices); on the CPU, with several jobs, the cores shared out (torch's intra-op threads)."""
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the checkout that holds genesis/
    env["PYTHONPATH"] = os.pathsep.join([root, *filter(None, [env.get("PYTHONPATH")])])
    gpus = visible_gpus() if cfg.training.device in ("auto", "cuda") and torch.cuda.is_available() else []
    if gpus:
        env["CUDA_VISIBLE_DEVICES"] = gpus[slot % len(gpus)]
    elif jobs > 1:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(max(1, usable_cores() // jobs))
    return env


@dataclass
class Training:
    """One `genesis.train` process of the comparison."""
    spec: RunSpec
    head: str  # "[k/n] name", the run's prefix on the terminal
    slot: int
    resumed: bool
    process: subprocess.Popen
    log: Any  # the open train.log the process writes to
    t0: float


def start_training(spec: RunSpec, cfg, head: str, slot: int, jobs: int) -> Training:
    """Start training one run in its own process (its output appended to the run's train.log), resuming from its
    checkpoint if an earlier invocation was interrupted. The process has its own session: a Ctrl-C reaches this
    process only, which then stops the runs (`stop_training`)."""
    resume = (spec.run_dir / CHECKPOINT).is_file()
    (spec.run_dir / RUN_CONFIG).write_text(to_toml(cfg))
    log = (spec.run_dir / "train.log").open("a")
    process = subprocess.Popen(train_command(spec, resume), stdout=log, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, env=run_env(cfg, slot, jobs), start_new_session=True)
    return Training(spec, head, slot, resume, process, log, time.time())


def finish_training(job: Training) -> dict:
    """The record written to train.done (the marker that makes later invocations skip the run) once its process
    exited with status 0."""
    job.log.close()
    summary = {"run_dir": str(job.spec.run_dir),
               "steps": read_checkpoint(job.spec.run_dir / CHECKPOINT, need=("step",))["step"]}
    done = {"summary": summary, "train_s": round(time.time() - job.t0, 1), "resumed": job.resumed}
    done["summary"]["last_heldout_loss"] = last_heldout_loss(done, job.spec.run_dir)
    write_json(done, job.spec.run_dir / "train.done")
    return done


def stop_training(jobs: list[Training]) -> None:
    """SIGTERM to every training process still running (each saves its checkpoint), then wait for them."""
    for job in jobs:
        if job.process.poll() is None:
            job.process.send_signal(signal.SIGTERM)
    for job in jobs:
        with suppress(Exception):
            job.process.wait()
        job.log.close()


def log_tail(path: Path, lines: int = LOG_TAIL) -> str:
    try:
        return "\n".join("    " + line for line in path.read_text(errors="replace").splitlines()[-lines:])
    except OSError as e:
        return f"    ({path}: {e.strerror or e})"


def reusable_eval(spec: RunSpec, args: argparse.Namespace) -> dict | None:
    """The run's eval.json if it still answers: computed with these evaluation settings from the checkpoint that is
    in the run directory now (`genesis.evaluate.run_identity`: same step, same hash of weights, config and
    tokenizer). A checkpoint changed since (training continued or redone, a file copied in) or an eval.json from
    before identities were recorded means evaluating again; rewriting identical weights does not."""
    old = read_json(spec.run_dir / "eval.json")
    if old is None or old.get("compare_settings") != eval_settings(args):
        return None
    if ((old.get("link") or {}).get("probe") or {}).get("max_train") != args.probe_max_train:
        return None  # the probe was fitted on another number of training occurrences (recorded by what it measured)
    try:
        identity = checkpoint_identity(spec.run_dir / CHECKPOINT)
    except Exception:  # missing, truncated, foreign: not the one measured; evaluating it reports the error in one line
        return None
    return old if old.get("checkpoint_identity") == identity else None


def evaluate_run(spec: RunSpec, args: argparse.Namespace, ctx: EvalContext | None) -> tuple[dict, EvalContext | None]:
    """Evaluate one trained run and write its eval.json; the context is shared between runs."""
    path = spec.run_dir / "eval.json"
    settings = eval_settings(args)
    t0 = time.time()
    result, ctx = evaluate_checkpoint(spec.run_dir / CHECKPOINT, args.corpus, "heldout", args.max_items,
                                      args.context_verses, args.device, args.batch_tokens, progress=True, ctx=ctx,
                                      context_k=args.context_k, probe_max_train=args.probe_max_train)
    result["compare_settings"] = settings
    result["eval_s"] = round(time.time() - t0, 1)
    write_json(result, path)
    return result, ctx



class Evaluation:
    """`evaluate_run` in a daemon thread (an interrupt does not wait for it; eval.json is written atomically, so an
    unfinished one leaves nothing). CPU denormals are flushed in the thread too: the setting is per thread."""

    def __init__(self, spec: RunSpec, args: argparse.Namespace, ctx: EvalContext | None):
        self.spec = spec
        self._out: tuple | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(spec, args, ctx), daemon=True,
                                        name=f"evaluate {spec.name}")
        self._thread.start()

    def _run(self, spec: RunSpec, args: argparse.Namespace, ctx: EvalContext | None) -> None:
        try:
            with flushed_denormals():
                self._out = evaluate_run(spec, args, ctx)
        except BaseException as e:  # handed to the main thread by result()
            self._error = e

    def done(self) -> bool:
        return not self._thread.is_alive()

    def result(self) -> tuple[dict, EvalContext | None]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._out


def run_all(runs: list[RunSpec], args: argparse.Namespace, t0: float) -> tuple[dict, dict, list[str]]:
    """Train (up to args.jobs processes at once) and evaluate (in this process, one run at a time, as each run's
    training ends) every run not done yet. An evaluation runs in a thread while this loop goes on polling, so a job
    slot whose training ends during an evaluation is filled at once. Returns the train.done and eval.json records
    of the runs that finished and the names of those whose training failed: a failure is reported with its log's
    tail, the others go on."""
    trained, evaluated, failed = {}, {}, []
    waiting, ready = [], []  # runs to train; trained runs to evaluate
    for k, spec in enumerate(runs, start=1):
        head = f"[{k}/{len(runs)}] {spec.name}"
        cfg = check_run_dir(spec, args)  # every run's settings checked before any training starts
        done = read_json(spec.run_dir / "train.done")
        if done is not None and not (spec.run_dir / CHECKPOINT).is_file():
            print(f"{head}: training was done but {CHECKPOINT} is gone: training again", flush=True)
            (spec.run_dir / "train.done").unlink()  # an interrupted retraining must not pass for a finished one
            done = None
        if done is not None:
            print(f"{head}: training done, skipping", flush=True)
            trained[spec.name] = done
            ready.append((head, spec))
        else:
            waiting.append((head, spec, cfg))
    running: list[Training] = []
    evaluation: Evaluation | None = None
    ctx = None
    try:
        while waiting or running or ready or evaluation:
            free = [slot for slot in range(args.jobs) if slot not in {job.slot for job in running}]
            while free and waiting:
                head, spec, cfg = waiting.pop(0)
                job = start_training(spec, cfg, head, free.pop(0), args.jobs)
                running.append(job)
                print(f"{head}: {'resuming training' if job.resumed else 'training'} "
                      f"({time.time() - t0:.0f} s elapsed; log {spec.run_dir / 'train.log'})", flush=True)
            for job in [j for j in running if j.process.poll() is not None]:
                running.remove(job)
                if job.process.returncode == 0:
                    trained[job.spec.name] = finish_training(job)
                    print(f"{job.head}: trained in {trained[job.spec.name]['train_s']:.0f} s", flush=True)
                    ready.append((job.head, job.spec))
                else:
                    job.log.close()
                    failed.append(job.spec.name)
                    log = job.spec.run_dir / "train.log"
                    print(f"{job.head}: training failed (exit status {job.process.returncode}); the last lines of "
                          f"{log}:\n{log_tail(log)}", file=sys.stderr, flush=True)
            if evaluation is not None and evaluation.done():
                evaluated[evaluation.spec.name], ctx = evaluation.result()  # an evaluation's error is raised here
                evaluation = None
            if ready and evaluation is None:
                head, spec = ready.pop(0)
                reused = reusable_eval(spec, args)
                if reused is not None:
                    print(f"{head}: evaluation done, skipping", flush=True)
                    evaluated[spec.name] = reused
                else:
                    print(f"{head}: evaluating ({time.time() - t0:.0f} s elapsed)", flush=True)
                    evaluation = Evaluation(spec, args, ctx)
            elif running or evaluation:
                time.sleep(0.2)
    finally:
        stop_training(running)  # an interrupt or an error here: the runs in training save their checkpoints
    return trained, evaluated, failed
