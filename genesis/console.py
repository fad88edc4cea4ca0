"""What a run prints: log lines, warnings and the one progress bar."""

from __future__ import annotations

import sys
import time

quiet = False  # set on processes other than rank 0 of a torchrun launch: one process speaks for the run


def log(msg: str) -> None:
    if not quiet:
        print(msg, flush=True)


def warn(msg: str) -> None:
    if not quiet:
        print(f"warning: {msg}", file=sys.stderr, flush=True)


def note(msg: str) -> None:
    """A status line on stderr, so that stdout carries only results (the evaluator's tables)."""
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def first_line(e: BaseException) -> str:
    """An exception in one line: its type and the first line of its text."""
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


class Progress:
    """Progress on stderr: a bar redrawn in place on a terminal; elsewhere one line every `every` updates (and the
    last), or nothing when `every` is 0. `keep` leaves the finished bar on its line; otherwise `clear()` erases it."""

    def __init__(self, total: int, label: str = "", every: int = 0, enabled: bool = True, keep: bool = True,
                 out=None):
        self.label, self.total, self.every, self.keep = label, max(total, 1), every, keep
        self.out = out or sys.stderr
        self.enabled, self.tty = enabled, self.out.isatty()
        self.t0, self.width = time.time(), 0

    def update(self, done: int, start: int = 0) -> None:
        """`done` of `total` finished; `start` of them were done before this bar began (a resumed run)."""
        if not self.enabled:
            return
        elapsed = time.time() - self.t0
        eta = elapsed / max(done - start, 1) * (self.total - done)
        prefix = f"{self.label} " if self.label else ""
        if self.tty:
            bar = "#" * int(30 * done / self.total)
            line = f"{prefix}[{bar:<30}] {done}/{self.total} {elapsed:5.0f}s eta {eta:4.0f}s "
            self.width = len(line)
            self.out.write("\r" + line + ("\n" if self.keep and done >= self.total else ""))
        elif self.every and (done % self.every == 0 or done >= self.total):
            self.out.write(f"{self.label}: {done}/{self.total} batches ({100 * done / self.total:.0f}%), "
                           f"{elapsed:.0f} s, eta {eta:.0f} s\n")
        else:
            return
        self.out.flush()

    def clear(self) -> None:
        if self.enabled and self.tty and self.width:
            self.out.write("\r" + " " * self.width + "\r")
            self.out.flush()
            self.width = 0
