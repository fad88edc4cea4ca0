"""The masker's tables: the lexicon resolved against a tokenizer and the [masking] rules, as tensors on one device.

`build_tables` turns a `ResolvedLexicon` and a `MaskingConfig` into the `MaskTables` both the torch path and the
Triton kernel read; `compile_prob_table` turns the strategy's rules into the per-cell probability table.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from genesis.config import DEFAULT_CHAIN_GAP, MaskingConfig
from genesis.flags import CLAUSE_BOUNDARY, GLUE_LEFT, VERSE_SEPARATOR, WORD_END
from genesis.lexicon import CLASSES, DEFAULT_CONNECTIVES, ResolvedLexicon, resolve
from genesis.masking.errors import MaskingError

SCAN_START, SCAN_STOP = 1, 2  # scan_code bits (the sparse torch path)


def connectives_of(cfg: MaskingConfig) -> dict[str, tuple[float, str]]:
    """The lexicon a [masking] config describes: word -> (weight, class)."""
    connectives: dict[str, tuple[float, str]] = dict(DEFAULT_CONNECTIVES) if cfg.default_connectives else {}
    for word, entry in cfg.connectives.items():
        connectives[word.lower()] = (entry.weight, entry.cls)
    return connectives


def resolve_lexicon(tokenizer: Any, cfg: MaskingConfig) -> ResolvedLexicon:
    """The [masking] config's lexicon resolved against `tokenizer`, as the masker resolves it."""
    return resolve(tokenizer, connectives_of(cfg), clause_punctuation=cfg.clause_punctuation,
                   verse_separator=cfg.verse_separator)



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

