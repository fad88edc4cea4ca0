"""Connective masking as a batched device op: `ConnectiveMasker`, its tables, the torch path and the dispatcher.

    masker = ConnectiveMasker.from_tokenizer(tokenizer, strategy="structural")
    out = masker(input_ids, step=step, verse_start=None)     # (B, T) ids on any device
    logits = model(out.input_ids)                            # targets stay as they are

    control = ConnectiveMasker.control(tokenizer, {"strategy": "random"}, train_tokens, seq_len=256)  # the control arm

`mask_torch` here and the Triton kernel in `genesis.kernels.mask` implement the same semantics bit for bit.
Semantics: docs/masking.md.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import math
import operator
import os
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from genesis.config import DEFAULT_CHAIN_GAP, STRATEGIES, ConfigValueError, MaskingConfig, build, idle_keys, to_dict
from genesis.console import first_line
from genesis.flags import CLAUSE_BOUNDARY, GLUE_LEFT, IGNORE_INDEX, VERSE_SEPARATOR, WORD_END
from genesis.lexicon import CLASSES, DEFAULT_CONNECTIVES, ResolvedLexicon, resolve
from genesis.tokenizer import find_mask_id

MASK32 = 0xFFFFFFFF
SCAN_START, SCAN_STOP = 1, 2  # scan_code bits (the sparse torch path)
IMPLS = ("auto", "triton", "torch")
# the masker's default `log`: its few lines (the path chosen, a fallback, a disabled masker) go to logging at INFO,
# as a library's should; the trainer passes its own console `log`, and log=None silences them
logger = logging.getLogger(__name__)


class MaskingError(ValueError):
    """Bad input to the masker (an argument, a shape, dtype, id or device), phrased as one line that names it."""


class TritonUnavailableError(MaskingError, RuntimeError):
    """impl='triton' asked for where the kernel cannot run. A MaskingError, like every other bad setting; also a
    RuntimeError, which it was before, so handlers written against that keep working."""


def _counter_word(value: Any, name: str, bits: int = 32, range_name: str | None = None) -> int:
    """`value` as an int in [0, 2**bits): Python, numpy and one-element torch integers (operator.index). Not a bool,
    float or str: int(1.9) would repeat step 1's masks, and 2**32 or -1 would wrap onto another counter word."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise MaskingError(f"{name} must be an integer, not a bool (got {value!r})")
    if isinstance(value, torch.Tensor) and value.device.type == "meta":  # .item() would raise a RuntimeError
        raise MaskingError(f"{name} is a tensor on the meta device, which holds no value; pass an int")
    try:
        number = operator.index(value)
    except TypeError:
        raise MaskingError(f"{name} must be an integer (got {type(value).__name__} {value!r:.60})") from None
    if not 0 <= number < 2**bits:
        word = "a 32-bit Philox counter word" if bits == 32 else "a Philox key (passed as a signed 64-bit int)"
        raise MaskingError(f"{range_name or name} must be in [0, 2**{bits}), the range of {word} (got {name}={number})")
    return number


def _check_options(check_ids: Any, enabled: Any, log: Any) -> None:
    for name, flag in (("check_ids", check_ids), ("enabled", enabled)):
        if not isinstance(flag, bool):
            raise MaskingError(f"{name} must be True or False (got {flag!r:.60})")
    if log is not None and not callable(log):
        raise MaskingError(f"log must be a callable or None (got {type(log).__name__} {log!r:.60})")


def _connective_table(word: str, value: Any) -> Any:
    """A [masking.connectives] value as the table `build` reads: (weight, class) pairs, as DEFAULT_CONNECTIVES
    writes them, become {weight, class}; tables pass; anything else is an error that says what is accepted."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, list) and len(value) == 2:  # to_dict has made tuples lists
        return {"weight": value[0], "class": value[1]}
    raise MaskingError(f"masking.connectives.{word}: expected a (weight, class) pair or a table "
                       f"{{weight = .., class = ..}}, got {value!r:.80}")


def _masking_config(config: MaskingConfig | Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> MaskingConfig:
    """A MaskingConfig from a config or a mapping of its keys, with `overrides` on top; a MaskingError names a bad key.
    to_dict turns dataclass values (MaskRule, ConnectiveEntry) into the tables `build` reads."""
    table = to_dict(config) if isinstance(config, MaskingConfig) else to_dict(dict(config or {}))
    table.update(to_dict(overrides))
    if isinstance(table.get("connectives"), Mapping):
        table["connectives"] = {word: _connective_table(word, value) for word, value in table["connectives"].items()}
    try:
        return build(MaskingConfig, table, "masking")
    except ConfigValueError as e:
        raise MaskingError(f"{e.key}: {e.reason}") from None


def connectives_of(cfg: MaskingConfig) -> dict[str, tuple[float, str]]:
    """The lexicon a [masking] config describes: word -> (weight, class)."""
    connectives: dict[str, tuple[float, str]] = dict(DEFAULT_CONNECTIVES) if cfg.default_connectives else {}
    for word, entry in cfg.connectives.items():
        connectives[word.lower()] = (entry.weight, entry.cls)
    return connectives


def resolve_lexicon(tokenizer: Any, cfg: MaskingConfig) -> ResolvedLexicon:
    """The [masking] config's lexicon resolved against `tokenizer`, as the masker resolves it (~0.7 s)."""
    return resolve(tokenizer, connectives_of(cfg), clause_punctuation=cfg.clause_punctuation,
                   verse_separator=cfg.verse_separator)


# ----------------------------------------------------------------------------------------------------------------
# Tables


@dataclass
class MaskTables:
    """Everything the kernel and the torch path read, as tensors on one device, plus the scalars that shape the
    kernel's compilation.

    Per-vocab arrays have V + 1 entries: the last is a neutral slot the torch path maps invalid ids to. The
    probability table and the entry weights are plain tensors: a schedule or an adaptive scheme may update them in
    place between steps without rebuilding anything (with masking.schedule other than "constant" the masker itself
    rewrites prob_table as the configured table x the step's factor), within the shape the configuration gave them:
    the cells are read only where `use_cells` (the built table varies over verse_initial / clause_len; else every
    match reads cell 1) and the weights only where `use_weight` (weighted, or structural_weights)."""

    token_flags: torch.Tensor  # (V+1,) uint8: GLUE_LEFT | WORD_END | CLAUSE_BOUNDARY | VERSE_SEPARATOR (kernel)
    glue_left: torch.Tensor  # (V+1,) bool, the same bits unpacked for the torch path
    word_end: torch.Tensor  # (V+1,) bool
    clause_boundary: torch.Tensor  # (V+1,) bool
    verse_separator: torch.Tensor  # (V+1,) bool
    clause_stop: torch.Tensor  # (V+1,) bool: clause_boundary | verse_separator (where a preceding clause stops)
    scan_code: torch.Tensor  # (V+1,) uint8: SCAN_START where some pattern starts with this token, | SCAN_STOP where
    #                          the clause-length rule stops (structural strategies only): the sparse path's lookup
    starts_multi: torch.Tensor  # (V+1,) bool: some pattern of two or more tokens starts with this token
    multi_prefix: torch.Tensor  # (K,) int64, sorted: first * (V + 1) + second token of every longer pattern
    first_pattern: torch.Tensor  # (V+1,) int64: first pattern starting with this token, or -1
    pattern_count: torch.Tensor  # (V+1,) int64: patterns starting with this token (contiguous, longest first)
    single_entry: torch.Tensor  # (V+1,) int64: entry of the first 1-token pattern of this token, or -1
    patterns: torch.Tensor  # (P, max_pieces) int64, -1 padded
    pattern_len: torch.Tensor  # (P,) int64
    pattern_entry: torch.Tensor  # (P,) int64: lexicon entry of each pattern
    length_key: torch.Tensor  # (P,) int64, sorted (stable): first token * (max_pieces + 2) + length of each pattern
    length_pattern: torch.Tensor  # (P,) int64: the pattern of each length_key (the dense torch path's lookup)
    entry_weight: torch.Tensor  # (E,) float32
    entry_class: torch.Tensor  # (E,) int64
    prob_table: torch.Tensor  # (2 * (lookback + 1),) float32, indexed [verse_initial, clause_len]
    random_pool: torch.Tensor  # (R,) int64: non-special ids for BERT random replacement
    pattern_lookup: dict  # host: token tuple of every longer pattern -> its entry (the CPU's path for longer words)
    vocab_size: int
    mask_id: int
    lookback: int
    max_pieces: int
    max_per_token: int
    max_same_length: int  # most patterns that share a first token and a length
    use_cells: bool  # the table varies over cells (structural): verse_initial and clause_len are needed
    preceding_clause: bool  # clause_len mode: the clause before the connective (True) or since the last boundary
    use_weight: bool
    bert: bool
    p_mask: float
    p_mask_or_random: float
    start_can_stop: bool = False  # some token both starts a pattern and stops a clause (the sparse path's count)
    chain: bool = False  # masking.chain: causal matches within chain_gap of each other share their head's draw
    chain_gap: int = DEFAULT_CHAIN_GAP  # the most tokens from one chained match's start to the next one's
    chain_class: int = 0  # the class id whose matches chain (CLASSES.index("causal"))
    readout: bool = False  # masking.readout: also compute the readout targets (two more (B, T) outputs)

    def to(self, device: torch.device | str) -> MaskTables:
        moved = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k, v in moved.items():
            if isinstance(v, torch.Tensor):
                moved[k] = v.to(device)
        return MaskTables(**moved)

    @property
    def device(self) -> torch.device:
        return self.token_flags.device

    def __getstate__(self) -> dict:
        """Copies and pickles leave out the numpy views: a copy's views must share its own tensors' memory (else the
        in-place table updates a schedule makes would never reach the CPU path of a copied masker)."""
        state = dict(self.__dict__)
        state.pop("_host", None)
        return state

    def host(self) -> SimpleNamespace:
        """numpy views of the CPU tables (shared memory: in-place updates show), built once."""
        if self.device.type != "cpu":
            raise MaskingError(f"numpy views need CPU tables (these are on {self.device})")
        views = self.__dict__.get("_host")
        if views is None:
            views = SimpleNamespace(**{f.name: getattr(self, f.name).numpy() for f in dataclasses.fields(self)
                                       if isinstance(getattr(self, f.name), torch.Tensor)})
            self.__dict__["_host"] = views
        return views


def compile_prob_table(cfg: MaskingConfig) -> tuple[torch.Tensor, bool]:
    """The (2, lookback + 1) probability table for the strategy, flattened, and whether weights multiply it."""
    cells = torch.zeros(2, cfg.lookback + 1, dtype=torch.float32)
    if cfg.strategy in ("uniform", "random"):  # random: the control words, mask_prob calibrated (genesis.control)
        cells.fill_(cfg.mask_prob)
        return cells.flatten(), False
    if cfg.strategy == "weighted":
        cells.fill_(cfg.base_probability)
        return cells.flatten(), True
    for verse_initial in (0, 1):
        for clause_len in range(cfg.lookback + 1):
            rule = next((r for r in cfg.rules if r.matches(bool(verse_initial), clause_len)), None)
            cells[verse_initial, clause_len] = rule.p if rule is not None else 0.0
    return cells.flatten(), cfg.structural_weights


def build_tables(lex: ResolvedLexicon, cfg: MaskingConfig, mask_id: int) -> MaskTables:
    V, L = lex.vocab_size, lex.max_pieces
    specials = set(np.flatnonzero(lex.special).tolist())

    def per_vocab(arr, dtype, fill) -> torch.Tensor:  # V entries + the neutral slot
        out = torch.full((V + 1,), fill, dtype=dtype)
        out[:V] = torch.as_tensor(arr).to(dtype)
        return out

    glue, wend = per_vocab(lex.glue_left, torch.bool, False), per_vocab(lex.word_end, torch.bool, False)
    boundary = per_vocab(lex.clause_boundary, torch.bool, False)
    separator = per_vocab(lex.verse_separator, torch.bool, False)
    flags = glue * GLUE_LEFT + wend * WORD_END + boundary * CLAUSE_BOUNDARY + separator * VERSE_SEPARATOR
    flags = flags.to(torch.uint8)
    first = per_vocab(lex.first_pattern, torch.int64, -1)
    count = per_vocab(lex.pattern_count, torch.int64, 0)
    # special tokens (and the mask token) never start a match
    never = sorted(i for i in specials | {mask_id} if 0 <= i < V)
    first[never], count[never] = -1, 0
    # keep every table non-empty so the kernel always has a valid pointer
    P = max(1, len(lex.pattern_len))
    patterns = torch.full((P, L), -1, dtype=torch.int64)
    pattern_len = torch.zeros(P, dtype=torch.int64)
    pattern_entry = torch.zeros(P, dtype=torch.int64)
    if len(lex.pattern_len):
        patterns[:] = torch.as_tensor(lex.patterns.reshape(-1, L)).long()
        pattern_len[:] = torch.as_tensor(lex.pattern_len).long()
        pattern_entry[:] = torch.as_tensor(lex.pattern_entry).long()
    single = torch.full((V + 1,), -1, dtype=torch.int64)
    starts_multi = torch.zeros(V + 1, dtype=torch.bool)
    for v in torch.nonzero(count).flatten().tolist():  # first 1-token pattern in order, as the kernel takes it
        for p in range(first[v], first[v] + count[v]):
            if pattern_len[p] > 1:
                starts_multi[v] = True
            elif single[v] < 0:
                single[v] = pattern_entry[p]
    # (first token, length) -> patterns, for the dense path; stable, so equal keys keep the patterns' order
    length_key = torch.where((pattern_len > 0) & (first.index_select(0, patterns[:, 0].clamp(min=0)) >= 0),
                             patterns[:, 0] * (L + 2) + pattern_len, -1)  # specials never start a match
    length_key, length_pattern = torch.sort(length_key, stable=True)
    max_same_length = int(torch.unique_consecutive(length_key, return_counts=True)[1].max())
    longer = patterns[pattern_len > 1]
    pattern_lookup: dict[tuple[int, ...], int] = {}
    for p in range(len(lex.pattern_len)):  # the first pattern in order wins, as in the kernel (tuples are unique)
        if pattern_len[p] > 1:
            pattern_lookup.setdefault(tuple(patterns[p, : pattern_len[p]].tolist()), int(pattern_entry[p]))
    multi_prefix = torch.unique(longer[:, 0] * (V + 1) + longer[:, 1]) if len(longer) else torch.full((1,), -1)
    E = max(1, len(lex.words))
    weight, klass = torch.zeros(E, dtype=torch.float32), torch.zeros(E, dtype=torch.int64)
    weight[: len(lex.words)] = torch.as_tensor(lex.entry_weight).float()
    klass[: len(lex.words)] = torch.as_tensor(lex.entry_class).long()
    prob_table, use_weight = compile_prob_table(cfg)
    pool = torch.tensor(sorted(set(range(V)) - specials - {mask_id}), dtype=torch.int64)
    if pool.numel() == 0:
        raise MaskingError("the tokenizer has no non-special tokens to draw random replacements from")
    use_cells = bool((prob_table != prob_table[1]).any())
    clause_stop = boundary | separator
    stop = clause_stop if cfg.clause_length == "preceding" else boundary
    scan_code = ((first >= 0) * SCAN_START + (stop * SCAN_STOP if use_cells else 0)).to(torch.uint8)
    return MaskTables(
        token_flags=flags, glue_left=glue, word_end=wend, clause_boundary=boundary, verse_separator=separator,
        clause_stop=clause_stop, scan_code=scan_code, starts_multi=starts_multi, multi_prefix=multi_prefix,
        first_pattern=first, pattern_count=count, single_entry=single,
        patterns=patterns, pattern_len=pattern_len, pattern_entry=pattern_entry, length_key=length_key,
        length_pattern=length_pattern, entry_weight=weight,
        entry_class=klass, prob_table=prob_table, random_pool=pool, pattern_lookup=pattern_lookup, vocab_size=V,
        mask_id=mask_id,
        lookback=cfg.lookback, max_pieces=L, max_per_token=max(1, int(count.max())), max_same_length=max_same_length,
        use_cells=use_cells, preceding_clause=cfg.clause_length == "preceding",
        use_weight=use_weight,
        bert=cfg.replacement == "bert", p_mask=float(cfg.bert_split[0]),
        p_mask_or_random=float(cfg.bert_split[0] + cfg.bert_split[1]),
        start_can_stop=bool((scan_code == SCAN_START | SCAN_STOP).any()),
        chain=cfg.chain, chain_gap=cfg.chain_gap, chain_class=CLASSES.index("causal"), readout=cfg.readout,
    )


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


def readout_position(row, last_piece: int, clause_stop, verse_start=None) -> int | None:
    """The readout position of a word whose last piece is at column `last_piece` of `row` (a sequence of valid
    ids), one position at a time: the documented semantics in plain Python (docs/masking.md#readout-targets). The
    vectorised paths are tested against it. A column is a stop when its token is a clause stop (`clause_stop`:
    clause-boundary or verse-separator tokens) or, with `verse_start` flags, when the next column starts a verse.
    Skip the stops right after the word, then one or more other tokens; the first stop after them is the readout
    position. None when the row ends first."""
    def is_stop(column: int) -> bool:
        next_starts_verse = verse_start is not None and column + 1 < len(row) and bool(verse_start[column + 1])
        return bool(clause_stop[row[column]]) or next_starts_verse

    column = last_piece + 1
    while column < len(row) and is_stop(column):  # the run of stops right after the word
        column += 1
    if column >= len(row):
        return None
    while column < len(row) and not is_stop(column):  # what follows the word, up to its stop
        column += 1
    return column if column < len(row) else None


def readout_reference(row, mask_row, connective_row, tables: MaskTables, verse_start=None):
    """(readout, readout_start) of one row as lists, from the masker's mask and connectives, one masked word at a
    time with `readout_position`: the later word wins a shared position; a word without one is dropped."""
    T = len(row)
    readout, readout_start = [IGNORE_INDEX] * T, [-1] * T
    clause_stop, glue, wend = tables.clause_stop.tolist(), tables.glue_left.tolist(), tables.word_end.tolist()
    for column in range(T):
        if not mask_row[column]:
            continue
        continues = (column + 1 < T and mask_row[column + 1] and connective_row[column + 1] == connective_row[column]
                     and glue[row[column + 1]] and wend[row[column]])
        if continues:  # not the word's last piece
            continue
        position = readout_position(row, column, clause_stop, verse_start)
        if position is not None:  # words come in column order: a later one overwrites
            readout[position], readout_start[position] = connective_row[column], column + 1
    return readout, readout_start


# ----------------------------------------------------------------------------------------------------------------
# Philox, bit-exact with Triton's tl.philox / tl.rand


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
    needs is ~3.5x lower than eager torch's (150 vs 525 us for 1,300 values, one core); elsewhere in torch."""
    if c0.device.type == "cpu":
        words = _philox_numpy(seed, *(c.numpy() for c in (c0, c1, c2, c3)))
        return tuple(torch.from_numpy(np.ascontiguousarray(w).view(np.int64)) for w in words)
    return _philox_torch(seed, c0, c1, c2, c3)


def _philox_numpy(seed: int, c0: np.ndarray, c1: np.ndarray, c2: np.ndarray, c3: np.ndarray):
    """The rounds in numpy on two (2, n) uint64 stacks, (c0, c2) and (c1, c3), as `_philox_torch`: uint64 products
    of two 32-bit words are exact, and `>> 32` is the high word. Multiplying the flipped stack by the flipped
    multipliers gives the products already in the order the next round wants, so every other operation runs on
    contiguous arrays, in place (~20% faster than flipping the results)."""
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


# ----------------------------------------------------------------------------------------------------------------
# The torch path: sparse on the host, dense on a device


def mask_torch(input_ids: torch.Tensor, verse_start: torch.Tensor | None, tables: MaskTables, seed: int, step: int,
               rank: int = 0, row_offset: int = 0, ids_checked: bool = False, layout: str | None = None):
    """Same signature and semantics as `genesis.kernels.mask.connective_mask_triton`; bit-identical results.

    Two layouts of the same computation, chosen by the device (or forced with `layout`, as the tests do):

    * "sparse" (CPU tensors): work per connective, not per token. A few passes over the batch (the output copies,
      one table lookup and one compaction for candidate starts and, where the rules need them, clause stops),
      then everything else — word checks, rules, Philox — runs on the candidates (~4% of KJV tokens) in
      numpy, whose per-op cost at these sizes is 2-3x lower than eager torch's (~1 vs ~2.5 us for 2k values, one
      core): at 64x1024 tokens a call is ~50 torch and ~100 numpy calls (0.33 ms warm, one core), set by their
      count and by how warm the caches are more than by the tokens (bench/RESULTS.md).
    * "dense" (any other device: GPUs without Triton, MPS): every position in ~190 whole-batch torch calls (64x1024
      structural, torch.profiler) and no host synchronisation, so the host never waits for the device. Compacting
      on CUDA instead costs a sync per compaction and ~900 small launches (3.7 ms per call on an H100 at any size,
      bench/RESULTS.md).
    """
    B, T = input_ids.shape
    device = input_ids.device
    out = input_ids.clone(memory_format=torch.contiguous_format)
    if B * T == 0:
        return (out, *_unmasked(B, T, device), *_no_readout(B, T, device, tables.readout))
    layout = layout or ("sparse" if device.type == "cpu" else "dense")
    if layout == "sparse":
        if device.type != "cpu":
            raise MaskingError(f"the sparse torch path runs on CPU tensors (got a {device.type} tensor)")
        result = _mask_sparse(out, verse_start, tables, seed, step, rank, row_offset)
        if tables.readout:
            result += _readout_sparse(input_ids, verse_start, result[1], result[3], tables)
        return result
    if layout != "dense":
        raise MaskingError(f"layout must be 'sparse' or 'dense' (got {layout!r})")
    result = _mask_dense(out, verse_start, tables, seed, step, rank, row_offset, ids_checked)
    if tables.readout:
        result += _readout_dense(input_ids, verse_start, result[1], result[3], tables, ids_checked)
    return result


def uniform_from_bits_numpy(word: np.ndarray) -> np.ndarray:
    """`uniform_from_bits` in numpy: the same float32 operations, hence the same values."""
    return np.minimum(word, MASK32 - word).astype(np.float32) * np.float32(4.6566127342e-10)


def _mask_sparse(out: torch.Tensor, verse_start: torch.Tensor | None, tables: MaskTables, seed: int, step: int,
                 rank: int, row_offset: int):
    """The sparse layout, on CPU tensors: `out` (B, T) is the contiguous copy of the input that becomes the masked
    output. Whole-batch lookups go through torch's index_select (faster than numpy's take, and its bounds check
    catches invalid ids for free); the candidate stage is numpy."""
    B, T = out.shape
    V = tables.vocab_size
    flat = out.view(-1)
    try:
        code = tables.scan_code.index_select(0, flat)
    except (IndexError, RuntimeError):  # invalid ids map to the neutral slot V (no flags, no patterns)
        flat = flat.long().clamp(-1, V).remainder_(V + 1)
        code = tables.scan_code.index_select(0, flat)
    ids = flat.numpy()  # read-only from here; `out` is written at the very end
    h = tables.host()

    # 1. candidate starts (and, for the structural rules, the clause stops: one lookup and one compaction for
    #    both) and their neighbours; one-token words (almost all) need one lookup, no comparison
    code = code.numpy()
    found = (code != 0).nonzero()[0]  # numpy's nonzero is ~5x faster on bool arrays
    if tables.use_cells:
        kind = code.take(found)
        in_found = (kind != SCAN_STOP).nonzero()[0]  # the starts' indices in `found` (kind: 1, 2 or 3)
        s = found[in_found]
    else:
        s = found
    if s.size == 0:
        return (out, *_unmasked(B, T))
    around = ids.take(s + _NEIGHBOURS_NP, mode="clip")  # (3, n): previous, token, next
    tok = around[1]
    attached = h.glue_left.take(around[1:]) & h.word_end.take(around[:2])  # (2, n): onto previous, next onto it
    entry = h.single_entry.take(tok)
    plen = None  # every match is one token long unless a longer word matched below
    glued = (attached[0] | attached[1]).nonzero()[0]
    if glued.size:  # starts glued to a neighbour (a few percent): row edges cut the glue, then the word decides
        column = s.take(glued) % T
        left = attached[0].take(glued) & (column > 0)
        right = attached[1].take(glued) & (column < T - 1)
        entry[glued[left | right]] = -1
        multi = glued[right & ~left & h.starts_multi.take(tok.take(glued))]
        if multi.size:  # keep the starts whose first two tokens begin some longer pattern (a few per 64k tokens)
            pair = tok.take(multi).astype(np.int64) * (V + 1) + around[2].take(multi)
            at = np.minimum(h.multi_prefix.searchsorted(pair), h.multi_prefix.size - 1)
            multi = multi[h.multi_prefix.take(at) == pair]
        if multi.size:
            entry, plen = _match_longer_words(ids, s, entry, multi, tables, h, T)

    # 2. keep the matches
    hit = (entry >= 0).nonzero()[0]
    if hit.size == 0:
        return (out, *_unmasked(B, T))
    s, entry = s.take(hit), entry.take(hit)
    if plen is not None:
        plen = plen.take(hit)
    row, col = np.divmod(s, T)

    # 3. the probability at each match start
    if tables.use_cells:
        if verse_start is not None:
            verse_initial = verse_start.numpy()[row, col]
        else:
            verse_initial = h.verse_separator.take(around[0].take(hit)) & (col > 0)
        # `found` holds m starts before the m-th one, so in_found - m stops (the starts that are stops too
        # counted again, where a lexicon has any)
        stops_before = in_found.take(hit) - hit
        if tables.start_can_stop:
            start_stops = kind.take(in_found) >= SCAN_STOP
            stops_before += start_stops.cumsum().take(hit) - start_stops.take(hit)
        cell = verse_initial * (tables.lookback + 1) + _clause_lengths(tables, found, kind, stops_before, s, col)
        prob = h.prob_table.take(cell)
    else:
        prob = h.prob_table[1:2]
    if tables.use_weight:
        prob = prob * h.entry_weight.take(entry)
    prob = np.minimum(np.maximum(prob, np.float32(0.0)), np.float32(1.0))

    # 4. one draw per match (a chained match takes its chain head's decision)
    w0, w1, _, _ = _philox_numpy(seed, col, (row + row_offset) & MASK32, step & MASK32, rank & MASK32)
    selected = uniform_from_bits_numpy(w0) < prob
    if tables.chain:
        selected = _chain_decisions(selected, s, h.entry_class.take(entry) == tables.chain_class, tables.chain_gap, T)

    # 5. every piece of every match is matched; write every piece of every chosen word (the outputs are made here,
    #    after the candidate stage, which then finds the batch and its lookups still in the cache)
    mask, classes, connectives, matched = _unmasked(B, T)
    if plen is None:
        pieces = s
        chosen = selected.nonzero()[0]
        pos = s[chosen]
    else:  # pieces of longer words: repeat each start (and its draw) over its pieces
        owner = np.arange(s.size).repeat(plen)
        pieces = s[owner] + np.arange(owner.size) - (plen.cumsum() - plen).repeat(plen)
        chosen_piece = selected[owner]
        chosen, pos = owner[chosen_piece], pieces[chosen_piece]
    matched.view(-1).numpy()[pieces] = True
    if chosen.size == 0:
        return out, mask, classes, connectives, matched
    entry, w1 = entry[chosen], w1[chosen]
    out_np = out.view(-1).numpy()
    if tables.bert:
        choice = uniform_from_bits_numpy(w1)
        _, _, w2, _ = _philox_numpy(seed, pos % T, (pos // T + row_offset) & MASK32, step & MASK32,
                                    rank & MASK32)
        random_tok = h.random_pool.take((w2 % h.random_pool.size).view(np.int64))
        new = np.where(choice < np.float32(tables.p_mask), tables.mask_id,
                       np.where(choice < np.float32(tables.p_mask_or_random), random_tok, out_np[pos]))
        out_np[pos] = new
    else:
        out_np[pos] = tables.mask_id
    mask.view(-1).numpy()[pos] = True
    classes.view(-1).numpy()[pos] = h.entry_class.take(entry)
    connectives.view(-1).numpy()[pos] = entry
    return out, mask, classes, connectives, matched


def _chain_decisions(selected: np.ndarray, s: np.ndarray, chains: np.ndarray, gap: int, T: int) -> np.ndarray:
    """Every chained match's decision replaced by its chain head's (sparse layout). `s` holds the matches' flat
    positions in order, `chains` marks the matches of the chaining class: one whose start lies at most `gap` tokens
    after the previous such match's in its row is a member, and takes the decision of the latest non-member before
    it (the head)."""
    c = chains.nonzero()[0]
    if c.size < 2:
        return selected
    start = s.take(c)
    member = np.zeros(c.size, dtype=bool)
    member[1:] = (start[1:] - start[:-1] <= gap) & (start[1:] // T == start[:-1] // T)
    head = np.maximum.accumulate(np.where(member, 0, np.arange(c.size)))
    selected = selected.copy()
    selected[c] = selected.take(c.take(head))
    return selected


def _unmasked(B: int, T: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, ...]:
    """mask, classes, connectives and matched of a (B, T) batch where nothing is masked (or matched)."""
    return (torch.zeros((B, T), dtype=torch.bool, device=device),
            torch.full((B, T), IGNORE_INDEX, dtype=torch.int64, device=device),
            torch.full((B, T), IGNORE_INDEX, dtype=torch.int64, device=device),
            torch.zeros((B, T), dtype=torch.bool, device=device))


def _no_readout(B: int, T: int, device: torch.device | str, readout: bool) -> tuple[torch.Tensor, ...]:
    """readout and readout_start of a (B, T) batch without any readout target (-100, -1); () without readout."""
    if not readout:
        return ()
    return (torch.full((B, T), IGNORE_INDEX, dtype=torch.int64, device=device),
            torch.full((B, T), -1, dtype=torch.int64, device=device))


def _readout_sparse(input_ids: torch.Tensor, verse_start: torch.Tensor | None, mask: torch.Tensor,
                    connectives: torch.Tensor, tables: MaskTables) -> tuple[torch.Tensor, torch.Tensor]:
    """The readout targets (sparse layout, CPU tensors), per masked word: its last piece, then one binary search
    among the batch's closing stops (a stop right after a non-stop) for the first one at least two columns on."""
    B, T = mask.shape
    readout, readout_start = _no_readout(B, T, "cpu", True)
    masked_flat = mask.view(-1).numpy()
    pos = masked_flat.nonzero()[0]
    if pos.size == 0:
        return readout, readout_start
    h, V = tables.host(), tables.vocab_size
    ids = input_ids.reshape(-1).numpy().astype(np.int64)
    ids[(ids < 0) | (ids >= V)] = V  # invalid ids: the neutral slot, no flags
    stop = h.clause_stop.take(ids).reshape(B, T)
    if verse_start is not None:  # the last column of a verse is a stop
        stop[:, :-1] |= verse_start.numpy()[:, 1:] != 0
    closes = np.zeros((B, T), dtype=bool)
    closes[:, 1:] = stop[:, 1:] & ~stop[:, :-1]
    closing = closes.reshape(-1).nonzero()[0]
    entry = connectives.view(-1).numpy()
    following = np.minimum(pos + 1, B * T - 1)
    continues = ((pos + 1) % T != 0) & masked_flat.take(following) & (entry.take(following) == entry.take(pos)) \
        & h.glue_left.take(ids.take(following)) & h.word_end.take(ids.take(pos))
    last_piece = pos[~continues]
    at = closing.searchsorted(last_piece + 2)
    position = closing.take(np.minimum(at, closing.size - 1)) if closing.size else at
    found = (at < closing.size) & (position // T == last_piece // T)  # a position in a later row is past the end
    last_piece, position = last_piece[found], position[found]
    wins = np.ones(position.size, dtype=bool)  # positions never decrease: the later word wins
    wins[:-1] = position[1:] != position[:-1]
    readout.view(-1).numpy()[position[wins]] = entry.take(last_piece[wins])
    readout_start.view(-1).numpy()[position[wins]] = last_piece[wins] % T + 1
    return readout, readout_start


_NEIGHBOURS_NP = np.array([[-1], [0], [1]])
_SENTINEL = np.array([-2])


def _clause_lengths(tables: MaskTables, found: np.ndarray, kind: np.ndarray, stops_before: np.ndarray,
                    s: np.ndarray, col: np.ndarray) -> np.ndarray:
    """clause_len at each match start `s` (sparse layout). `found` holds the sorted positions of the batch's
    starts and stops (`kind`: their scan codes), `stops_before` how many stops precede each start. Row starts clamp
    every look-back, exactly as the kernel's bounded scans do.

    since_boundary: the distance back to the nearest clause-boundary token, the row start counting as one, capped.
    preceding: skip the run of boundary/separator tokens just before the start (0 if it reaches `lookback` tokens
    or the row start), then count the clause tokens before it back to the previous stop or the row start, capped."""
    lookback = tables.lookback
    is_stop = kind >= SCAN_STOP
    # a sentinel before every stop, never the position before one: stops[k] is the k-th stop
    stops = np.concatenate((_SENTINEL, found.compress(is_stop)))
    last = stops.take(stops_before)  # the last stop before each start
    row_before = s - col - 1
    if not tables.preceding_clause:
        return np.minimum(s - np.maximum(last, row_before), lookback)
    # a run of stops ends right before the start: walk back to its first stop while the previous stop is the
    # previous position. Runs are short (", " or ".\n"); after lookback - 1 steps the start is `lookback` tokens
    # from the clause's end, which is not counted whatever the run's true length, so the walk stops there
    adjacent = last == s - 1
    first = np.where(adjacent, stops_before, 0)
    for _ in range(lookback - 1):
        back = stops.take(first - 1, mode="clip") == stops.take(first) - 1
        if not back.any():
            break
        first -= back
    end = np.where(adjacent, stops.take(first) - 1, s - 1)  # last token of the preceding clause
    before = np.maximum(stops.take(np.where(adjacent, first - 1, stops_before)), row_before)  # its last stop
    # end - before <= 0 exactly when the clause would start before the row (end < row start)
    return np.where(s - end <= lookback, np.minimum(np.maximum(end - before, 0), lookback), 0)


def _match_longer_words(ids: np.ndarray, s, entry, multi, tables: MaskTables, h, T: int):
    """Patterns of two or more tokens at the starts `multi` (a handful per 64k tokens), in a plain loop: measure the
    word run there (the start plus the glued tokens after it, counted up to L + 1, longer than any pattern) and
    look its tokens up. A pattern's pieces glue onto each other, so a pattern of length k matches at a start
    exactly when the start is not glued to its left, the run there is k tokens long and the tokens agree. Returns
    `entry` updated in place and the match lengths of all starts."""
    glue, wend = h.glue_left, h.word_end
    plen = np.ones_like(s)
    for k, start in zip(multi.tolist(), s[multi].tolist()):
        column = start % T
        run = 1
        while column + run < T and run <= tables.max_pieces:
            if not (glue[ids[start + run]] and wend[ids[start + run - 1]]):
                break
            run += 1
        entry[k] = tables.pattern_lookup.get(tuple(ids[start : start + run].tolist()), -1)
        plen[k] = run
    return entry, plen


def _shift_right(x: torch.Tensor, fill) -> torch.Tensor:
    """x[:, j-1] at column j, `fill` in column 0."""
    return torch.nn.functional.pad(x[:, :-1], (1, 0), value=fill)


def _readout_dense(input_ids: torch.Tensor, verse_start: torch.Tensor | None, mask: torch.Tensor,
                   connectives: torch.Tensor, tables: MaskTables,
                   ids_checked: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """The readout targets (dense layout), from each closing stop's point of view: the latest masked word ending two
    or more columns before it reads there unless another closing stop lies between them. Running maxima over each
    row and gathers; no scatter (whose order among equal positions is not defined on a GPU), no host sync."""
    B, T = mask.shape
    V = tables.vocab_size
    ids = input_ids.long()
    if not ids_checked:
        ids = ids.clamp(-1, V).remainder_(V + 1)
    column = torch.arange(T, device=ids.device).expand(B, T)
    stop = _take(tables.clause_stop, ids)
    if verse_start is not None:  # the last column of a verse is a stop
        stop = stop | torch.nn.functional.pad(verse_start[:, 1:] != 0, (0, 1), value=False)
    closes = stop & ~_shift_right(stop, True)
    continues = torch.zeros_like(mask)  # the next column is a piece of the same masked word
    continues[:, :-1] = (mask[:, 1:] & (connectives[:, 1:] == connectives[:, :-1])
                         & _take(tables.glue_left, ids[:, 1:]) & _take(tables.word_end, ids[:, :-1]))
    last_piece = torch.where(mask & ~continues, column, -1).cummax(1).values
    last_piece = _shift_right(_shift_right(last_piece, -1), -1)  # the latest word end two or more columns back
    previous_close = _shift_right(torch.where(closes, column, -1).cummax(1).values, -1)
    hit = closes & (last_piece >= 0) & (previous_close < last_piece + 2)
    readout = torch.where(hit, connectives.gather(1, last_piece.clamp(min=0)), IGNORE_INDEX)
    return readout, torch.where(hit, last_piece + 1, -1)


def _mask_dense(out: torch.Tensor, verse_start: torch.Tensor | None, tables: MaskTables, seed: int, step: int,
                rank: int, row_offset: int, ids_checked: bool):
    """The dense layout: every quantity for every position as a (B, T) tensor, no compaction, no host sync.
    Row-wise scans (cummax/cummin over columns) replace the kernel's bounded look-arounds: a word's start is the
    last position at or before it that does not glue onto its left neighbour, its run ends at the next such
    position, and the clause before a start ends at the last non-stop token before it."""
    B, T = out.shape
    device, V = out.device, tables.vocab_size
    ids = out.long()  # a copy for int32 ids; `out` is overwritten at the end
    if not ids_checked:  # invalid ids map to the neutral slot V (no flags, no patterns): -1 and V both land on V
        ids = ids.clamp(-1, V).remainder_(V + 1)
    column = torch.arange(T, device=device).expand(B, T)

    # 1. words: where each starts, how long its run is, and the pattern it matches (if any)
    word_start, entry = _word_entries(ids, tables, column)
    matched = entry >= 0

    # 2. the probability at every position (used at match starts)
    if tables.use_cells:
        if verse_start is not None:
            verse_initial = verse_start
        else:
            verse_initial = _shift_right(_take(tables.verse_separator, ids), False)
        cell = verse_initial.long() * (tables.lookback + 1) + _clause_lengths_dense(tables, ids, column)
        prob = _take(tables.prob_table, cell)
    else:
        prob = tables.prob_table[1].expand(B, T)
    if tables.use_weight:
        prob = prob * _take(tables.entry_weight, entry.clamp(min=0))
    prob = prob.clamp(0.0, 1.0)

    # 3. one draw per position, counter (column, row_offset + row, step, rank), each word wrapped to 32 bits
    rows = (torch.arange(row_offset, row_offset + B, device=device) & MASK32).unsqueeze(1).expand(B, T)
    w0, w1, w2, _ = philox4x32(seed, column.reshape(-1), rows.reshape(-1),
                               torch.full((B * T,), step & MASK32, device=device),
                               torch.full((B * T,), rank & MASK32, device=device))
    selected = matched & (uniform_from_bits(w0).view(B, T) < prob)
    if tables.chain:  # a chained match takes the decision of its chain's head: the latest unchained match before it
        chains = matched & (_take(tables.entry_class, entry.clamp(min=0)) == tables.chain_class)
        last = _shift_right(torch.where(chains, column, -1).cummax(1).values, -1)  # the previous one's start
        member = chains & (last >= 0) & (column - last <= tables.chain_gap)
        head = torch.where(chains & ~member, column * 2 + selected.long(), -1).cummax(1).values  # column, decision
        selected = torch.where(chains, (head & 1) == 1, selected)

    # 4. every piece follows its word's start
    start = torch.where(word_start, column, 0).cummax(1).values
    mask = selected.gather(1, start)
    entry = entry.gather(1, start)
    matched = entry >= 0
    if tables.bert:
        choice = uniform_from_bits(w1).view(B, T).gather(1, start)
        random_tok = _take(tables.random_pool, w2.view(B, T) % tables.random_pool.numel())
        replaced = torch.where(choice < tables.p_mask, tables.mask_id,
                               torch.where(choice < tables.p_mask_or_random, random_tok, out.long()))
        out = torch.where(mask, replaced.to(out.dtype), out)
    else:
        out = out.masked_fill(mask, tables.mask_id)
    classes = torch.where(mask, _take(tables.entry_class, entry.clamp(min=0)), IGNORE_INDEX)
    connectives = torch.where(mask, entry, IGNORE_INDEX)
    return out, mask, classes, connectives, matched


def _word_entries(ids: torch.Tensor, tables: MaskTables, column: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The matching stage of the dense layout, on valid (B, T) int64 ids: where each word starts, and the lexicon
    entry of the pattern each word matches, at its start (-1 elsewhere and where it matches none)."""
    B, T = ids.shape
    device, L = ids.device, tables.max_pieces
    attached = torch.zeros((B, T), dtype=torch.bool, device=device)
    attached[:, 1:] = _take(tables.glue_left, ids[:, 1:]) & _take(tables.word_end, ids[:, :-1])
    word_start = ~attached  # column 0 always starts a word
    next_start = torch.where(word_start, column, T).flip(1).cummin(1).values.flip(1)
    run = torch.nn.functional.pad(next_start[:, 1:], (0, 1), value=T) - column  # tokens of the word at a start
    # patterns are keyed by (first token, length): one binary search finds the candidates, then the pieces
    # after the first are compared with the window of tokens following the start
    key = ids * (L + 2) + run.clamp(max=L + 1)
    at = torch.searchsorted(tables.length_key, key.view(-1)).view(B, T)
    entry = torch.full((B, T), -1, dtype=torch.int64, device=device)
    window = torch.nn.functional.pad(ids, (0, L - 1), value=-1).unfold(1, L, 1) if L > 1 else None  # (B, T, L)
    piece = torch.arange(L, device=device)
    n_keys = tables.length_key.numel()
    for q in range(tables.max_same_length):
        k = (at + q).clamp_(max=n_keys - 1)
        found = word_start & (_take(tables.length_key, k) == key)
        p = _take(tables.length_pattern, k)
        if window is not None:
            agree = (_take(tables.patterns, p) == window) | (piece >= run.unsqueeze(2))
            found &= agree.all(2)
        entry = torch.where(found & (entry < 0), _take(tables.pattern_entry, p), entry)
    return word_start, entry


def _clause_lengths_dense(tables: MaskTables, ids: torch.Tensor, column: torch.Tensor) -> torch.Tensor:
    """clause_len at every position (dense layout), by running maxima over each row."""
    lookback = tables.lookback
    if not tables.preceding_clause:
        boundary = _take(tables.clause_boundary, ids)
        last = _shift_right(torch.where(boundary, column, -1).cummax(1).values, -1)  # last boundary before
        return (column - last).clamp(max=lookback)
    stop = _take(tables.clause_stop, ids)
    end = _shift_right(torch.where(stop, -1, column).cummax(1).values, -1)  # last non-stop token before
    last_stop = torch.where(stop, column, -1).cummax(1).values
    before = last_stop.gather(1, end.clamp(min=0))  # last stop before `end` (end itself is not a stop)
    counted = (end >= 0) & (column - 1 - end < lookback)
    return torch.where(counted, (end - before).clamp(max=lookback), 0)


def _take(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """table[index] for any index shape (rows of a 2-D table); index_select is ~3x faster than advanced indexing
    on the CPU."""
    return table.index_select(0, index.reshape(-1)).view(*index.shape, *table.shape[1:])


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


# ----------------------------------------------------------------------------------------------------------------
# Dispatch


def triton_status(device: torch.device) -> str | None:
    """None when the Triton kernel can run on `device`, else the reason it cannot."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # ImportError, or a broken install raising something else
        return f"Triton is not importable ({type(e).__name__}: {e})"
    if device.type == "cuda":
        return None
    if device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return (f"the Triton kernel needs a CUDA tensor (got a {device.type} tensor); CPU tensors run it only under "
            f"TRITON_INTERPRET=1")


def _impl_source(configured: str) -> tuple[Any, str]:
    """The raw impl value asked for and where it came from: GENESIS_MASK_IMPL unless unset or blank."""
    env = os.environ.get("GENESIS_MASK_IMPL", "")
    return (env, "GENESIS_MASK_IMPL") if env.strip() else (configured, "masking.impl")


def requested_impl(configured: str) -> str:
    """The impl asked for, stripped and lowercased: GENESIS_MASK_IMPL if set and not blank, else the configured one
    ('auto' if empty)."""
    raw, _ = _impl_source(configured)
    return str(raw or "").strip().lower() or "auto"


def choose_impl(requested: str, device: torch.device, log: Callable[[str], None] | None = None) -> str:
    """'triton' or 'torch' for `device`. GENESIS_MASK_IMPL (any case) overrides `requested`. 'triton' where it
    cannot run is a TritonUnavailableError (a MaskingError) that says why; 'auto' falls back to torch with one log
    line (on CUDA, or when asked on CPU)."""
    impl = requested_impl(requested)
    if impl not in IMPLS:
        raw, source = _impl_source(requested)
        raise MaskingError(f"mask impl must be one of {', '.join(IMPLS)} (got {raw!r}, from {source})")
    if impl == "torch":
        return "torch"
    reason = triton_status(device)
    if impl == "triton":
        if reason is not None:
            raise TritonUnavailableError(f"masking impl 'triton' cannot run: {reason}. Use impl='torch' or 'auto'")
        return "triton"
    # auto: the kernel on CUDA; the torch path elsewhere (the interpreter is for tests, far too slow to train with)
    if device.type == "cuda" and reason is None:
        return "triton"
    if log is not None:
        why = reason if device.type == "cuda" else f"{device.type} tensors use the torch path"
        log(f"masking: using the torch path ({why})")
    return "torch"


# ----------------------------------------------------------------------------------------------------------------
# The public plug-in


@dataclass
class MaskOutput:
    input_ids: torch.Tensor  # (B, T) masked copy of the inputs, same dtype
    mask: torch.Tensor  # (B, T) bool: positions of selected connectives (every piece)
    classes: torch.Tensor  # (B, T) int64: class id at masked positions, -100 elsewhere
    connectives: torch.Tensor  # (B, T) int64: lexicon entry index at masked positions, -100 elsewhere
    matched: torch.Tensor  # (B, T) bool: every piece of every lexicon match found, masked or not
    # masking.readout only (else None), docs/masking.md#readout-targets:
    readout: torch.Tensor | None = None  # (B, T) int64: a masked word's lexicon index at its readout position
    readout_start: torch.Tensor | None = None  # (B, T) int64: there, the column after that word's last piece; -1


class ConnectiveMasker:
    """Masks logical connectives in (B, T) token batches on the batch's device. Semantics: docs/masking.md.

    `seed` (in [0, 2**63)) and `rank` (in [0, 2**32), one key per process) may be set after construction, as the
    Trainer and Lightning examples in docs/integrations.md set `masker.rank`; both are checked when set. With
    `enabled=False` the masker is a pass-through: each call checks its input as usual and returns it unchanged,
    nothing masked."""

    def __init__(self, lexicon: ResolvedLexicon, config: MaskingConfig, mask_id: int, seed: int = 0,
                 rank: int = 0, check_ids: bool = True, log: Callable[[str], None] | None = logger.info,
                 enabled: bool = True):
        if not isinstance(config, MaskingConfig):
            raise MaskingError(f"config must be a MaskingConfig (got {type(config).__name__}); "
                               f"ConnectiveMasker.from_tokenizer also takes a mapping of [masking] keys")
        _check_options(check_ids=check_ids, enabled=enabled, log=log)
        self.seed, self.rank = seed, rank  # checked by the setters below
        self.lexicon, self.config = lexicon, config
        self.check_ids, self.log, self.enabled = check_ids, log, enabled
        self.mask_id = mask_id
        self._host_tables = build_tables(lexicon, config, mask_id)
        self._tables: dict[torch.device, MaskTables] = {}
        self._prob_base: dict[torch.device, torch.Tensor] = {}  # the configured table, where a schedule scales it
        self._factor: dict[torch.device, float] = {}  # the schedule factor each device's prob_table holds now
        self._impl: dict[torch.device, str] = {}
        self._kernel_ran: set[torch.device] = set()  # devices where the kernel compiled and ran once
        self._reference_tables: dict[torch.device, MaskTables] = {}  # the control arm's real-connective matcher
        # schedule = "plateau": the step masking starts ramping at, set by whoever watches the loss (the trainer)
        self.plateau_step: int | None = None
        # strategy = "random" (`control`): the ControlArm chosen, and the real connectives' lexicon (for the counts)
        self.control_arm: Any = None
        self.reference_lexicon: ResolvedLexicon | None = None

    @property
    def seed(self) -> int:
        """The Philox key: an integer in [0, 2**63)."""
        return self._seed

    @seed.setter
    def seed(self, value: int) -> None:
        self._seed = _counter_word(value, "seed", bits=63)

    @property
    def rank(self) -> int:
        """The process's counter word (one key per process): an integer in [0, 2**32). Out of that range a rank
        would wrap onto another one's masks (2**32 onto rank 0's), so it is an error."""
        return self._rank

    @rank.setter
    def rank(self, value: int) -> None:
        self._rank = _counter_word(value, "rank")

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, config: MaskingConfig | Mapping[str, Any] | None = None, *,
                       mask_token: str = "", seed: int | None = None, rank: int = 0, check_ids: bool = True,
                       log: Callable[[str], None] | None = logger.info, **overrides) -> ConnectiveMasker:
        """Build from a `tokenizers.Tokenizer` or a transformers fast tokenizer.

        `config` is a MaskingConfig, a mapping of its keys (the [masking] TOML table) or None for defaults; keyword
        overrides (strategy="structural", lookback=20, ...) apply on top. A connective is a {weight, class} table or
        a (weight, class) pair, as in DEFAULT_CONNECTIVES. `enabled = false`, given as a key of the mapping or as a
        keyword, makes the masker a pass-through (inputs returned unchanged, nothing masked; one log line says so).
        Not given, the masker masks: MaskingConfig's default enabled = false is the trainer's switch, so the
        `enabled` of a MaskingConfig instance is not read (genesis.train builds no masker when it is false).
        `log` receives the masker's few lines (the path chosen, a fallback, a disabled masker): by default the
        "genesis.masking" logger at INFO; any callable (log=print) or None (silent) instead.
        Bad arguments, keys or values raise ValueError naming them (MaskingError; TokenizerError for the tokenizer
        or its mask token), before the lexicon is resolved. A key given here that its switch leaves unread
        (chain_gap without chain=True, schedule_steps with the constant schedule, ...) is a UserWarning."""
        if config is not None and not isinstance(config, (MaskingConfig, Mapping)):
            hint = ""
            if isinstance(config, str):
                names = repr(config) if config in STRATEGIES else "'uniform', 'weighted' or 'structural'"
                hint = f"; to choose a strategy, pass strategy={names}"
            raise MaskingError(f"config must be a MaskingConfig or a mapping of [masking] keys, or None (got "
                               f"{type(config).__name__} {config!r:.60}){hint}")
        if not isinstance(mask_token, str):
            raise MaskingError(f"mask_token must be a str, the mask token's name (got {mask_token!r:.60})")
        if seed is not None:
            _counter_word(seed, "seed", bits=63)
        _counter_word(rank, "rank")
        cfg = _masking_config(config, overrides)
        enabled_given = "enabled" in overrides or (isinstance(config, Mapping) and "enabled" in config)
        given = set(overrides) | (set(config) if isinstance(config, Mapping) else set())
        for key, message in idle_keys(cfg):
            if key in given:  # a MaskingConfig was warned about where it was loaded (load_config)
                warnings.warn(message, UserWarning, stacklevel=2)
        if cfg.strategy == "random":
            raise MaskingError("strategy 'random' (the control arm) picks its words and its rate from the training "
                               "tokens: build it with ConnectiveMasker.control(tokenizer, config, tokens, seq_len=...)")
        enabled = cfg.enabled or not enabled_given
        _check_options(check_ids=check_ids, enabled=enabled, log=log)
        mask_id = find_mask_id(tokenizer, mask_token)  # before the lexicon (~1 s): a missing token fails at once
        lex = resolve_lexicon(tokenizer, cfg)
        if seed is None:
            seed = cfg.seed if cfg.seed is not None else 0
        masker = cls(lex, cfg, mask_id, seed=seed, rank=rank, check_ids=check_ids, log=log, enabled=enabled)
        if not enabled and log is not None:
            log("masking: disabled (enabled = false): the masker returns its inputs unchanged")
        return masker

    @classmethod
    def control(cls, tokenizer: Any, config: MaskingConfig | Mapping[str, Any] | None, tokens: Any, *,
                seq_len: int, verse_start: Any = None, mask_token: str = "", seed: int | None = None, rank: int = 0,
                check_ids: bool = True, log: Callable[[str], None] | None = logger.info,
                warn: Callable[[str], None] | None = None, **overrides) -> ConnectiveMasker:
        """The control arm's masker (strategy = "random", semantics in `genesis.control`): the training split's
        `tokens` (1-D ids, e.g. `Corpus.splits["train"].tokens`) and their `verse_start` flags (optional), read as
        rows of `seq_len`, choose the control words and calibrate p against config's control_reference. `config`
        and `overrides` as in `from_tokenizer` (strategy = "random" is implied); `warn` receives the line saying p
        was capped at 1 (default: `log`). The masker's `control_arm` holds the ControlArm (words, p, rates); its
        `lexicon` is the control words'; `reference_lexicon` the real connectives'. ~2 s on the KJV."""
        from genesis.control import build_control

        cfg = _masking_config(config, {**overrides, "strategy": "random"})
        _check_options(check_ids=check_ids, enabled=True, log=log)
        if seed is None:
            seed = cfg.seed if cfg.seed is not None else 0
        _counter_word(seed, "seed", bits=63)
        _counter_word(rank, "rank")
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise MaskingError(f"seq_len must be a positive integer (got {seq_len!r:.60})")
        tokens = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
        if tokens.ndim != 1:
            raise MaskingError(f"tokens must be 1-D token ids (got shape {tokens.shape})")
        if verse_start is not None:
            if isinstance(verse_start, torch.Tensor):
                verse_start = verse_start.detach().cpu().numpy()
            verse_start = np.asarray(verse_start)
            if verse_start.shape != tokens.shape:
                raise MaskingError(f"verse_start must have the shape of tokens {tokens.shape} (got "
                                   f"{verse_start.shape})")
        mask_id = find_mask_id(tokenizer, mask_token)
        try:
            return build_control(cls, tokenizer, cfg, tokens, verse_start, seq_len, mask_id, seed, rank, check_ids,
                                 log, warn if warn is not None else log)
        except ValueError as e:
            if isinstance(e, MaskingError):
                raise
            raise MaskingError(f"strategy 'random': {e}") from None

    # -- tables and dispatch ----------------------------------------------------------------------------------

    def tables(self, device: torch.device | str) -> MaskTables:
        """The tables on `device` (built once per device); a MaskingError for a device string torch does not know or
        a device this torch cannot use."""
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise MaskingError(f"{device!r}: not a torch device ({first_line(e)})") from None
        if device.type == "cuda" and not torch.cuda.is_available():  # current_device() would raise AssertionError
            raise MaskingError(f"{device}: CUDA is not available to this torch ({torch.__version__}); "
                               f"use a CPU device or a CUDA build of torch")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._tables:
            try:
                tables = self._host_tables.to(device)
            except (RuntimeError, AssertionError) as e:  # mps or xpu without support: RuntimeError, AssertionError
                raise MaskingError(f"{device}: this torch ({torch.__version__}) cannot use it ({first_line(e)})") \
                    from None
            if self.config.schedule != "constant":  # its own table to scale (CPU tables share the host's tensors)
                self._prob_base[device] = tables.prob_table
                tables.prob_table = tables.prob_table.clone()
                self._factor[device] = 1.0
            self._tables[device] = tables
        return self._tables[device]

    def schedule_factor(self, step: int) -> float:
        """The factor masking.schedule puts on every masking probability at `step` (1 for "constant"): from
        schedule_start at step 0 to 1 at schedule_steps, linearly or on a half cosine, then 1. Rounded to float32,
        the precision the probabilities are multiplied in."""
        c = self.config
        if c.schedule == "plateau":  # 0 until the trainer finds the plateau, then the linear ramp from there
            if self.plateau_step is None or step < self.plateau_step:
                return 0.0
            step -= self.plateau_step
        if c.schedule == "constant" or step >= c.schedule_steps:
            return 1.0
        progress = step / c.schedule_steps
        ramp = 0.5 * (1.0 - math.cos(math.pi * progress)) if c.schedule == "cosine" else progress
        return float(np.float32(c.schedule_start + (1.0 - c.schedule_start) * ramp))

    # -- connective targets and adaptive weights ---------------------------------------------------------------

    def target_matches(self, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For (B, T + 1) windows of token ids (inputs x = window[:, :-1], targets y = window[:, 1:]): which targets
        are a piece of a lexicon match (bool (B, T)), and at each target that is the first piece of one, its lexicon
        entry (int64 (B, T), -1 elsewhere). Matched over the whole window, so exact at every target column,
        including the last, which the masker's pass over x never sees; masked or not (probabilities, draws and
        chains play no part). The dense layout's matching stage on the window's device: ~20 whole-batch ops, no
        random draws, no host sync."""
        if window.dim() != 2 or window.shape[1] < 2:
            raise MaskingError(f"window must be (B, T + 1) token ids with T >= 1 (got shape {tuple(window.shape)})")
        tables = self.tables(window.device)
        V = tables.vocab_size
        ids = window.long().clamp(-1, V).remainder_(V + 1)  # invalid ids land on the neutral slot
        B, T1 = ids.shape
        column = torch.arange(T1, device=ids.device).expand(B, T1)
        word_start, entry = _word_entries(ids, tables, column)
        start = torch.where(word_start, column, 0).cummax(1).values
        piece = entry.gather(1, start) >= 0
        return piece[:, 1:], entry[:, 1:]

    def weights(self) -> torch.Tensor:
        """The per-entry weights the masker draws with now: (E,) float32 on the CPU (a copy)."""
        return self._host_tables.entry_weight.clone()

    def set_weights(self, weights: torch.Tensor) -> None:
        """Replace the per-entry weights, in place on every device's tables (a checkpoint's, on resume)."""
        weights = torch.as_tensor(weights, dtype=torch.float32).cpu()
        if weights.shape != self._host_tables.entry_weight.shape:
            raise MaskingError(f"weights must have shape {tuple(self._host_tables.entry_weight.shape)}, one per "
                               f"lexicon entry (got {tuple(weights.shape)})")
        self._host_tables.entry_weight.copy_(weights)
        for tables in self._tables.values():
            if tables.entry_weight.data_ptr() != self._host_tables.entry_weight.data_ptr():
                tables.entry_weight.copy_(weights)  # on the device, in place: the kernel reads the same tensor

    def adapt(self, correct: torch.Tensor, count: torch.Tensor) -> dict[int, tuple[float, float]]:
        """One adaptive update from per-entry counts (E,) (any device): `count` observations of each lexicon entry
        (a target that is its first piece) and `correct` of them where the model's argmax was that piece. An entry
        with at least adapt_min_count observations and accuracy below adapt_low gets weight x adapt_up, above
        adapt_high weight x adapt_down, clamped to [adapt_min_weight, adapt_max_weight]; others keep theirs.
        Returns {entry: (old weight, new weight)} for the weights that changed. One host sync (the counts are read);
        call it every few steps, then reset the counts (`genesis.train` does, every adapt_every steps)."""
        c = self.config
        if not (c.strategy == "weighted" or (c.strategy == "structural" and c.structural_weights)):
            raise MaskingError(f"adapt changes the connectives' weights, which strategy {c.strategy!r} does not read "
                               f"(use weighted, or structural with structural_weights = true)")
        correct, count = (torch.as_tensor(t).detach().to("cpu", torch.float64) for t in (correct, count))
        old = self.weights()
        if correct.shape != old.shape or count.shape != old.shape:
            raise MaskingError(f"correct and count must have shape {tuple(old.shape)}, one per lexicon entry "
                               f"(got {tuple(correct.shape)} and {tuple(count.shape)})")
        accuracy = correct / count.clamp(min=1)
        seen = count >= c.adapt_min_count
        factor = torch.ones_like(old)
        factor[seen & (accuracy < c.adapt_low)] = c.adapt_up
        factor[seen & (accuracy > c.adapt_high)] = c.adapt_down
        new = torch.where(seen, (old * factor).clamp(c.adapt_min_weight, c.adapt_max_weight), old)
        changed = (new != old).nonzero().flatten().tolist()
        if changed:
            self.set_weights(new)
        return {e: (float(old[e]), float(new[e])) for e in changed}

    def impl(self, device: torch.device | str) -> str:
        """'triton' or 'torch' for `device`, chosen once per device."""
        device = torch.device(device)
        if device not in self._impl:
            self._impl[device] = choose_impl(self.config.impl, device, self.log)
        return self._impl[device]

    def to(self, device: torch.device | str) -> ConnectiveMasker:
        """Build the tables and choose the path for `device` now, rather than on the first call."""
        self.tables(device)
        self.impl(device)
        return self

    # -- the op -----------------------------------------------------------------------------------------------

    def _validate(self, input_ids: torch.Tensor, verse_start: torch.Tensor | None) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise MaskingError(f"input_ids must be a torch.Tensor (got {type(input_ids).__name__})")
        if input_ids.dim() != 2:
            raise MaskingError(f"input_ids must be 2-D (B, T) (got shape {tuple(input_ids.shape)})")
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise MaskingError(f"input_ids must be int32 or int64 (got {input_ids.dtype})")
        if input_ids.layout != torch.strided:
            raise MaskingError(f"input_ids must be a dense (strided) tensor (got layout {input_ids.layout}); "
                               f"pass input_ids.to_dense()")
        if input_ids.device.type == "meta":
            raise MaskingError(f"input_ids is on the meta device ({input_ids.device}), which holds no token ids to "
                               f"mask; pass the batch on the device it will run on")
        if verse_start is not None:
            if not isinstance(verse_start, torch.Tensor) or verse_start.shape != input_ids.shape:
                got = tuple(verse_start.shape) if isinstance(verse_start, torch.Tensor) else type(verse_start).__name__
                raise MaskingError(f"verse_start must have the shape of input_ids {tuple(input_ids.shape)} (got {got})")
            if verse_start.dtype not in (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64):
                raise MaskingError(f"verse_start must be bool or integer (got {verse_start.dtype})")
            if verse_start.layout != torch.strided:
                raise MaskingError(f"verse_start must be a dense (strided) tensor (got layout {verse_start.layout})")
            if verse_start.device != input_ids.device:
                raise MaskingError(f"verse_start is on {verse_start.device}, input_ids on {input_ids.device}")
        if self.check_ids and input_ids.numel():
            lo, hi = (int(v) for v in torch.aminmax(input_ids))
            V = self._host_tables.vocab_size
            if lo < 0 or hi >= V:
                raise MaskingError(f"input_ids contain ids outside the vocabulary [0, {V}): min {lo}, max {hi}")

    def __call__(self, input_ids: torch.Tensor, step: int, verse_start: torch.Tensor | None = None,
                 row_offset: int = 0) -> MaskOutput:
        """Mask one batch. `step` keys the random draws (with seed, rank, row_offset + row and column); pass the
        optimizer step, and with gradient accumulation a row_offset of micro_step * micro_batch. Both are integers
        in [0, 2**32) (Python, numpy or one-element torch integers). A disabled masker returns the batch unchanged,
        nothing masked."""
        self._validate(input_ids, verse_start)
        step_and_offset = "step and row_offset"
        step = _counter_word(step, "step", range_name=step_and_offset)
        row_offset = _counter_word(row_offset, "row_offset", range_name=step_and_offset)
        if row_offset + input_ids.shape[0] > 2**32:  # the last row's counter word would wrap onto row 0's masks
            raise MaskingError(f"row_offset + rows must be <= 2**32: each row's counter word row_offset + row is in "
                               f"[0, 2**32), like rank (got row_offset={row_offset} with {input_ids.shape[0]} rows)")
        if not self.enabled:
            return MaskOutput(input_ids.clone(memory_format=torch.contiguous_format),
                              *_unmasked(*input_ids.shape, input_ids.device),
                              *_no_readout(*input_ids.shape, input_ids.device, self.config.readout))
        if verse_start is not None and verse_start.dtype != torch.bool:
            verse_start = verse_start != 0
        device = input_ids.device
        tables = self.tables(device)
        if device in self._factor:  # a schedule: the table is the configured one x the step's factor
            factor = self.schedule_factor(step)
            if factor != self._factor[device]:
                torch.mul(self._prob_base[device], factor, out=tables.prob_table)  # on the device: no host sync
                self._factor[device] = factor
        if self.impl(device) == "triton":
            try:
                from genesis.kernels.mask import connective_mask_triton

                result = connective_mask_triton(input_ids, verse_start, tables, self.seed, step, self.rank,
                                                row_offset)
            except Exception as e:
                # 'auto' means the fastest path that works: a kernel that fails to compile or launch on its first
                # call (a broken Triton install, an unsupported card) falls back, with one log line. Asked for by
                # name, or failing after it once ran, it raises.
                if requested_impl(self.config.impl) != "auto" or device in self._kernel_ran:
                    raise
                self._impl[device] = "torch"
                if self.log is not None:
                    first = (str(e).strip().splitlines() or [""])[-1][:200]
                    self.log(f"masking: the Triton kernel failed on {device} ({type(e).__name__}: {first}); "
                             f"using the torch path")
                return self(input_ids, step, verse_start, row_offset)
            self._kernel_ran.add(device)
        else:
            result = mask_torch(input_ids, verse_start, tables, self.seed, step, self.rank, row_offset,
                                ids_checked=self.check_ids)
        return MaskOutput(*result)

    def stats(self, out: MaskOutput, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Counts as 0-d device tensors (no host sync): masked tokens, masked words — a masked position starts
        a word unless it glues onto a masked piece of the same connective just before it — and matched words (the
        lexicon's words in the batch, masked or not); with chain = true also masked chains (of two or more causal
        words) and the words in them; with readout = true the readout positions written ("readout_targets") and the
        masked words without one: their position taken by a later word ("readout_shared") or past the row's end
        ("readout_dropped"), the three adding up to masked_words; for the control arm (`control_arm`) also the real
        connectives in the batch ("connective_words") and those masked ("masked_connective_words", 0 unless a control
        word is one)."""
        m, c = out.mask, out.connectives
        tables = self.tables(input_ids.device)
        ids = input_ids.long().clamp(0, tables.vocab_size)  # invalid ids are never masked; any slot will do
        glued = _take(tables.glue_left, ids[:, 1:]) & _take(tables.word_end, ids[:, :-1])
        word_start = m.clone()
        word_start[:, 1:] &= ~(m[:, :-1] & (c[:, 1:] == c[:, :-1]) & glued)
        # a match never glues onto the token before it (lexicon.find_matches): its unglued pieces are its starts
        glued_before = torch.zeros_like(m)
        glued_before[:, 1:] = glued
        counts = {"masked_tokens": m.sum(), "masked_words": word_start.sum(),
                  "matched_words": (out.matched & ~glued_before).sum()}
        if tables.chain:  # masked causal words within chain_gap of each other: one chain (all-or-nothing)
            causal = word_start & (out.classes == tables.chain_class)
            B, T = m.shape
            column = torch.arange(T, device=m.device).expand(B, T)
            far = 2 * T + tables.chain_gap
            before = _shift_right(torch.where(causal, column, -far).cummax(1).values, -far)
            after = torch.where(causal, column, far).flip(1).cummin(1).values.flip(1)
            after = torch.nn.functional.pad(after[:, 1:], (0, 1), value=far)
            linked_before = causal & (column - before <= tables.chain_gap)
            linked_after = causal & (after - column <= tables.chain_gap)
            counts["masked_chains"] = (linked_after & ~linked_before).sum()
            counts["masked_chain_words"] = (linked_before | linked_after).sum()
        if out.readout is not None:  # every masked word is exactly one of: a target, shared (lost), dropped
            written = out.readout != IGNORE_INDEX
            continues = torch.zeros_like(m)
            continues[:, :-1] = m[:, 1:] & (c[:, 1:] == c[:, :-1]) & glued
            column = torch.arange(m.shape[1], device=m.device)
            # the words without a target are those ending after the row's last target minus one (any earlier word
            # has a readout position at or before that target, docs/masking.md#readout-targets)
            last_target = torch.nn.functional.pad(torch.where(written, column, -1), (1, 0), value=-1).amax(1)
            dropped = (m & ~continues & (column >= last_target.unsqueeze(1) - 1)).sum()
            counts["readout_targets"] = written.sum()
            counts["readout_dropped"] = dropped
            counts["readout_shared"] = counts["masked_words"] - counts["readout_targets"] - dropped
        if self.reference_lexicon is not None:
            starts = self._reference_starts(ids)
            counts["connective_words"] = starts.sum()
            counts["masked_connective_words"] = (starts & m).sum()
        return counts

    def _reference_starts(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: where a word of `reference_lexicon` (the real connectives) starts, by the dense matcher."""
        device = ids.device
        if device not in self._reference_tables:
            cfg = dataclasses.replace(self.config, strategy="uniform", default_connectives=True, connectives={})
            self._reference_tables[device] = build_tables(self.reference_lexicon, cfg, self.mask_id).to(device)
        B, T = ids.shape
        word_start, entry = _word_entries(ids, self._reference_tables[device],
                                          torch.arange(T, device=device).expand(B, T))
        return word_start & (entry >= 0)

    # -- reporting --------------------------------------------------------------------------------------------

    def report(self, tokens: Any = None) -> str:
        """What each connective word resolved to in this tokenizer, and what did not resolve; with chain = true and
        a token stream `tokens` (e.g. the training split's ids), also its chains (see `chain_statistics`)."""
        report = self.lexicon.report()
        if self.config.chain and tokens is not None:
            stats = self.chain_statistics(tokens)
            per_million = 1e6 / max(1, stats["tokens"])
            histogram = stats["histogram"]
            lengths = ", ".join([f"{n}: {count}" for n, count in histogram.items() if n < 10]
                                + [f"10+: {sum(count for n, count in histogram.items() if n >= 10)}"])
            report += (f"\nchains (chain_gap {self.config.chain_gap}) in {stats['tokens']:,} tokens: "
                       f"{stats['chains']} chains ({stats['chains'] * per_million:.0f} per 1M tokens), "
                       f"{stats['members']} members ({stats['members'] * per_million:.0f} per 1M) of "
                       f"{stats['causal']} causal matches; chains by members: {lengths}")
        if not self.enabled:
            return ("masking is disabled (enabled = false): the masker returns its inputs unchanged; the words "
                    "below would be masked with it enabled\n" + report)
        return report

    def chain_statistics(self, tokens: Any) -> dict[str, Any]:
        """The chains of a token stream (1-D ids, e.g. the training split's, read as one row), found with this
        masker's matcher and chain_gap: {"tokens", "causal" (causal matches), "chains", "members" (matches in a
        chain, heads included), "histogram" ({members: chains}, by length)}."""
        if isinstance(tokens, torch.Tensor):
            ids = tokens.detach().to("cpu", torch.int64).reshape(1, -1)
        else:
            ids = torch.from_numpy(np.array(tokens, dtype=np.int64)).view(1, -1)  # a copy: memmaps are read-only
        every = dataclasses.replace(self._host_tables, prob_table=torch.ones_like(self._host_tables.prob_table),
                                    use_cells=False, use_weight=False, bert=False, chain=False,
                                    readout=False)
        _, _, _, entry, matched = mask_torch(ids, None, every, 0, 0, layout="sparse")  # p = 1: every match
        entry, matched, ids, h = entry.view(-1).numpy(), matched.view(-1).numpy(), ids.view(-1).numpy(), every.host()
        # a match starts at a matched piece that does not continue a word of the same entry
        continues = np.zeros_like(matched)
        continues[1:] = h.glue_left[ids[1:]] & h.word_end[ids[:-1]] & matched[:-1] & (entry[1:] == entry[:-1])
        starts = (matched & ~continues).nonzero()[0]
        causal = starts[h.entry_class[entry[starts]] == every.chain_class]
        linked = np.append(np.diff(causal) <= self.config.chain_gap, False)  # each causal match to the next
        run_lengths = np.diff(np.flatnonzero(~linked), prepend=-1) if len(causal) else np.zeros(0, dtype=np.int64)
        chain_lengths = run_lengths[run_lengths > 1]
        lengths, counts = np.unique(chain_lengths, return_counts=True)
        return {"tokens": ids.size, "causal": len(causal), "chains": len(chain_lengths),
                "members": int(chain_lengths.sum()), "histogram": dict(zip(lengths.tolist(), counts.tolist()))}

    def describe(self) -> str:
        c, lex = self.config, self.lexicon
        n_patterns = len(lex.pattern_len)
        if c.strategy == "uniform":
            rule = f"p={c.mask_prob}"
        elif c.strategy == "random":
            rule = f"control words at p={c.mask_prob:.4f}, {c.control_reference}'s rate"
        elif c.strategy == "weighted":
            rule = f"p={c.base_probability} x weight"
        else:
            rule = f"{len(c.rules)} rules" + (" x weight" if c.structural_weights else "")
        if c.chain:
            rule += f", causal chains (gap {c.chain_gap})"
        if c.adaptive:
            rule += f", adaptive weights in [{c.adapt_min_weight:g}, {c.adapt_max_weight:g}]"
        if c.schedule == "plateau":
            rule += (f", 0 until the loss plateaus (EMA gains < {c.plateau_delta:g} over {c.plateau_window} steps), "
                     f"then a ramp {c.schedule_start:g} -> 1 over {c.schedule_steps} steps")
        elif c.schedule != "constant":
            rule += f", x {c.schedule} ramp {c.schedule_start:g} -> 1 over {c.schedule_steps} steps"
        unresolved = f" | unresolved: {', '.join(lex.unresolved)}" if lex.unresolved else ""
        disabled = "" if self.enabled else "disabled (enabled = false): inputs pass through unchanged | configured: "
        kind = "control words" if c.strategy == "random" else "connectives"
        return (f"masking: {disabled}{c.strategy} ({rule}) | {len(lex.words)} {kind} -> {n_patterns} token "
                f"patterns{unresolved} | replacement {c.replacement} | "
                f"seed {self.seed} | classes {', '.join(CLASSES)}")
