"""Masking throughput: the design notes' per-sample Dataset loop, Hugging Face's MLM collator and Genesis's
`ConnectiveMasker` (torch path on CPU and CUDA, fused Triton kernel on CUDA), on real KJV batches.

    python bench/mask_throughput.py                                     # CPU, one thread, default sizes
    python bench/mask_throughput.py --profile                           # + torch.profiler breakdown of one call
    python bench/mask_throughput.py --device cuda --json /tmp/cuda.json   # + torch path and kernel on the GPU
    python bench/mask_throughput.py --quick --sizes 2x64 --json /tmp/b.json   # smoke run (tests/test_bench.py)
    python bench/mask_throughput.py --chain --no-hf --sizes 64x1024       # + the Genesis rows with masking.chain on

Run from the repository root; the script puts the checkout on sys.path itself.

Providers, all fed the same windows of the token cache (`genesis.data`, cpu.toml's data and tokenizer):
* loop        the seed design notes' (dynamic_masking_implementation_guide.md) Strategy 1/2/3 Datasets, `__getitem__`
              as written there, collated like a DataLoader (`default_collate` of B items); timed: B x __getitem__ +
              stacking. Two fixes so the cost is faithful and the rates checkable: real punctuation ids instead of
              `token_id < 100`, and the token cache's verse_start flags for "verse-initial".
* hf-collator `transformers.DataCollatorForLanguageModeling` (MLM 15%, 80/10/10) on a PreTrainedTokenizerFast
              wrapping the project tokenizer, fed the B rows as tensors (its fastest input form: dicts cost ~3x).
* torch-cpu / torch-cuda   `ConnectiveMasker` with impl="torch", called as the trainer calls it (check_ids=False).
* triton-cuda `ConnectiveMasker` with impl="triton" (the fused kernel). Interpreter runs (TRITON_INTERPRET=1) are
              correctness checks only, never timed.
* NAME+chain  with --chain: each Genesis provider again with masking.chain = true (causal chains share their
              head's draw), checked like the others (a chained match's probability is its head's).

Checks run before anything is timed; the script exits 1 if one fails:
* kernel == torch path exactly (`torch.equal` on all four outputs): compiled on CUDA (against the torch path on CUDA,
  the dense layout, and on the CPU, the sparse one); on the CPU in a subprocess under TRITON_INTERPRET=1 (it must be
  set before the kernel is defined) against both layouts, skipped with a note without Triton;
* every provider's masking rate is what its configuration implies: masked words vs the sum of the probabilities
  that an independent re-statement of its rules (here, in plain Python) gives each occurrence, as a z-test; HF:
  15% of non-special tokens selected, 80% of those replaced by [MASK]. Genesis outputs are also checked position
  by position against `genesis.lexicon.find_matches` (whole words masked, classes and connective ids right).

Timing: warm-up, then repeats interleaved round-robin over the providers of one size, in a new random order every
round (load drift on a shared machine hits all alike; --order blocked times each provider's calls back to back
instead, on warm caches), as many as fit in --budget seconds per provider (between --min-repeats and --repeats);
median and p10/p90. On CUDA each call is timed with CUDA events after an L2 flush (device time; the flush also lets
the host run ahead, hiding launch overhead) and again host-synchronised (wall time, what a step pays).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib.util
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from genesis.config import ConfigError, load_config  # noqa: E402
from genesis.data import Batch, gather_windows, get_batch, prepare, window_starts  # noqa: E402
from genesis.device import flush_denormals  # noqa: E402
from genesis.flags import IGNORE_INDEX  # noqa: E402
from genesis.lexicon import CLASSES, find_matches  # noqa: E402
from genesis.masking import ConnectiveMasker, MaskOutput  # noqa: E402


def _source_hashes() -> dict[str, str]:
    """sha256 (12 hex digits) of the code this process times (masking, lexicon, batches, kernel, this script), hashed
    now, not at the end, and read from the imported modules' own files (a second checkout beside an editable install
    can import another copy)."""
    import genesis.data as data_module
    import genesis.lexicon as lexicon_module
    import genesis.masking as masking_module

    files = {f"genesis/masking/{path.name}": str(path)
             for path in sorted(Path(masking_module.__file__).parent.glob("*.py"))}
    files.update({"genesis/lexicon.py": lexicon_module.__file__, "genesis/data.py": data_module.__file__,
                  "bench/mask_throughput.py": __file__})
    for module, name in (("genesis.kernels.mask", "kernels/mask.py"),
                         ("genesis.kernels.experimental.mask_v2", "kernels/experimental/mask_v2.py")):
        spec = importlib.util.find_spec(module)  # located, not imported (Triton may be missing)
        if spec is not None and spec.origin:
            files[name] = spec.origin
    hashes = {}
    for name, file in files.items():
        path = Path(file).resolve()
        hashes[name] = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
        if path != (ROOT / name).resolve():
            hashes[name + " (imported from)"] = str(path)
    return hashes


SOURCE_HASHES = _source_hashes()

DEFAULT_SIZES = "4x1024,64x1024,256x1024,1024x1024"
STRATEGIES = ("uniform", "weighted", "structural")
SEED = 1234  # masking seed of every Genesis masker (and the loop's / HF's RNG seeds derive from it)
DATA_SEED = 7  # window starts of the timed batches
Z_MAX = 5.0  # |z| above this fails a rate check (the draws are seeded, so a pass is reproducible, not luck)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# The design notes' datasets (the baseline), written as the notes write them


class NotesUniformDataset(torch.utils.data.Dataset):
    """Strategy 1 (uniform random masking of connectives), `__getitem__` as in the notes. Indexed by window start
    instead of idx * max_seq_len, so that a sampler can hand it the same windows as the other providers."""

    def __init__(self, tokens: list[int], tokenizer, max_seq_len: int, mask_prob: float = 0.3):
        self.max_seq_len, self.mask_prob = max_seq_len, mask_prob
        self.connective_words = ["therefore", "because", "so", "thus", "for", "but", "however", "yet", "although",
                                 "since", "moreover", "furthermore", "consequently"]
        self.connective_ids = set()
        for word in self.connective_words:
            for variant in (word.lower(), word.capitalize()):
                token_id = tokenizer.token_to_id(variant)
                if token_id is not None:
                    self.connective_ids.add(token_id)
        self.tokens = tokens  # the notes: tokenizer.encode(text).ids, a Python list
        self.mask_token_id = tokenizer.token_to_id("[MASK]") or 0

    def __len__(self):
        return len(self.tokens) - self.max_seq_len

    def __getitem__(self, start_idx):
        end_idx = start_idx + self.max_seq_len
        x = self.tokens[start_idx:end_idx].copy()
        y = self.tokens[start_idx + 1 : end_idx + 1].copy()
        for i in range(len(x)):
            if x[i] in self.connective_ids and random.random() < self.mask_prob:
                x[i] = self.mask_token_id
        return torch.tensor(x, dtype=torch.long), torch.tensor(y, dtype=torch.long)

    def prob_by_id(self, vocab_size: int) -> np.ndarray:
        p = np.zeros(vocab_size)
        p[list(self.connective_ids)] = self.mask_prob
        return p


class NotesWeightedDataset(torch.utils.data.Dataset):
    """Strategy 2 (weighted by difficulty), `__getitem__` as in the notes (tokens kept as a numpy array, as there)."""

    CONNECTIVE_WEIGHTS = {
        "therefore": 1.0, "Thus": 0.95, "consequently": 0.9, "accordingly": 0.9,
        "because": 0.7, "for": 0.6, "since": 0.65, "so": 0.5,
        "but": 0.3, "however": 0.35, "yet": 0.3, "moreover": 0.4, "furthermore": 0.4, "although": 0.45,
    }

    def __init__(self, tokens: list[int], tokenizer, max_seq_len: int, base_prob: float = 0.4):
        self.max_seq_len, self.base_prob = max_seq_len, base_prob
        self.token_weights = {}
        for word, weight in self.CONNECTIVE_WEIGHTS.items():
            for variant in (word.lower(), word.capitalize(), word.upper()):
                token_id = tokenizer.token_to_id(variant)
                if token_id is not None:
                    self.token_weights[token_id] = weight
        self.tokens = np.array(tokens)  # the notes: np.array(tokenizer.encode(text).ids), int64
        self.mask_token_id = tokenizer.token_to_id("[MASK]") or 0

    def __len__(self):
        return len(self.tokens) - self.max_seq_len

    def __getitem__(self, start_idx):
        end_idx = start_idx + self.max_seq_len
        x = self.tokens[start_idx:end_idx].copy()
        y = self.tokens[start_idx + 1 : end_idx + 1].copy()
        for i in range(len(x)):
            if x[i] in self.token_weights:
                weight = self.token_weights[x[i]]
                mask_prob = self.base_prob * weight
                if random.random() < mask_prob:
                    x[i] = self.mask_token_id
        return torch.tensor(x, dtype=torch.long), torch.tensor(y, dtype=torch.long)

    def prob_by_id(self, vocab_size: int) -> np.ndarray:
        p = np.zeros(vocab_size)
        for token_id, weight in self.token_weights.items():
            p[token_id] = self.base_prob * weight
        return p


class NotesStructuralDataset(torch.utils.data.Dataset):
    """Strategy 3 (structural position), `__getitem__` and `_get_clause_length` as in the notes, with real
    punctuation ids (tokens holding one of .,;:?!) and the token cache's verse-start positions."""

    def __init__(self, tokens: list[int], verse_start: np.ndarray, tokenizer, max_seq_len: int,
                 punctuation_ids: set[int]):
        self.max_seq_len = max_seq_len
        self.connective_ids = self._build_connective_set(tokenizer)
        self.tokens = tokens  # the notes: a Python list
        self.verse_token_positions = set(np.flatnonzero(verse_start).tolist())  # notes: a set of token positions
        self.punctuation_ids = punctuation_ids
        self.mask_token_id = tokenizer.token_to_id("[MASK]") or 0

    def _build_connective_set(self, tokenizer):
        words = ["therefore", "because", "so", "thus", "for", "but", "however", "yet", "moreover", "furthermore"]
        ids = set()
        for word in words:
            for variant in (word.lower(), word.capitalize()):
                tid = tokenizer.token_to_id(variant)
                if tid:
                    ids.add(tid)
        return ids

    def __len__(self):
        return len(self.tokens) - self.max_seq_len

    def __getitem__(self, start_idx):
        end_idx = start_idx + self.max_seq_len
        x = self.tokens[start_idx:end_idx].copy()
        y = self.tokens[start_idx + 1 : end_idx + 1].copy()
        for i in range(len(x)):
            if x[i] in self.connective_ids:
                abs_pos = start_idx + i
                is_verse_initial = abs_pos in self.verse_token_positions
                clause_length = self._get_clause_length(x, i)
                if is_verse_initial and clause_length > 10:
                    mask_prob = 0.8
                elif is_verse_initial:
                    mask_prob = 0.6
                elif clause_length > 15:
                    mask_prob = 0.5
                else:
                    mask_prob = 0.3
                if random.random() < mask_prob:
                    x[i] = self.mask_token_id
        return torch.tensor(x, dtype=torch.long), torch.tensor(y, dtype=torch.long)

    def _get_clause_length(self, tokens, position):
        length = 0
        for j in range(position - 1, max(0, position - 30), -1):
            length += 1
            if tokens[j] in self.punctuation_ids:  # the notes: `tokens[j] < 100`, a guess
                break
        return length

    def prob_by_id(self, vocab_size: int) -> np.ndarray:
        p = np.zeros(vocab_size)
        p[list(self.connective_ids)] = 1.0  # marks connectives; the rules give the probability
        return p


def notes_expected_probs(ds, x: np.ndarray, vs: np.ndarray, vocab_size: int) -> np.ndarray:
    """(B, T) probability the notes' rules give each position, computed independently of `__getitem__`: vectorised,
    with the clause length in closed form (the notes' scan visits positions position-1 down to lo+1, lo =
    max(0, position-30), and stops on punctuation: length = position - last punctuation there, else the number of
    positions visited)."""
    prob = ds.prob_by_id(vocab_size)[x]
    if not isinstance(ds, NotesStructuralDataset):
        return prob
    B, T = x.shape
    pos = np.arange(T)
    punct = np.isin(x, np.fromiter(ds.punctuation_ids, dtype=np.int64))
    last = np.maximum.accumulate(np.where(punct, pos, -1), axis=1)  # last punctuation at or before each position
    before = np.concatenate([np.full((B, 1), -1), last[:, :-1]], axis=1)  # ... strictly before
    lo = np.maximum(0, pos - 30)
    clause = np.where(before > lo, pos - before, np.maximum(0, pos - 1 - lo))
    verse_initial = vs.astype(bool)
    rule = np.select([verse_initial & (clause > 10), verse_initial, clause > 15], [0.8, 0.6, 0.5], 0.3)
    return np.where(prob > 0, rule, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# Workloads and providers


@dataclass
class Workload:
    """The batches of one size: window starts, CPU batches (x, y, verse_start) and their CUDA copies."""

    B: int
    T: int
    starts: list[np.ndarray]
    cpu: list[Batch]
    cuda: list[Batch] = field(default_factory=list)
    hf_rows: list[list[torch.Tensor]] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"{self.B}x{self.T}"

    @property
    def tokens(self) -> int:
        return self.B * self.T


@dataclass
class Provider:
    name: str  # loop | hf-collator | torch-cpu | torch-cuda | triton-cuda, + "+chain" with masking.chain
    strategy: str  # uniform | weighted | structural | mlm-15% (HF: one measurement shown under every strategy)
    device: str
    call: Callable[[int], Any]  # call(i): mask batch i (cycling through the workload's batches), step i

    @property
    def key(self) -> tuple[str, str]:
        return self.name, self.strategy

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"


def make_workload(split, B: int, T: int, n_batches: int, seed: int, device: str, layout: str, hf: bool) -> Workload:
    starts = [window_starts(len(split), T, B, seed, step) for step in range(n_batches)]
    cpu = [gather_windows(split, s, T) for s in starts]
    if layout == "contiguous":
        cpu = [Batch(b.x.contiguous(), b.y.contiguous(), b.verse_start) for b in cpu]
    work = Workload(B, T, starts, cpu)
    if device == "cuda":
        work.cuda = [gather_windows(split, s, T, "cuda") for s in starts]
        if layout == "contiguous":
            work.cuda = [Batch(b.x.contiguous(), b.y.contiguous(), b.verse_start) for b in work.cuda]
        torch.cuda.synchronize()
    if hf:
        work.hf_rows = [list(b.x.unbind(0)) for b in cpu]  # what a Dataset of rows hands the collator
    return work


def loop_provider(ds, strategy: str, work: Workload) -> Provider:
    collate = torch.utils.data.default_collate

    def call(i: int):
        random.seed(SEED * 1_000_003 + i)
        return collate([ds[int(s)] for s in work.starts[i % len(work.starts)]])  # [x (B, T), y (B, T)]

    return Provider("loop", strategy, "cpu", call)


def hf_provider(collator, work: Workload) -> Provider:
    return Provider("hf-collator", "mlm-15%", "cpu", lambda i: collator(work.hf_rows[i % len(work.hf_rows)]))


def genesis_provider(name: str, masker: ConnectiveMasker, strategy: str, work: Workload, device: str) -> Provider:
    batches = work.cuda if device == "cuda" else work.cpu

    def call(i: int) -> MaskOutput:
        b = batches[i % len(batches)]
        return masker(b.x, step=i, verse_start=b.verse_start)

    return Provider(name, strategy, device, call)


def make_hf_collator(tokenizer):
    """(collator, None), or (None, the reason) when transformers is not installed."""
    if importlib.util.find_spec("transformers") is None:
        return None, "transformers is not installed: hf-collator skipped (pip install transformers)"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        from transformers import DataCollatorForLanguageModeling, PreTrainedTokenizerFast

        hf_tok = PreTrainedTokenizerFast(tokenizer_object=tokenizer, mask_token="[MASK]", pad_token="<pad>",
                                         bos_token="<s>", eos_token="</s>")
        collator = DataCollatorForLanguageModeling(hf_tok, mlm=True, mlm_probability=0.15, seed=SEED,
                                                   return_tensors="pt")
    return collator, None


def make_masker(tokenizer, masking_cfg, strategy: str, impl: str, **overrides) -> ConnectiveMasker:
    return ConnectiveMasker.from_tokenizer(tokenizer, masking_cfg, strategy=strategy, impl=impl, seed=SEED,
                                           check_ids=False, log=None, **overrides)


# ----------------------------------------------------------------------------------------------------------------
# Checks


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
    """Position by position against `find_matches` (the lexicon's plain-Python oracle), and the rate tally."""
    lex = masker.lexicon
    flags = {"boundary": lex.clause_boundary.tolist(), "separator": lex.verse_separator.tolist()}
    X = x.cpu().numpy()
    V = verse_start.cpu().numpy() if verse_start is not None else None
    M, Out = out.mask.cpu().numpy(), out.input_ids.cpu().numpy()
    C, K = out.connectives.cpu().numpy(), out.classes.cpu().numpy()
    want_conn = np.full(X.shape, IGNORE_INDEX, dtype=np.int64)
    want_matched = np.zeros(X.shape, dtype=bool)
    probs, masked = [], 0
    causal, gap = CLASSES.index("causal"), masker.config.chain_gap
    for b in range(X.shape[0]):
        row = X[b].tolist()
        verse_row = V[b].tolist() if V is not None else None
        last_causal, head_p = None, 0.0
        for start, length, entry in find_matches(row, lex):
            p = genesis_probability(masker, row, verse_row, start, entry, flags)
            if masker.config.chain and lex.entry_class[entry] == causal:  # a chain is drawn at its head's p
                if last_causal is None or start - last_causal > gap:
                    head_p = p
                p, last_causal = head_p, start
            probs.append(p)
            want_matched[b, start : start + length] = True
            if M[b, start]:
                masked += 1
                want_conn[b, start : start + length] = entry
    tally.add(masked, np.array(probs))
    want_mask = want_conn != IGNORE_INDEX
    if not np.array_equal(M, want_mask):
        bad = np.argwhere(M != want_mask)[:3].tolist()
        tally.errors.append(f"mask is not the union of whole selected matches (first (row, col): {bad})")
    if not np.array_equal(out.matched.cpu().numpy(), want_matched):
        tally.errors.append("matched is not every piece of every match")
    if masker.config.replacement == "mask" and not (Out[M] == masker.mask_id).all():
        tally.errors.append("a masked position does not hold the mask id")
    if not np.array_equal(Out[~M], X[~M]):
        tally.errors.append("an unmasked position changed")
    if not np.array_equal(C, np.where(M, want_conn, IGNORE_INDEX)):
        tally.errors.append("connectives differ from the matched lexicon entries")
    entry_class = lex.entry_class.astype(np.int64)
    if not np.array_equal(K, np.where(M, entry_class[np.where(M, want_conn, 0)], IGNORE_INDEX)):
        tally.errors.append("classes differ from the matched entries' classes")
    if hasattr(masker, "stats"):  # the trainer logs these counts
        stats = masker.stats(out, x.to(out.mask.device))
        if int(stats["masked_words"]) != masked or int(stats["masked_tokens"]) != int(M.sum()):
            tally.errors.append(f"masker.stats counts {int(stats['masked_words'])} words / "
                                f"{int(stats['masked_tokens'])} tokens, the oracle {masked} / {int(M.sum())}")


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


def rate_checks(providers: dict, loop_datasets: dict, check_work: Workload, vocab_size: int, maskers: dict,
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
            results.append(tallies[0].result(name, strategy, "masked words vs the configured rule probabilities; "
                                                             "positions vs lexicon.find_matches"))
    return results


def interpret_check(path: str, strategies: list[str], quick: bool) -> int:
    """Child process, TRITON_INTERPRET=1: the kernel vs both layouts of the torch path on small real batches. Writes
    JSON to path."""
    from genesis.kernels.mask import connective_mask_triton

    from genesis.masking import mask_torch

    corpus = prepare(load_config("cpu.toml"), log=log)
    split, tok = corpus.splits["train"], corpus.tokenizer
    masking_cfg = load_config("cpu.toml").masking
    cases = []
    shape = (2, 300) if quick else (6, 500)  # T > BLOCK: two programs per row; ~0.3 s per program interpreted
    variants = [(s, {}, shape, torch.int64, True) for s in strategies]
    if not quick:
        variants += [(s, {}, (3, 301), torch.int64, False) for s in strategies]  # verse-initial from "\n" tokens
        variants += [("uniform", {"mask_prob": 1.0}, (2, 300), torch.int64, True),  # every match masked
                     ("structural", {"replacement": "bert"}, (2, 300), torch.int64, True),
                     ("weighted", {}, (2, 300), torch.int32, True),
                     ("structural", {"clause_length": "since_boundary"}, (1, 257), torch.int64, True),
                     ("weighted", {"chain": True}, (2, 300), torch.int64, True),  # one program walks each row
                     ("structural", {"chain": True, "replacement": "bert"}, (1, 257), torch.int32, False)]
    for strategy, overrides, (B, T), dtype, with_flags in variants:
        masker = make_masker(tok, masking_cfg, strategy, "torch", **overrides)
        batch = gather_windows(split, window_starts(len(split), T, B, DATA_SEED, 3), T)
        x, vs = batch.x.to(dtype), batch.verse_start if with_flags else None
        tables = masker.tables("cpu")
        t0 = time.perf_counter()
        kernel = connective_mask_triton(x, vs, tables, masker.seed, 11, masker.rank, 0)
        seconds = time.perf_counter() - t0
        reference = mask_torch(x, vs, tables, masker.seed, 11, masker.rank, 0)  # sparse, as CPU tensors run it
        dense = mask_torch(x, vs, tables, masker.seed, 11, masker.rank, 0, layout="dense")  # as GPUs run it
        equal = all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(kernel, reference, strict=True))
        equal &= all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(dense, reference, strict=True))
        cases.append({"strategy": strategy, "overrides": overrides, "shape": [B, T], "dtype": str(dtype),
                      "verse_start": with_flags, "equal": equal, "masked_tokens": int(reference[1].sum()),
                      "interpreter_s": round(seconds, 2)})
    passed = all(c["equal"] for c in cases) and sum(c["masked_tokens"] for c in cases) > 0
    Path(path).write_text(json.dumps({"passed": passed, "cases": cases}))
    return 0


def kernel_check_interpreter(strategies: list[str], quick: bool) -> dict:
    if importlib.util.find_spec("triton") is None:
        return {"status": "skipped", "note": "Triton is not installed: kernel == torch path not checked", "cases": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "interpret.json"
        env = dict(os.environ, TRITON_INTERPRET="1")
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--interpret-check", str(path),
               "--strategies", ",".join(strategies)] + (["--quick"] if quick else [])
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
        except subprocess.TimeoutExpired:
            return {"status": "failed", "note": "interpreter subprocess did not finish in 1200 s", "cases": []}
        if proc.returncode != 0 or not path.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
            return {"status": "failed", "note": f"interpreter subprocess exited {proc.returncode}: {' | '.join(tail)}",
                    "cases": []}
        result = json.loads(path.read_text())
    status = "passed" if result["passed"] else "failed"
    return {"status": status, "note": "TRITON_INTERPRET=1 subprocess, small real KJV batches, both layouts of the "
                                      "torch path (correctness only, never timed)", "cases": result["cases"]}


def kernel_check_cuda(tokenizer, masking_cfg, strategies: list[str], workloads: list[Workload]) -> dict:
    """Compiled kernel (both versions) vs the torch path on CUDA and on the CPU, on the first batch of every size."""
    from genesis.kernels.experimental.mask_v2 import connective_mask_triton_v2

    cases = []
    variants = [(s, {}) for s in strategies] + [("structural", {"replacement": "bert"}), ("weighted", {"chain": True})]
    for strategy, overrides in variants:
        triton_m = make_masker(tokenizer, masking_cfg, strategy, "triton", **overrides)
        torch_m = make_masker(tokenizer, masking_cfg, strategy, "torch", **overrides)
        for work in workloads if not overrides else workloads[:1]:
            gpu, cpu = work.cuda[0], work.cpu[0]
            for with_flags in (True, False):
                a = triton_m(gpu.x, step=5, verse_start=gpu.verse_start if with_flags else None)
                b = torch_m(gpu.x, step=5, verse_start=gpu.verse_start if with_flags else None)
                c = torch_m(cpu.x, step=5, verse_start=cpu.verse_start if with_flags else None)
                v2 = connective_mask_triton_v2(gpu.x, gpu.verse_start if with_flags else None,
                                               triton_m.tables("cuda"), triton_m.seed, 5, triton_m.rank, 0)
                fields_ = ("input_ids", "mask", "classes", "connectives", "matched")
                equal = all(torch.equal(getattr(a, f).cpu(), getattr(b, f).cpu()) for f in fields_)
                equal &= all(torch.equal(getattr(a, f).cpu(), getattr(c, f)) for f in fields_)
                equal &= all(torch.equal(getattr(a, f), v) for f, v in zip(fields_, v2))
                cases.append({"strategy": strategy, "overrides": overrides, "shape": [work.B, work.T],
                              "verse_start": with_flags, "equal": bool(equal), "masked_tokens": int(c.mask.sum())})
    ok = all(c["equal"] for c in cases)
    return {"status": "passed" if ok else "failed", "cases": cases,
            "note": "compiled kernel (CUDA), versions 1 and 2 == torch path on CUDA (dense) == torch path on "
                    "CPU (sparse), torch.equal on all outputs"}


# ----------------------------------------------------------------------------------------------------------------
# Timing


class L2Flush:
    """Zeroes a buffer larger than the L2 cache before a device-timed call (as triton.testing.do_bench does): reads
    come from HBM, and the ~100 us memset lets the host enqueue the timed call before the GPU reaches it."""

    def __init__(self):
        self.buffer = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")

    def __call__(self) -> None:
        self.buffer.zero_()


def time_call(provider: Provider, i: int, flush: L2Flush | None) -> tuple[float, float | None]:
    """(wall ms, device ms or None). CUDA: one call with events after an L2 flush, one host-synchronised call."""
    if not provider.cuda:
        t0 = time.perf_counter()
        provider.call(i)
        return (time.perf_counter() - t0) * 1e3, None
    torch.cuda.synchronize()
    flush()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    provider.call(i)
    end.record()
    torch.cuda.synchronize()
    device_ms = start.elapsed_time(end)
    t0 = time.perf_counter()
    provider.call(i)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3, device_ms


def summarize(samples: list[float]) -> dict:
    q = np.percentile(np.array(samples), [10, 25, 50, 75, 90])
    return {"n": len(samples), "median": float(q[2]), "p10": float(q[0]), "p25": float(q[1]), "p75": float(q[3]),
            "p90": float(q[4]), "min": float(min(samples))}


def time_providers(providers: list[Provider], warmup: int, repeats: int, min_repeats: int, budget_s: float,
                   flush: L2Flush | None, order: str = "shuffled") -> dict:
    """Warm every provider up, then time it; each gets as many repeats as fit its budget.

    shuffled (the default): round-robin, every round in a new (seeded) random order, so each provider is timed
    after each of the others about equally often. On the CPU the order matters for short calls: a call after
    ~10 ms of other work finds the caches cold — after the HF collator or the loop, but after a 10 ms sleep as
    well (on this shared 2-core VM the caches decay with time alone) — and a fixed cyclic order would give that
    penalty to whichever provider follows the collator.
    blocked: each provider's repeats back to back (warm caches; what timeit or torch.utils.benchmark report)."""
    counts, wall, device = {}, {p.key: [] for p in providers}, {p.key: [] for p in providers}
    for p in providers:
        ms = 0.0
        for i in range(warmup):
            ms, _ = time_call(p, i, flush)
        counts[p.key] = int(min(repeats, max(min_repeats, budget_s * 1e3 / max(ms, 1e-3))))

    def record(p: Provider, r: int) -> None:
        w, d = time_call(p, warmup + r, flush)
        wall[p.key].append(w)
        if d is not None:
            device[p.key].append(d)

    if order == "blocked":
        for p in providers:
            for r in range(counts[p.key]):
                record(p, r)
    else:
        shuffled, shuffle = list(providers), random.Random(SEED).shuffle
        for r in range(max(counts.values(), default=0)):
            shuffle(shuffled)
            for p in shuffled:
                if r < counts[p.key]:
                    record(p, r)
    return {p.key: {"wall": summarize(wall[p.key]), "device": summarize(device[p.key]) if device[p.key] else None}
            for p in providers}


def copy_bandwidth_gb_s() -> dict:
    """Device-to-device copy of 1 GiB: bytes read + written per second (the card's practical ceiling)."""
    src = torch.ones(256 * 2**20, dtype=torch.int32, device="cuda")
    dst = torch.empty_like(src)
    samples = []
    for i in range(23):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        torch.cuda.synchronize()
        if i >= 3:
            samples.append(start.elapsed_time(end))
    ms = float(np.median(samples))
    moved = 2 * src.numel() * src.element_size()
    del src, dst
    torch.cuda.empty_cache()
    return {"bytes": moved, "ms": ms, "gb_per_s": moved / ms / 1e6}


def bytes_moved(work: Workload) -> int:
    """Read ids + verse_start, write ids + mask + matched + classes (int64) + connectives (int64): 35 B/token for
    int64 ids. Table reads (a few KB, cache-resident) and any copy the launcher makes of a strided batch are not
    counted. (The H100 run of 2026-11-25 counted 34: it left out the matched flags.)"""
    id_bytes = work.cpu[0].x.element_size()
    return work.tokens * (id_bytes + 1 + id_bytes + 1 + 1 + 8 + 8)


def kernel_maskers(maskers: dict, strategies: list[str], tokenizer, masking_cfg) -> dict[str, ConnectiveMasker]:
    """The kernel maskers to time alone, by row label: each strategy's, and structural with causal chains (the
    `chain` strategy of genesis.compare; the --chain masker where there is one) when structural is timed."""
    out = {s: maskers["triton-cuda", s] for s in strategies}
    if "structural" in strategies:
        key = "triton-cuda+chain", "structural"
        out["structural+chain"] = (maskers[key] if key in maskers
                                   else make_masker(tokenizer, masking_cfg, "structural", "triton", chain=True))
    return out


def kernel_graph_timing(maskers: dict[str, ConnectiveMasker], workloads: list[Workload], blocks: list[int],
                        windows: list[int], copy_bw: dict, calls: int = 20, replays: int = 15) -> list[dict]:
    """Device time of the kernel alone: `calls` launches (cycling through the workload's batches) captured in one
    CUDA graph, replayed `replays` times between events; median per launch. Host launch overhead is out of the
    number, so this is what the kernel costs once a trainer keeps the GPU busy (the per-call table above includes
    it). Version 1 at each of `blocks`, version 2 at each of `windows`; `maskers` by row label (kernel_maskers)."""
    from genesis.kernels.experimental.mask_v2 import connective_mask_triton_v2
    from genesis.kernels.mask import DEFAULT_BLOCK, connective_mask_triton

    rows = []
    variants = [(1, block) for block in blocks] + [(2, window) for window in windows]
    for work in workloads:
        for strategy, masker in maskers.items():
            tables = masker.tables("cuda")
            for version, size in variants:
                def launch(i: int, work=work, tables=tables, masker=masker, version=version, size=size) -> None:
                    b = work.cuda[i % len(work.cuda)]
                    if version == 1:
                        connective_mask_triton(b.x, b.verse_start, tables, masker.seed, i, masker.rank, 0, block=size)
                    else:
                        connective_mask_triton_v2(b.x, b.verse_start, tables, masker.seed, i, masker.rank, 0,
                                                  window=size)

                side = torch.cuda.Stream()
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):  # compile and warm up outside the capture
                    for i in range(3):
                        launch(i)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    for i in range(calls):
                        launch(i)
                graph.replay()
                torch.cuda.synchronize()
                samples = []
                for _ in range(replays):
                    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    start.record()
                    graph.replay()
                    end.record()
                    torch.cuda.synchronize()
                    samples.append(start.elapsed_time(end) / calls)
                del graph
                torch.cuda.empty_cache()
                ms = summarize(samples)
                moved = bytes_moved(work)
                rows.append({"size": work.name, "tokens": work.tokens, "strategy": strategy, "version": version,
                             "block": size if version == 1 else None, "window": size if version == 2 else None,
                             "default": version == 1 and size == DEFAULT_BLOCK, "us_median": 1e3 * ms["median"],
                             "us_p10": 1e3 * ms["p10"], "us_p90": 1e3 * ms["p90"], "bytes_moved": moved,
                             "gb_per_s": moved / ms["median"] / 1e6,
                             "pct_of_copy_bw": 100 * moved / ms["median"] / 1e6 / copy_bw["gb_per_s"],
                             "timing": f"CUDA graph of {calls} launches x {replays} replays"})
    return rows


def kernel_variant(row: dict) -> str:
    """A kernel-alone row's variant: "v1 b128" (version 1, block 128) or "v2 w256" (version 2, window 256)."""
    return f"v1 b{row['block']}" if row["version"] == 1 else f"v2 w{row['window']}"


def print_kernel_table(rows: list[dict], copy_bw: dict) -> None:
    print(f"\nkernel alone (CUDA graph replay, no host overhead); copy bandwidth {copy_bw['gb_per_s']:.0f} GB/s")
    head = (f"{'size':>10} {'strategy':<16} {'kernel':>9} {'us/launch median [p10, p90]':>30} {'GB/s':>7} "
            f"{'% copy':>6}")
    print(head)
    print("-" * len(head))
    for r in rows:
        spread = f"{r['us_median']:.1f} [{r['us_p10']:.1f}, {r['us_p90']:.1f}]"
        name = kernel_variant(r)
        mark = "*" if r["default"] else " "
        print(f"{r['size']:>10} {r['strategy']:<16} {name:>8}{mark} {spread:>30} {r['gb_per_s']:>7.0f} "
              f"{r['pct_of_copy_bw']:>5.0f}%")
    print("(v1 bN: version 1, N positions per program; v2 wN: version 2, a window of N tokens; * the default)")


# ----------------------------------------------------------------------------------------------------------------
# Share of a training step


def step_share(config: str, device: str, strategy: str, steps: int, warmup: int) -> dict:
    """Training steps of `config` with masking off and on, alternating in one process, plus the masking calls alone
    on the same batches: the step as genesis.train runs it (get_batch per micro-batch, the masker, forward and
    backward, clip, AdamW; masker.stats runs only at log steps there, so not here)."""
    from genesis.device import autocast, training_device, use_compile
    from genesis.masking import ConnectiveMasker as Masker
    from genesis.model import Llama, ModelArgs
    from genesis.step import accumulate_gradients, make_optimizer

    cfg = load_config(config, overrides=[f"training.device={device}", "masking.enabled=true",
                                         f"masking.strategy={strategy}"])
    dev, amp_dtype = training_device(cfg)
    amp = autocast(dev, amp_dtype)
    t = cfg.training
    torch.manual_seed(t.seed)
    corpus = prepare(cfg, log=log)
    split, tok = corpus.splits["train"], corpus.tokenizer
    model = Llama(ModelArgs.from_config(cfg.model, tok.get_vocab_size(with_added_tokens=True))).to(dev)
    model.grad_checkpointing = t.grad_checkpointing
    optimizer = make_optimizer(model, t, dev)
    step_model = torch.compile(model) if use_compile(t.compile, dev) else model
    masker = Masker.from_tokenizer(tok, cfg.masking, mask_token=cfg.tokenizer.mask_token,
                                   seed=cfg.masking.seed if cfg.masking.seed is not None else t.seed,
                                   check_ids=False, log=None).to(dev)
    B, T, k = t.micro_batch, cfg.model.seq_len, t.grad_accum

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def mask(batch, step: int, micro: int):
        # the trainer counts masked tokens (masker.stats) only at log steps: not part of every step
        return masker(batch.x, step=step, verse_start=batch.verse_start, row_offset=micro * B)

    # a config with the class head: it runs in both kinds of step (with nothing labelled when masking is off), so
    # that the ratio is masking's alone
    unlabelled = torch.full((B, T), -100, dtype=torch.long, device=dev)

    def one_step(step: int, masked: bool) -> float:
        sync()
        t0 = time.perf_counter()
        micro_batches = []
        for micro in range(k):
            batch = get_batch(split, B, T, t.seed, step, rank=0, micro=micro, device=dev)
            if masked:
                out = mask(batch, step, micro)
                x, classes = out.input_ids, out.classes
            else:
                x, classes = batch.x, unlabelled
            micro_batches.append((x, batch.y) if model.class_head is None else (x, batch.y, classes))
        accumulate_gradients(step_model, micro_batches, amp, t.class_loss_weight)
        torch.nn.utils.clip_grad_norm_(model.parameters(), t.grad_clip if t.grad_clip > 0 else 1e30)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        sync()
        return (time.perf_counter() - t0) * 1e3

    def masking_only(step: int) -> float:
        batches = [get_batch(split, B, T, t.seed, step, rank=0, micro=m, device=dev) for m in range(k)]
        sync()
        t0 = time.perf_counter()
        for micro, batch in enumerate(batches):
            mask(batch, step, micro)
        sync()
        return (time.perf_counter() - t0) * 1e3

    for i in range(warmup):
        one_step(i, False), one_step(i, True), masking_only(i)
    off, on, alone = [], [], []
    for i in range(warmup, warmup + steps):  # alternate, so drift in machine load hits both modes alike
        off.append(one_step(i, False))
        on.append(one_step(i, True))
        alone.append(masking_only(i))
    off_s, on_s, alone_s = summarize(off), summarize(on), summarize(alone)
    return {
        "config": config, "device": str(dev), "dtype": str(amp_dtype).replace("torch.", ""),
        "strategy": strategy, "impl": masker.impl(dev), "micro_batch": B, "seq_len": T, "grad_accum": k,
        "tokens_per_step": B * T * k, "params_m": round(model.num_params() / 1e6, 2),
        "step_ms_masking_off": off_s, "step_ms_masking_on": on_s, "masking_ms_per_step": alone_s,
        "ratio_on_off": on_s["median"] / off_s["median"],
        "masking_pct_of_step": 100 * alone_s["median"] / on_s["median"],
        "difference_pct_of_step": 100 * (on_s["median"] - off_s["median"]) / on_s["median"],
    }


# ----------------------------------------------------------------------------------------------------------------
# Profile of one torch-path call


def profile_torch_path(masker: ConnectiveMasker, batch: Batch, calls: int, device: str) -> dict:
    """torch.profiler over `calls` calls, per call: aten ops by self time and input shapes, split into ops over a
    full (B, T) batch and ops over the candidates (~4% of tokens); stages (the module's helper functions, wrapped in
    record_function for the duration of the profile; inclusive times). The profiler itself adds ~1-3 us per op."""
    from torch.profiler import ProfilerActivity, profile, record_function

    import genesis.masking.masker as masker_module
    import genesis.masking.philox as philox_module
    import genesis.masking.torch_path as torch_path_module

    stage_names = ("mask_torch", "_mask_sparse", "_mask_dense", "_philox_numpy", "_philox_torch", "_clause_lengths",
                   "_clause_lengths_dense", "_match_longer_words")
    # a stage is wrapped in every module of genesis.masking that calls it by its global name
    modules = (masker_module, torch_path_module, philox_module)
    originals = {(m, n): getattr(m, n) for m in modules for n in stage_names if callable(getattr(m, n, None))}

    def wrap(name, fn):
        def wrapped(*args, **kwargs):
            with record_function(f"stage::{name}"):
                return fn(*args, **kwargs)

        return wrapped

    def sync() -> None:
        if device == "cuda":
            torch.cuda.synchronize()

    for i in range(3):
        masker(batch.x, step=i, verse_start=batch.verse_start)
    walls = []
    for i in range(max(calls, 5)):
        sync()
        t0 = time.perf_counter()
        masker(batch.x, step=i, verse_start=batch.verse_start)
        sync()
        walls.append((time.perf_counter() - t0) * 1e3)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device == "cuda" else [])
    try:
        for (module, name), fn in originals.items():
            setattr(module, name, wrap(name, fn))
        with profile(activities=activities, record_shapes=True) as prof:
            t0 = time.perf_counter()
            for i in range(calls):
                masker(batch.x, step=i, verse_start=batch.verse_start)
            sync()
            profiled_ms = (time.perf_counter() - t0) * 1e3 / calls
    finally:
        for (module, name), fn in originals.items():
            setattr(module, name, fn)
    n_tokens = batch.x.numel()
    events = prof.key_averages(group_by_input_shape=True)
    ops = [e for e in events if e.key.startswith("aten::")]
    stages = [e for e in prof.key_averages() if e.key.startswith("stage::")]

    def full_batch(e) -> bool:  # an input as large as the batch: work proportional to B*T
        return any(shape and math.prod(shape) >= n_tokens for shape in (e.input_shapes or []))

    def group(selected) -> dict:
        return {"op_calls": sum(e.count for e in selected) / calls,
                "self_ms": sum(e.self_cpu_time_total for e in selected) / calls / 1e3}

    top = sorted(ops, key=lambda e: e.self_cpu_time_total, reverse=True)[:15]
    return {
        "calls": calls, "shape": list(batch.x.shape), "unprofiled_ms_median": float(np.median(walls)),
        "profiled_ms": profiled_ms, "aten": group(ops),
        "full_batch_ops": group([e for e in ops if full_batch(e)]),
        "candidate_ops": group([e for e in ops if not full_batch(e)]),
        "stages": [{"name": e.key.removeprefix("stage::"), "calls": e.count / calls,
                    "cpu_ms": e.cpu_time_total / calls / 1e3} for e in sorted(stages, key=lambda e: -e.cpu_time_total)],
        "top_ops": [{"name": e.key, "shapes": [list(x) for x in (e.input_shapes or []) if x],
                     "calls": e.count / calls, "self_ms": e.self_cpu_time_total / calls / 1e3,
                     "us_per_op": e.self_cpu_time_total / max(e.count, 1)} for e in top],
    }


def print_profile(prof: dict) -> None:
    a, f, c = prof["aten"], prof["full_batch_ops"], prof["candidate_ops"]
    print(f"\ntorch path profile, {prof['shape'][0]}x{prof['shape'][1]} {prof.get('strategy', '')}, per call: "
          f"{prof['unprofiled_ms_median']:.2f} ms unprofiled (median), {prof['profiled_ms']:.2f} ms profiled")
    print(f"  aten ops: {a['op_calls']:.0f} calls, {a['self_ms']:.2f} ms self | over the full batch: "
          f"{f['op_calls']:.0f} calls, {f['self_ms']:.2f} ms | over candidates and tables: {c['op_calls']:.0f} calls, "
          f"{c['self_ms']:.2f} ms | outside aten ops (Python, numpy, profiler): "
          f"{prof['profiled_ms'] - a['self_ms']:.2f} ms")
    print("  stages (inclusive): " + ", ".join(f"{s['name']} {s['cpu_ms']:.2f} ms" for s in prof["stages"]))
    print(f"  {'aten op':<26} {'input shapes':<34} {'calls':>5} {'self ms':>8} {'us/op':>7}")
    for op in prof["top_ops"]:
        shapes = " ".join("x".join(map(str, s)) for s in op["shapes"])[:34]
        print(f"  {op['name']:<26} {shapes:<34} {op['calls']:>5.0f} {op['self_ms']:>8.3f} {op['us_per_op']:>7.1f}")


# ----------------------------------------------------------------------------------------------------------------
# Report


def machine_info(args, device: str) -> dict:
    cpu = platform.processor() or ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    info = {
        "cpu": cpu, "cpu_count": os.cpu_count(), "threads": torch.get_num_threads(), "platform": platform.platform(),
        "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
    }
    for module in ("triton", "transformers"):
        spec = importlib.util.find_spec(module)
        info[module] = __import__(module).__version__ if spec is not None else None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gb=round(props.total_memory / 2**30, 1),
                    cuda=torch.version.cuda, capability=f"{props.major}.{props.minor}")
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info["git_commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                            text=True, timeout=10).stdout.strip()
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                                capture_output=True, text=True, timeout=10)
        if status.returncode == 0:  # uncommitted edits: the commit alone does not say what ran
            info["git_dirty"] = sorted(line[3:] for line in status.stdout.splitlines())
    info["sha256"] = SOURCE_HASHES
    return info


def build_rows(workloads: list[Workload], strategies: list[str], timings: dict, device: str,
               copy_bw: dict | None) -> list[dict]:
    rows = []
    for work in workloads:
        timing = timings[work.name]
        hf_key = ("hf-collator", "mlm-15%")
        for strategy in strategies:
            loop = timing.get(("loop", strategy))
            hf = timing.get(hf_key)
            genesis = ["torch-cpu"] + (["torch-cuda", "triton-cuda"] if device == "cuda" else [])
            names = ["loop", "hf-collator"] + genesis + [name + "+chain" for name in genesis]
            for name in names:
                key = hf_key if name == "hf-collator" else (name, strategy)
                if key not in timing:
                    continue
                t = timing[key]
                primary = t["device"] or t["wall"]  # CUDA providers: device time
                ms = primary["median"]
                row = {
                    "size": work.name, "B": work.B, "T": work.T, "tokens": work.tokens, "strategy": strategy,
                    "provider": name, "masking": "mlm-15%" if name == "hf-collator" else strategy,
                    "device": "cuda" if "cuda" in name else "cpu",
                    "timing": "cuda-events (L2 flushed)" if t["device"] else "wall",
                    "repeats": primary["n"], "ms_median": ms, "ms_p10": primary["p10"], "ms_p25": primary["p25"],
                    "ms_p75": primary["p75"], "ms_p90": primary["p90"], "ms_min": primary["min"],
                    "wall_ms_median": t["wall"]["median"], "tokens_per_s": work.tokens / ms * 1e3,
                    "ratio_to_loop": loop["wall"]["median"] / ms if loop else None,
                    "ratio_to_hf": hf["wall"]["median"] / ms if hf else None,
                    "gb_per_s": None, "pct_of_copy_bw": None,
                }
                if row["device"] == "cuda":
                    row["bytes_moved"] = bytes_moved(work)
                    row["gb_per_s"] = row["bytes_moved"] / ms / 1e6
                    if copy_bw:
                        row["pct_of_copy_bw"] = 100 * row["gb_per_s"] / copy_bw["gb_per_s"]
                rows.append(row)
    return rows


def fmt_load(load: list[float] | None) -> str:
    return "n/a" if load is None else " ".join(f"{v:.2f}" for v in load)


def fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x" if x < 10 else f"{x:.1f}x"


def print_table(rows: list[dict], device: str) -> None:
    head = (f"{'size':>10} {'strategy':<10} {'provider':<17} {'ms/batch median [p10, p90]':>30} {'n':>4} "
            f"{'Mtok/s':>8} {'x loop':>7} {'x HF':>7}")
    if device == "cuda":
        head += f" {'GB/s':>7} {'% copy':>6}"
    print(head)
    print("-" * len(head))
    last = None
    for r in rows:
        if last is not None and (r["size"], r["strategy"]) != last:
            print()
        last = (r["size"], r["strategy"])
        spread = f"{r['ms_median']:.3f} [{r['ms_p10']:.3f}, {r['ms_p90']:.3f}]"
        line = (f"{r['size']:>10} {r['strategy']:<10} {r['provider']:<17} {spread:>30} {r['repeats']:>4} "
                f"{r['tokens_per_s'] / 1e6:>8.2f} {fmt_ratio(r['ratio_to_loop']):>7} {fmt_ratio(r['ratio_to_hf']):>7}")
        if device == "cuda":
            gb = f"{r['gb_per_s']:.0f}" if r["gb_per_s"] else "-"
            pct = f"{r['pct_of_copy_bw']:.0f}%" if r["pct_of_copy_bw"] else "-"
            line += f" {gb:>7} {pct:>6}"
        print(line)


def evaluate_targets(rows: list[dict], share: dict | None, device: str, threads: int,
                     kernel_rows: list[dict] | None = None, order: str = "shuffled") -> list[dict]:
    def find(size, provider, strategy="structural"):
        return next((r for r in rows if r["size"] == size and r["provider"] == provider and r["strategy"] == strategy),
                    None)

    targets = []
    cpu = find("64x1024", "torch-cpu")
    note = f"{threads} thread(s), {order} order" + ("" if threads == 1 else " (the target is for one core)")
    for what, key, goal in (("the per-sample loop", "ratio_to_loop", 5.0), ("the HF collator", "ratio_to_hf", 20.0)):
        value = cpu[key] if cpu else None
        targets.append({"target": f"CPU torch path, structural, 64x1024, one core: >= {goal:g}x {what}",
                        "value": value, "met": None if value is None else value >= goal,
                        "note": note if cpu else "not measured: 64x1024 not among --sizes"})
    if device != "cuda":
        for text in ("kernel >= 60% of copy bandwidth at >= 1M tokens", "masking <= 0.5% of a high_vram step",
                     "torch path on CUDA within 5x of the kernel"):
            targets.append({"target": text, "value": None, "met": None, "note": "not measured: no GPU in this run"})
        return targets
    # the kernel's bandwidth: its own device time (graph replay; the best kernel variant, by its worst size and
    # strategy), else the per-call events of the default kernel
    by_variant: dict[str, list[float]] = {}
    for r in kernel_rows or []:
        if r["tokens"] >= 2**20:
            by_variant.setdefault(kernel_variant(r), []).append(r["pct_of_copy_bw"])
    big = bool(by_variant)
    if big:
        best = max(by_variant, key=lambda name: min(by_variant[name]))
        value, how = min(by_variant[best]), f"kernel alone, CUDA graph replay, best variant: {best}"
    else:
        per_call = [r for r in rows if r["provider"] == "triton-cuda" and r["tokens"] >= 2**20 and r["pct_of_copy_bw"]]
        big = bool(per_call)
        value = min((r["pct_of_copy_bw"] for r in per_call), default=None)
        how = "per call, host launch overhead included"
    targets.append({"target": "kernel >= 60% of copy bandwidth at >= 1M tokens (worst size, strategy)",
                    "value": value, "met": None if value is None else value >= 60,
                    "note": how if big else "not measured: no size with >= 1M tokens"})
    if share and share["device"].startswith("cuda"):
        value = share["masking_pct_of_step"]
        targets.append({"target": f"masking <= 0.5% of a {share['config']} step", "value": value,
                        "met": value <= 0.5, "note": f"{share['strategy']}, impl {share['impl']}"})
    else:
        targets.append({"target": "masking <= 0.5% of a high_vram step", "value": None, "met": None,
                        "note": "not measured: step share not run on CUDA"})
    gaps = []
    for r in rows:
        if r["provider"] == "torch-cuda":
            k = find(r["size"], "triton-cuda", r["strategy"])
            if k:
                gaps.append(r["ms_median"] / k["ms_median"])
    value = max(gaps, default=None)
    targets.append({"target": "torch path on CUDA within 5x of the kernel (worst size and strategy)", "value": value,
                    "met": None if value is None else value <= 5, "note": ""})
    return targets


def print_targets(targets: list[dict]) -> None:
    print("\ntargets:")
    for t in targets:
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        verdict = "n/a" if t["met"] is None else "met" if t["met"] else "NOT met"
        print(f"  {t['target']:<70} {value:>8}  {verdict:<7} {t['note']}")


def print_checks(checks: dict) -> None:
    k = checks["kernel_equals_torch"]
    print(f"check kernel == torch path: {k['status']} ({len(k['cases'])} cases) - {k['note']}")
    for r in checks["rates"]:
        status = "ok  " if r["passed"] else "FAIL"
        print(f"check rate {status} {r['provider']:<12} {r['strategy']:<10} observed {r['observed']:>8.0f} expected "
              f"{r['expected']:>9.1f} +- {r['std']:>6.1f} (z {r['z']:+.2f}, {r['trials']} trials): {r['what']}"
              + (f" ERRORS: {'; '.join(r['errors'])}" if r["errors"] else ""))


# ----------------------------------------------------------------------------------------------------------------
# main


def parse_size(text: str) -> tuple[int, int]:
    try:
        b, t = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size {text!r}: expected BxT, like 64x1024") from None
    if b < 1 or t < 1:
        raise argparse.ArgumentTypeError(f"size {text!r}: B and T must be >= 1")
    return b, t


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python bench/mask_throughput.py", description=" ".join(__doc__.split("\n")[:2]))
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: loop, HF, torch path; cuda: also the torch path and the kernel on the GPU")
    p.add_argument("--strategies", default="weighted,structural", help=f"comma list of {', '.join(STRATEGIES)}")
    p.add_argument("--sizes", default=DEFAULT_SIZES, help=f"comma list of BxT (default {DEFAULT_SIZES})")
    p.add_argument("--repeats", type=int, default=50, help="most timed calls per provider and size")
    p.add_argument("--min-repeats", type=int, default=5,
                   help="fewest timed calls, whatever the budget (at most --repeats)")
    p.add_argument("--budget", type=float, default=2.0, help="seconds of timed calls per provider and size")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed calls per provider and size (>= 1: the last one sizes the repeats to the budget)")
    p.add_argument("--order", choices=("shuffled", "blocked"), default="shuffled",
                   help="shuffled: providers interleaved in a new random order every round (a call may follow "
                        "another provider's, on cold caches); blocked: each provider's calls back to back (warm)")
    p.add_argument("--batches", type=int, default=4, help="distinct batches per size, cycled through")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: one core)")
    p.add_argument("--layout", choices=("view", "contiguous"), default="view",
                   help="view: batch.x as get_batch gives it (a (T+1)-strided view, as the trainer passes it); "
                        "contiguous: a contiguous copy")
    p.add_argument("--kernel-sizes", default="1024x1024,4096x1024",
                   help="CUDA: BxT sizes for timing the kernel alone (CUDA graph replay)")
    p.add_argument("--kernel-blocks", default="64,128,256", help="CUDA: block sizes of kernel version 1 to time")
    p.add_argument("--kernel-windows", default="256,512", help="CUDA: window sizes of kernel version 2 to time")
    p.add_argument("--step-share", default=None, metavar="CONFIG",
                   help="time training steps with masking off/on for CONFIG (default cpu.toml on CPU, high_vram.toml "
                        "on CUDA; 'none' skips)")
    p.add_argument("--step-strategy", default="structural", choices=STRATEGIES, help="masking strategy for the steps")
    p.add_argument("--steps", type=int, default=10, help="timed steps per mode for --step-share")
    p.add_argument("--profile", action="store_true", help="torch.profiler breakdown of the torch path")
    p.add_argument("--profile-size", type=parse_size, default=(64, 1024), help="BxT for --profile")
    p.add_argument("--no-hf", action="store_true", help="skip the Hugging Face collator")
    p.add_argument("--chain", action="store_true",
                   help="also time every Genesis provider with masking.chain = true (rows NAME+chain)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run: small check set, short interpreter check, 2 steps, budget <= 0.3 s")
    p.add_argument("--json", metavar="PATH", help="write the results, checks and machine info as JSON")
    p.add_argument("--interpret-check", metavar="PATH", help=argparse.SUPPRESS)  # child process mode
    args = p.parse_args(argv)
    args.strategies = [s.strip() for s in args.strategies.split(",") if s.strip()]
    bad = [s for s in args.strategies if s not in STRATEGIES]
    if bad or not args.strategies:
        p.error(f"--strategies: unknown {bad} (choose from {', '.join(STRATEGIES)})")
    for option in ("sizes", "kernel_sizes"):
        try:
            setattr(args, option, [parse_size(s.strip()) for s in getattr(args, option).split(",") if s.strip()])
        except argparse.ArgumentTypeError as e:
            p.error(f"--{option.replace('_', '-')}: {e}")
    for option in ("kernel_blocks", "kernel_windows"):
        text = getattr(args, option)
        try:
            values = [int(b) for b in text.split(",") if b.strip()]
        except ValueError:
            p.error(f"--{option.replace('_', '-')}: expected a comma list of integers (got {text!r})")
        if any(v < 16 or v & (v - 1) for v in values):  # Triton blocks and windows are powers of two
            p.error(f"--{option.replace('_', '-')}: each value must be a power of two >= 16 (got {text!r})")
        setattr(args, option, values)
    if not args.sizes:
        p.error("--sizes: no size given")
    for option, low in (("threads", 1), ("repeats", 1), ("batches", 1), ("steps", 1), ("warmup", 1),
                        ("min_repeats", 1)):
        if getattr(args, option) < low:
            p.error(f"--{option.replace('_', '-')}: must be >= {low} (got {getattr(args, option)})")
    args.min_repeats = min(args.min_repeats, args.repeats)  # --repeats 2 means at most 2, as its help says
    if not args.budget >= 0:
        p.error(f"--budget: must be >= 0 seconds (got {args.budget})")
    if args.json:  # fail now, not after the timing
        target = Path(args.json)
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            p.error(f"--json {args.json}: cannot create its directory ({e.strerror or e})")
        if target.is_dir() or not os.access(target.parent, os.W_OK):
            p.error(f"--json {args.json}: not a writable file path")
    if args.quick:
        args.budget, args.steps, args.warmup = min(args.budget, 0.3), min(args.steps, 2), min(args.warmup, 1)
    if args.step_share is None:
        args.step_share = "high_vram.toml" if args.device == "cuda" else "cpu.toml"
    if args.step_share != "none":
        try:
            load_config(args.step_share)  # a missing or bad config fails now, not after the timing
        except ConfigError as e:
            p.error(f"--step-share: {e}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        flush_denormals()  # as genesis.train does on the CPU
    if args.interpret_check:
        return interpret_check(args.interpret_check, args.strategies, args.quick)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but CUDA is not available", file=sys.stderr)
        return 2
    if os.environ.pop("GENESIS_MASK_IMPL", None):
        log("note: GENESIS_MASK_IMPL ignored: each provider names its impl")
    info = machine_info(args, args.device)
    log(f"machine: {info['cpu']} ({info['cpu_count']} cores), {args.threads} torch thread(s), "
        f"load {fmt_load(info['loadavg_start'])}" + (f", GPU {info['gpu']}" if args.device == "cuda" else ""))

    cfg = load_config("cpu.toml")
    corpus = prepare(cfg, log=log)
    split, tok = corpus.splits["train"], corpus.tokenizer
    vocab = tok.get_vocab_size(with_added_tokens=True)
    collator, hf_note = (None, "skipped by --no-hf") if args.no_hf else make_hf_collator(tok)
    if hf_note:
        log(f"note: {hf_note}")

    # the baseline datasets hold the training split as the notes hold their corpus
    tokens = np.asarray(split.tokens).astype(np.int64).tolist()
    maskers = {}
    for s in args.strategies:  # resolving the lexicon takes ~1.5 s: the torch path shares one masker across devices
        maskers["torch-cpu", s] = make_masker(tok, cfg.masking, s, "torch")
        if args.device == "cuda":
            maskers["torch-cuda", s] = maskers["torch-cpu", s]
            maskers["triton-cuda", s] = make_masker(tok, cfg.masking, s, "triton")
        if args.chain:
            for name in [n for n, strategy in maskers if strategy == s]:
                impl = "triton" if name.startswith("triton") else "torch"
                maskers[name + "+chain", s] = make_masker(tok, cfg.masking, s, impl, chain=True)
    punctuation = set(np.flatnonzero(maskers["torch-cpu", args.strategies[0]].lexicon.clause_boundary).tolist())

    def loop_dataset(strategy: str, T: int):
        if strategy == "uniform":
            return NotesUniformDataset(tokens, tok, T)
        if strategy == "weighted":
            return NotesWeightedDataset(tokens, tok, T)
        return NotesStructuralDataset(tokens, np.asarray(split.verse_start), tok, T, punctuation)

    def providers_for(work: Workload, datasets: dict) -> dict:
        out = {}
        for s in args.strategies:
            out["loop", s] = loop_provider(datasets[s], s, work)
        if collator is not None:
            out["hf-collator", "mlm-15%"] = hf_provider(collator, work)
        for (name, s), masker in maskers.items():
            out[name, s] = genesis_provider(name, masker, s, work, "cuda" if "cuda" in name else "cpu")
        return out

    # ---- checks, before any timing
    check_B, check_T, check_n = (8, 1024, 4) if args.quick else (32, 1024, 16)  # ~750 / ~12k matches
    log(f"checking: rates on {check_n} batches of {check_B}x{check_T}; kernel == torch path")
    check_work = make_workload(split, check_B, check_T, check_n, DATA_SEED + 1, args.device, args.layout,
                               collator is not None)
    check_sets = {s: loop_dataset(s, check_T) for s in args.strategies}
    check_providers = providers_for(check_work, check_sets)
    rates = rate_checks(check_providers, check_sets, check_work, vocab, maskers, collator)
    log("building workloads: " + ", ".join(f"{b}x{t}" for b, t in args.sizes))
    workloads = [make_workload(split, b, t, args.batches, DATA_SEED, args.device, args.layout, collator is not None)
                 for b, t in args.sizes]
    if args.device == "cuda":
        kernel = kernel_check_cuda(tok, cfg.masking, args.strategies, workloads)
    else:
        kernel = kernel_check_interpreter(args.strategies, args.quick)
    checks = {"kernel_equals_torch": kernel, "rates": rates,
              "passed": kernel["status"] != "failed" and all(r["passed"] for r in rates)}
    print_checks(checks)
    report: dict[str, Any] = {"machine": info, "args": {k: v for k, v in vars(args).items() if k != "interpret_check"},
                              "notes": [hf_note] if hf_note else [], "checks": checks,
                              "maskers": {s: maskers["torch-cpu", s].describe() for s in args.strategies}}
    if not checks["passed"]:
        print("error: a check failed; nothing was timed", file=sys.stderr)
        if args.json:
            write_report(args.json, report)
        return 1

    # ---- timing
    flush = L2Flush() if args.device == "cuda" else None
    copy_bw = copy_bandwidth_gb_s() if args.device == "cuda" else None
    timings = {}
    for work in workloads:
        log(f"timing {work.name} ({args.order} order) ...")
        datasets = {s: loop_dataset(s, work.T) for s in args.strategies}
        timings[work.name] = time_providers(list(providers_for(work, datasets).values()), args.warmup, args.repeats,
                                            args.min_repeats, args.budget, flush, args.order)
    del flush
    rows = build_rows(workloads, args.strategies, timings, args.device, copy_bw)
    print()
    print_table(rows, args.device)
    if copy_bw:
        print(f"\ndevice-to-device copy of 1 GiB: {copy_bw['gb_per_s']:.0f} GB/s (bytes read + written)")
    kernel_rows = None
    if args.device == "cuda" and args.kernel_sizes:
        log("timing the kernel alone: " + ", ".join(f"{b}x{t}" for b, t in args.kernel_sizes))
        big = [make_workload(split, b, t, args.batches, DATA_SEED, "cuda", args.layout, False)
               for b, t in args.kernel_sizes]
        kernel_rows = kernel_graph_timing(kernel_maskers(maskers, args.strategies, tok, cfg.masking), big,
                                          args.kernel_blocks, args.kernel_windows, copy_bw)
        del big
        print_kernel_table(kernel_rows, copy_bw)

    share = None
    if args.step_share.lower() != "none":
        log(f"step share: {args.step_share}, masking {args.step_strategy}, {args.steps} steps per mode")
        share = step_share(args.step_share, args.device, args.step_strategy, args.steps, args.warmup)
        print(f"\nstep share ({share['config']}, {share['device']} {share['dtype']}, {share['tokens_per_step']} tokens "
              f"per step, masking {share['strategy']} via {share['impl']}): step "
              f"{share['step_ms_masking_off']['median']:.1f} ms masking off, "
              f"{share['step_ms_masking_on']['median']:.1f} ms on (x{share['ratio_on_off']:.3f}); masking alone "
              f"{share['masking_ms_per_step']['median']:.2f} ms = {share['masking_pct_of_step']:.2f}% of the step")

    prof = None
    if args.profile:
        B, T = args.profile_size
        strategy = "structural" if "structural" in args.strategies else args.strategies[0]
        name = "torch-cuda" if args.device == "cuda" else "torch-cpu"
        batch = make_workload(split, B, T, 1, DATA_SEED, args.device, args.layout, False)
        batch = (batch.cuda or batch.cpu)[0]
        prof = profile_torch_path(maskers[name, strategy], batch, 10, args.device)
        prof["strategy"] = strategy
        print_profile(prof)

    targets = evaluate_targets(rows, share, args.device, args.threads, kernel_rows, args.order)
    print_targets(targets)
    info["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    print(f"\nload average (1, 5, 15 min) at start {fmt_load(info['loadavg_start'])}, at end "
          f"{fmt_load(info['loadavg_end'])} on {info['cpu_count']} cores; masking sources {SOURCE_HASHES}")
    report.update(results=rows, kernel_only=kernel_rows, copy_bandwidth=copy_bw, step_share=share, profile=prof,
                  targets=targets)
    if args.json and write_report(args.json, report):
        log(f"wrote {args.json}")
    return 0


def write_report(path: str, report: dict) -> bool:
    """The JSON report; if it cannot be written, it goes to stdout instead, so that a long run is never lost."""
    text = json.dumps(report, indent=1, default=str)
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text)
    except OSError as e:
        print(f"error: --json {path}: cannot write ({e.strerror or e}); the report follows on stdout",
              file=sys.stderr)
        print(text)
        return False
    return True


if __name__ == "__main__":
    sys.exit(main())
