"""The HTTP/2 (h2c) and gRPC adapter of the outbound L7 pipeline
(pipeline.py). Terminates the client's h2c connection (server role, h2core)
and runs every stream through the one pipeline as an `H2Call`, which supplies
the wire: local replies (gRPC: trailers-only with the status), upstream
headers, one try, the response relayed back, mirror copies (h2mirror.py).

Each try is a stream on an h2c connection to the endpoint carried by one HBONE
CONNECT stream (or a same-node TCP connection); those connections are pooled
per (source identity, endpoint), many requests multiplexed on one
(h2upstream.py).

Retries: the request body is kept (up to MAX_BUFFERED_BODY) while it streams
upstream, and the response head is held back until the first response DATA
frame (gRPC: the outcome is in the trailers). A try can be retried only while
every request byte is still held and nothing of the response reached the
client. Flow control: window credit is returned to the side that sent data
only once the other side took it (its send queue drained and its transport
is not pushing back).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import h2.errors
import h2.events
import h2.exceptions

from nodeagent.meshview.l7snapshot import RouteEntry
from nodeagent.meshview.snapshot import Endpoint, Snapshot
from nodeagent.observe import meshmetrics

from ..plan import OutboundPlan
from . import h2mirror, route_select
from .edge import HEAD_TIMEOUT, STREAM_IDLE_TIMEOUT, TICKS_PER_LIMIT, ConnTimer, head_timeout
from .h2core import (
    GOAWAY_GRACE_S,
    GRPC_DEADLINE_EXCEEDED,
    GRPC_UNAVAILABLE,
    PREFACE,
    H2Core,
    Headers,
    grpc_message_escape,
    grpc_status_for_http,
    grpc_status_of,
    header_value,
    is_grpc,
    strip_connection_headers,
)
from .h2upstream import H2Upstream, StreamHandler
from .pathnorm import BadTarget, normalize_target
from .pipeline import (
    MAX_BUFFERED_BODY,
    BadRequest,
    Call,
    Downstream,
    InternalError,
    L7Runtime,
    LocalReply,
    Request,
    StreamIdleTimeout,
    TryResult,
)
from .retry import Outcome
from .timeout import GRPC_TIMEOUT_HEADER, MESH_DEADLINE_HEADER, Deadline, format_grpc_timeout

if TYPE_CHECKING:
    from ..outbound import OutboundConnection
    from ..proxy import NodeProxy

log = logging.getLogger(__name__)

_DRAIN_PING = b"drain\x00\x00\x00"  # the PING that follows a drain's first GOAWAY
_DRAIN = "proxy restarting"


# ---------------------------------------------------------------- entry points
def start_h2(proxy: NodeProxy, end: OutboundConnection, snapshot: Snapshot, source_key: str, source_id: str,
             plan: OutboundPlan, tcp_fallback: Callable[[], None], early: bytes = b"", sniff: bool = True) -> None:
    """Take the client connection over for h2c. `early`: bytes already read
    (the sniffed preface); `sniff`: fall back to L4 if the client does not open
    with the HTTP/2 preface (a port declared http2/grpc used by an HTTP/1 client)."""
    ds = H2Downstream(proxy.l7, end, snapshot, source_key, source_id, plan, tcp_fallback, sniff)
    cast(asyncio.Transport, end.transport).set_protocol(ds)  # set: the relay end is connected
    ds.begin(early)


def take_over_from_h1(h1: Downstream, sniffed: bytes) -> None:
    """`auto` port whose first bytes were the HTTP/2 preface (h1stack.H1Downstream saw them)."""
    h1.conn_session.set(protocol="http2", detect="http2")
    ds = H2Downstream(h1.rt, h1.end, h1.snapshot, h1.source_key, h1.source_id, h1.plan, h1.tcp_fallback, False)
    h1.transport.set_protocol(ds)
    ds.begin(sniffed)


# ---------------------------------------------------------------- client side (server role)
class H2Downstream(Downstream):
    """The client's h2c connection: one H2Call per stream."""

    def __init__(self, rt: L7Runtime, end: OutboundConnection, snapshot: Snapshot, source_key: str,
                 source_id: str, plan: OutboundPlan, tcp_fallback: Callable[[], None], sniff: bool) -> None:
        super().__init__(rt, end, snapshot, source_key, source_id, plan, tcp_fallback)
        self.core = H2Core(client=False)
        self.calls: dict[int, H2Call] = {}
        self.write_paused = False
        self.closed = False
        self.requests = 0
        self._sniffing = sniff
        self._sniffed = b""
        self._started = False
        # The connection's limits (MeshConfig spec.http, self.limits): the request-head and
        # idle timeouts by one ticking timer, each stream's idle time at its ticks (_probe).
        self.timer = ConnTimer(dataclasses.replace(self.limits, stream_idle_timeout_s=math.inf), self._probe,
                               self._expired)
        self.timer.period = max(0.02, min(self.timer.period, self.limits.stream_idle_timeout_s / TICKS_PER_LIMIT))
        # A drain (the worker's, at a restart): 0 not draining, 1 first GOAWAY due or sent, 2 final sent.
        self.goaway_step = 0
        self._goaway_timer: asyncio.TimerHandle | None = None
        rt.h2_clients.add(self)
        if rt.proxy.draining:
            self.drain()

    def begin(self, early: bytes) -> None:
        pending = self.end.take_over()
        self.conn_session.set(protocol="http2")
        self.timer.start()
        self.transport.resume_reading()
        for chunk in [early, *pending]:
            if chunk:
                self.data_received(chunk)

    def _to_tcp(self) -> None:
        """Not HTTP/2 after all: hand the connection back to the L4 relay."""
        self._sniffing = False
        self.closed = True
        self.timer.cancel()
        self.conn_session.set(protocol="tcp", detect="not_http2")
        self.end.hand_back(self._sniffed)
        self.tcp_fallback()

    # -- asyncio.Protocol --
    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if self._sniffing:
            self._sniffed += data
            n = min(len(self._sniffed), len(PREFACE))
            if self._sniffed[:n] != PREFACE[:n]:
                log.info("port %s of %s is declared HTTP/2 but the client did not send the HTTP/2 preface: "
                         "relaying as TCP (declare the port http or auto for HTTP/1.1 clients)",
                         self.plan.dst_port, self.plan.service)
                self._to_tcp()
                return
            if n < len(PREFACE):
                return
            self._sniffing = False
            data, self._sniffed = self._sniffed, b""
        if not self._started:
            self._started = True
            self.core.initiate()
            if self.goaway_step:
                self._goaway_first()
        self.end.rx += len(data)
        got = self.core.receive_data(data)
        if got.error:
            log.info("client h2c connection from %s: %s", self.conn_session.fields.get("src", "?"), got.error)
            self.conn_session.fail("bad_request", got.error)
            self.flush()
            self.transport.close()
            return
        for ev in got.events:
            self._dispatch(ev)
        for sid in got.drained:
            call = self.calls.get(sid)
            if call is not None:
                call.resp_progress()
        self.flush()

    def _dispatch(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            if self.core.refuses(ev.stream_id):  # opened after our final GOAWAY: the client retries it
                self.core.reset(ev.stream_id, h2.errors.ErrorCodes.REFUSED_STREAM)
                return
            hdrs = [(str(k), str(v)) for k, v in ev.headers]
            new = H2Call(self, ev.stream_id, hdrs)
            self.calls[ev.stream_id] = new
            self.requests += 1
            self.rt.counters.requests += 1
            self.rt.proxy.spawn(new.serve_stream())
        elif isinstance(ev, h2.events.DataReceived):
            call = self.calls.get(ev.stream_id)
            if call is not None:
                call.on_request_data(bytes(ev.data), ev.flow_controlled_length)
            else:
                self.core.acknowledge(ev.stream_id, ev.flow_controlled_length)
        elif isinstance(ev, h2.events.TrailersReceived):
            call = self.calls.get(ev.stream_id)
            if call is not None:
                call.request_trailers = [(str(k), str(v)) for k, v in ev.headers]
        elif isinstance(ev, h2.events.StreamEnded):
            call = self.calls.get(ev.stream_id)
            if call is not None:
                call.on_request_end()
        elif isinstance(ev, h2.events.StreamReset):
            call = self.calls.get(ev.stream_id)
            if call is not None:
                call.on_client_reset(f"client reset the stream (code {ev.error_code})")
        elif isinstance(ev, h2.events.PingAckReceived) and ev.ping_data == _DRAIN_PING:
            self._goaway_final()  # a round trip: every stream opened before our first GOAWAY is here

    def eof_received(self) -> bool:
        # h2: the client's half-close ends nothing we still owe it, unless it is the
        # answer to a drained connection's end.
        return not (self.goaway_step == 2 and not self.calls)

    # -- drain (a restart): GOAWAY, the open streams finish, then close --
    def drain(self) -> None:
        """Send the client a graceful GOAWAY in two steps, as Envoy and Go's server
        do: the largest stream ID and a PING first (open no new stream here), then,
        at the PING's answer or GOAWAY_GRACE_S later, the last stream ID taken.
        Streams up to it finish; later ones are refused (REFUSED_STREAM: the client
        sends them again on a new connection, to the next workers). The connection
        ends once no stream is left."""
        if self.closed or self.goaway_step:
            return
        self.goaway_step = 1
        if self._started:
            self._goaway_first()
        # else: once the preface arrived (data_received)

    def _goaway_first(self) -> None:
        self.core.goaway(None, _DRAIN)
        self.core.h2.ping(_DRAIN_PING)
        self.flush()
        self._goaway_timer = asyncio.get_running_loop().call_later(GOAWAY_GRACE_S, self._goaway_final)

    def _goaway_final(self) -> None:
        if self.closed or self.goaway_step != 1:
            return
        if self._goaway_timer is not None:
            self._goaway_timer.cancel()
        self.goaway_step = 2
        self.core.goaway(self.core.last_peer_stream, _DRAIN)
        self.flush()
        self._end_if_drained()

    def _end_if_drained(self) -> None:
        """After the final GOAWAY and the last stream: half-close (our FIN after the
        last frame), and close at the client's or GOAWAY_GRACE_S later. A close with
        the client still sending would answer it with a reset."""
        if self.goaway_step != 2 or self.calls or self.closed or self.transport.is_closing():
            return
        self.flush()
        if self.transport.can_write_eof():
            self.transport.write_eof()
            asyncio.get_running_loop().call_later(GOAWAY_GRACE_S, self.transport.close)
        else:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed and not self._started:
            return  # handed over to the L4 relay
        self.closed = True
        self.timer.cancel()
        if self._goaway_timer is not None:
            self._goaway_timer.cancel()
        for call in list(self.calls.values()):
            call.on_client_reset("client connection closed")
        self.conn_session.set(requests=self.requests)
        self.conn_session.end_closed()

    def pause_writing(self) -> None:
        self.write_paused = True

    # -- time limits --
    def _probe(self) -> tuple[bool, bool, int]:
        for call in list(self.calls.values()):
            call.tick_idle(self.timer.period, self.limits.stream_idle_timeout_s)
        in_head = (self._sniffing and bool(self._sniffed)) or self.core.head_in_progress()
        return in_head, bool(self.calls), self.end.rx + self.end.tx

    def _expired(self, what: str) -> None:
        if self.closed:
            return
        if what == HEAD_TIMEOUT:
            e = head_timeout(self.limits)
            meshmetrics.http_edge_refused("outbound", e.status, e.reason)
            log.info("h2c connection from %s: %s", self.conn_session.fields.get("src", "?"), e.message)
            self.conn_session.fail(e.reason, e.message)
        else:
            self.conn_session.set(reason=what)
        self.core.close()  # GOAWAY
        self.flush()
        self.transport.close()

    def resume_writing(self) -> None:
        self.write_paused = False
        for call in list(self.calls.values()):
            call.resp_progress()
        self.flush()

    # -- used by calls --
    def flush(self) -> None:
        data = self.core.data_to_send()
        if data and not self.transport.is_closing():
            self.end.tx += len(data)
            self.transport.write(data)

    def drained(self, sid: int) -> bool:
        return not self.write_paused and self.core.queued(sid) == 0

    def call_done(self, sid: int) -> None:
        self.calls.pop(sid, None)
        self.core.forget(sid)
        self._end_if_drained()


# ---------------------------------------------------------------- one try
class Try(StreamHandler):
    """One attempt of a call on one upstream stream."""

    def __init__(self, call: H2Call, conn: H2Upstream, ep: Endpoint) -> None:
        self.call = call
        self.conn = conn
        self.ep = ep
        self.sid = 0
        loop = asyncio.get_running_loop()
        # Resolves with what decides the try: "final" (complete response, not yet sent on),
        # "head" (a non-gRPC head to judge), "commit" (first response DATA), "reset".
        self.decided: asyncio.Future[str] = loop.create_future()
        self.head: Headers = []
        self.trailers: Headers | None = None
        self.early: list[tuple[bytes, int]] = []
        self.error = ""
        self.refused = False  # the endpoint never processed it (StreamHandler.on_refused)
        self.closed = False  # the upstream stream is finished or released
        self.forwarding = False  # the call relays this try's response to the client

    def _decide(self, what: str) -> None:
        if not self.decided.done():
            self.decided.set_result(what)

    def on_head(self, headers: Headers, ended: bool) -> None:
        self.head = headers
        status = header_value(headers, ":status") or "0"
        if ended:
            self.closed = True
            self.conn.release(self.sid, reset=False)
            if self.forwarding:
                self.call.forward_end(self, None)
            self._decide("final")
        elif status != "200" or not is_grpc(headers):
            self._decide("head")

    def on_data(self, data: bytes, n: int) -> None:
        if self.forwarding:
            self.call.forward_data(self, data, n)
            return
        self.early.append((data, n))
        self._decide("commit")

    def on_trailers(self, headers: Headers) -> None:
        self.trailers = headers
        self.closed = True
        self.conn.release(self.sid, reset=False)
        if self.forwarding:
            self.call.forward_end(self, headers)
        self._decide("final")

    def on_end(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.conn.release(self.sid, reset=False)
        if self.forwarding:
            self.call.forward_end(self, None)
        self._decide("final")

    def on_reset(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.error = why
        if self.forwarding:
            self.call.forward_reset(self, why)
        self._decide("reset")

    def on_refused(self, why: str) -> None:
        self.refused = not self.forwarding
        self.on_reset(why)

    def on_drained(self) -> None:
        if self.call.cur is self:
            self.call.req_progress()

    def abandon(self) -> None:
        if not self.closed:
            self.closed = True
            self.conn.release(self.sid, reset=True)
        for _, n in self.early:
            self.conn.core.acknowledge(self.sid, n)
        self.early.clear()


# ---------------------------------------------------------------- one request
class H2Call(Call):
    """One HTTP/2 request (stream) through the pipeline."""

    def __init__(self, ds: H2Downstream, sid: int, headers: Headers) -> None:
        pseudo = {k: v for k, v in headers if k.startswith(":")}
        regular = [(k, v) for k, v in headers if not k.startswith(":")]
        grpc = is_grpc(regular)
        f = ds.conn_session.fields
        session = ds.rt.proxy.new_session(
            "outbound", protocol="grpc" if grpc else "http2", src=f.get("src", ""),
            source_workload=ds.source_key, source_principal=ds.source_id, dst_addr=f.get("dst_addr", ""),
            dst_service=ds.plan.service, method=pseudo.get(":method", ""), path=pseudo.get(":path", ""))
        super().__init__(ds.rt, session, ds.plan, ds.source_id)
        self.ds = ds
        self.sid = sid
        self.pseudo = pseudo
        self.headers = regular
        self.grpc = grpc
        self.grpc_status: int | None = None
        # request side
        self.body = bytearray()  # every request byte so far, for a retry (until it overflows)
        self.overflow = False
        self.unsent: list[bytes] = []  # received while no try is live
        self.sent_any = False
        self.req_ended = False
        self.request_trailers: Headers | None = None
        self.owed_req = 0  # client window credit, returned once the upstream took the data
        self.request_bytes = 0  # DATA payload from the client (istio_request_bytes)
        self.response_bytes = 0  # DATA payload to the client (istio_response_bytes)
        # response side
        self.cur: Try | None = None
        self.owed_resp = 0
        self.committed = False  # response headers went to the client: no more retries
        self.finished = False
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._deadline_timer: asyncio.TimerHandle | None = None
        self._live = False
        self.task: asyncio.Task[Any] | None = None
        self._moved = -1  # what moved at the last tick of the connection's timer, and for how long nothing did
        self._idle_for = 0.0
        # True once the whole request is buffered in self.body (mirrors wait on it),
        # False if it never will be (over the buffer bound, or the call ended first).
        self.request_complete: asyncio.Future[bool] = asyncio.get_running_loop().create_future()

    # -- from the client --
    def on_request_data(self, data: bytes, n: int) -> None:
        self.request_bytes += len(data)
        if self.finished:
            self.ds.core.acknowledge(self.sid, n)
            return
        if not self.overflow:
            if len(self.body) + len(data) > MAX_BUFFERED_BODY:
                self.overflow = True
                self.body = bytearray()
                self._request_complete(False)
            else:
                self.body += data
        self.owed_req += n
        t = self.cur
        if t is not None and self._live and not t.closed:
            t.conn.core.send_data(t.sid, data)
            self.sent_any = True
            t.conn.flush()
            self.req_progress()
        else:
            self.unsent.append(data)

    def _request_complete(self, whole: bool) -> None:
        if not self.request_complete.done():
            self.request_complete.set_result(whole)

    def on_request_end(self) -> None:
        self.req_ended = True
        self._request_complete(not self.overflow)
        t = self.cur
        if t is not None and self._live and not t.closed:
            t.conn.core.end_stream(t.sid, self.request_trailers)
            t.conn.flush()

    def on_client_reset(self, why: str) -> None:
        if self.finished:
            return
        self.session.fail("downstream_reset", why)
        if self.cur is not None:
            self.cur.abandon()
        self._finish()

    # -- flow control --
    def req_progress(self) -> None:
        t = self.cur
        if t is not None and self.owed_req and t.conn.drained(t.sid):
            n, self.owed_req = self.owed_req, 0
            self.ds.core.acknowledge(self.sid, n)
            self.ds.flush()

    def resp_progress(self) -> None:
        t = self.cur
        if t is not None and self.owed_resp and self.ds.drained(self.sid):
            n, self.owed_resp = self.owed_resp, 0
            t.conn.core.acknowledge(t.sid, n)
            t.conn.flush()

    # -- response relaying (called by the committed try) --
    def forward_data(self, t: Try, data: bytes, n: int) -> None:
        if self.finished:
            t.conn.core.acknowledge(t.sid, n)
            return
        self.ds.core.send_data(self.sid, data)
        self.response_bytes += len(data)
        self.owed_resp += n
        self.ds.flush()
        self.resp_progress()

    def forward_end(self, t: Try, trailers: Headers | None) -> None:
        if self.finished:
            return
        if trailers is not None:
            self.grpc_status = grpc_status_of(trailers)
            trailers = strip_connection_headers(trailers)
        self.ds.core.end_stream(self.sid, trailers)
        self.ds.flush()
        self.resp_progress()
        self._finish()

    def forward_reset(self, t: Try, why: str) -> None:
        if self.finished:
            return
        self.session.fail("upstream_reset", f"response cut short: {why}")
        if self.grpc:
            # The head went out; say why in trailers rather than a bare RST_STREAM.
            self.grpc_status = GRPC_UNAVAILABLE
            self.ds.core.end_stream(self.sid, [("grpc-status", str(GRPC_UNAVAILABLE)),
                                               ("grpc-message", grpc_message_escape(f"upstream reset: {why}"))])
        else:
            self.ds.core.reset(self.sid, h2.errors.ErrorCodes.INTERNAL_ERROR)
        self.ds.flush()
        self._finish()

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        if self._deadline_timer is not None:
            self._deadline_timer.cancel()
        self._request_complete(self.req_ended and not self.overflow)
        if self.unsent or self.owed_req:
            # Whatever the client sent that no upstream will take: credit it back.
            self.ds.core.acknowledge(self.sid, self.owed_req)
            self.owed_req = 0
            self.unsent.clear()
            self.ds.flush()
        if not self.done.done():
            self.done.set_result(None)

    # -- the adapter --
    def reply(self, r: LocalReply) -> None:
        """An answer made here: for gRPC a trailers-only response with the status."""
        if self.finished:
            return
        hdrs: Headers
        if self.grpc:
            code = r.grpc_code if r.grpc_code is not None else grpc_status_for_http(r.status)
            self.status, self.grpc_status = 200, code
            hdrs = [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", str(code)),
                    ("grpc-message", grpc_message_escape(r.text)), ("x-nodemesh-reason", r.reason[:100]),
                    *r.extra]
            self.ds.core.send_headers(self.sid, hdrs, end_stream=True)
        else:
            self.status = r.status
            body = (r.text + "\n").encode()
            hdrs = [(":status", str(r.status)), ("content-type", "text/plain"), ("content-length", str(len(body))),
                    ("x-nodemesh-reason", r.reason[:100]), *r.extra]
            self.ds.core.send_headers(self.sid, hdrs)
            self.ds.core.send_data(self.sid, body)
            self.response_bytes += len(body)
            self.ds.core.end_stream(self.sid)
        self.committed = True
        self.ds.flush()
        self._finish()

    def request(self) -> Request:
        """The stream's request for the pipeline, through the one path normalization
        (pathnorm.py: routed, logged and forwarded as decided); raises BadRequest."""
        method = self.pseudo.get(":method", "")
        if method == "CONNECT":
            raise BadRequest("bad_request", "CONNECT is not proxied on HTTP/2 service ports", 405)
        limits = self.ds.snapshot.security.mesh.http
        try:
            if len(self.headers) > limits.max_headers:
                raise BadTarget("too_many_headers", f"more than {limits.max_headers} request headers", 431)
            norm = normalize_target(self.pseudo.get(":path", "/"), method, limits.escaped_slash_action, h2=True)
        except BadTarget as e:
            meshmetrics.http_edge_refused("outbound", e.status, e.reason)
            raise BadRequest(e.reason, str(e), e.status) from None
        self.session.set(path=norm.target)
        authority = self.pseudo.get(":authority", f"{self.plan.dst_ip}:{self.plan.dst_port}")
        headers = [(k, v) for k, v in self.headers if k != "host"] + [("host", authority)]
        return Request(method, norm.path, norm.query, tuple(headers))

    def tick_idle(self, elapsed: float, limit: float) -> None:
        """One tick of the connection's timer: a stream that moved nothing either way
        for streamIdleTimeoutSeconds is ended (408 if no response started, else reset)."""
        moved = self.request_bytes + self.response_bytes + self.req_ended + self.committed
        if moved != self._moved:
            self._moved, self._idle_for = moved, 0.0
            return
        self._idle_for += elapsed
        if self._idle_for < limit or self.finished:
            return
        meshmetrics.http_edge_refused("outbound", 408, STREAM_IDLE_TIMEOUT)
        why = f"no byte moved for {limit:g}s (MeshConfig spec.http.streamIdleTimeoutSeconds)"
        if not self.committed:
            self.answer(StreamIdleTimeout(why))
        else:
            self.session.fail(STREAM_IDLE_TIMEOUT, why)
            self.ds.core.reset(self.sid, h2.errors.ErrorCodes.CANCEL)
            self.ds.flush()
            self._finish()
        if self.task is not None:
            self.task.cancel()

    async def serve_stream(self) -> None:
        self.task = asyncio.current_task()
        try:
            try:
                req = self.request()
            except LocalReply as r:
                self.answer(r)
            else:
                await self.serve(self.rt.proxy.snapshot or self.ds.snapshot, req)
        except Exception as e:  # a bug must not leave the client hanging
            log.exception("h2 L7 request failed unexpectedly")
            self.answer(InternalError(repr(e)))
        finally:
            if self.cur is not None and not self.finished:
                self.cur.abandon()
            self._finish()
            self.session.set(status=self.status, attempts=self.attempts, request_bytes=self.request_bytes,
                             response_bytes=self.response_bytes)
            if self.grpc_status is not None:
                self.session.set(grpc_status=self.grpc_status)
            self.ds.conn_session.set(**self.upstream_fields())
            self.session.finish()
            self.ds.call_done(self.sid)
            self.ds.flush()

    def gone(self) -> bool:
        return self.finished

    def can_retry(self, response: Any) -> bool:
        t: Try | None = response
        committed = t is not None and t.decided.done() and t.decided.result() == "commit"
        return not committed and (not self.overflow or not self.sent_any)

    def upstream_headers(self, req: Request, deadline: Deadline) -> Headers:
        out = [(k, v) for k, v in strip_connection_headers(list(req.headers))
               if k not in ("host", MESH_DEADLINE_HEADER, GRPC_TIMEOUT_HEADER)]
        rem = deadline.remaining()
        if rem is not None:
            # Pass the deadline on, reduced by what this hop already spent.
            out.append((MESH_DEADLINE_HEADER, str(max(0, int(rem * 1000)))))
            if self.grpc or any(k == GRPC_TIMEOUT_HEADER for k, _ in req.headers):
                out.append((GRPC_TIMEOUT_HEADER, format_grpc_timeout(rem)))
        scheme = self.pseudo.get(":scheme", "http")
        return [(":method", req.method), (":scheme", scheme), (":path", req.target), (":authority", req.authority),
                *out]

    def drop_try(self, response: Any) -> None:
        t: Try | None = response if response is not None else self.cur
        if t is not None:
            t.abandon()
        self.cur = None
        self._live = False

    async def try_once(self, snapshot: Snapshot, ep: Endpoint, req: Request, headers: Headers,
                       release: Callable[[], None]) -> TryResult:
        try:
            return await self._try_stream(snapshot, ep, headers)
        finally:
            release()  # the stream is open and decided (or failed): the connection is shared

    async def _try_stream(self, snapshot: Snapshot, ep: Endpoint, fwd: Headers) -> TryResult:
        conn = await self.rt.h2_upstreams.get(snapshot, ep, self.source_id, self.session)
        if self.finished:
            return TryResult(Outcome(reset=True), None, "client gone")
        t = Try(self, conn, ep)
        data = self.unsent if not self.sent_any else [bytes(self.body)]
        self.unsent = []
        nothing_more = self.req_ended and not any(data) and self.request_trailers is None
        try:
            t.sid = conn.open_stream(fwd, t, end_stream=nothing_more)
        except h2.exceptions.H2Error as e:  # h2 refused the stream (connection closing, stream limit)
            return TryResult(Outcome(reset=True, refused=True), None,
                             f"cannot open a stream to {ep.ip}:{ep.port}: {e}")
        self.cur = t
        self._live = True
        for chunk in data:
            if chunk:
                conn.core.send_data(t.sid, chunk)
                self.sent_any = True
        if self.req_ended and not nothing_more:
            conn.core.end_stream(t.sid, self.request_trailers)
        conn.flush()
        self.req_progress()
        what = await asyncio.shield(t.decided)
        if what == "reset":
            self.cur = None
            self._live = False
            return TryResult(Outcome(reset=True, refused=t.refused), None, t.error)
        status = int(header_value(t.head, ":status") or 0)
        gs = grpc_status_of(t.trailers) if t.trailers is not None else grpc_status_of(t.head)
        return TryResult(Outcome(status=status, grpc_status=gs), t)

    def mirror(self, snapshot: Snapshot, cluster: str, req: Request) -> None:
        self.rt.proxy.spawn(h2mirror.mirror(self, snapshot, cluster, req))

    async def relay(self, response: Any, entry: RouteEntry, deadline: Deadline) -> None:
        """Send the try's response to the client: head (filtered), then data and trailers."""
        t: Try = response
        head = [(k, v) for k, v in strip_connection_headers(t.head)]
        pseudo = [(k, v) for k, v in head if k.startswith(":")]
        regular = route_select.modify_headers([(k, v) for k, v in head if not k.startswith(":")],
                                              entry.response_headers)
        self.status = int(header_value(t.head, ":status") or 0)
        self.committed = True
        what = t.decided.result()
        if what == "final" and not t.early:
            # Complete already (trailers-only, or head + trailers with no data): send it as it came.
            if t.trailers is None:
                self.grpc_status = grpc_status_of(t.head)
                self.ds.core.send_headers(self.sid, pseudo + regular, end_stream=True)
            else:
                self.ds.core.send_headers(self.sid, pseudo + regular)
                self.forward_end(t, t.trailers)
            self.ds.flush()
            self._finish()
            return
        self.ds.core.send_headers(self.sid, pseudo + regular)
        early, t.early = t.early, []
        t.forwarding = True
        for data, n in early:
            self.forward_data(t, data, n)
        if t.closed and not self.finished:  # it ended while it waited here
            if t.error:
                self.forward_reset(t, t.error)
            else:
                self.forward_end(t, t.trailers)
        self.ds.flush()
        rem = deadline.remaining()
        if rem is not None and not self.finished:
            self._deadline_timer = asyncio.get_running_loop().call_later(max(0.0, rem), self._deadline_mid, t)
        await self.done

    def _deadline_mid(self, t: Try) -> None:
        """The deadline passed while the response streamed: stop it with DEADLINE_EXCEEDED."""
        if self.finished:
            return
        self.session.fail("deadline_exceeded", "deadline passed while the response was streaming")
        t.forwarding = False
        t.abandon()
        if self.grpc:
            self.grpc_status = GRPC_DEADLINE_EXCEEDED
            self.ds.core.end_stream(self.sid, [("grpc-status", str(GRPC_DEADLINE_EXCEEDED)),
                                               ("grpc-message", "deadline exceeded")])
        else:
            self.ds.core.reset(self.sid, h2.errors.ErrorCodes.CANCEL)
        self.ds.flush()
        self._finish()
