"""The training-side loops around the masker: connective loss weights, adaptive masking weights and the
masking schedules (plateau-triggered included). The trainer owns one `Curriculum` per run; its state goes into the
checkpoint. The masker reads its schedule factor (`schedule_factor`) and its adaptive update (`adapted_weights`)
from here.

Semantics: docs/masking.md (adaptive, plateau) and docs/training.md (connective_loss_weight)."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from genesis.config import Config, MaskingConfig

PLATEAU_EMA = 0.9  # the training loss's EMA, updated at each log step: ema = 0.9 ema + 0.1 loss


def schedule_factor(c: MaskingConfig, step: int, plateau_step: int | None = None) -> float:
    """The factor masking.schedule puts on every masking probability at `step` (1 for "constant"): from
    schedule_start at step 0 to 1 at schedule_steps, linearly or on a half cosine, then 1; with "plateau", 0 until
    `plateau_step` (None: not found yet), then the linear ramp from there. Rounded to float32, the precision the
    probabilities are multiplied in."""
    if c.schedule == "plateau":  # 0 until the trainer finds the plateau, then the linear ramp from there
        if plateau_step is None or step < plateau_step:
            return 0.0
        step -= plateau_step
    if c.schedule == "constant" or step >= c.schedule_steps:
        return 1.0
    progress = step / c.schedule_steps
    ramp = 0.5 * (1.0 - math.cos(math.pi * progress)) if c.schedule == "cosine" else progress
    return float(np.float32(c.schedule_start + (1.0 - c.schedule_start) * ramp))


def adapted_weights(c: MaskingConfig, old: torch.Tensor, correct: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """The adaptive rule on (E,) CPU tensors, `old` the weights now: an entry with at least adapt_min_count
    observations and accuracy `correct / count` below adapt_low gets weight x adapt_up, above adapt_high weight x
    adapt_down, clamped to [adapt_min_weight, adapt_max_weight]; the others keep their weight."""
    accuracy = correct / count.clamp(min=1)
    seen = count >= c.adapt_min_count
    factor = torch.ones_like(old)
    factor[seen & (accuracy < c.adapt_low)] = c.adapt_up
    factor[seen & (accuracy > c.adapt_high)] = c.adapt_down
    return torch.where(seen, (old * factor).clamp(c.adapt_min_weight, c.adapt_max_weight), old)


def count_first_pieces(logits: torch.Tensor, targets: torch.Tensor, first_entry: torch.Tensor,
                       n_entries: int) -> torch.Tensor:
    """The adaptive weights' signal from one batch, on its device with no host sync: a (2, E) int64 tensor of
    (correct, count) per lexicon entry, over the targets that are the first piece of a match (`first_entry` >= 0,
    from `ConnectiveMasker.target_matches`), correct where the argmax of the (B, T, V) logits is the target."""
    entry = first_entry.reshape(-1)
    seen = entry >= 0
    hit = (logits.detach().argmax(-1).reshape(-1) == targets.reshape(-1)) & seen
    counts = torch.zeros(2, n_entries, dtype=torch.int64, device=logits.device)
    index = entry.clamp(min=0)
    counts[0].scatter_add_(0, index, hit.long())
    counts[1].scatter_add_(0, index, seen.long())
    return counts


class Curriculum:
    """Per-run state: the adaptive counters (a (2, E) int64 device tensor of correct and count per lexicon entry),
    the loss EMA's history at log steps and the plateau's trigger step (in the masker)."""

    def __init__(self, cfg: Config, masker: Any, device: torch.device):
        self.cfg, self.masker = cfg, masker
        m = cfg.masking
        self.loss_weight = cfg.training.connective_loss_weight
        self.adaptive = masker is not None and m.adaptive
        self.plateau = masker is not None and m.schedule == "plateau"
        self.adapt_every = m.adapt_every or cfg.training.log_every
        n_entries = masker.weights().numel() if masker is not None else 1
        self.counts = torch.zeros(2, n_entries, dtype=torch.int64, device=device)
        self.ema: float | None = None
        self.history: list[tuple[int, float]] = []  # (log step, EMA) over the last plateau_window steps

    @property
    def needs_targets(self) -> bool:
        """Whether each micro-batch needs `target_matches` (a matcher pass over its window)."""
        return self.loss_weight != 1.0 or self.adaptive

    def micro_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The per-target loss weights of one micro-batch (None when they are all 1) and its first-piece entries
        (None without adaptive)."""
        if not self.needs_targets:
            return None, None
        piece, first = self.masker.target_matches(torch.cat([x[:, :1], y], dim=1))
        weights = None
        if self.loss_weight != 1.0:
            weights = torch.where(piece, torch.tensor(self.loss_weight, dtype=torch.float32, device=y.device),
                                  torch.tensor(1.0, dtype=torch.float32, device=y.device))
        return weights, first if self.adaptive else None

    def observe(self, logits: torch.Tensor, y: torch.Tensor, first: torch.Tensor) -> None:
        """Add one micro-batch's argmax hits at first pieces to the counters (device, no host sync)."""
        self.counts += count_first_pieces(logits, y, first, self.counts.shape[1])

    def adapt_due(self, done: int) -> bool:
        return self.adaptive and done % self.adapt_every == 0

    def adapt(self, summed: torch.Tensor) -> dict[str, tuple[float, float]]:
        """The update from the counters summed over the processes; the counters reset. {word: (old, new)}."""
        changed = self.masker.adapt(summed[0], summed[1])
        self.counts.zero_()
        words = self.masker.lexicon.words
        return {words[e]: change for e, change in changed.items()}

    def watch_loss(self, done: int, loss: float) -> bool:
        """At a log step: update the loss EMA; True when the plateau is found now (masking starts at step `done`)."""
        if not self.plateau or self.masker.plateau_step is not None:
            return False
        self.ema = loss if self.ema is None else PLATEAU_EMA * self.ema + (1 - PLATEAU_EMA) * loss
        m = self.cfg.masking
        self.history.append((done, self.ema))
        past = [ema for step, ema in self.history if step <= done - m.plateau_window]
        self.history = [(step, ema) for step, ema in self.history if step >= done - m.plateau_window]
        if past and past[-1] - self.ema < m.plateau_delta:
            self.masker.plateau_step = done
            return True
        return False

    def state_dict(self, counts: torch.Tensor | None = None) -> dict:
        """The checkpoint's entry; `counts`: the counters summed over the processes (default: this process's)."""
        state: dict[str, Any] = {}
        if self.adaptive:
            state.update(weights=self.masker.weights(), counts=(self.counts if counts is None else counts).cpu().long())
        if self.plateau:
            state.update(plateau_step=self.masker.plateau_step, ema=self.ema, history=[list(h) for h in self.history])
        return state

    def load_state_dict(self, state: dict, main: bool = True) -> None:
        """A checkpoint's entry. The counters saved are the processes' sum: rank 0 (`main`) takes them, the others
        start from zero, so the sum at the next update is the uninterrupted run's."""
        if self.adaptive and "weights" in state:
            self.masker.set_weights(state["weights"])
            if main:
                self.counts.copy_(state["counts"])
        if self.plateau and "history" in state:
            self.masker.plateau_step = state["plateau_step"]
            self.ema = state["ema"]
            self.history = [(int(step), float(ema)) for step, ema in state["history"]]
