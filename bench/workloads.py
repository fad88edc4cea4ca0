"""The batches the masking benches time and the maskers they build: real KJV windows of the token cache (cpu.toml's
data and tokenizer), on the CPU and their copies on CUDA, and `ConnectiveMasker`s as the trainer calls them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import numpy as np
import torch

from genesis.data import Batch, gather_windows, window_starts
from genesis.masking import ConnectiveMasker

STRATEGIES = ("uniform", "weighted", "structural")
SEED = 1234  # masking seed of every Genesis masker (and the loop's / HF's RNG seeds derive from it)
DATA_SEED = 7  # window starts of the timed batches


@dataclass
class Workload:
    """The batches of one size: window starts, CPU batches (x, y, verse_start) and their CUDA copies."""

    B: int
    T: int
    starts: list[np.ndarray]
    cpu: list[Batch]
    cuda: list[Batch] = field(default_factory=list)
    hf_rows: list[list[torch.Tensor]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.B}x{self.T}"

    @property
    def tokens(self) -> int:
        return self.B * self.T


def make_workload(split, B: int, T: int, n_batches: int, seed: int, device: str, layout: str, hf: bool) -> Workload:
    """`n_batches` batches of B windows of T tokens; layout "view" keeps batch.x as get_batch gives it (a strided
    view, as the trainer passes it), "contiguous" copies it; `hf` also keeps the rows the HF collator takes."""
    starts = [window_starts(len(split), T, B, seed, step) for step in range(n_batches)]

    def gather(device: str) -> list[Batch]:
        batches = [gather_windows(split, s, T, device) for s in starts]
        if layout == "contiguous":
            batches = [Batch(b.x.contiguous(), b.y.contiguous(), b.verse_start) for b in batches]
        return batches

    work = Workload(B, T, starts, gather("cpu"))
    if device == "cuda":
        work.cuda = gather("cuda")
        torch.cuda.synchronize()
    if hf:
        work.hf_rows = [list(b.x.unbind(0)) for b in work.cpu]  # what a Dataset of rows hands the collator
    return work


def make_masker(tokenizer, masking_cfg, strategy: str, impl: str, **overrides) -> ConnectiveMasker:
    """A masker as the trainer calls it (check_ids=False), seeded with SEED."""
    return ConnectiveMasker.from_tokenizer(tokenizer, masking_cfg, strategy=strategy, impl=impl, seed=SEED,
                                           check_ids=False, log=None, **overrides)


def with_impl(masker: ConnectiveMasker, impl: str) -> ConnectiveMasker:
    """`masker` with another impl ("torch" or "triton"): the same lexicon, settings, seed and rank (the lexicon is
    not resolved again)."""
    return ConnectiveMasker(masker.lexicon, dataclasses.replace(masker.config, impl=impl), masker.mask_id,
                            seed=masker.seed, rank=masker.rank, check_ids=False, log=None)


def bytes_moved(work: Workload) -> int:
    """Read ids + verse_start, write ids + mask + matched + classes (int64) + connectives (int64): 35 B/token for
    int64 ids. Table reads (a few KB, cache-resident) and any copy the launcher makes of a strided batch are not
    counted."""
    id_bytes = work.cpu[0].x.element_size()
    return work.tokens * (id_bytes + 1 + id_bytes + 1 + 1 + 8 + 8)
