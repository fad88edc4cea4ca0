"""`ConnectiveMasker`, the plug-in: construction and validation, the call, the connective targets, the counts.

    masker = ConnectiveMasker.from_tokenizer(tokenizer, strategy="structural")
    out = masker(input_ids, step=step, verse_start=None)     # (B, T) ids on any device
    logits = model(out.input_ids)                            # targets stay as they are

The masker owns one set of tables per device and chooses per device between the Triton kernel and the torch path
(`genesis.masking.dispatch`); schedules and the adaptive rule come from `genesis.curriculum`, its reports from
`genesis.masking.report`. Semantics: docs/masking.md.
"""

from __future__ import annotations

import dataclasses
import logging
import operator
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from genesis.config import STRATEGIES, ConfigValueError, MaskingConfig, build, idle_keys, to_dict
from genesis.console import first_line
from genesis.curriculum import adapted_weights, schedule_factor
from genesis.flags import IGNORE_INDEX
from genesis.lexicon import ResolvedLexicon
from genesis.masking.dispatch import choose_impl, requested_impl
from genesis.masking.errors import MaskingError
from genesis.masking.report import masker_chain_statistics, masker_description, masker_report
from genesis.masking.tables import MaskTables, build_tables, resolve_lexicon
from genesis.masking.torch_path import _no_readout, _shift_right, _take, _unmasked, _word_entries, mask_torch
from genesis.tokenizer import find_mask_id

# the masker's default `log`: its few lines (the path chosen, a fallback, a disabled masker) go to logging at INFO,
# as a library's should; the trainer passes its own console `log`, and log=None silences them. The logger keeps the
# package's name, the one users configure.
logger = logging.getLogger("genesis.masking")


def _counter_word(value: Any, name: str, bits: int = 32, range_name: str | None = None) -> int:
    """`value` as an int in [0, 2**bits): Python, numpy and one-element torch integers (operator.index). Not a bool,
    float or str: int(1.9) would repeat step 1's masks, and 2**32 or -1 would wrap onto another counter word."""
    if isinstance(value, bool) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise MaskingError(f"{name} must be an integer, not a bool (got {value!r})")
    if isinstance(value, torch.Tensor) and value.device.type == "meta":  # .item() would raise a RuntimeError
        raise MaskingError(f"{name} is a tensor on the meta device, which holds no value; pass an int")
    try:
        number = operator.index(value)
    except TypeError:
        raise MaskingError(f"{name} must be an integer (got {type(value).__name__} {value!r:.60})") from None
    if not 0 <= number < 2**bits:
        word = "a 32-bit Philox counter word" if bits == 32 else "a Philox key (passed as a signed 64-bit int)"
        raise MaskingError(f"{range_name or name} must be in [0, 2**{bits}), the range of {word} (got {name}={number})")
    return number


def _check_options(check_ids: Any, enabled: Any, log: Any) -> None:
    for name, flag in (("check_ids", check_ids), ("enabled", enabled)):
        if not isinstance(flag, bool):
            raise MaskingError(f"{name} must be True or False (got {flag!r:.60})")
    if log is not None and not callable(log):
        raise MaskingError(f"log must be a callable or None (got {type(log).__name__} {log!r:.60})")


def _connective_table(word: str, value: Any) -> Any:
    """A [masking.connectives] value as the table `build` reads: (weight, class) pairs, as DEFAULT_CONNECTIVES
    writes them, become {weight, class}; tables pass; anything else is an error that says what is accepted."""
    if isinstance(value, Mapping):
        return dict(value)
    if isinstance(value, list) and len(value) == 2:  # to_dict has made tuples lists
        return {"weight": value[0], "class": value[1]}
    raise MaskingError(f"masking.connectives.{word}: expected a (weight, class) pair or a table "
                       f"{{weight = .., class = ..}}, got {value!r:.80}")


def _masking_config(config: MaskingConfig | Mapping[str, Any] | None, overrides: Mapping[str, Any]) -> MaskingConfig:
    """A MaskingConfig from a config or a mapping of its keys, with `overrides` on top; a MaskingError names a bad key.
    to_dict turns dataclass values (MaskRule, ConnectiveEntry) into the tables `build` reads."""
    table = to_dict(config) if isinstance(config, MaskingConfig) else to_dict(dict(config or {}))
    table.update(to_dict(overrides))
    if isinstance(table.get("connectives"), Mapping):
        table["connectives"] = {word: _connective_table(word, value) for word, value in table["connectives"].items()}
    try:
        return build(MaskingConfig, table, "masking")
    except ConfigValueError as e:
        raise MaskingError(f"{e.key}: {e.reason}") from None



@dataclass
class MaskOutput:
    input_ids: torch.Tensor  # (B, T) masked copy of the inputs, same dtype
    mask: torch.Tensor  # (B, T) bool: positions of selected connectives (every piece)
    classes: torch.Tensor  # (B, T) int64: class id at masked positions, -100 elsewhere
    connectives: torch.Tensor  # (B, T) int64: lexicon entry index at masked positions, -100 elsewhere
    matched: torch.Tensor  # (B, T) bool: every piece of every lexicon match found, masked or not
    # masking.readout only (else None), docs/masking.md#readout-targets:
    readout: torch.Tensor | None = None  # (B, T) int64: a masked word's lexicon index at its readout position
    readout_start: torch.Tensor | None = None  # (B, T) int64: there, the column after that word's last piece; -1


class ConnectiveMasker:
    """Masks logical connectives in (B, T) token batches on the batch's device. Semantics: docs/masking.md.

    `seed` (in [0, 2**63)) and `rank` (in [0, 2**32), one key per process) may be set after construction, as the
    Trainer and Lightning examples in docs/integrations.md set `masker.rank`; both are checked when set. With
    `enabled=False` the masker is a pass-through: each call checks its input as usual and returns it unchanged,
    nothing masked."""

    def __init__(self, lexicon: ResolvedLexicon, config: MaskingConfig, mask_id: int, seed: int = 0,
                 rank: int = 0, check_ids: bool = True, log: Callable[[str], None] | None = logger.info,
                 enabled: bool = True):
        if not isinstance(config, MaskingConfig):
            raise MaskingError(f"config must be a MaskingConfig (got {type(config).__name__}); "
                               f"ConnectiveMasker.from_tokenizer also takes a mapping of [masking] keys")
        _check_options(check_ids=check_ids, enabled=enabled, log=log)
        self.seed, self.rank = seed, rank  # checked by the setters below
        self.lexicon, self.config = lexicon, config
        self.check_ids, self.log, self.enabled = check_ids, log, enabled
        self.mask_id = mask_id
        self._host_tables = build_tables(lexicon, config, mask_id)
        self._tables: dict[torch.device, MaskTables] = {}
        self._prob_base: dict[torch.device, torch.Tensor] = {}  # the configured table, where a schedule scales it
        self._factor: dict[torch.device, float] = {}  # the schedule factor each device's prob_table holds now
        self._impl: dict[torch.device, str] = {}
        self._kernel_ran: set[torch.device] = set()  # devices where the kernel compiled and ran once
        self._reference_tables: dict[torch.device, MaskTables] = {}  # the control arm's real-connective matcher
        # schedule = "plateau": the step masking starts ramping at, set by whoever watches the loss (the trainer)
        self.plateau_step: int | None = None
        # strategy = "random" (`control`): the ControlArm chosen, and the real connectives' lexicon (for the counts)
        self.control_arm: Any = None
        self.reference_lexicon: ResolvedLexicon | None = None

    @property
    def seed(self) -> int:
        """The Philox key: an integer in [0, 2**63)."""
        return self._seed

    @seed.setter
    def seed(self, value: int) -> None:
        self._seed = _counter_word(value, "seed", bits=63)

    @property
    def rank(self) -> int:
        """The process's counter word (one key per process): an integer in [0, 2**32). Out of that range a rank
        would wrap onto another one's masks (2**32 onto rank 0's), so it is an error."""
        return self._rank

    @rank.setter
    def rank(self, value: int) -> None:
        self._rank = _counter_word(value, "rank")

    @classmethod
    def from_tokenizer(cls, tokenizer: Any, config: MaskingConfig | Mapping[str, Any] | None = None, *,
                       mask_token: str = "", seed: int | None = None, rank: int = 0, check_ids: bool = True,
                       log: Callable[[str], None] | None = logger.info, **overrides) -> ConnectiveMasker:
        """Build from a `tokenizers.Tokenizer` or a transformers fast tokenizer.

        `config` is a MaskingConfig, a mapping of its keys (the [masking] TOML table) or None for defaults; keyword
        overrides (strategy="structural", lookback=20, ...) apply on top. A connective is a {weight, class} table or
        a (weight, class) pair, as in DEFAULT_CONNECTIVES. `enabled = false`, given as a key of the mapping or as a
        keyword, makes the masker a pass-through (inputs returned unchanged, nothing masked; one log line says so).
        Not given, the masker masks: MaskingConfig's default enabled = false is the trainer's switch, so the
        `enabled` of a MaskingConfig instance is not read (genesis.train builds no masker when it is false).
        `log` receives the masker's few lines (the path chosen, a fallback, a disabled masker): by default the
        "genesis.masking" logger at INFO; any callable (log=print) or None (silent) instead.
        Bad arguments, keys or values raise ValueError naming them (MaskingError; TokenizerError for the tokenizer
        or its mask token), before the lexicon is resolved. A key given here that its switch leaves unread
        (chain_gap without chain=True, schedule_steps with the constant schedule, ...) is a UserWarning."""
        if config is not None and not isinstance(config, (MaskingConfig, Mapping)):
            hint = ""
            if isinstance(config, str):
                names = repr(config) if config in STRATEGIES else "'uniform', 'weighted' or 'structural'"
                hint = f"; to choose a strategy, pass strategy={names}"
            raise MaskingError(f"config must be a MaskingConfig or a mapping of [masking] keys, or None (got "
                               f"{type(config).__name__} {config!r:.60}){hint}")
        if not isinstance(mask_token, str):
            raise MaskingError(f"mask_token must be a str, the mask token's name (got {mask_token!r:.60})")
        if seed is not None:
            _counter_word(seed, "seed", bits=63)
        _counter_word(rank, "rank")
        cfg = _masking_config(config, overrides)
        enabled_given = "enabled" in overrides or (isinstance(config, Mapping) and "enabled" in config)
        given = set(overrides) | (set(config) if isinstance(config, Mapping) else set())
        for key, message in idle_keys(cfg):
            if key in given:  # a MaskingConfig was warned about where it was loaded (load_config)
                warnings.warn(message, UserWarning, stacklevel=2)
        if cfg.strategy == "random":
            raise MaskingError("strategy 'random' (the control arm) picks its words and its rate from the training "
                               "tokens: build it with ConnectiveMasker.control(tokenizer, config, tokens, seq_len=...)")
        enabled = cfg.enabled or not enabled_given
        _check_options(check_ids=check_ids, enabled=enabled, log=log)
        mask_id = find_mask_id(tokenizer, mask_token)  # before the slow lexicon: a missing token fails at once
        lex = resolve_lexicon(tokenizer, cfg)
        if seed is None:
            seed = cfg.seed if cfg.seed is not None else 0
        masker = cls(lex, cfg, mask_id, seed=seed, rank=rank, check_ids=check_ids, log=log, enabled=enabled)
        if not enabled and log is not None:
            log("masking: disabled (enabled = false): the masker returns its inputs unchanged")
        return masker

    @classmethod
    def control(cls, tokenizer: Any, config: MaskingConfig | Mapping[str, Any] | None, tokens: Any, *,
                seq_len: int, verse_start: Any = None, mask_token: str = "", seed: int | None = None, rank: int = 0,
                check_ids: bool = True, log: Callable[[str], None] | None = logger.info,
                warn: Callable[[str], None] | None = None, **overrides) -> ConnectiveMasker:
        """The control arm's masker (strategy = "random", semantics in `genesis.control`): the training split's
        `tokens` (1-D ids, e.g. `Corpus.splits["train"].tokens`) and their `verse_start` flags (optional), read as
        rows of `seq_len`, choose the control words and calibrate p against config's control_reference. `config`
        and `overrides` as in `from_tokenizer` (strategy = "random" is implied); `warn` receives the line saying p
        was capped at 1 (default: `log`). The masker's `control_arm` holds the ControlArm (words, p, rates); its
        `lexicon` is the control words'; `reference_lexicon` the real connectives'."""
        from genesis.control import build_control

        cfg = _masking_config(config, {**overrides, "strategy": "random"})
        _check_options(check_ids=check_ids, enabled=True, log=log)
        if seed is None:
            seed = cfg.seed if cfg.seed is not None else 0
        _counter_word(seed, "seed", bits=63)
        _counter_word(rank, "rank")
        if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
            raise MaskingError(f"seq_len must be a positive integer (got {seq_len!r:.60})")
        tokens = tokens.detach().cpu().numpy() if isinstance(tokens, torch.Tensor) else np.asarray(tokens)
        if tokens.ndim != 1:
            raise MaskingError(f"tokens must be 1-D token ids (got shape {tokens.shape})")
        if verse_start is not None:
            if isinstance(verse_start, torch.Tensor):
                verse_start = verse_start.detach().cpu().numpy()
            verse_start = np.asarray(verse_start)
            if verse_start.shape != tokens.shape:
                raise MaskingError(f"verse_start must have the shape of tokens {tokens.shape} (got "
                                   f"{verse_start.shape})")
        mask_id = find_mask_id(tokenizer, mask_token)
        try:
            return build_control(cls, tokenizer, cfg, tokens, verse_start, seq_len, mask_id, seed, rank, check_ids,
                                 log, warn if warn is not None else log)
        except ValueError as e:
            if isinstance(e, MaskingError):
                raise
            raise MaskingError(f"strategy 'random': {e}") from None

    # -- tables and dispatch ----------------------------------------------------------------------------------

    def tables(self, device: torch.device | str) -> MaskTables:
        """The tables on `device` (built once per device); a MaskingError for a device string torch does not know or
        a device this torch cannot use."""
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise MaskingError(f"{device!r}: not a torch device ({first_line(e)})") from None
        if device.type == "cuda" and not torch.cuda.is_available():  # current_device() would raise AssertionError
            raise MaskingError(f"{device}: CUDA is not available to this torch ({torch.__version__}); "
                               f"use a CPU device or a CUDA build of torch")
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device not in self._tables:
            try:
                tables = self._host_tables.to(device)
            except (RuntimeError, AssertionError) as e:  # mps or xpu without support: RuntimeError, AssertionError
                raise MaskingError(f"{device}: this torch ({torch.__version__}) cannot use it ({first_line(e)})") \
                    from None
            if self.config.schedule != "constant":  # its own table to scale (CPU tables share the host's tensors)
                self._prob_base[device] = tables.prob_table
                tables.prob_table = tables.prob_table.clone()
                self._factor[device] = 1.0
            self._tables[device] = tables
        return self._tables[device]

    def schedule_factor(self, step: int) -> float:
        """The factor masking.schedule puts on every masking probability at `step` (1 for "constant"): from
        schedule_start at step 0 to 1 at schedule_steps, linearly or on a half cosine, then 1. Rounded to float32,
        the precision the probabilities are multiplied in."""
        return schedule_factor(self.config, step, self.plateau_step)

    # -- connective targets and adaptive weights ---------------------------------------------------------------

    def target_matches(self, window: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """For (B, T + 1) windows of token ids (inputs x = window[:, :-1], targets y = window[:, 1:]): which targets
        are a piece of a lexicon match (bool (B, T)), and at each target that is the first piece of one, its lexicon
        entry (int64 (B, T), -1 elsewhere). Matched over the whole window, so exact at every target column,
        including the last, which the masker's pass over x never sees; masked or not (probabilities, draws and
        chains play no part). The dense layout's matching stage on the window's device: a few whole-batch ops,
        no random draws, no host sync."""
        if window.dim() != 2 or window.shape[1] < 2:
            raise MaskingError(f"window must be (B, T + 1) token ids with T >= 1 (got shape {tuple(window.shape)})")
        tables = self.tables(window.device)
        V = tables.vocab_size
        ids = window.long().clamp(-1, V).remainder_(V + 1)  # invalid ids land on the neutral slot
        B, T1 = ids.shape
        column = torch.arange(T1, device=ids.device).expand(B, T1)
        word_start, entry = _word_entries(ids, tables, column)
        start = torch.where(word_start, column, 0).cummax(1).values
        piece = entry.gather(1, start) >= 0
        return piece[:, 1:], entry[:, 1:]

    def weights(self) -> torch.Tensor:
        """The per-entry weights the masker draws with now: (E,) float32 on the CPU (a copy)."""
        return self._host_tables.entry_weight.clone()

    def set_weights(self, weights: torch.Tensor) -> None:
        """Replace the per-entry weights, in place on every device's tables (a checkpoint's, on resume)."""
        weights = torch.as_tensor(weights, dtype=torch.float32).cpu()
        if weights.shape != self._host_tables.entry_weight.shape:
            raise MaskingError(f"weights must have shape {tuple(self._host_tables.entry_weight.shape)}, one per "
                               f"lexicon entry (got {tuple(weights.shape)})")
        self._host_tables.entry_weight.copy_(weights)
        for tables in self._tables.values():
            if tables.entry_weight.data_ptr() != self._host_tables.entry_weight.data_ptr():
                tables.entry_weight.copy_(weights)  # on the device, in place: the kernel reads the same tensor

    def adapt(self, correct: torch.Tensor, count: torch.Tensor) -> dict[int, tuple[float, float]]:
        """One adaptive update from per-entry counts (E,) (any device): `count` observations of each lexicon entry
        (a target that is its first piece) and `correct` of them where the model's argmax was that piece. An entry
        with at least adapt_min_count observations and accuracy below adapt_low gets weight x adapt_up, above
        adapt_high weight x adapt_down, clamped to [adapt_min_weight, adapt_max_weight]; others keep theirs.
        Returns {entry: (old weight, new weight)} for the weights that changed. One host sync (the counts are read);
        call it every few steps, then reset the counts (`genesis.train` does, every adapt_every steps)."""
        c = self.config
        if not (c.strategy == "weighted" or (c.strategy == "structural" and c.structural_weights)):
            raise MaskingError(f"adapt changes the connectives' weights, which strategy {c.strategy!r} does not read "
                               f"(use weighted, or structural with structural_weights = true)")
        correct, count = (torch.as_tensor(t).detach().to("cpu", torch.float64) for t in (correct, count))
        old = self.weights()
        if correct.shape != old.shape or count.shape != old.shape:
            raise MaskingError(f"correct and count must have shape {tuple(old.shape)}, one per lexicon entry "
                               f"(got {tuple(correct.shape)} and {tuple(count.shape)})")
        new = adapted_weights(c, old, correct, count)
        changed = (new != old).nonzero().flatten().tolist()
        if changed:
            self.set_weights(new)
        return {e: (float(old[e]), float(new[e])) for e in changed}

    def impl(self, device: torch.device | str) -> str:
        """'triton' or 'torch' for `device`, chosen once per device."""
        device = torch.device(device)
        if device not in self._impl:
            self._impl[device] = choose_impl(self.config.impl, device, self.log)
        return self._impl[device]

    def to(self, device: torch.device | str) -> ConnectiveMasker:
        """Build the tables and choose the path for `device` now, rather than on the first call."""
        self.tables(device)
        self.impl(device)
        return self

    # -- the op -----------------------------------------------------------------------------------------------

    def _validate(self, input_ids: torch.Tensor, verse_start: torch.Tensor | None) -> None:
        if not isinstance(input_ids, torch.Tensor):
            raise MaskingError(f"input_ids must be a torch.Tensor (got {type(input_ids).__name__})")
        if input_ids.dim() != 2:
            raise MaskingError(f"input_ids must be 2-D (B, T) (got shape {tuple(input_ids.shape)})")
        if input_ids.dtype not in (torch.int32, torch.int64):
            raise MaskingError(f"input_ids must be int32 or int64 (got {input_ids.dtype})")
        if input_ids.layout != torch.strided:
            raise MaskingError(f"input_ids must be a dense (strided) tensor (got layout {input_ids.layout}); "
                               f"pass input_ids.to_dense()")
        if input_ids.device.type == "meta":
            raise MaskingError(f"input_ids is on the meta device ({input_ids.device}), which holds no token ids to "
                               f"mask; pass the batch on the device it will run on")
        if verse_start is not None:
            if not isinstance(verse_start, torch.Tensor) or verse_start.shape != input_ids.shape:
                got = tuple(verse_start.shape) if isinstance(verse_start, torch.Tensor) else type(verse_start).__name__
                raise MaskingError(f"verse_start must have the shape of input_ids {tuple(input_ids.shape)} (got {got})")
            if verse_start.dtype not in (torch.bool, torch.uint8, torch.int8, torch.int32, torch.int64):
                raise MaskingError(f"verse_start must be bool or integer (got {verse_start.dtype})")
            if verse_start.layout != torch.strided:
                raise MaskingError(f"verse_start must be a dense (strided) tensor (got layout {verse_start.layout})")
            if verse_start.device != input_ids.device:
                raise MaskingError(f"verse_start is on {verse_start.device}, input_ids on {input_ids.device}")
        if self.check_ids and input_ids.numel():
            lo, hi = (int(v) for v in torch.aminmax(input_ids))
            V = self._host_tables.vocab_size
            if lo < 0 or hi >= V:
                raise MaskingError(f"input_ids contain ids outside the vocabulary [0, {V}): min {lo}, max {hi}")

    def __call__(self, input_ids: torch.Tensor, step: int, verse_start: torch.Tensor | None = None,
                 row_offset: int = 0) -> MaskOutput:
        """Mask one batch. `step` keys the random draws (with seed, rank, row_offset + row and column); pass the
        optimizer step, and with gradient accumulation a row_offset of micro_step * micro_batch. Both are integers
        in [0, 2**32) (Python, numpy or one-element torch integers). A disabled masker returns the batch unchanged,
        nothing masked."""
        self._validate(input_ids, verse_start)
        step_and_offset = "step and row_offset"
        step = _counter_word(step, "step", range_name=step_and_offset)
        row_offset = _counter_word(row_offset, "row_offset", range_name=step_and_offset)
        if row_offset + input_ids.shape[0] > 2**32:  # the last row's counter word would wrap onto row 0's masks
            raise MaskingError(f"row_offset + rows must be <= 2**32: each row's counter word row_offset + row is in "
                               f"[0, 2**32), like rank (got row_offset={row_offset} with {input_ids.shape[0]} rows)")
        if not self.enabled:
            return MaskOutput(input_ids.clone(memory_format=torch.contiguous_format),
                              *_unmasked(*input_ids.shape, input_ids.device),
                              *_no_readout(*input_ids.shape, input_ids.device, self.config.readout))
        if verse_start is not None and verse_start.dtype != torch.bool:
            verse_start = verse_start != 0
        device = input_ids.device
        tables = self.tables(device)
        if device in self._factor:  # a schedule: the table is the configured one x the step's factor
            factor = self.schedule_factor(step)
            if factor != self._factor[device]:
                torch.mul(self._prob_base[device], factor, out=tables.prob_table)  # on the device: no host sync
                self._factor[device] = factor
        if self.impl(device) == "triton":
            try:
                from genesis.kernels.mask import connective_mask_triton

                result = connective_mask_triton(input_ids, verse_start, tables, self.seed, step, self.rank,
                                                row_offset)
            except Exception as e:
                # 'auto' means the fastest path that works: a kernel that fails to compile or launch on its first
                # call (a broken Triton install, an unsupported card) falls back, with one log line. Asked for by
                # name, or failing after it once ran, it raises.
                if requested_impl(self.config.impl) != "auto" or device in self._kernel_ran:
                    raise
                self._impl[device] = "torch"
                if self.log is not None:
                    first = (str(e).strip().splitlines() or [""])[-1][:200]
                    self.log(f"masking: the Triton kernel failed on {device} ({type(e).__name__}: {first}); "
                             f"using the torch path")
                return self(input_ids, step, verse_start, row_offset)
            self._kernel_ran.add(device)
        else:
            result = mask_torch(input_ids, verse_start, tables, self.seed, step, self.rank, row_offset,
                                ids_checked=self.check_ids)
        return MaskOutput(*result)

    def stats(self, out: MaskOutput, input_ids: torch.Tensor) -> dict[str, torch.Tensor]:
        """Counts as 0-d device tensors (no host sync): masked tokens, masked words — a masked position starts
        a word unless it glues onto a masked piece of the same connective just before it — and matched words (the
        lexicon's words in the batch, masked or not); with chain = true also masked chains (of two or more causal
        words) and the words in them; with readout = true the readout positions written ("readout_targets") and the
        masked words without one: their position taken by a later word ("readout_shared") or past the row's end
        ("readout_dropped"), the three adding up to masked_words; for the control arm (`control_arm`) also the real
        connectives in the batch ("connective_words") and those masked ("masked_connective_words", 0 unless a control
        word is one)."""
        m, c = out.mask, out.connectives
        tables = self.tables(input_ids.device)
        ids = input_ids.long().clamp(0, tables.vocab_size)  # invalid ids are never masked; any slot will do
        glued = _take(tables.glue_left, ids[:, 1:]) & _take(tables.word_end, ids[:, :-1])
        word_start = m.clone()
        word_start[:, 1:] &= ~(m[:, :-1] & (c[:, 1:] == c[:, :-1]) & glued)
        # a match never glues onto the token before it (lexicon.find_matches): its unglued pieces are its starts
        glued_before = torch.zeros_like(m)
        glued_before[:, 1:] = glued
        counts = {"masked_tokens": m.sum(), "masked_words": word_start.sum(),
                  "matched_words": (out.matched & ~glued_before).sum()}
        if tables.chain:  # masked causal words within chain_gap of each other: one chain (all-or-nothing)
            causal = word_start & (out.classes == tables.chain_class)
            B, T = m.shape
            column = torch.arange(T, device=m.device).expand(B, T)
            far = 2 * T + tables.chain_gap
            before = _shift_right(torch.where(causal, column, -far).cummax(1).values, -far)
            after = torch.where(causal, column, far).flip(1).cummin(1).values.flip(1)
            after = torch.nn.functional.pad(after[:, 1:], (0, 1), value=far)
            linked_before = causal & (column - before <= tables.chain_gap)
            linked_after = causal & (after - column <= tables.chain_gap)
            counts["masked_chains"] = (linked_after & ~linked_before).sum()
            counts["masked_chain_words"] = (linked_before | linked_after).sum()
        if out.readout is not None:  # every masked word is exactly one of: a target, shared (lost), dropped
            written = out.readout != IGNORE_INDEX
            continues = torch.zeros_like(m)
            continues[:, :-1] = m[:, 1:] & (c[:, 1:] == c[:, :-1]) & glued
            column = torch.arange(m.shape[1], device=m.device)
            # the words without a target are those ending after the row's last target minus one (any earlier word
            # has a readout position at or before that target, docs/masking.md#readout-targets)
            last_target = torch.nn.functional.pad(torch.where(written, column, -1), (1, 0), value=-1).amax(1)
            dropped = (m & ~continues & (column >= last_target.unsqueeze(1) - 1)).sum()
            counts["readout_targets"] = written.sum()
            counts["readout_dropped"] = dropped
            counts["readout_shared"] = counts["masked_words"] - counts["readout_targets"] - dropped
        if self.reference_lexicon is not None:
            starts = self._reference_starts(ids)
            counts["connective_words"] = starts.sum()
            counts["masked_connective_words"] = (starts & m).sum()
        return counts

    def _reference_starts(self, ids: torch.Tensor) -> torch.Tensor:
        """(B, T) bool: where a word of `reference_lexicon` (the real connectives) starts, by the dense matcher."""
        device = ids.device
        if device not in self._reference_tables:
            cfg = dataclasses.replace(self.config, strategy="uniform", default_connectives=True, connectives={})
            self._reference_tables[device] = build_tables(self.reference_lexicon, cfg, self.mask_id).to(device)
        B, T = ids.shape
        word_start, entry = _word_entries(ids, self._reference_tables[device],
                                          torch.arange(T, device=device).expand(B, T))
        return word_start & (entry >= 0)


    # -- reporting --------------------------------------------------------------------------------------------

    def report(self, tokens: Any = None) -> str:
        """What each connective word resolved to in this tokenizer, and what did not resolve; with chain = true and
        a token stream `tokens` (e.g. the training split's ids), also its chains (see `chain_statistics`)."""
        return masker_report(self, tokens)

    def chain_statistics(self, tokens: Any) -> dict[str, Any]:
        """The chains of a token stream (1-D ids, e.g. the training split's, read as one row), found with this
        masker's matcher and chain_gap: {"tokens", "causal" (causal matches), "chains", "members" (matches in a
        chain, heads included), "histogram" ({members: chains}, by length)}."""
        return masker_chain_statistics(self, tokens)

    def describe(self) -> str:
        """The masker in one line: strategy and rule, lexicon size, replacement, seed and classes."""
        return masker_description(self)
