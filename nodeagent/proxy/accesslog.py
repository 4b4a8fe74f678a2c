"""Access log: one JSON line per proxied connection, written when it closes."""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any


class AccessLog:
    """path "" = stderr, "off" = nothing, else a file opened for append (O_APPEND
    keeps lines from several worker processes whole)."""

    def __init__(self, path: str = "") -> None:
        self.path = path
        self._fd: int | None = None
        self.records: list[dict[str, Any]] | None = None
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
            os.write(self._fd, line)
        except OSError:
            pass  # logging must never take a connection down

    def close(self) -> None:
        if self._fd is not None and self.path not in ("", "off"):
            os.close(self._fd)
        self._fd = None


def iso_now() -> str:
    t = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"
