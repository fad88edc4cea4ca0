"""The masker's errors: bad input phrased as one line that names it."""

from __future__ import annotations

from genesis.errors import GenesisError


class MaskingError(GenesisError, ValueError):
    """Bad input to the masker (an argument, a shape, dtype, id or device), phrased as one line that names it."""


class TritonUnavailableError(MaskingError, RuntimeError):
    """impl='triton' asked for where the kernel cannot run. A MaskingError, like every other bad setting; also a
    RuntimeError, so handlers that catch a failed kernel as one keep working."""

