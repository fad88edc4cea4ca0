"""The link readout: what a hidden connective is read from, once its consequent has been seen.

The masker's `out.readout` puts a masked word's lexicon index at its readout position (the clause stop after what
the word introduces) and `out.readout_start` the column right after the word (docs/masking.md#readout-targets).
`link_features` turns the final hidden states into one feature per position, the same shape whatever is masked:
"stop" reads the state at the readout position itself; "span" the mean of the states from `readout_start` to the
readout position, inclusive (the consequent), as a difference of cumulative sums, so no shape depends on the data.
The link head (`model.link_head`) and the evaluation's frozen probe both read these features."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from genesis.config import LINK_READOUTS
from genesis.errors import InputError


def link_features(h: torch.Tensor, readout_start: torch.Tensor, readout: str) -> torch.Tensor:
    """(B, T, C) features from final hidden states `h` (B, T, C): for "stop" `h` itself; for "span", at every
    position t with `readout_start[b, t] = s >= 0`, the mean of h[b, s..t] (fp32), and h elsewhere."""
    if readout == "stop":
        return h
    if readout != "span":
        raise InputError(f"link readout must be one of {', '.join(LINK_READOUTS)} (got {readout!r})")
    B, T, C = h.shape
    sums = F.pad(torch.cumsum(h.float(), dim=1), (0, 0, 1, 0))  # sums[:, j] = h[:, :j].sum(1), (B, T + 1, C)
    end = torch.arange(1, T + 1, device=h.device).expand(B, T)
    start = torch.minimum(readout_start.clamp(min=0), end - 1)  # a start at or before t, where there is none: t
    taken = sums[:, 1:] - sums.gather(1, start.unsqueeze(-1).expand(B, T, C))
    mean = taken / (end - start).unsqueeze(-1).to(taken.dtype)
    return torch.where((readout_start >= 0).unsqueeze(-1), mean, h.float()).to(h.dtype)
