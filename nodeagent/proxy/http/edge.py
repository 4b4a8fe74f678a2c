"""Time limits of one downstream HTTP/1.x connection, shared by the sending
node's L7 listeners (h1stack.py, h2stack.py) and the receiving node's guard
(authz_l7.py): the request-head timeout (408), the idle timeout between
requests, and the stream idle timeout (MeshConfig streamIdleTimeoutSeconds: a
request in flight with no byte moving either way).

One timer per connection, never re-armed per request: it ticks every quarter
of the shorter limit and compares what the connection reports (is a head in
progress, is a request in flight, did bytes move) with the previous tick, so
the hot path pays nothing. A limit fires between T and T * 1.5 after its
start."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from nodemesh.httpedge import HttpLimits

from .h1 import EdgeError

TICKS_PER_LIMIT = 4
HEAD_TIMEOUT, IDLE_TIMEOUT, STREAM_IDLE_TIMEOUT = "request_head_timeout", "idle_timeout", "stream_idle_timeout"


class ConnTimer:
    """Calls on_expire(HEAD_TIMEOUT | IDLE_TIMEOUT | STREAM_IDLE_TIMEOUT) once;
    `probe()` returns (head in progress, request in flight, bytes moved so far)."""

    def __init__(self, limits: HttpLimits, probe: Callable[[], tuple[bool, bool, int]],
                 on_expire: Callable[[str], None]) -> None:
        self.head_s = limits.request_head_timeout_s
        self.idle_s = limits.idle_timeout_s
        self.stream_s = limits.stream_idle_timeout_s
        self.period = max(0.02, min(self.head_s, self.idle_s, self.stream_s) / TICKS_PER_LIMIT)
        self._probe = probe
        self._on_expire = on_expire
        self._handle: asyncio.TimerHandle | None = None
        self._head_for = 0.0  # how long a head has been in progress at consecutive ticks
        self._idle_for = 0.0
        self._stream_for = 0.0  # a request in flight with no byte moving
        self._moved = -1
        self._head_seen = False
        self.fired = ""

    def __repr__(self) -> str:
        return (f"<ConnTimer head_for={self._head_for:g} idle_for={self._idle_for:g} "
                f"stream_for={self._stream_for:g} fired={self.fired!r}>")

    def start(self) -> None:
        with contextlib.suppress(RuntimeError):  # no running loop (unit tests drive tick() themselves)
            self._handle = asyncio.get_running_loop().call_later(self.period, self._fire)

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None

    def _fire(self) -> None:
        self._handle = None
        if self.tick(self.period):
            self.start()

    def tick(self, elapsed: float) -> bool:
        """Account `elapsed` seconds; False once a limit fired (no more ticks)."""
        in_head, busy, moved = self._probe()
        # Counted from the first tick that saw the head: a head is never cut before T.
        self._head_for = (self._head_for + elapsed if self._head_seen else 0.0) if in_head else 0.0
        self._head_seen = in_head
        still = moved == self._moved
        self._moved = moved
        self._idle_for = self._idle_for + elapsed if (still and not busy and not in_head) else 0.0
        self._stream_for = self._stream_for + elapsed if (still and busy) else 0.0
        if self._head_for >= self.head_s:
            self.fired = HEAD_TIMEOUT
        elif self._idle_for >= self.idle_s:
            self.fired = IDLE_TIMEOUT
        elif self._stream_for >= self.stream_s:
            self.fired = STREAM_IDLE_TIMEOUT
        else:
            return True
        self._on_expire(self.fired)
        return False


def head_timeout(limits: HttpLimits) -> EdgeError:
    """What both edges answer when a request head is too slow."""
    return EdgeError(408, "request_head_timeout",
                     f"the request head did not arrive within {limits.request_head_timeout_s:g}s")
