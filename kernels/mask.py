"""The fused connective-masking kernel (Triton) and its launcher.

One program handles BLOCK positions of one row. Every position finds the lexicon match that covers it (its word
starts at most MAX_PIECES-1 tokens earlier), evaluates the rules at the match's start (verse-initial flag, clause
length by a bounded backward scan, probability from the rule table times the optional weight), draws the start's
Philox numbers and writes the masked token, the mask flag, the class and the connective index. No position
depends on another position's output, so the result is independent of BLOCK and of the launch grid, and it equals
`genesis.masking.mask_torch` bit for bit (tests compare them with `torch.equal` under TRITON_INTERPRET=1).

Bytes per token: read ids (4 or 8) and verse_start (1, optional); write ids, mask (1), class (8) and connective
(8): 22-34 B/token. The tables (a few KB per vocab array) stay in L1/L2.

Each look-around (the glued tokens before a position, the tokens after a match start, the clause before it) is one
2-D (BLOCK, width) load of independent addresses rather than a loop of dependent loads. Loops stay runtime loops:
unrolling them made each variant take minutes to compile. On an H100 the kernel is bound by these per-lane gathers
(load instructions), at 6-8% of copy bandwidth; bench/RESULTS.md has the numbers and the next step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from genesis import masking as _m

# Module-level values a compiled @triton.jit function reads must be tl.constexpr (the interpreter accepts plain
# globals; the compiler does not). Token flag bits of `token_flags`: see genesis.masking.MaskTables.
GLUE_LEFT = tl.constexpr(_m.GLUE_LEFT)
WORD_END = tl.constexpr(_m.WORD_END)
CLAUSE_BOUNDARY = tl.constexpr(_m.CLAUSE_BOUNDARY)
STOP = tl.constexpr(_m.CLAUSE_BOUNDARY | _m.VERSE_SEPARATOR)  # where the preceding clause stops
VERSE_SEPARATOR = tl.constexpr(_m.VERSE_SEPARATOR)
IGNORE_INDEX = tl.constexpr(_m.IGNORE_INDEX)
UNIFORM_SCALE = tl.constexpr(4.6566127342e-10)  # tl.rand's int32 -> [0, 1) scale

# Positions per program. 128 keeps the widest (BLOCK, 32) look-around tile in registers (157 registers, no spills
# for sm_89 with every branch on; 256 spills); bench/mask_throughput.py times 64/128/256 on a GPU.
DEFAULT_BLOCK = 128


@triton.jit
def _attach(x_row, pos, T, V, token_flags, valid):
    """True where token `pos` glues onto token `pos-1` as part of one word (0 outside the row)."""
    ok = valid & (pos > 0) & (pos < T)
    cur = tl.load(x_row + pos, mask=ok, other=-1).to(tl.int64)
    prev = tl.load(x_row + pos - 1, mask=ok, other=-1).to(tl.int64)
    cur_ok = ok & (cur >= 0) & (cur < V)
    prev_ok = ok & (prev >= 0) & (prev < V)
    glue = tl.load(token_flags + cur, mask=cur_ok, other=0).to(tl.int32) & GLUE_LEFT
    wend = tl.load(token_flags + prev, mask=prev_ok, other=0).to(tl.int32) & WORD_END
    return cur_ok & prev_ok & (glue != 0) & (wend != 0)


@triton.jit
def _flags_at(x_row, pos, V, token_flags, valid):
    """The `token_flags` bits of the token at `pos` (0 where not valid or the id is outside the vocabulary)."""
    tok = tl.load(x_row + pos, mask=valid, other=-1).to(tl.int64)
    ok = valid & (tok >= 0) & (tok < V)
    return tl.load(token_flags + tok, mask=ok, other=0).to(tl.int32)


@triton.jit
def _uniform(word):
    """uint32 -> float32 in [0, 1), exactly as tl.rand does it."""
    w = word.to(tl.int32, bitcast=True)
    w = tl.where(w < 0, -w - 1, w)
    return w.to(tl.float32) * UNIFORM_SCALE


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
    PIECES_P2: tl.constexpr, LOOK_P2: tl.constexpr,
):
    row = tl.program_id(1)
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
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
                           rank: int = 0, row_offset: int = 0, block: int = DEFAULT_BLOCK):
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
    args, meta = _launch_arguments(input_ids, verse_start, (out, mask, classes, connectives), tables, seed, step, rank,
                                   row_offset, block)
    _connective_mask_kernel[(triton.cdiv(T, block), B)](*args, **meta)
    return out, mask, classes, connectives


def _launch_arguments(input_ids, verse_start, outputs, tables, seed, step, rank, row_offset, block):
    """The kernel's positional arguments and meta-parameters, for a launch and for `compile_for`."""
    out, mask, classes, connectives = outputs
    # rows may be strided (a (B, T) view of (B, T+1) windows): only the columns must be contiguous
    x = input_ids if input_ids.stride(1) == 1 else input_ids.contiguous()
    if verse_start is None:
        vs = x  # an unused placeholder pointer
    else:
        vs = verse_start if verse_start.stride(1) == 1 else verse_start.contiguous()
        vs = vs.view(torch.uint8)
    args = (
        x, vs, out, mask.view(torch.int8), classes, connectives,
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
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    outputs = (torch.empty_like(input_ids), torch.empty(input_ids.shape, dtype=torch.bool),
               torch.empty(input_ids.shape, dtype=torch.int64), torch.empty(input_ids.shape, dtype=torch.int64))
    args, meta = _launch_arguments(input_ids, verse_start, outputs, tables, 0, 0, 0, 0, block)
    signature = {}
    for name, value in zip(_connective_mask_kernel.arg_names, args):
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TRITON_TYPES[value.dtype]
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:  # the launcher passes Python ints; Triton types them i32 or i64 by value: take the wider
            signature[name] = "i64" if name in ("seed", "step", "rank", "row_offset", "mask_id") else "i32"
    signature.update({name: "constexpr" for name in meta})
    source = ASTSource(_connective_mask_kernel, signature, constexprs=meta)
    return triton.compile(source, target=GPUTarget("cuda", capability, 32))
