"""Access log: one JSON line per proxied connection (or request), written when
it closes. Off the request's path: a record is queued as it is (the caller
hands over a dict it no longer changes) and serialized and written with the
others of the same event-loop pass, once that pass's callbacks have run."""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import json
import os
import sys
import time
from typing import Any

# Held records past this many are written at once (keeps a batch small and whole).
FLUSH_RECORDS = 32


class AccessLog:
    """path "" = stderr, "off" = nothing, else a file opened for append (O_APPEND
    keeps lines from several worker processes whole)."""

    def __init__(self, path: str = "") -> None:
        self.path = path
        self._fd: int | None = None
        self.records: list[dict[str, Any]] | None = None
        self._pending: list[dict[str, Any]] = []  # records not yet serialized and written (see write)
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
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is None:
            self._write_out([record])
            return
        # Records finished in the same event-loop pass are serialized and go out in one
        # write, at the end of that pass (no timer: a line is on disk before the loop
        # next waits for I/O).
        self._pending.append(record)
        if len(self._pending) >= FLUSH_RECORDS:
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
            records, self._pending = self._pending, []
            self._write_out(records)

    def _write_out(self, records: list[dict[str, Any]]) -> None:
        if self._fd is None:
            return
        data = "".join(json.dumps(r, separators=(",", ":"), default=str) + "\n" for r in records).encode()
        # O_APPEND and small batches: lines of several workers stay whole. Logging must
        # never take a connection down: a failed write is dropped.
        with contextlib.suppress(OSError):
            os.write(self._fd, data)

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
