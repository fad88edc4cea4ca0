"""genesis.integrations in the real frameworks: a transformers Trainer and a Lightning loop train a tiny model while
the model records what it receives. Every training micro-batch must equal the plain masker's output for the same
(step, row_offset, rank), the original ids being the batch's targets, which are left unmasked; evaluation batches
arrive untouched; gradient accumulation continues the row offsets; the stats reach the framework's logger; and a
2-process run on the CPU (gloo, launched by torchrun / Lightning's DDP) masks each process with its own rank."""

import functools
import os
import signal
import subprocess
import sys

import pytest
import torch

from .helpers import ROOT

B, T, ACCUM, STEPS = 4, 32, 2, 3  # micro-batch rows, sequence length, micro-batches per optimizer step, steps
MASKING = {"strategy": "uniform", "mask_prob": 0.5, "log": None}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A small BPE of the KJV (tokenizer.json) and 8 micro-batches of its rows with 3+ connectives (rows.pt)."""
    from genesis.corpus import load_corpus
    from genesis.tokenizer import train_bpe

    verses = load_corpus("kjv")[:3000]
    tokenizer = train_bpe([v.text + "\n" for v in verses[:2000]], vocab_size=1000)
    ids = tokenizer.encode("".join(v.text + "\n" for v in verses)).ids
    rows = torch.tensor(ids[: len(ids) // T * T]).view(-1, T)
    rows = rows[reference(tokenizer, 0)(rows, step=0).matched.sum(1) >= 3][: 8 * B]
    assert len(rows) == 8 * B
    path = tmp_path_factory.mktemp("integrations")
    tokenizer.save(str(path / "tokenizer.json"))
    torch.save(rows, path / "rows.pt")
    return path


def load_rows(data_dir) -> tuple:
    """The tokenizer and the rows of `data_dir`."""
    from genesis.tokenizer import load_tokenizer_file

    return load_tokenizer_file(data_dir / "tokenizer.json"), torch.load(data_dir / "rows.pt")


def reference(tokenizer, rank: int):
    from genesis.masking import ConnectiveMasker

    return ConnectiveMasker.from_tokenizer(tokenizer, rank=rank, **MASKING)


def check_training_batches(seen, tokenizer, rank: int = 0) -> list[int]:
    """Each recorded training micro-batch (in order) is the plain masker's output for its (step, row_offset, rank);
    returns the masked tokens of each optimizer step."""
    masker, other_rank = reference(tokenizer, rank), reference(tokenizer, rank + 1)
    assert len(seen) == STEPS * ACCUM
    per_step, offset_mattered, rank_mattered = [0] * STEPS, False, False
    for i, record in enumerate(seen):
        step, offset = divmod(i, ACCUM)
        offset *= B
        out = masker(record["labels"], step=step, row_offset=offset)
        assert torch.equal(record["input_ids"], out.input_ids), f"micro-batch {i}: (step {step}, offset {offset})"
        if record.get("classes") is not None:
            assert torch.equal(record["classes"], out.classes)
        per_step[step] += int(out.mask.sum())
        offset_mattered |= offset > 0 and not torch.equal(masker(record["labels"], step=step).mask, out.mask)
        rank_mattered |= not torch.equal(other_rank(record["labels"], step=step, row_offset=offset).mask, out.mask)
    assert all(per_step) and offset_mattered and rank_mattered  # the comparison can fail
    return per_step


def run_launcher(command: list[str], cwd) -> None:
    """Run a multi-process launch (its processes in their own session, all ended if it overruns); it must pass."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRITON_INTERPRET": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    try:
        output, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
    assert proc.returncode == 0, output[-3000:]


# -- transformers -------------------------------------------------------------------------------------------------


@functools.cache
def recording_llama():
    """A LlamaForCausalLM that records what each forward call receives (and takes a connective_classes input)."""
    from transformers import LlamaForCausalLM

    class RecordingLlama(LlamaForCausalLM):
        def forward(self, input_ids=None, labels=None, connective_classes=None, **kwargs):
            self.seen.append({"training": self.training, "input_ids": input_ids.clone(), "labels": labels.clone(),
                              "classes": None if connective_classes is None else connective_classes.clone()})
            return super().forward(input_ids=input_ids, labels=labels, **kwargs)

    return RecordingLlama


def hf_trainer(data_dir, out_dir, use_cpu: bool = True, **masking_options):
    """A ConnectiveMaskingTrainer on a 1-layer Llama: 3 steps of 2 micro-batches of 4 rows, logging every step."""
    from transformers import LlamaConfig, TrainingArguments

    from genesis.integrations.transformers import ConnectiveMaskingTrainer

    tokenizer, rows = load_rows(data_dir)
    dataset = [{"input_ids": r, "labels": r.clone()} for r in rows]
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=tokenizer.get_vocab_size(), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=T)
    model = recording_llama()(config)
    model.seen = []
    args = TrainingArguments(output_dir=str(out_dir), per_device_train_batch_size=B, per_device_eval_batch_size=B,
                             gradient_accumulation_steps=ACCUM, max_steps=STEPS, report_to=[], use_cpu=use_cpu,
                             save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
    trainer = ConnectiveMaskingTrainer(model=model, args=args, train_dataset=dataset, eval_dataset=dataset[:B],
                                       masker=MASKING, masker_tokenizer=tokenizer, **masking_options)
    return trainer, tokenizer


def test_trainer_masks_training_batches_as_the_plain_masker_and_leaves_evaluation_alone(data_dir, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    trainer, tokenizer = hf_trainer(data_dir, tmp_path, classes_key="connective_classes")
    trainer.train()
    seen = trainer.model.seen
    assert all(r["training"] for r in seen)
    per_step = check_training_batches(seen, tokenizer)
    assert all(r["classes"] is not None for r in seen)
    logged = [entry["masked_tokens"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == per_step
    seen.clear()
    trainer.evaluate()
    trainer.predict(trainer.eval_dataset)
    assert len(seen) == 2 and not any(r["training"] for r in seen)
    assert all(torch.equal(r["input_ids"], r["labels"]) and r["classes"] is None for r in seen)


_HF_TWO_PROCESSES = """
import sys, torch
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.test_integrations import hf_trainer
trainer, _ = hf_trainer(Path({data!r}), {out!r})
trainer.train()
torch.save({{"rank": trainer.args.process_index, "world": trainer.args.world_size, "seen": trainer.model.seen,
            "log": trainer.state.log_history}}, {out!r} + f"/rank{{trainer.args.process_index}}.pt")
"""


def test_trainer_under_torchrun_masks_each_process_with_its_rank(data_dir, tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    script = tmp_path / "train.py"
    script.write_text(_HF_TWO_PROCESSES.format(root=str(ROOT), data=str(data_dir), out=str(tmp_path)))
    run_launcher([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script)],
                 tmp_path)
    tokenizer = load_rows(data_dir)[0]
    per_rank = []
    for rank in (0, 1):
        record = torch.load(tmp_path / f"rank{rank}.pt", weights_only=False)
        assert (record["rank"], record["world"]) == (rank, 2)
        per_rank.append(check_training_batches(record["seen"], tokenizer, rank=rank))
    logged = [entry["masked_tokens"] for entry in record["log"] if "loss" in entry]
    assert logged == [a + b for a, b in zip(*per_rank)]  # summed over the processes


# -- Lightning ----------------------------------------------------------------------------------------------------


@functools.cache
def lightning_classes():
    """A tiny LightningModule that records its batches, and a logger that records the logged metrics."""
    import lightning.pytorch as L
    from lightning.pytorch.loggers import Logger

    class TinyLM(L.LightningModule):
        def __init__(self, vocab_size: int, input_key=None):
            super().__init__()
            self.embedding, self.head = torch.nn.Embedding(vocab_size, 8), torch.nn.Linear(8, vocab_size)
            self.input_key, self.seen = input_key, []

        def _record(self, batch, training: bool):
            if isinstance(batch, dict):
                ids, targets = batch[self.input_key or "input_ids"], batch["labels"]
            else:
                ids, targets = batch[0], batch[1]
            classes = batch.get("connective_classes") if isinstance(batch, dict) else None
            self.seen.append({"training": training, "input_ids": ids.clone(), "labels": targets.clone(),
                              "classes": classes, "type": type(batch)})
            logits = self.head(self.embedding(ids))
            return torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())

        def training_step(self, batch, batch_idx):
            return self._record(batch, True)

        def validation_step(self, batch, batch_idx):
            self._record(batch, False)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    class RecordingLogger(Logger):
        def __init__(self):
            super().__init__()
            self.metrics = []

        name, version = "recording", 0

        def log_metrics(self, metrics, step=None):
            self.metrics.append(dict(metrics))

        def log_hyperparams(self, params, *args, **kwargs):
            pass

    return TinyLM, RecordingLogger


COLLATE = {
    "tuple": lambda rows: (torch.stack(rows), torch.stack(rows).clone()),
    "list": lambda rows: [torch.stack(rows), torch.stack(rows).clone()],
    "dict": lambda rows: {"input_ids": torch.stack(rows), "labels": torch.stack(rows).clone()},
    "key": lambda rows: {"tokens": torch.stack(rows), "labels": torch.stack(rows).clone()},
}


def lightning_run(data_dir, root_dir, shape: str = "tuple", devices: int = 1, accelerator: str = "cpu",
                  module_class=None, callback_class=None, **callback_options):
    """Fit TinyLM for 3 steps of 2 micro-batches with ConnectiveMasking, logging every step; then validate."""
    import lightning.pytorch as L
    from torch.utils.data import DataLoader

    from genesis.integrations.lightning import ConnectiveMasking

    TinyLM, RecordingLogger = lightning_classes()
    tokenizer, rows = load_rows(data_dir)
    input_key = "tokens" if shape == "key" else None
    loader = DataLoader(list(rows), batch_size=B, collate_fn=COLLATE[shape])
    torch.manual_seed(0)
    module, logger = (module_class or TinyLM)(tokenizer.get_vocab_size(), input_key), RecordingLogger()
    callback_class = callback_class or ConnectiveMasking
    callback = callback_class(MASKING, tokenizer=tokenizer, input_key=input_key, **callback_options)
    trainer = L.Trainer(accelerator=accelerator, devices=devices, strategy="ddp" if devices > 1 else "auto",
                        max_steps=STEPS, accumulate_grad_batches=ACCUM, callbacks=[callback], logger=logger,
                        log_every_n_steps=1, num_sanity_val_steps=0, limit_val_batches=1, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(root_dir))
    trainer.fit(module, train_dataloaders=loader)
    logged = [m["masked_tokens"] for m in logger.metrics if "masked_tokens" in m]
    trained = list(module.seen)
    module.seen.clear()
    trainer.validate(module, dataloaders=DataLoader(list(rows[:B]), batch_size=B, collate_fn=COLLATE[shape]),
                     verbose=False)
    return trainer, tokenizer, trained, module.seen, logged


@pytest.mark.parametrize("shape", ["tuple", "list", "dict", "key"])
def test_lightning_callback_masks_every_batch_shape_as_the_plain_masker(data_dir, tmp_path, shape):
    pytest.importorskip("lightning")
    _, tokenizer, trained, validated, logged = lightning_run(data_dir, tmp_path, shape)
    assert all(r["training"] for r in trained)
    assert {r["type"] for r in trained} == {{"tuple": tuple, "list": list}.get(shape, dict)}
    per_step = check_training_batches(trained, tokenizer)
    assert logged == per_step
    assert len(validated) == 1 and torch.equal(validated[0]["input_ids"], validated[0]["labels"])


def test_lightning_callback_passes_the_classes_to_a_dict_batch(data_dir, tmp_path):
    pytest.importorskip("lightning")
    _, tokenizer, trained, validated, _ = lightning_run(data_dir, tmp_path, "dict",
                                                        classes_key="connective_classes")
    assert all(r["classes"] is not None for r in trained)
    check_training_batches(trained, tokenizer)
    assert validated[0]["classes"] is None


_LIGHTNING_TWO_PROCESSES = """
import sys, torch
from pathlib import Path
sys.path.insert(0, {root!r})
from tests.test_integrations import lightning_run
trainer, _, trained, validated, logged = lightning_run(Path({data!r}), {out!r}, "dict", devices=2)
torch.save({{"rank": trainer.global_rank, "world": trainer.world_size, "seen": trained, "validated": validated,
            "log": logged}}, {out!r} + f"/rank{{trainer.global_rank}}.pt")
"""


def test_lightning_ddp_masks_each_process_with_its_rank(data_dir, tmp_path):
    """strategy="ddp" on 2 CPU processes (gloo), launched by Lightning itself (it runs the script again as rank 1)."""
    pytest.importorskip("lightning")
    script = tmp_path / "train.py"
    script.write_text(_LIGHTNING_TWO_PROCESSES.format(root=str(ROOT), data=str(data_dir), out=str(tmp_path)))
    run_launcher([sys.executable, str(script)], tmp_path)
    tokenizer = load_rows(data_dir)[0]
    records = [torch.load(tmp_path / f"rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    per_rank = []
    for rank, record in enumerate(records):
        assert (record["rank"], record["world"]) == (rank, 2)
        per_rank.append(check_training_batches(record["seen"], tokenizer, rank=rank))
        assert all(torch.equal(r["input_ids"], r["labels"]) for r in record["validated"])
    assert records[0]["log"] == [a + b for a, b in zip(*per_rank)]  # summed over the processes


def test_lightning_callback_masks_the_batch_after_its_transfer(data_dir, tmp_path):
    """The callback masks the tensors that transfer_batch_to_device returned (here: fresh copies, as a move to a
    GPU makes), and training_step receives those same tensors, masked."""
    pytest.importorskip("lightning")
    from genesis.integrations.lightning import ConnectiveMasking

    TinyLM, _ = lightning_classes()
    moved, masked = [], []

    class Moving(TinyLM):
        def transfer_batch_to_device(self, batch, device, dataloader_idx):
            batch = tuple(t.clone() for t in super().transfer_batch_to_device(batch, device, dataloader_idx))
            moved.append(batch[0])
            return batch

    class Watching(ConnectiveMasking):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            masked.append(batch[0])
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    _, tokenizer, trained, _, _ = lightning_run(data_dir, tmp_path, "tuple", module_class=Moving,
                                                callback_class=Watching)
    assert [t.data_ptr() for t in masked] == [t.data_ptr() for t in moved[: len(masked)]]
    assert len(masked) == STEPS * ACCUM
    check_training_batches(trained, tokenizer)
    assert all(torch.equal(r["input_ids"], t) for r, t in zip(trained, masked))


@pytest.mark.cuda
def test_both_integrations_mask_on_the_gpu(data_dir, tmp_path):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU (the CPU twins: the tests above)")
    pytest.importorskip("lightning")
    pytest.importorskip("transformers")
    _, tokenizer, trained, _, _ = lightning_run(data_dir, tmp_path / "lightning", "dict", accelerator="gpu")
    assert all(r["input_ids"].is_cuda for r in trained)
    check_training_batches([{k: v.cpu() for k, v in r.items() if k in ("input_ids", "labels")} for r in trained],
                           tokenizer)
    trainer, tokenizer = hf_trainer(data_dir, tmp_path / "transformers", use_cpu=False)
    trainer.train()
    assert all(r["input_ids"].is_cuda for r in trainer.model.seen)
    check_training_batches([{k: r[k].cpu() for k in ("input_ids", "labels")} for r in trainer.model.seen], tokenizer)


# -- errors -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("module, blocked, extra", [("lightning", "lightning", "lightning"),
                                                    ("transformers", "transformers", "transformers"),
                                                    ("transformers", "accelerate", "transformers")])
def test_a_missing_framework_names_the_extra_to_install(monkeypatch, module, blocked, extra):
    import importlib

    for name in [m for m in sys.modules if m == blocked or m.startswith(blocked + ".")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, blocked, None)  # import of `blocked` now raises ImportError
    monkeypatch.delitem(sys.modules, f"genesis.integrations.{module}", raising=False)
    with pytest.raises(ImportError) as error:
        importlib.import_module(f"genesis.integrations.{module}")
    assert f'pip install "genesis-masking[{extra}]"' in str(error.value)
    assert str(error.value).count("\n") == 0


def test_bad_batches_and_arguments_fail_with_one_line(data_dir):
    pytest.importorskip("lightning")
    from types import SimpleNamespace

    from genesis.integrations import TrainingMasks, build_masker
    from genesis.integrations.lightning import ConnectiveMasking
    from genesis.masking import MaskingError

    tokenizer, rows = load_rows(data_dir)
    x = rows[:B]
    trainer = SimpleNamespace(global_step=0, global_rank=0)
    callback = ConnectiveMasking(MASKING, tokenizer=tokenizer)
    cases = [
        (callback, (x, x), "memory shared with element 1"),  # y is x: masking x in place would mask y
        (callback, (x[:, :-1], x[:, 1:]), "memory shared with element 1"),  # targets sliced from the same tensor
        (callback, {"tokens": x.clone()}, "has no 'input_ids'"),
        (callback, x.clone(), "neither a dict nor a tuple or list"),
        (ConnectiveMasking(MASKING, tokenizer=tokenizer, input_key=2), [x.clone()], "has no element 2"),
        (ConnectiveMasking(MASKING, tokenizer=tokenizer, classes_key="c"), (x.clone(),), "add entries to a dict"),
    ]
    for cb, batch, message in cases:
        before = [t.clone() for t in batch] if isinstance(batch, tuple) else None
        with pytest.raises(MaskingError, match=message):
            cb.on_train_batch_start(trainer, None, batch, 0)
        if before is not None and "memory shared" in message:
            assert all(torch.equal(a, b) for a, b in zip(before, batch))  # refused before any change
    with pytest.raises(MaskingError, match="needs the tokenizer"):
        build_masker(MASKING)
    with pytest.raises(MaskingError, match="input_key must be"):
        ConnectiveMasking(MASKING, tokenizer=tokenizer, input_key=1.5)
    with pytest.raises(MaskingError, match="has no readout"):
        masks = TrainingMasks(build_masker(MASKING, tokenizer), readout_key="readout")
        masks.head_inputs(masks(x, 0))


def test_head_inputs_pass_the_classes_and_a_readout_where_the_output_has_one(data_dir):
    from genesis.integrations import TrainingMasks
    from genesis.masking import ConnectiveMasker

    tokenizer, rows = load_rows(data_dir)
    masker = ConnectiveMasker.from_tokenizer(tokenizer, **MASKING, readout=True)
    masks = TrainingMasks(masker, classes_key="c", readout_key="r")
    out = masks(rows[:B], 0)
    extra = masks.head_inputs(out)
    assert set(extra) == {"c", "r"} and extra["c"] is out.classes and extra["r"] is out.readout
    assert (out.readout >= 0).any()  # the masked words' readout targets
    assert TrainingMasks(masks.masker).head_inputs(out) == {}  # off by default
