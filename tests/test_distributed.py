"""torchrun: several processes train one model data-parallel (DDP; gloo on this CPU-only machine).

Micro-batch j of a step goes to process j // grad_accum with the data and masks of micro-batch j of a one-process
run, so 2 processes x grad_accum 1 train what 1 process x grad_accum 2 trains (up to the order of float sums)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from genesis.distributed import World, world_from_env
from genesis.runs import CHECKPOINT, RunError, resume_changes

from .helpers import ROOT, run_cli
from .test_train import SMALL, records

RUN = [*SMALL, "--set", "masking.enabled=true", "--set", "masking.strategy=structural"]


def torchrun_cmd(*args: str, nproc: int = 2) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "genesis.train", *args]


def env() -> dict:
    full = dict(os.environ)
    full["PYTHONPATH"] = str(ROOT) + os.pathsep + full.get("PYTHONPATH", "")
    full.pop("WORLD_SIZE", None)
    return full


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    proc = subprocess.run(torchrun_cmd(*args, nproc=nproc), cwd=ROOT, env=env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, f"torchrun exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    return proc


def checkpoint(run_dir: Path) -> dict:
    return torch.load(run_dir / CHECKPOINT, weights_only=True)


def assert_same_training(a: Path, b: Path) -> None:
    """The same records (losses to float-sum precision, mask counts exactly) and the same weights."""
    ra, rb = records(a), records(b)
    assert [(r["kind"], r["step"]) for r in ra] == [(r["kind"], r["step"]) for r in rb]
    for x, y in zip(ra, rb):
        for key in ("loss", "grad_norm", "heldout_loss", "class_loss", "heldout_class_loss", "link_loss",
                    "heldout_link_loss", "heldout_connective_accuracy", "heldout_connective_logprob"):
            assert (x.get(key) is None) == (y.get(key) is None), (key, x, y)  # both have it, or neither
            if x.get(key) is not None:
                assert x[key] == pytest.approx(y[key], rel=1e-5), (key, x, y)
        for key in ("masked_fraction", "masked_connectives", "class_accuracy", "heldout_class_accuracy",
                    "heldout_class_tokens", "heldout_connective_words", "link_accuracy", "heldout_link_accuracy",
                    "heldout_link_targets"):
            assert x.get(key) == y.get(key), (key, x, y)
    wa, wb = checkpoint(a)["model"], checkpoint(b)["model"]
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=1e-4, atol=1e-6, msg=key)


def test_two_processes_train_what_one_trains_with_twice_the_accumulation(tmp_path):
    """Structural masking with the class and link heads: their losses and held-out accuracies are summed over the
    processes too (the heads are in every step's graph, as DDP needs)."""
    steps = ["--set", "training.steps=10", "--set", "training.eval_every=5", "--set", "model.class_head=true",
             "--set", "masking.readout=true", "--set", "model.link_head=true"]
    proc = torchrun("--config", "cpu.toml", "--out", str(tmp_path / "ddp"), *RUN, *steps,
                    "--set", "training.grad_accum=1")
    run_cli("genesis.train", "--config", "cpu.toml", "--out", str(tmp_path / "one"), *RUN, *steps,
            "--set", "training.grad_accum=2")
    assert_same_training(tmp_path / "ddp", tmp_path / "one")
    assert checkpoint(tmp_path / "ddp")["processes"] == 2
    assert records(tmp_path / "ddp", "train")[-1]["masked_connectives"] > 0
    assert records(tmp_path / "ddp", "eval")[-1]["heldout_class_tokens"] > 0
    assert records(tmp_path / "ddp", "eval")[-1]["heldout_link_targets"] > 0
    # rank 0 speaks for the run: one model line naming the processes, one line per step, one "done"
    assert "device cpu x 2 processes (DDP)" in proc.stdout
    assert proc.stdout.count("step     10/10 | loss") == 1 and proc.stdout.count("done: 10 steps") == 1
    assert {p.name for p in (tmp_path / "ddp").iterdir()} == {"config.toml", "tokenizer.json", "metrics.jsonl",
                                                                CHECKPOINT, "train.lock"}


def test_ctrl_c_under_torchrun_saves_a_checkpoint_that_one_process_resumes(tmp_path):
    steps = ["--set", "training.steps=40", "--set", "training.eval_every=20"]
    ddp = tmp_path / "ddp"
    # Ctrl-C in a terminal signals the whole foreground process group: torchrun and its workers
    proc = subprocess.Popen(torchrun_cmd("--config", "cpu.toml", "--out", str(ddp), *RUN, *steps), cwd=ROOT,
                            env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        deadline, metrics = time.time() + 120, ddp / "metrics.jsonl"
        while not (metrics.is_file() and '"kind": "train"' in metrics.read_text()):  # the first log step is done
            assert proc.poll() is None and time.time() < deadline, "no train record before the deadline"
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.03)  # torchrun forwards a terminal's Ctrl-C to its workers: each gets a second SIGINT
        os.killpg(proc.pid, signal.SIGINT)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    ckpt = checkpoint(ddp)
    stopped = ckpt["step"]
    assert 5 <= stopped < 40 and ckpt["processes"] == 2, output
    assert output.count(f"interrupted: checkpoint at step {stopped} saved") == 1, output
    assert "nothing to save" not in output, output  # the second SIGINT must not deny the saved checkpoint
    assert [r["step"] for r in records(ddp, "train")] == list(range(5, stopped + 1, 5))

    # one process must take both micro-batches of a step: grad_accum 1 is refused, before anything is written
    refused = run_cli("genesis.train", "--config", "cpu.toml", "--out", str(ddp), *RUN, *steps, "--resume",
                      check=False)
    assert refused.returncode == 2
    assert "processes 2 -> 1" in refused.stderr and "must stay 2" in refused.stderr, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1 and checkpoint(ddp)["step"] == stopped

    resumed = run_cli("genesis.train", "--config", "cpu.toml", "--out", str(ddp), *RUN, *steps, "--resume",
                      "--set", "training.grad_accum=2")
    assert "resume: processes 2 -> 1" in resumed.stdout and f"at step {stopped}" in resumed.stdout
    run_cli("genesis.train", "--config", "cpu.toml", "--out", str(tmp_path / "one"), *RUN, *steps,
            "--set", "training.grad_accum=2")
    assert_same_training(ddp, tmp_path / "one")


def worker_pid(out: Path, rank: int) -> int | None:
    """The pid of the torchrun worker of `rank` training into `out` (Linux /proc)."""
    for proc in Path("/proc").iterdir():
        try:
            environ = "\0" + (proc / "environ").read_text()
            if str(out) in (proc / "cmdline").read_text() and f"\0RANK={rank}\0" in environ:
                return int(proc.name)
        except (OSError, ValueError):
            continue
    return None


def test_a_signal_to_one_process_stops_all_of_them_at_the_same_step(tmp_path):
    """SIGTERM to rank 1 alone (a scheduler's signals reach the machines of a job at different times): the processes
    vote at every step, so all stop after the same step and rank 0 saves it, with that step's record."""
    ddp = tmp_path / "ddp"
    args = ["--config", "cpu.toml", "--out", str(ddp), *RUN, "--set", "training.steps=300",
            "--set", "training.log_every=1", "--set", "training.eval_every=0"]
    proc = subprocess.Popen(torchrun_cmd(*args), cwd=ROOT, env=env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        deadline, metrics = time.time() + 120, ddp / "metrics.jsonl"
        while not (metrics.is_file() and '"step": 3,' in metrics.read_text()):
            assert proc.poll() is None and time.time() < deadline, "no train record before the deadline"
            time.sleep(0.05)
        os.kill(worker_pid(ddp, 1), signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    stopped = checkpoint(ddp)["step"]
    assert 3 <= stopped < 300 and records(ddp, "train")[-1]["step"] == stopped, output
    assert [r["step"] for r in records(ddp, "train")] == list(range(1, stopped + 1))
    assert output.count(f"interrupted: checkpoint at step {stopped} saved") == 1, output


def test_an_error_on_rank_0_is_one_line_and_the_others_stay_silent(tmp_path):
    proc = subprocess.run(torchrun_cmd("--config", "cpu.toml", "--out", str(tmp_path / "run"), *SMALL,
                                       "--set", f"data.corpus={tmp_path / 'missing.txt'}"),
                          cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "error:" in line]
    assert errors == [f"error: {tmp_path / 'missing.txt'}: corpus file not found"], proc.stderr
    assert "Connection closed" not in proc.stderr and not (tmp_path / "run").exists()


def test_a_run_directory_in_use_refuses_a_torchrun_launch_in_one_line(tmp_path):
    """Rank 0 takes the run's lock; when another trainer holds it, rank 0 says so once and the others stop with it."""
    from genesis.runs import RunLock

    (tmp_path / "run").mkdir()
    lock = RunLock(tmp_path / "run")
    try:
        proc = subprocess.run(torchrun_cmd("--config", "cpu.toml", "--out", str(tmp_path / "run"), *SMALL),
                              cwd=ROOT, env=env(), capture_output=True, text=True, timeout=300)
    finally:
        lock.release()
    assert proc.returncode != 0
    errors = [line for line in (proc.stdout + proc.stderr).splitlines() if "error:" in line]
    assert errors == [f"error: {tmp_path / 'run'}: in use by another training process (pid {os.getpid()}); wait for "
                      f"it to end or stop it (evaluating the run meanwhile is fine)"], proc.stderr
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == ["train.lock"]


def test_evaluate_and_compare_refuse_several_processes(tmp_path):
    for module, args in (("genesis.evaluate", ["--checkpoint", str(tmp_path / "none.pt")]),
                         ("genesis.compare", ["--out", str(tmp_path / "cmp")])):
        proc = run_cli(module, *args, check=False, env={"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0"})
        assert proc.returncode == 2
        assert proc.stderr.strip() == (f"error: python -m {module} runs as one process, but it was started as one "
                                       f"of 2 (WORLD_SIZE=2, as torchrun sets): run it with python -m, without "
                                       f"torchrun")
    assert not (tmp_path / "cmp").exists()


def test_train_without_a_rendezvous_is_one_line_and_writes_nothing(tmp_path):
    env_vars = {"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "", "MASTER_PORT": ""}
    proc = run_cli("genesis.train", "--config", "cpu.toml", "--out", str(tmp_path / "run"), *SMALL, check=False,
                   env={k: v for k, v in env_vars.items() if v})
    assert proc.returncode == 2 and proc.stderr.startswith("error: cannot start 2 processes (gloo): ")
    assert "MASTER_ADDR" in proc.stderr and "torchrun" in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert not (tmp_path / "run").exists()
    # another process on rank 0's machine stays silent: rank 0 says it once for the launch; the first process on
    # another machine says it too (an error may be that machine's own: a missing file, fewer GPUs)
    quiet = run_cli("genesis.train", "--config", "cpu.toml", "--out", str(tmp_path / "run"), *SMALL, check=False,
                    env={"WORLD_SIZE": "4", "RANK": "1", "LOCAL_RANK": "1"})
    assert quiet.returncode == 2 and quiet.stderr == ""
    other = run_cli("genesis.train", "--config", "cpu.toml", "--out", str(tmp_path / "run"), *SMALL, check=False,
                    env={"WORLD_SIZE": "4", "RANK": "2", "LOCAL_RANK": "0"})
    assert other.returncode == 2 and other.stderr.startswith("[rank 2] error: cannot start 4 processes (gloo): ")


@pytest.mark.parametrize("environ, world", [
    ({}, World()),
    ({"WORLD_SIZE": "1", "RANK": "0"}, World(0, 0, 1)),
    ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2"}, World(3, 1, 4, 2)),
    ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}, World(3, 1, 4, 2)),  # at least LOCAL_RANK + 1 here
])
def test_world_from_env(environ, world):
    assert world_from_env(environ) == world
    assert world_from_env(environ).main == (world.rank == 0)


@pytest.mark.parametrize("environ, message", [
    ({"WORLD_SIZE": "2"}, "RANK=None: not an integer"),
    ({"WORLD_SIZE": "two", "RANK": "0"}, "WORLD_SIZE='two': not an integer"),
    ({"WORLD_SIZE": "2", "RANK": "2"}, "WORLD_SIZE=2, RANK=2, LOCAL_RANK=0: not a valid launch"),
    ({"WORLD_SIZE": "0", "RANK": "0"}, "not a valid launch"),
])
def test_world_from_env_errors(environ, message):
    with pytest.raises(RunError, match=message.replace("(", r"\(")):
        world_from_env(environ)


def test_resume_may_change_the_processes_with_the_accumulation():
    saved = {"training": {"grad_accum": 1}}
    lines = resume_changes(saved, {"training": {"grad_accum": 4}}, Path("c.pt"), saved_processes=4, processes=1)
    assert lines == ["resume: processes 4 -> 1", "resume: training.grad_accum 1 -> 4"]
    assert resume_changes(saved, saved, Path("c.pt"), 2, 2) == []
    with pytest.raises(RunError, match=r"processes 4 -> 2 .* must stay 4$"):
        resume_changes(saved, saved, Path("c.pt"), saved_processes=4, processes=2)
    with pytest.raises(RunError, match=r"training.grad_accum 1 -> 2 .* must stay 1$"):
        resume_changes(saved, {"training": {"grad_accum": 2}}, Path("c.pt"))


def test_a_checkpoint_records_its_processes(tmp_path):
    run_cli("genesis.train", "--config", "cpu.toml", "--out", str(tmp_path), *SMALL, "--set", "training.steps=1",
            "--set", "training.eval_every=0")
    assert checkpoint(tmp_path)["processes"] == 1
    assert json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])["kind"] == "eval"


def test_adaptive_weights_under_two_processes_equal_one_with_twice_the_accumulation(tmp_path):
    """masking.adaptive: the processes' counters are summed in one all-reduce at each update, so 2 processes make
    the weight updates of 1 process x grad_accum 2 (and hence the same masks and training)."""
    steps = ["--set", "training.steps=6", "--set", "training.eval_every=0", "--set", "masking.strategy=weighted",
             "--set", "masking.adaptive=true", "--set", "masking.adapt_every=3", "--set", "masking.adapt_min_count=1",
             "--set", "training.connective_loss_weight=2"]
    torchrun("--config", "cpu.toml", "--out", str(tmp_path / "ddp"), *RUN, *steps, "--set", "training.grad_accum=1")
    run_cli("genesis.train", "--config", "cpu.toml", "--out", str(tmp_path / "one"), *RUN, *steps,
            "--set", "training.grad_accum=2")
    adapts = [[(r["step"], r["observed"], r["weights"]) for r in records(tmp_path / run, "adapt")]
              for run in ("ddp", "one")]
    assert adapts[0] == adapts[1] and len(adapts[0]) == 2 and adapts[0][0][2]
    assert torch.equal(checkpoint(tmp_path / "ddp")["curriculum"]["weights"],
                       checkpoint(tmp_path / "one")["curriculum"]["weights"])
    assert_same_training(tmp_path / "ddp", tmp_path / "one")
