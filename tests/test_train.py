"""End-to-end runs of `python -m genesis.train`, as a user runs it."""

import contextlib
import errno
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import types

import numpy as np
import pytest
import torch

import genesis.train as trainer
from genesis.config import ConfigError, load_config
from genesis.device import training_device
from genesis.lexicon import DEFAULT_CONNECTIVES
from genesis.masking import ConnectiveMasker
from genesis.runs import load_model
from genesis.train import CHECKPOINT, Interrupted, lr_at, train

from .helpers import ROOT, run_cli

SMALL = ["--set", "model.n_layers=2", "--set", "model.dim=64", "--set", "model.n_heads=2", "--set", "model.ffn_dim=128",
         "--set", "model.seq_len=64", "--set", "training.micro_batch=8", "--set", "training.eval_batches=2",
         "--set", "training.log_every=5", "--set", "training.warmup_steps=5"]
SMALL_SETS = SMALL[1::2]


def records(run_dir, kind=None):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if kind is None or r["kind"] == kind]


def small_config(*overrides):
    """cpu.toml with the SMALL model: its data and tokenizer settings are the session fixture's, so the token
    cache built for `kjv_corpus` is reused and an in-process run takes a second or two."""
    return load_config("cpu.toml", overrides=[*SMALL_SETS, *overrides])


@pytest.fixture
def signal_handlers():
    """In-process runs and main() install SIGINT/SIGTERM handlers: put pytest's back afterwards."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def weights(run_dir):
    return torch.load(run_dir / CHECKPOINT, weights_only=True)["model"]


def same_weights(a, b) -> bool:
    wa, wb = weights(a), weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_short_cpu_run_learns_and_writes_its_run_dir(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("genesis.train", "--config", "cpu.toml", "--out", str(out), *SMALL,
                   "--set", "training.steps=40", "--set", "training.eval_every=20")
    assert {p.name for p in out.iterdir()} >= {"config.toml", "tokenizer.json", "metrics.jsonl", "checkpoint.pt"}
    evals = records(out, "eval")
    assert [r["step"] for r in evals] == [0, 20, 40]
    assert evals[-1]["heldout_loss"] < evals[0]["heldout_loss"] - 1.5
    train = records(out, "train")
    assert [r["step"] for r in train] == list(range(5, 41, 5))
    assert all({"loss", "lr", "grad_norm", "tokens_per_s", "ms_per_step"} <= r.keys() for r in train)
    assert "parameters" in proc.stdout and "step     40/40 | loss" in proc.stdout
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 40 and ckpt["config"]["model"]["dim"] == 64
    # the saved config reproduces the run's settings
    from genesis.config import load_config

    assert load_config(str(out / "config.toml")).model.dim == 64


def test_resume_continues_the_step_count(tmp_path):
    out = tmp_path / "run"
    run_cli("genesis.train", "--config", "cpu.toml", "--out", str(out), *SMALL, "--set", "training.steps=10",
            "--set", "training.eval_every=0")
    again = run_cli("genesis.train", "--config", "cpu.toml", "--out", str(out), *SMALL, "--set", "training.steps=10",
                    "--set", "training.eval_every=0", check=False)
    assert again.returncode == 2 and "already holds a run" in again.stderr and "--resume" in again.stderr
    proc = run_cli("genesis.train", "--config", "cpu.toml", "--out", str(out), *SMALL, "--set", "training.steps=20",
                   "--set", "training.eval_every=0", "--resume")
    assert "resumed from" in proc.stdout and "at step 10" in proc.stdout
    assert [r["step"] for r in records(out, "train")] == [5, 10, 15, 20]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 20
    # the run's own config.toml names its directory: resuming from it needs no --out
    again = run_cli("genesis.train", "--config", str(out / "config.toml"), "--set", "training.steps=25", "--resume")
    assert "at step 20" in again.stdout and [r["step"] for r in records(out, "train")][-1] == 25
    missing = run_cli("genesis.train", "--config", "cpu.toml", "--out", str(tmp_path / "none"), "--resume", check=False)
    assert missing.returncode == 2 and "no checkpoint.pt to resume from" in missing.stderr


def test_resumed_run_matches_an_uninterrupted_one(tmp_path):
    """Batches and masks are keyed by step and the optimizer state is saved, so 10 + 10 resumed steps equal 20
    uninterrupted ones: the same losses and the same weights (constant learning rate, so `steps` can change)."""
    args = [*SMALL, "--set", "training.eval_every=0", "--set", "masking.enabled=true",
            "--set", "training.warmup_steps=0", "--set", "training.min_lr=0.002", "--set", "training.lr=0.002"]
    a, b = tmp_path / "a", tmp_path / "b"
    run_cli("genesis.train", "--config", "cpu.toml", "--out", str(a), *args, "--set", "training.steps=20")
    run_cli("genesis.train", "--config", "cpu.toml", "--out", str(b), *args, "--set", "training.steps=10")
    run_cli("genesis.train", "--config", "cpu.toml", "--out", str(b), *args, "--set", "training.steps=20", "--resume")
    assert [r["loss"] for r in records(a, "train")] == [r["loss"] for r in records(b, "train")]
    masked = [[r["masked_connectives"] for r in records(run, "train")] for run in (a, b)]
    assert masked[0] == masked[1]
    wa = torch.load(a / "checkpoint.pt", weights_only=True)["model"]
    wb = torch.load(b / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_masking_in_the_training_step_logs_and_repeats(tmp_path):
    """`--set masking.enabled=true --set masking.strategy=structural`: the step log shows the masked fraction and
    masked connectives, and two runs with the same seed mask identically (a different masking seed does not).

    The masks themselves are compared through the weights: the batches and the model init are the same in all three
    runs, so the final weights are bit-identical only if every masked input of every step was; a different masking
    seed changes them."""
    args = [*SMALL, "--set", "training.steps=10", "--set", "training.eval_every=0", "--set", "masking.enabled=true",
            "--set", "masking.strategy=structural"]
    a = run_cli("genesis.train", "--config", "cpu.toml", "--out", str(tmp_path / "a"), *args)
    run_cli("genesis.train", "--config", "cpu.toml", "--out", str(tmp_path / "b"), *args)
    run_cli("genesis.train", "--config", "cpu.toml", "--out", str(tmp_path / "c"), *args, "--set", "masking.seed=7")
    assert "masking: structural (4 rules)" in a.stdout and "% of tokens," in a.stdout and " connectives" in a.stdout
    ra, rb, rc = (records(tmp_path / n, "train") for n in "abc")
    assert all(r["masked_connectives"] > 0 and 0 < r["masked_fraction"] < 0.05 for r in ra)
    assert [(r["masked_connectives"], r["masked_fraction"], r["loss"]) for r in ra] == \
        [(r["masked_connectives"], r["masked_fraction"], r["loss"]) for r in rb]
    assert [r["loss"] for r in ra] != [r["loss"] for r in rc]
    assert [r["masked_connectives"] for r in ra] != [r["masked_connectives"] for r in rc]
    assert same_weights(tmp_path / "a", tmp_path / "b")
    assert not same_weights(tmp_path / "a", tmp_path / "c")


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_interrupt_saves_a_checkpoint_and_resume_continues(tmp_path, signum):
    """Ctrl-C or a scheduler's SIGTERM: the run saves its checkpoint and exits 128 + signal; --resume continues.
    (Started with SIGINT ignored, as a shell starts background jobs: the trainer must handle it anyway.)"""
    out = tmp_path / "run"
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "-m", "genesis.train", "--config", "cpu.toml", "--out", str(out), *SMALL,
           "--set", "training.steps=100000", "--set", "training.eval_every=0"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        for line in proc.stdout:  # wait until training is under way
            if line.startswith("step "):
                break
        proc.send_signal(signum)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signum, stderr
    assert "interrupted: checkpoint at step" in stdout
    step = torch.load(out / "checkpoint.pt", weights_only=True)["step"]
    assert step >= 5
    resumed = run_cli("genesis.train", "--config", "cpu.toml", "--out", str(out), *SMALL,
                      "--set", f"training.steps={step + 5}", "--set", "training.eval_every=0", "--resume")
    assert f"at step {step}" in resumed.stdout


def test_gpu_config_runs_on_cpu_after_one_warning(tmp_path):
    """high_vram.toml on a CPU-only machine: fp32, one warning line pointing to cpu.toml (model shrunk for speed;
    the full-size command is the slow test below)."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run_cli("genesis.train", "--config", "high_vram.toml", "--out", str(tmp_path / "hv"), *SMALL,
                   "--set", "training.steps=2", "--set", "training.grad_accum=2")
    warnings = [ln for ln in proc.stderr.splitlines() if ln.startswith("warning:")]
    assert len(warnings) == 1 and "cpu.toml" in warnings[0] and "fp32" in warnings[0]
    assert "float32" in proc.stdout and "done: 2 steps" in proc.stdout


def test_cuda_only_settings_on_the_cpu_warn_once(capsys):
    """cpu.toml with bf16 or compile asked for: they are CUDA-only, so the run says it ignores them."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert training_device(small_config('training.dtype="bf16"', "training.compile=true")) == \
        (torch.device("cpu"), torch.float32)
    err = capsys.readouterr().err.splitlines()
    assert err == ["warning: training.dtype = 'bf16' and training.compile = true: CUDA only; this run is on the CPU "
                   "in fp32 without torch.compile"]
    training_device(small_config())
    assert capsys.readouterr().err == ""


@pytest.mark.slow
def test_high_vram_two_steps_full_size_on_cpu(tmp_path):
    """The README command `python -m genesis.train --config high_vram.toml --set training.steps=2` on a CPU."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run_cli("genesis.train", "--config", "high_vram.toml", "--out", str(tmp_path / "hv"),
                   "--set", "training.steps=2", "--set", "training.eval_batches=1", timeout=1500)
    assert "done: 2 steps" in proc.stdout


@pytest.mark.slow
def test_cpu_config_learns_within_five_minutes(tmp_path):
    """The README's main CPU command, unmodified: held-out loss well below its step-0 value. About 2 minutes alone on
    2 cores, the longest test: left to `-m slow`; test_short_cpu_run_learns_and_writes_its_run_dir runs the same
    command with a smaller model in the default run."""
    t0 = time.time()
    out = tmp_path / "cpu"
    run_cli("genesis.train", "--config", "cpu.toml", "--out", str(out), timeout=900)
    elapsed = time.time() - t0
    evals = records(out, "eval")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 400
    assert evals[-1]["heldout_loss"] < 0.6 * evals[0]["heldout_loss"]
    print(f"cpu.toml: {elapsed:.0f} s, held-out loss {evals[0]['heldout_loss']:.3f} -> {evals[-1]['heldout_loss']:.3f}")


# ----------------------------------------------------------------------------------------------------------------
# In-process runs of train(): the real corpus, tokenizer, model and optimizer, with a hook to count or to signal


def signal_self_on_call(monkeypatch, target, name, call, signum, after=True):
    """Replace `target.name` by a wrapper that sends `signum` to this process during call number `call`: after the
    real function returns (`after`), or just before it runs."""
    real, calls = getattr(target, name), []

    def wrapper(*args, **kwargs):
        calls.append(1)
        if not after and len(calls) == call:
            os.kill(os.getpid(), signum)
        result = real(*args, **kwargs)
        if after and len(calls) == call:
            os.kill(os.getpid(), signum)
        return result

    monkeypatch.setattr(target, name, wrapper)
    return calls


def test_grad_accum_steps_the_optimizer_once_per_k_micro_batches(tmp_path, monkeypatch, signal_handlers):
    """grad_accum = 3 over 4 steps: 12 micro-batches, 4 optimizer steps (the upstream bug stepped every micro-batch),
    AdamW's own step count is 4 and the learning rate follows the schedule by optimizer step."""
    cfg = small_config("training.steps=4", "training.grad_accum=3", "training.eval_every=0", "training.log_every=1")
    batches, step_calls = [], []
    real_get_batch, real_make_optimizer = trainer.get_batch, trainer.make_optimizer

    def get_batch(*args, **kwargs):
        batches.append((kwargs["micro"], args[4]))  # (micro-step, step)
        return real_get_batch(*args, **kwargs)

    def make_optimizer(*args, **kwargs):
        optimizer = real_make_optimizer(*args, **kwargs)
        real_step = optimizer.step
        optimizer.step = lambda *a, **k: (step_calls.append(1), real_step(*a, **k))[1]
        return optimizer

    monkeypatch.setattr(trainer, "get_batch", get_batch)
    monkeypatch.setattr(trainer, "make_optimizer", make_optimizer)
    train(cfg, tmp_path / "run")
    assert batches == [(micro, step) for step in range(4) for micro in range(3)]
    assert len(step_calls) == 4
    state = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["optimizer"]["state"]
    assert {float(s["step"]) for s in state.values()} == {4.0}
    assert [r["lr"] for r in records(tmp_path / "run", "train")] == [lr_at(i, cfg.training) for i in range(4)]


def test_signal_during_the_optimizer_step_keeps_step_count_and_weights_together(tmp_path, monkeypatch,
                                                                                signal_handlers):
    """SIGTERM arriving while the second optimizer step runs is held until the step count has caught up: the
    checkpoint says step 2 with the weights after step 2, so resuming to 4 steps gives the uninterrupted weights
    (a checkpoint one step behind its weights would train step 2 twice)."""
    cfg = small_config("training.steps=4", "training.eval_every=0", "training.log_every=1")
    train(cfg, tmp_path / "straight")
    real_make_optimizer = trainer.make_optimizer

    def make_optimizer(*args, **kwargs):
        optimizer = real_make_optimizer(*args, **kwargs)
        signal_self_on_call(monkeypatch, optimizer, "step", 2, signal.SIGTERM)
        return optimizer

    monkeypatch.setattr(trainer, "make_optimizer", make_optimizer)
    with pytest.raises(Interrupted):
        train(cfg, tmp_path / "stopped")
    assert torch.load(tmp_path / "stopped" / CHECKPOINT, weights_only=True)["step"] == 2
    monkeypatch.setattr(trainer, "make_optimizer", real_make_optimizer)
    train(cfg, tmp_path / "stopped", resume=True)
    assert same_weights(tmp_path / "straight", tmp_path / "stopped")
    # and step 2's record was written with the step (the signal was held until it was)
    assert untimed(records(tmp_path / "straight")) == untimed(records(tmp_path / "stopped"))
    assert [r["step"] for r in records(tmp_path / "stopped", "train")] == [1, 2, 3, 4]


def untimed(recs):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "ms_per_step")} for r in recs]


def raising_on_call(fn, n: int, error: Exception):
    """`fn`, except that its n-th call raises `error`."""
    calls = []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == n:
            raise error
        return fn(*args, **kwargs)

    return wrapped


def optimizer_step_failing(monkeypatch, n: int, error: Exception) -> None:
    """The trainer's optimizers raise `error` at their n-th step (a kill between a checkpoint and the next)."""
    real_make_optimizer = trainer.make_optimizer

    def make_optimizer(*args, **kwargs):
        optimizer = real_make_optimizer(*args, **kwargs)
        optimizer.step = raising_on_call(optimizer.step, n, error)
        return optimizer

    monkeypatch.setattr(trainer, "make_optimizer", make_optimizer)


def test_resume_after_a_kill_drops_the_records_past_the_checkpoint(tmp_path, monkeypatch, signal_handlers):
    """A run killed without a chance to save (SIGKILL, out of memory; here an error in step 4) logged steps past
    its last checkpoint, and maybe half a line: the resumed run drops them and logs those steps again, so its
    metrics.jsonl equals the uninterrupted run's."""
    cfg = small_config("training.steps=5", "training.eval_every=2", "training.log_every=1",
                       "training.checkpoint_every=2")
    train(cfg, tmp_path / "straight")
    optimizer_step_failing(monkeypatch, 4, MemoryError("out of memory"))  # inside the optimizer step: no save
    with pytest.raises(trainer.RunError, match="^out of memory in step 4 .*; the last checkpoint saved before is kept"):
        train(cfg, tmp_path / "killed")
    monkeypatch.undo()
    metrics = tmp_path / "killed" / "metrics.jsonl"
    with metrics.open("a") as f:
        f.write('{"kind": "train", "st')  # a line cut short
    assert torch.load(tmp_path / "killed" / CHECKPOINT, weights_only=True)["step"] == 2
    assert [r["step"] for r in records(tmp_path / "straight")][:6] != \
        [json.loads(line)["step"] for line in metrics.read_text().splitlines()[:-1]]  # step 3 logged past it
    train(cfg, tmp_path / "killed", resume=True)
    assert untimed(records(tmp_path / "straight")) == untimed(records(tmp_path / "killed"))


def test_an_error_outside_the_optimizer_step_saves_the_last_step(tmp_path, monkeypatch, signal_handlers, capsys):
    """An error in step 4's forward pass (out of memory, a bug) leaves the weights of step 3: they are saved, with
    a warning that says so, the error is raised as it was, and --resume continues to the uninterrupted run's
    weights and records. (An error inside the optimizer step saves nothing: the test above.)"""
    cfg = small_config("training.steps=5", "training.eval_every=0", "training.log_every=1")
    train(cfg, tmp_path / "straight")
    monkeypatch.setattr(trainer, "accumulate_gradients", raising_on_call(
        trainer.accumulate_gradients, 4, RuntimeError("CUDA error: an illegal memory access (simulated)")))
    capsys.readouterr()
    with pytest.raises(RuntimeError, match="simulated"):
        train(cfg, tmp_path / "failed")
    assert capsys.readouterr().err == (f"warning: training stopped after step 3 by the error below; checkpoint at "
                                       f"step 3 saved to {tmp_path / 'failed' / CHECKPOINT}; continue with --resume\n")
    assert torch.load(tmp_path / "failed" / CHECKPOINT, weights_only=True)["step"] == 3
    monkeypatch.undo()
    train(cfg, tmp_path / "failed", resume=True)
    assert same_weights(tmp_path / "straight", tmp_path / "failed")
    assert untimed(records(tmp_path / "straight")) == untimed(records(tmp_path / "failed"))


def test_a_signal_during_the_save_after_an_error_does_not_deny_the_save(tmp_path, monkeypatch, signal_handlers,
                                                                        capsys):
    """torchrun sends SIGTERM to the other processes when one fails: arriving while the error's save runs, it is
    held until the save is done, and the warning still says the checkpoint was saved."""
    cfg = small_config("training.steps=5", "training.eval_every=0", "training.log_every=1")
    real_save = trainer.save_checkpoint

    def save_checkpoint(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(trainer, "accumulate_gradients", raising_on_call(
        trainer.accumulate_gradients, 4, RuntimeError("simulated failure")))
    monkeypatch.setattr(trainer, "save_checkpoint", save_checkpoint)
    capsys.readouterr()
    with pytest.raises(RuntimeError, match="simulated"):
        train(cfg, tmp_path / "failed")
    assert "checkpoint at step 3 saved" in capsys.readouterr().err
    assert torch.load(tmp_path / "failed" / CHECKPOINT, weights_only=True)["step"] == 3


def test_a_closed_output_pipe_keeps_the_checkpoint_and_its_records_together(tmp_path):
    """`python -m genesis.train ... | head`: the console line that fails comes after its step's record, so the
    checkpoint saved for the error is that step's, with that step's record; the error is one line."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-m", "genesis.train", "--config", "cpu.toml", "--out", str(out), *SMALL,
                             "--set", "training.steps=200", "--set", "training.log_every=1",
                             "--set", "training.eval_every=0"],
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    while not proc.stdout.readline().startswith("step      3/"):
        assert proc.poll() is None
    proc.stdout.close()  # as `head -n N` does once it has its lines
    err = proc.stderr.read()
    assert proc.wait(timeout=120) == 141, err
    stopped = torch.load(out / CHECKPOINT, weights_only=True)["step"]
    assert [r["step"] for r in records(out, "train")] == list(range(1, stopped + 1)), err
    assert err.splitlines() == [f"warning: training stopped after step {stopped} by the error below; checkpoint at "
                                f"step {stopped} saved to {out / CHECKPOINT}; continue with --resume",
                                "error: standard output was closed (broken pipe): training stopped"]


def test_ms_per_step_counts_training_steps_only(tmp_path, monkeypatch, signal_handlers):
    """On a clock that advances 1 s per optimizer step and 100 s per evaluation, every record says 1000 ms/step,
    also at log steps after an evaluation that is not on a log step (eval_every = 6, log_every = 4)."""
    clock = [0.0]
    monkeypatch.setattr(trainer, "time", types.SimpleNamespace(time=lambda: clock[0]))
    real_make_optimizer, real_evaluate = trainer.make_optimizer, trainer.evaluate_loss

    def make_optimizer(*args, **kwargs):
        optimizer = real_make_optimizer(*args, **kwargs)
        real_step = optimizer.step

        def step(*a, **k):
            clock[0] += 1.0
            return real_step(*a, **k)

        optimizer.step = step
        return optimizer

    def evaluate_loss(*args, **kwargs):
        clock[0] += 100.0
        return real_evaluate(*args, **kwargs)

    monkeypatch.setattr(trainer, "make_optimizer", make_optimizer)
    monkeypatch.setattr(trainer, "evaluate_loss", evaluate_loss)
    train(small_config("training.steps=12", "training.eval_every=6", "training.log_every=4"), tmp_path / "run")
    assert [(r["step"], r["ms_per_step"]) for r in records(tmp_path / "run", "train")] == \
        [(4, 1000.0), (8, 1000.0), (12, 1000.0)]


@pytest.mark.parametrize("eval_every", [0, 3])
def test_signal_during_the_final_evaluation_saves_and_resume_writes_it(tmp_path, monkeypatch, signal_handlers,
                                                                       eval_every):
    """The comparison runner's settings (eval_every = 0, checkpoint_every > steps) and periodic evaluation: Ctrl-C
    in the last step's evaluation still leaves a checkpoint of every step, and --resume, with no step left to train,
    writes that evaluation, so metrics.jsonl ends with the held-out loss of the last step."""
    cfg = small_config("training.steps=3", f"training.eval_every={eval_every}", "training.checkpoint_every=200")
    run_dir = tmp_path / "run"
    evaluations = 1 if eval_every == 0 else 2  # (step 0 with periodic evaluation,) then the last step
    signal_self_on_call(monkeypatch, trainer, "evaluate_loss", evaluations, signal.SIGINT, after=False)
    with pytest.raises(Interrupted):
        train(cfg, run_dir)
    assert torch.load(run_dir / CHECKPOINT, weights_only=True)["step"] == 3
    assert [r["step"] for r in records(run_dir, "eval")] == ([] if eval_every == 0 else [0])
    monkeypatch.undo()
    summary = train(cfg, run_dir, resume=True)
    last = records(run_dir)[-1]
    assert last["kind"] == "eval" and last["step"] == 3 and last["heldout_loss"] == summary["last_heldout_loss"]
    assert [r["step"] for r in records(run_dir, "eval")] == ([3] if eval_every == 0 else [0, 3])
    assert [r["step"] for r in records(run_dir, "train")] == [3]
    train(cfg, run_dir, resume=True)  # nothing left to do, and the last step's evaluation is not repeated
    assert [r["step"] for r in records(run_dir, "eval")] == ([3] if eval_every == 0 else [0, 3])


def test_bf16_config_on_a_gpu_without_bf16_warns_once(monkeypatch, capsys):
    """A pre-Ampere GPU (sm_70) has no bf16: a bf16 (or auto) config runs in fp32 after one warning line; sm_80
    runs bf16 without one. The GPU is faked (device properties only), as no machine here has such a card."""
    props = {"major": 7, "minor": 0, "name": "Tesla V100-SXM2-16GB"}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: types.SimpleNamespace(**props))
    monkeypatch.setattr(torch.version, "hip", None)
    for dtype in ("bf16", "auto"):
        cfg = load_config("high_vram.toml", overrides=["training.device=cuda", f"training.dtype={dtype}"])
        assert training_device(cfg) == (torch.device("cuda"), torch.float32)
        warnings = capsys.readouterr().err.splitlines()
        assert len(warnings) == 1 and warnings[0].startswith("warning: Tesla V100-SXM2-16GB (sm_70) has no bf16")
        assert f"training.dtype = '{dtype}' runs in fp32" in warnings[0]
    cfg = load_config("high_vram.toml", overrides=["training.device=cuda", "training.dtype=fp32"])
    assert training_device(cfg) == (torch.device("cuda"), torch.float32) and not capsys.readouterr().err
    props.update(major=8, name="NVIDIA A100")
    cfg = load_config("high_vram.toml", overrides=["training.device=cuda"])
    assert training_device(cfg) == (torch.device("cuda"), torch.bfloat16) and not capsys.readouterr().err


@pytest.mark.cuda
def test_bf16_on_this_gpu(capsys):
    """The CUDA twin of the test above: on this machine's GPU, bf16 where it has it, else fp32 with the warning."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    cfg = load_config("high_vram.toml", overrides=["training.device=cuda"])
    device, dtype = training_device(cfg)
    native = torch.cuda.get_device_properties(device).major >= 8 or bool(torch.version.hip)
    assert dtype == (torch.bfloat16 if native else torch.float32)
    assert ("has no bf16" in capsys.readouterr().err) == (not native)


# ----------------------------------------------------------------------------------------------------------------
# One-line errors from main(): no traceback, exit code 2, and no run directory made for a run that cannot start


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished 2-step run of the SMALL model (its checkpoint is damaged in copies below)."""
    run_dir = tmp_path_factory.mktemp("finished") / "run"
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    train(small_config("training.steps=2", "training.eval_every=0"), run_dir)
    assert all(signal.getsignal(s) == h for s, h in saved.items())  # train() puts the caller's handlers back
    return run_dir


def main_error(capsys, *args) -> str:
    assert trainer.main(["--config", "cpu.toml", *SMALL, *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    return err.strip()


def test_seq_len_longer_than_a_split_fails_before_the_run_dir(tmp_path, capsys, signal_handlers):
    out = tmp_path / "run"
    err = main_error(capsys, "--out", str(out), "--set", "model.seq_len=2000000")
    assert err.startswith("error: --set model.seq_len=2000000: model.seq_len: 2000000 needs at least 2000001 tokens "
                          "in each split, but the train split of kjv has ")
    assert not out.exists()
    with pytest.raises(ConfigError, match=r"cpu\.toml: model\.seq_len: .* the heldout split of kjv has"):
        trainer.check_windows(types.SimpleNamespace(splits={"train": range(10**6), "heldout": range(100)}),
                              load_config("cpu.toml"))


def test_a_model_that_cannot_fit_fails_with_one_line_before_the_run_dir(tmp_path, capsys, signal_handlers,
                                                                          monkeypatch):
    out = tmp_path / "run"
    args = ["--config", "cpu.toml", "--out", str(out), "--set", "model.dim=1000000000000", "--set", "model.n_heads=1"]
    assert trainer.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --set model.dim=1000000000000: model: 1.60e+25 parameters "
                                                   "need at least 2.38e+17 GiB for their weights, gradients and "
                                                   "AdamW state (16 B each), but the CPU has "), err
    assert not out.exists()
    # past the estimate (an allocation it did not foresee): the allocator's failure is one line too
    monkeypatch.setattr(trainer, "check_memory", lambda *args: None)
    assert trainer.main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: --set model.dim=1000000000000: model: 1.60e+25 parameters "
                                                   "cannot be allocated on cpu (can't allocate memory"), err
    assert not out.exists()  # the model is built before the run directory is made


def test_out_that_is_a_file_fails_with_one_line(tmp_path, capsys, signal_handlers):
    path = tmp_path / "afile"
    path.write_text("x")
    assert main_error(capsys, "--out", str(path)) == f"error: {path}: --out names an existing file, not a directory"
    err = main_error(capsys, "--out", str(path / "run"))
    assert err.startswith(f"error: {path / 'run'}: cannot create the run directory")


def test_resume_with_other_settings_is_refused_and_changes_nothing(finished_run, tmp_path, capsys,
                                                                  signal_handlers):
    """--resume must continue the same training: other model, tokenizer or data settings are refused (naming each)
    before anything in the run directory is rewritten; run length and logging may change, and say so."""
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    before = {p.name: p.read_bytes() for p in run_dir.iterdir()}
    err = main_error(capsys, "--out", str(run_dir), "--set", "training.steps=3", "--set", "training.eval_every=0",
                     "--set", "model.n_layers=1", "--set", "tokenizer.min_frequency=3", "--resume")
    assert err == (f"error: {run_dir / CHECKPOINT}: --resume with other settings than the run's: model.n_layers 2 -> "
                   f"1, tokenizer.min_frequency 2 -> 3 (a resumed run continues the same training; use --out DIR for "
                   f"a new run)"), err
    assert {p.name: p.read_bytes() for p in run_dir.iterdir()} == before
    assert trainer.main(["--config", "cpu.toml", *SMALL, "--out", str(run_dir), "--set", "training.steps=3",
                         "--set", "training.eval_every=0", "--set", "training.log_every=1", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "resume: training.log_every 5 -> 1" in out and "resume: training.steps 2 -> 3" in out
    assert "resume: the learning-rate schedule now ends at step 3" in out


def test_a_checkpoint_from_before_a_setting_existed_resumes_with_its_default():
    """A config saved before a key was added to Genesis (model.class_head, training.class_loss_weight) lacks it:
    the run had the default, so --resume accepts it; a real change of the key is still refused."""
    from genesis.config import to_dict

    now = to_dict(small_config())
    saved = to_dict(small_config())
    del saved["model"]["class_head"], saved["training"]["class_loss_weight"]
    assert trainer.resume_changes(saved, now, CHECKPOINT) == []
    head = to_dict(small_config("masking.enabled=true", "model.class_head=true"))
    with pytest.raises(trainer.RunError, match=r"masking.enabled False -> True, model.class_head False -> True"):
        trainer.resume_changes(saved, head, CHECKPOINT)


def test_a_head_setting_is_no_change_while_its_head_is_off():
    """model.link_readout, training.link_loss_weight and training.class_loss_weight are read only with their head:
    a run without it resumes (and genesis.compare reuses it) whatever they say, e.g. after a default changed; with
    the head on, a change is refused."""
    from genesis.config import to_dict

    saved = to_dict(small_config("model.link_readout=stop", "training.class_loss_weight=0.5"))
    assert trainer.resume_changes(saved, to_dict(small_config("model.link_readout=span")), CHECKPOINT) == []
    link = ("masking.enabled=true", "masking.readout=true", "model.link_head=true")
    saved = to_dict(small_config(*link, "model.link_readout=stop"))
    with pytest.raises(trainer.RunError, match=r"model.link_readout 'stop' -> 'span'"):
        trainer.resume_changes(saved, to_dict(small_config(*link, "model.link_readout=span")), CHECKPOINT)


def test_class_head_trains_at_masked_positions_and_is_measured_on_heldout(tmp_path, capsys):
    """`model.class_head = true`: each step's record and line carry the head's loss and accuracy at the masked
    tokens, each evaluation the head's on the held-out windows masked at a fixed step (the same tokens every
    time), and the head learns: its held-out loss falls well below ln 4, about where the head starts."""
    cfg = small_config("masking.enabled=true", "masking.strategy=uniform", "masking.mask_prob=1.0",
                       "model.class_head=true", "training.steps=30", "training.eval_every=15",
                       "training.eval_batches=4")
    train(cfg, tmp_path / "run")
    out = capsys.readouterr().out
    steps, evals = records(tmp_path / "run", "train"), records(tmp_path / "run", "eval")
    assert all(0 <= r["class_accuracy"] <= 1 and r["class_loss"] > 0 for r in steps)
    assert "| class loss " in out and "| class head: loss " in out
    assert [r["heldout_class_tokens"] for r in evals] == [evals[0]["heldout_class_tokens"]] * 3
    assert evals[0]["heldout_class_tokens"] > 30
    assert evals[0]["heldout_class_loss"] == pytest.approx(math.log(4), abs=0.1)  # small random weights
    assert evals[-1]["heldout_class_loss"] < math.log(4) - 0.3
    assert evals[-1]["heldout_class_accuracy"] > 0.5
    assert torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)["model_args"]["n_classes"] == 4


LINK = ("masking.enabled=true", "masking.strategy=uniform", "masking.mask_prob=1.0", "masking.readout=true",
        "model.link_head=true", "training.warmup_steps=0", "training.lr=0.002", "training.min_lr=0.002")


def test_link_head_trains_logs_and_resumes_exactly(tmp_path, capsys):
    """`model.link_head = true`: each step's record and line carry the head's loss and accuracy at the readout
    positions, each evaluation the head's on the held-out windows masked at a fixed step (the same positions every
    time), TensorBoard gets them as scalars, the checkpoint holds the head, and 6 + 6 resumed steps equal 12
    uninterrupted ones (constant learning rate, so `steps` can change)."""
    from genesis.tensorboard import scalars

    cfg = small_config(*LINK, "model.link_readout=span", "training.steps=12", "training.eval_every=6",
                       "training.log_every=3")
    train(cfg, tmp_path / "a")
    out = capsys.readouterr().out
    steps, evals = records(tmp_path / "a", "train"), records(tmp_path / "a", "eval")
    assert all(0 <= r["link_accuracy"] <= 1 and r["link_loss"] > 0 for r in steps) and "class_loss" not in steps[0]
    assert "| link loss " in out and "| link head: loss " in out and "readout positions" in out
    assert [r["heldout_link_targets"] for r in evals] == [evals[0]["heldout_link_targets"]] * 3
    assert evals[0]["heldout_link_targets"] > 5
    words = torch.load(tmp_path / "a" / CHECKPOINT, weights_only=True)["model_args"]["link_words"]
    assert words == len(DEFAULT_CONNECTIVES)  # one output per lexicon entry, the index space of out.readout
    assert evals[0]["heldout_link_loss"] == pytest.approx(math.log(words), abs=0.1)  # small random weights
    tags = {tag for r in (steps[0], evals[0]) for tag, _ in scalars(r)}
    assert {"train/link_loss", "train/link_accuracy", "heldout/link_loss", "heldout/link_accuracy"} <= tags
    model, _ = load_model(tmp_path / "a" / CHECKPOINT)
    assert model.link_head.out_features == words and model.args.link_readout == "span"
    train(small_config(*LINK, "model.link_readout=span", "training.steps=6", "training.eval_every=6",
                       "training.log_every=3"), tmp_path / "b")
    train(small_config(*LINK, "model.link_readout=span", "training.steps=12", "training.eval_every=6",
                       "training.log_every=3"), tmp_path / "b", resume=True)
    timing = ("ms_per_step", "tokens_per_s")  # the only values that may differ
    uninterrupted, resumed = ([{k: v for k, v in r.items() if k not in timing} for r in records(tmp_path / run)]
                              for run in ("a", "b"))
    assert uninterrupted == resumed
    assert same_weights(tmp_path / "a", tmp_path / "b")


def test_a_masking_schedule_ramps_the_masked_share_in_training(tmp_path, capsys):
    """A linear ramp from 0 over the 20 steps, against the same run without it: never more masked connectives at a
    log step (the same draws at a lower probability), fewer in all, and the ramp named in the masking line."""
    args = ("masking.enabled=true", "masking.strategy=uniform", "masking.mask_prob=1.0", "training.steps=20",
            "training.eval_every=0", "training.log_every=1")
    train(small_config(*args), tmp_path / "const")
    train(small_config(*args, "masking.schedule=linear", "masking.schedule_steps=20"), tmp_path / "ramp")
    assert "x linear ramp 0 -> 1 over 20 steps" in capsys.readouterr().out
    const, ramp = ([r["masked_connectives"] for r in records(tmp_path / name, "train")] for name in ("const", "ramp"))
    assert ramp[0] == 0 and all(a <= b for a, b in zip(ramp, const)) and sum(ramp) < 0.7 * sum(const)


@pytest.mark.cuda
def test_class_head_and_schedule_train_on_this_gpu(tmp_path):
    """The CUDA twin of the two tests above: the head under bf16 autocast (the masker on the GPU, the kernel where
    Triton is installed) and a ramp scaling the GPU's table; losses finite, the head's statistics recorded."""
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    cfg = small_config("training.device=cuda", "training.dtype=auto", "masking.enabled=true", "model.class_head=true",
                       "masking.schedule=cosine", "masking.schedule_start=0.5", "masking.schedule_steps=10",
                       "training.steps=10", "training.eval_every=5")
    train(cfg, tmp_path / "run")
    steps, evals = records(tmp_path / "run", "train"), records(tmp_path / "run", "eval")
    assert all(math.isfinite(r["loss"]) for r in steps) and any(r["class_loss"] is not None for r in steps)
    assert evals[-1]["heldout_class_tokens"] > 0 and math.isfinite(evals[-1]["heldout_class_loss"])


class TargetLM(torch.nn.Module):
    """model(x, y) -> (logits, loss): logits `scale` at the true next token and 0 elsewhere (scale 0: uniform)."""

    def __init__(self, vocab_size: int, scale: float):
        super().__init__()
        self.vocab_size, self.scale = vocab_size, scale

    def forward(self, x, y):
        logits = torch.nn.functional.one_hot(y, self.vocab_size).float() * self.scale
        return logits, torch.nn.functional.cross_entropy(logits.view(-1, self.vocab_size), y.reshape(-1))


def test_heldout_connective_accuracy_is_scored_as_the_evaluator_scores_it(kjv_corpus):
    """Every evaluation scores the connective words of its held-out windows: a model that always ranks the true
    token first gets 100% and log p ~0, a uniform one (every token tied) 1/V per piece and -log V per piece. The
    words are those the masker finds: a masker with p = 1 marks the same word starts, entry by entry."""
    from genesis.masking import ConnectiveMasker

    cfg = small_config("training.eval_batches=4")
    heldout, tok = kjv_corpus.splits["heldout"], kjv_corpus.tokenizer
    V = tok.get_vocab_size(with_added_tokens=True)
    masker = ConnectiveMasker.from_tokenizer(tok, strategy="uniform", mask_prob=1.0, log=None)
    found = trainer.HeldoutConnectives.find(heldout, cfg, masker.lexicon)
    fp32 = contextlib.nullcontext()
    oracle = trainer.evaluate_loss(TargetLM(V, 100.0), heldout, cfg, "cpu", fp32, connectives=found)
    uniform = trainer.evaluate_loss(TargetLM(V, 0.0), heldout, cfg, "cpu", fp32, connectives=found)
    n = oracle["connective_words"]
    assert n == len(found.entry) > 30 and uniform["connective_words"] == n
    assert oracle["connective_accuracy"] == 1.0 and oracle["connective_logprob"] == pytest.approx(0, abs=1e-6)
    pieces = np.bincount(found.occurrence)  # pieces per word
    assert uniform["connective_accuracy"] == pytest.approx(np.mean(V ** -pieces.astype(float)))
    assert uniform["connective_logprob"] == pytest.approx(-np.mean(pieces) * math.log(V))
    assert sum(g["n"] for g in oracle["by_connective"].values()) == n
    # the masker's word starts at columns >= 1, per entry, in the same windows
    from genesis.data import eval_starts, gather_windows

    starts = eval_starts(len(heldout), cfg.model.seq_len, cfg.training.eval_batches * cfg.training.micro_batch)
    batch = gather_windows(heldout, starts, cfg.model.seq_len)
    out = masker(batch.x, step=0)
    glued = torch.zeros_like(out.mask)
    glued[:, 1:] = out.mask[:, :-1] & (out.connectives[:, 1:] == out.connectives[:, :-1])
    word_start = out.mask & ~glued
    word_start[:, 0] = False
    counts = np.bincount(out.connectives[word_start].numpy(), minlength=len(found.words))
    assert {found.words[e]: int(c) for e, c in enumerate(counts) if c} == \
        {w: g["n"] for w, g in oracle["by_connective"].items()}


def test_heldout_connectives_are_whole_words_of_the_stream(kjv_corpus):
    """A window's words are those of the whole stream that lie in it: "for" in its last column is no connective
    when the stream goes on with "ged" (forged), and is one before "ever"; a word in column 0 has nothing to be
    predicted from."""
    tok = kjv_corpus.tokenizer
    lex = ConnectiveMasker.from_tokenizer(tok, log=None).lexicon
    forged, forever = (np.array(tok.encode(text).ids) for text in ("And they forged a lie.", "And they for ever"))
    assert tok.id_to_token(int(forged[2])) == "Ġfor" and tok.id_to_token(int(forged[3])) == "ged"
    assert trainer.HeldoutConnectives.in_window(forged[:4], lex) == []  # T = 3: "for" last, "ged" after it
    assert [m[:2] for m in trainer.HeldoutConnectives.in_window(forever[:4], lex)] == [(2, 1)]
    assert trainer.HeldoutConnectives.in_window(forever[2:4], lex) == []  # "for" in column 0
    # and over real windows: the stream's own matches, restricted to each window
    from genesis.data import eval_starts
    from genesis.lexicon import find_matches

    heldout = kjv_corpus.splits["heldout"]
    tokens = np.asarray(heldout.tokens, dtype=np.int64)
    stream = find_matches(tokens, lex)
    for start in eval_starts(len(tokens), 64, 400)[::7].tolist():
        expected = [(s - start, n, e) for s, n, e in stream if start + 1 <= s and s + n <= start + 64]
        assert trainer.HeldoutConnectives.in_window(tokens[start : start + 65], lex) == expected, start


def test_class_head_without_masking_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^--set model.class_head=true: model.class_head: the class head is "
                                          r"trained only at masked positions: it needs masking.enabled = true$"):
        load_config("cpu.toml", overrides=["model.class_head=true"])
    # a Config built in code is checked too, before anything is written
    import dataclasses

    cfg = small_config()
    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, class_head=True))
    with pytest.raises(ConfigError, match=r"configs/cpu.toml: model.class_head: the class head is trained only"):
        train(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_interrupt_before_the_first_step_says_nothing_was_saved(tmp_path, monkeypatch, capsys, signal_handlers):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "prepare", interrupted)
    assert trainer.main(["--config", "cpu.toml", *SMALL, "--out", str(tmp_path / "run")]) == 130
    assert "interrupted before the first training step: nothing to save" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_masking_impl_that_cannot_run_is_one_line(tmp_path, capsys, monkeypatch, signal_handlers):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the tests' interpreter would let the kernel run on CPU
    err = main_error(capsys, "--out", str(tmp_path / "run"), "--set", "masking.enabled=true",
                     "--set", "masking.impl=\"triton\"")
    assert err.startswith("error: masking impl 'triton' cannot run: "), err
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("GENESIS_MASK_IMPL", "foo")
    err = main_error(capsys, "--out", str(tmp_path / "run2"), "--set", "masking.enabled=true")
    assert err.startswith("error: mask impl must be one of auto, triton, torch (got 'foo', from GENESIS_MASK_IMPL)")


def test_a_mask_token_the_tokenizer_lacks_names_the_setting(tmp_path, capsys, signal_handlers):
    err = main_error(capsys, "--out", str(tmp_path / "run"), "--set", 'tokenizer.mask_token="FOO"')
    assert err.startswith('error: --set tokenizer.mask_token="FOO": tokenizer.mask_token: the tokenizer has no token '
                          "'FOO'"), err


def test_unwritable_cache_is_one_line(tmp_path, capsys, signal_handlers):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    err = main_error(capsys, "--out", str(tmp_path / "run"), "--set", f"data.cache_dir={json.dumps(str(blocker))}",
                     "--set", "tokenizer.vocab_size=300")
    assert err.startswith("error: ") and str(blocker) in err, err


def test_show_config_into_a_closed_pipe_ends_quietly():
    """`--show-config | head -1`: no BrokenPipeError traceback."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "genesis.train", "--config", "cpu.toml", "--show-config"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0)
    proc.stdout.read(10)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    proc.wait(timeout=60)
    assert "Traceback" not in err and "BrokenPipe" not in err, err


@pytest.mark.parametrize("damage, message", [
    ("truncate", "not a checkpoint (not the zip archive torch.save writes"),
    ("garbage", "not a checkpoint (not the zip archive torch.save writes"),
    ("drop optimizer", "not a Genesis checkpoint (missing optimizer)"),
    ("not a dict", "not a Genesis checkpoint (a list, not a dict)"),
    ("foreign optimizer", "its optimizer state does not fit this config's model"),
    ("other model", "does not fit this config's model"),
    ("config not a table", "its recorded config is not a table of [data], [model], ... tables (damaged?)"),
])
def test_resume_from_a_damaged_checkpoint_fails_with_one_line(finished_run, tmp_path, capsys, signal_handlers,
                                                              damage, message):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    path = run_dir / CHECKPOINT
    ckpt = torch.load(path, weights_only=True)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:5000])
    elif damage == "garbage":
        path.write_text("not a checkpoint\n")
    elif damage == "not a dict":
        torch.save([1, 2], path)
    else:
        if damage == "drop optimizer":
            del ckpt["optimizer"]
        elif damage == "foreign optimizer":
            ckpt["optimizer"] = {"lr": 1.0}
        elif damage == "config not a table":
            ckpt["config"] = 5
        else:
            ckpt["model"] = {"embed.weight": torch.zeros(3, 3)}
        torch.save(ckpt, path)
    err = main_error(capsys, "--out", str(run_dir), "--set", "training.steps=3", "--resume")
    assert err.startswith(f"error: {path}: {message}"), err
    if damage == "config not a table":  # the evaluator reads the config too
        from genesis.evaluate import load_run

        with pytest.raises(ConfigError, match=f"^{path}: its recorded config is not a table"):
            load_run(path)
    elif "optimizer" not in damage:  # the evaluator loads the weights alone, with the same one-line errors
        with pytest.raises(trainer.RunError, match=f"^{path}: "):
            load_model(path)


# ----------------------------------------------------------------------------------------------------------------
# Nothing lost, nothing silent: non-finite steps, failed saves, kept step checkpoints, the run lock, out of memory


def strict_records(run_dir):
    """metrics.jsonl read by a strict JSON parser (NaN and Infinity refused)."""
    def refuse(name):
        raise ValueError(f"non-standard JSON constant {name}")

    return [json.loads(line, parse_constant=refuse) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def fused_adamw(monkeypatch):
    """make_optimizer giving AdamW(fused=True), as on CUDA: the guard then skips on the device, unsynced."""
    def make_optimizer(model, cfg, device):
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                  {"params": no_decay, "weight_decay": 0.0}], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                                 fused=True)

    monkeypatch.setattr(trainer, "make_optimizer", make_optimizer)


def test_divergence_stops_with_one_line_and_keeps_the_checkpoint_before_it(tmp_path, capsys, signal_handlers):
    """training.lr = 1e6: the gradient norm is NaN at step 2. The run stops with one line naming the step and the
    value, exits 2, saves nothing (not even on the error path), and step 1's checkpoint loads with finite weights;
    metrics.jsonl parses strictly. genesis.evaluate refuses a checkpoint with non-finite weights in one line."""
    from genesis.evaluate.cli import main as evaluate_main

    out = tmp_path / "run"
    proc = run_cli("genesis.train", "--config", "cpu.toml", "--out", str(out), *SMALL, "--set", "training.steps=8",
                   "--set", "training.eval_every=0", "--set", "training.lr=1e6", "--set", "training.min_lr=0",
                   "--set", "training.warmup_steps=0", "--set", "training.checkpoint_every=1",
                   "--set", "training.log_every=1", check=False)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"error: step 2: non-finite grad norm nan; training stopped, its checkpoint of step 1 is kept in "
        f"{out / CHECKPOINT} (lower training.lr, or set training.skip_nonfinite to skip such steps)"], proc.stderr
    model, ckpt = load_model(out / CHECKPOINT)
    assert ckpt["step"] == 1 and all(p.isfinite().all() for p in model.parameters())
    assert [r["step"] for r in strict_records(out)] == [1]  # step 2 stopped before its record
    assert not list(out.glob("*.tmp*"))
    # a checkpoint with non-finite weights: refused by evaluate (and everything that loads a model), in one line
    nan = dict(ckpt, model={k: v.clone().fill_(float("nan")) if k.endswith("norm.weight") else v
                            for k, v in ckpt["model"].items()})
    torch.save(nan, out / CHECKPOINT)
    capsys.readouterr()
    assert evaluate_main(["--checkpoint", str(out), "--no-plots", "--quiet", "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"error: {out / CHECKPOINT}: non-finite weights (NaN or inf) in "
                                                   f"5 of "), err


def nan_loss_on_call(n: int):
    """accumulate_gradients whose n-th call's loss (and so its gradients) are NaN."""
    real = trainer.accumulate_gradients
    calls = []

    def wrapped(model, micro_batches, *args):
        calls.append(1)
        if len(calls) == n:
            for p in model.parameters():
                p.grad = torch.full_like(p, float("nan"))
            return torch.tensor(float("nan")), torch.zeros(3), torch.zeros(3)
        return real(model, micro_batches, *args)

    return wrapped


@pytest.mark.parametrize("fused", [False, True])
def test_skip_nonfinite_skips_the_optimizer_step_and_says_so(tmp_path, monkeypatch, capsys, signal_handlers, fused):
    """skip_nonfinite = 1: step 3's NaN loss and gradients are skipped (AdamW takes 5 of 6 steps, every weight
    stays finite), one warning line says so, its record holds null for the NaN values and names them, and the
    count rides along in every later record; a second NaN step stops the run. With a fused AdamW (CUDA's) the skip
    happens on the device and is found at the next log step (5), not at once."""
    if fused:
        fused_adamw(monkeypatch)
    cfg = small_config("training.steps=6", "training.eval_every=0", "training.log_every=1" if not fused else
                       "training.log_every=5", "training.skip_nonfinite=1", "training.checkpoint_every=0")
    monkeypatch.setattr(trainer, "accumulate_gradients", nan_loss_on_call(3))
    capsys.readouterr()
    train(cfg, tmp_path / "run")
    assert capsys.readouterr().err == ("warning: step 3: non-finite loss nan and grad norm nan: optimizer step skipped "
                                       "(1 of training.skip_nonfinite = 1)\n")
    ckpt = torch.load(tmp_path / "run" / CHECKPOINT, weights_only=True)
    assert {float(s["step"]) for s in ckpt["optimizer"]["state"].values()} == {5.0}
    assert ckpt["nonfinite_skipped"] == [3] and all(w.isfinite().all() for w in ckpt["model"].values())
    recs = strict_records(tmp_path / "run")
    if not fused:
        assert recs[2]["step"] == 3 and recs[2]["loss"] is None and recs[2]["nonfinite"] == ["grad_norm", "loss"]
        assert [r.get("skipped_steps") for r in recs if r["kind"] == "train"] == [None, None, 1, 1, 1, 1]
    else:
        assert [(r["step"], r.get("skipped_steps")) for r in recs if r["kind"] == "train"] == [(5, 1), (6, 1)]
    # one more than the budget stops the run (the fused path: at the log step after it, with nothing saved)
    cfg = small_config("training.steps=6", "training.eval_every=0", "training.log_every=5",
                       "training.checkpoint_every=0")
    monkeypatch.setattr(trainer, "accumulate_gradients", nan_loss_on_call(2))
    with pytest.raises(trainer.NonFiniteError, match=r"^step 2: non-finite loss nan and grad norm nan; training "
                                                     r"stopped, before its first checkpoint: nothing saved"):
        train(cfg, tmp_path / "stopped")
    assert not (tmp_path / "stopped" / CHECKPOINT).exists()


def test_a_failed_save_is_one_line_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, capsys,
                                                                       signal_handlers):
    """A full disk during the second save (torch.save raises RuntimeError half-way through the file): one line, the
    temporary file removed, step 2's checkpoint intact and loadable; no second attempt on the error path."""
    real_save = torch.save
    calls = []

    def save(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            f.write(b"PK\x03\x04" + bytes(1000))  # part of the archive, then the disk is full
            raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed writing "
                               "file data/3: file write failed\nNo space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)
    out = tmp_path / "run"
    err = main_error(capsys, "--out", str(out), "--set", "training.steps=6", "--set", "training.eval_every=0",
                     "--set", "training.checkpoint_every=2")
    assert err == (f"error: {out / CHECKPOINT}: cannot save the checkpoint of step 4 (RuntimeError: [enforce fail at "
                   f"inline_container.cc:858] . PytorchStreamWriter failed writing file data/3: file write failed); "
                   f"the checkpoint of step 2 is kept")
    assert len(calls) == 2 and not list(out.glob("*.tmp*"))
    assert load_model(out / CHECKPOINT)[1]["step"] == 2


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real tmpfs of a given size (a full disk, as torch.save and file writes meet it); skipped where this process
    may not mount (not root, or a sandbox without the capability)."""
    mounted = []

    def mount(size_bytes: int):
        point = tmp_path / f"tmpfs{len(mounted)}"
        point.mkdir()
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(point)],
                              capture_output=True, text=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
        mounted.append(point)
        return point

    yield mount
    for point in mounted:
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


def test_a_full_disk_at_a_checkpoint_says_so_and_names_the_checkpoint_kept(tmp_path, small_tmpfs, capsys,
                                                                          signal_handlers):
    """A real full disk: the run directory on a tmpfs with room for one checkpoint beside the run's other files but
    not for the next one's temporary copy. torch.save's own error reads "[enforce fail at inline_container.cc]
    ... unexpected pos"; the line says what happened."""
    sized = tmp_path / "sized"
    assert trainer.main(["--config", "cpu.toml", *SMALL, "--out", str(sized), "--set", "training.steps=2",
                         "--set", "training.eval_every=0", "--set", "training.checkpoint_every=2"]) == 0
    room = sum(f.stat().st_size for f in sized.iterdir() if f.is_file())
    out = small_tmpfs(room + (sized / CHECKPOINT).stat().st_size // 2) / "run"
    capsys.readouterr()
    err = main_error(capsys, "--out", str(out), "--set", "training.steps=6", "--set", "training.eval_every=0",
                     "--set", "training.checkpoint_every=2")
    assert err == (f"error: {out / CHECKPOINT}: cannot save the checkpoint of step 4 (no space left on device); the "
                   f"checkpoint of step 2 is kept")
    assert load_model(out / CHECKPOINT)[1]["step"] == 2 and not list(out.glob("*.tmp*"))


def test_a_full_disk_at_a_metrics_record_names_the_file_the_step_and_the_checkpoint_kept(tmp_path, monkeypatch,
                                                                                         capsys, signal_handlers):
    """metrics.jsonl's write fails with ENOSPC at the step-10 record (a failing write: where the disk fills up
    first depends on the file sizes): one line, not 'error: : No space left on device'."""
    real_open = trainer.open_metrics

    class FillsUp:
        def __init__(self, f):
            self.f, self.writes = f, 0

        def write(self, text):
            if '"step": 10' in text:
                raise OSError(errno.ENOSPC, "No space left on device")
            return self.f.write(text)

        def __getattr__(self, name):
            return getattr(self.f, name)

    def open_metrics(*args, **kwargs):
        f, evaluated = real_open(*args, **kwargs)
        return FillsUp(f), evaluated

    monkeypatch.setattr(trainer, "open_metrics", open_metrics)
    out = tmp_path / "run"
    err = main_error(capsys, "--out", str(out), "--set", "training.steps=20", "--set", "training.eval_every=0",
                     "--set", "training.checkpoint_every=5")
    assert err == (f"error: {out / 'metrics.jsonl'}: cannot write the record of step 10 (no space left on device); "
                   f"training stopped, the checkpoint of step 5 is kept")
    assert load_model(out / CHECKPOINT)[1]["step"] == 5


def test_a_full_disk_in_the_cache_names_the_file(tmp_path, small_tmpfs, monkeypatch, capsys, signal_handlers):
    """The tokenizer trained for a new corpus split does not fit in the cache: one line naming the cached file."""
    cache = small_tmpfs(16 * 1024)
    monkeypatch.setenv("GENESIS_CACHE", str(cache))
    err = main_error(capsys, "--out", str(tmp_path / "run"), "--set", "training.steps=2",
                     "--set", "tokenizer.vocab_size=700")
    assert err.startswith(f"error: {cache / 'tokenizers'}/") and err.endswith(
        ": cannot cache the trained tokenizer (no space left on device); nothing was trained from it yet"), err
    assert not list((cache / "tokenizers").glob("*.tmp*"))


def test_a_full_disk_while_building_the_token_cache_names_the_entry(tmp_path, small_tmpfs, monkeypatch, capsys,
                                                                     signal_handlers):
    """Room for the cached tokenizer (a few hundred kB) but not for the token cache (megabytes): one line naming the
    entry, and no partial build left behind."""
    cache = small_tmpfs(2 * 1024 * 1024)
    monkeypatch.setenv("GENESIS_CACHE", str(cache))
    err = main_error(capsys, "--out", str(tmp_path / "run"), "--set", "training.steps=2")
    assert re.fullmatch(rf"error: {re.escape(str(cache))}/\S+: cannot build the token cache \(no space left on "
                        rf"device\); the partial build is removed", err), err
    assert not [p for p in cache.rglob("*") if ".tmp" in p.name]
    assert not (tmp_path / "run").exists()


def test_a_start_that_fails_leaves_no_run_directory_holding_only_its_lock(small_tmpfs, capsys, signal_handlers):
    """The run directory on a disk too small for the run's tokenizer.json: the start fails after the directory was
    made and locked, and leaves nothing behind."""
    out = small_tmpfs(64 * 1024) / "run"
    err = main_error(capsys, "--out", str(out), "--set", "training.steps=2")
    assert err == f"error: {out / 'tokenizer.json'}: cannot write (no space left on device)"
    assert not out.exists()


def test_stale_temporary_files_of_dead_processes_are_removed_on_resume(finished_run, tmp_path, capsys,
                                                                        signal_handlers):
    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    gone = subprocess.Popen(["true"])
    gone.wait()
    alive = subprocess.Popen(["sleep", "60"])
    try:
        stale, busy = run_dir / f"checkpoint.pt.tmp{gone.pid}", run_dir / f"checkpoint.pt.tmp{alive.pid}"
        other = run_dir / f"notes.txt.tmp{gone.pid}"  # not a name Genesis writes: left alone
        for path in (stale, busy, other):
            path.write_bytes(bytes(2**20))
        assert trainer.main(["--config", str(run_dir / "config.toml"), "--out", str(run_dir), "--set",
                             "training.steps=3", "--resume"]) == 0
        assert not stale.exists() and busy.exists() and other.exists()
        assert f"removed {stale} (1.0 MiB), left by a write of process {gone.pid} that was cut short" in \
            capsys.readouterr().out
    finally:
        alive.kill()
        alive.wait()


def test_keep_checkpoints_keeps_the_last_step_checkpoints_and_evaluate_takes_them(tmp_path, capsys,
                                                                                  signal_handlers):
    from genesis.evaluate.cli import main as evaluate_main

    out = tmp_path / "run"
    train(small_config("training.steps=7", "training.eval_every=0", "training.checkpoint_every=2",
                       "training.keep_checkpoints=2"), out)
    assert sorted(p.name for p in out.glob("checkpoint*")) == ["checkpoint-6.pt", "checkpoint-7.pt", "checkpoint.pt"]
    assert (out / "checkpoint-7.pt").stat().st_ino == (out / CHECKPOINT).stat().st_ino  # a hard link: no copy
    assert load_model(out / "checkpoint-6.pt")[1]["step"] == 6
    capsys.readouterr()
    assert evaluate_main(["--checkpoint", str(out / "checkpoint-6.pt"), "--max-items", "4", "--no-plots", "--quiet",
                          "--device", "cpu"]) == 0
    result = json.loads((out / "eval-kjv-heldout-step6" / "eval.json").read_text())
    assert result["step"] == 6 and result["checkpoint"] == str(out / "checkpoint-6.pt")


def test_two_starts_on_one_run_directory_one_runs_the_other_is_refused(tmp_path):
    """The first has taken the lock but saved no checkpoint yet: the second start is refused in one line naming the
    first's pid, before it writes anything (the first's metrics.jsonl is not truncated); the first runs on."""
    out = tmp_path / "run"
    first = subprocess.Popen([sys.executable, "-m", "genesis.train", "--config", "cpu.toml", "--out", str(out), *SMALL,
                              "--set", "training.steps=100000", "--set", "training.log_every=1",
                              "--set", "training.eval_every=0", "--set", "training.checkpoint_every=0"],
                             cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        while not first.stdout.readline().startswith("step      2/"):
            assert first.poll() is None, first.stderr.read()
        logged = (out / "metrics.jsonl").read_text()
        second = run_cli("genesis.train", "--config", "cpu.toml", "--out", str(out), *SMALL, "--set",
                         "training.steps=3", check=False)  # (without the lock: a short run over the first's files)
        assert second.returncode == 2 and second.stderr.splitlines() == [
            f"error: {out}: in use by another training process (pid {first.pid}); wait for it to end or stop it "
            f"(evaluating the run meanwhile is fine)"], second.stderr
        assert (out / "metrics.jsonl").read_text().startswith(logged) and first.poll() is None
    finally:
        first.send_signal(signal.SIGINT)
        first.wait(timeout=120)
    assert torch.load(out / CHECKPOINT, weights_only=True)["step"] >= 2


def test_resume_of_a_run_in_use_is_refused_naming_the_holder(finished_run, tmp_path, capsys, signal_handlers):
    from genesis.runs import RunLock

    run_dir = tmp_path / "run"
    shutil.copytree(finished_run, run_dir)
    lock = RunLock(run_dir)
    try:
        before = (run_dir / "metrics.jsonl").read_bytes()
        assert main_error(capsys, "--out", str(run_dir), "--resume", "--set", "training.steps=3") == (
            f"error: {run_dir}: in use by another training process (pid {os.getpid()}); wait for it to end or stop "
            f"it (evaluating the run meanwhile is fine)")
        assert (run_dir / "metrics.jsonl").read_bytes() == before
    finally:
        lock.release()
    assert trainer.main(["--config", "cpu.toml", *SMALL, "--out", str(run_dir), "--resume",
                         "--set", "training.steps=3"]) == 0  # released: it runs


@pytest.mark.parametrize("error", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 8589934592 bytes. Error code 12 (Cannot allocate memory)"),
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB. GPU 0 has a total capacity of 11.72 GiB"),
    MemoryError(),
])
def test_out_of_memory_in_the_first_step_is_one_line_with_a_hint(tmp_path, monkeypatch, capsys, signal_handlers,
                                                                  error):
    out = tmp_path / "run"
    monkeypatch.setattr(trainer, "accumulate_gradients", raising_on_call(trainer.accumulate_gradients, 1, error))
    err = main_error(capsys, "--out", str(out), "--set", "training.steps=3", "--set", "training.eval_every=0")
    assert err.startswith("error: out of memory in step 1 on cpu (") and err.endswith(
        "): lower training.micro_batch (raise training.grad_accum to keep the step) or model.seq_len, or set "
        "training.grad_checkpointing = true; nothing saved"), err
    assert not (out / CHECKPOINT).exists()
    # later in the run: one line too, and the last finished step is saved
    monkeypatch.setattr(trainer, "accumulate_gradients", raising_on_call(trainer.accumulate_gradients, 3, error))
    err = main_error(capsys, "--out", str(tmp_path / "later"), "--set", "training.steps=5",
                     "--set", "training.eval_every=0")
    assert err.startswith("error: out of memory in step 3 on cpu (") and err.endswith(
        f"; checkpoint at step 2 saved to {tmp_path / 'later' / CHECKPOINT}; continue with --resume"), err


def test_keep_checkpoints_copies_where_there_are_no_hard_links(tmp_path, monkeypatch):
    from genesis.runs import keep_step_checkpoint

    def no_links(*args):
        raise OSError(1, "Operation not permitted")

    monkeypatch.setattr(os, "link", no_links)
    path = tmp_path / CHECKPOINT
    path.write_bytes(b"step 5")
    keep_step_checkpoint(path, 5, keep=1)
    assert (tmp_path / "checkpoint-5.pt").read_bytes() == b"step 5"
    assert (tmp_path / "checkpoint-5.pt").stat().st_ino != path.stat().st_ino
    path.write_bytes(b"step 7")
    keep_step_checkpoint(path, 7, keep=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-7.pt", CHECKPOINT]


def test_the_random_control_arm_trains_logs_its_words_and_resumes_with_them(tmp_path, capsys):
    """masking.strategy = "random": the run logs its control words and p (the log, a "control" record at step 0, the
    checkpoint), masks control words and never a connective (masked_connectives 0 of connective_words at every log
    step), evaluates on the real connectives, and 5 + 5 resumed steps equal 10 uninterrupted ones."""
    args = ("masking.enabled=true", "masking.strategy=random", "training.eval_every=5", "training.warmup_steps=0",
            "training.lr=0.002", "training.min_lr=0.002")
    train(small_config(*args, "training.steps=10"), tmp_path / "a")
    out = capsys.readouterr().out
    assert "masking: random (control words at p=" in out and "control arm: " in out and "for->" in out
    (control,) = records(tmp_path / "a", "control")
    assert control["step"] == 0 and control["reference"] == "structural" and 0 < control["probability"] < 1
    assert control["expected_rate"] == pytest.approx(control["reference_rate"], rel=1e-6)
    words = set(control["words"].values())
    assert "for" in control["words"] and not words & set(DEFAULT_CONNECTIVES)
    steps = records(tmp_path / "a", "train")
    assert steps and all(r["masked_connectives"] == 0 < r["connective_words"] for r in steps)
    assert all(0 < r["masked_control_words"] <= r["control_words"] and r["masked_fraction"] > 0 for r in steps)
    assert sum(r["masked_control_words"] for r in steps) < sum(r["control_words"] for r in steps)
    # the held-out evaluation scores the real connectives, not the control words
    by_word = records(tmp_path / "a", "eval")[-1]["heldout_by_connective"]
    assert "for" in by_word and not words & set(by_word)
    ckpt_control = torch.load(tmp_path / "a" / CHECKPOINT, weights_only=True)["control"]
    assert ckpt_control["words"] == control["words"] and ckpt_control["probability"] == control["probability"]

    train(small_config(*args, "training.steps=5"), tmp_path / "b")
    train(small_config(*args, "training.steps=10"), tmp_path / "b", resume=True)
    assert records(tmp_path / "b", "control") == [control]
    keep = ("step", "loss", "masked_fraction", "masked_control_words", "control_words", "connective_words")
    assert [[r[k] for k in keep] for r in records(tmp_path / "b", "train")] == [[r[k] for k in keep] for r in steps]
    assert same_weights(tmp_path / "a", tmp_path / "b")
    # a checkpoint whose control arm is not the one the run would choose again is refused, with one line
    ckpt = torch.load(tmp_path / "b" / CHECKPOINT, weights_only=True)
    ckpt["control"]["probability"] *= 1.01
    torch.save(ckpt, tmp_path / "b" / CHECKPOINT)
    with pytest.raises(trainer.RunError, match=r"checkpoint.pt: the control arm now chooses other words or p than it "
                                               r"recorded \(p 0\.\d+ vs 0\.\d+\).*start a new run$"):
        train(small_config(*args, "training.steps=11"), tmp_path / "b", resume=True)


def test_a_random_run_evaluates_and_samples_on_the_real_connectives(kjv_tokenizer):
    """The control arm's config keeps the run's lexicon: genesis.evaluate and sample --mask-connectives read it."""
    from genesis.evaluate import run_connectives
    from genesis.sample import mask_prompt

    cfg = small_config("masking.enabled=true", "masking.strategy=random")
    assert run_connectives(cfg.masking) == DEFAULT_CONNECTIVES
    ids = kjv_tokenizer.encode("For God so loved the world").ids
    masked, words = mask_prompt(ids, kjv_tokenizer, cfg)
    assert words == 2 and masked != ids
