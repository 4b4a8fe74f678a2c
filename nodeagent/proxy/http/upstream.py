"""Upstream HTTP/1.1 over a relay end (an HBONE CONNECT stream or a same-node
TCP connection). h11 is the protocol core. An `UpstreamConn` is the relay End
the wire delivers response bytes to; it lives as long as the wire and carries
one `UpstreamExchange` (request/response) at a time. After a complete
response on a connection both sides keep alive, the conn goes back to the
keep-alive pool (h1pool.py); any error, reset, timeout, upgrade or
`Connection: close` ends it. A response without framing ends at close and
ends the conn with it."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import h11

from ..relay import End


class UpstreamReset(Exception):
    """The upstream closed or reset before the response was complete."""


class UpstreamConn:
    """One keep-alive upstream connection (see the module docstring)."""

    def __init__(self, key: Any, born: float, generation: int = 0) -> None:
        self.key = key
        self.born = born
        self.generation = generation  # the pool's security generation when it opened
        self.h = h11.Connection(h11.CLIENT)
        self.wire: End | None = None
        self.ex: UpstreamExchange | None = None
        self.dead = False  # closed, reset, or in a state that cannot carry another request
        self.requests = 0  # requests sent on it
        self.rx = 0
        self.tx = 0
        self.on_reuse: Callable[[Any], None] | None = None  # a request's session (same-node guard's log)
        self.on_dead: Callable[[UpstreamConn], None] | None = None

    def __repr__(self) -> str:
        state = "dead" if self.dead else ("busy" if self.ex is not None else "idle")
        return f"<UpstreamConn {state} requests={self.requests} rx={self.rx} tx={self.tx}>"

    @property
    def reusable(self) -> bool:
        return not self.dead and self.ex is None and self.h.states == {h11.CLIENT: h11.IDLE, h11.SERVER: h11.IDLE}

    # -- End: the wire calls these with the response --
    def send(self, data: bytes) -> None:
        self.rx += len(data)
        if self.ex is None:
            # Bytes while idle: a server speaking out of turn (or a late 408). Not ours to parse.
            self.close(clean=False)
            return
        self.ex.rx += len(data)
        try:
            self.h.receive_data(data)
            self._pump()
        except h11.RemoteProtocolError as e:
            self._fail(UpstreamReset(f"bad HTTP response from upstream: {e}"))
            self.close(clean=False)

    def send_eof(self) -> None:
        ex = self.ex
        if ex is not None:
            try:
                self.h.receive_data(b"")
                self._pump()
            except (h11.RemoteProtocolError, RuntimeError) as e:
                self._fail(UpstreamReset(f"upstream closed mid-response: {e}"))
            if not ex.done.done():
                self._fail(UpstreamReset("upstream closed before the response ended"))
        self.close(clean=True)  # the upstream is done with this connection: finish our side too

    def abort(self) -> None:
        self.wire = None  # already reset: nothing to send on it
        self._fail(UpstreamReset("upstream connection reset"))
        self._mark_dead()

    def pause_reading(self) -> None:  # the wire cannot take more request bytes; bodies are small
        pass

    def resume_reading(self) -> None:
        pass

    # -- driving --
    def begin(self, ex: UpstreamExchange, request: h11.Request, body: bytes, session: Any = None) -> None:
        """Send one request; the response goes to `ex`. Raises UpstreamReset if
        the conn cannot take it (nothing was written then)."""
        if not self.reusable or self.wire is None:
            raise UpstreamReset("upstream connection is not reusable")
        if self.requests and self.on_reuse is not None and session is not None:
            self.on_reuse(session)
        self.requests += 1
        self.ex = ex
        ex.conn = self
        out = self.h.send(request) or b""
        if body:
            out += self.h.send(h11.Data(data=body)) or b""
        out += self.h.send(h11.EndOfMessage()) or b""
        self.tx += len(out)
        ex.tx += len(out)
        try:
            self.wire.send(out)
        except Exception as e:  # noqa: BLE001 - a wire closed under us: the request never left
            ex.written = False
            self._fail(UpstreamReset(f"upstream connection closed before the request was written: {e!r}"))
            self.close(clean=False)
            return
        ex.written = True

    def finish_exchange(self, ex: UpstreamExchange) -> bool:
        """The exchange is over; True when the conn may carry another request."""
        if self.ex is not ex:
            return False
        self.ex = None
        ok = ex.done.done() and not ex.done.cancelled() and ex.done.exception() is None
        if ok and not self.dead and self.h.states == {h11.CLIENT: h11.DONE, h11.SERVER: h11.DONE}:
            self.h.start_next_cycle()
            if self.wire is not None:
                self.wire.resume_reading()  # the last client may have left it paused
            return True
        self.close(clean=ok)
        return False

    def pause_wire(self, paused: bool) -> None:
        if self.wire is None:
            return
        if paused:
            self.wire.pause_reading()
        else:
            self.wire.resume_reading()

    def close(self, clean: bool = True) -> None:
        """End the connection: half-close when it ended cleanly, else reset."""
        wire, self.wire = self.wire, None
        self._fail(UpstreamReset("upstream connection closed"))
        self._mark_dead()
        if wire is not None:
            if clean:
                wire.send_eof()
            else:
                wire.abort()

    def _mark_dead(self) -> None:
        if not self.dead:
            self.dead = True
            if self.on_dead is not None:
                self.on_dead(self)

    def _pump(self) -> None:
        while self.ex is not None:
            ev = self.h.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return
            self.ex.event(ev)
            if isinstance(ev, (h11.EndOfMessage, h11.ConnectionClosed)):
                return

    def _fail(self, exc: Exception) -> None:
        if self.ex is not None:
            self.ex.fail(exc)


class UpstreamExchange:
    """One request/response on an UpstreamConn."""

    def __init__(self) -> None:
        self.conn: UpstreamConn | None = None
        self.rx = 0
        self.tx = 0
        self.written = False
        self.reused = False  # sent on a conn that had carried a request before (stale-conn race)
        loop = asyncio.get_running_loop()
        self.head: asyncio.Future[h11.Response] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self._sink: Callable[[bytes], None] | None = None
        self._early: list[bytes] = []
        self.finished = False
        self.on_release: Callable[[UpstreamConn, bool], None] | None = None  # the pool's put-back hook

    def __repr__(self) -> str:
        return f"<UpstreamExchange rx={self.rx} tx={self.tx} finished={self.finished} reused={self.reused}>"

    def event(self, ev: Any) -> None:
        if isinstance(ev, h11.Response):
            if not self.head.done():
                self.head.set_result(ev)
        elif isinstance(ev, h11.Data):
            if self._sink is not None:
                self._sink(bytes(ev.data))
            else:
                self._early.append(bytes(ev.data))
        elif isinstance(ev, h11.EndOfMessage):
            self.finished = True
            if not self.done.done():
                self.done.set_result(None)

    def set_sink(self, sink: Callable[[bytes], None]) -> None:
        self._sink = sink
        early, self._early = self._early, []
        for chunk in early:
            sink(chunk)

    def pause_wire(self, paused: bool) -> None:
        if self.conn is not None and self.conn.ex is self:
            self.conn.pause_wire(paused)

    def close(self) -> None:
        """Done with this exchange (complete, or abandoned for a retry): the
        conn goes back to the pool when it can carry another request."""
        conn = self.conn
        if conn is not None:
            reusable = conn.finish_exchange(self)
            hook, self.on_release = self.on_release, None
            if hook is not None:
                hook(conn, reusable)
        self.fail(UpstreamReset("closed"))

    def fail(self, exc: Exception) -> None:
        for fut in (self.head, self.done):
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: an abandoned try must not log noise
