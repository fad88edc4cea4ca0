"""Held-out evaluation during training: the mean next-token loss over fixed windows, the class head at their masked
tokens, the link head at their readout positions, and the next-token accuracy at their connective words, scored as
genesis.evaluate scores them."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from genesis.config import Config
from genesis.data import TokenSplit, eval_starts, gather_windows
from genesis.distributed import ONE_PROCESS, World, all_sum, stop_vote
from genesis.lexicon import find_matches
from genesis.model import class_loss

HELDOUT_MASK_STEP = 2**32 - 1  # the masker's step for held-out windows: a counter no training step uses


@dataclass
class HeldoutConnectives:
    """The connective words in the held-out evaluation windows (fixed for a run), for a per-connective next-token
    accuracy at every evaluation: the whole-stream matches of `genesis.lexicon.find_matches` (the ones
    genesis.evaluate's `find_slots` scores) that lie in a window with a token before them. One entry per piece."""

    words: list[str]  # the lexicon's words, by entry
    window: np.ndarray  # (P,) int64: the window (index into eval_starts) of each piece
    col: np.ndarray  # (P,) int64: the input column that predicts the piece (the piece's column - 1)
    occurrence: np.ndarray  # (P,) int64: the word occurrence the piece belongs to, 0..N-1 in window order
    entry: np.ndarray  # (N,) int64: the lexicon entry of each occurrence

    @classmethod
    def find(cls, data: TokenSplit, cfg: Config, lexicon) -> HeldoutConnectives:
        T, B = cfg.model.seq_len, cfg.training.micro_batch
        matches = find_matches(np.asarray(data.tokens, dtype=np.int64), lexicon)
        match_starts = np.array([s for s, _, _ in matches], dtype=np.int64)
        window, col, occurrence, entry = [], [], [], []
        for w, start in enumerate(eval_starts(len(data), T, cfg.training.eval_batches * B).tolist()):
            lo, hi = np.searchsorted(match_starts, [start + 1, start + T])  # the words that may lie in the window
            for s, length, e in cls.in_span(matches[lo:hi], start, T):
                window += [w] * length
                col += range(s - 1, s - 1 + length)
                occurrence += [len(entry)] * length
                entry.append(e)
        arrays = (np.array(a, dtype=np.int64) for a in (window, col, occurrence, entry))
        return cls(list(lexicon.words), *arrays)

    @staticmethod
    def in_span(matches: list[tuple[int, int, int]], start: int, T: int) -> list[tuple[int, int, int]]:
        """(start, length, entry), relative to `start`, of the stream's matches scored in the window of T inputs at
        `start`: a word needs a token before it and all its pieces in the window."""
        return [(s - start, n, e) for s, n, e in matches if start + 1 <= s and s + n <= start + T]

    @classmethod
    def in_window(cls, tokens: np.ndarray, lexicon) -> list[tuple[int, int, int]]:
        """The connectives scored in a window of T = len(tokens) - 1 inputs, matched with the window's last target
        token after it: a word going on past the window is no connective (for|ged), as in the whole stream."""
        return cls.in_span(find_matches(tokens, lexicon), 0, len(tokens) - 1)

    def batch(self, first: int, count: int) -> slice:
        """The pieces of windows first .. first + count - 1 (contiguous: the pieces are in window order)."""
        lo, hi = np.searchsorted(self.window, [first, first + count])
        return slice(int(lo), int(hi))


@torch.no_grad()
def evaluate_loss(model, data: TokenSplit, cfg: Config, device, amp, world: World = ONE_PROCESS, masker=None,
                  connectives: HeldoutConnectives | None = None) -> dict:
    """{"loss": mean next-token loss} over evenly spaced held-out windows (the same windows at every evaluation).
    Several processes share the windows out, batch by batch, vote on stopping before each round and sum their totals.

    For a model with a class head (and the run's masker), also the head's mean cross-entropy and accuracy at the
    masked tokens of the same windows masked by the masker — at a fixed step, so the same tokens at every evaluation
    ("class_loss", "class_accuracy", "class_tokens"): a second pass over each batch, through the trunk and the head
    only. The loss is always that of the unmasked text. For a model with a link head, likewise the link head's at
    the readout positions of the same masked windows ("link_loss", "link_accuracy", "link_targets"), from the same
    pass through the trunk.

    With `connectives`, also the next-token accuracy at every connective word of the windows (unmasked), per lexicon
    entry, scored as genesis.evaluate scores it: a word counts when every piece is the argmax (teacher-forced), ties
    sharing the credit, and the mean log-probability of the word ("connective_accuracy", "connective_logprob",
    "connective_words", "by_connective": word -> {accuracy, logprob, n})."""
    model.eval()
    T, B = cfg.model.seq_len, cfg.training.micro_batch
    starts = eval_starts(len(data), T, cfg.training.eval_batches * B)
    heads = [name for name in ("class", "link") if masker is not None and getattr(model, f"{name}_head", None)
             is not None]
    sums = torch.zeros(2 + 3 * len(heads), device=device)  # loss x tokens, tokens, per head: loss sum, correct, count
    E = len(connectives.words) if connectives is not None else 0
    per_entry = torch.zeros(3, E, dtype=torch.float64, device=device)  # credit, log p, words
    n_batches = math.ceil(len(starts) / B)
    for first in range(0, n_batches, world.size):  # a round: a batch per process, the last ones maybe none
        stop_vote(world)
        i = (first + world.rank) * B
        if i >= len(starts):
            continue
        batch = gather_windows(data, starts[i : i + B], T, device)
        with amp:
            logits, loss = model(batch.x, batch.y)
        sums[0] += loss.float() * batch.x.numel()
        sums[1] += batch.x.numel()
        if E:
            per_entry += _connective_credit(logits, batch.y, connectives, i, B, E)
        if heads:
            out = masker(batch.x, step=HELDOUT_MASK_STEP, verse_start=batch.verse_start, row_offset=i)
            with amp:  # the heads alone: the output head's (B, T, V) logits are not needed in this pass
                losses = head_losses(model, model.hidden(out.input_ids), out, heads)
            for j, c in enumerate(losses):
                sums[2 + 3 * j : 5 + 3 * j] += torch.stack([c.loss * c.count, c.correct, c.count])
    model.train()
    (packed,) = all_sum([torch.cat([sums.double(), per_entry.flatten()])], world)  # one collective
    sums, per_entry = packed[: len(sums)].tolist(), packed[len(sums) :].view(3, E)
    # divided in Python: the same numbers from one process as from several
    result = {"loss": sums[0] / sums[1]}
    if E:
        credit, logprob, words = per_entry.tolist()
        n = round(sum(words))
        result.update(connective_accuracy=sum(credit) / n if n else None,
                      connective_logprob=sum(logprob) / n if n else None, connective_words=n, by_connective={
                          connectives.words[e]: {"accuracy": credit[e] / words[e], "logprob": logprob[e] / words[e],
                                                 "n": round(words[e])}
                          for e in range(E) if words[e]})
    for j, (name, counted) in enumerate((name, "tokens" if name == "class" else "targets") for name in heads):
        loss_sum, correct, labelled = sums[2 + 3 * j : 5 + 3 * j]
        result.update({f"{name}_loss": loss_sum / labelled if labelled else None,
                       f"{name}_accuracy": correct / labelled if labelled else None,
                       f"{name}_{counted}": round(labelled)})
    return result


def head_losses(model, h: torch.Tensor, out, heads: list[str]) -> list:
    """The `ClassLoss` of each of `heads` ("class", "link") from final hidden states h (B, T, C) of the masked
    input, against the masker's output `out`."""
    return [class_loss(model.class_head(h), out.classes) if name == "class" else
            model.link_loss(h, out.readout, out.readout_start)
            for name in heads]


def piece_scores(picked: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """For logits (P, V) and their true tokens (P,): each piece's credit — 1/m when the true token is one of m tokens
    sharing the maximal logit, else 0 (the expected accuracy of a random tie-break) — and its log-probability, both
    float64. genesis.evaluate's next-token metric and the trainer's held-out connectives score with it."""
    best = picked.max(dim=-1).values
    true = picked.gather(1, target[:, None]).squeeze(1)
    ties = (picked == best[:, None]).sum(dim=-1)
    credit = (true == best).double() / ties.double()
    return credit, torch.log_softmax(picked, dim=-1).gather(1, target[:, None]).squeeze(1).double()


def _connective_credit(logits: torch.Tensor, targets: torch.Tensor, connectives: HeldoutConnectives, first: int,
                       count: int, E: int) -> torch.Tensor:
    """(3, E) float64: the credit, the summed log-probability and the number of connective words per lexicon entry
    in windows first .. first + count - 1 of an evaluation, from their logits (B, T, V) and targets (B, T)."""
    pieces = connectives.batch(first, count)
    if pieces.start == pieces.stop:
        return torch.zeros(3, E, dtype=torch.float64, device=logits.device)
    rows = torch.from_numpy(connectives.window[pieces] - first).to(logits.device)
    cols = torch.from_numpy(connectives.col[pieces]).to(logits.device)
    piece_credit, piece_logprob = piece_scores(logits[rows, cols].float(), targets[rows, cols])
    occurrence = connectives.occurrence[pieces]
    local = torch.from_numpy(occurrence - occurrence[0]).to(logits.device)
    n_words = int(occurrence[-1] - occurrence[0] + 1)
    # the product over a word's pieces, as a sum of logs (a credit of 0 gives -inf, hence 0)
    word_credit = torch.zeros(n_words, dtype=torch.float64, device=logits.device).index_add_(
        0, local, piece_credit.log()).exp()
    word_logprob = torch.zeros(n_words, dtype=torch.float64, device=logits.device).index_add_(0, local, piece_logprob)
    entry = torch.from_numpy(connectives.entry[occurrence[0] : occurrence[-1] + 1]).to(logits.device)
    out = torch.zeros(3, E, dtype=torch.float64, device=logits.device)
    out[0].index_add_(0, entry, word_credit)
    out[1].index_add_(0, entry, word_logprob)
    out[2].index_add_(0, entry, torch.ones_like(word_credit))
    return out
