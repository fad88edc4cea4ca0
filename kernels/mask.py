"""The fused connective-masking kernel (Triton) and its launcher.

One program handles BLOCK positions of one row. Every position finds the lexicon match that covers it (its word
starts at most MAX_PIECES-1 tokens earlier), evaluates the rules at the match's start (verse-initial flag, clause
length by a bounded backward scan, probability from the rule table times the optional weight), draws the start's
Philox numbers and writes the masked token, the mask flag, the class and the connective index. No position
depends on another position's output, so the result is independent of BLOCK and of the launch grid, and it equals
`genesis.masking.mask_torch` bit for bit (tests compare them with `torch.equal` under TRITON_INTERPRET=1).

Bytes per token: read ids (4 or 8) and verse_start (1, optional); write ids, mask (1), class (8) and connective
(8): 22-34 B/token. The tables (a few KB per vocab array) stay in L1/L2.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

# Token flag bits of `token_flags` (see genesis.masking.MaskTables).
GLUE_LEFT = 1
WORD_END = 2
CLAUSE_BOUNDARY = 4
VERSE_SEPARATOR = 8
IGNORE_INDEX = -100
UNIFORM_SCALE = 4.6566127342e-10  # tl.rand's int32 -> [0, 1) scale


@triton.jit
def _attach(x_row, pos, T, V, token_flags, valid):
    """True where token `pos` glues onto token `pos-1` as part of one word (0 outside the row)."""
    ok = valid & (pos > 0) & (pos < T)
    cur = tl.load(x_row + pos, mask=ok, other=-1).to(tl.int64)
    prev = tl.load(x_row + pos - 1, mask=ok, other=-1).to(tl.int64)
    cur_ok = ok & (cur >= 0) & (cur < V)
    prev_ok = ok & (prev >= 0) & (prev < V)
    glue = tl.load(token_flags + cur, mask=cur_ok, other=0).to(tl.int32) & 1
    wend = tl.load(token_flags + prev, mask=prev_ok, other=0).to(tl.int32) & 2
    return cur_ok & prev_ok & (glue != 0) & (wend != 0)


@triton.jit
def _uniform(word):
    """uint32 -> float32 in [0, 1), exactly as tl.rand does it."""
    w = word.to(tl.int32, bitcast=True)
    w = tl.where(w < 0, -w - 1, w)
    return w.to(tl.float32) * 4.6566127342e-10


@triton.jit
def _connective_mask_kernel(
    # pointers: the batch
    x_ptr, verse_start_ptr, out_ptr, mask_ptr, class_ptr, connective_ptr,
    # pointers: tables
    token_flags, first_pattern, pattern_count, patterns, pattern_len, pattern_entry,
    entry_weight, entry_class, prob_table, random_pool,
    # sizes and strides
    T, V, n_random, stride_x, stride_vs, stride_out,
    # scalars: rng key and counters, replacement
    seed, step, rank, row_offset, mask_id, p_mask, p_mask_or_random,
    # meta-parameters
    HAS_VERSE_START: tl.constexpr, USE_CELLS: tl.constexpr, PRECEDING_CLAUSE: tl.constexpr,
    USE_WEIGHT: tl.constexpr, BERT: tl.constexpr,
    MAX_PIECES: tl.constexpr, MAX_PER_TOKEN: tl.constexpr, LOOKBACK: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    in_row = offs < T
    x_row = x_ptr + row.to(tl.int64) * stride_x
    x_here = tl.load(x_row + offs, mask=in_row, other=0)

    # 1. Which match covers this position? Pieces inside a pattern always glue onto each other (the lexicon
    #    guarantees it), so the only start that can cover this position is the nearest position at or before it
    #    that does not glue onto its left neighbour: walk back at most MAX_PIECES-1 glued tokens, then try the
    #    patterns of the token there. (At most one pattern can match at a start.)
    start = offs
    glued = _attach(x_row, start, T, V, token_flags, in_row)
    for _ in tl.static_range(MAX_PIECES - 1):
        start = tl.where(glued, start - 1, start)
        glued = glued & _attach(x_row, start, T, V, token_flags, glued)
    piece = offs - start  # index of this position inside a match starting at `start`
    tok = tl.load(x_row + start, mask=in_row & ~glued, other=-1).to(tl.int64)
    ok = in_row & ~glued & (tok >= 0) & (tok < V)
    first = tl.load(first_pattern + tok, mask=ok, other=-1)
    count = tl.load(pattern_count + tok, mask=ok, other=0)
    ok = ok & (first >= 0)
    covered = offs < 0
    entry = offs * 0
    for q in tl.static_range(MAX_PER_TOKEN):
        p = first + q
        live = ok & (q < count) & ~covered
        plen = tl.load(pattern_len + p, mask=live, other=0)
        live = live & (plen > piece) & (start + plen <= T)
        for r in tl.static_range(MAX_PIECES):
            need = live & (r < plen)
            want = tl.load(patterns + p * MAX_PIECES + r, mask=need, other=0).to(tl.int64)
            have = tl.load(x_row + start + r, mask=need, other=-1).to(tl.int64)
            live = live & ((r >= plen) | (want == have))
        live = live & ~_attach(x_row, start + plen, T, V, token_flags, live)
        covered = covered | live
        entry = tl.where(live, tl.load(pattern_entry + p, mask=live, other=0), entry)

    # 2. The rules, evaluated at the match start (only where the table varies over its cells: structural).
    if USE_CELLS:
        if HAS_VERSE_START:
            vs = tl.load(verse_start_ptr + row.to(tl.int64) * stride_vs + start, mask=covered, other=0)
            verse_initial = covered & (vs != 0)
        else:
            prev = tl.load(x_row + start - 1, mask=covered & (start > 0), other=-1).to(tl.int64)
            prev_ok = (prev >= 0) & (prev < V)
            sep = tl.load(token_flags + prev, mask=covered & prev_ok, other=0).to(tl.int32) & 8
            verse_initial = covered & (sep != 0)
        if PRECEDING_CLAUSE:
            # skip the boundary/separator run just before the start, then count the clause before it
            end = start - 1
            skipping = covered
            for r in tl.static_range(1, LOOKBACK + 1):
                pos = start - r
                look = skipping & (pos >= 0)
                tok = tl.load(x_row + pos, mask=look, other=-1).to(tl.int64)
                look = look & (tok >= 0) & (tok < V)
                stop = (tl.load(token_flags + tok, mask=look, other=0).to(tl.int32) & 12) != 0
                end = tl.where(skipping & ~stop, pos, end)
                skipping = skipping & stop
            counting = covered & ~skipping & (end >= 0)
            clause_len = start * 0
            for r in tl.static_range(LOOKBACK):
                pos = end - r
                look = counting & (pos >= 0)
                tok = tl.load(x_row + pos, mask=look, other=-1).to(tl.int64)
                valid = look & (tok >= 0) & (tok < V)
                stop = (tl.load(token_flags + tok, mask=valid, other=0).to(tl.int32) & 12) != 0
                counting = look & ~stop
                clause_len = clause_len + counting.to(tl.int32)
        else:
            # distance back to the nearest clause-boundary token, the row start counting as one, capped
            clause_len = tl.minimum(start + 1, LOOKBACK)
            searching = covered
            for r in tl.static_range(1, LOOKBACK):
                pos = start - r
                look = searching & (pos >= 0)
                tok = tl.load(x_row + pos, mask=look, other=-1).to(tl.int64)
                look = look & (tok >= 0) & (tok < V)
                boundary = (tl.load(token_flags + tok, mask=look, other=0).to(tl.int32) & 4) != 0
                found = look & boundary
                clause_len = tl.where(found, r, clause_len)
                searching = searching & ~found
        cell = verse_initial.to(tl.int32) * (LOOKBACK + 1) + clause_len
        prob = tl.load(prob_table + cell, mask=covered, other=0.0)
    else:
        prob = tl.load(prob_table + 1 + offs * 0, mask=covered, other=0.0)
    if USE_WEIGHT:
        prob = prob * tl.load(entry_weight + entry, mask=covered, other=0.0)
    prob = tl.minimum(tl.maximum(prob, 0.0), 1.0)

    # 3. One Philox draw per match, keyed by (seed; start column, row, step, rank).
    # (scalar arguments equal to 1 arrive as constexprs; adding them to an int64 block works for both kinds)
    zero = tl.zeros([BLOCK], dtype=tl.int64)
    row_id = (zero + row + row_offset).to(tl.uint32)
    step_id = (zero + step).to(tl.uint32)
    rank_id = (zero + rank).to(tl.uint32)
    w0, w1, _, _ = tl.philox(seed, start.to(tl.uint32), row_id, step_id, rank_id)
    selected = covered & (_uniform(w0) < prob)

    # 4. Replacement.
    out = x_here
    if BERT:
        choice = _uniform(w1)
        # the random token of each piece comes from the draw at the piece's own position
        _, _, w2, _ = tl.philox(seed, offs.to(tl.uint32), row_id, step_id, rank_id)
        pick = (w2.to(tl.int64) % n_random).to(tl.int64)
        random_tok = tl.load(random_pool + pick, mask=selected, other=0)
        out = tl.where(selected & (choice >= p_mask) & (choice < p_mask_or_random), random_tok.to(out.dtype), out)
        out = tl.where(selected & (choice < p_mask), mask_id, out)
    else:
        out = tl.where(selected, mask_id, out)
    cls = tl.load(entry_class + entry, mask=selected, other=0).to(tl.int64)

    out_off = row.to(tl.int64) * stride_out + offs
    tl.store(out_ptr + out_off, out, mask=in_row)
    tl.store(mask_ptr + out_off, selected.to(tl.int8), mask=in_row)
    tl.store(class_ptr + out_off, tl.where(selected, cls, IGNORE_INDEX), mask=in_row)
    tl.store(connective_ptr + out_off, tl.where(selected, entry.to(tl.int64), IGNORE_INDEX), mask=in_row)


def connective_mask_triton(input_ids: torch.Tensor, verse_start: torch.Tensor | None, tables, seed: int, step: int,
                           rank: int = 0, row_offset: int = 0, block: int = 256):
    """Launch the fused kernel.

    input_ids: (B, T) int32 or int64, contiguous rows; verse_start: (B, T) bool/uint8 or None; tables: a
    `genesis.masking.MaskTables` on the same device. Returns (input_ids masked copy, mask bool, classes int64,
    connectives int64), all (B, T); classes and connectives hold -100 where nothing is masked.
    """
    B, T = input_ids.shape
    out = torch.empty_like(input_ids)
    mask = torch.empty((B, T), dtype=torch.bool, device=input_ids.device)
    classes = torch.empty((B, T), dtype=torch.int64, device=input_ids.device)
    connectives = torch.empty((B, T), dtype=torch.int64, device=input_ids.device)
    if B == 0 or T == 0:
        return out, mask, classes, connectives
    # rows may be strided (a (B, T) view of (B, T+1) windows): only the columns must be contiguous
    x = input_ids if input_ids.stride(1) == 1 else input_ids.contiguous()
    if verse_start is None:
        vs = x  # an unused placeholder pointer
    else:
        vs = verse_start if verse_start.stride(1) == 1 else verse_start.contiguous()
        vs = vs.view(torch.uint8)
    grid = (triton.cdiv(T, block), B)
    _connective_mask_kernel[grid](
        x, vs, out, mask.view(torch.int8), classes, connectives,
        tables.token_flags, tables.first_pattern, tables.pattern_count, tables.patterns, tables.pattern_len,
        tables.pattern_entry, tables.entry_weight, tables.entry_class, tables.prob_table, tables.random_pool,
        T, tables.vocab_size, tables.random_pool.numel(), x.stride(0), vs.stride(0), out.stride(0),
        seed, step, rank, row_offset, tables.mask_id, tables.p_mask, tables.p_mask_or_random,
        HAS_VERSE_START=verse_start is not None, USE_CELLS=tables.use_cells,
        PRECEDING_CLAUSE=tables.preceding_clause, USE_WEIGHT=tables.use_weight,
        BERT=tables.bert,
        MAX_PIECES=tables.max_pieces, MAX_PER_TOKEN=tables.max_per_token, LOOKBACK=tables.lookback, BLOCK=block,
    )
    return out, mask, classes, connectives
