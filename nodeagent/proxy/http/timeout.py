"""Deadlines: one per call, bounding every try and every backoff. Read from an
incoming `grpc-timeout` or `x-nodemesh-deadline-ms`, tightened by the route's
timeout, and passed on reduced by the time already spent."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

MESH_DEADLINE_HEADER = "x-nodemesh-deadline-ms"
GRPC_TIMEOUT_HEADER = "grpc-timeout"
_GRPC_UNITS = {"H": 3600.0, "M": 60.0, "S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}
_GRPC_TIMEOUT = re.compile(r"^(\d{1,8})([HMSmun])$")


def parse_grpc_timeout(value: str) -> float | None:
    """'100m' -> 0.1 s; None when malformed (gRPC: at most 8 digits and a unit)."""
    m = _GRPC_TIMEOUT.match(value.strip())
    return int(m.group(1)) * _GRPC_UNITS[m.group(2)] if m else None


def format_grpc_timeout(seconds: float) -> str:
    ms = max(0, int(seconds * 1000))
    return f"{ms}m" if ms < 100_000_000 else f"{int(seconds)}S"


def parse_mesh_deadline(value: str) -> float | None:
    try:
        ms = float(value.strip())
    except ValueError:
        return None
    return ms / 1000.0 if ms >= 0 else None


@dataclass
class Deadline:
    """An absolute instant on an injectable monotonic clock; None = unbounded."""

    at: float | None
    clock: Callable[[], float] = time.monotonic

    @classmethod
    def start(cls, *budgets_s: float | None, clock: Callable[[], float] = time.monotonic) -> Deadline:
        """The tightest of the given budgets from now; None = no bound (0 = already expired)."""
        now = clock()
        bounds = [now + b for b in budgets_s if b is not None]
        return cls(min(bounds) if bounds else None, clock)

    def remaining(self) -> float | None:
        return None if self.at is None else self.at - self.clock()

    def expired(self) -> bool:
        r = self.remaining()
        return r is not None and r <= 0

    def bound(self, seconds: float | None) -> float | None:
        """min(seconds, remaining): the timeout for one step (a try, a backoff)."""
        r = self.remaining()
        if r is None:
            return seconds if seconds else None
        return min(r, seconds) if seconds else r


def incoming_budget(headers: Mapping[str, str] | Iterable[tuple[str, str]]) -> float | None:
    """The caller's remaining budget from grpc-timeout or the mesh header (the tighter);
    `headers` as a mapping or as the request's (name, value) pairs (the last of a repeated
    header counts), so the request path need not build a dict per request."""
    pairs = headers.items() if isinstance(headers, Mapping) else headers
    grpc_timeout = mesh_deadline = None
    for k, v in pairs:
        if k == GRPC_TIMEOUT_HEADER:
            grpc_timeout = v
        elif k == MESH_DEADLINE_HEADER:
            mesh_deadline = v
    vals = []
    if grpc_timeout is not None and (g := parse_grpc_timeout(grpc_timeout)) is not None:
        vals.append(g)
    if mesh_deadline is not None and (m := parse_mesh_deadline(mesh_deadline)) is not None:
        vals.append(m)
    return min(vals) if vals else None
