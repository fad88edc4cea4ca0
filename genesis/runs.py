"""The run directory: its checkpoint (save, read, load), atomic writes, metrics.jsonl, and what --resume may change.

A run directory holds config.toml (resolved), tokenizer.json, metrics.jsonl (one JSON record per log step and per
evaluation) and CHECKPOINT (model, optimizer, step, config, number of processes)."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import re
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, TYPE_CHECKING

import torch

from genesis.config import SECTIONS, Config, to_dict
from genesis.console import first_line
from genesis.errors import RunError, as_disk_full, write_failure
from genesis.model import Llama, ModelArgs

if TYPE_CHECKING:
    from genesis.distributed import World

CHECKPOINT = "checkpoint.pt"
METRICS = "metrics.jsonl"


class SaveError(RunError):
    """A checkpoint that could not be written (a full disk, ...); the previous one is kept."""


def save_checkpoint(path: Path, model, optimizer, step: int, cfg: Config, world: World | None = None,
                    extra: dict | None = None, saved_step: int | None = None) -> None:
    """Atomic: written to a temporary file, fsynced, then renamed over the old checkpoint. Rank 0 writes it (every
    process holds the same weights); the others return at once. Any failure (torch.save raises RuntimeError for a
    full disk) is a SaveError line, the temporary file removed and the previous checkpoint left as it was. `extra`:
    more entries of the checkpoint dict; `saved_step`: the step of the checkpoint at `path` now, for the message."""
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
    try:
        write_atomic(path, lambda f: torch.save(state, f), error=False)
    except (OSError, RuntimeError) as e:  # not a signal's Interrupted: the loop saves again for it
        raise SaveError(f"{path}: cannot save the checkpoint of step {step} ({write_failure(e, path)}); "
                        f"{kept_checkpoint(path, saved_step)}") from None


def kept_checkpoint(path: Path, saved_step: int | None) -> str:
    """Which checkpoint a failed run leaves, in words."""
    if not path.is_file():
        return "no checkpoint was saved before"
    return f"the checkpoint of step {saved_step} is kept" if saved_step is not None else "the previous one is kept"


STEP_CHECKPOINT = re.compile(r"checkpoint-(\d+)\.pt")


def keep_step_checkpoint(path: Path, step: int, keep: int) -> None:
    """training.keep_checkpoints: checkpoint-<step>.pt beside the checkpoint just saved at `path`, as a hard link
    (the same file: no copy, no extra disk until checkpoint.pt is replaced by the next save's rename); a copy where
    the file system has no hard links. Only the `keep` newest step checkpoints stay."""
    if keep <= 0:
        return
    kept = path.with_name(f"checkpoint-{step}.pt")
    tmp = kept.with_name(kept.name + f".tmp{os.getpid()}")
    try:
        tmp.unlink(missing_ok=True)
        try:
            os.link(path, tmp)
        except OSError:  # FAT, some network file systems
            shutil.copyfile(path, tmp)
            with open(tmp, "r+b") as f:
                os.fsync(f.fileno())
        os.replace(tmp, kept)
        _fsync_dir(path.parent)
        for old in sorted(step_checkpoints(path.parent))[:-keep]:
            (path.parent / f"checkpoint-{old}.pt").unlink(missing_ok=True)
    except BaseException as e:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if not isinstance(e, OSError):
            raise
        raise SaveError(f"{kept}: cannot keep the checkpoint of step {step} ({first_line(e)}); {path} is "
                        f"saved") from None


def step_checkpoints(run_dir: Path) -> list[int]:
    """The steps of the checkpoint-<step>.pt files in `run_dir`."""
    found = (STEP_CHECKPOINT.fullmatch(p.name) for p in run_dir.glob("checkpoint-*.pt"))
    return [int(m.group(1)) for m in found if m]


# Settings a resumed run may change: how long it runs, how often it logs, evaluates and saves, and where and how
# fast it runs. Anything else (data, tokenizer, model, optimizer, masking, seeds) would make the resumed run train
# something other than what the checkpoint trained.
RESUME_MAY_CHANGE = frozenset({
    "training.steps", "training.eval_every", "training.eval_batches", "training.log_every",
    "training.checkpoint_every", "training.keep_checkpoints", "training.skip_nonfinite", "training.compile",
    "training.grad_checkpointing", "training.device",
    "training.dtype", "training.expected_device", "training.out_dir", "data.cache_dir", "masking.impl",
    "training.tensorboard", "training.threads",
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


# keys a run never reads while their switch is off: a run trained without a head is the same run whatever they say,
# so a default changed since (model.link_readout's) neither blocks a resume nor makes a comparison retrain it
UNREAD_WITHOUT = {"model.link_readout": "model.link_head", "training.link_loss_weight": "model.link_head",
                  "training.class_loss_weight": "model.class_head"}


def unread_keys(was: dict, now: dict) -> set[str]:
    """The keys of UNREAD_WITHOUT whose switch is off in both flat configs (flat_settings)."""
    return {key for key, switch in UNREAD_WITHOUT.items() if not was.get(switch) and not now.get(switch)}


def resume_changes(saved: dict, now: dict, path: Path, saved_processes: int = 1, processes: int = 1) -> list[str]:
    """Lines naming the settings a resumed run changes (those in RESUME_MAY_CHANGE); a RunError naming every other
    setting that differs from the checkpoint's config.

    The number of processes may change with training.grad_accum when their product, the micro-batches of a step,
    stays the same: micro-batch j of a step is the same data and the same masks whichever process takes it."""
    was, new = flat_settings(saved, path), flat_settings(now)
    was["processes"], new["processes"] = saved_processes, processes
    unread = unread_keys(was, new)
    changed = sorted(k for k in was.keys() | new.keys() if was.get(k) != new.get(k) and k not in unread)
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


def _fsync_dir(path: Path) -> None:
    """Flush directory `path`'s entries (a rename in it) to the disk; a no-op where a directory cannot be opened
    (Windows)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        with contextlib.suppress(OSError):
            os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, content: str | Callable[[IO[bytes]], object], error: bool = True) -> None:
    """Written to a temporary file, fsynced, renamed over `path`, and the directory fsynced: never a half-written
    file, and the new one survives a power loss once this returns. `content` is text, or a function that writes
    the binary file it is given (torch.save). The temporary file is removed on any error. With `error`, an OSError
    becomes one RunError line; without, it is raised as it is."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8"))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as caught:
        e = as_disk_full(caught, tmp)  # while the partial file still fills the disk
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        if e is not caught:
            raise e from caught
        if not error or not isinstance(e, OSError):
            raise
        raise RunError(f"{path}: cannot write ({write_failure(e, path)})") from None
    _fsync_dir(path.parent)


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


def strict_json(rec: dict) -> str:
    """A metrics record as one line of strict JSON: a NaN or infinite number becomes null, and the record's
    `nonfinite` field names the keys that held one (a plain json.dumps writes NaN, which strict parsers refuse)."""
    bad = []

    def clean(value, key):
        if isinstance(value, float) and not math.isfinite(value):
            bad.append(key)
            return None
        if isinstance(value, dict):
            return {k: clean(v, key) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v, key) for v in value]
        return value

    out = {key: clean(value, key) for key, value in rec.items()}
    if bad:
        out["nonfinite"] = sorted(set(bad))
    return json.dumps(out, allow_nan=False)


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
    bad = [name for name, p in model.state_dict().items() if p.is_floating_point() and not p.isfinite().all()]
    if bad:
        raise RunError(f"{path}: non-finite weights (NaN or inf) in {len(bad)} of {len(model.state_dict())} tensors "
                       f"({bad[0]}, ...): the run diverged before step {ckpt['step']}; use an earlier checkpoint")
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




LOCK = "train.lock"
TEMPORARY = re.compile(r"(checkpoint(-\d+)?\.pt|config\.toml|tokenizer\.json|metrics\.jsonl)\.tmp(\d+)")


class RunLock:
    """An exclusive lock on a run directory for the life of a training process: `LOCK` in it, locked with
    fcntl.flock (msvcrt on Windows; where neither works, no lock), holding the pid of the process that has it. The
    system releases it when the process ends, however it ends; the file stays (removing it would let two processes
    lock two different files)."""

    def __init__(self, run_dir: Path):
        path = run_dir / LOCK
        try:
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise RunError(f"{path}: cannot create the run's lock file ({e.strerror or e})") from None
        try:
            locked = _lock(self.fd)
        except BaseException:
            os.close(self.fd)
            raise
        if not locked:
            holder = "unknown"
            with contextlib.suppress(OSError):  # empty while the holder has not written it yet
                holder = os.read(self.fd, 64).decode("ascii", "replace").strip() or holder
            os.close(self.fd)
            raise RunError(f"{run_dir}: in use by another training process (pid {holder}); wait for it to end or "
                           f"stop it (evaluating the run meanwhile is fine)")
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
            os.write(self.fd, f"{os.getpid()}\n".encode())

    fd: int | None

    def abandon(self, run_dir: Path) -> None:
        """Remove a run directory that holds nothing but this lock (a start that failed before writing anything),
        while the lock is still held; release it."""
        with contextlib.suppress(OSError):
            if [p.name for p in run_dir.iterdir()] == [LOCK]:
                (run_dir / LOCK).unlink()
                run_dir.rmdir()
        self.release()

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the file releases the lock
            self.fd = None


def _lock(fd: int) -> bool:
    """Lock `fd` exclusively without waiting: False if another process holds it; True also where the system offers
    no lock at all (nothing is locked then)."""
    try:
        import fcntl
    except ImportError:
        try:
            import msvcrt
        except ImportError:
            return True
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)  # the file's first byte: the pid is read past it by no one
        except OSError:
            return False
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a file system without locks (some network mounts): run unlocked rather than not at all
        return True
    return True


def pid_alive(pid: int) -> bool:
    """Whether process `pid` may be running (True where this cannot be told: not POSIX, where os.kill with signal 0
    would end the process instead of asking)."""
    if os.name != "posix" or pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # PermissionError: alive, another user's
        return True
    return True


def remove_stale_temporaries(run_dir: Path, log: Callable[[str], None]) -> None:
    """The temporary files of writes cut short (a killed save leaves a full-size checkpoint.pt.tmp<pid>), removed
    when the process named by their pid is gone; called with the run's lock held, so no live trainer writes them."""
    for path in sorted(run_dir.glob("*.tmp*")):
        found = TEMPORARY.fullmatch(path.name)
        if not found or pid_alive(int(found.group(3))):
            continue
        with contextlib.suppress(OSError):
            size = path.stat().st_size
            path.unlink()
            log(f"removed {path} ({size / 2**20:.1f} MiB), left by a write of process {found.group(3)} that was cut "
                f"short")


def claim_run_dir(run_dir: Path, resume: bool, log: Callable[[str], None]) -> RunLock:
    """The run directory made (if new) and locked for this training process, checked again now that no other can
    start on it (a run finished meanwhile is not overwritten), and cleared of stale temporary files."""
    make_run_dir(run_dir)
    lock = RunLock(run_dir)
    try:
        if not resume and (run_dir / CHECKPOINT).is_file():
            raise RunError(f"{run_dir} already holds a run ({CHECKPOINT}); pass --resume to continue it, "
                           f"or --out DIR for a new run")
        remove_stale_temporaries(run_dir, log)
    except BaseException:
        lock.release()
        raise
    return lock
