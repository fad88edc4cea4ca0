"""The run under evaluation: its model, config and tokenizer loaded from a checkpoint, and its identity."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer

from genesis.config import SECTIONS, Config, ConfigError, ConfigValueError, MaskingConfig, build
from genesis.device import DeviceError
from genesis.device import resolve_device as resolve_any_device
from genesis.errors import GenesisError
from genesis.masking import connectives_of
from genesis.runs import CHECKPOINT, RunError, check_sections, load_model
from genesis.tokenizer import load_tokenizer_file


class EvalError(GenesisError):
    """A problem with the run directory or the evaluation settings, phrased as one line."""



def config_from_dict(table: dict, source: str) -> Config:
    """The Config stored in a checkpoint (genesis.config.to_dict form), validated like a TOML file."""
    check_sections(table, source, ConfigError)
    try:
        parts = {name: build(tp, table.get(name, {}), name) for name, tp in SECTIONS.items()}
    except ConfigValueError as e:
        raise ConfigError(f"{source}: {e.key}: {e.reason}") from None
    return Config(**parts, name=Path(source).parent.name, source=source)


def run_connectives(masking: MaskingConfig) -> dict[str, tuple[float, str]]:
    """The run's lexicon, built as `ConnectiveMasker.from_tokenizer` builds it."""
    return connectives_of(masking)


@dataclass
class Run:
    model: torch.nn.Module
    cfg: Config
    tokenizer: Tokenizer
    step: int
    checkpoint: Path
    identity: dict[str, Any]  # run_identity: recorded in the result, so an eval.json names what it measured


def load_run(checkpoint: str | os.PathLike, device: torch.device | str = "cpu") -> Run:
    """The model, its config and the tokenizer.json saved beside the checkpoint (the run directory)."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / CHECKPOINT
    model, ckpt = load_model(path, device)
    if "config" not in ckpt:
        raise RunError(f"{path}: the checkpoint holds no config")
    cfg = config_from_dict(ckpt["config"], str(path))
    tok_path = path.parent / "tokenizer.json"
    if not tok_path.is_file():
        raise RunError(f"{tok_path}: not found; the run's tokenizer must sit beside its checkpoint")
    tokenizer = load_tokenizer_file(tok_path)
    ids, rows = tokenizer.get_vocab_size(with_added_tokens=True), model.args.vocab_size
    if ids != rows:  # the trainer sizes the embedding to the tokenizer: this tokenizer is another run's
        raise RunError(f"{tok_path}: {ids:,} token ids, but the model in {path.name} has {rows:,} (the tokenizer of "
                       f"another run?)")
    model.eval()
    return Run(model=model, cfg=cfg, tokenizer=tokenizer, step=int(ckpt.get("step", 0)), checkpoint=path,
               identity=run_identity(ckpt, tok_path))


def run_identity(ckpt: dict, tokenizer_path: str | os.PathLike) -> dict[str, Any]:
    """{"step", "sha256"}: the step, and a SHA-256 of what an evaluation reads from the run: the model's weights
    (name, dtype, shape, bytes), its model_args and config, and the tokenizer.json beside it. Not the checkpoint
    file's bytes: torch.save of the same state can come out byte-wise different (a resumed run with nothing left to
    train rewrites an identical checkpoint that way), and the optimizer state never affects the metrics."""
    digest = hashlib.sha256()
    header = {"model_args": ckpt.get("model_args"), "config": ckpt.get("config")}
    digest.update(json.dumps(header, sort_keys=True, default=str).encode())
    for name, tensor in sorted(ckpt["model"].items()):
        weights = tensor.detach().to("cpu").contiguous()
        digest.update(f"|{name}|{weights.dtype}|{tuple(weights.shape)}|".encode())
        digest.update(weights.reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(Path(tokenizer_path).read_bytes())
    return {"step": int(ckpt.get("step", 0)), "sha256": digest.hexdigest()}


def checkpoint_identity(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """`run_identity` of a checkpoint.pt (or its run directory), read on the CPU; raises what torch.load raises."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / CHECKPOINT
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return run_identity(ckpt, path.parent / "tokenizer.json")


def model_max_len(model: torch.nn.Module) -> int:
    return int(model.args.seq_len)


def resolve_device(name: str) -> torch.device:
    """`genesis.device.resolve_device`, its refusal one EvalError line naming --device."""
    try:
        return resolve_any_device(name)
    except DeviceError as e:
        raise EvalError(f"--device {name}: {e}") from None
