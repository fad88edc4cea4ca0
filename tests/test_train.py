"""End-to-end runs of `python -m genesis.train`, as a user runs it."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from .helpers import ROOT, run_cli

SMALL = ["--set", "model.n_layers=2", "--set", "model.dim=64", "--set", "model.n_heads=2", "--set", "model.ffn_dim=128",
         "--set", "model.seq_len=64", "--set", "training.micro_batch=8", "--set", "training.eval_batches=2",
         "--set", "training.log_every=5", "--set", "training.warmup_steps=5"]


def records(run_dir, kind):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


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
    masked connectives, and two runs with the same seed mask identically (a different masking seed does not)."""
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


@pytest.mark.slow
def test_high_vram_two_steps_full_size_on_cpu(tmp_path):
    """The README command `python -m genesis.train --config high_vram.toml --set training.steps=2` on a CPU."""
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = run_cli("genesis.train", "--config", "high_vram.toml", "--out", str(tmp_path / "hv"),
                   "--set", "training.steps=2", "--set", "training.eval_batches=1", timeout=1500)
    assert "done: 2 steps" in proc.stdout


def test_cpu_config_learns_within_five_minutes(tmp_path):
    """The README's main CPU command, unmodified: held-out loss well below its step-0 value."""
    t0 = time.time()
    out = tmp_path / "cpu"
    run_cli("genesis.train", "--config", "cpu.toml", "--out", str(out), timeout=900)
    elapsed = time.time() - t0
    evals = records(out, "eval")
    assert evals[0]["step"] == 0 and evals[-1]["step"] == 400
    assert evals[-1]["heldout_loss"] < 0.6 * evals[0]["heldout_loss"]
    print(f"cpu.toml: {elapsed:.0f} s, held-out loss {evals[0]['heldout_loss']:.3f} -> {evals[-1]['heldout_loss']:.3f}")
