"""The masker in other training loops: a transformers `Trainer` (genesis.integrations.transformers) and a Lightning
callback (genesis.integrations.lightning). This module holds what both share: building the masker, the row offsets
of the micro-batches of one optimizer step, and the masking stats summed for the framework's logger. Neither
framework is imported here; each submodule imports its own and says which extra to install when it is missing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from genesis.masking import ConnectiveMasker, MaskingError, MaskOutput


def missing_framework(module: str, needs: str, extra: str, error: ImportError) -> ImportError:
    """The ImportError a submodule raises when its framework is missing: what failed to import and the extra."""
    return ImportError(f"genesis.integrations.{module} needs {needs}, which failed to import ({error}): "
                       f'pip install "genesis-masking[{extra}]"')


def build_masker(masker: ConnectiveMasker | Mapping[str, Any], tokenizer: Any = None) -> ConnectiveMasker:
    """`masker` itself, or one built by ConnectiveMasker.from_tokenizer(tokenizer, **masker) from a mapping of its
    keyword arguments ([masking] keys such as strategy and mask_prob, and seed, mask_token, log, ...)."""
    if isinstance(masker, ConnectiveMasker):
        return masker
    if isinstance(masker, Mapping):
        if tokenizer is None:
            raise MaskingError("masker: a mapping of ConnectiveMasker.from_tokenizer's arguments needs the tokenizer "
                               "too (tokenizer=...)")
        return ConnectiveMasker.from_tokenizer(tokenizer, **masker)
    raise MaskingError(f"masker must be a ConnectiveMasker or a mapping of ConnectiveMasker.from_tokenizer's keyword "
                       f"arguments (got {type(masker).__name__})")


def _input_key(name: str, value: Any) -> str | None:
    if value is not None and not (isinstance(value, str) and value):
        raise MaskingError(f"{name} must be the name of a model input (a non-empty str) or None (got {value!r:.60})")
    return value


class TrainingMasks:
    """Masks the training micro-batches of one process: each call's row_offset continues the rows masked earlier in
    the same optimizer step, so the micro-batches of a step draw as one batch of their rows would; the masker's
    stats are summed on the device (no host sync) until the framework logs them.

    classes_key / readout_key name the model inputs that receive `out.classes` / `out.readout` (None: not passed)."""

    def __init__(self, masker: ConnectiveMasker, classes_key: str | None = None, readout_key: str | None = None,
                 log_stats: bool = True):
        if not isinstance(masker, ConnectiveMasker):
            raise MaskingError(f"masker must be a ConnectiveMasker (got {type(masker).__name__})")
        self.masker = masker
        self.classes_key = _input_key("classes_key", classes_key)
        self.readout_key = _input_key("readout_key", readout_key)
        self.log_stats = bool(log_stats)
        self.step, self.rows = -1, 0  # the optimizer step being masked and its rows masked so far
        self.stats: dict[str, torch.Tensor] = {}  # summed since the last take_stats()
        self.steps_in_stats = 0  # optimizer steps those sums cover

    def __call__(self, input_ids: torch.Tensor, step: int) -> MaskOutput:
        """Mask one training micro-batch of optimizer step `step`."""
        if step != self.step:
            self.step, self.rows = step, 0
            self.steps_in_stats += 1
        out = self.masker(input_ids, step=step, row_offset=self.rows)
        self.rows += input_ids.shape[0]
        if self.log_stats:
            for name, count in self.masker.stats(out, input_ids).items():
                self.stats[name] = self.stats[name] + count if name in self.stats else count
        return out

    def head_inputs(self, out: MaskOutput) -> dict[str, torch.Tensor]:
        """The extra model inputs asked for: {classes_key: out.classes, readout_key: out.readout}."""
        extra = {}
        if self.classes_key is not None:
            extra[self.classes_key] = out.classes
        if self.readout_key is not None:
            if getattr(out, "readout", None) is None:
                raise MaskingError(f"readout_key={self.readout_key!r}: this masker's output has no readout "
                                   f"(masking.readout = true makes one)")
            extra[self.readout_key] = out.readout
        return extra

    def take_stats(self) -> tuple[dict[str, torch.Tensor], int]:
        """The stats summed since the last call and the optimizer steps they cover; starts new sums."""
        stats, steps = self.stats, self.steps_in_stats
        self.stats, self.steps_in_stats = {}, 0
        return stats, steps
