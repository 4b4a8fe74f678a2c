"""The control plane's unix socket: plaintext and local-admin (whoever can
connect has the rw role and speaks for any node), so it is created private.

The socket file is created by bind(); its mode is 0777 & ~umask. With the
process's umask (often 002 or 022) it would be group- or world-connectable
between bind and a later chmod, so binding happens under umask 077
(`private_umask`) and chmod 0600 follows as a second guard.
"""

from __future__ import annotations

import contextlib
import os
import stat
import threading
from collections.abc import Iterator

_UMASK_LOCK = threading.Lock()


@contextlib.contextmanager
def private_umask() -> Iterator[None]:
    """umask 077 while the block runs (process-wide: keep the block to the bind)."""
    with _UMASK_LOCK:
        old = os.umask(0o077)
        try:
            yield
        finally:
            os.umask(old)


def prepare_unix_socket(path: str) -> None:
    """The socket's directory must not be writable by group or others (someone
    could replace the socket)."""
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.stat(directory)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise OSError(f"the unix socket's directory {directory} is writable by group or others "
                      f"(mode {stat.S_IMODE(st.st_mode):o}); the socket grants full admin rights: use a "
                      "directory with mode 0700 or 0755 owned by the control plane's user")


def secure_unix_socket(path: str) -> None:
    """Only the owner (root, usually) may connect: connecting needs write permission."""
    try:
        os.chmod(path, 0o600)
    except OSError as e:
        raise OSError(f"cannot make the unix socket {path} mode 0600: {e}") from None
