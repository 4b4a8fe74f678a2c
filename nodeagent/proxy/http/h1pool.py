"""Keep-alive pool of upstream HTTP/1.1 connections, per (source identity,
endpoint). `IdleBook` is the pure bookkeeping (no I/O, an injectable clock):
which idle conn serves the next request (the most recently used: warm, and
it lets the others age out), and which conns to close (over the per-endpoint
cap, idle too long, too old, opened under an older security policy). The
I/O side (`UpstreamPool`) closes what the book hands back and sweeps on a
timer.

Why a maximum age: the receiving node decides AuthorizationPolicy per
CONNECT stream (per request only when HTTP rules apply, authz_l7.py), so a
stream opened before a policy change must not live on indefinitely; the
pool also drops every idle conn when this node's security policies change."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Hashable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

from .h1upstream import UpstreamConn


class _Conn(Protocol):
    born: float
    generation: int

    @property
    def reusable(self) -> bool: ...


C = TypeVar("C", bound=_Conn)

DEFAULT_MAX_IDLE_PER_ENDPOINT = 64
DEFAULT_IDLE_TIMEOUT_S = 15.0
DEFAULT_MAX_AGE_S = 5.0


@dataclass
class IdleBook(Generic[C]):
    """Idle conns by key, newest last. Every method returns the conns the caller must close."""

    max_idle_per_key: int = DEFAULT_MAX_IDLE_PER_ENDPOINT
    idle_timeout_s: float = DEFAULT_IDLE_TIMEOUT_S
    max_age_s: float = DEFAULT_MAX_AGE_S
    generation: int = 0
    _idle: dict[Hashable, list[tuple[C, float]]] = field(default_factory=dict)  # (conn, idle since)
    reused: int = 0
    opened: int = 0

    def __repr__(self) -> str:
        return (f"<IdleBook keys={len(self._idle)} idle={self.idle_count()} opened={self.opened} "
                f"reused={self.reused} generation={self.generation}>")

    def idle_count(self, key: Hashable | None = None) -> int:
        if key is not None:
            return len(self._idle.get(key, ()))
        return sum(len(v) for v in self._idle.values())

    def _stale(self, conn: C, since: float, now: float) -> bool:
        return (not conn.reusable or conn.generation != self.generation or now - since >= self.idle_timeout_s
                or now - conn.born >= self.max_age_s)

    def take(self, key: Hashable, now: float) -> tuple[C | None, list[C]]:
        """(an idle conn to reuse or None, conns to close)."""
        close: list[C] = []
        stack = self._idle.get(key)
        while stack:
            conn, since = stack.pop()
            if self._stale(conn, since, now):
                close.append(conn)
                continue
            if not stack:
                del self._idle[key]
            self.reused += 1
            return conn, close
        self._idle.pop(key, None)
        return None, close

    def put(self, key: Hashable, conn: C, now: float) -> list[C]:
        """A conn that finished a request; returns what to close (it, if stale; the oldest over the cap)."""
        if self._stale(conn, now, now):
            return [conn]
        stack = self._idle.setdefault(key, [])
        stack.append((conn, now))
        close: list[C] = []
        while len(stack) > self.max_idle_per_key:
            close.append(stack.pop(0)[0])
        return close

    def new_generation(self) -> list[C]:
        """Security policy changed: no idle conn may carry another request."""
        self.generation += 1
        close = [c for stack in self._idle.values() for c, _ in stack]
        self._idle.clear()
        return close

    def expire(self, now: float) -> list[C]:
        close: list[C] = []
        for key in list(self._idle):
            keep = [(c, s) for c, s in self._idle[key] if not self._stale(c, s, now)]
            close += [c for c, s in self._idle[key] if self._stale(c, s, now)]
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        return close


class UpstreamPool:
    """The I/O side: closes what the book returns, sweeps idle conns on a timer,
    and notices security policy changes (by object, then by value)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, **book: float) -> None:
        self.clock = clock
        self.book: IdleBook[UpstreamConn] = IdleBook(**book)  # type: ignore[arg-type]
        self._security: object = None
        self._timer: asyncio.TimerHandle | None = None

    def __repr__(self) -> str:
        return f"<UpstreamPool {self.book!r}>"

    def check_security(self, security: object) -> None:
        if security is self._security:
            return
        changed = self._security is not None and security != self._security
        self._security = security
        if changed:
            _close_all(self.book.new_generation())

    def take(self, key: Hashable) -> UpstreamConn | None:
        conn, close = self.book.take(key, self.clock())
        _close_all(close)
        return conn

    def new_conn(self, key: Hashable) -> UpstreamConn:
        self.book.opened += 1
        return UpstreamConn(key, self.clock(), self.book.generation)

    def release(self, conn: UpstreamConn, reusable: bool) -> None:
        if not reusable:
            return
        _close_all(self.book.put(conn.key, conn, self.clock()))
        self._arm()

    def sweep(self) -> int:
        self._timer = None
        close = self.book.expire(self.clock())
        _close_all(close)
        self._arm()
        return len(close)

    def close_all(self) -> None:
        _close_all(self.book.new_generation())
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _arm(self) -> None:
        if self._timer is None and self.book.idle_count():
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            period = max(0.5, min(self.book.idle_timeout_s, self.book.max_age_s) / 2)
            self._timer = loop.call_later(period, self.sweep)


def _close_all(conns: list[UpstreamConn]) -> None:
    for c in conns:
        c.close(clean=True)
