"""A Hugging Face `Trainer` that masks connectives in its training batches: ConnectiveMaskingTrainer.

    trainer = ConnectiveMaskingTrainer(model=model, args=args, train_dataset=train, masker=masker)

Needs transformers and accelerate (`pip install "genesis-masking[transformers]"`)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from genesis.integrations import TrainingMasks, build_masker, missing_framework
from genesis.masking import ConnectiveMasker, MaskingError

try:
    import accelerate  # noqa: F401  (the Trainer needs it, but only says so when one is built)
    from transformers import Trainer
except ImportError as e:
    raise missing_framework("transformers", "transformers and accelerate", "transformers", e) from None


class ConnectiveMaskingTrainer(Trainer):
    """A `Trainer` whose training batches are masked on the device before the model sees them; evaluation and
    prediction batches are not.

    Each training micro-batch is masked with step = state.global_step (the optimizer step), a row_offset that
    continues the rows of the earlier micro-batches of the same step (gradient accumulation), and rank =
    args.process_index (each process of a torchrun / accelerate launch its own masks). Only `input_ids` changes;
    `labels` are left as the collator made them.

    masker: a ConnectiveMasker, or a mapping of ConnectiveMasker.from_tokenizer's keyword arguments, built with
        `masker_tokenizer` (default: the Trainer's processing_class).
    classes_key / readout_key: the name of a model input that receives `out.classes` (each masked token's
        connective class, -100 elsewhere) / `out.readout`, for a head; None (default): not passed.
    log_stats: add the masked tokens and words per optimizer step (summed over processes, averaged over the steps
        since the last log) to the Trainer's training logs, at its logging steps.

    A subclass that overrides compute_loss calls super().compute_loss to keep the masking."""

    def __init__(self, *args: Any, masker: ConnectiveMasker | Mapping[str, Any], masker_tokenizer: Any = None,
                 classes_key: str | None = None, readout_key: str | None = None, log_stats: bool = True,
                 **kwargs: Any):
        super().__init__(*args, **kwargs)
        tokenizer = masker_tokenizer
        if isinstance(masker, Mapping):
            for name in ("processing_class", "tokenizer"):  # transformers < 4.46 calls it tokenizer
                tokenizer = tokenizer if tokenizer is not None else getattr(self, name, None)
        masker = build_masker(masker, tokenizer)
        masker.rank = self.args.process_index  # one key per process
        self.masking = TrainingMasks(masker, classes_key=classes_key, readout_key=readout_key, log_stats=log_stats)
        self._in_training_step = False

    @property
    def masker(self) -> ConnectiveMasker:
        return self.masking.masker

    def training_step(self, model, inputs, *args, **kwargs):
        # compute_loss gets the batch after training_step has put it on the device; it masks only inside this call,
        # since prediction_step calls compute_loss too
        self._in_training_step = True
        try:
            return super().training_step(model, inputs, *args, **kwargs)
        finally:
            self._in_training_step = False

    def compute_loss(self, model, inputs, *args, **kwargs):
        if self._in_training_step:
            if "input_ids" not in inputs:
                raise MaskingError(f"ConnectiveMaskingTrainer: the training batch has no input_ids (its keys: "
                                   f"{', '.join(map(str, inputs))})")
            out = self.masking(inputs["input_ids"], self.state.global_step)
            inputs = {**inputs, "input_ids": out.input_ids, **self.masking.head_inputs(out)}
        return super().compute_loss(model, inputs, *args, **kwargs)

    def log(self, logs: dict[str, float], *args, **kwargs) -> None:
        if "loss" in logs:  # a training log (evaluation logs eval_loss, the end of training train_loss)
            stats, steps = self.masking.take_stats()
            for name, count in stats.items():
                if self.args.world_size > 1:  # every process logs at the same step, as for the loss just gathered
                    count = self.accelerator.reduce(count, reduction="sum")
                logs[name] = count.item() / max(1, steps)
        super().log(logs, *args, **kwargs)
