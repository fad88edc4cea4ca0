"""The masking rates the bench measures on its check batches, against what each provider's configuration implies:
masked words vs the sum of the probabilities an independent plain-Python statement of its rules gives each
occurrence (a Poisson-binomial z-test); for the HF collator, 15% of non-special tokens selected, 80% of those
replaced by [MASK], half of the rest kept. The bench refuses to time a provider whose rate is off (|z| > Z_MAX).
Position-by-position correctness of the Genesis masker lives in tests/test_masking.py."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from bench.notes_baselines import notes_expected_probs
from genesis.flags import IGNORE_INDEX
from genesis.lexicon import CLASSES, find_matches
from genesis.masking import ConnectiveMasker, MaskOutput

Z_MAX = 5.0  # |z| above this fails a rate check (the draws are seeded, so a pass is reproducible, not luck)


@dataclass
class Tally:
    """Masked count vs the sum of per-trial probabilities (a Poisson-binomial): mean and variance."""

    observed: float = 0.0
    expected: float = 0.0
    variance: float = 0.0
    trials: int = 0
    errors: list[str] = field(default_factory=list)

    def add(self, observed: float, probs: np.ndarray) -> None:
        self.observed += float(observed)
        self.expected += float(probs.sum())
        self.variance += float((probs * (1 - probs)).sum())
        self.trials += int(probs.size)

    @property
    def z(self) -> float:
        if self.variance == 0:
            return 0.0 if self.observed == self.expected else math.inf
        return (self.observed - self.expected) / math.sqrt(self.variance)

    def result(self, provider: str, strategy: str, what: str) -> dict:
        ok = not self.errors and abs(self.z) <= Z_MAX and self.trials > 0
        errors = self.errors[:5] + ([f"{len(self.errors) - 5} more"] if len(self.errors) > 5 else [])
        if self.trials == 0:
            errors.append("no trials: nothing to check")
        return {"provider": provider, "strategy": strategy, "what": what, "trials": self.trials,
                "observed": self.observed, "expected": round(self.expected, 2),
                "std": round(math.sqrt(self.variance), 2), "z": round(self.z, 2), "passed": ok, "errors": errors}


def genesis_probability(masker: ConnectiveMasker, row: list[int], verse_row: list[bool] | None, start: int,
                        entry: int, flags: dict[str, list[bool]]) -> float:
    """The masking probability of the match at `start`, as docs/masking.md defines it, in plain
    Python (independent of the tables the torch path and the kernel read)."""
    cfg, lex = masker.config, masker.lexicon
    weight = float(lex.entry_weight[entry])
    if cfg.strategy == "uniform":
        p = cfg.mask_prob
    elif cfg.strategy == "weighted":
        p = cfg.base_probability * weight
    else:
        if verse_row is not None:
            verse_initial = verse_row[start]
        else:
            verse_initial = start > 0 and flags["separator"][row[start - 1]]
        lookback = cfg.lookback
        if cfg.clause_length == "preceding":  # skip the punctuation/newline run, count the clause before it
            def stop(t: int) -> bool:
                return flags["boundary"][t] or flags["separator"][t]

            j, skipped = start - 1, 0
            while j >= 0 and skipped < lookback and stop(row[j]):
                j, skipped = j - 1, skipped + 1
            clause = 0
            if skipped < lookback:
                while j >= 0 and clause < lookback and not stop(row[j]):
                    j, clause = j - 1, clause + 1
        else:  # distance back to the last boundary, the row start counting as one, capped
            clause = min(start + 1, lookback)
            for back in range(1, lookback):
                if start - back >= 0 and flags["boundary"][row[start - back]]:
                    clause = back
                    break
        rule = next((r for r in cfg.rules if r.matches(bool(verse_initial), clause)), None)
        p = rule.p if rule is not None else 0.0
        if cfg.structural_weights:
            p *= weight
    return min(max(p, 0.0), 1.0)


def check_genesis(masker: ConnectiveMasker, x: torch.Tensor, verse_start: torch.Tensor | None, out: MaskOutput,
                  tally: Tally) -> None:
    """The masked words of `out` (a match counts as masked where its first piece is) against the probability of
    every match `find_matches` (the lexicon's plain-Python oracle) finds; a causal chain is drawn at its head's."""
    lex = masker.lexicon
    flags = {"boundary": lex.clause_boundary.tolist(), "separator": lex.verse_separator.tolist()}
    X, M = x.cpu().numpy(), out.mask.cpu().numpy()
    V = verse_start.cpu().numpy() if verse_start is not None else None
    probs, masked = [], 0
    causal, gap = CLASSES.index("causal"), masker.config.chain_gap
    for b in range(X.shape[0]):
        row = X[b].tolist()
        verse_row = V[b].tolist() if V is not None else None
        last_causal, head_p = None, 0.0
        for start, _, entry in find_matches(row, lex):
            p = genesis_probability(masker, row, verse_row, start, entry, flags)
            if masker.config.chain and lex.entry_class[entry] == causal:
                if last_causal is None or start - last_causal > gap:
                    head_p = p
                p, last_causal = head_p, start
            probs.append(p)
            masked += int(M[b, start])
    tally.add(masked, np.array(probs))
    if masker.config.replacement == "mask" and not (out.input_ids.cpu().numpy()[M] == masker.mask_id).all():
        tally.errors.append("a masked position does not hold the mask id")


def check_loop(ds, x: np.ndarray, y: np.ndarray, vs: np.ndarray, out, vocab_size: int, tally: Tally) -> None:
    masked_x, out_y = out[0].numpy(), out[1].numpy()
    changed = masked_x != x
    probs = notes_expected_probs(ds, x, vs, vocab_size)
    tally.add(changed.sum(), probs[probs > 0])
    if not (masked_x[changed] == ds.mask_token_id).all():
        tally.errors.append("a changed position does not hold the mask id")
    if (changed & (probs == 0)).any():
        tally.errors.append("a position the rules never mask was masked")
    if not np.array_equal(out_y, y):
        tally.errors.append("targets changed")


def check_hf(collator, x: torch.Tensor, out: dict, selection: Tally, replacement: Tally, kept: Tally) -> None:
    special = torch.tensor(sorted(collator.tokenizer.all_special_ids))
    eligible = ~torch.isin(x, special)
    selected = out["labels"] != IGNORE_INDEX
    selection.add(selected.sum().item(), np.full(int(eligible.sum()), 0.15))
    mask_id = collator.tokenizer.mask_token_id
    masked = out["input_ids"] == mask_id
    replacement.add((masked & selected).sum().item(), np.full(int(selected.sum()), 0.8))
    # the other 20%: half get a uniformly random id (which is the original with probability 1/V), half are kept
    rest = selected & ~masked
    keep_p = 0.5 + 0.5 / len(collator.tokenizer)
    kept.add((rest & (out["input_ids"] == x)).sum().item(), np.full(int(rest.sum()), keep_p))
    if (selected & ~eligible).any():
        selection.errors.append("a special token was selected")
    if not torch.equal(out["labels"][selected], x[selected]):
        selection.errors.append("labels of selected tokens are not the original ids")
    if not torch.equal(out["input_ids"][~selected], x[~selected]):
        selection.errors.append("an unselected token changed")


def rate_checks(providers: dict, loop_datasets: dict, check_work, vocab_size: int, maskers: dict,
                collator) -> list[dict]:
    """Run every provider on the check batches and compare its masking with what its configuration implies."""
    results = []
    for (name, strategy), provider in providers.items():
        tallies = [Tally()] if name != "hf-collator" else [Tally(), Tally(), Tally()]
        for i, batch in enumerate(check_work.cpu):  # call(i) masks batch i of the workload
            if name == "loop":
                out = provider.call(i)
                check_loop(loop_datasets[strategy], batch.x.numpy(), batch.y.numpy(), batch.verse_start.numpy(),
                           out, vocab_size, tallies[0])
            elif name == "hf-collator":
                check_hf(collator, batch.x, provider.call(i), *tallies)
            else:
                out = provider.call(i)
                check_genesis(maskers[name, strategy], batch.x, batch.verse_start, out, tallies[0])
        if name == "loop":
            results.append(tallies[0].result(name, strategy, "masked connectives vs the notes' rule probabilities"))
        elif name == "hf-collator":
            results.append(tallies[0].result(name, strategy, "selected tokens vs 15% of non-special tokens"))
            results.append(tallies[1].result(name, strategy, "[MASK] replacements vs 80% of selected tokens"))
            results.append(tallies[2].result(name, strategy, "kept vs random ids: half of the other selected tokens "
                                                             "kept (+ random ids equal to the original)"))
        else:
            results.append(tallies[0].result(name, strategy, "masked words vs the configured rule probabilities"))
    return results
