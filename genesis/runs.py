"""The run directory: its checkpoint (save, read, load), atomic writes, metrics.jsonl, and what --resume may change.

A run directory holds config.toml (resolved), tokenizer.json, metrics.jsonl (one JSON record per log step and per
evaluation) and CHECKPOINT (model, optimizer, step, config, number of processes)."""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from genesis.config import SECTIONS, Config, to_dict
from genesis.console import first_line
from genesis.model import Llama, ModelArgs

if TYPE_CHECKING:
    from genesis.distributed import World

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


class RunError(Exception):
    """A problem with the run directory or the checkpoint, phrased as one line."""


def save_checkpoint(path: Path, model, optimizer, step: int, cfg: Config, world: World | None = None,
                    extra: dict | None = None) -> None:
    """Atomic: written to a temporary file, then renamed over the old checkpoint. Rank 0 writes it (every process
    holds the same weights); the others return at once. `extra`: more entries of the checkpoint dict."""
    processes = world.size if world is not None else 1
    if world is not None and not world.main:
        return
    raw = getattr(model, "_orig_mod", model)
    state = {
        "model": raw.state_dict(),
        "optimizer": optimizer.state_dict(),
        "step": step,
        "model_args": vars(raw.args),
        "config": to_dict(cfg),
        "processes": processes,
        **(extra or {}),
    }
    write_atomic(path, lambda tmp: torch.save(state, tmp), error=False)


# Settings a resumed run may change: how long it runs, how often it logs, evaluates and saves, and where and how
# fast it runs. Anything else (data, tokenizer, model, optimizer, masking, seeds) would make the resumed run train
# something other than what the checkpoint trained.
RESUME_MAY_CHANGE = frozenset({
    "training.steps", "training.eval_every", "training.eval_batches", "training.log_every",
    "training.checkpoint_every", "training.compile", "training.grad_checkpointing", "training.device",
    "training.dtype", "training.expected_device", "training.out_dir", "data.cache_dir", "masking.impl",
})


def _flatten(d: dict, prefix: str = "") -> dict:
    """section.key -> value of a config dict's sections."""
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and key != "connectives":  # a connectives table compares whole
            out.update(_flatten(value, f"{prefix}{key}."))
        elif prefix:
            out[prefix + key] = value
    return out


def check_sections(config, source: str | os.PathLike, error: type[Exception] = RunError) -> None:
    """`error` naming `source` unless a recorded config is a table of section tables (a damaged file)."""
    if not isinstance(config, dict) or any(not isinstance(config.get(name, {}), dict) for name in SECTIONS):
        raise error(f"{source}: its recorded config is not a table of [data], [model], ... tables (damaged?)")


def flat_settings(config: dict, source: str | os.PathLike = "the config") -> dict:
    """section.key -> value of a config dict (genesis.config.to_dict form), every key Genesis has now included: a key
    the dict lacks was added to Genesis after it was written, and the run that wrote it had its default (a key it
    has that Genesis no longer has stays, and counts as a difference). A RunError naming `source` if the dict is
    not a table of section tables (a damaged file)."""
    check_sections(config, source)
    sections = tuple(SECTIONS)
    defaults = _flatten({k: v for k, v in to_dict(Config()).items() if k in sections})
    return {**defaults, **_flatten({k: config[k] for k in sections if k in config})}


def resume_changes(saved: dict, now: dict, path: Path, saved_processes: int = 1, processes: int = 1) -> list[str]:
    """Lines naming the settings a resumed run changes (those in RESUME_MAY_CHANGE); a RunError naming every other
    setting that differs from the checkpoint's config.

    The number of processes may change with training.grad_accum when their product, the micro-batches of a step,
    stays the same: micro-batch j of a step is the same data and the same masks whichever process takes it."""
    was, new = flat_settings(saved, path), flat_settings(now)
    was["processes"], new["processes"] = saved_processes, processes
    changed = sorted(k for k in was.keys() | new.keys() if was.get(k) != new.get(k))
    accum = "training.grad_accum"
    same_step = was.get(accum, 1) * saved_processes == new.get(accum, 1) * processes
    refused = [k for k in changed if k not in RESUME_MAY_CHANGE and not (k in ("processes", accum) and same_step)]

    def show(key: str) -> str:
        return f"{key} {was.get(key, '(unset)')!r} -> {new.get(key, '(unset)')!r}"

    if refused:
        hint = ""
        if any(k in ("processes", accum) for k in refused):
            hint = (f"; the processes x training.grad_accum, the micro-batches of a step, must stay "
                    f"{was.get(accum, 1) * saved_processes}")
        raise RunError(f"{path}: --resume with other settings than the run's: {', '.join(map(show, refused))} "
                       f"(a resumed run continues the same training; use --out DIR for a new run){hint}")
    lines = [f"resume: {show(k)}" for k in changed if k != "training.out_dir"]  # out_dir: the run's own config.toml
    if "training.steps" in changed:
        lines.append(f"resume: the learning-rate schedule now ends at step {new['training.steps']}")
    return lines


def write_atomic(path: Path, content: str | Callable[[Path], object], error: bool = True) -> None:
    """Written to a temporary file, then renamed over `path`: never a half-written file. `content` is text, or a
    function that writes the temporary path it is given (torch.save). With `error`, an OSError becomes one RunError
    line (and the temporary file is removed); without, it is raised as it is."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        if callable(content):
            content(tmp)
        else:
            tmp.write_text(content, encoding="utf-8")
        os.replace(tmp, path)
    except OSError as e:
        if not error:
            raise
        tmp.unlink(missing_ok=True)
        raise RunError(f"{path}: cannot write ({e.strerror or e})") from None


def trim_metrics(path: Path, step: int) -> set[int]:
    """On resume: drop the records past the checkpoint's `step` from metrics.jsonl (a run killed without a chance
    to save, e.g. SIGKILL or out of memory, logged steps it will train again) and lines cut short by a kill.
    Returns the steps that keep a held-out evaluation (a resumed run does not repeat them)."""
    kept, evaluated = [], set()
    with contextlib.suppress(FileNotFoundError):
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(rec, dict) or not isinstance(rec.get("step"), int) or rec["step"] > step:
                continue
            kept.append(line)
            if rec.get("kind") == "eval" and "heldout_loss" in rec:
                evaluated.add(rec["step"])
    write_atomic(path, "".join(line + "\n" for line in kept))
    return evaluated


def open_metrics(run_dir: Path, start: int, resumed: bool):
    """metrics.jsonl opened for the records to come, and the steps that already have a held-out evaluation: a
    resumed run keeps the records up to its checkpoint's `start` (`trim_metrics`) and appends; a new one starts it."""
    path = run_dir / METRICS
    evaluated = trim_metrics(path, start) if resumed else set()
    try:
        return path.open("a" if resumed else "w", encoding="utf-8"), evaluated
    except OSError as e:
        raise RunError(f"{path}: cannot write ({e.strerror or e})") from None


def read_checkpoint(path: str | os.PathLike, device="cpu", need=("model", "model_args", "step")) -> dict:
    """The checkpoint dict, with the keys in `need`; a missing, truncated or foreign file is one RunError line."""
    if not Path(path).is_file():
        raise RunError(f"{path}: checkpoint not found")
    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; anything else is no checkpoint of ours
        raise RunError(f"{path}: not a checkpoint (not the zip archive torch.save writes: another kind of file, "
                       f"or one cut short)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError:  # objects beyond tensors and plain data: not written by Genesis
        raise RunError(f"{path}: not a Genesis checkpoint (it holds objects other than tensors and plain data)") \
            from None
    except Exception as e:  # torch raises RuntimeError, EOFError, ... for a damaged archive
        raise RunError(f"{path}: not a readable checkpoint ({first_line(e)})") from None
    if not isinstance(ckpt, dict):
        raise RunError(f"{path}: not a Genesis checkpoint (a {type(ckpt).__name__}, not a dict)")
    missing = [key for key in need if key not in ckpt]
    if missing:
        raise RunError(f"{path}: not a Genesis checkpoint (missing {', '.join(missing)})")
    step = ckpt.get("step", 0)
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise RunError(f"{path}: not a Genesis checkpoint (step is {step!r})")
    return ckpt


def load_model(path: str | os.PathLike, device="cpu") -> tuple[Llama, dict]:
    """A model from a checkpoint, and the checkpoint dict (config, step)."""
    ckpt = read_checkpoint(path, device)
    try:
        model = Llama(ModelArgs(**ckpt["model_args"])).to(device)
        model.load_state_dict(ckpt["model"])
    except Exception as e:  # TypeError (bad model_args), RuntimeError (weights of another shape), ...
        raise RunError(f"{path}: the weights do not fit the checkpoint's model_args ({first_line(e)})") from None
    return model, ckpt




def setup_run_dir(cfg: Config, out: str | None, resume: bool) -> Path:
    """The run directory, checked; `train()` creates it once the data and the config are known to fit."""
    run_dir = Path(out or cfg.training.out_dir or Path("runs") / cfg.name)
    where = "--out" if out else "training.out_dir" if cfg.training.out_dir else "run directory"
    if run_dir.exists() and not run_dir.is_dir():
        raise RunError(f"{run_dir}: {where} names an existing file, not a directory")
    ckpt = run_dir / CHECKPOINT
    if resume and not ckpt.is_file():
        raise RunError(f"{run_dir}: --resume given but there is no {CHECKPOINT} to resume from")
    if not resume and ckpt.is_file():
        raise RunError(f"{run_dir} already holds a run ({CHECKPOINT}); pass --resume to continue it, "
                       f"or --out DIR for a new run")
    return run_dir


def make_run_dir(run_dir: Path) -> None:
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # a file in the way, permission denied, a read-only file system
        raise RunError(f"{run_dir}: cannot create the run directory ({e.strerror or e})") from None


