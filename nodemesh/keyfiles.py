"""Atomic writes of the key, certificate and token files both sides keep in
their state directories (the agent's node key, the control plane's CA key,
operator and admin tokens): a crash leaves the old file or the new one, never
half of one, and a private file is mode 0600 from its creation."""

from __future__ import annotations

import contextlib
import os


def write_private(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` readable by its owner only (0600 from the first
    byte, fsynced), replacing any old file atomically."""
    tmp = f"{os.fspath(path)}.tmp"
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_public(path: str | os.PathLike[str], data: bytes) -> None:
    """Write `data` to `path` (a certificate or bundle), replacing any old file atomically."""
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)
