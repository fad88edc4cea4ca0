"""Do two maskers mask a batch alike: every output equal (`torch.equal`, same dtype and shape), the Triton kernel
against the torch path, or the torch path on one device against another.

The benchmark calls this once before it times (it refuses to time maskers that disagree); tests/test_masking.py
holds the full comparison cases (every strategy, replacement, clause mode, odd shapes and dtypes).
"""

from __future__ import annotations

from typing import Any

import torch

OUTPUTS = ("input_ids", "mask", "classes", "connectives", "matched", "readout", "readout_start")


def check_parity(masker_a: Any, masker_b: Any, x: torch.Tensor, verse_start: torch.Tensor | None = None, *,
                 step: int = 0, device_b: torch.device | str | None = None) -> list[str]:
    """What differs between `masker_a(x)` (on x's device) and `masker_b(x)` (on `device_b`, default x's device),
    at the same step: one line per differing output, naming it and its first differing positions; [] if every
    output is equal."""
    device_b = x.device if device_b is None else torch.device(device_b)
    a = masker_a(x, step=step, verse_start=verse_start)
    b = masker_b(x.to(device_b), step=step, verse_start=None if verse_start is None else verse_start.to(device_b))
    differences = []
    for name in OUTPUTS:
        u, v = getattr(a, name), getattr(b, name)
        if u is None or v is None:
            if (u is None) != (v is None):
                differences.append(f"{name}: only one masker returned it")
            continue
        v = v.to(u.device)
        if u.dtype != v.dtype or u.shape != v.shape:
            differences.append(f"{name}: {u.dtype} {tuple(u.shape)} vs {v.dtype} {tuple(v.shape)}")
        elif not torch.equal(u, v):
            differences.append(f"{name} differs at {torch.nonzero(u != v)[:3].tolist()}")
    return differences
