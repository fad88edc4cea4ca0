"""Version 2 of the connective-masking kernel, parked here until a GPU has timed it against version 1.

Each program scans one window of tokens instead of gathering a look-around tile per position; the results equal
version 1's and the torch path's bit for bit (tests/test_masking.py compares them under TRITON_INTERPRET=1), and
bench/mask_throughput.py times both on a GPU. It shares version 1's helpers, launcher and readout pass
(`genesis.kernels.mask`); version 1 does not know this module. How it works: docs/masking.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from genesis.kernels.mask import (
    CLAUSE_BOUNDARY,
    DEFAULT_BLOCK,
    GLUE_LEFT,
    IGNORE_INDEX,
    READOUT_BLOCK,
    STOP,
    VERSE_SEPARATOR,
    WORD_END,
    _chain,
    _compile,
    _empty_outputs,
    _flags_of,
    _launch_arguments,
    _match_probability,
    _max,
    _philox_at,
    _uniform,
    run_masking,
)


@triton.jit
def _min(a, b):
    return tl.minimum(a, b)


@triton.jit
def _max_pair(a0, a1, b0, b1):
    return tl.maximum(a0, b0), tl.maximum(a1, b1)


@triton.jit
def _connective_mask_kernel_v2(
    # pointers: the batch
    x_ptr, verse_start_ptr, out_ptr, mask_ptr, class_ptr, connective_ptr, matched_ptr,
    # pointers: tables
    token_flags, first_pattern, pattern_count, patterns, pattern_len, pattern_entry, single_entry, starts_multi,
    entry_weight, entry_class, prob_table, random_pool,
    # sizes and strides
    T, V, n_random, stride_x, stride_vs, stride_out,
    # scalars: rng key and counters, replacement
    seed, step, rank, row_offset, mask_id, p_mask, p_mask_or_random,
    # meta-parameters
    HAS_VERSE_START: tl.constexpr, USE_CELLS: tl.constexpr, PRECEDING_CLAUSE: tl.constexpr,
    USE_WEIGHT: tl.constexpr, BERT: tl.constexpr, HAS_MULTI: tl.constexpr,
    MAX_PIECES: tl.constexpr, MAX_PER_TOKEN: tl.constexpr, LOOKBACK: tl.constexpr, PIECES_P2: tl.constexpr,
    WINDOW: tl.constexpr, HALO_LEFT: tl.constexpr, BLOCK_OUT: tl.constexpr,
    CHAIN: tl.constexpr, CHAIN_GAP: tl.constexpr, CHAIN_CLASS: tl.constexpr,
):
    """Each program writes BLOCK_OUT columns of one row from one WINDOW of tokens around them (HALO_LEFT before:
    a word start up to MAX_PIECES-1 back, then its clause up to 2 x LOOKBACK back; MAX_PIECES after: the rest of
    the word). The token ids of the window and of its shifts by -2, -1 and +1 are loaded once (coalesced), and
    every look-around of version 1 becomes a scan over the window:
      word starts      the next start after j (reverse min-scan) gives the run length of the word at a start;
      clause, preceding  end = the last non-stop before s; before = the last stop k <= s-2 followed by a non-stop
                       (= the last stop before `end`): two max-scans;
      since_boundary   the last boundary before s: one max-scan;
      pieces           a word's decision (selected, entry, BERT choice) reaches its pieces by a max-scan of
                       (start index << 40 | decision) over the word starts.
    Longer patterns need the tokens after a start (a (WINDOW, PIECES_P2) tile): loaded only in blocks that hold a
    candidate for one (a handful per 64k KJV tokens). Same results as version 1 and the torch path, bit for bit.
    With CHAIN one program walks the row's windows in order, carrying the chain state as version 1 does."""
    row = tl.program_id(1)
    if CHAIN:
        first_block = 0
        n_blocks = tl.cdiv(T, BLOCK_OUT)
    else:
        first_block = tl.program_id(0)
        n_blocks = 1
    chain_last = tl.full([], -1, tl.int64)
    chain_head = tl.full([], -1, tl.int64)
    for block_index in range(0, n_blocks):
        chain_last, chain_head = _mask_window(
            x_ptr, verse_start_ptr, out_ptr, mask_ptr, class_ptr, connective_ptr, matched_ptr,
            token_flags, first_pattern, pattern_count, patterns, pattern_len, pattern_entry, single_entry,
            starts_multi, entry_weight, entry_class, prob_table, random_pool,
            T, V, n_random, stride_x, stride_vs, stride_out,
            seed, step, rank, row_offset, mask_id, p_mask, p_mask_or_random,
            row, first_block + block_index, chain_last, chain_head,
            HAS_VERSE_START, USE_CELLS, PRECEDING_CLAUSE, USE_WEIGHT, BERT, HAS_MULTI,
            MAX_PIECES, MAX_PER_TOKEN, LOOKBACK, PIECES_P2, WINDOW, HALO_LEFT, BLOCK_OUT, CHAIN, CHAIN_GAP,
            CHAIN_CLASS)


@triton.jit
def _mask_window(
    x_ptr, verse_start_ptr, out_ptr, mask_ptr, class_ptr, connective_ptr, matched_ptr,
    token_flags, first_pattern, pattern_count, patterns, pattern_len, pattern_entry, single_entry, starts_multi,
    entry_weight, entry_class, prob_table, random_pool,
    T, V, n_random, stride_x, stride_vs, stride_out,
    seed, step, rank, row_offset, mask_id, p_mask, p_mask_or_random,
    row, block_index, chain_last, chain_head,
    HAS_VERSE_START: tl.constexpr, USE_CELLS: tl.constexpr, PRECEDING_CLAUSE: tl.constexpr,
    USE_WEIGHT: tl.constexpr, BERT: tl.constexpr, HAS_MULTI: tl.constexpr,
    MAX_PIECES: tl.constexpr, MAX_PER_TOKEN: tl.constexpr, LOOKBACK: tl.constexpr, PIECES_P2: tl.constexpr,
    WINDOW: tl.constexpr, HALO_LEFT: tl.constexpr, BLOCK_OUT: tl.constexpr,
    CHAIN: tl.constexpr, CHAIN_GAP: tl.constexpr, CHAIN_CLASS: tl.constexpr,
):
    """Version 2's work on the BLOCK_OUT output columns of one window; returns the carried chain state, updated
    with the matches that start in those columns (the halo's were counted by the windows before)."""
    c0 = block_index * BLOCK_OUT
    w0 = c0 - HALO_LEFT  # column of window index 0 (may be negative: before the row)
    idx = tl.arange(0, WINDOW)
    col = w0 + idx
    in_row = (col >= 0) & (col < T)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    x_raw = tl.load(x_row + col, mask=in_row, other=0)
    tok = tl.where(in_row, x_raw.to(tl.int64), -1)
    prev_ok = in_row & (col >= 1)
    tok_m1 = tl.load(x_row + col - 1, mask=prev_ok, other=-1).to(tl.int64)
    tok_m2 = tl.load(x_row + col - 2, mask=in_row & (col >= 2), other=-1).to(tl.int64)
    next_ok = (col >= -1) & (col + 1 < T)
    tok_p1 = tl.load(x_row + col + 1, mask=next_ok, other=-1).to(tl.int64)
    f0 = _flags_of(tok, V, token_flags, in_row)
    f_m1 = _flags_of(tok_m1, V, token_flags, prev_ok)
    f_m2 = _flags_of(tok_m2, V, token_flags, in_row & (col >= 2))
    f_p1 = _flags_of(tok_p1, V, token_flags, next_ok)

    # 1. words: a start does not glue onto its left neighbour; its run ends where the next start is
    glued = prev_ok & ((f0 & GLUE_LEFT) != 0) & ((f_m1 & WORD_END) != 0)
    next_glues = next_ok & ((f_p1 & GLUE_LEFT) != 0) & ((f0 & WORD_END) != 0)
    word_start = in_row & ~glued
    next_start = tl.associative_scan(tl.where(next_glues, 2 * WINDOW, idx + 1), 0, _min, reverse=True)
    run = next_start - idx  # tokens of the word starting here (> WINDOW: it runs past the window)
    tok_ok = word_start & (tok >= 0) & (tok < V)
    single = tl.load(single_entry + tok, mask=tok_ok & (run == 1), other=-1)
    entry = tl.where(tok_ok & (run == 1), single, -1)
    if HAS_MULTI:
        multi = tok_ok & (run >= 2) & (run <= MAX_PIECES)
        multi = multi & (tl.load(starts_multi + tok, mask=multi, other=0) != 0)
        if tl.max(multi.to(tl.int32), axis=0) > 0:  # rare: compare the tokens after the start with the patterns
            r_p = tl.arange(0, PIECES_P2)
            ahead = col[:, None] + r_p[None, :]
            have = tl.load(x_row + ahead, mask=multi[:, None] & (r_p[None, :] < run[:, None]) & (ahead < T),
                           other=-1).to(tl.int64)
            first = tl.load(first_pattern + tok, mask=multi, other=0)
            count = tl.load(pattern_count + tok, mask=multi, other=0)
            for q in range(MAX_PER_TOKEN):  # the first pattern in order that matches (at most one can)
                p = first + q
                live = multi & (q < count) & (entry < 0)
                plen = tl.load(pattern_len + p, mask=live, other=0)
                live = live & (plen == run)
                need = live[:, None] & (r_p[None, :] < plen[:, None])
                want = tl.load(patterns + p[:, None] * MAX_PIECES + r_p[None, :], mask=need, other=0).to(tl.int64)
                live = live & (tl.max((need & (want != have)).to(tl.int32), axis=1) == 0)
                entry = tl.where(live, tl.load(pattern_entry + p, mask=live, other=0).to(tl.int64), entry)
    matched = entry >= 0

    # 2. the rules at each match start (only where the table varies over its cells: structural)
    floor = tl.maximum(w0, 0) - 1  # "nothing found in the window": the row start, or far enough back to cap
    if USE_CELLS:
        if HAS_VERSE_START:
            vs = tl.load(verse_start_ptr + row.to(tl.int64) * stride_vs + col, mask=matched, other=0)
            verse_initial = matched & (vs != 0)
        else:
            verse_initial = matched & ((f_m1 & VERSE_SEPARATOR) != 0)
        if PRECEDING_CLAUSE:
            stop_m1 = (f_m1 & STOP) != 0
            stop_m2 = (f_m2 & STOP) != 0
            nonstop_before = tl.where(prev_ok & ~stop_m1, idx - 1, -1)
            stop_run_end = tl.where((col >= 2) & stop_m2 & ~stop_m1, idx - 2, -1)
            last_nonstop, last_run_end = tl.associative_scan((nonstop_before, stop_run_end), 0, _max_pair)
            end = tl.where(last_nonstop >= 0, w0 + last_nonstop, -1)  # last token of the preceding clause
            before = tl.where(last_run_end >= 0, w0 + last_run_end, floor)  # the stop before that clause
            counted = (end >= 0) & (col - 1 - end < LOOKBACK)
            clause_len = tl.where(counted, tl.minimum(end - before, LOOKBACK), 0)
        else:
            boundary_before = tl.where(prev_ok & ((f_m1 & CLAUSE_BOUNDARY) != 0), idx - 1, -1)
            last_boundary = tl.associative_scan(boundary_before, 0, _max)
            last_boundary = tl.where(last_boundary >= 0, w0 + last_boundary, floor)
            clause_len = tl.minimum(col - last_boundary, LOOKBACK)
        cell = verse_initial.to(tl.int32) * (LOOKBACK + 1) + clause_len
    else:
        cell = 1 + idx * 0
    prob = _match_probability(prob_table, entry_weight, cell, entry, matched, USE_WEIGHT)

    # 3. Philox at every window position, keyed by (seed; column, row, step, rank): word 0 decides at a start,
    #    word 1 picks its BERT replacement, word 2 is each piece's random token
    r0, r1, r2, _ = _philox_at(seed, col, row, row_offset, step, rank)
    selected = matched & (_uniform(r0) < prob)
    write = (idx >= HALO_LEFT) & (idx < HALO_LEFT + BLOCK_OUT) & (col < T)
    if CHAIN:  # only starts in the output columns enter the scans; a start in the halo takes the carried head
        chains = matched & (tl.load(entry_class + entry, mask=matched, other=-1) == CHAIN_CLASS)
        chain_start = tl.where(chains & write, col.to(tl.int64), -1)
        selected, chain_last, chain_head = _chain(chains, chain_start, col.to(tl.int64), selected, chain_last,
                                                  chain_head, CHAIN_GAP)
    decision = selected.to(tl.int64) << 39 | matched.to(tl.int64) << 36 | tl.where(matched, entry, 0)
    if BERT:
        choice = _uniform(r1)
        code = tl.where(choice < p_mask, 0, tl.where(choice < p_mask_or_random, 1, 2)).to(tl.int64)
        decision = decision | code << 37

    # 4. every piece takes its word's decision: the latest word start at or before it
    carried = tl.associative_scan(tl.where(word_start, idx.to(tl.int64) << 40 | decision, -1), 0, _max)
    picked = (carried >= 0) & ((carried >> 39 & 1) != 0)
    in_match = (carried >= 0) & ((carried >> 36 & 1) != 0)
    word_entry = carried & ((1 << 36) - 1)
    out = x_raw
    if BERT:
        code = carried >> 37 & 3
        pick = (r2.to(tl.int64) % n_random).to(tl.int64)
        random_tok = tl.load(random_pool + pick, mask=picked & (code == 1), other=0)
        out = tl.where(picked & (code == 1), random_tok.to(out.dtype), out)
        out = tl.where(picked & (code == 0), mask_id, out)
    else:
        out = tl.where(picked, mask_id, out)
    cls = tl.load(entry_class + word_entry, mask=picked, other=0).to(tl.int64)

    out_off = row.to(tl.int64) * stride_out + col
    tl.store(out_ptr + out_off, out, mask=write)
    tl.store(mask_ptr + out_off, picked.to(tl.int8), mask=write)
    tl.store(class_ptr + out_off, tl.where(picked, cls, IGNORE_INDEX), mask=write)
    tl.store(connective_ptr + out_off, tl.where(picked, word_entry, IGNORE_INDEX), mask=write)
    tl.store(matched_ptr + out_off, in_match.to(tl.int8), mask=write)
    return chain_last, chain_head


def window_geometry(tables, window: int | None = None) -> tuple[int, int, int]:
    """(WINDOW, HALO_LEFT, BLOCK_OUT) of version 2 for these tables: the halo covers a word start MAX_PIECES-1
    back and its clause 2 x LOOKBACK further; the default window is the smallest power of two >= 256 that leaves
    at least half of it for output columns (256 -> 168 outputs for the default lookback 30 and 14 pieces)."""
    halo_left = 2 * tables.lookback + tables.max_pieces
    halo_right = tables.max_pieces
    if window is None:
        window = max(256, triton.next_power_of_2(2 * (halo_left + halo_right)))
    if window & (window - 1) or window - halo_left - halo_right < 1:
        raise ValueError(f"window must be a power of two larger than {halo_left + halo_right} (got {window})")
    return window, halo_left, window - halo_left - halo_right


def connective_mask_triton_v2(input_ids: torch.Tensor, verse_start: torch.Tensor | None, tables, seed: int,
                              step: int, rank: int = 0, row_offset: int = 0, window: int | None = None,
                              readout_block: int = READOUT_BLOCK):
    """`genesis.kernels.mask.connective_mask_triton` with the version 2 kernel, one window of `window` tokens per
    program (see `window_geometry`): the same arguments and outputs, identical results."""
    return run_masking(lambda outputs: _launch_v2(input_ids, verse_start, outputs, tables, seed, step, rank,
                                                  row_offset, window),
                       input_ids, verse_start, tables, readout_block)


def _launch_v2(input_ids, verse_start, outputs, tables, seed, step, rank, row_offset, window):
    """(kernel, positional arguments, meta-parameters, output columns per program, launch options) of a launch."""
    args, meta = _launch_arguments(input_ids, verse_start, outputs, tables, seed, step, rank, row_offset,
                                   DEFAULT_BLOCK)
    width, halo_left, block_out = window_geometry(tables, window)
    # version 2 reads two more tables (after pattern_entry) and has no BLOCK / LOOK_P2
    args = args[:13] + (tables.single_entry, tables.starts_multi.view(torch.uint8)) + args[13:]
    meta = {k: v for k, v in meta.items() if k not in ("BLOCK", "LOOK_P2")}
    meta.update(HAS_MULTI=tables.max_pieces > 1, WINDOW=width, HALO_LEFT=halo_left, BLOCK_OUT=block_out)
    # one window position per thread (bench/RESULTS.md has the register counts)
    return _connective_mask_kernel_v2, args, meta, block_out, {"num_warps": min(32, width // 32)}


def compile_v2_for(capability: int, input_ids: torch.Tensor, verse_start: torch.Tensor | None, tables,
                   window: int | None = None):
    """`genesis.kernels.mask.compile_for` for the version 2 kernel."""
    kernel, args, meta, _, options = _launch_v2(input_ids, verse_start, _empty_outputs(input_ids), tables, 0, 0, 0,
                                                0, window)
    return _compile(capability, kernel, args, meta, options)
