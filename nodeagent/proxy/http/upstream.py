"""One upstream HTTP/1.1 exchange over a relay end (an HBONE CONNECT stream or
a same-node TCP connection). h11 is the protocol core; this class is the
relay End the wire delivers response bytes to. One request per upstream
connection (`Connection: close`): each request is its own CONNECT stream on
the pooled mTLS connection, so the destination node logs and checks every
request, and a response without framing ends cleanly at close."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import h11

from ..relay import End


class UpstreamReset(Exception):
    """The upstream closed or reset before the response was complete."""


class UpstreamExchange:
    def __init__(self) -> None:
        self.conn = h11.Connection(h11.CLIENT)
        self.wire: End | None = None
        self.rx = 0
        self.tx = 0
        loop = asyncio.get_running_loop()
        self.head: asyncio.Future[h11.Response] = loop.create_future()
        self.done: asyncio.Future[None] = loop.create_future()
        self._sink: Callable[[bytes], None] | None = None
        self._early: list[bytes] = []
        self.finished = False
        self.on_pause: Callable[[bool], None] | None = None  # downstream back-pressure hook

    # -- End: the wire calls these with the response --
    def send(self, data: bytes) -> None:
        self.rx += len(data)
        try:
            self.conn.receive_data(data)
            self._pump()
        except h11.RemoteProtocolError as e:
            self._fail(UpstreamReset(f"bad HTTP response from upstream: {e}"))

    def send_eof(self) -> None:
        try:
            self.conn.receive_data(b"")
            self._pump()
        except h11.RemoteProtocolError as e:
            self._fail(UpstreamReset(f"upstream closed mid-response: {e}"))
        if not self.done.done():
            self._fail(UpstreamReset("upstream closed before the response ended"))

    def abort(self) -> None:
        self._fail(UpstreamReset("upstream connection reset"))

    def pause_reading(self) -> None:  # the wire cannot take more request bytes; bodies are small
        pass

    def resume_reading(self) -> None:
        pass

    # -- driving --
    def start(self, wire: End, request: h11.Request, body: bytes) -> None:
        self.wire = wire
        out = self.conn.send(request) or b""
        if body:
            out += self.conn.send(h11.Data(data=body)) or b""
        out += self.conn.send(h11.EndOfMessage()) or b""
        self.tx += len(out)
        wire.send(out)

    def set_sink(self, sink: Callable[[bytes], None]) -> None:
        self._sink = sink
        early, self._early = self._early, []
        for chunk in early:
            sink(chunk)

    def pause_wire(self, paused: bool) -> None:
        if self.wire is None:
            return
        if paused:
            self.wire.pause_reading()
        else:
            self.wire.resume_reading()

    def close(self) -> None:
        """Done with this exchange (complete, or abandoned for a retry)."""
        if self.wire is not None:
            if self.done.done() and not self.done.exception():
                self.wire.send_eof()
            else:
                self.wire.abort()
        self._fail(UpstreamReset("closed"))

    def _pump(self) -> None:
        while True:
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return
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
                return
            elif isinstance(ev, h11.ConnectionClosed):
                return

    def _fail(self, exc: Exception) -> None:
        for fut in (self.head, self.done):
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: an abandoned try must not log noise
