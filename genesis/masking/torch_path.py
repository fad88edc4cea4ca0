"""The torch path: the masker's semantics in torch and numpy, bit-identical to the Triton kernel.

Two layouts of one computation, chosen by the device: "sparse" on CPU tensors (work per candidate connective, the
candidate stage in numpy) and "dense" elsewhere (every position as whole-batch tensors, no host sync). With
masking.readout each layout also computes the readout targets; `readout_position` and `readout_reference` state
them one position at a time, for the tests. Semantics: docs/masking.md.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from genesis.flags import IGNORE_INDEX
from genesis.masking.errors import MaskingError
from genesis.masking.philox import MASK32, _philox_numpy, philox4x32, uniform_from_bits, uniform_from_bits_numpy
from genesis.masking.tables import SCAN_STOP, MaskTables


def mask_torch(input_ids: torch.Tensor, verse_start: torch.Tensor | None, tables: MaskTables, seed: int, step: int,
               rank: int = 0, row_offset: int = 0, ids_checked: bool = False, layout: str | None = None):
    """Same signature and semantics as `genesis.kernels.mask.connective_mask_triton`; bit-identical results.

    Two layouts of the same computation, chosen by the device (or forced with `layout`, as the tests do):

    * "sparse" (CPU tensors): work per connective, not per token. A few passes over the batch (the output copies,
      one table lookup and one compaction for candidate starts and, where the rules need them, clause stops),
      then everything else — word checks, rules, Philox — runs on the candidates (a few percent of the tokens) in
      numpy, whose per-op cost at these sizes is below eager torch's: a call's time is set by its count of small
      operations and by how warm the caches are more than by the tokens (bench/RESULTS.md).
    * "dense" (any other device: GPUs without Triton, MPS): every position in a fixed number of whole-batch torch
      calls and no host synchronisation, so the host never waits for the device. Compacting on CUDA instead costs a
      sync per compaction and many small launches (bench/RESULTS.md).
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



class _Candidates(NamedTuple):
    """The sparse layout's candidate stage: where matches may start, and what matched there."""

    found: np.ndarray  # sorted flat positions of the batch's starts and (structural rules) clause stops
    kind: np.ndarray | None  # their scan codes (structural rules only, else None)
    in_found: np.ndarray | None  # the starts' indices in `found` (structural rules only)
    starts: np.ndarray  # flat positions of the candidate starts
    previous: np.ndarray  # the token before each start (clipped at the batch's first position)
    entry: np.ndarray  # the lexicon entry matched at each start, -1 where none
    plen: np.ndarray | None  # the match length at each start; None when every match is one token long


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

    # 1. candidate starts and what matches there
    candidates = _sparse_candidates(ids, code.numpy(), tables, h, T)
    if candidates is None:
        return (out, *_unmasked(B, T))

    # 2. keep the matches
    hit = (candidates.entry >= 0).nonzero()[0]
    if hit.size == 0:
        return (out, *_unmasked(B, T))
    s, entry = candidates.starts.take(hit), candidates.entry.take(hit)
    plen = None if candidates.plen is None else candidates.plen.take(hit)
    row, col = np.divmod(s, T)

    # 3. the probability at each match start
    prob = _sparse_probability(candidates, hit, s, entry, row, col, verse_start, tables, h)

    # 4. one draw per match (a chained match takes its chain head's decision)
    w0, w1, _, _ = _philox_numpy(seed, col, (row + row_offset) & MASK32, step & MASK32, rank & MASK32)
    selected = uniform_from_bits_numpy(w0) < prob
    if tables.chain:
        selected = _chain_decisions(selected, s, h.entry_class.take(entry) == tables.chain_class, tables.chain_gap, T)

    # 5. the outputs
    return _sparse_write(out, s, entry, plen, selected, w1, tables, h, (seed, step, rank, row_offset))


def _sparse_candidates(ids: np.ndarray, code: np.ndarray, tables: MaskTables, h, T: int) -> _Candidates | None:
    """Candidate starts (and, for the structural rules, the clause stops: one lookup and one compaction for both)
    and the lexicon entry each one matches; one-token words (almost all) need one lookup, no comparison. None when
    the batch holds no candidate start."""
    V = tables.vocab_size
    found = (code != 0).nonzero()[0]  # numpy's nonzero is fastest on bool arrays
    kind = in_found = None
    if tables.use_cells:
        kind = code.take(found)
        in_found = (kind != SCAN_STOP).nonzero()[0]  # the starts' indices in `found` (kind: 1, 2 or 3)
        s = found[in_found]
    else:
        s = found
    if s.size == 0:
        return None
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
        if multi.size:  # keep the starts whose first two tokens begin some longer pattern (a handful per batch)
            pair = tok.take(multi).astype(np.int64) * (V + 1) + around[2].take(multi)
            at = np.minimum(h.multi_prefix.searchsorted(pair), h.multi_prefix.size - 1)
            multi = multi[h.multi_prefix.take(at) == pair]
        if multi.size:
            entry, plen = _match_longer_words(ids, s, entry, multi, tables, h, T)
    return _Candidates(found, kind, in_found, s, around[0], entry, plen)


def _sparse_probability(candidates: _Candidates, hit: np.ndarray, s: np.ndarray, entry: np.ndarray,
                        row: np.ndarray, col: np.ndarray, verse_start: torch.Tensor | None, tables: MaskTables,
                        h) -> np.ndarray:
    """The masking probability at each match start `s` (the candidates `hit`), clamped to [0, 1]."""
    if tables.use_cells:
        if verse_start is not None:
            verse_initial = verse_start.numpy()[row, col]
        else:
            verse_initial = h.verse_separator.take(candidates.previous.take(hit)) & (col > 0)
        # `found` holds m starts before the m-th one, so in_found - m stops (the starts that are stops too
        # counted again, where a lexicon has any)
        found, kind, in_found = candidates.found, candidates.kind, candidates.in_found
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
    return np.minimum(np.maximum(prob, np.float32(0.0)), np.float32(1.0))


def _sparse_write(out: torch.Tensor, s: np.ndarray, entry: np.ndarray, plen: np.ndarray | None,
                  selected: np.ndarray, w1: np.ndarray, tables: MaskTables, h, counter: tuple[int, int, int, int]):
    """Every piece of every match is matched; write every piece of every chosen word into `out` and the other four
    outputs, made here, after the candidate stage, which then finds the batch and its lookups still in the cache.
    `counter`: (seed, step, rank, row_offset), for the BERT replacement's random token."""
    B, T = out.shape
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
        seed, step, rank, row_offset = counter
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
    """Patterns of two or more tokens at the starts `multi` (rare), in a plain loop: measure the
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
    """table[index] for any index shape (rows of a 2-D table); index_select is faster than advanced indexing on the
    CPU."""
    return table.index_select(0, index.reshape(-1)).view(*index.shape, *table.shape[1:])




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

