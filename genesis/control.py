"""The control arm (masking.strategy = "random"): non-connective words masked at a reference strategy's rate.

A model trained with connectives masked differs from an unmasked one in two ways: it is denied the connectives, and
it sees the mask token as an input. The control arm keeps the second and drops the first. At run set-up,

1. each lexicon connective that occurs in the training split is paired with the non-connective word of closest
   training frequency (greedy, most frequent connective first, without replacement; alphabetic words only, case
   folded; never a lexicon word, nor one that differs from a lexicon word by a final "s");
2. the control words are resolved against the tokenizer as a custom lexicon is (`default_connectives = false` with
   each word in [masking.connectives], weight 1, the class of the connective it stands for);
3. the reference masker (masking.control_reference with the run's other [masking] keys, schedule constant) masks
   the training split, read as rows of seq_len with its verse_start flags, at CALIBRATION_STEPS steps; the control
   words are masked uniformly with p = its mean masked tokens / the control words' tokens in the same rows, so the
   expected masked tokens per token equal the reference's (p is capped at 1, with a warning, where the control words
   are too rare).

All of it is a function of the tokenizer, the training tokens, the [masking] keys and the seed: a resumed run gets
the same words and p. Build it with `ConnectiveMasker.control(tokenizer, config, tokens, ...)`. Semantics and the
choices behind them: docs/masking.md, "Control arm".
"""

from __future__ import annotations

import dataclasses
import re
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from genesis.config import ConnectiveEntry, MaskingConfig
from genesis.errors import InputError

CALIBRATION_STEPS = 4  # reference draws over the whole split: ~0.4% relative noise on the KJV's ~900k tokens
CALIBRATION_ROWS = 256  # rows masked per call while calibrating (bounds the memory of the masker's outputs)
# words as the control lexicon counts them: letters, joined by apostrophes ("lord's" is one word, not "lord" + "s")
_WORD = re.compile(r"[^\W\d_]+(?:['’][^\W\d_]+)*")


@dataclass
class ControlArm:
    """What the control arm chose at set-up: its words, its probability and how the probability was found."""

    reference: str  # the strategy whose realised rate the control arm matches
    pairs: dict[str, str]  # connective -> its control word, in the order chosen (most frequent connective first)
    frequencies: dict[str, tuple[int, int]]  # connective -> (its training count, its control word's)
    probability: float  # p: every control word is masked with it
    tokens: int  # tokens of the training split the rates were measured on (whole rows of seq_len)
    reference_masked_tokens: float  # the reference masker's masked tokens in them, mean over CALIBRATION_STEPS
    control_tokens: int  # the control words' tokens in them (every piece of every match)
    capped: bool  # p would exceed 1: the control words are too rare to reach the reference's rate

    @property
    def reference_rate(self) -> float:
        """The reference's masked tokens per token."""
        return self.reference_masked_tokens / max(1, self.tokens)

    @property
    def expected_rate(self) -> float:
        """The control arm's expected masked tokens per token (= reference_rate unless capped)."""
        return self.probability * self.control_tokens / max(1, self.tokens)

    def record(self) -> dict[str, Any]:
        """A JSON-ready dict (metrics.jsonl's "control" record, the checkpoint's "control" entry)."""
        return {"reference": self.reference, "probability": self.probability, "reference_rate": self.reference_rate,
                "expected_rate": self.expected_rate, "tokens": self.tokens, "control_tokens": self.control_tokens,
                "capped": self.capped, "words": dict(self.pairs),
                "frequencies": {c: list(f) for c, f in self.frequencies.items()}}

    def describe(self) -> str:
        pairs = ", ".join(f"{c}->{w}" for c, w in self.pairs.items())
        return (f"control arm: {len(self.pairs)} control words ({pairs}) masked with p={self.probability:.4f}: "
                f"{self.reference}'s realised rate {100 * self.reference_rate:.3f}% of tokens / control words "
                f"{100 * self.control_tokens / max(1, self.tokens):.3f}% of tokens")


def word_counts(tokenizer: Any, tokens: np.ndarray) -> Counter:
    """Case-folded word counts of the text the token ids decode to."""
    from genesis.tokenizer import as_tokenizers

    text = as_tokenizers(tokenizer).decode(np.asarray(tokens, dtype=np.int64).tolist(), skip_special_tokens=True)
    return Counter(word.lower() for word in _WORD.findall(text))


def is_form_of(word: str, lexicon: set[str]) -> bool:
    """Whether `word` is a lexicon word or differs from one by a final "s" (afterward / afterwards)."""
    return word in lexicon or word + "s" in lexicon or (word.endswith("s") and word[:-1] in lexicon)


def pair_words(counts: Counter, connectives: list[str]) -> dict[str, tuple[str, int, int]]:
    """connective -> (control word, connective's count, control word's count): for each connective that occurs, most
    frequent first (ties alphabetical), the unused non-connective alphabetic word of closest count (ties: the more
    frequent, then alphabetical)."""
    lexicon = set(connectives)
    candidates = sorted(((n, w) for w, n in counts.items() if w.isalpha() and not is_form_of(w, lexicon)),
                        key=lambda nw: (nw[0], nw[1]))
    values = np.array([n for n, _ in candidates], dtype=np.int64)
    used = np.zeros(len(candidates), dtype=bool)
    pairs = {}
    for connective in sorted((c for c in connectives if counts[c] > 0), key=lambda c: (-counts[c], c)):
        if used.all():
            break
        distance = np.abs(values - counts[connective]).astype(np.float64)
        distance[used] = np.inf
        # closest count; among equals the larger count, then the first word alphabetically
        best = np.flatnonzero(distance == distance.min())
        top = [i for i in best if values[i] == values[best].max()]
        pick = min(top, key=lambda i: candidates[i][1])
        used[pick] = True
        pairs[connective] = (candidates[pick][1], counts[connective], int(values[pick]))
    return pairs


def calibration_rows(tokens: np.ndarray, verse_start: np.ndarray | None, seq_len: int
                     ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The split as whole rows of seq_len tokens (the tail that does not fill a row is left out)."""
    n = len(tokens) // seq_len * seq_len
    if n == 0:
        raise InputError(f"the control arm needs at least seq_len = {seq_len} training tokens (got {len(tokens)})")
    x = torch.from_numpy(np.asarray(tokens[:n]).astype(np.int64)).view(-1, seq_len)
    vs = None if verse_start is None else torch.from_numpy(np.asarray(verse_start[:n]).astype(bool)).view(-1, seq_len)
    return x, vs


def count_masked(masker: Any, x: torch.Tensor, vs: torch.Tensor | None, steps: range) -> tuple[float, int]:
    """(mean masked tokens over `steps`, matched tokens) of `masker` over the rows x, CALIBRATION_ROWS at a time."""
    masked, matched = 0, 0
    for step in steps:
        for row in range(0, x.shape[0], CALIBRATION_ROWS):
            part = slice(row, row + CALIBRATION_ROWS)
            out = masker(x[part], step=step, verse_start=None if vs is None else vs[part], row_offset=row)
            masked += int(out.mask.sum())
            if step == steps[0]:
                matched += int(out.matched.sum())
    return masked / len(steps), matched


def build_control(cls: type, tokenizer: Any, config: MaskingConfig, tokens: np.ndarray,
                  verse_start: np.ndarray | None, seq_len: int, mask_id: int, seed: int, rank: int, check_ids: bool,
                  log: Callable[[str], None] | None, warn: Callable[[str], None] | None) -> Any:
    """The control masker (`ConnectiveMasker.control` documents the arguments); its `control_arm` is the ControlArm."""
    from genesis.masking.tables import connectives_of, resolve_lexicon

    if config.strategy != "random":
        raise InputError(f"the control arm needs strategy = 'random' (got {config.strategy!r})")
    reference_cfg = dataclasses.replace(config, strategy=config.control_reference, schedule="constant",
                                        adaptive=False, chain=False)
    connectives = connectives_of(config)
    counts = word_counts(tokenizer, tokens)
    pairs = pair_words(counts, list(connectives))
    if not pairs:
        raise InputError("no connective of the lexicon occurs in the training tokens: the control arm has no rate "
                         "to match and no frequencies to match its words to")
    entries = {word: ConnectiveEntry(weight=1.0, cls=connectives[connective][1])
               for connective, (word, _, _) in pairs.items()}
    control_cfg = dataclasses.replace(config, default_connectives=False, mask_prob=1.0, connectives=entries)
    x, vs = calibration_rows(tokens, verse_start, seq_len)
    steps = range(CALIBRATION_STEPS)
    reference = cls(resolve_lexicon(tokenizer, reference_cfg), reference_cfg, mask_id, seed=seed, log=None)
    reference_masked, _ = count_masked(reference, x, vs, steps)
    lexicon = resolve_lexicon(tokenizer, control_cfg)
    _, control_tokens = count_masked(cls(lexicon, control_cfg, mask_id, seed=seed, log=None), x, vs, range(1))
    p = reference_masked / control_tokens if control_tokens else 1.0
    capped = p > 1.0
    arm = ControlArm(reference=config.control_reference, pairs={c: w for c, (w, _, _) in pairs.items()},
                     frequencies={c: (nc, nw) for c, (_, nc, nw) in pairs.items()}, probability=min(p, 1.0),
                     tokens=x.numel(), reference_masked_tokens=reference_masked, control_tokens=control_tokens,
                     capped=capped)
    if capped and warn is not None:
        warn(f"masking: the control words are too rare to reach {config.control_reference}'s rate "
             f"({100 * arm.reference_rate:.3f}% of tokens): masked with p = 1, {100 * arm.expected_rate:.3f}% of "
             f"tokens")
    masker = cls(lexicon, dataclasses.replace(control_cfg, mask_prob=arm.probability), mask_id, seed=seed, rank=rank,
                 check_ids=check_ids, log=log)
    masker.control_arm = arm
    masker.reference_lexicon = reference.lexicon
    return masker
