"""Access log: one JSON line per proxied connection, written when it closes."""

from __future__ import annotations

import asyncio
import atexit
import json
import os
import sys
import time
from typing import Any

# Held lines past this size are written at once (keeps a batch small and whole).
FLUSH_BYTES = 16 * 1024


class AccessLog:
    """path "" = stderr, "off" = nothing, else a file opened for append (O_APPEND
    keeps lines from several worker processes whole)."""

    def __init__(self, path: str = "") -> None:
        self.path = path
        self._fd: int | None = None
        self.records: list[dict[str, Any]] | None = None
        self._pending: list[bytes] = []  # encoded lines not yet written (see write)
        self._pending_bytes = 0
        self._flush_soon = False
        self._atexit = False
        if path == "off":
            return
        if path:
            self._fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o640)
        else:
            self._fd = sys.stderr.fileno()

    def capture(self) -> list[dict[str, Any]]:
        """Also keep records in memory (tests, admin 'recent connections')."""
        self.records = []
        return self.records

    def write(self, record: dict[str, Any]) -> None:
        recs = self.records
        if recs is not None:
            recs.append(record)
            del recs[:-1000]
        if self._fd is None:
            return
        line = (json.dumps(record, separators=(",", ":"), default=str) + "\n").encode()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            self._write_out([line])
            return
        # Lines finished in the same event-loop pass go out in one write, at the end of
        # that pass (no timer: a line is on disk before the loop next waits for I/O).
        self._pending.append(line)
        self._pending_bytes += len(line)
        if self._pending_bytes >= FLUSH_BYTES:
            self.flush()
        elif not self._flush_soon:
            self._flush_soon = True
            if not self._atexit:
                self._atexit = True
                atexit.register(self.flush)
            loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write the lines held since the last flush (write() schedules this)."""
        self._flush_soon = False
        if self._pending:
            lines, self._pending, self._pending_bytes = self._pending, [], 0
            self._write_out(lines)

    def _write_out(self, lines: list[bytes]) -> None:
        if self._fd is None:
            return
        try:
            # O_APPEND and under PIPE_BUF-ish batches: lines of several workers stay whole.
            os.write(self._fd, lines[0] if len(lines) == 1 else b"".join(lines))
        except OSError:
            pass  # logging must never take a connection down

    def close(self) -> None:
        self.flush()
        if self._fd is not None and self.path not in ("", "off"):
            os.close(self._fd)
        self._fd = None


_SECOND: list[Any] = [-1, ""]  # the last whole second formatted, and its text


def iso_time(t: float) -> str:
    """UTC ISO 8601 with milliseconds; the seconds part is formatted once per second."""
    sec = int(t)
    if sec != _SECOND[0]:
        _SECOND[0], _SECOND[1] = sec, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(sec))
    return f"{_SECOND[1]}.{int(t % 1 * 1000):03d}Z"


def iso_now() -> str:
    return iso_time(time.time())
