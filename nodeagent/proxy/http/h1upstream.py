"""Upstream HTTP/1.1 over a relay end (an HBONE CONNECT stream or a same-node
TCP connection). Responses are read with httptools (llhttp); requests are
written whole in one send. An `UpstreamConn` is the relay End
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

import httptools

from ..relay import End


class UpstreamReset(Exception):
    """The upstream closed or reset before the response was complete."""


class UpstreamRequest:
    """A request as the stack decided it: serialized by UpstreamConn.begin in one piece."""

    __slots__ = ("headers", "method", "target")

    def __init__(self, method: str, target: str, headers: list[tuple[str, str]]) -> None:
        self.method = method
        self.target = target
        self.headers = headers  # lower-case names; framing headers are ignored (ours are added)


class ResponseHead:
    """A final response head (the attributes h11.Response had): names lower-cased."""

    __slots__ = ("headers", "reason", "status_code")

    def __init__(self, status_code: int, reason: bytes, headers: list[tuple[bytes, bytes]]) -> None:
        self.status_code = status_code
        self.reason = reason
        self.headers = headers


_NO_BODY_STATUS = frozenset({204, 304})
_BODY_METHODS = frozenset({"POST", "PUT", "PATCH"})


def request_bytes(req: UpstreamRequest, body: bytes) -> bytes:
    """The request head and body in one piece, framed by Content-Length (bodies are buffered)."""
    lines = [f"{req.method} {req.target} HTTP/1.1\r\n"]
    for k, v in req.headers:
        if k != "content-length" and k != "transfer-encoding":
            lines.append(f"{k}: {v}\r\n")
    if body or req.method in _BODY_METHODS:
        lines.append(f"content-length: {len(body)}\r\n")
    lines.append("\r\n")
    head = "".join(lines)
    if head.count("\n") != len(lines) or "\r" in req.target or " " in req.target:
        # A CR or LF inside a value or the target would start a line of its own (header injection).
        raise UpstreamReset("refusing to send a request whose header or target contains CR/LF")
    return head.encode("latin-1") + body if body else head.encode("latin-1")


class UpstreamConn:
    """One keep-alive upstream connection (see the module docstring). Responses are
    read with httptools (llhttp, strict); requests are written whole, in one send."""

    def __init__(self, key: Any, born: float, generation: int = 0) -> None:
        self.key = key
        self.born = born
        self.generation = generation  # the pool's security generation when it opened
        self.wire: End | None = None
        self.ex: UpstreamExchange | None = None
        self.dead = False  # closed, reset, or in a state that cannot carry another request
        self.requests = 0  # requests sent on it
        self.rx = 0
        self.tx = 0
        self.on_reuse: Callable[[Any], None] | None = None  # a request's session (same-node guard's log)
        self.on_dead: Callable[[UpstreamConn], None] | None = None
        self._p = httptools.HttpResponseParser(self)
        self._idle = True  # no exchange in flight and the last response allowed another
        self._head_method = False  # the request in flight is HEAD: its response has no body
        self._reason = b""
        self._headers: list[tuple[bytes, bytes]] = []
        self._final = False  # the message being parsed is the final response (not a 1xx)
        self._until_eof = False  # the body of the response in flight ends with the connection
        self._keep = False
        self._complete = False  # the response in flight ended

    def __repr__(self) -> str:
        state = "dead" if self.dead else ("busy" if self.ex is not None else "idle")
        return f"<UpstreamConn {state} requests={self.requests} rx={self.rx} tx={self.tx}>"

    @property
    def reusable(self) -> bool:
        return not self.dead and self.ex is None and self._idle

    # -- End: the wire calls these with the response --
    def send(self, data: bytes) -> None:
        self.rx += len(data)
        ex = self.ex
        if ex is None or self._complete:
            # Bytes while idle: a server speaking out of turn (or a late 408). Not ours to parse.
            self.close(clean=False)
            return
        ex.rx += len(data)
        try:
            self._p.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamReset("the upstream switched protocols (upgrade is not carried on this path)"))
            self.close(clean=False)
        except httptools.HttpParserError as e:
            self._fail(UpstreamReset(f"bad HTTP response from upstream: {e}"))
            self.close(clean=False)

    def send_eof(self) -> None:
        ex = self.ex
        if ex is not None:
            if self._until_eof and not self._complete:
                self._message_done()  # read until close: the close is its end
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

    # -- httptools callbacks (the response) --
    def on_message_begin(self) -> None:
        self._reason, self._headers, self._final = b"", [], False

    def on_status(self, reason: bytes) -> None:
        self._reason += reason

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self._complete:  # a second response to one request: the conn cannot be trusted again
            self._keep = False
            return
        status = self._p.get_status_code()
        if status < 200:
            return  # 100 Continue and friends: the final response follows (101: HttpParserUpgrade)
        self._final = True
        self._keep = bool(self._p.should_keep_alive())
        framed = any(k in (b"content-length", b"transfer-encoding") for k, _ in self._headers)
        self._until_eof = not framed and status not in _NO_BODY_STATUS and not self._head_method
        ex = self.ex
        if ex is not None:
            ex.got_head(ResponseHead(status, self._reason, self._headers))
        if self._head_method:
            # llhttp would wait for the body a HEAD response never has: this message is over,
            # and the next response needs a parser of its own.
            self._p = httptools.HttpResponseParser(self)
            self._message_done()

    def on_body(self, body: bytes) -> None:
        ex = self.ex
        if ex is not None and self._final and not self._complete:
            ex.data(body)

    def on_message_complete(self) -> None:
        if self._final and not self._head_method and not self._complete:
            self._message_done()

    def _message_done(self) -> None:
        self._complete = True
        self._until_eof = False
        ex = self.ex
        if ex is not None:
            ex.end()

    # -- driving --
    def begin(self, ex: UpstreamExchange, request: UpstreamRequest, body: bytes, session: Any = None) -> None:
        """Send one request; the response goes to `ex`. Raises UpstreamReset if
        the conn cannot take it (nothing was written then)."""
        if not self.reusable or self.wire is None:
            raise UpstreamReset("upstream connection is not reusable")
        out = request_bytes(request, body)
        if self.requests and self.on_reuse is not None and session is not None:
            self.on_reuse(session)
        self.requests += 1
        self.ex = ex
        ex.conn = self
        self._idle = False
        self._complete = False
        self._head_method = request.method == "HEAD"
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
        if ok and not self.dead and self._complete and self._keep:
            self._idle = True
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
        self.head: asyncio.Future[ResponseHead] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self._sink: Callable[[bytes], None] | None = None
        self._early: list[bytes] = []
        self.finished = False
        self.on_release: Callable[[UpstreamConn, bool], None] | None = None  # the pool's put-back hook

    def __repr__(self) -> str:
        return f"<UpstreamExchange rx={self.rx} tx={self.tx} finished={self.finished} reused={self.reused}>"

    def got_head(self, head: ResponseHead) -> None:
        if not self.head.done():
            self.head.set_result(head)

    def data(self, chunk: bytes) -> None:
        if self._sink is not None:
            self._sink(chunk)
        else:
            self._early.append(chunk)

    def end(self) -> None:
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
