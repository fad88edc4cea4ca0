"""What a masker says about itself: the lexicon it resolved, its chains in a token stream, its one-line summary.
`ConnectiveMasker.report`, `.chain_statistics` and `.describe` call these."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from genesis.lexicon import CLASSES
from genesis.masking.torch_path import mask_torch


def masker_report(masker: Any, tokens: Any = None) -> str:
    """What each connective word resolved to in this tokenizer, and what did not resolve; with chain = true and
    a token stream `tokens` (e.g. the training split's ids), also its chains (see `masker_chain_statistics`)."""
    report = masker.lexicon.report()
    if masker.config.chain and tokens is not None:
        stats = masker_chain_statistics(masker, tokens)
        per_million = 1e6 / max(1, stats["tokens"])
        histogram = stats["histogram"]
        lengths = ", ".join([f"{n}: {count}" for n, count in histogram.items() if n < 10]
                            + [f"10+: {sum(count for n, count in histogram.items() if n >= 10)}"])
        report += (f"\nchains (chain_gap {masker.config.chain_gap}) in {stats['tokens']:,} tokens: "
                   f"{stats['chains']} chains ({stats['chains'] * per_million:.0f} per 1M tokens), "
                   f"{stats['members']} members ({stats['members'] * per_million:.0f} per 1M) of "
                   f"{stats['causal']} causal matches; chains by members: {lengths}")
    if not masker.enabled:
        return ("masking is disabled (enabled = false): the masker returns its inputs unchanged; the words "
                "below would be masked with it enabled\n" + report)
    return report


def masker_chain_statistics(masker: Any, tokens: Any) -> dict[str, Any]:
    """The chains of a token stream (1-D ids, e.g. the training split's, read as one row), found with this
    masker's matcher and chain_gap: {"tokens", "causal" (causal matches), "chains", "members" (matches in a
    chain, heads included), "histogram" ({members: chains}, by length)}."""
    if isinstance(tokens, torch.Tensor):
        ids = tokens.detach().to("cpu", torch.int64).reshape(1, -1)
    else:
        ids = torch.from_numpy(np.array(tokens, dtype=np.int64)).view(1, -1)  # a copy: memmaps are read-only
    every = dataclasses.replace(masker._host_tables, prob_table=torch.ones_like(masker._host_tables.prob_table),
                                use_cells=False, use_weight=False, bert=False, chain=False,
                                readout=False)
    _, _, _, entry, matched = mask_torch(ids, None, every, 0, 0, layout="sparse")  # p = 1: every match
    entry, matched, ids, h = entry.view(-1).numpy(), matched.view(-1).numpy(), ids.view(-1).numpy(), every.host()
    # a match starts at a matched piece that does not continue a word of the same entry
    continues = np.zeros_like(matched)
    continues[1:] = h.glue_left[ids[1:]] & h.word_end[ids[:-1]] & matched[:-1] & (entry[1:] == entry[:-1])
    starts = (matched & ~continues).nonzero()[0]
    causal = starts[h.entry_class[entry[starts]] == every.chain_class]
    linked = np.append(np.diff(causal) <= masker.config.chain_gap, False)  # each causal match to the next
    run_lengths = np.diff(np.flatnonzero(~linked), prepend=-1) if len(causal) else np.zeros(0, dtype=np.int64)
    chain_lengths = run_lengths[run_lengths > 1]
    lengths, counts = np.unique(chain_lengths, return_counts=True)
    return {"tokens": ids.size, "causal": len(causal), "chains": len(chain_lengths),
            "members": int(chain_lengths.sum()), "histogram": dict(zip(lengths.tolist(), counts.tolist()))}


def masker_description(masker: Any) -> str:
    """The masker in one line: strategy and rule, lexicon size, replacement, seed and classes."""
    c, lex = masker.config, masker.lexicon
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
    disabled = "" if masker.enabled else "disabled (enabled = false): inputs pass through unchanged | configured: "
    kind = "control words" if c.strategy == "random" else "connectives"
    return (f"masking: {disabled}{c.strategy} ({rule}) | {len(lex.words)} {kind} -> {n_patterns} token "
            f"patterns{unresolved} | replacement {c.replacement} | "
            f"seed {masker.seed} | classes {', '.join(CLASSES)}")
