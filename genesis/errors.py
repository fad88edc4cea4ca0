"""Errors in words: what a failed operation tells the user."""

from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path

from genesis.console import first_line

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
