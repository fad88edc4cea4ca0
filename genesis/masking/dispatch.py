"""Which implementation masks a batch: the Triton kernel where it can run, else the torch path.

`masking.impl` (or GENESIS_MASK_IMPL, which overrides it) asks for "auto", "triton" or "torch"; `choose_impl`
answers for one device, with one log line where "auto" falls back.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import torch

from genesis.masking.errors import MaskingError, TritonUnavailableError

IMPLS = ("auto", "triton", "torch")


def triton_status(device: torch.device) -> str | None:
    """None when the Triton kernel can run on `device`, else the reason it cannot."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else
        return f"Triton is not importable ({type(e).__name__}: {e})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"the Triton kernel needs a CUDA tensor (got a {device.type} tensor); CPU tensors run it only under "
            f"TRITON_INTERPRET=1")


def _impl_source(configured: str) -> tuple[Any, str]:
    """The raw impl value asked for and where it came from: GENESIS_MASK_IMPL unless unset or blank."""
    env = os.environ.get("GENESIS_MASK_IMPL", "")
    return (env, "GENESIS_MASK_IMPL") if env.strip() else (configured, "masking.impl")


def requested_impl(configured: str) -> str:
    """The impl asked for, stripped and lowercased: GENESIS_MASK_IMPL if set and not blank, else the configured one
    ('auto' if empty)."""
    raw, _ = _impl_source(configured)
    return str(raw or "").strip().lower() or "auto"


def choose_impl(requested: str, device: torch.device, log: Callable[[str], None] | None = None) -> str:
    """'triton' or 'torch' for `device`. GENESIS_MASK_IMPL (any case) overrides `requested`. 'triton' where it
    cannot run is a TritonUnavailableError (a MaskingError) that says why; 'auto' falls back to torch with one log
    line (on CUDA, or when asked on CPU)."""
    impl = requested_impl(requested)
    if impl not in IMPLS:
        raw, source = _impl_source(requested)
        raise MaskingError(f"mask impl must be one of {', '.join(IMPLS)} (got {raw!r}, from {source})")
    if impl == "torch":
        return "torch"
    reason = triton_status(device)
    if impl == "triton":
        if reason is not None:
            raise TritonUnavailableError(f"masking impl 'triton' cannot run: {reason}. Use impl='torch' or 'auto'")
        return "triton"
    # auto: the kernel on CUDA; the torch path elsewhere (the interpreter is for tests, far too slow to train with)
    if device.type == "cuda" and reason is None:
        return "triton"
    if log is not None:
        why = reason if device.type == "cuda" else f"{device.type} tensors use the torch path"
        log(f"masking: using the torch path ({why})")
    return "torch"

