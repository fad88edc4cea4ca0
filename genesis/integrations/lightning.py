"""A Lightning callback that masks connectives in the training batches: ConnectiveMasking.

    trainer = L.Trainer(callbacks=[ConnectiveMasking(masker)], ...)

Needs Lightning (`pip install "genesis-masking[lightning]"`)."""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import torch

from genesis.integrations import TrainingMasks, build_masker, missing_framework
from genesis.masking import ConnectiveMasker, MaskingError

try:
    from lightning.pytorch import Callback
except ImportError as e:
    raise missing_framework("lightning", "Lightning", "lightning", e) from None


class ConnectiveMasking(Callback):
    """Masks the training batches of a Lightning loop on the device, before training_step sees them; validation,
    test and predict batches are not touched.

    It runs in on_train_batch_start, the first Callback hook after the batch is moved to the device and the hook
    whose batch object is the one then passed to training_step (on_after_batch_transfer, which could return a new
    batch, is a LightningModule hook). So the batch is changed in place: a dict or a list gets the masked ids as
    a new entry; a tuple cannot take one, so its ids tensor is overwritten in place, which is refused when another
    tensor of the batch shares its memory (targets sliced from the same tensor would be masked too).

    Each micro-batch is masked with step = trainer.global_step (the optimizer step), a row_offset that continues
    the rows of the earlier micro-batches of the same step (accumulate_grad_batches), and rank =
    trainer.global_rank (each DDP process its own masks).

    masker: a ConnectiveMasker, or a mapping of ConnectiveMasker.from_tokenizer's keyword arguments, built with
        `tokenizer`.
    input_key: where the input ids are: a dict's key (default "input_ids") or a tuple's / list's index (default 0).
    classes_key / readout_key: a dict batch gets `out.classes` (each masked token's connective class, -100
        elsewhere) / `out.readout` under this key, for a head; None (default): not added.
    log_stats: log the masked tokens and words of each optimizer step (all micro-batches, summed over processes)
        through LightningModule.log, which writes them at the Trainer's logging steps (log_every_n_steps).

    `output` holds the last training batch's MaskOutput, for a training_step that needs more of it."""

    def __init__(self, masker: ConnectiveMasker | Mapping[str, Any], *, tokenizer: Any = None,
                 input_key: str | int | None = None, classes_key: str | None = None, readout_key: str | None = None,
                 log_stats: bool = True):
        if input_key is not None and not (isinstance(input_key, str) and input_key) and (
                not isinstance(input_key, int) or isinstance(input_key, bool)):
            raise MaskingError(f"input_key must be a dict key (str) or a tuple index (int), or None (got "
                               f"{input_key!r:.60})")
        self.masking = TrainingMasks(build_masker(masker, tokenizer), classes_key=classes_key,
                                     readout_key=readout_key, log_stats=log_stats)
        self.input_key = input_key
        self.output = None

    @property
    def masker(self) -> ConnectiveMasker:
        return self.masking.masker

    def setup(self, trainer, pl_module, stage: str) -> None:
        self.masker.rank = trainer.global_rank  # one key per process; setup runs in each DDP process

    def on_train_batch_start(self, trainer, pl_module, batch: Any, batch_idx: int) -> None:
        key = self._key(batch)
        wants_heads = self.masking.classes_key is not None or self.masking.readout_key is not None
        if wants_heads and not isinstance(batch, MutableMapping):
            raise MaskingError(f"ConnectiveMasking: classes_key / readout_key add entries to a dict batch; this "
                               f"batch is a {type(batch).__name__} (read callback.output.classes in training_step)")
        out = self.masking(batch[key], trainer.global_step)
        extra = self.masking.head_inputs(out)
        if isinstance(batch, (MutableMapping, list)):
            batch[key] = out.input_ids
        else:
            batch[key].copy_(out.input_ids)
        if isinstance(batch, MutableMapping):
            batch.update(extra)
        self.output = out

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        stats, _ = self.masking.take_stats()  # the micro-batches of the step about to be taken
        for name, count in stats.items():
            pl_module.log(name, count.float(), on_step=True, on_epoch=False, reduce_fx="sum",
                          sync_dist=trainer.world_size > 1, batch_size=1)

    def _key(self, batch: Any) -> str | int:
        """The batch's key or index of the input ids; the reason in one line if they are not there."""
        where = f"ConnectiveMasking: the training batch (a {type(batch).__name__})"
        if isinstance(batch, Mapping):
            key = "input_ids" if self.input_key is None else self.input_key
            if key not in batch:
                raise MaskingError(f"{where} has no {key!r} (its keys: {', '.join(map(str, batch))}); "
                                   f"name the input ids' key with input_key=")
            return key
        if isinstance(batch, (tuple, list)):
            index = 0 if self.input_key is None else self.input_key
            if not isinstance(index, int) or not -len(batch) <= index < len(batch):
                raise MaskingError(f"{where} of {len(batch)} elements has no element {index!r}; input_key must be "
                                   f"an index into it")
            if isinstance(batch, tuple):
                ids = batch[index]
                shared = [i for i, t in enumerate(batch) if i != index % len(batch) and isinstance(t, torch.Tensor)
                          and isinstance(ids, torch.Tensor) and _shares_memory(t, ids)]
                if shared:
                    raise MaskingError(f"{where} holds the input ids at {index} in memory shared with element "
                                       f"{shared[0]}: overwriting them in place (a tuple takes no new entry) would "
                                       f"mask that one too; give the batch as a list or a dict, or clone the ids")
            return index
        raise MaskingError(f"{where} is neither a dict nor a tuple or list; give input ids as batch['input_ids'], "
                           f"batch[0] or input_key=")


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.device == b.device and a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr()
