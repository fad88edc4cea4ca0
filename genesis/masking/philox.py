"""Philox-4x32-10 and its uniforms, bit-exact with Triton's tl.philox / tl.rand: the torch path's twin of the
kernel's random draws, in numpy (the CPU) and in torch (any other device)."""

from __future__ import annotations

import functools

import numpy as np
import torch

MASK32 = 0xFFFFFFFF

_PHILOX_ROUND = (0xD2511F53, 0xCD9E8D57)  # multipliers for (c0, c2)
_PHILOX_KEY_STEP = (0x9E3779B9, 0xBB67AE85)
_ROUNDS = 10


@functools.lru_cache(maxsize=64)
def _philox_constants(seed: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The (2, 1) multiplier column and the (ROUNDS, 2, 1) round keys for a seed, built once per device."""
    k0, k1 = seed & MASK32, (seed >> 32) & MASK32
    keys = []
    for _ in range(_ROUNDS):
        keys.append([[k0], [k1]])
        k0, k1 = (k0 + _PHILOX_KEY_STEP[0]) & MASK32, (k1 + _PHILOX_KEY_STEP[1]) & MASK32
    mult = torch.tensor([[_PHILOX_ROUND[0]], [_PHILOX_ROUND[1]]], dtype=torch.int64, device=device)
    return mult, torch.tensor(keys, dtype=torch.int64, device=device)


def philox4x32(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor):
    """Philox-4x32-10 on int64 tensors holding uint32 values; returns the four output words (int64, < 2**32),
    bit-exact with Triton's tl.philox(seed, c0, c1, c2, c3) and hence tl.rand.

    On the CPU the rounds run in numpy (uint64 arithmetic), whose per-op cost on the few thousand values a batch
    needs is lower than eager torch's; elsewhere in torch."""
    if c0.device.type == "cpu":
        words = _philox_numpy(seed, *(c.numpy() for c in (c0, c1, c2, c3)))
        return tuple(torch.from_numpy(np.ascontiguousarray(w).view(np.int64)) for w in words)
    return _philox_torch(seed, c0, c1, c2, c3)


def _philox_numpy(seed: int, c0: np.ndarray, c1: np.ndarray, c2: np.ndarray, c3: np.ndarray):
    """The rounds in numpy on two (2, n) uint64 stacks, (c0, c2) and (c1, c3), as `_philox_torch`: uint64 products
    of two 32-bit words are exact, and `>> 32` is the high word. Multiplying the flipped stack by the flipped
    multipliers gives the products already in the order the next round wants, so every other operation runs on
    contiguous arrays, in place (cheaper than flipping the results)."""
    n = np.shape(c0)[0]  # counters may be scalars (step, rank): broadcast
    even, odd, prod = np.empty((2, n), dtype=np.uint64), np.empty((2, n), dtype=np.uint64), np.empty((2, n), np.uint64)
    even[0], even[1], odd[0], odd[1] = c0, c2, c1, c3
    flipped_mult, keys = _philox_constants_numpy(seed)
    mask, shift = np.uint64(MASK32), np.uint64(32)
    for key in keys:
        np.multiply(even[::-1], flipped_mult, out=prod)  # (B*c2, A*c0)
        np.right_shift(prod, shift, out=even)
        even ^= odd  # c0' = hi(B*c2) ^ c1 ^ k0 ; c2' = hi(A*c0) ^ c3 ^ k1
        even ^= key
        np.bitwise_and(prod, mask, out=odd)  # c1' = lo(B*c2) ; c3' = lo(A*c0)
    return even[0], odd[0], even[1], odd[1]


@functools.lru_cache(maxsize=64)
def _philox_constants_numpy(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The multipliers flipped, (B, A), and the round keys, as uint64."""
    mult, keys = _philox_constants(seed, torch.device("cpu"))
    return np.ascontiguousarray(mult.numpy()[::-1]).astype(np.uint64), keys.numpy().astype(np.uint64)


def _philox_torch(seed: int, c0: torch.Tensor, c1: torch.Tensor, c2: torch.Tensor, c3: torch.Tensor):
    """The rounds in torch. A 32x32-bit product is below 2**64, so the int64 product wraps to exactly its low 64
    bits (two's complement, on CPU and CUDA); `>> 32 & MASK32` recovers the high word. The state is kept as two
    (2, n) stacks, (c0, c2) and (c1, c3), so each round is eight tensor ops whatever n is."""
    even = torch.stack([c0, c2])  # (2, n)
    odd = torch.stack([c1, c3])
    mult, keys = _philox_constants(seed, even.device)
    for key in keys:
        prod = even * mult  # (A*c0, B*c2), wrapped
        hi = (prod >> 32) & MASK32
        even = hi.flip(0) ^ odd ^ key  # c0' = hi(B*c2) ^ c1 ^ k0 ; c2' = hi(A*c0) ^ c3 ^ k1
        odd = (prod & MASK32).flip(0)  # c1' = lo(B*c2) ; c3' = lo(A*c0)
    return even[0], odd[0], even[1], odd[1]


def uniform_from_bits(word: torch.Tensor) -> torch.Tensor:
    """uint32 (in int64) -> float32 in [0, 1), exactly as tl.rand: bitcast to int32, negative x -> -x-1, scale."""
    return torch.minimum(word, MASK32 - word).to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def uniform_from_bits_numpy(word: np.ndarray) -> np.ndarray:
    """`uniform_from_bits` in numpy: the same float32 operations, hence the same values."""
    return np.minimum(word, MASK32 - word).astype(np.float32) * np.float32(4.6566127342e-10)

