"""Scorers of the items: next-token accuracy, the class head, cloze ranking by the model and by a Kneser-Ney
token trigram, and the majority baselines' shares."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from genesis.console import Progress
from genesis.evaluate.items import ClozeSet, Slot
from genesis.evaluate.run import model_max_len
from genesis.heldout import piece_scores
from genesis.model import Llama

TIE_TOLERANCE = 1e-6  # nats; cloze scores closer than this share the credit (sums are float64, so only true ties)
DEFAULT_BATCH_TOKENS = 8192  # tokens per forward: logits are 8192 x 8000 x 4 B = 262 MB at the CPU vocab size
CLOZE_SCORERS = ("model_verse", "model_suffix", "kn3_verse", "kn3_suffix", "majority", "positional_majority")


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


def window_batches(stream: np.ndarray, windows: list[tuple[int, list[int]]], window: int, batch_tokens: int,
                   device: torch.device | str, label: str = ""):
    """Yield (batch, starts, x) over `windows` ((start, members) pairs, as `pack_windows` gives them), batch_tokens
    // window windows at a time: x (B, window) is the stream cut at those starts, on `device`; `label` names the
    progress line (none if empty)."""
    per_batch = max(1, batch_tokens // window)
    batches = [windows[i : i + per_batch] for i in range(0, len(windows), per_batch)]
    bar = Progress(len(batches), label, every=25) if label else None
    for done, batch in enumerate(batches, start=1):
        starts = np.array([start for start, _ in batch])
        yield batch, starts, torch.from_numpy(stream[starts[:, None] + np.arange(window)]).to(device)
        if bar:
            bar.update(done)


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
    for batch, starts, x in window_batches(stream, windows, window, batch_tokens, device,
                                           "next-token" if progress else ""):
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
    return NextTokenScores(credit, first_piece_credit, logprob)


# ----------------------------------------------------------------------------------------------------------------
# Masked context: reading on past a hidden connective

DEFAULT_CONTEXT_K = 8  # tokens after each connective whose loss the masked-context metric measures


@dataclass
class MaskedContextScores:
    visible: np.ndarray  # (n,) mean loss (nats) of the k tokens after each slot, connectives visible; nan: none follow
    masked: np.ndarray  # (n,) the same with every slot's pieces replaced by the mask token in the input
    # (n,) the same k tokens with every slot's pieces removed from the input (`deleted_stream`): the tokens after a
    # slot move up to the token before it; nan where none of them has a token left before it
    deleted: np.ndarray


def masked_stream(stream: np.ndarray, slots: list[Slot], mask_id: int) -> np.ndarray:
    """A copy of `stream` with every piece of every slot replaced by `mask_id`."""
    out = stream.copy()
    if slots:
        out[np.concatenate([np.arange(s.stream_pos, s.stream_pos + s.n_pieces) for s in slots])] = mask_id
    return out


def deleted_stream(stream: np.ndarray, slots: list[Slot]) -> tuple[np.ndarray, np.ndarray]:
    """`stream` without the pieces of every slot, and for each stream position t the number of tokens kept before it:
    the shortened stream's first `kept_before[t]` tokens are what precedes t once the slots are deleted."""
    keep = np.ones(len(stream), dtype=bool)
    if slots:
        keep[np.concatenate([np.arange(s.stream_pos, s.stream_pos + s.n_pieces) for s in slots])] = False
    return stream[keep], np.cumsum(keep) - keep


@torch.inference_mode()
def token_logprobs(model: torch.nn.Module, inputs: np.ndarray, targets: np.ndarray, positions: np.ndarray,
                   device: torch.device | str = "cpu", batch_tokens: int = DEFAULT_BATCH_TOKENS, label: str = "",
                   path: str = "auto", target_ids: np.ndarray | None = None) -> np.ndarray:
    """log p(targets[t] | inputs[:t]) for the sorted stream positions t >= 1, float64, from windows of `inputs`;
    with `target_ids` (one per position), log p(target_ids[j] | inputs[:positions[j]]) instead (positions may then
    repeat, and reach len(inputs)).

    A window opens `window // 2` tokens before the first position not yet covered and takes every later position
    inside it (as `pack_windows`), so each is predicted with at least window // 2 tokens of context."""
    window = min(model_max_len(model), len(inputs))
    windows: list[tuple[int, list[int]]] = []
    for j, t in enumerate(positions):
        if windows and t - 1 <= windows[-1][0] + window - 1:
            windows[-1][1].append(j)
        else:
            windows.append((max(0, min(int(t) - 1 - window // 2, len(inputs) - window)), [j]))
    out = np.full(len(positions), np.nan)
    for batch, starts, x in window_batches(inputs, windows, window, batch_tokens, device, label):
        row = np.concatenate([np.full(len(members), r) for r, (_, members) in enumerate(batch)])
        index = np.concatenate([members for _, members in batch])
        col = positions[index] - 1 - starts[row]
        picked = logits_at(model, x, torch.from_numpy(row).to(device), torch.from_numpy(col).to(device), path)
        wanted = targets[positions[index]] if target_ids is None else target_ids[index]
        out[index] = piece_scores(picked, torch.from_numpy(wanted).to(device))[1].cpu().numpy()
    return out


def score_masked_context(model: torch.nn.Module, stream: np.ndarray, slots: list[Slot], mask_id: int,
                         k: int = DEFAULT_CONTEXT_K, device: torch.device | str = "cpu",
                         batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = True,
                         path: str = "auto") -> MaskedContextScores:
    """Each slot's mean loss on the (up to) k tokens after its word, predicted from the stream as it is, from the
    stream with every slot masked (`masked_stream`) and from the stream with every slot deleted (`deleted_stream`):
    what the model reads on with when a connective is hidden, or gone. The targets are the true tokens in all three
    (a connective among the k tokens is itself to be predicted, from the stream before it less the slots); a target
    with no token left before it once the slots are deleted (a slot opening the stream) is left out of `deleted`."""
    ends = [s.stream_pos + s.n_pieces for s in slots]
    spans = [np.arange(max(end, 1), min(end + k, len(stream))) for end in ends]
    positions = np.unique(np.concatenate([np.zeros(0, dtype=np.int64), *spans])).astype(np.int64)
    visible = token_logprobs(model, stream, stream, positions, device, batch_tokens,
                             "context, visible" if progress else "", path)
    masked = token_logprobs(model, masked_stream(stream, slots, mask_id), stream, positions, device, batch_tokens,
                            "context, masked" if progress else "", path)
    shortened, kept_before = deleted_stream(stream, slots)
    with_context = positions[kept_before[positions] >= 1]  # kept_before is sorted, so these stay sorted
    deleted = np.full(len(positions), np.nan)
    if len(with_context) and len(shortened):
        deleted[kept_before[positions] >= 1] = token_logprobs(
            model, shortened, shortened, kept_before[with_context], device, batch_tokens,
            "context, deleted" if progress else "", path, target_ids=stream[with_context])
    where = {int(t): j for j, t in enumerate(positions)}
    loss_visible, loss_masked, loss_deleted = (np.full(len(slots), np.nan) for _ in range(3))
    for i, span in enumerate(spans):
        if len(span):
            index = [where[int(t)] for t in span]
            loss_visible[i], loss_masked[i] = -visible[index].mean(), -masked[index].mean()
            kept = deleted[index][~np.isnan(deleted[index])]
            if len(kept):
                loss_deleted[i] = -kept.mean()
    return MaskedContextScores(loss_visible, loss_masked, loss_deleted)


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
    bar = Progress(len(batches), "class head", every=25) if progress else None
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


CLOZE_PATHS = ("auto", "prefix", "head", "full")
# nats by which a sequence's log-likelihood from the "prefix" path may differ from the full path's: the same sums,
# rounded differently (other batch shapes, a masked attention kernel instead of the causal one)
PREFIX_PATH_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 0.5}


@torch.inference_mode()
def score_cloze_model(model: torch.nn.Module, cloze: ClozeSet, device: torch.device | str = "cpu",
                      batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = True, path: str = "auto"
                      ) -> ClozeScores:
    """The model's log-likelihood of every candidate sequence, in parts (before the blank, the blank, after it).

    "prefix" (a Llama): what comes before the blank is the same for an item's candidates, so it is run once per
    item and its keys and values kept; the candidates' continuations run against them (`_prefix_parts`).
    "head" / "full": every candidate sequence in full, logits as `logits_at` computes them (`_full_parts`): the
    reference. "auto" picks "prefix" for a Llama, else "full"."""
    if path not in CLOZE_PATHS:
        raise ValueError(f"path must be one of {CLOZE_PATHS} (got {path!r})")
    if path == "auto":
        path = "prefix" if isinstance(model, Llama) else "full"
    if path == "prefix" and not isinstance(model, Llama):
        raise ValueError(f"path 'prefix' needs a Llama (got {type(model).__name__})")
    parts = np.zeros((len(cloze.tokens), 3))
    if path == "prefix":
        _prefix_parts(model, cloze, parts, device, batch_tokens, progress)
    else:
        _full_parts(model, cloze, parts, np.arange(len(cloze.tokens)), device, batch_tokens, progress, path)
    return _scores_from_parts(cloze, parts)


def _answer_of(cloze: ClozeSet) -> np.ndarray:
    """(n * K,) the answer's sequence of each sequence's item."""
    K = cloze.n_candidates
    return np.arange(len(cloze.tokens)) // K * K + np.repeat(cloze.answer, K)


def pad_rows(rows: list[np.ndarray]) -> np.ndarray:
    """Token rows right-padded with 0 into one (len(rows), longest) int64 array."""
    x = np.zeros((len(rows), max(len(r) for r in rows)), dtype=np.int64)
    for i, r in enumerate(rows):
        x[i, : len(r)] = r
    return x


def length_batches(lengths: np.ndarray, seqs: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Sequences `seqs` sorted by length, longest first, cut into batches of ~batch_tokens padded tokens."""
    order = seqs[np.argsort(-lengths[seqs], kind="stable")]
    batches, start = [], 0
    while start < len(order):
        per_batch = max(1, batch_tokens // int(lengths[order[start]]))  # the first is the longest
        batches.append(order[start : start + per_batch])
        start += per_batch
    return batches


def _full_parts(model: torch.nn.Module, cloze: ClozeSet, parts: np.ndarray, seqs: np.ndarray,
                device: torch.device | str, batch_tokens: int, progress: bool, path: str) -> None:
    """Adds the parts of sequences `seqs` to `parts`. Candidate sequences sorted by length and right-padded into
    batches of ~batch_tokens tokens (padding sits after every scored token, so causal attention never sees it);
    log-softmax only at the scored positions.

    Tokens before the blank are the same for every candidate (the model is causal), so their log-prob is computed
    once, on the answer's sequence, and reused; a candidate whose prefix tokens differ is scored in full."""
    lengths = cloze.lengths()
    answer_of = _answer_of(cloze)
    own_prefix = (answer_of == np.arange(len(lengths))) | ~cloze.prefix_shared
    first_scored = np.where(own_prefix, cloze.verse_start, cloze.blank_start)
    batches = length_batches(lengths, seqs, batch_tokens)
    bar = Progress(len(batches), "cloze/model", every=25) if progress else None
    for done, batch in enumerate(batches, start=1):
        x = pad_rows([cloze.tokens[j] for j in batch])
        row, pos = _targets(first_scored[batch], lengths[batch])
        rows_t, pos_t = torch.from_numpy(row).to(device), torch.from_numpy(pos).to(device)
        # position t - 1 predicts token t
        picked = torch.log_softmax(logits_at(model, torch.from_numpy(x).to(device), rows_t, pos_t - 1, path), dim=-1)
        target = torch.from_numpy(x[row, pos]).to(device)
        logprob = picked.gather(1, target[:, None]).squeeze(1).double().cpu().numpy()
        _add_parts(parts, cloze, batch[row], pos, logprob)
        if bar:
            bar.update(done)
    borrow = seqs[~own_prefix[seqs]]
    parts[borrow, 0] = parts[answer_of[borrow], 0]


def _head_logprobs(model: Llama, h: torch.Tensor, rows: np.ndarray, cols: np.ndarray, targets: np.ndarray,
                   device: torch.device | str) -> np.ndarray:
    """log p(targets) (float64) from the hidden states h (B, T, C) at (rows, cols): the output head and the
    log-softmax at those positions only."""
    rows_t, cols_t = torch.from_numpy(rows).to(device), torch.from_numpy(cols).to(device)
    picked = torch.log_softmax(model.lm_head(h[rows_t, cols_t]).float(), dim=-1)
    return picked.gather(1, torch.from_numpy(targets).to(device)[:, None]).squeeze(1).double().cpu().numpy()


def _prefix_batches(cloze: ClozeSet, prefix_len: np.ndarray, batch_tokens: int) -> list[np.ndarray]:
    """Items cut into batches of ~batch_tokens tokens: the padded prefixes plus the padded tails of the candidates
    that share them. Sorted by their longest tail, which runs once per candidate, where a prefix runs once per item:
    little padding where it costs the most."""
    K, n_items = cloze.n_candidates, len(cloze.items)
    shared = cloze.prefix_shared.reshape(n_items, K)
    tail_len = (cloze.lengths() - 1 - cloze.blank_start).reshape(n_items, K)  # each tail's input tokens
    rows_of = shared.sum(axis=1)
    longest_of = np.where(shared, tail_len, 0).max(axis=1)
    batches: list[list[int]] = []
    rows = longest_prefix = 0
    for item in np.argsort(-longest_of, kind="stable"):
        more_rows, more_prefix = rows + rows_of[item], max(longest_prefix, prefix_len[item])
        if batches and (len(batches[-1]) + 1) * more_prefix + more_rows * longest_of[batches[-1][0]] <= batch_tokens:
            batches[-1].append(item)
            rows, longest_prefix = more_rows, more_prefix
        else:
            batches.append([item])
            rows, longest_prefix = rows_of[item], prefix_len[item]
    return [np.array(b, dtype=np.int64) for b in batches]


def _prefix_parts(model: Llama, cloze: ClozeSet, parts: np.ndarray, device: torch.device | str, batch_tokens: int,
                  progress: bool) -> None:
    """Adds every sequence's parts to `parts`. Each item's prefix (the tokens before the blank, the same for its
    candidates: the model is causal) is run once (`Llama.read_prefixes`): it scores the verse's tokens before the
    blank, and its last position every candidate's first piece. Each candidate's tail (the blank and what follows,
    but the last token, which is only predicted) then runs against the prefix's cached keys and values
    (`Llama.continue_prefixes`) and scores the rest. A candidate whose prefix tokens differ from the answer's is
    scored in full (`_full_parts`)."""
    K, n_items = cloze.n_candidates, len(cloze.items)
    lengths = cloze.lengths()
    answer_seq = np.arange(n_items) * K + cloze.answer
    prefix_len = cloze.blank_start[answer_seq]  # >= 1: the verse separator comes first
    shared = cloze.prefix_shared.reshape(n_items, K)
    batches = _prefix_batches(cloze, prefix_len, batch_tokens)
    bar = Progress(len(batches), "cloze/model", every=25) if progress else None
    for done, items in enumerate(batches, start=1):
        x = pad_rows([cloze.tokens[answer_seq[i]][: prefix_len[i]] for i in items])  # (N, P)
        h, cache = model.read_prefixes(torch.from_numpy(x).to(device), torch.from_numpy(prefix_len[items]).to(device))
        # the verse before the blank, on the answer's sequence (the others borrow it below): t - 1 predicts t
        row, pos = _targets(cloze.verse_start[answer_seq[items]], prefix_len[items])
        logprob = _head_logprobs(model, h, row, pos - 1, x[row, pos], device)
        _add_parts(parts, cloze, answer_seq[items][row], pos, logprob)
        seq = (items[:, None] * K + np.arange(K))[shared[items]]  # the candidates sharing it, item-major
        prefix_of = np.repeat(np.arange(len(items)), shared[items].sum(axis=1))
        blank_start = cloze.blank_start[seq]
        tail = pad_rows([cloze.tokens[j][b:] for j, b in zip(seq, blank_start)])  # (R, W): token t at t - blank_start
        # every candidate's first piece, from the prefix's last position: one output head per item, not per candidate
        last = torch.from_numpy(prefix_len[items] - 1).to(device)
        last_logprobs = torch.log_softmax(model.lm_head(h[torch.arange(len(items), device=device), last]).float(),
                                          dim=-1)  # (N, V)
        first = last_logprobs[torch.from_numpy(prefix_of).to(device), torch.from_numpy(tail[:, 0]).to(device)]
        _add_parts(parts, cloze, seq, blank_start, first.double().cpu().numpy())
        # the rest: the tail but its last column as input (a row's last token is only predicted; shorter rows' is
        # padding after everything they score)
        hc = model.continue_prefixes(torch.from_numpy(tail[:, :-1]).to(device), cache,
                                     torch.from_numpy(prefix_of).to(device))
        row, pos = _targets(blank_start + 1, lengths[seq])
        col = pos - blank_start[row]
        logprob = _head_logprobs(model, hc, row, col - 1, tail[row, col], device)
        _add_parts(parts, cloze, seq[row], pos, logprob)
        if bar:
            bar.update(done)
    answer_of = _answer_of(cloze)
    borrow = cloze.prefix_shared & (answer_of != np.arange(len(lengths)))
    parts[borrow, 0] = parts[answer_of[borrow], 0]
    _full_parts(model, cloze, parts, np.flatnonzero(~cloze.prefix_shared), device, batch_tokens, False, "head")


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
