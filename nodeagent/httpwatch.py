"""A passive HTTP/1.1 observer for the destination side of the mesh.

The inbound proxy relays a tunnel's bytes to the workload at L4; on a port
declared `http` it also feeds those bytes, unchanged and in order, to an
`Http1Watch`, which parses both directions with h11 (no I/O) and reports one
`Exchange` per request/response pair: method, status, body sizes, the request's
trace headers and how long the workload took. The proxy's telemetry turns each
exchange into Istio's `reporter="destination"` request metrics, a span and an
access log line, as Istio's inbound sidecar does for HTTP.

Nothing here can change or delay the traffic: any parse problem (not HTTP after
all, an upgrade, a protocol error) stops the watch (`stopped` says why) and the
connection is then accounted as TCP.

Two h11 connections mirror the exchange: `srv` (server role) parses requests
and is told the responses, `cli` (client role) is told the requests and parses
responses, so each side knows the other's framing (HEAD, 304, pipelining).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import h11

from nodeagent.tracing import TRACE_HEADERS

log = logging.getLogger(__name__)


@dataclass
class Exchange:
    """One request and its response as the workload saw them."""

    method: str
    target: str
    t0: float  # monotonic, when the request head arrived
    t0_unix: float
    trace_headers: tuple[tuple[str, str], ...] = ()
    grpc: bool = False
    request_bytes: int = 0  # body bytes
    response_bytes: int = 0
    status: int = 0  # 0: no response head (the connection ended first)
    grpc_status: str = ""
    t_end: float = 0.0
    complete: bool = False  # the response ended
    request_done: bool = False  # the request ended (it may end after its response)
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def duration_ms(self) -> float:
        return max(0.0, (self.t_end or self.t0) - self.t0) * 1000.0


class Http1Watch:
    """Feed `request(bytes)` (towards the workload) and `response(bytes)` (from it)."""

    def __init__(self, on_start: Callable[[Exchange], None], on_done: Callable[[Exchange], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._srv = h11.Connection(h11.SERVER, max_incomplete_event_size=64 * 1024)
        self._cli = h11.Connection(h11.CLIENT, max_incomplete_event_size=64 * 1024)
        self._on_start = on_start
        self._on_done = on_done
        self._clock = clock
        self.current: Exchange | None = None
        self.stopped = ""  # why the watch gave up ("" while it follows the traffic)
        self.exchanges = 0  # completed request/response pairs

    def __repr__(self) -> str:
        return f"<Http1Watch exchanges={self.exchanges} stopped={self.stopped!r}>"

    # -- feeding --
    def request(self, data: bytes) -> None:
        if self.stopped:
            return
        try:
            self._srv.receive_data(data)
            self._pump_requests()
        except h11.ProtocolError as e:
            self._stop(f"request: {e}")
        except Exception as e:  # observing must never break the relay it watches
            log.exception("HTTP watch failed; the connection is accounted as TCP from now on")
            self._stop(f"internal error: {e!r}")

    def response(self, data: bytes) -> None:
        if self.stopped:
            return
        try:
            self._cli.receive_data(data)
            self._pump_responses()
        except h11.ProtocolError as e:
            self._stop(f"response: {e}")
        except Exception as e:  # observing must never break the relay it watches
            log.exception("HTTP watch failed; the connection is accounted as TCP from now on")
            self._stop(f"internal error: {e!r}")

    def close(self) -> Exchange | None:
        """The connection ended: a request still waiting for its response is
        reported (status 0 when no head came) and returned."""
        ex, self.current = self.current, None
        if ex is not None:
            ex.t_end = self._clock()
            try:
                self._on_done(ex)
            except Exception:  # observing must never break the connection's teardown
                log.exception("HTTP watch: reporting the last exchange failed")
        if not self.stopped:
            self.stopped = "closed"
        return ex

    # -- internals --
    def _stop(self, why: str) -> None:
        self.stopped = why or "stopped"

    def _pump_requests(self) -> None:
        while not self.stopped:
            ev = self._srv.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return
            if isinstance(ev, h11.Request):
                headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in ev.headers]
                ex = Exchange(ev.method.decode("latin-1"), ev.target.decode("latin-1"), self._clock(), time.time(),
                              tuple((k, v) for k, v in headers if k in TRACE_HEADERS or k == "baggage"),
                              grpc=any(k == "content-type" and v.startswith("application/grpc")
                                       for k, v in headers))
                if ev.method == b"CONNECT" or any(k == "upgrade" for k, _ in headers):
                    self._stop("upgrade")  # the bytes after it are another protocol
                    return
                self.current = ex
                self._cli.send(ev)
                self._on_start(ex)
            elif isinstance(ev, h11.Data):
                if self.current is not None:
                    self.current.request_bytes += len(ev.data)
                self._cli.send(ev)
            elif isinstance(ev, h11.EndOfMessage):
                self._cli.send(ev)
                done = self.current
                if done is not None:
                    done.request_done = True
                    if done.complete:  # the response finished before the request did
                        self._report(done)
                        self._next_cycle()
            elif isinstance(ev, h11.ConnectionClosed):
                return

    def _pump_responses(self) -> None:
        while not self.stopped:
            ev = self._cli.next_event()
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return
            ex = self.current
            if isinstance(ev, h11.InformationalResponse):
                if ev.status_code == 101:
                    self._stop("upgrade")
                    return
                self._srv.send(ev)
            elif isinstance(ev, h11.Response):
                if ex is not None:
                    ex.status = ev.status_code
                    for k, v in ev.headers:
                        if k == b"grpc-status":
                            ex.grpc_status = v.decode("latin-1")
                self._srv.send(ev)
            elif isinstance(ev, h11.Data):
                if ex is not None:
                    ex.response_bytes += len(ev.data)
                self._srv.send(ev)
            elif isinstance(ev, h11.EndOfMessage):
                for k, v in ev.headers:  # trailers (gRPC over HTTP/1.1 is rare, but honest)
                    if k == b"grpc-status" and ex is not None:
                        ex.grpc_status = v.decode("latin-1")
                self._srv.send(ev)
                if ex is not None:
                    ex.t_end = self._clock()
                    ex.complete = True
                    if not ex.request_done:
                        continue  # reported once the request's last bytes are in
                    self._report(ex)
                self._next_cycle()
            elif isinstance(ev, h11.ConnectionClosed):
                return

    def _report(self, ex: Exchange) -> None:
        self.current = None
        self.exchanges += 1
        self._on_done(ex)

    def _next_cycle(self) -> None:
        srv, cli = self._srv, self._cli
        if srv.our_state is h11.DONE and srv.their_state is h11.DONE:
            srv.start_next_cycle()
        if cli.our_state is h11.DONE and cli.their_state is h11.DONE:
            cli.start_next_cycle()
        # A pipelined request may be waiting behind the one just answered.
        self._pump_requests()
