"""The fused connective-masking kernel (Triton) and its launcher.

One program handles BLOCK positions of one row; no position depends on another position's output, so the result is
independent of BLOCK and of the launch grid, and it equals `genesis.masking.mask_torch` bit for bit (tests compare
them with `torch.equal` under TRITON_INTERPRET=1). With masking.readout a second, small kernel (`_readout_kernel`)
computes the readout targets from the masking kernel's outputs, one program walking each row. An untimed version 2 of
the masking kernel, one window scanned per program, lives apart in `genesis.kernels.experimental.mask_v2`, built on
this module's helpers and launcher (`run_masking`).

Semantics, and how both versions work: docs/masking.md. Timings: bench/RESULTS.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from genesis import flags

# Module-level values a compiled @triton.jit function reads must be tl.constexpr (the interpreter accepts plain
# globals; the compiler does not). Token flag bits of `token_flags`: see genesis.flags.
GLUE_LEFT = tl.constexpr(flags.GLUE_LEFT)
WORD_END = tl.constexpr(flags.WORD_END)
CLAUSE_BOUNDARY = tl.constexpr(flags.CLAUSE_BOUNDARY)
STOP = tl.constexpr(flags.CLAUSE_BOUNDARY | flags.VERSE_SEPARATOR)  # where the preceding clause stops
VERSE_SEPARATOR = tl.constexpr(flags.VERSE_SEPARATOR)
IGNORE_INDEX = tl.constexpr(flags.IGNORE_INDEX)
UNIFORM_SCALE = tl.constexpr(4.6566127342e-10)  # tl.rand's int32 -> [0, 1) scale

# Positions per program: 128 keeps the widest (BLOCK, 32) look-around tile in registers with every branch on (256
# spills, bench/RESULTS.md); bench/mask_throughput.py times 64/128/256 on a GPU.
DEFAULT_BLOCK = 128


@triton.jit
def _attach(x_row, pos, T, V, token_flags, valid):
    """True where token `pos` glues onto token `pos-1` as part of one word (0 outside the row)."""
    ok = valid & (pos > 0) & (pos < T)
    glue = _flags_at(x_row, pos, V, token_flags, ok) & GLUE_LEFT
    wend = _flags_at(x_row, pos - 1, V, token_flags, ok) & WORD_END
    return (glue != 0) & (wend != 0)


@triton.jit
def _flags_of(tok, V, token_flags, valid):
    """The `token_flags` bits of the ids `tok` (0 where not valid or outside the vocabulary)."""
    ok = valid & (tok >= 0) & (tok < V)
    return tl.load(token_flags + tok, mask=ok, other=0).to(tl.int32)


@triton.jit
def _flags_at(x_row, pos, V, token_flags, valid):
    """The `token_flags` bits of the token at `pos` (0 where not valid or the id is outside the vocabulary)."""
    return _flags_of(tl.load(x_row + pos, mask=valid, other=-1).to(tl.int64), V, token_flags, valid)


@triton.jit
def _uniform(word):
    """uint32 -> float32 in [0, 1), exactly as tl.rand does it."""
    w = word.to(tl.int32, bitcast=True)
    w = tl.where(w < 0, -w - 1, w)
    return w.to(tl.float32) * UNIFORM_SCALE


@triton.jit
def _match_probability(prob_table, entry_weight, cell, entry, matched, USE_WEIGHT: tl.constexpr):
    """p = prob_table[cell] (x the entry's weight), clamped to [0, 1]; 0 where nothing matched."""
    prob = tl.load(prob_table + cell, mask=matched, other=0.0)
    if USE_WEIGHT:
        prob = prob * tl.load(entry_weight + entry, mask=matched, other=0.0)
    return tl.minimum(tl.maximum(prob, 0.0), 1.0)


@triton.jit
def _philox_at(seed, column, row, row_offset, step, rank):
    """The four Philox words at counter (column, row_offset + row, step, rank), key seed, for a block of columns.
    (Scalar arguments equal to 1 arrive as constexprs; adding them to an int64 block works for both kinds.)"""
    zero = tl.zeros(column.shape, dtype=tl.int64)
    row_id = (zero + row + row_offset).to(tl.uint32)
    step_id = (zero + step).to(tl.uint32)
    rank_id = (zero + rank).to(tl.uint32)
    return tl.philox(seed, column.to(tl.uint32), row_id, step_id, rank_id)


@triton.jit
def _connective_mask_kernel(
    # pointers: the batch
    x_ptr, verse_start_ptr, out_ptr, mask_ptr, class_ptr, connective_ptr, matched_ptr,
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
    PIECES_P2: tl.constexpr, LOOK_P2: tl.constexpr,
    CHAIN: tl.constexpr, CHAIN_GAP: tl.constexpr, CHAIN_CLASS: tl.constexpr,
):
    row = tl.program_id(1)
    if CHAIN:  # a chain's head may lie any distance back: one program walks the row's blocks in order
        first_block = 0
        n_blocks = tl.cdiv(T, BLOCK)
    else:
        first_block = tl.program_id(0)
        n_blocks = 1
    chain_last = tl.full([], -1, tl.int64)  # carried: start column of the row's latest chaining match
    chain_head = tl.full([], -1, tl.int64)  # carried: 2 x column + decision of the row's latest chain head
    for block_index in range(0, n_blocks):
        chain_last, chain_head = _mask_block(
            x_ptr, verse_start_ptr, out_ptr, mask_ptr, class_ptr, connective_ptr, matched_ptr,
            token_flags, first_pattern, pattern_count, patterns, pattern_len, pattern_entry,
            entry_weight, entry_class, prob_table, random_pool,
            T, V, n_random, stride_x, stride_vs, stride_out,
            seed, step, rank, row_offset, mask_id, p_mask, p_mask_or_random,
            row, first_block + block_index, chain_last, chain_head,
            HAS_VERSE_START, USE_CELLS, PRECEDING_CLAUSE, USE_WEIGHT, BERT,
            MAX_PIECES, MAX_PER_TOKEN, LOOKBACK, BLOCK, PIECES_P2, LOOK_P2, CHAIN, CHAIN_GAP, CHAIN_CLASS)


@triton.jit
def _mask_block(
    x_ptr, verse_start_ptr, out_ptr, mask_ptr, class_ptr, connective_ptr, matched_ptr,
    token_flags, first_pattern, pattern_count, patterns, pattern_len, pattern_entry,
    entry_weight, entry_class, prob_table, random_pool,
    T, V, n_random, stride_x, stride_vs, stride_out,
    seed, step, rank, row_offset, mask_id, p_mask, p_mask_or_random,
    row, block_index, chain_last, chain_head,
    HAS_VERSE_START: tl.constexpr, USE_CELLS: tl.constexpr, PRECEDING_CLAUSE: tl.constexpr,
    USE_WEIGHT: tl.constexpr, BERT: tl.constexpr,
    MAX_PIECES: tl.constexpr, MAX_PER_TOKEN: tl.constexpr, LOOKBACK: tl.constexpr, BLOCK: tl.constexpr,
    PIECES_P2: tl.constexpr, LOOK_P2: tl.constexpr,
    CHAIN: tl.constexpr, CHAIN_GAP: tl.constexpr, CHAIN_CLASS: tl.constexpr,
):
    """Version 1's work on BLOCK columns of one row; returns the carried chain state (column of the latest chaining
    match, 2 x column + decision of the latest chain head), updated with this block's matches."""
    offs = block_index * BLOCK + tl.arange(0, BLOCK)
    in_row = offs < T
    x_row = x_ptr + row.to(tl.int64) * stride_x
    x_here = tl.load(x_row + offs, mask=in_row, other=0)

    # 1. Which match covers this position? Pieces inside a pattern always glue onto each other (the lexicon
    #    guarantees it), so the only start that can cover this position is the nearest position at or before it
    #    that does not glue onto its left neighbour, at most MAX_PIECES-1 glued tokens back; then try the patterns
    #    of the token there (at most one pattern can match at a start). Every look-around below is one 2-D load of
    #    (BLOCK, width) independent addresses, not a loop of dependent loads: the latency is paid once per stage.
    r_p = tl.arange(0, PIECES_P2)
    g = _attach(x_row, offs[:, None] - r_p[None, :], T, V, token_flags, in_row[:, None] & (r_p[None, :] < MAX_PIECES))
    run = tl.min(tl.where(g, PIECES_P2, r_p[None, :]), axis=1)  # glued tokens just before (MAX_PIECES: too many)
    glued = run >= MAX_PIECES
    start = offs - tl.minimum(run, MAX_PIECES - 1)
    piece = offs - start  # index of this position inside a match starting at `start`
    tok = tl.load(x_row + start, mask=in_row & ~glued, other=-1).to(tl.int64)
    ok = in_row & ~glued & (tok >= 0) & (tok < V)
    first = tl.load(first_pattern + tok, mask=ok, other=-1)
    count = tl.load(pattern_count + tok, mask=ok, other=0)
    ok = ok & (first >= 0)
    ahead = start[:, None] + r_p[None, :]  # the tokens a pattern starting at `start` is compared with
    have = tl.load(x_row + ahead, mask=ok[:, None] & (r_p[None, :] < MAX_PIECES) & (ahead < T), other=-1)
    have = have.to(tl.int64)
    covered = offs < 0
    entry = tl.zeros([BLOCK], dtype=tl.int64)
    for q in range(MAX_PER_TOKEN):
        p = first + q
        live = ok & (q < count) & ~covered
        plen = tl.load(pattern_len + p, mask=live, other=0)
        live = live & (plen > piece) & (start + plen <= T)
        need = live[:, None] & (r_p[None, :] < plen[:, None])
        want = tl.load(patterns + p[:, None] * MAX_PIECES + r_p[None, :], mask=need, other=0).to(tl.int64)
        live = live & (tl.max((need & (want != have)).to(tl.int32), axis=1) == 0)
        live = live & ~_attach(x_row, start + plen, T, V, token_flags, live)
        covered = covered | live
        entry = tl.where(live, tl.load(pattern_entry + p, mask=live, other=0).to(tl.int64), entry)

    # 2. The rules, evaluated at the match start (only where the table varies over its cells: structural).
    if USE_CELLS:
        if HAS_VERSE_START:
            vs = tl.load(verse_start_ptr + row.to(tl.int64) * stride_vs + start, mask=covered, other=0)
            verse_initial = covered & (vs != 0)
        else:
            sep = _flags_at(x_row, start - 1, V, token_flags, covered & (start > 0)) & VERSE_SEPARATOR
            verse_initial = covered & (sep != 0)
        r_l = tl.arange(0, LOOK_P2)
        if PRECEDING_CLAUSE:
            # skip the run of boundary/separator tokens just before the start (at most LOOKBACK), then count the
            # clause before it up to its own boundary, the row start or LOOKBACK tokens
            back = start[:, None] - 1 - r_l[None, :]
            look = covered[:, None] & (r_l[None, :] < LOOKBACK)
            stop = (_flags_at(x_row, back, V, token_flags, look & (back >= 0)) & STOP) != 0
            skip = tl.min(tl.where(look & ~stop, r_l[None, :], LOOK_P2), axis=1)
            end = start - 1 - skip
            counting = covered & (skip < LOOKBACK) & (end >= 0)
            back = end[:, None] - r_l[None, :]
            look = counting[:, None] & (r_l[None, :] < LOOKBACK)
            stop = (_flags_at(x_row, back, V, token_flags, look & (back >= 0)) & STOP) != 0
            clause_len = tl.min(tl.where(look & ((back < 0) | stop), r_l[None, :], LOOKBACK), axis=1)
            clause_len = tl.where(counting, clause_len, 0)
        else:
            # distance back to the nearest clause-boundary token, the row start counting as one, capped
            back = start[:, None] - r_l[None, :]
            look = covered[:, None] & (r_l[None, :] >= 1) & (r_l[None, :] < LOOKBACK) & (back >= 0)
            boundary = (_flags_at(x_row, back, V, token_flags, look) & CLAUSE_BOUNDARY) != 0
            capped = tl.minimum(start + 1, LOOKBACK)
            clause_len = tl.min(tl.where(boundary, r_l[None, :], capped[:, None]), axis=1)
        cell = verse_initial.to(tl.int32) * (LOOKBACK + 1) + clause_len
    else:
        cell = 1 + offs * 0
    prob = _match_probability(prob_table, entry_weight, cell, entry, covered, USE_WEIGHT)

    # 3. One Philox draw per match, keyed by (seed; start column, row, step, rank).
    w0, w1, _, _ = _philox_at(seed, start, row, row_offset, step, rank)
    selected = covered & (_uniform(w0) < prob)
    if CHAIN:  # a chained match (every piece) takes the decision of its chain's head
        chains = covered & (tl.load(entry_class + entry, mask=covered, other=-1) == CHAIN_CLASS)
        chain_start = tl.where(chains & (piece == 0), offs.to(tl.int64), -1)
        selected, chain_last, chain_head = _chain(chains, chain_start, offs.to(tl.int64), selected, chain_last,
                                                  chain_head, CHAIN_GAP)

    # 4. Replacement.
    out = x_here
    if BERT:
        choice = _uniform(w1)
        # the random token of each piece comes from the draw at the piece's own position
        _, _, w2, _ = _philox_at(seed, offs, row, row_offset, step, rank)
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
    tl.store(matched_ptr + out_off, covered.to(tl.int8), mask=in_row)
    return chain_last, chain_head


@triton.jit
def _top_two(a1, a2, b1, b2):
    """The two largest of {a1, a2, b1, b2}, given a1 >= a2 and b1 >= b2: a scan of it gives, at each position, the
    largest value up to there and the one before it."""
    return tl.maximum(a1, b1), tl.maximum(tl.minimum(a1, b1), tl.maximum(a2, b2))


@triton.jit
def _chain(chains, chain_start, column, selected, chain_last, chain_head, CHAIN_GAP: tl.constexpr):
    """Chain decisions over one block of columns in row order. `chains`: positions of chaining matches (every
    piece); `chain_start`: the column where such a match starts, else -1; `selected`: each position's own decision;
    chain_last / chain_head: the carried state of the columns before the block (see `_mask_block`). A match whose
    start lies at most CHAIN_GAP after the previous chaining start is a member; any other is a head (or alone); every
    chaining position takes the decision of the latest head at or before it. Returns (selected, chain_last,
    chain_head) updated."""
    _, before = tl.associative_scan((chain_start, tl.full(chain_start.shape, -1, tl.int64)), 0, _top_two)
    previous = tl.maximum(before, chain_last)  # the previous chaining start, at each chaining start
    member = (chain_start >= 0) & (previous >= 0) & (column - previous <= CHAIN_GAP)
    head = tl.where((chain_start >= 0) & ~member, chain_start * 2 + selected.to(tl.int64), -1)
    head = tl.maximum(tl.associative_scan(head, 0, _max), chain_head)
    selected = tl.where(chains, (head & 1) != 0, selected)
    return selected, tl.maximum(chain_last, tl.max(chain_start, axis=0)), tl.max(head, axis=0)


@triton.jit
def _max(a, b):
    return tl.maximum(a, b)


# ----------------------------------------------------------------------------------------------------------------
# Readout targets (masking.readout): a second, small kernel over the masking kernel's outputs


@triton.jit
def _stop_at(x_row, vs_row, pos, T, V, token_flags, valid, HAS_VERSE_START: tl.constexpr):
    """True where column `pos` is a stop: a clause-stop token or, with verse_start flags, a verse's last column."""
    ok = valid & (pos >= 0) & (pos < T)
    stop = (_flags_at(x_row, pos, V, token_flags, ok) & STOP) != 0
    if HAS_VERSE_START:
        stop = stop | (tl.load(vs_row + pos + 1, mask=ok & (pos + 1 < T), other=0) != 0)
    return stop


@triton.jit
def _readout_kernel(
    # pointers: the batch and the masking kernel's outputs
    x_ptr, verse_start_ptr, mask_ptr, connective_ptr, readout_ptr, readout_start_ptr,
    # pointers: tables
    token_flags,
    # sizes and strides
    T, V, stride_x, stride_vs, stride_out,
    # meta-parameters
    HAS_VERSE_START: tl.constexpr, BLOCK: tl.constexpr,
):
    """One program per row, its blocks in order. A readout is written from the closing stop's point of view (a stop
    right after a non-stop): the latest masked word ending two or more columns before it reads there unless another
    closing stop lies between them. Two running maxima carried from block to block (the latest word end, the latest
    closing stop) find both, as the torch path's cummax does; each position is written once, so no store races."""
    row = tl.program_id(0)
    x_row = x_ptr + row.to(tl.int64) * stride_x
    vs_row = verse_start_ptr + row.to(tl.int64) * stride_vs
    out_row = row.to(tl.int64) * stride_out
    last_piece = tl.full([], -1, tl.int64)  # carried: column of the latest masked word end before the block
    last_close = tl.full([], -1, tl.int64)  # carried: column of the latest closing stop before the block
    for block_index in range(0, tl.cdiv(T, BLOCK)):
        col = block_index * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
        in_row = col < T
        stop = _stop_at(x_row, vs_row, col, T, V, token_flags, in_row, HAS_VERSE_START)
        stop_1 = _stop_at(x_row, vs_row, col - 1, T, V, token_flags, in_row, HAS_VERSE_START)
        stop_2 = _stop_at(x_row, vs_row, col - 2, T, V, token_flags, in_row, HAS_VERSE_START)
        closes = in_row & (col >= 1) & stop & ~stop_1
        closed_before = in_row & (col >= 2) & stop_1 & ~stop_2  # column col - 1 closes
        # does a masked word end at col - 2? (its next column is no piece of the same masked word)
        end = col - 2
        ok = in_row & (end >= 0)
        masked = tl.load(mask_ptr + out_row + end, mask=ok, other=0) != 0
        entry = tl.load(connective_ptr + out_row + end, mask=ok, other=IGNORE_INDEX)
        next_masked = tl.load(mask_ptr + out_row + end + 1, mask=ok, other=0) != 0
        next_entry = tl.load(connective_ptr + out_row + end + 1, mask=ok, other=IGNORE_INDEX)
        glued = _attach(x_row, end + 1, T, V, token_flags, ok)
        ends = ok & masked & ~(next_masked & (next_entry == entry) & glued)
        piece = tl.maximum(tl.associative_scan(tl.where(ends, end, -1), 0, _max), last_piece)
        close = tl.maximum(tl.associative_scan(tl.where(closed_before, col - 1, -1), 0, _max), last_close)
        hit = closes & (piece >= 0) & (close < piece + 2)
        target = tl.load(connective_ptr + out_row + piece, mask=hit, other=IGNORE_INDEX)
        tl.store(readout_ptr + out_row + col, tl.where(hit, target, IGNORE_INDEX), mask=in_row)
        tl.store(readout_start_ptr + out_row + col, tl.where(hit, piece + 1, -1), mask=in_row)
        last_piece = tl.max(piece, axis=0)
        last_close = tl.max(close, axis=0)


READOUT_BLOCK = 256  # columns per step of the readout kernel's walk along its row


def connective_mask_triton(input_ids: torch.Tensor, verse_start: torch.Tensor | None, tables, seed: int, step: int,
                           rank: int = 0, row_offset: int = 0, block: int = DEFAULT_BLOCK,
                           readout_block: int = READOUT_BLOCK):
    """Launch the fused kernel.

    input_ids: (B, T) int32 or int64, contiguous rows; verse_start: (B, T) bool/uint8 or None; tables: a
    `genesis.masking.MaskTables` on the same device. Returns (input_ids masked copy, mask bool, classes int64,
    connectives int64, matched bool), all (B, T); classes and connectives hold -100 where nothing is masked;
    matched marks every piece of every lexicon match, masked or not. With `tables.readout` two more (B, T) int64
    outputs follow: readout (-100 where none) and readout_start (-1 where none), from the readout kernel walking
    each row `readout_block` (a power of two) columns at a time. `block` positions per program.
    """
    return run_masking(lambda outputs: _launch(input_ids, verse_start, outputs, tables, seed, step, rank, row_offset,
                                               block),
                       input_ids, verse_start, tables, readout_block)


def run_masking(launch, input_ids: torch.Tensor, verse_start: torch.Tensor | None, tables,
                readout_block: int = READOUT_BLOCK) -> tuple[torch.Tensor, ...]:
    """Run a masking kernel and, with `tables.readout`, the readout kernel after it. `launch(outputs)` gives the
    masking kernel's (kernel, positional arguments, meta-parameters, output columns per program, launch options)
    for the five (B, T) outputs it writes."""
    B, T = input_ids.shape
    outputs = _empty_outputs(input_ids, tables.readout)
    if B == 0 or T == 0:
        if tables.readout:
            outputs[5].fill_(flags.IGNORE_INDEX)
            outputs[6].fill_(-1)
        return outputs
    kernel, args, meta, columns, options = launch(outputs[:5])
    # with chains one program per row walks its blocks in order (the chain state is carried from block to block)
    kernel[(1 if tables.chain else triton.cdiv(T, columns), B)](*args, **meta, **options)
    if tables.readout:
        # A readout position can lie any number of blocks after its word, and the masking kernels are built on
        # blocks whose columns do not depend on each other: a second pass, one program per row walking it in order,
        # keeps them unchanged and costs nothing when readout is off.
        args, meta = _readout_arguments(input_ids, verse_start, outputs, tables, readout_block)
        _readout_kernel[(B,)](*args, **meta)
    return outputs


def _empty_outputs(input_ids: torch.Tensor, readout: bool = False) -> tuple[torch.Tensor, ...]:
    """The kernel's five (B, T) outputs, uninitialised, on the input's device: ids (its dtype), mask, classes,
    connectives and matched; with `readout` also readout and readout_start (int64). Row-major whatever the input's
    layout: the kernel writes column c of row r at r * T + c."""
    shape, device = input_ids.shape, input_ids.device
    int64 = (torch.empty(shape, dtype=torch.int64, device=device) for _ in range(4 if readout else 2))
    return (torch.empty(shape, dtype=input_ids.dtype, device=device),
            torch.empty(shape, dtype=torch.bool, device=device), next(int64), next(int64),
            torch.empty(shape, dtype=torch.bool, device=device), *int64)


def _readout_arguments(input_ids, verse_start, outputs, tables, block=READOUT_BLOCK):
    """The readout kernel's positional arguments and meta-parameters."""
    _, mask, _, connectives, _, readout, readout_start = outputs
    x = input_ids if input_ids.stride(1) == 1 else input_ids.contiguous()
    vs = x if verse_start is None else (verse_start if verse_start.stride(1) == 1 else verse_start.contiguous())
    vs = vs if verse_start is None else vs.view(torch.uint8)
    args = (x, vs, mask.view(torch.int8), connectives, readout, readout_start, tables.token_flags,
            x.shape[1], tables.vocab_size, x.stride(0), vs.stride(0), readout.stride(0))
    return args, dict(HAS_VERSE_START=verse_start is not None, BLOCK=block)


def _launch(input_ids, verse_start, outputs, tables, seed, step, rank, row_offset, block):
    """(kernel, positional arguments, meta-parameters, output columns per program, launch options) of a launch."""
    args, meta = _launch_arguments(input_ids, verse_start, outputs, tables, seed, step, rank, row_offset, block)
    return _connective_mask_kernel, args, meta, block, {}


def _launch_arguments(input_ids, verse_start, outputs, tables, seed, step, rank, row_offset, block):
    """The kernel's positional arguments and meta-parameters, for a launch and for `compile_for`."""
    out, mask, classes, connectives, matched = outputs
    # rows may be strided (a (B, T) view of (B, T+1) windows): only the columns must be contiguous
    x = input_ids if input_ids.stride(1) == 1 else input_ids.contiguous()
    if verse_start is None:
        vs = x  # an unused placeholder pointer
    else:
        vs = verse_start if verse_start.stride(1) == 1 else verse_start.contiguous()
        vs = vs.view(torch.uint8)
    args = (
        x, vs, out, mask.view(torch.int8), classes, connectives, matched.view(torch.int8),
        tables.token_flags, tables.first_pattern, tables.pattern_count, tables.patterns, tables.pattern_len,
        tables.pattern_entry, tables.entry_weight, tables.entry_class, tables.prob_table, tables.random_pool,
        x.shape[1], tables.vocab_size, tables.random_pool.numel(), x.stride(0), vs.stride(0), out.stride(0),
        seed, step, rank, row_offset, tables.mask_id, tables.p_mask, tables.p_mask_or_random,
    )
    meta = dict(
        HAS_VERSE_START=verse_start is not None, USE_CELLS=tables.use_cells,
        PRECEDING_CLAUSE=tables.preceding_clause, USE_WEIGHT=tables.use_weight, BERT=tables.bert,
        MAX_PIECES=tables.max_pieces, MAX_PER_TOKEN=tables.max_per_token, LOOKBACK=tables.lookback, BLOCK=block,
        PIECES_P2=triton.next_power_of_2(max(tables.max_pieces, 2)),
        LOOK_P2=triton.next_power_of_2(max(tables.lookback, 2)),
        CHAIN=tables.chain, CHAIN_GAP=tables.chain_gap, CHAIN_CLASS=tables.chain_class,
    )
    return args, meta


_TRITON_TYPES = {torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8",
                 torch.float32: "fp32", torch.bool: "i1"}


def compile_for(capability: int, input_ids: torch.Tensor, verse_start: torch.Tensor | None, tables,
                block: int = DEFAULT_BLOCK):
    """Compile the kernel ahead of time for a CUDA compute capability (89: RTX 40xx, 90: H100), for the argument
    types and meta-parameters a launch with these inputs would use, and return Triton's compiled kernel (its
    `asm` holds the PTX and cubin). Needs Triton with its NVIDIA backend, not a GPU: tests use it to check on a
    CPU-only machine what the interpreter cannot, that the compiler accepts the kernel. Inputs may be CPU tensors."""
    kernel, args, meta, _, options = _launch(input_ids, verse_start, _empty_outputs(input_ids), tables, 0, 0, 0, 0,
                                             block)
    return _compile(capability, kernel, args, meta, options)


def compile_readout_for(capability: int, input_ids: torch.Tensor, verse_start: torch.Tensor | None, tables):
    """`compile_for` for the readout kernel (masking.readout)."""
    args, meta = _readout_arguments(input_ids, verse_start, _empty_outputs(input_ids, readout=True), tables)
    return _compile(capability, _readout_kernel, args, meta, {})


def _compile(capability: int, kernel, args, meta, options):
    """Triton's compiled `kernel` for these launch arguments and a CUDA compute capability."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    signature = {}
    for name, value in zip(kernel.arg_names, args):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:  # the launcher passes Python ints; Triton types them i32 or i64 by value: take the wider
            signature[name] = "i64" if name in ("seed", "step", "rank", "row_offset", "mask_id") else "i32"
    signature.update({name: "constexpr" for name in meta})
    source = ASTSource(kernel, signature, constexprs=meta)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32), options=options)
