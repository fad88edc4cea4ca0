"""Errors in words: the project's error base, the one place a command line turns an error into its line, and what
a failed write tells the user."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from genesis.console import first_line


class GenesisError(Exception):
    """A problem the user can act on, phrased as one line: every command line prints it as `error: <line>`."""


class InputError(GenesisError, ValueError):
    """A bad argument to one of Genesis's functions (a sequence longer than the model's, an unknown option, a
    connective table that does not parse), phrased as one line; also a ValueError, as Python's own checks raise."""


class RunError(GenesisError):
    """A problem with the run directory, the checkpoint or the launch, phrased as one line."""


class ConfigError(GenesisError):
    """A configuration problem, already phrased as one line: `<file>: <key>: <reason>`."""


class ConfigValueError(GenesisError, ValueError):
    """Raised by `__post_init__` validators: the key (relative to its section) and the reason; `also`: the other
    keys a cross-field check involves, so that the error can name whoever set any of them."""

    def __init__(self, key: str, reason: str, also: tuple[str, ...] = ()):
        super().__init__(f"{key}: {reason}")
        self.key, self.reason, self.also = key, reason, tuple(also)


ERROR_EXIT = 2  # a command line's status for a GenesisError or an OSError


def check_at_least(args, minima: dict[str, int], error: type[GenesisError]) -> None:
    """Every option of parsed `args` named in `minima` (by its dest) at least its minimum; else `error`, naming the
    first that is not and its value."""
    for dest, least in minima.items():
        value = getattr(args, dest)
        if value < least:
            raise error(f"--{dest.replace('_', '-')}: must be >= {least} (got {value})")


def error_line(e: BaseException) -> str:
    """The line a command line prints for a GenesisError or an OSError (its file, then why)."""
    if isinstance(e, OSError) and not isinstance(e, GenesisError):
        return f"error: {e.filename or ''}: {e.strerror or e}"
    return f"error: {e}"


BROKEN_PIPE_EXIT = 141  # 128 + SIGPIPE, as a shell reports a reader that left


def run_cli(body: Callable[[], int], say: Callable[[str], None] | None = None, broken_pipe: str | None = None) -> int:
    """`body()`'s status; a GenesisError or an OSError it raises is said in one line (on stderr, or through `say`),
    with status ERROR_EXIT. A broken pipe (`... | head`: the reader left) is BROKEN_PIPE_EXIT, quietly or with the
    line `broken_pipe`. Interrupts and other exceptions go on to the caller."""
    speak = say or (lambda line: print(line, file=sys.stderr))
    try:
        return body()
    except BrokenPipeError:
        if broken_pipe:
            speak(broken_pipe)
        return reader_gone()
    except (GenesisError, OSError) as e:
        speak(error_line(e))
        return ERROR_EXIT


def reader_gone() -> int:
    """After a BrokenPipeError (`... | head` has read enough): stdout goes to /dev/null, so the interpreter's own
    flush at exit raises nothing more; the status is BROKEN_PIPE_EXIT."""
    with contextlib.suppress(OSError):
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return BROKEN_PIPE_EXIT


FULL_BELOW = 64 * 1024  # bytes free under which a failed write is put down to a full disk


def disk_full(where: Path) -> bool:
    """Whether the file system holding `where` (a file or directory, existing or not) has no room left."""
    with contextlib.suppress(OSError):
        return shutil.disk_usage(where if where.is_dir() else where.parent).free < FULL_BELOW
    return False


def as_disk_full(e: BaseException, where: Path) -> BaseException:
    """`e`, or an ENOSPC OSError in its place when it is a write error that does not say so (torch.save on a full
    disk raises "RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos ...", numpy's short write
    an OSError without an errno) and the disk under `where` is full. Call it before the partial file is removed,
    while the disk is still full."""
    says_why = isinstance(e, OSError) and e.errno is not None
    if isinstance(e, Exception) and not says_why and disk_full(where):
        full = OSError(errno.ENOSPC, "No space left on device", str(where))
        full.__cause__ = e
        return full
    return e


def write_failure(e: BaseException, where: Path) -> str:
    """Why a write under `where` failed, in words: "no space left on device" for ENOSPC (`as_disk_full` turns
    torch.save's own words for it into ENOSPC), else the error's first line."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return "no space left on device"
    return (e.strerror or first_line(e)) if isinstance(e, OSError) else first_line(e)
