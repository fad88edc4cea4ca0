"""Evaluation items: a split encoded as one token stream, its connective slots, and the cloze sets built on them."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from tokenizers import Tokenizer

from genesis.corpus import Verse, genre_of
from genesis.evaluate.senses import is_conjunctive
from genesis.lexicon import ResolvedLexicon, clause_length, find_matches

VERSE_SEPARATOR = "\n"  # genesis.data joins verses with it; the cloze sequences start with it
# Clause-length buckets: 0 (nothing before: the stream start) and 1 alone, then cut where the structural rules cut
# (> 10, > 15) and at the lookback cap (30).
CLAUSE_BUCKETS = ((0, 0), (1, 1), (2, 5), (6, 10), (11, 15), (16, 29), (30, None))
POSITIONS = ("verse-initial", "inside")



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
    # a discourse-connective use of the word (`genesis.evaluate.senses`); True when offsets were not kept, since the
    # rule reads the verse's characters (the training split's slots only feed counts by word and position)
    conjunctive: bool = True


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
            conjunctive=(is_conjunctive(lex.words[entry], verse.text, char_start, char_end) if char_start >= 0
                         else True),
        ))
    return slots


def select_evenly(slots: list[Slot], max_items: int) -> list[Slot]:
    """At most `max_items` slots spread evenly over the split (so every part of the Bible keeps its share), the
    same ones for every run that uses the same tokenizer: paired comparisons need identical items."""
    if max_items <= 0 or len(slots) <= max_items:
        return list(slots)
    picks = np.unique(np.linspace(0, len(slots) - 1, num=max_items).round().astype(np.int64))
    return [slots[i] for i in picks]


def cased_like(original: str, word: str) -> str:
    """`word` in the casing of `original`: UPPER, Capitalised or lower."""
    if len(original) > 1 and original.isupper():
        return word.upper()
    if original[:1].isupper():
        return word.capitalize()
    return word.lower()


def candidate_texts(verse_text: str, slot: Slot, forms: list[str]) -> list[str]:
    """The verse with each form in the slot's place, followed by the verse separator: what a cloze sequence encodes."""
    return [verse_text[: slot.char_start] + f + verse_text[slot.char_end :] + VERSE_SEPARATOR for f in forms]


def left_context(split: EncodedSplit, verse_index: int, separator: list[int], context_verses: int,
                 room: int) -> list[int]:
    """The tokens a cloze sequence puts before its verse: the verse separator, then up to `context_verses` preceding
    verses of the same chapter, cut to the last `room` tokens (the nearest, when the model's length forces a cut)."""
    verse, first = split.verses[verse_index], verse_index
    while (first > 0 and verse_index - first < context_verses
           and (split.verses[first - 1].book, split.verses[first - 1].chapter) == (verse.book, verse.chapter)):
        first -= 1
    context = list(separator) + [t for v in range(first, verse_index) for t in split.verse_ids[v]]
    return context[-room:]


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
        texts = candidate_texts(verse.text, slot, forms)
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        longest = max(len(e.ids) for e in encodings)
        room = max_len - longest
        if room < 1:
            skipped["verse_longer_than_model"] += 1
            continue
        context = left_context(split, slot.verse_index, separator, context_verses, room)
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
