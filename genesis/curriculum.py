"""The training-side loops around the masker: connective loss weights, adaptive masking weights and the
plateau-triggered schedule. The trainer owns one `Curriculum` per run; its state goes into the checkpoint.

Semantics: docs/masking.md (adaptive, plateau) and docs/training.md (connective_loss_weight)."""

from __future__ import annotations

from typing import Any

import torch

from genesis.config import Config
from genesis.masking import count_first_pieces

PLATEAU_EMA = 0.9  # the training loss's EMA, updated at each log step: ema = 0.9 ema + 0.1 loss


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
