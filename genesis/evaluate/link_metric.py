"""The link metric: a cloze item's connective masked and named after its consequent, by the run's link head and by
a frozen linear probe fitted on training occurrences built the same way (docs/evaluation.md#the-link-metric).

An item's sequence is the whole-verse cloze's answer sequence (the same left context) with every piece of the
connective replaced by the mask token; it is read at the masker's readout position (`genesis.masking
.readout_position`, the same clause stops), with `genesis.link.link_features` ("stop": the final state there;
"span": the mean from the column after the word to it). Where the verse ends before a readout position exists (the
word followed by stops only: "even so."), the sequence's last token is read instead, and the item is counted."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer

from genesis.console import Progress
from genesis.evaluate.items import VERSE_SEPARATOR, ClozeSet, EncodedSplit, Slot, left_context, select_evenly
from genesis.evaluate.run import EvalError
from genesis.evaluate.scorers import DEFAULT_BATCH_TOKENS, length_batches, pad_rows
from genesis.lexicon import ResolvedLexicon
from genesis.link import LINK_READOUTS, link_features
from genesis.masking import readout_position

LINK_SCORERS = ("link_head", "link_probe")  # their cloze.scorers entries: the head only where the model has one
PROBE_READOUT = "span"  # a run without a link head reads what model.link_readout's default reads (bench/RESULTS.md)
PROBE_MAX_TRAIN = 8000  # training occurrences the probe is fitted on, spread evenly over the training split
PROBE_L2 = 1e-3  # on the mean cross-entropy, over standardised features: loss + PROBE_L2 * ||W||^2 (bias free)
# L-BFGS stops at this many iterations or a gradient this small (max norm); both settings are checked against more
# in bench/RESULTS.md (the frozen probe's settings)
PROBE_MAX_ITER = 300
PROBE_TOLERANCE = 1e-6


@dataclass
class LinkItems:
    """Sequences with one connective masked, each cut after its readout position (the model is causal: nothing
    after it changes what is read), and where it is read."""

    tokens: list[np.ndarray]  # int64, the connective's pieces replaced by the mask token
    readout: np.ndarray  # (n,) the readout column: the sequence's last
    readout_start: np.ndarray  # (n,) the column after the word's last piece: the consequent span's first
    label: np.ndarray  # (n,) index into the cloze candidates of the masked word
    no_readout: np.ndarray  # (n,) bool: no readout position before the sequence ends; read at its last token

    def __len__(self) -> int:
        return len(self.tokens)


def clause_stops(lex: ResolvedLexicon, size: int) -> list[bool]:
    """Per token id below `size`: whether it is a clause stop (clause boundary or verse separator), as the masker's
    `clause_stop` table says; ids past the lexicon's vocabulary (none, for the run's tokenizer) are not."""
    stop = np.zeros(max(size, lex.vocab_size), dtype=bool)
    stop[: lex.vocab_size] = lex.clause_boundary | lex.verse_separator
    return stop.tolist()


def mask_and_read(sequences: list[np.ndarray], word_start: np.ndarray, word_end: np.ndarray, labels: np.ndarray,
                  mask_id: int, clause_stop: list[bool]) -> LinkItems:
    """Each sequence with tokens [word_start, word_end) masked, its readout position found by the masker's rule
    (no verse flags: only the verse's own tokens follow the word, and the row's last column is never a stop by flags)
    and the sequence cut after it."""
    tokens, readout, readout_start, missing = [], [], [], []
    for seq, start, end in zip(sequences, word_start.tolist(), word_end.tolist()):
        row = seq.copy()
        row[start:end] = mask_id
        position = readout_position(row.tolist(), end - 1, clause_stop)
        missing.append(position is None)
        position = len(row) - 1 if position is None else position
        tokens.append(row[: position + 1])
        readout.append(position)
        readout_start.append(min(end, position))
    return LinkItems(tokens, np.array(readout, dtype=np.int64), np.array(readout_start, dtype=np.int64),
                     np.asarray(labels, dtype=np.int64), np.array(missing, dtype=bool))


def heldout_link_items(cloze: ClozeSet, mask_id: int, clause_stop: list[bool]) -> LinkItems:
    """The cloze items' answer sequences (the whole-verse cloze's tokens and context), the connective masked."""
    K = cloze.n_candidates
    answer_seq = np.arange(len(cloze.items), dtype=np.int64) * K + cloze.answer
    return mask_and_read([cloze.tokens[j] for j in answer_seq], cloze.blank_start[answer_seq],
                         cloze.blank_end[answer_seq], cloze.answer, mask_id, clause_stop)


def train_link_items(split: EncodedSplit, slots: list[Slot], tokenizer: Tokenizer, candidates: list[int],
                     max_len: int, context_verses: int, mask_id: int, clause_stop: list[bool],
                     max_items: int = PROBE_MAX_TRAIN) -> tuple[LinkItems, dict[str, int]]:
    """Up to `max_items` training occurrences spread evenly over the split (`select_evenly`), each built as a cloze
    answer sequence is (the verse separator, up to `context_verses` preceding verses of the chapter, the verse, cut
    to `max_len` tokens from the left) and masked and read as the held-out items are; and the counts of those left
    out (a verse longer than the model, a word that is no candidate)."""
    separator = tokenizer.encode(VERSE_SEPARATOR, add_special_tokens=False).ids
    index_of = {entry: k for k, entry in enumerate(candidates)}
    sequences, starts, ends, labels = [], [], [], []
    skipped = {"verse_longer_than_model": 0, "not_a_candidate": 0}
    for slot in select_evenly(slots, max_items):
        verse_ids = split.verse_ids[slot.verse_index]
        if len(verse_ids) >= max_len:
            skipped["verse_longer_than_model"] += 1
            continue
        if slot.entry not in index_of:
            skipped["not_a_candidate"] += 1
            continue
        context = left_context(split, slot.verse_index, separator, context_verses, max_len - len(verse_ids))
        start = len(context) + slot.stream_pos - int(split.verse_first[slot.verse_index])
        sequences.append(np.array(context + list(verse_ids), dtype=np.int64))
        starts.append(start)
        ends.append(start + slot.n_pieces)
        labels.append(index_of[slot.entry])
    items = mask_and_read(sequences, np.array(starts, dtype=np.int64), np.array(ends, dtype=np.int64),
                          np.array(labels, dtype=np.int64), mask_id, clause_stop)
    return items, {k: v for k, v in skipped.items() if v}


@torch.inference_mode()
def read_features(model: torch.nn.Module, items: LinkItems, readout: str, device: torch.device | str = "cpu",
                  batch_tokens: int = DEFAULT_BATCH_TOKENS, label: str = "") -> torch.Tensor:
    """(n, C) `link_features` of the model's final hidden states at each item's readout position, with the item's
    readout start, in the model's dtype, on `device`, in item order. Sequences are sorted by length and right-padded
    into batches of ~batch_tokens tokens (padding after the readout position, which causal attention never sees)."""
    if readout not in LINK_READOUTS:
        raise EvalError(f"link readout must be one of {', '.join(LINK_READOUTS)} (got {readout!r})")
    lengths = np.fromiter((len(t) for t in items.tokens), dtype=np.int64, count=len(items))
    batches = length_batches(lengths, np.arange(len(items)), batch_tokens)
    out: torch.Tensor | None = None
    bar = Progress(len(batches), label, every=25) if label else None
    for done, batch in enumerate(batches, start=1):
        x = pad_rows([items.tokens[j] for j in batch])
        rows = torch.arange(len(batch), device=device)
        cols = torch.from_numpy(items.readout[batch]).to(device)
        readout_start = torch.full(x.shape, -1, dtype=torch.int64, device=device)
        readout_start[rows, cols] = torch.from_numpy(items.readout_start[batch]).to(device)
        features = link_features(model.hidden(torch.from_numpy(x).to(device)), readout_start, readout)[rows, cols]
        if out is None:
            out = features.new_empty((len(items), features.shape[-1]))
        out[torch.from_numpy(batch).to(device)] = features
        if bar:
            bar.update(done)
    return out if out is not None else torch.zeros(0, 0)


@dataclass
class Probe:
    """A multinomial logistic regression on standardised features: logits = ((x - mean) / scale) @ weight + bias."""

    mean: torch.Tensor  # (C,) float64
    scale: torch.Tensor  # (C,)
    weight: torch.Tensor  # (C, K)
    bias: torch.Tensor  # (K,)
    iterations: int
    loss: float  # the fitted objective: mean cross-entropy + l2 * ||weight||^2

    def logits(self, features: torch.Tensor) -> torch.Tensor:
        z = (features.detach().cpu().double().clone() - self.mean) / self.scale
        return z @ self.weight + self.bias


def fit_probe(features: torch.Tensor, labels: np.ndarray, n_classes: int, l2: float = PROBE_L2,
              max_iter: int = PROBE_MAX_ITER, tolerance: float = PROBE_TOLERANCE) -> Probe:
    """Full-batch L-BFGS (strong Wolfe line search) in float64 on the CPU from zero weights: a convex objective and
    no randomness, so the same features give the same probe. Features are standardised by the training mean and
    standard deviation (a constant feature keeps scale 1), so one `l2` suits every model width."""
    x = features.detach().cpu().double().clone()  # a plain tensor: features may come from inference mode
    y = torch.from_numpy(np.asarray(labels, dtype=np.int64))
    if len(x) == 0:
        raise EvalError("the frozen probe has no training occurrence to fit on")
    mean, std = x.mean(0), x.std(0, unbiased=False)
    scale = torch.where(std > 1e-12, std, torch.ones_like(std))
    z = (x - mean) / scale
    weight = torch.zeros(x.shape[1], n_classes, dtype=torch.float64, requires_grad=True)
    bias = torch.zeros(n_classes, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=tolerance,
                                  tolerance_change=1e-12, history_size=20, line_search_fn="strong_wolfe")

    def objective() -> torch.Tensor:
        optimizer.zero_grad()
        loss = F.cross_entropy(z @ weight + bias, y) + l2 * weight.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(objective)
        loss = float(objective().detach())
    iterations = int(optimizer.state[weight].get("n_iter", 0))
    return Probe(mean, scale, weight.detach(), bias.detach(), iterations, loss)


def link_readout_of(model: torch.nn.Module) -> tuple[torch.nn.Module | None, str, str]:
    """(the link head or None, the readout the probe uses, where that readout comes from)."""
    head = getattr(model, "link_head", None)
    readout = getattr(getattr(model, "args", None), "link_readout", None)
    if head is not None and readout is not None:
        return head, readout, "model.link_readout"
    return head, PROBE_READOUT, "default"


def score_link(model: torch.nn.Module, heldout: LinkItems, train: LinkItems, candidates: list[int], n_entries: int,
               device: torch.device | str = "cpu", batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = True
               ) -> tuple[dict[str, np.ndarray], dict[str, Any], dict[str, float]]:
    """Scores (n, K) over the cloze candidates per link scorer ("link_head" where the model has a head,
    "link_probe" always), the settings and counts for eval.json, and the timings."""
    head, readout, readout_from = link_readout_of(model)
    timings, scores = {}, {}
    t0 = time.time()
    heldout_features = read_features(model, heldout, readout, device, batch_tokens, "link" if progress else "")
    if head is not None:
        if head.out_features != n_entries:
            raise EvalError(f"the model's link head has {head.out_features} outputs; the run's lexicon has "
                            f"{n_entries} words")
        with torch.inference_mode():
            scores["link_head"] = head(heldout_features).float()[:, candidates].double().cpu().numpy()
    timings["link_heldout_s"] = time.time() - t0  # the held-out features, and the head on them
    t0 = time.time()
    train_features = read_features(model, train, readout, device, batch_tokens, "link probe" if progress else "")
    probe = fit_probe(train_features, train.label, len(candidates))
    scores["link_probe"] = probe.logits(heldout_features).numpy()
    train_accuracy = float((probe.logits(train_features).argmax(1).numpy() == train.label).mean())
    timings["link_probe_s"] = time.time() - t0
    info = {
        "readout": readout, "n_items": len(heldout), "no_readout": int(heldout.no_readout.sum()),
        "head": {"readout": readout, "outputs": n_entries} if head is not None else None,
        "probe": {"readout": readout, "readout_from": readout_from, "n_train": len(train),
                  "no_readout": int(train.no_readout.sum()), "l2": PROBE_L2,
                  "standardised": True, "optimizer": "L-BFGS, strong Wolfe, float64, zero start",
                  "max_iter": PROBE_MAX_ITER, "tolerance": PROBE_TOLERANCE, "iterations": probe.iterations,
                  "train_loss": round(probe.loss, 6), "train_accuracy": round(train_accuracy, 6),
                  "features": int(train_features.shape[-1])},
    }
    return scores, info, timings
