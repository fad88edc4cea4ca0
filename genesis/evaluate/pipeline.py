"""An evaluation from items to result: the context built once per tokenizer, the scorers run, the breakdowns."""

from __future__ import annotations

import math
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from genesis.config import Config
from genesis.console import note
from genesis.corpus import GENRES, Verse, load_corpus
from genesis.data import split_verses
from genesis.device import keep_freed_memory
from genesis.evaluate.items import (
    CLAUSE_LABELS,
    POSITIONS,
    ClozeSet,
    EncodedSplit,
    Slot,
    build_cloze,
    clause_bucket,
    encode_split,
    find_slots,
    select_evenly,
)
from genesis.evaluate.link_metric import (
    PROBE_MAX_TRAIN,
    LinkItems,
    clause_stops,
    heldout_link_items,
    score_link,
    train_link_items,
)
from genesis.evaluate.run import EvalError, load_run, model_max_len, resolve_device, run_connectives
from genesis.evaluate.scorers import (
    DEFAULT_BATCH_TOKENS,
    DEFAULT_CONTEXT_K,
    KneserNeyTrigram,
    constant_shares,
    prediction_shares,
    score_class_head,
    score_cloze_model,
    score_cloze_ngram,
    score_masked_context,
    score_next_token,
)
from genesis.lexicon import CLASSES, ResolvedLexicon, resolve
from genesis.tokenizer import find_mask_id

BREAKDOWNS = ("word", "class", "position", "clause_length", "genre", "book")
# Item sets every metric is given on: every slot, and the slots whose word is used as a connective
# (`genesis.evaluate.senses`); the decision reads "conjunctive".
SETS = ("all", "conjunctive")
SET_BREAKDOWNS = ("word", "class")  # the breakdowns also given within each item set but "all"



@dataclass
class EvalContext:
    """Everything that does not depend on the model weights: built once, reused for every run that shares the
    tokenizer (the comparison runner evaluates many runs against one context)."""

    cfg: Config
    tokenizer: Tokenizer
    lex: ResolvedLexicon
    corpus: str
    split: str
    eval_split: EncodedSplit
    slots: list[Slot]
    cloze: ClozeSet
    train_counts: Counter  # (entry, verse_initial) -> occurrences in the run's training split
    ngram: KneserNeyTrigram
    max_items: int
    context_verses: int
    max_len: int
    probe_max_train: int  # training occurrences the frozen probe is fitted on (0: all)
    link_heldout: LinkItems  # the cloze items' answer sequences, the connective masked (`link_metric`)
    link_train: LinkItems  # the frozen probe's training occurrences, built the same way
    link_train_skipped: dict[str, int]
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def candidate_words(self) -> list[str]:
        return [self.lex.words[c] for c in self.cloze.candidates]

    def serves(self, cfg: Config, tokenizer: Tokenizer, max_len: int, corpus: str | None, split: str,
               max_items: int, context_verses: int, probe_max_train: int) -> bool:
        """Whether a run with these settings gets the same items and baselines from this context."""
        mine, theirs = self.cfg, cfg
        return (tokenizer.to_str() == self.tokenizer.to_str() and max_len == self.max_len
                and (corpus or cfg.data.corpus) == self.corpus and split == self.split
                and (max_items, context_verses, probe_max_train)
                == (self.max_items, self.context_verses, self.probe_max_train)
                and run_connectives(theirs.masking) == run_connectives(mine.masking)
                and (theirs.masking.clause_punctuation, theirs.masking.lookback, theirs.masking.verse_separator,
                     theirs.masking.clause_length)
                == (mine.masking.clause_punctuation, mine.masking.lookback, mine.masking.verse_separator,
                    mine.masking.clause_length)
                and theirs.data == mine.data and theirs.tokenizer.mask_token == mine.tokenizer.mask_token)


def load_split_verses(corpus: str, cfg: Config, split: str) -> list[Verse]:
    verses = load_corpus(corpus, "auto" if corpus != cfg.data.corpus else cfg.data.format, cfg.data.reference_pattern,
                         cfg.data.lines_per_chapter)
    return split_verses(verses, cfg.data, cfg.origin_of)[split]  # errors name the checkpoint its config came from


@dataclass
class ClozeItems:
    """The items of a split and the cloze set built on them: what the scorers and the lm-eval task share."""

    lex: ResolvedLexicon
    eval_split: EncodedSplit
    slots: list[Slot]
    cloze: ClozeSet


def build_items(cfg: Config, tokenizer: Tokenizer, max_len: int, corpus: str, split: str = "heldout",
                max_items: int = 0, context_verses: int = 0, say: Callable[[str], None] = note,
                timings: dict[str, float] | None = None) -> ClozeItems:
    timings = {} if timings is None else timings
    t0 = time.time()
    eval_verses = load_split_verses(corpus, cfg, split)  # first: a bad corpus fails before the slow set-up
    timings["corpora_s"] = time.time() - t0
    t0 = time.time()
    say("resolving the connective lexicon against the run's tokenizer")
    lex = resolve(tokenizer, run_connectives(cfg.masking), clause_punctuation=cfg.masking.clause_punctuation,
                  verse_separator=cfg.masking.verse_separator)
    candidates = [e for e, w in enumerate(lex.words) if w not in lex.unresolved]
    if not candidates:
        raise EvalError("no connective of the run's lexicon has a token pattern in its tokenizer")
    timings["lexicon_s"] = time.time() - t0
    t0 = time.time()
    eval_split = encode_split(eval_verses, tokenizer)
    slots = find_slots(eval_split, lex, cfg.masking.lookback, cfg.masking.clause_length)
    if not slots:
        raise EvalError(f"{corpus}: no connective occurs in the {split} split")
    say(f"{corpus} {split}: {len(eval_split.verses):,} verses, {len(eval_split.stream):,} tokens, "
        f"{len(slots):,} connective slots")
    chosen = select_evenly(slots, max_items)
    cloze = build_cloze(eval_split, chosen, tokenizer, lex, candidates, max_len, context_verses)
    if not cloze.items:
        raise EvalError(f"no cloze item fits the model's {max_len} tokens ({cloze.skipped})")
    timings["items_s"] = time.time() - t0
    say(f"cloze: {len(cloze.items):,} items x {cloze.n_candidates} candidates = {len(cloze.tokens):,} sequences"
        + (f" (skipped {cloze.skipped})" if cloze.skipped else ""))
    return ClozeItems(lex, eval_split, slots, cloze)


def build_context(cfg: Config, tokenizer: Tokenizer, max_len: int, corpus: str | None = None, split: str = "heldout",
                  max_items: int = 0, context_verses: int = 0, say: Callable[[str], None] = note,
                  probe_max_train: int = PROBE_MAX_TRAIN) -> EvalContext:
    timings: dict[str, float] = {}
    corpus = corpus or cfg.data.corpus
    items = build_items(cfg, tokenizer, max_len, corpus, split, max_items, context_verses, say, timings)
    t0 = time.time()
    train_verses = load_split_verses(cfg.data.corpus, cfg, "train")
    train_split = encode_split(train_verses, tokenizer, keep_offsets=False)
    train_slots = find_slots(train_split, items.lex, cfg.masking.lookback, cfg.masking.clause_length)
    train_counts = Counter((s.entry, s.verse_initial) for s in train_slots)
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    ngram = KneserNeyTrigram(train_split.stream, vocab_size)
    timings["baselines_s"] = time.time() - t0
    t0 = time.time()
    mask_id, stops = find_mask_id(tokenizer, cfg.tokenizer.mask_token), clause_stops(items.lex, vocab_size)
    link_heldout = heldout_link_items(items.cloze, mask_id, stops)
    link_train, link_train_skipped = train_link_items(train_split, train_slots, tokenizer, items.cloze.candidates,
                                                      max_len, context_verses, mask_id, stops, probe_max_train)
    timings["link_items_s"] = time.time() - t0
    return EvalContext(cfg=cfg, tokenizer=tokenizer, lex=items.lex, corpus=corpus, split=split,
                       eval_split=items.eval_split, slots=items.slots, cloze=items.cloze, train_counts=train_counts,
                       ngram=ngram, max_items=max_items, context_verses=context_verses, max_len=max_len,
                       probe_max_train=probe_max_train, link_heldout=link_heldout, link_train=link_train,
                       link_train_skipped=link_train_skipped,
                       timings=timings)


def _majority(counts: Counter, candidates: list[int], verse_initial: bool | None) -> int:
    """Index into candidates of the most frequent training connective (ties: lexicon order)."""
    totals = [sum(n for (e, vi), n in counts.items() if e == c and (verse_initial is None or vi == verse_initial))
              for c in candidates]
    return int(np.argmax(totals))


def _group_keys(slot: Slot, lex: ResolvedLexicon) -> dict[str, str]:
    return {
        "word": lex.words[slot.entry],
        "class": CLASSES[int(lex.entry_class[slot.entry])],
        "position": POSITIONS[0] if slot.verse_initial else POSITIONS[1],
        "clause_length": clause_bucket(slot.clause_len),
        "genre": slot.genre,
        "book": slot.book,
    }


def _group_order(dim: str, keys: list[str], lex: ResolvedLexicon) -> list[str]:
    present = list(dict.fromkeys(keys))
    fixed = {"class": CLASSES, "position": POSITIONS, "clause_length": CLAUSE_LABELS,
             "genre": (*GENRES, "other"), "word": lex.words}.get(dim)
    return [k for k in fixed if k in present] if fixed else present  # books: canonical order of appearance


def set_masks(slots: list[Slot]) -> dict[str, np.ndarray]:
    """A boolean mask over `slots` per item set of `SETS`."""
    conjunctive = np.fromiter((s.conjunctive for s in slots), dtype=bool, count=len(slots))
    return {"all": np.ones(len(slots), dtype=bool), "conjunctive": conjunctive}


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if len(values) else float("nan")


def _breakdowns(credit: np.ndarray, slots: list[Slot], lex: ResolvedLexicon, dims: tuple[str, ...]
                ) -> dict[str, dict[str, dict[str, float | int]]]:
    keys = [_group_keys(s, lex) for s in slots]
    breakdowns = {}
    for dim in dims:
        labels = [k[dim] for k in keys]
        groups = {}
        for label in _group_order(dim, labels, lex):
            mine = np.array([lab == label for lab in labels])
            groups[label] = {"accuracy": float(credit[mine].mean()), "n": int(mine.sum())}
        breakdowns[dim] = groups
    return breakdowns


def summarize(credit: np.ndarray, slots: list[Slot], lex: ResolvedLexicon) -> dict[str, Any]:
    """Accuracy overall (the "all" set), per item set (`SETS`) and per group of every breakdown (`BREAKDOWNS`; and of
    `SET_BREAKDOWNS` within each set but "all"); slots with a nan credit (skipped) are left out."""
    keep = ~np.isnan(credit)
    sets = {}
    for name, mask in set_masks(slots).items():
        sets[name] = {"accuracy": _mean(credit[mask & keep]), "n": int((mask & keep).sum())}
        if name != "all":
            chosen = mask & keep
            sets[name]["breakdowns"] = _breakdowns(credit[chosen], [s for s, c in zip(slots, chosen) if c], lex,
                                                   SET_BREAKDOWNS)
    kept = [s for s, k in zip(slots, keep) if k]
    out: dict[str, Any] = {"accuracy": _mean(credit[keep]), "n": int(keep.sum()), "sets": sets}
    out["breakdowns"] = _breakdowns(credit[keep], kept, lex, BREAKDOWNS)
    return out


def evaluate_model(model: torch.nn.Module, ctx: EvalContext, device: torch.device | str = "cpu",
                   batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = True,
                   context_k: int = DEFAULT_CONTEXT_K) -> dict[str, Any]:
    """All metrics of one model on a prepared context, as a JSON-ready dict (items included, for paired tests)."""
    if model_max_len(model) < ctx.max_len:
        raise EvalError(f"the context was built for {ctx.max_len}-token sequences; the model takes "
                        f"{model_max_len(model)}")
    lex, cloze = ctx.lex, ctx.cloze
    timings = dict(ctx.timings)
    t0 = time.time()
    nt = score_next_token(model, ctx.eval_split.stream, ctx.slots, device, batch_tokens, progress)
    timings["next_token_s"] = time.time() - t0
    next_token = summarize(nt.credit, ctx.slots, lex)
    scored = ~np.isnan(nt.credit)
    next_token.update({
        "first_piece_accuracy": float(np.mean(nt.first_piece_credit[scored])),
        "mean_logprob": float(np.mean(nt.logprob[scored])),
        "skipped": int((~scored).sum()),
    })
    for name, mask in set_masks(ctx.slots).items():
        next_token["sets"][name].update(first_piece_accuracy=_mean(nt.first_piece_credit[mask & scored]),
                                        mean_logprob=_mean(nt.logprob[mask & scored]))

    t0 = time.time()
    masked_context = masked_context_result(model, ctx, context_k, device, batch_tokens, progress)
    timings["masked_context_s"] = time.time() - t0

    t0 = time.time()
    model_scores = score_cloze_model(model, cloze, device, batch_tokens, progress)
    timings["cloze_model_s"] = time.time() - t0
    t0 = time.time()
    ngram_scores = score_cloze_ngram(ctx.ngram, cloze)
    timings["cloze_ngram_s"] = time.time() - t0
    n, K = len(cloze.items), cloze.n_candidates
    initial = np.array([s.verse_initial for s in cloze.items])
    positional = np.where(initial, _majority(ctx.train_counts, cloze.candidates, True),
                          _majority(ctx.train_counts, cloze.candidates, False))
    shares = {
        "model_verse": prediction_shares(model_scores.verse),
        "model_suffix": prediction_shares(model_scores.suffix),
        "kn3_verse": prediction_shares(ngram_scores.verse),
        "kn3_suffix": prediction_shares(ngram_scores.suffix),
        "majority": constant_shares(n, K, np.full(n, _majority(ctx.train_counts, cloze.candidates, None))),
        "positional_majority": constant_shares(n, K, positional),
    }
    link = None
    if hasattr(model, "hidden"):  # every Genesis model; the tests' logit-only stubs have no hidden states
        link_scores, link, link_timings = score_link(model, ctx.link_heldout, ctx.link_train, cloze.candidates,
                                                     len(lex.words), device, batch_tokens, progress)
        shares.update({name: prediction_shares(scores) for name, scores in link_scores.items()})
        link["probe"]["max_train"], link["probe"]["skipped"] = ctx.probe_max_train, ctx.link_train_skipped
        timings.update(link_timings)
    words = ctx.candidate_words
    scorers, confusion, credits = {}, {}, {}
    for name, share in shares.items():
        credit = share[np.arange(n), cloze.answer]
        credits[name] = credit
        scorers[name] = summarize(credit, cloze.items, lex)
        matrix = np.zeros((K, K))
        np.add.at(matrix, cloze.answer, share)
        confusion[name] = matrix.round(6).tolist()
    cloze_items = []
    for i, slot in enumerate(cloze.items):
        cloze_items.append({
            "id": slot.item_id, "word": lex.words[slot.entry], "conjunctive": slot.conjunctive,
            "verse_initial": slot.verse_initial, "clause_len": slot.clause_len, "book": slot.book,
            "credit": {name: round(float(credits[name][i]), 6) for name in shares},
            "predicted": {name: words[int(np.argmax(shares[name][i]))] for name in ("model_verse", "model_suffix")},
        })
    next_items = [{"id": s.item_id, "word": lex.words[s.entry], "conjunctive": s.conjunctive,
                   "credit": round(float(c), 6), "logprob": round(float(lp), 4)}
                  for s, c, lp in zip(ctx.slots, nt.credit, nt.logprob) if not math.isnan(c)]
    head = {}
    if getattr(model, "class_head", None) is not None:
        t0 = time.time()
        head = {"class_head": class_head_result(model, ctx, device, batch_tokens, progress)}
        timings["class_head_s"] = time.time() - t0
    return {
        "next_token": next_token,
        "masked_context": masked_context,
        **head,
        **({"link": link} if link is not None else {}),
        "cloze": {
            "n_items": n, "n_candidates": K, "candidates": words, "skipped": cloze.skipped,
            "context_verses": ctx.context_verses, "scorers": scorers,
            "confusion": {"labels": words, "rows": "true connective", "columns": "predicted", "matrices": confusion},
        },
        "items": {"next_token": next_items, "cloze": cloze_items},
        "timings": {k: round(v, 2) for k, v in timings.items()},
    }


def masked_context_result(model: torch.nn.Module, ctx: EvalContext, k: int, device: torch.device | str = "cpu",
                          batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = True) -> dict[str, Any]:
    """Held-out loss on the k tokens after each connective with every held-out connective masked in the input, the
    same with them visible, and the gap (masked - visible): means over the slots that have tokens after them. Also
    the same tokens with every held-out connective deleted from the input ("deleted_loss") and the deletion gap
    (deleted - visible), over the slots with a deleted score (`score_masked_context`; all of them unless one opens
    the stream and only one token follows it). On every item set (`SETS`; the top-level figures are the "all" set)."""
    mask_id = find_mask_id(ctx.tokenizer, ctx.cfg.tokenizer.mask_token)
    scores = score_masked_context(model, ctx.eval_split.stream, ctx.slots, mask_id, k, device, batch_tokens, progress)
    scored = ~np.isnan(scores.visible)
    both = scored & ~np.isnan(scores.deleted)
    sets = {}
    for name, mask in set_masks(ctx.slots).items():
        visible, masked = _mean(scores.visible[mask & scored]), _mean(scores.masked[mask & scored])
        deleted = _mean(scores.deleted[mask & both])
        sets[name] = {"n": int((mask & scored).sum()), "visible_loss": visible, "masked_loss": masked,
                      "gap": masked - visible, "deleted_loss": deleted,
                      "deletion_gap": _mean(scores.deleted[mask & both] - scores.visible[mask & both])}
    return {"k": k, **sets["all"], "sets": sets}


def class_head_result(model: torch.nn.Module, ctx: EvalContext, device: torch.device | str = "cpu",
                      batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = True) -> dict[str, Any]:
    """The class head's accuracy at every slot (`score_class_head`), its breakdowns and confusion matrix, and the
    majority-class baseline: the class most frequent among the connectives of the run's training split."""
    lex = ctx.lex
    if model.class_head.out_features != len(CLASSES):
        raise EvalError(f"the model's class head has {model.class_head.out_features} outputs; Genesis's classes "
                        f"are {len(CLASSES)} ({', '.join(CLASSES)})")
    mask_id = find_mask_id(ctx.tokenizer, ctx.cfg.tokenizer.mask_token)
    truth = np.array([int(lex.entry_class[s.entry]) for s in ctx.slots], dtype=np.int64)
    scores = score_class_head(model, ctx.eval_split.stream, ctx.slots, truth, mask_id, device, batch_tokens, progress)
    scored = ~np.isnan(scores.credit)
    per_class = np.zeros(len(CLASSES))
    for (entry, _), count in ctx.train_counts.items():
        per_class[int(lex.entry_class[entry])] += count
    majority = int(np.argmax(per_class))
    confusion = np.zeros((len(CLASSES), len(CLASSES)))
    np.add.at(confusion, truth[scored], scores.shares[scored])
    baseline = np.where(scored, (truth == majority).astype(np.float64), np.nan)
    return {
        "model": summarize(scores.credit, ctx.slots, lex),
        "majority_class": {"class": CLASSES[majority], **summarize(baseline, ctx.slots, lex)},
        "labels": list(CLASSES),
        "confusion": {"rows": "true class", "columns": "predicted", "matrix": confusion.round(6).tolist()},
    }


def evaluate_checkpoint(checkpoint: str | os.PathLike, corpus: str | None = None, split: str = "heldout",
                        max_items: int = 0, context_verses: int = 0, device: str = "auto",
                        batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = True,
                        ctx: EvalContext | None = None, context_k: int = DEFAULT_CONTEXT_K,
                        probe_max_train: int = PROBE_MAX_TRAIN) -> tuple[dict[str, Any], EvalContext]:
    """Load a run and evaluate it; pass `ctx` from an earlier call with the same tokenizer to skip the set-up."""
    dev = resolve_device(device)
    keep_freed_memory(dev)  # scoring's (B, T, V) logits: the same page-fault cost as training's
    run = load_run(checkpoint, dev)
    max_len = model_max_len(run.model)
    if ctx is None or not ctx.serves(run.cfg, run.tokenizer, max_len, corpus, split, max_items, context_verses,
                                     probe_max_train):
        ctx = build_context(run.cfg, run.tokenizer, max_len, corpus, split, max_items, context_verses,
                            probe_max_train=probe_max_train)
    result = evaluate_model(run.model, ctx, dev, batch_tokens, progress, context_k)
    header = {
        "checkpoint": str(run.checkpoint), "step": run.step, "checkpoint_identity": run.identity, "corpus": ctx.corpus,
        "split": ctx.split, "train_corpus": run.cfg.data.corpus, "device": str(dev), "max_items": max_items,
        "context_verses": context_verses, "seq_len": max_len, "clause_length_mode": run.cfg.masking.clause_length,
    }
    return {**header, **result}, ctx
