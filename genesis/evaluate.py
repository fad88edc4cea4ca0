"""Connective evaluation of a trained run: next-token accuracy, cloze ranking, breakdowns, baselines and plots.

    python -m genesis.evaluate --checkpoint runs/cpu/checkpoint.pt                  # the KJV held-out chapters
    python -m genesis.evaluate --checkpoint runs/cpu/checkpoint.pt --corpus asv     # same chapters, ASV wording
    python -m genesis.evaluate --checkpoint runs/cpu/checkpoint.pt --max-items 300 --out /tmp/eval --json /tmp/e.json

Writes OUT/eval.json (or --json), OUT/hardest_connectives.png, OUT/accuracy_by_clause_length.png,
OUT/confusion.png and OUT/accuracy_by_genre.png (and OUT/class_head_confusion.png for a model with a class head),
and prints the tables. OUT defaults to <run dir>/eval-<corpus>-<split>.

Items. A connective slot is a whole-word occurrence of a lexicon word (the run's [masking] lexicon) in a verse of the
split, found by `genesis.lexicon.find_matches`, the same oracle the masker is tested against. Verses are encoded one
by one as text + "\\n" and concatenated; for byte-level BPE that is exactly the training token stream. Each slot
carries: verse-initial (its first token is the verse's first token), clause length (`genesis.masking.clause_length`
in the run's masking.clause_length mode, on the split's token stream: with the default "preceding", the tokens of the
clause before the connective — for a verse-initial one, the last clause of the previous verse), book and genre
(`genre_of`).

Metrics.
* Next-token accuracy: the split's token stream is read in windows of the model's seq_len (`pack_windows`), each
  slot with at least seq_len / 2 tokens of preceding context (fewer only at the start of the stream; a slot at
  stream position 0 has none and is skipped). A word of k pieces counts as correct only if all k pieces are the argmax,
  teacher-forced (piece j is predicted after the true pieces 0..j-1). Ties are split, not broken: a piece whose
  true token shares the maximal logit with m - 1 others earns 1/m, and a word earns the product over its pieces,
  i.e. the expected accuracy of a random tie-break. `first_piece_accuracy` scores piece 0 alone.
* Cloze ranking: for each slot every lexicon word is put in its place, in the form the position needs (the
  original's casing: lower, Capitalised or UPPER; the text around it unchanged, so a leading space or none comes
  with it) and re-tokenized, so every candidate has all its pieces. Each candidate sequence is
  [verse separator] + [up to --context-verses preceding verses of the chapter] + [the verse with the candidate] + "\\n";
  the context is conditioning only. Two scores: `verse` = log-likelihood of the verse's tokens (the whole verse,
  candidate pieces and final newline included); `suffix` = log-likelihood of the tokens after the candidate only,
  conditioned on everything before (the lm-evaluation-harness partial scoring used for Winogrande). The prediction is
  the argmax; candidates within 1e-6 nats of the best share the credit (1/m each), and the confusion matrix spreads
  the same shares, so its rows sum to the item counts.
* Baselines on the same cloze items: `majority` (the connective most frequent in the run's training split),
  `positional_majority` (the most frequent one among verse-initial, resp. inside, training occurrences) and
  `kn3_verse` / `kn3_suffix`: an interpolated Kneser-Ney token trigram (discount n1 / (n1 + 2 n2) per order, the
  unigram level interpolated with the uniform distribution) trained on the run's training split tokenized with the
  run's tokenizer, scored by the same cloze procedure on the same candidate sequences.

The result records the run's identity (`run_identity`: the step and a SHA-256 of the weights, model args, config and
tokenizer), so a saved eval.json can be matched to the checkpoint it measured (the comparison runner re-evaluates
when they differ).

Cross-translation: `--corpus asv` evaluates the same held-out chapters (the split hashes book and chapter) in the
ASV's wording, tokenized with the run's tokenizer; the baselines are still trained on the run's own training split.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import sys
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from genesis.config import SECTIONS, Config, ConfigError, ConfigValueError, MaskingConfig, build
from genesis.corpus import GENRES, CorpusError, Verse, genre_of, load_corpus
from genesis.data import split_verses
from genesis.lexicon import CLASSES, ResolvedLexicon, find_matches, resolve
from genesis.masking import clause_length, connectives_of
from genesis.model import Llama
from genesis.tokenizer import TokenizerError, find_mask_id, load_tokenizer_file
from genesis.train import RunError, load_model, piece_scores, refuse_several_processes, write_atomic

VERSE_SEPARATOR = "\n"  # genesis.data joins verses with it; the cloze sequences start with it
TIE_TOLERANCE = 1e-6  # nats; cloze scores closer than this share the credit (sums are float64, so only true ties)
DEFAULT_BATCH_TOKENS = 8192  # tokens per forward: logits are 8192 x 8000 x 4 B = 262 MB at the CPU vocab size
# Clause-length buckets: 0 (nothing before: the stream start) and 1 alone, then cut where the structural rules cut
# (> 10, > 15) and at the lookback cap (30).
CLAUSE_BUCKETS = ((0, 0), (1, 1), (2, 5), (6, 10), (11, 15), (16, 29), (30, None))
POSITIONS = ("verse-initial", "inside")
BREAKDOWNS = ("word", "class", "position", "clause_length", "genre", "book")
CLOZE_SCORERS = ("model_verse", "model_suffix", "kn3_verse", "kn3_suffix", "majority", "positional_majority")


class EvalError(Exception):
    """A problem with the run directory or the evaluation settings, phrased as one line."""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class Progress:
    """Progress on stderr: a bar redrawn in place on a terminal, else one line every `every` steps (and the last)."""

    def __init__(self, label: str, total: int, every: int = 25, out=None):
        self.label, self.total, self.every = label, max(total, 1), every
        self.out = out or sys.stderr
        self.tty = self.out.isatty()
        self.t0 = time.time()

    def update(self, done: int) -> None:
        elapsed = time.time() - self.t0
        eta = elapsed / max(done, 1) * (self.total - done)
        if self.tty:
            bar = "#" * int(30 * done / self.total)
            self.out.write(f"\r{self.label} [{bar:<30}] {done}/{self.total} {elapsed:5.0f}s eta {eta:4.0f}s ")
            if done >= self.total:
                self.out.write("\n")
        elif done % self.every == 0 or done >= self.total:
            self.out.write(f"{self.label}: {done}/{self.total} batches ({100 * done / self.total:.0f}%), "
                           f"{elapsed:.0f} s, eta {eta:.0f} s\n")
        self.out.flush()


# ----------------------------------------------------------------------------------------------------------------
# The run: model, config, tokenizer, lexicon


def config_from_dict(table: dict, source: str) -> Config:
    """The Config stored in a checkpoint (genesis.config.to_dict form), validated like a TOML file."""
    if not isinstance(table, dict) or any(not isinstance(table.get(name, {}), dict) for name in SECTIONS):
        raise ConfigError(f"{source}: its recorded config is not a table of [data], [model], ... tables (damaged?)")
    try:
        parts = {name: build(tp, table.get(name, {}), name) for name, tp in SECTIONS.items()}
    except ConfigValueError as e:
        raise ConfigError(f"{source}: {e.key}: {e.reason}") from None
    return Config(**parts, name=Path(source).parent.name, source=source)


def run_connectives(masking: MaskingConfig) -> dict[str, tuple[float, str]]:
    """The run's lexicon, built as `ConnectiveMasker.from_tokenizer` builds it."""
    return connectives_of(masking)


@dataclass
class Run:
    model: torch.nn.Module
    cfg: Config
    tokenizer: Tokenizer
    step: int
    checkpoint: Path
    identity: dict[str, Any]  # run_identity: recorded in the result, so an eval.json names what it measured


def load_run(checkpoint: str | os.PathLike, device: torch.device | str = "cpu") -> Run:
    """The model, its config and the tokenizer.json saved beside the checkpoint (the run directory)."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "checkpoint.pt"
    model, ckpt = load_model(path, device)
    if "config" not in ckpt:
        raise RunError(f"{path}: the checkpoint holds no config")
    cfg = config_from_dict(ckpt["config"], str(path))
    tok_path = path.parent / "tokenizer.json"
    if not tok_path.is_file():
        raise RunError(f"{tok_path}: not found; the run's tokenizer must sit beside its checkpoint")
    tokenizer = load_tokenizer_file(tok_path)
    ids, rows = tokenizer.get_vocab_size(with_added_tokens=True), model.args.vocab_size
    if ids != rows:  # the trainer sizes the embedding to the tokenizer: this tokenizer is another run's
        raise RunError(f"{tok_path}: {ids:,} token ids, but the model in {path.name} has {rows:,} (the tokenizer of "
                       f"another run?)")
    model.eval()
    return Run(model=model, cfg=cfg, tokenizer=tokenizer, step=int(ckpt.get("step", 0)), checkpoint=path,
               identity=run_identity(ckpt, tok_path))


def run_identity(ckpt: dict, tokenizer_path: str | os.PathLike) -> dict[str, Any]:
    """{"step", "sha256"}: the step, and a SHA-256 of what an evaluation reads from the run: the model's weights
    (name, dtype, shape, bytes), its model_args and config, and the tokenizer.json beside it. Not the checkpoint
    file's bytes: torch.save of the same state can come out byte-wise different (a resumed run with nothing left to
    train rewrites an identical checkpoint that way), and the optimizer state never affects the metrics. ~8 MB of
    cpu.toml weights hash in ~0.01 s."""
    digest = hashlib.sha256()
    header = {"model_args": ckpt.get("model_args"), "config": ckpt.get("config")}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for name, tensor in sorted(ckpt["model"].items()):
        weights = tensor.detach().to("cpu").contiguous()
        digest.update(f"|{name}|{weights.dtype}|{tuple(weights.shape)}|".encode())
        digest.update(weights.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(Path(tokenizer_path).read_bytes())
    return {"step": int(ckpt.get("step", 0)), "sha256": digest.hexdigest()}


def checkpoint_identity(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """`run_identity` of a checkpoint.pt (or its run directory), read on the CPU; raises what torch.load raises."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / "checkpoint.pt"
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return run_identity(ckpt, path.parent / "tokenizer.json")


def model_max_len(model: torch.nn.Module) -> int:
    return int(model.args.seq_len)


# ----------------------------------------------------------------------------------------------------------------
# Encoded splits and connective slots


@dataclass
class EncodedSplit:
    """Verses encoded one by one (text + "\\n") and concatenated into one token stream."""

    verses: list[Verse]
    verse_ids: list[list[int]]
    verse_char_spans: list[list[tuple[int, int]]] | None  # token character offsets per verse, when kept
    stream: np.ndarray  # int64 (N,)
    verse_first: np.ndarray  # int64 (n_verses + 1,): stream position of each verse's first token, then N


def encode_split(verses: list[Verse], tokenizer: Tokenizer, keep_offsets: bool = True) -> EncodedSplit:
    encodings = tokenizer.encode_batch([v.text + VERSE_SEPARATOR for v in verses], add_special_tokens=False)
    verse_ids = [e.ids for e in encodings]
    lengths = np.fromiter((len(ids) for ids in verse_ids), dtype=np.int64, count=len(verse_ids))
    verse_first = np.concatenate([[0], np.cumsum(lengths)])
    stream = np.fromiter((t for ids in verse_ids for t in ids), dtype=np.int64, count=int(verse_first[-1]))
    spans = [e.offsets for e in encodings] if keep_offsets else None
    return EncodedSplit(verses, verse_ids, spans, stream, verse_first)


@dataclass(frozen=True)
class Slot:
    """One connective occurrence in a verse: an evaluation item."""

    item_id: str  # "Romans 5:1@0": book chapter:verse @ the word's character offset (stable across runs)
    verse_index: int  # into EncodedSplit.verses
    stream_pos: int  # the word's first token in EncodedSplit.stream
    n_pieces: int
    entry: int  # lexicon entry index
    verse_initial: bool
    clause_len: int
    char_start: int  # the word's characters in the verse text (-1 when offsets were not kept)
    char_end: int
    book: str
    genre: str


def clause_bucket(clause_len: int) -> str:
    for low, high in CLAUSE_BUCKETS:
        if clause_len >= low and (high is None or clause_len <= high):
            return _bucket_label(low, high)
    raise ValueError(f"clause length {clause_len} < 0")


def _bucket_label(low: int, high: int | None) -> str:
    return f"{low}+" if high is None else str(low) if low == high else f"{low}-{high}"


CLAUSE_LABELS = tuple(_bucket_label(low, high) for low, high in CLAUSE_BUCKETS)


def find_slots(split: EncodedSplit, lex: ResolvedLexicon, lookback: int, clause_mode: str = "preceding") -> list[Slot]:
    """Every connective occurrence, left to right. One `find_matches` call over the whole stream: the newline
    between verses is a word boundary, so matches never cross verses and equal the per-verse matches."""
    matches = find_matches(split.stream, lex)
    if not matches:
        return []
    starts = np.array([m[0] for m in matches], dtype=np.int64)
    verse_of = np.searchsorted(split.verse_first, starts, side="right") - 1
    slots = []
    for (start, length, entry), v in zip(matches, verse_of.tolist()):
        verse = split.verses[v]
        pos = start - int(split.verse_first[v])
        char_start = char_end = -1
        if split.verse_char_spans is not None:
            spans = split.verse_char_spans[v]
            char_start, char_end = spans[pos][0], spans[pos + length - 1][1]
            # a byte-level token carries its leading space ("Ġfor"): the word starts after it
            char_start += len(verse.text[char_start:char_end]) - len(verse.text[char_start:char_end].lstrip())
        slots.append(Slot(
            item_id=f"{verse.book} {verse.chapter}:{verse.verse}@{char_start if char_start >= 0 else pos}",
            verse_index=v, stream_pos=start, n_pieces=length, entry=entry, verse_initial=pos == 0,
            clause_len=clause_length(split.stream, start, lex.clause_boundary, lex.verse_separator, lookback,
                                     clause_mode), char_start=char_start,
            char_end=char_end, book=verse.book, genre=genre_of(verse.book),
        ))
    return slots


def select_evenly(slots: list[Slot], max_items: int) -> list[Slot]:
    """At most `max_items` slots spread evenly over the split (so every part of the Bible keeps its share), the
    same ones for every run that uses the same tokenizer: paired comparisons need identical items."""
    if max_items <= 0 or len(slots) <= max_items:
        return list(slots)
    picks = np.unique(np.linspace(0, len(slots) - 1, num=max_items).round().astype(np.int64))
    return [slots[i] for i in picks]


# ----------------------------------------------------------------------------------------------------------------
# Next-token accuracy at connective positions


@dataclass
class NextTokenScores:
    credit: np.ndarray  # (n,) all pieces right (tie shares multiplied); nan where skipped
    first_piece_credit: np.ndarray  # (n,)
    logprob: np.ndarray  # (n,) log p(all pieces), teacher-forced


LOGIT_PATHS = ("auto", "head", "full")


def logits_at(model: torch.nn.Module, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor,
              path: str = "auto") -> torch.Tensor:
    """Logits (P, V) of batch x (B, T) at the P positions (rows, cols), fp32.

    "head": the Llama's hidden states, then its output head at those positions only; at the CPU size the head is
    ~30% of a forward pass and only ~half the positions are needed. "full": `model(x)` and a gather: any module
    with the Llama's interface (the tests' oracle and uniform models). "auto" picks "head" for a Llama."""
    if path not in LOGIT_PATHS:
        raise ValueError(f"path must be one of {LOGIT_PATHS} (got {path!r})")
    if path == "head" or (path == "auto" and isinstance(model, Llama)):
        return model.lm_head(model.hidden(x)[rows, cols]).float()
    out = model(x)
    logits = out[0] if isinstance(out, tuple) else out
    return logits[rows, cols].float()


def pack_windows(slots: list[Slot], n_tokens: int, window: int) -> list[tuple[int, list[int]]]:
    """(window start, slot indices) covering every slot that has context, with few windows.

    A window opens `window // 2` tokens before the first slot not yet covered and takes every later slot that ends
    inside it, so each connective is predicted with at least window // 2 tokens of context (fewer only at the start
    of the stream) and ~2.5x fewer tokens go through the model than with one window per slot on the KJV."""
    min_context = window // 2
    windows: list[tuple[int, list[int]]] = []
    for i, slot in enumerate(slots):
        if slot.stream_pos < 1 or slot.n_pieces > window - min_context:
            continue  # nothing to predict the first piece from / a word longer than the window can hold
        last_piece = slot.stream_pos + slot.n_pieces - 1
        if windows and last_piece <= windows[-1][0] + window - 1:
            windows[-1][1].append(i)
        else:
            windows.append((max(0, min(slot.stream_pos - min_context, n_tokens - window)), [i]))
    return windows


@torch.inference_mode()
def score_next_token(model: torch.nn.Module, stream: np.ndarray, slots: list[Slot], device: torch.device | str = "cpu",
                     batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = True, path: str = "auto"
                     ) -> NextTokenScores:
    """Windows of the token stream (`pack_windows`), batched, one forward per batch; the predictions are gathered
    at the pieces' target positions only. Slots at stream position 0 are skipped (nan)."""
    n = len(slots)
    credit, first_piece_credit, logprob = np.full(n, np.nan), np.full(n, np.nan), np.full(n, np.nan)
    window = min(model_max_len(model), len(stream))
    windows = pack_windows(slots, len(stream), window)
    per_batch = max(1, batch_tokens // window)
    batches = [windows[i : i + per_batch] for i in range(0, len(windows), per_batch)]
    bar = Progress("next-token", len(batches)) if progress else None
    for done, batch in enumerate(batches, start=1):
        starts = np.array([start for start, _ in batch])
        x = torch.from_numpy(stream[starts[:, None] + np.arange(window)]).to(device)
        # one entry per piece: its window row, its stream position, its slot
        owner = [(r, i) for r, (_, members) in enumerate(batch) for i in members]
        row = np.repeat([r for r, _ in owner], [slots[i].n_pieces for _, i in owner])
        slot_of = np.repeat([i for _, i in owner], [slots[i].n_pieces for _, i in owner])
        first = np.array([slots[i].stream_pos for i in slot_of])
        piece = np.concatenate([np.arange(slots[i].n_pieces) for _, i in owner])
        target_pos = first + piece
        col = target_pos - 1 - starts[row]  # the input position that predicts the piece
        picked = logits_at(model, x, torch.from_numpy(row).to(device), torch.from_numpy(col).to(device), path)
        target = torch.from_numpy(stream[target_pos]).to(device)
        piece_credit, piece_logprob = (t.cpu().numpy() for t in piece_scores(picked, target))
        word_first = np.cumsum([0] + [slots[i].n_pieces for _, i in owner])
        for k, (_, i) in enumerate(owner):
            pieces = slice(word_first[k], word_first[k + 1])
            credit[i] = float(np.prod(piece_credit[pieces]))
            first_piece_credit[i] = float(piece_credit[word_first[k]])
            logprob[i] = float(piece_logprob[pieces].sum())
        if bar:
            bar.update(done)
    return NextTokenScores(credit, first_piece_credit, logprob)


# ----------------------------------------------------------------------------------------------------------------
# The class head: the connective's type from the mask token


@dataclass
class ClassHeadScores:
    credit: np.ndarray  # (n,) share of the true class (ties split, as above); nan where skipped
    shares: np.ndarray  # (n, K) the prediction's shares over the classes (one-hot unless tied); nan rows where skipped


@torch.inference_mode()
def score_class_head(model: torch.nn.Module, stream: np.ndarray, slots: list[Slot], classes: np.ndarray, mask_id: int,
                     device: torch.device | str = "cpu", batch_tokens: int = DEFAULT_BATCH_TOKENS,
                     progress: bool = True) -> ClassHeadScores:
    """The class head's prediction at each slot, as in training: the word's first token is replaced by the mask
    token and the head reads the final hidden state there. One window per slot, ending at that token, holding the
    seq_len // 2 tokens before it (the next-token metric's minimum context; fewer at the start of the stream) and
    nothing else masked; the model is causal, so the word's later pieces and what follows cannot matter. Slots at
    stream position 0 are skipped (nan), as for next-token accuracy. `classes` (n,): each slot's true class id."""
    n, K = len(slots), model.class_head.out_features
    credit, shares = np.full(n, np.nan), np.full((n, K), np.nan)
    window = min(model_max_len(model) // 2 + 1, len(stream))
    todo = [i for i, slot in enumerate(slots) if slot.stream_pos >= 1]
    per_batch = max(1, batch_tokens // window)
    batches = [todo[i : i + per_batch] for i in range(0, len(todo), per_batch)]
    bar = Progress("class head", len(batches)) if progress else None
    for done, batch in enumerate(batches, start=1):
        pos = np.array([slots[i].stream_pos for i in batch])
        starts = np.clip(pos - (window - 1), 0, len(stream) - window)
        cols = pos - starts
        x = torch.from_numpy(stream[starts[:, None] + np.arange(window)]).to(device)
        rows = torch.arange(len(batch), device=device)
        cols_t = torch.from_numpy(cols).to(device)
        x[rows, cols_t] = mask_id
        logits = model.class_head(model.hidden(x)[rows, cols_t]).float()
        best = logits == logits.max(dim=-1, keepdim=True).values
        share = (best.double() / best.sum(dim=-1, keepdim=True)).cpu().numpy()
        shares[batch] = share
        credit[batch] = share[np.arange(len(batch)), classes[batch]]
        if bar:
            bar.update(done)
    return ClassHeadScores(credit, shares)


# ----------------------------------------------------------------------------------------------------------------
# Cloze items


def cased_like(original: str, word: str) -> str:
    """`word` in the casing of `original`: UPPER, Capitalised or lower."""
    if len(original) > 1 and original.isupper():
        return word.upper()
    if original[:1].isupper():
        return word.capitalize()
    return word.lower()


@dataclass
class ClozeSet:
    """Candidate sequences for the kept items, item-major: sequence i * K + k holds candidate k in item i's slot."""

    items: list[Slot]
    candidates: list[int]  # lexicon entries, the same K for every item
    answer: np.ndarray  # (n,) index into candidates of the word that is really there
    tokens: list[np.ndarray]  # n * K int64 sequences
    verse_start: np.ndarray  # (n * K,) first scored position: the verse's first token (after the context)
    blank_start: np.ndarray  # (n * K,) the candidate's pieces are tokens [blank_start, blank_end)
    blank_end: np.ndarray
    prefix_shared: np.ndarray  # (n * K,) bool: tokens before blank_start equal the answer's (always, for BPE)
    skipped: dict[str, int] = field(default_factory=dict)

    @property
    def n_candidates(self) -> int:
        return len(self.candidates)

    def lengths(self) -> np.ndarray:
        return np.fromiter((len(t) for t in self.tokens), dtype=np.int64, count=len(self.tokens))


def build_cloze(split: EncodedSplit, slots: list[Slot], tokenizer: Tokenizer, lex: ResolvedLexicon,
                candidates: list[int], max_len: int, context_verses: int = 0) -> ClozeSet:
    """Candidate sequences for each slot (see the module docstring). Items whose longest candidate verse does not
    fit in `max_len` with at least one token before it are skipped and counted."""
    separator = tokenizer.encode(VERSE_SEPARATOR, add_special_tokens=False).ids
    skipped: Counter = Counter()
    items, answers, tokens, verse_start, blank_start, blank_end, shared = [], [], [], [], [], [], []
    for slot in slots:
        verse = split.verses[slot.verse_index]
        original = verse.text[slot.char_start : slot.char_end]
        if slot.entry not in candidates or original.lower() != lex.words[slot.entry]:
            skipped["text_differs_from_word"] += 1  # a normalizing tokenizer changed the characters
            continue
        forms = [cased_like(original, lex.words[c]) for c in candidates]
        texts = [verse.text[: slot.char_start] + f + verse.text[slot.char_end :] + VERSE_SEPARATOR for f in forms]
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        longest = max(len(e.ids) for e in encodings)
        room = max_len - longest
        if room < 1:
            skipped["verse_longer_than_model"] += 1
            continue
        first = slot.verse_index
        while (first > 0 and slot.verse_index - first < context_verses
               and (split.verses[first - 1].book, split.verses[first - 1].chapter) == (verse.book, verse.chapter)):
            first -= 1
        context = list(separator) + [t for v in range(first, slot.verse_index) for t in split.verse_ids[v]]
        context = context[-room:]  # the nearest tokens, when the model's length forces a cut
        spans = []
        for form, enc in zip(forms, encodings):
            lo, hi = slot.char_start, slot.char_start + len(form)
            covering = [k for k, (a, b) in enumerate(enc.offsets) if a < hi and b > lo and a < b]
            spans.append((covering[0], covering[-1] + 1) if covering else None)
        if any(s is None for s in spans):
            skipped["candidate_not_found_in_tokens"] += 1
            continue
        answer = candidates.index(slot.entry)
        answer_prefix = encodings[answer].ids[: spans[answer][0]]
        items.append(slot)
        answers.append(answer)
        for (start, end), enc in zip(spans, encodings):
            tokens.append(np.array(context + enc.ids, dtype=np.int64))
            verse_start.append(len(context))
            blank_start.append(len(context) + start)
            blank_end.append(len(context) + end)
            shared.append(enc.ids[:start] == answer_prefix)
    return ClozeSet(items=items, candidates=list(candidates), answer=np.array(answers, dtype=np.int64), tokens=tokens,
                    verse_start=np.array(verse_start, dtype=np.int64),
                    blank_start=np.array(blank_start, dtype=np.int64), blank_end=np.array(blank_end, dtype=np.int64),
                    prefix_shared=np.array(shared, dtype=bool), skipped=dict(skipped))


@dataclass
class ClozeScores:
    verse: np.ndarray  # (n, K) log-likelihood of the verse with each candidate
    suffix: np.ndarray  # (n, K) log-likelihood of the tokens after the candidate


def _targets(first: np.ndarray, last: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(sequence index, position) of every target position first[j] <= t < last[j], flattened."""
    counts = np.maximum(last - first, 0)
    seq = np.repeat(np.arange(len(first)), counts)
    pos = np.repeat(first - (np.cumsum(counts) - counts), counts) + np.arange(int(counts.sum()))
    return seq, pos


def _scores_from_parts(cloze: ClozeSet, parts: np.ndarray) -> ClozeScores:
    """parts (n*K, 3): log-prob sums over the verse before the blank, the blank, and after it."""
    K = cloze.n_candidates
    return ClozeScores(verse=parts.sum(axis=1).reshape(-1, K), suffix=parts[:, 2].reshape(-1, K).copy())


def _add_parts(parts: np.ndarray, cloze: ClozeSet, seq: np.ndarray, pos: np.ndarray, logprob: np.ndarray) -> None:
    part = (pos >= cloze.blank_start[seq]).astype(np.int64) + (pos >= cloze.blank_end[seq])
    np.add.at(parts, (seq, part), logprob)


@torch.inference_mode()
def score_cloze_model(model: torch.nn.Module, cloze: ClozeSet, device: torch.device | str = "cpu",
                      batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = True, path: str = "auto"
                      ) -> ClozeScores:
    """Candidate sequences sorted by length and right-padded into batches of ~batch_tokens tokens (padding sits after
    every scored token, so causal attention never sees it); log-softmax only at the scored positions.

    Tokens before the blank are the same for every candidate (the model is causal), so their log-prob is computed
    once, on the answer's sequence, and reused; a candidate whose prefix tokens differ is scored in full."""
    K = cloze.n_candidates
    lengths = cloze.lengths()
    n_seq = len(lengths)
    is_answer = np.zeros(n_seq, dtype=bool)
    is_answer[np.arange(len(cloze.items)) * K + cloze.answer] = True
    own_prefix = is_answer | ~cloze.prefix_shared
    first_scored = np.where(own_prefix, cloze.verse_start, cloze.blank_start)
    order = np.argsort(-lengths, kind="stable")
    batches, start = [], 0
    while start < n_seq:
        per_batch = max(1, batch_tokens // int(lengths[order[start]]))  # the first is the longest
        batches.append(order[start : start + per_batch])
        start += per_batch
    parts = np.zeros((n_seq, 3))
    bar = Progress("cloze/model", len(batches)) if progress else None
    for done, batch in enumerate(batches, start=1):
        width = int(lengths[batch].max())
        x = np.zeros((len(batch), width), dtype=np.int64)
        for r, j in enumerate(batch):
            x[r, : lengths[j]] = cloze.tokens[j]
        row, pos = _targets(first_scored[batch], lengths[batch])
        rows_t, pos_t = torch.from_numpy(row).to(device), torch.from_numpy(pos).to(device)
        # position t - 1 predicts token t
        picked = torch.log_softmax(logits_at(model, torch.from_numpy(x).to(device), rows_t, pos_t - 1, path), dim=-1)
        target = torch.from_numpy(x[row, pos]).to(device)
        logprob = picked.gather(1, target[:, None]).squeeze(1).double().cpu().numpy()
        _add_parts(parts, cloze, batch[row], pos, logprob)
        if bar:
            bar.update(done)
    borrow = ~own_prefix
    parts[borrow, 0] = parts[(np.arange(n_seq) // K * K + np.repeat(cloze.answer, K))[borrow], 0]
    return _scores_from_parts(cloze, parts)


class KneserNeyTrigram:
    """Interpolated Kneser-Ney trigram over token ids (Chen & Goodman 1998, one discount per order).

    p3(c|a,b) = [max(c(abc) - D3, 0) + D3 N1+(ab.) p2(c|b)] / c(ab.)       (p2 where (a, b) was never seen)
    p2(c|b)   = [max(N1+(.bc) - D2, 0) + D2 N1+(b.) p1(c)] / N1+(.b.)     (continuation counts; p1 if b unseen)
    p1(c)     = [max(N1+(.c) - D1, 0) + D1 |{c: N1+(.c) > 0}| / V] / N1+(..)  (never zero)
    D = n1 / (n1 + 2 n2) from each order's counts of counts (0.75 if undefined). Counts are sorted int64 keys
    (a V^2 + b V + c) looked up with searchsorted, so scoring a million positions takes well under a second."""

    def __init__(self, tokens: np.ndarray, vocab_size: int):
        V = self.vocab_size = int(vocab_size)
        t = np.asarray(tokens, dtype=np.int64)
        if len(t) < 3:
            raise ValueError("the n-gram model needs at least 3 training tokens")
        self.tri_keys, self.tri_counts = np.unique(t[:-2] * V * V + t[1:-1] * V + t[2:], return_counts=True)
        self.ctx_keys, inverse = np.unique(self.tri_keys // V, return_inverse=True)
        self.ctx_total = np.bincount(inverse, weights=self.tri_counts)
        self.ctx_types = np.bincount(inverse)
        self.bi_keys, self.bi_cont = np.unique(self.tri_keys % (V * V), return_counts=True)  # N1+(. b c)
        self.mid_keys, inverse = np.unique(self.bi_keys // V, return_inverse=True)
        self.mid_total = np.bincount(inverse, weights=self.bi_cont)
        self.mid_types = np.bincount(inverse)
        uni_cont = np.bincount(self.bi_keys % V, minlength=V).astype(np.float64)  # N1+(. c)
        self.d1, self.d2, self.d3 = (self._discount(c) for c in (uni_cont[uni_cont > 0], self.bi_cont, self.tri_counts))
        seen = float((uni_cont > 0).sum())
        self.p_uni = (np.maximum(uni_cont - self.d1, 0) + self.d1 * seen / V) / uni_cont.sum()

    @staticmethod
    def _discount(counts: np.ndarray) -> float:
        n1, n2 = int((counts == 1).sum()), int((counts == 2).sum())
        return n1 / (n1 + 2 * n2) if n1 + n2 > 0 and n1 > 0 else 0.75

    @staticmethod
    def _find(keys: np.ndarray, query: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        index = np.minimum(np.searchsorted(keys, query), len(keys) - 1)
        return index, keys[index] == query

    def logprob(self, a: np.ndarray, b: np.ndarray, c: np.ndarray) -> np.ndarray:
        """log p(c | a, b) elementwise; a = -1 where only one token of context exists (then the bigram level)."""
        V = self.vocab_size
        a, b, c = (np.asarray(x, dtype=np.int64) for x in (a, b, c))
        p1 = self.p_uni[c]
        m, m_found = self._find(self.mid_keys, b)
        k, k_found = self._find(self.bi_keys, b * V + c)
        cont = np.where(k_found, self.bi_cont[k], 0)
        p2 = np.where(m_found, (np.maximum(cont - self.d2, 0) + self.d2 * self.mid_types[m] * p1)
                      / np.where(m_found, self.mid_total[m], 1.0), p1)
        x, x_found = self._find(self.ctx_keys, a * V + b)
        x_found &= a >= 0
        y, y_found = self._find(self.tri_keys, (a * V + b) * V + c)
        count = np.where(y_found & x_found, self.tri_counts[y], 0)
        p3 = np.where(x_found, (np.maximum(count - self.d3, 0) + self.d3 * self.ctx_types[x] * p2)
                      / np.where(x_found, self.ctx_total[x], 1.0), p2)
        return np.log(p3)


def score_cloze_ngram(ngram: KneserNeyTrigram, cloze: ClozeSet) -> ClozeScores:
    """The same parts as the model scorer, every position computed (it is cheap)."""
    lengths = cloze.lengths()
    flat = np.concatenate(cloze.tokens) if cloze.tokens else np.zeros(0, dtype=np.int64)
    seq_first = np.cumsum(lengths) - lengths
    seq, pos = _targets(cloze.verse_start, lengths)
    at = seq_first[seq] + pos
    a = np.where(pos >= 2, flat[np.maximum(at - 2, 0)], -1)
    logprob = ngram.logprob(a, flat[at - 1], flat[at])
    parts = np.zeros((len(lengths), 3))
    _add_parts(parts, cloze, seq, pos, logprob)
    return _scores_from_parts(cloze, parts)


def prediction_shares(scores: np.ndarray) -> np.ndarray:
    """(n, K) scores -> (n, K) shares: 1/m on each of the m candidates within TIE_TOLERANCE of the best."""
    best = scores.max(axis=1, keepdims=True)
    top = scores >= best - TIE_TOLERANCE
    return top / top.sum(axis=1, keepdims=True)


def constant_shares(n_items: int, n_candidates: int, choice: np.ndarray) -> np.ndarray:
    shares = np.zeros((n_items, n_candidates))
    shares[np.arange(n_items), choice] = 1.0
    return shares


# ----------------------------------------------------------------------------------------------------------------
# Putting it together


@dataclass
class EvalContext:
    """Everything that does not depend on the model weights: built once, reused for every run that shares the
    tokenizer (the comparison runner evaluates many runs against one context)."""

    cfg: Config
    tokenizer: Tokenizer
    lex: ResolvedLexicon
    corpus: str
    split: str
    eval_split: EncodedSplit
    slots: list[Slot]
    cloze: ClozeSet
    train_counts: Counter  # (entry, verse_initial) -> occurrences in the run's training split
    ngram: KneserNeyTrigram
    max_items: int
    context_verses: int
    max_len: int
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def candidate_words(self) -> list[str]:
        return [self.lex.words[c] for c in self.cloze.candidates]

    def serves(self, cfg: Config, tokenizer: Tokenizer, max_len: int, corpus: str | None, split: str,
               max_items: int, context_verses: int) -> bool:
        """Whether a run with these settings gets the same items and baselines from this context."""
        mine, theirs = self.cfg, cfg
        return (tokenizer.to_str() == self.tokenizer.to_str() and max_len == self.max_len
                and (corpus or cfg.data.corpus) == self.corpus and split == self.split
                and (max_items, context_verses) == (self.max_items, self.context_verses)
                and run_connectives(theirs.masking) == run_connectives(mine.masking)
                and (theirs.masking.clause_punctuation, theirs.masking.lookback, theirs.masking.verse_separator,
                     theirs.masking.clause_length)
                == (mine.masking.clause_punctuation, mine.masking.lookback, mine.masking.verse_separator,
                    mine.masking.clause_length)
                and theirs.data == mine.data)


def load_split_verses(corpus: str, cfg: Config, split: str) -> list[Verse]:
    verses = load_corpus(corpus, "auto" if corpus != cfg.data.corpus else cfg.data.format, cfg.data.reference_pattern,
                         cfg.data.lines_per_chapter)
    return split_verses(verses, cfg.data, cfg.origin_of)[split]  # errors name the checkpoint its config came from


def build_context(cfg: Config, tokenizer: Tokenizer, max_len: int, corpus: str | None = None, split: str = "heldout",
                  max_items: int = 0, context_verses: int = 0, say: Callable[[str], None] = log) -> EvalContext:
    timings: dict[str, float] = {}
    t0 = time.time()
    corpus = corpus or cfg.data.corpus
    eval_verses = load_split_verses(corpus, cfg, split)  # first: a bad corpus fails before the slow set-up
    train_verses = load_split_verses(cfg.data.corpus, cfg, "train")
    timings["corpora_s"] = time.time() - t0
    t0 = time.time()
    say("resolving the connective lexicon against the run's tokenizer")
    lex = resolve(tokenizer, run_connectives(cfg.masking), clause_punctuation=cfg.masking.clause_punctuation,
                  verse_separator=cfg.masking.verse_separator)
    candidates = [e for e, w in enumerate(lex.words) if w not in lex.unresolved]
    if not candidates:
        raise EvalError("no connective of the run's lexicon has a token pattern in its tokenizer")
    timings["lexicon_s"] = time.time() - t0
    t0 = time.time()
    eval_split = encode_split(eval_verses, tokenizer)
    slots = find_slots(eval_split, lex, cfg.masking.lookback, cfg.masking.clause_length)
    if not slots:
        raise EvalError(f"{corpus}: no connective occurs in the {split} split")
    say(f"{corpus} {split}: {len(eval_split.verses):,} verses, {len(eval_split.stream):,} tokens, "
        f"{len(slots):,} connective slots")
    chosen = select_evenly(slots, max_items)
    cloze = build_cloze(eval_split, chosen, tokenizer, lex, candidates, max_len, context_verses)
    if not cloze.items:
        raise EvalError(f"no cloze item fits the model's {max_len} tokens ({cloze.skipped})")
    timings["items_s"] = time.time() - t0
    t0 = time.time()
    train_split = encode_split(train_verses, tokenizer, keep_offsets=False)
    train_counts = Counter((s.entry, s.verse_initial)
                           for s in find_slots(train_split, lex, cfg.masking.lookback, cfg.masking.clause_length))
    ngram = KneserNeyTrigram(train_split.stream, tokenizer.get_vocab_size(with_added_tokens=True))
    timings["baselines_s"] = time.time() - t0
    say(f"cloze: {len(cloze.items):,} items x {cloze.n_candidates} candidates = {len(cloze.tokens):,} sequences"
        + (f" (skipped {cloze.skipped})" if cloze.skipped else ""))
    return EvalContext(cfg=cfg, tokenizer=tokenizer, lex=lex, corpus=corpus, split=split, eval_split=eval_split,
                       slots=slots, cloze=cloze, train_counts=train_counts, ngram=ngram, max_items=max_items,
                       context_verses=context_verses, max_len=max_len, timings=timings)


def _majority(counts: Counter, candidates: list[int], verse_initial: bool | None) -> int:
    """Index into candidates of the most frequent training connective (ties: lexicon order)."""
    totals = [sum(n for (e, vi), n in counts.items() if e == c and (verse_initial is None or vi == verse_initial))
              for c in candidates]
    return int(np.argmax(totals))


def _group_keys(slot: Slot, lex: ResolvedLexicon) -> dict[str, str]:
    return {
        "word": lex.words[slot.entry],
        "class": CLASSES[int(lex.entry_class[slot.entry])],
        "position": POSITIONS[0] if slot.verse_initial else POSITIONS[1],
        "clause_length": clause_bucket(slot.clause_len),
        "genre": slot.genre,
        "book": slot.book,
    }


def _group_order(dim: str, keys: list[str], lex: ResolvedLexicon) -> list[str]:
    present = list(dict.fromkeys(keys))
    fixed = {"class": CLASSES, "position": POSITIONS, "clause_length": CLAUSE_LABELS,
             "genre": (*GENRES, "other"), "word": lex.words}.get(dim)
    return [k for k in fixed if k in present] if fixed else present  # books: canonical order of appearance


def summarize(credit: np.ndarray, slots: list[Slot], lex: ResolvedLexicon) -> dict[str, Any]:
    """Accuracy overall and per group of every breakdown; slots with a nan credit (skipped) are left out."""
    keep = ~np.isnan(credit)
    credit = credit[keep]
    kept = [s for s, k in zip(slots, keep) if k]
    keys = [_group_keys(s, lex) for s in kept]
    out: dict[str, Any] = {"accuracy": float(credit.mean()) if len(credit) else float("nan"), "n": int(len(credit))}
    breakdowns = {}
    for dim in BREAKDOWNS:
        labels = [k[dim] for k in keys]
        groups = {}
        for label in _group_order(dim, labels, lex):
            mine = np.array([lab == label for lab in labels])
            groups[label] = {"accuracy": float(credit[mine].mean()), "n": int(mine.sum())}
        breakdowns[dim] = groups
    out["breakdowns"] = breakdowns
    return out


def evaluate_model(model: torch.nn.Module, ctx: EvalContext, device: torch.device | str = "cpu",
                   batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = True) -> dict[str, Any]:
    """All metrics of one model on a prepared context, as a JSON-ready dict (items included, for paired tests)."""
    if model_max_len(model) < ctx.max_len:
        raise EvalError(f"the context was built for {ctx.max_len}-token sequences; the model takes "
                        f"{model_max_len(model)}")
    lex, cloze = ctx.lex, ctx.cloze
    timings = dict(ctx.timings)
    t0 = time.time()
    nt = score_next_token(model, ctx.eval_split.stream, ctx.slots, device, batch_tokens, progress)
    timings["next_token_s"] = time.time() - t0
    next_token = summarize(nt.credit, ctx.slots, lex)
    scored = ~np.isnan(nt.credit)
    next_token.update({
        "first_piece_accuracy": float(np.mean(nt.first_piece_credit[scored])),
        "mean_logprob": float(np.mean(nt.logprob[scored])),
        "skipped": int((~scored).sum()),
    })

    t0 = time.time()
    model_scores = score_cloze_model(model, cloze, device, batch_tokens, progress)
    timings["cloze_model_s"] = time.time() - t0
    t0 = time.time()
    ngram_scores = score_cloze_ngram(ctx.ngram, cloze)
    timings["cloze_ngram_s"] = time.time() - t0
    n, K = len(cloze.items), cloze.n_candidates
    initial = np.array([s.verse_initial for s in cloze.items])
    positional = np.where(initial, _majority(ctx.train_counts, cloze.candidates, True),
                          _majority(ctx.train_counts, cloze.candidates, False))
    shares = {
        "model_verse": prediction_shares(model_scores.verse),
        "model_suffix": prediction_shares(model_scores.suffix),
        "kn3_verse": prediction_shares(ngram_scores.verse),
        "kn3_suffix": prediction_shares(ngram_scores.suffix),
        "majority": constant_shares(n, K, np.full(n, _majority(ctx.train_counts, cloze.candidates, None))),
        "positional_majority": constant_shares(n, K, positional),
    }
    words = ctx.candidate_words
    scorers, confusion, credits = {}, {}, {}
    for name, share in shares.items():
        credit = share[np.arange(n), cloze.answer]
        credits[name] = credit
        scorers[name] = summarize(credit, cloze.items, lex)
        matrix = np.zeros((K, K))
        np.add.at(matrix, cloze.answer, share)
        confusion[name] = matrix.round(6).tolist()
    cloze_items = []
    for i, slot in enumerate(cloze.items):
        cloze_items.append({
            "id": slot.item_id, "word": lex.words[slot.entry], "verse_initial": slot.verse_initial,
            "clause_len": slot.clause_len, "book": slot.book,
            "credit": {name: round(float(credits[name][i]), 6) for name in shares},
            "predicted": {name: words[int(np.argmax(shares[name][i]))] for name in ("model_verse", "model_suffix")},
        })
    next_items = [{"id": s.item_id, "word": lex.words[s.entry], "credit": round(float(c), 6),
                   "logprob": round(float(lp), 4)}
                  for s, c, lp in zip(ctx.slots, nt.credit, nt.logprob) if not math.isnan(c)]
    head = {}
    if getattr(model, "class_head", None) is not None:
        t0 = time.time()
        head = {"class_head": class_head_result(model, ctx, device, batch_tokens, progress)}
        timings["class_head_s"] = time.time() - t0
    return {
        "next_token": next_token,
        **head,
        "cloze": {
            "n_items": n, "n_candidates": K, "candidates": words, "skipped": cloze.skipped,
            "context_verses": ctx.context_verses, "scorers": scorers,
            "confusion": {"labels": words, "rows": "true connective", "columns": "predicted", "matrices": confusion},
        },
        "items": {"next_token": next_items, "cloze": cloze_items},
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }


def class_head_result(model: torch.nn.Module, ctx: EvalContext, device: torch.device | str = "cpu",
                      batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = True) -> dict[str, Any]:
    """The class head's accuracy at every slot (`score_class_head`), its breakdowns and confusion matrix, and the
    majority-class baseline: the class most frequent among the connectives of the run's training split."""
    lex = ctx.lex
    if model.class_head.out_features != len(CLASSES):
        raise EvalError(f"the model's class head has {model.class_head.out_features} outputs; Genesis's classes "
                        f"are {len(CLASSES)} ({', '.join(CLASSES)})")
    mask_id = find_mask_id(ctx.tokenizer, ctx.cfg.tokenizer.mask_token)
    truth = np.array([int(lex.entry_class[s.entry]) for s in ctx.slots], dtype=np.int64)
    scores = score_class_head(model, ctx.eval_split.stream, ctx.slots, truth, mask_id, device, batch_tokens, progress)
    scored = ~np.isnan(scores.credit)
    per_class = np.zeros(len(CLASSES))
    for (entry, _), count in ctx.train_counts.items():
        per_class[int(lex.entry_class[entry])] += count
    majority = int(np.argmax(per_class))
    confusion = np.zeros((len(CLASSES), len(CLASSES)))
    np.add.at(confusion, truth[scored], scores.shares[scored])
    baseline = np.where(scored, (truth == majority).astype(np.float64), np.nan)
    return {
        "model": summarize(scores.credit, ctx.slots, lex),
        "majority_class": {"class": CLASSES[majority], **summarize(baseline, ctx.slots, lex)},
        "labels": list(CLASSES),
        "confusion": {"rows": "true class", "columns": "predicted", "matrix": confusion.round(6).tolist()},
    }


# ----------------------------------------------------------------------------------------------------------------
# Output: tables, JSON, plots


def _pct(x: float | None) -> str:
    return "    -" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{100 * x:5.1f}"


def format_tables(result: dict[str, Any]) -> str:
    nt, cz = result["next_token"], result["cloze"]
    sc = cz["scorers"]
    lines = [
        f"checkpoint {result['checkpoint']} (step {result['step']}) | corpus {result['corpus']} {result['split']} "
        f"| tokenizer and lexicon of the run ({result['train_corpus']})",
        "",
        f"{'metric (accuracy %)':<44}{'items':>7}{'model':>8}{'KN-3':>8}{'major.':>8}{'pos.maj':>8}",
        f"{'next token, all pieces (teacher-forced)':<44}{nt['n']:>7}{_pct(nt['accuracy']):>8}",
        f"{'next token, first piece':<44}{nt['n']:>7}{_pct(nt['first_piece_accuracy']):>8}",
        f"{'next token, mean log p of the word (nats)':<44}{nt['n']:>7}{nt['mean_logprob']:>8.2f}",
        f"{'cloze, whole-verse score':<44}{cz['n_items']:>7}{_pct(sc['model_verse']['accuracy']):>8}"
        f"{_pct(sc['kn3_verse']['accuracy']):>8}{_pct(sc['majority']['accuracy']):>8}"
        f"{_pct(sc['positional_majority']['accuracy']):>8}",
        f"{'cloze, suffix-only score':<44}{cz['n_items']:>7}{_pct(sc['model_suffix']['accuracy']):>8}"
        f"{_pct(sc['kn3_suffix']['accuracy']):>8}",
        f"(chance = {100 / cz['n_candidates']:.1f}% with {cz['n_candidates']} candidates)",
    ]
    columns = [("next", nt), ("verse", sc["model_verse"]), ("suffix", sc["model_suffix"]), ("KN-3", sc["kn3_verse"]),
               ("major.", sc["majority"])]
    for dim, title in (("word", "connective (cloze accuracy = recall)"), ("class", "class"),
                       ("position", "position"), ("clause_length", "clause length (tokens)"), ("genre", "genre")):
        labels = list(dict.fromkeys([*nt["breakdowns"][dim], *sc["model_verse"]["breakdowns"][dim]]))
        if dim == "word":
            labels.sort(key=lambda w: -sc["model_verse"]["breakdowns"]["word"].get(w, {"n": 0})["n"])
        lines += ["", f"{title:<24}{'n next':>7}{'n cloze':>8}" + "".join(f"{c:>8}" for c, _ in columns)]
        for label in labels:
            n_next = nt["breakdowns"][dim].get(label, {"n": 0})["n"]
            n_cloze = sc["model_verse"]["breakdowns"][dim].get(label, {"n": 0})["n"]
            cells = "".join(f"{_pct(m['breakdowns'][dim].get(label, {}).get('accuracy')):>8}" for _, m in columns)
            lines.append(f"{label:<24}{n_next:>7}{n_cloze:>8}{cells}")
    if "class_head" in result:
        lines += ["", *format_class_head(result["class_head"])]
    return "\n".join(lines)


def format_class_head(head: dict[str, Any]) -> list[str]:
    model, majority = head["model"], head["majority_class"]
    lines = [f"{'class head (mask token -> type)':<32}{'n':>7}{'head':>8}{'major.':>8}   "
             f"(majority class: {majority['class']})",
             f"{'all connectives':<32}{model['n']:>7}{_pct(model['accuracy']):>8}{_pct(majority['accuracy']):>8}"]
    for label, group in model["breakdowns"]["class"].items():
        base = majority["breakdowns"]["class"].get(label, {}).get("accuracy")
        lines.append(f"{label:<32}{group['n']:>7}{_pct(group['accuracy']):>8}{_pct(base):>8}")
    labels = head["labels"]
    lines += ["", f"{'confusion (rows: true class)':<32}" + "".join(f"{c[:8]:>12}" for c in labels)]
    for label, row in zip(labels, head["confusion"]["matrix"]):
        lines.append(f"{label:<32}" + "".join(f"{v:>12.1f}" for v in row))
    return lines


def write_plots(result: dict[str, Any], out_dir: Path) -> list[Path]:
    """Four PNGs (five with a class head); matplotlib is imported here, with the Agg backend, so the metrics never
    need a display."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise EvalError("matplotlib is needed for the plots (pip install matplotlib); or pass --no-plots") from None
    out_dir.mkdir(parents=True, exist_ok=True)
    nt, sc = result["next_token"], result["cloze"]["scorers"]
    title_tail = f"{result['corpus']} {result['split']}, step {result['step']}"
    paths = []

    # hardest connectives: per-word cloze recall and next-token accuracy, hardest at the top
    by_word = sc["model_verse"]["breakdowns"]["word"]
    words = sorted(by_word, key=lambda w: (by_word[w]["accuracy"], -by_word[w]["n"]))
    fig, ax = plt.subplots(figsize=(8, 0.32 * len(words) + 1.8))
    y = np.arange(len(words))
    ax.barh(y - 0.2, [by_word[w]["accuracy"] for w in words], height=0.4, label="cloze (whole-verse score)")
    ax.barh(y + 0.2, [nt["breakdowns"]["word"].get(w, {}).get("accuracy", 0.0) for w in words], height=0.4,
            label="next token (all pieces)")
    ax.set_yticks(y, [f"{w} (n={by_word[w]['n']})" for w in words])
    ax.invert_yaxis()
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.set_ylabel("connective (cloze items)")
    ax.set_title(f"Hardest connectives first — {title_tail}")
    ax.legend(loc="lower right")
    fig.tight_layout()
    paths.append(out_dir / "hardest_connectives.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # accuracy vs clause length
    fig, ax = plt.subplots(figsize=(10, 4.5))
    buckets = [b for b in CLAUSE_LABELS if b in sc["model_verse"]["breakdowns"]["clause_length"]
               or b in nt["breakdowns"]["clause_length"]]
    x = np.arange(len(buckets))
    series = [("next token (model)", nt), ("cloze, whole verse (model)", sc["model_verse"]),
              ("cloze, suffix only (model)", sc["model_suffix"]), ("cloze, KN trigram", sc["kn3_verse"]),
              ("cloze, majority", sc["majority"])]
    for label, metric in series:
        values = [metric["breakdowns"]["clause_length"].get(b, {}).get("accuracy", np.nan) for b in buckets]
        ax.plot(x, values, marker="o", label=label)
    counts = [sc["model_verse"]["breakdowns"]["clause_length"].get(b, {}).get("n", 0) for b in buckets]
    ax.set_xticks(x, [f"{b}\n(n={c})" for b, c in zip(buckets, counts)])
    ax.set_ylim(0, 1)
    clause_mode = result.get("clause_length_mode", "preceding")
    ax.set_xlabel(f"clause length in tokens (masking.clause_length = {clause_mode}; n = cloze items)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Accuracy vs clause length — {title_tail}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # outside: never over the data
    fig.tight_layout()
    paths.append(out_dir / "accuracy_by_clause_length.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # confusion matrix, row-normalised, over the connectives that occur as answers or predictions
    labels = result["cloze"]["confusion"]["labels"]
    matrix = np.array(result["cloze"]["confusion"]["matrices"]["model_verse"])
    used = np.flatnonzero((matrix.sum(axis=1) > 0) | (matrix.sum(axis=0) > 0))
    sub = matrix[np.ix_(used, used)]
    rows = sub.sum(axis=1, keepdims=True)
    norm = np.divide(sub, rows, out=np.zeros_like(sub), where=rows > 0)
    size = 0.38 * len(used) + 2.5
    fig, ax = plt.subplots(figsize=(size + 1.5, size))
    image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    names = [labels[i] for i in used]
    ax.set_xticks(range(len(used)), names, rotation=60, ha="right")
    ax.set_yticks(range(len(used)), [f"{labels[i]} ({int(round(rows[k, 0]))})" for k, i in enumerate(used)])
    ax.set_xlabel("predicted connective (whole-verse score)")
    ax.set_ylabel("true connective (items)")
    ax.set_title(f"Cloze confusion, rows normalised — {title_tail}")
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the row")
    fig.tight_layout()
    paths.append(out_dir / "confusion.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    # genre
    genres = list(sc["model_verse"]["breakdowns"]["genre"])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    x = np.arange(len(genres))
    width = 0.8 / len(series)
    for k, (label, metric) in enumerate(series):
        values = [metric["breakdowns"]["genre"].get(g, {}).get("accuracy", np.nan) for g in genres]
        ax.bar(x + (k - (len(series) - 1) / 2) * width, values, width=width, label=label)
    counts = [sc["model_verse"]["breakdowns"]["genre"][g]["n"] for g in genres]
    ax.set_xticks(x, [f"{g}\n(n={c})" for g, c in zip(genres, counts)])
    ax.set_ylim(0, 1)
    ax.set_xlabel("genre (n = cloze items)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"Accuracy by genre — {title_tail}")
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    paths.append(out_dir / "accuracy_by_genre.png")
    fig.savefig(paths[-1], dpi=110)
    plt.close(fig)

    if "class_head" in result:  # the class head's confusion matrix, row-normalised
        head = result["class_head"]
        matrix = np.array(head["confusion"]["matrix"])
        rows = matrix.sum(axis=1, keepdims=True)
        norm = np.divide(matrix, rows, out=np.zeros_like(matrix), where=rows > 0)
        fig, ax = plt.subplots(figsize=(6.5, 5))
        image = ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        labels = head["labels"]
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
        ax.set_yticks(range(len(labels)), [f"{c} ({int(round(r))})" for c, r in zip(labels, rows[:, 0])])
        for (i, j), share in np.ndenumerate(norm):
            ax.text(j, i, f"{100 * share:.0f}%", ha="center", va="center", color="white" if share > 0.5 else "black")
        ax.set_xlabel("predicted class (class head)")
        ax.set_ylabel("true class (held-out connectives)")
        ax.set_title(f"Class head: {100 * head['model']['accuracy']:.1f}% (majority "
                     f"{100 * head['majority_class']['accuracy']:.1f}%) — {title_tail}", fontsize=9)
        fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the row")
        fig.tight_layout()
        paths.append(out_dir / "class_head_confusion.png")
        fig.savefig(paths[-1], dpi=110)
        plt.close(fig)
    return paths


def write_json(result: dict[str, Any], path: Path) -> None:
    """Atomic, so a reader (or an interrupted comparison) never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(result, indent=1))


@contextlib.contextmanager
def flushed_denormals():
    """Denormal floats (tiny AdamW moments and activations) make x86 CPUs up to 10x slower: a cpu.toml training
    step took 4.3 s instead of 0.45 s on the 2-core dev machine, with the same losses. The command-line entry points
    flush them to zero while they run, then restore torch's default (torch has no getter for the current setting)."""
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def resolve_device(name: str) -> torch.device:
    """auto (CUDA if available, else the CPU), cpu, cuda, cuda:N or mps, checked here: a device torch would only
    refuse later (while loading the checkpoint) is one line naming --device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda", "mps") or (dev.type == "cpu" and dev.index not in (None, 0)):
        raise EvalError(f"--device {name}: not a device here (auto, cpu, cuda, cuda:N or mps)")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise EvalError(f"--device {name}: CUDA is not available")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise EvalError(f"--device {name}: there are {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise EvalError(f"--device {name}: MPS is not available")
    return dev


def evaluate_checkpoint(checkpoint: str | os.PathLike, corpus: str | None = None, split: str = "heldout",
                        max_items: int = 0, context_verses: int = 0, device: str = "auto",
                        batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = True,
                        ctx: EvalContext | None = None) -> tuple[dict[str, Any], EvalContext]:
    """Load a run and evaluate it; pass `ctx` from an earlier call with the same tokenizer to skip the set-up."""
    dev = resolve_device(device)
    run = load_run(checkpoint, dev)
    max_len = model_max_len(run.model)
    if ctx is None or not ctx.serves(run.cfg, run.tokenizer, max_len, corpus, split, max_items, context_verses):
        ctx = build_context(run.cfg, run.tokenizer, max_len, corpus, split, max_items, context_verses)
    result = evaluate_model(run.model, ctx, dev, batch_tokens, progress)
    header = {
        "checkpoint": str(run.checkpoint), "step": run.step, "checkpoint_identity": run.identity, "corpus": ctx.corpus,
        "split": ctx.split, "train_corpus": run.cfg.data.corpus, "device": str(dev), "max_items": max_items,
        "context_verses": context_verses, "seq_len": max_len, "clause_length_mode": run.cfg.masking.clause_length,
    }
    return {**header, **result}, ctx


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m genesis.evaluate", description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a run's checkpoint.pt (or its run directory)")
    p.add_argument("--corpus", help="kjv, asv or a corpus file (default: the run's corpus); split by the run's rules")
    p.add_argument("--split", default="heldout", choices=("heldout", "train"), help="which chapters (default heldout)")
    p.add_argument("--out", help="directory for eval.json and the plots (default <run dir>/eval-<corpus>-<split>)")
    p.add_argument("--json", help="where to write the JSON (default OUT/eval.json)")
    p.add_argument("--max-items", type=int, default=0, help="cap the cloze items, spread evenly (default 0: all)")
    p.add_argument("--context-verses", type=int, default=0,
                   help="preceding verses of the chapter given as cloze context (default 0: the verse alone)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--batch-tokens", type=int, default=DEFAULT_BATCH_TOKENS, help="tokens per forward pass")
    p.add_argument("--no-plots", action="store_true", help="skip the PNGs")
    p.add_argument("--quiet", action="store_true", help="no progress lines")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    with flushed_denormals():
        return _main(args, argv)


def _main(args: argparse.Namespace, argv) -> int:
    try:
        refuse_several_processes("python -m genesis.evaluate")
        if args.max_items < 0 or args.context_verses < 0 or args.batch_tokens < 1:
            raise EvalError("--max-items and --context-verses must be >= 0, --batch-tokens >= 1")
        result, ctx = evaluate_checkpoint(args.checkpoint, args.corpus, args.split, args.max_items,
                                          args.context_verses, args.device, args.batch_tokens, not args.quiet)
        result["command"] = "python -m genesis.evaluate " + " ".join(argv if argv is not None else sys.argv[1:])
        run_dir = Path(result["checkpoint"]).parent
        corpus_name = Path(ctx.corpus).stem if ctx.corpus.lower() not in ("kjv", "asv") else ctx.corpus.lower()
        out_dir = Path(args.out) if args.out else run_dir / f"eval-{corpus_name}-{args.split}"
        json_path = Path(args.json) if args.json else out_dir / "eval.json"
        plots = [] if args.no_plots else write_plots(result, out_dir)
        result["plots"] = [str(p) for p in plots]
        write_json(result, json_path)
        print(format_tables(result))
        print(f"\nwrote {json_path}" + "".join(f"\nwrote {p}" for p in plots))
    except (ConfigError, CorpusError, TokenizerError, RunError, EvalError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or ''}: {e.strerror or e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
