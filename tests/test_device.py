"""genesis.device: training.compile's resolution, training.threads and the CPU allocator setting (no GPU needed:
availability is patched)."""

import os
import platform
import resource
import statistics
import subprocess
import sys

import pytest
import torch

import genesis.device as device_module
from genesis.config import ConfigError, load_config
from genesis.device import keep_freed_memory, set_threads, training_device, use_compile

CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.mark.parametrize("device, missing, on, why", [
    (CUDA, None, True, "CUDA with Triton"),
    (CUDA, "Triton is not importable (ImportError: no triton)", False, "Triton is not importable"),
    (CPU, None, False, "the cpu runs eager"),
])
def test_compile_auto_is_on_where_triton_works_with_one_line(monkeypatch, device, missing, on, why):
    monkeypatch.setattr(device_module, "triton_missing", lambda: missing)
    lines = []
    assert use_compile("auto", device, lines.append) is on
    assert len(lines) == 1 and lines[0].startswith(f"compile: {'on' if on else 'off'} (training.compile = \"auto\"")
    assert why in lines[0]


def test_compile_true_and_false_are_kept_without_a_line(monkeypatch):
    monkeypatch.setattr(device_module, "triton_missing", lambda: "Triton is not importable")
    lines = []
    assert use_compile(True, CUDA, lines.append) is True  # asked for: torch.compile says what it lacks
    assert use_compile(True, CPU, lines.append) is False  # training_device has warned that it is CUDA-only
    assert use_compile(False, CUDA, lines.append) is False
    assert lines == []


def test_the_configs_compile_where_it_helps():
    assert load_config("high_vram.toml").training.compile == "auto"
    assert load_config("low_vram.toml").training.compile == "auto"
    assert load_config("cpu.toml").training.compile is False  # eager: no log line about compile on a CPU
    assert load_config(None).training.compile == "auto"


def test_threads_are_set_and_a_loaded_machine_gets_one_hint(monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setattr(os, "cpu_count", lambda: 4)
    try:
        lines = []
        monkeypatch.setattr(os, "getloadavg", lambda: (6.5, 1.0, 1.0))
        set_threads(3, CPU, lines.append)
        assert torch.get_num_threads() == 3
        assert lines == ["cpu: the 1-minute load average is 6.5 on 4 cores: other processes compete for them; if "
                         "steps are slow, try fewer threads (training.threads = 2; torch uses 3)"]
        lines.clear()
        set_threads(2, CPU, lines.append)  # already as few as suggested
        set_threads(3, CUDA, lines.append)  # the GPU computes
        monkeypatch.setattr(os, "getloadavg", lambda: (3.9, 1.0, 1.0))
        set_threads(3, CPU, lines.append)  # not above the core count
        monkeypatch.delattr(os, "getloadavg")  # Windows
        set_threads(3, CPU, lines.append)
        assert lines == []
    finally:
        torch.set_num_threads(before)


def test_threads_must_not_be_negative():
    from genesis.config import ConfigError

    with pytest.raises(ConfigError, match=r"training.threads: must be >= 0 \(got -1\)"):
        load_config("cpu.toml", overrides=["training.threads=-1"])


FAULTS = """
import resource, sys, torch
from genesis.device import keep_freed_memory
if sys.argv[1] == "kept":
    assert keep_freed_memory(torch.device("cpu"))
faults = []
for _ in range(15):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.ones(16 << 20)  # 64 MB, allocated and freed
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(*faults[5:])
"""


@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_keep_freed_memory_stops_the_page_faults_of_large_blocks():
    """A 64 MB block freed and allocated again (a step's logits) page-faults all its pages every time under glibc's
    defaults; after keep_freed_memory the freed block is reused without faulting (each in a fresh process)."""
    pages = (64 << 20) // resource.getpagesize()

    def faults(mode):  # the page faults of each of the last 10 allocations, in order
        out = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, check=True)
        return [int(n) for n in out.stdout.split()]

    assert min(faults("default")) >= pages  # every allocation faults all its pages
    # most reuse the freed block without a fault (on a loaded machine, e.g. under pytest -n 2, one now and then
    # faults its pages again)
    assert statistics.median(faults("kept")) < pages // 4
    assert not keep_freed_memory(torch.device("meta")) and not keep_freed_memory(CUDA)


def test_an_unavailable_device_is_blamed_on_where_it_was_set():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match=r"^--set training\.device=cuda: training\.device: 'cuda' requested but "):
        training_device(load_config("cpu.toml", overrides=["training.device=cuda"]))
