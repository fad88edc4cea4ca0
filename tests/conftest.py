"""Shared test setup: a per-session cache directory, Triton's interpreter on machines without CUDA, and the cores
shared out between pytest-xdist's workers (`-n auto`).

TRITON_INTERPRET must be set before any @triton.jit function is defined, so it is set here, before the tests
import genesis.kernels. On a CUDA machine it is left unset: there the kernel tests run the compiled kernel."""

import os
import sys
import tempfile
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

_CACHE = tempfile.mkdtemp(prefix="genesis-test-cache-")
os.environ.setdefault("GENESIS_CACHE", _CACHE)
os.environ.pop("GENESIS_MASK_IMPL", None)

from genesis.device import usable_cores  # noqa: E402  (genesis is imported once the environment above is set)

MAX_WORKERS = 4  # what `-n auto` means here: every worker builds the session fixtures (tokenizers, token cache) again


def pytest_xdist_auto_num_workers(config):
    return min(usable_cores(), MAX_WORKERS)


# Under `pytest -n N` the workers share the cores: each one, and the processes its tests start (training, torchrun),
# computes with its share of them instead of every worker's torch using all of them (oversubscribed threads wait on
# each other).
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:
    _THREADS = str(max(1, usable_cores() // _WORKERS))
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = _THREADS
    torch.set_num_threads(int(_THREADS))


@pytest.fixture(scope="session")
def kjv():
    from genesis.corpus import load_corpus

    return load_corpus("kjv")


@pytest.fixture(scope="session")
def kjv_corpus():
    """The prepared KJV (split, trained tokenizer, token cache) for the default data/tokenizer config."""
    from genesis.config import load_config
    from genesis.data import prepare

    return prepare(load_config("cpu.toml"), log=lambda *_: None)


@pytest.fixture(scope="session")
def kjv_tokenizer(kjv_corpus):
    return kjv_corpus.tokenizer


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory):
    """Two finished 4-step runs of a small model on the session's token cache (evaluations at steps 0, 2 and 4),
    for the tools that read runs: "tied" (tied embeddings, no masking) and "untied-head" (untied embeddings,
    grouped-query attention, rope_theta 500, masking and the class head)."""
    from genesis.config import load_config
    from genesis.train import train

    small = ["model.n_layers=2", "model.dim=64", "model.ffn_dim=128", "model.seq_len=64", "training.micro_batch=8",
             "training.eval_batches=2", "training.steps=4", "training.eval_every=2", "training.log_every=1",
             "training.warmup_steps=2"]
    variants = {
        "tied": ["model.n_heads=2"],
        "untied-head": ["model.n_heads=4", "model.n_kv_heads=2", "model.rope_theta=500.0",
                        "model.tie_embeddings=false", "model.class_head=true", "masking.enabled=true"],
    }
    root = tmp_path_factory.mktemp("tiny-runs")
    for name, sets in variants.items():
        train(load_config("cpu.toml", overrides=[*small, *sets]), root / name)
    return {name: root / name for name in variants}
