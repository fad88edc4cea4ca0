"""Shared test setup: a per-session cache directory, and Triton's interpreter on machines without CUDA.

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
