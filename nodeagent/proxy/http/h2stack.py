"""The outbound L7 stack for HTTP/2 (h2c) and gRPC. Terminates the client's
h2c connection (server role, h2core), and for every stream composes the same
layers as the HTTP/1.1 stack (stack.py), in one place:

  route (router: HTTPRoute / GRPCRoute) -> redirect/direct/fault -> deadline
  (route timeout, grpc-timeout) -> cluster (weighted) -> breaker ->
  [endpoint (balance, outlier) -> try (per-try timeout)] × retries (policy
  incl. gRPC status codes, budget, backoff) -> response header filter

Each try is a stream on an h2c connection to the endpoint carried by one HBONE
CONNECT stream (or a same-node TCP connection); those connections are pooled
per (source identity, endpoint), many requests multiplexed on one.

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
import functools
import logging
import time
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import h2.errors
import h2.events
import h2.exceptions

from nodeagent.meshview.l7snapshot import RouteEntry, RouteTable, WeightedCluster
from nodeagent.meshview.snapshot import Endpoint, ServicePort, Snapshot
from nodeagent.observe import meshmetrics, tracing
from nodemesh.routespec import RouteMatch

from .. import authz_l7
from ..errors import ConnectTimeout, ProxyError
from ..inbound import connect_local, resolve_inbound
from ..plan import OutboundPlan, is_same_node
from ..pool import PoolKey
from ..relay import End, Session
from . import fault as faults
from . import h2mirror, route_select
from .destination import Destination
from .h2core import (
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
from .pathnorm import BadTarget, normalize_target
from .retry import Outcome, admit_retry, retryable
from .stack import (
    FAILURE_PENALTY_S,
    MAX_BUFFERED_BODY,
    L7Runtime,
    LocalRefusal,
    _hash_key,
    _QuietSession,
    runtime_of,
)
from .timeout import GRPC_TIMEOUT_HEADER, MESH_DEADLINE_HEADER, Deadline, format_grpc_timeout, incoming_budget

if TYPE_CHECKING:
    from ..outbound import OutboundConnection
    from ..proxy import NodeProxy

log = logging.getLogger(__name__)

_DEFAULT_MATCH = RouteMatch()
UPSTREAM_IDLE_TIMEOUT_S = 60.0
MAX_STREAMS_PER_UPSTREAM = 100  # a busier endpoint gets a second pooled connection


# ---------------------------------------------------------------- entry points
def start_h2(proxy: NodeProxy, end: OutboundConnection, source_key: str, source_id: str, plan: OutboundPlan,
             tcp_fallback: Callable[[], None], early: bytes = b"", sniff: bool = True) -> None:
    """Take the client connection over for h2c. `early`: bytes already read
    (the sniffed preface); `sniff`: fall back to L4 if the client does not open
    with the HTTP/2 preface (a port declared http2/grpc used by an HTTP/1 client)."""
    assert end.transport is not None
    ds = H2Downstream(runtime_of(proxy), end, source_key, source_id, plan, tcp_fallback, sniff)
    end.transport.set_protocol(ds)
    ds.begin(early)


def take_over_from_h1(h1: Any, sniffed: bytes) -> None:
    """`auto` port whose first bytes were the HTTP/2 preface (stack.Downstream saw them)."""
    h1.conn_session.set(protocol="http2", detect="http2")
    ds = H2Downstream(h1.rt, h1.end, h1.source_key, h1.source_id, h1.plan, h1.tcp_fallback, False)
    h1.transport.set_protocol(ds)
    ds.begin(sniffed)


# ---------------------------------------------------------------- client side (server role)
class H2Downstream(asyncio.Protocol):
    """The client's h2c connection: one H2Call per stream."""

    def __init__(self, rt: L7Runtime, end: OutboundConnection, source_key: str, source_id: str,
                 plan: OutboundPlan, tcp_fallback: Callable[[], None], sniff: bool) -> None:
        self.rt = rt
        self.end = end
        self.transport = cast(asyncio.Transport, end.transport)
        self.conn_session = end.session
        self.source_key = source_key
        self.source_id = source_id
        self.plan = plan
        self.tcp_fallback = tcp_fallback
        self.core = H2Core(client=False)
        self.calls: dict[int, H2Call] = {}
        self.write_paused = False
        self.closed = False
        self.requests = 0
        self._sniffing = sniff
        self._sniffed = b""
        self._started = False

    def begin(self, early: bytes) -> None:
        pending, self.end._early = self.end._early, []
        self.end._reading = True  # so the relay end's deferred read re-sync keeps us reading
        self.conn_session.set(protocol="http2")
        self.transport.resume_reading()
        for chunk in [early, *pending]:
            if chunk:
                self.data_received(chunk)

    def _to_tcp(self) -> None:
        """Not HTTP/2 after all: hand the connection back to the L4 relay."""
        self._sniffing = False
        self.closed = True
        self.conn_session.set(protocol="tcp", detect="not_http2")
        self.transport.pause_reading()
        self.end._reading = False
        if self._sniffed:
            self.end._early.append(self._sniffed)
            self.end.rx += len(self._sniffed)
        self.transport.set_protocol(self.end)
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
            hdrs = [(str(k), str(v)) for k, v in ev.headers]
            new = H2Call(self, ev.stream_id, hdrs)
            self.calls[ev.stream_id] = new
            self.requests += 1
            self.rt.counters.requests += 1
            self.rt.proxy.spawn(new.serve())
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

    def eof_received(self) -> bool:
        return True  # h2: the client's half-close ends nothing we still owe it

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed and not self._started:
            return  # handed over to the L4 relay
        self.closed = True
        for call in list(self.calls.values()):
            call.on_client_reset("client connection closed")
        self.conn_session.set(requests=self.requests)
        self.conn_session.end_closed()

    def pause_writing(self) -> None:
        self.write_paused = True

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


# ---------------------------------------------------------------- endpoint side (client role)
class StreamHandler:
    """What an upstream stream reports to (one try of) a call."""

    def on_head(self, headers: Headers, ended: bool) -> None: ...
    def on_data(self, data: bytes, flow_controlled_length: int) -> None: ...
    def on_trailers(self, headers: Headers) -> None: ...
    def on_end(self) -> None: ...
    def on_reset(self, why: str) -> None: ...
    def on_drained(self) -> None: ...


class H2Upstream:
    """An h2c connection to one endpoint, over a relay End (an HBONE CONNECT
    stream or a same-node TCP connection). It is the wire's partner End."""

    def __init__(self, key: tuple[str, ...], label: str) -> None:
        self.key = key
        self.label = label
        self.core = H2Core(client=True)
        self.wire: End | None = None
        self.streams: dict[int, StreamHandler] = {}
        self.rx = 0
        self.tx = 0
        self.write_paused = False
        self.dead = False
        self.draining = False  # GOAWAY received: no new streams
        self.last_used = time.monotonic()
        self.on_idle: Callable[[H2Upstream], None] | None = None
        self.on_dead: Callable[[H2Upstream], None] | None = None

    def start(self, wire: End) -> None:
        self.wire = wire
        self.core.initiate()
        self.flush()

    @property
    def usable(self) -> bool:
        return not self.dead and not self.draining and not self.core.closed and (
            len(self.streams) < min(MAX_STREAMS_PER_UPSTREAM, self.core.peer_max_concurrent_streams()))

    def flush(self) -> None:
        data = self.core.data_to_send()
        if data and self.wire is not None and not self.dead:
            self.tx += len(data)
            self.wire.send(data)

    def open_stream(self, headers: Headers, handler: StreamHandler, end_stream: bool) -> int:
        sid = self.core.new_request(headers, end_stream)
        self.streams[sid] = handler
        self.last_used = time.monotonic()
        self.flush()
        return sid

    def drained(self, sid: int) -> bool:
        return not self.write_paused and self.core.queued(sid) == 0

    def release(self, sid: int, reset: bool) -> None:
        """The try is over with this stream (finished, or abandoned: reset it)."""
        if self.streams.pop(sid, None) is None:
            return
        st = self.core.h2.streams.get(sid)
        # A stream the endpoint finished while our request side was still open must be
        # reset too, or h2 would count it against the concurrency limit forever.
        if (reset or (st is not None and not st.closed)) and not self.dead:
            self.core.reset(sid, h2.errors.ErrorCodes.CANCEL)
            self.flush()
        self.core.forget(sid)
        self.last_used = time.monotonic()
        if not self.streams and self.on_idle is not None:
            self.on_idle(self)

    def close(self) -> None:
        if self.dead:
            return
        self.core.close()
        self.flush()
        self._die("closed")
        if self.wire is not None:
            self.wire.send_eof()

    # -- End: the wire calls these --
    def send(self, data: bytes) -> None:
        if self.dead:
            return
        self.rx += len(data)
        got = self.core.receive_data(data)
        if got.error:
            self._die(got.error)
            if self.wire is not None:
                self.wire.abort()
            return
        for ev in got.events:
            self._dispatch(ev)
        for sid in got.drained:
            hd = self.streams.get(sid)
            if hd is not None:
                hd.on_drained()
        self.flush()

    def _dispatch(self, ev: h2.events.Event) -> None:
        sid = getattr(ev, "stream_id", 0)
        hd = self.streams.get(sid) if sid else None
        if isinstance(ev, h2.events.ResponseReceived):
            if hd is not None:
                hd.on_head([(str(k), str(v)) for k, v in ev.headers], ev.stream_ended is not None)
        elif isinstance(ev, h2.events.DataReceived):
            if hd is not None:
                hd.on_data(bytes(ev.data), ev.flow_controlled_length)
            else:
                self.core.acknowledge(sid, ev.flow_controlled_length)
        elif isinstance(ev, h2.events.TrailersReceived):
            if hd is not None:
                hd.on_trailers([(str(k), str(v)) for k, v in ev.headers])
        elif isinstance(ev, h2.events.StreamEnded):
            if hd is not None and not isinstance(ev, h2.events.TrailersReceived):
                hd.on_end()
        elif isinstance(ev, h2.events.StreamReset):
            if hd is not None:
                self.streams.pop(sid, None)
                hd.on_reset(f"endpoint reset the stream (code {ev.error_code})")
        elif isinstance(ev, h2.events.ConnectionTerminated):
            # Graceful GOAWAY: streams up to last_stream_id still complete.
            self.draining = True
            last = ev.last_stream_id or 0
            for s, h in list(self.streams.items()):
                if s > last or ev.error_code:
                    self.streams.pop(s, None)
                    h.on_reset(f"endpoint sent GOAWAY (code {ev.error_code})")
            if self.on_dead is not None:
                self.on_dead(self)

    def send_eof(self) -> None:
        self._die("endpoint closed the connection")

    def abort(self) -> None:
        self._die("connection to the endpoint reset")

    def pause_reading(self) -> None:  # the wire's write side is full: hold acknowledgements
        self.write_paused = True

    def resume_reading(self) -> None:
        self.write_paused = False
        for hd in list(self.streams.values()):
            hd.on_drained()

    def _die(self, why: str) -> None:
        if self.dead:
            return
        self.dead = True
        streams, self.streams = self.streams, {}
        for hd in streams.values():
            hd.on_reset(why)
        if self.on_dead is not None:
            self.on_dead(self)

    def __repr__(self) -> str:
        return f"<H2Upstream {self.label} streams={len(self.streams)}{' dead' if self.dead else ''}>"


class H2UpstreamPool:
    """Pooled h2c connections per (source identity, endpoint). `per_request`:
    one connection (one CONNECT stream) per request instead (for comparison)."""

    def __init__(self, rt: L7Runtime, per_request: bool = False,
                 idle_timeout_s: float = UPSTREAM_IDLE_TIMEOUT_S) -> None:
        self.rt = rt
        self.per_request = per_request
        self.idle_timeout_s = idle_timeout_s
        self.conns: dict[tuple[str, ...], list[H2Upstream]] = {}
        self._connecting: dict[tuple[str, ...], asyncio.Task[H2Upstream]] = {}
        self.opened = 0

    async def get(self, call: H2Call, snapshot: Snapshot, ep: Endpoint) -> H2Upstream:
        key = (call.ds.source_id, ep.ip, str(ep.port), ep.identity)
        if self.per_request:
            return await self._connect(key, call, snapshot, ep)
        while True:
            for c in self.conns.get(key, ()):
                if c.usable:
                    return c
            task = self._connecting.get(key)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._connect(key, call, snapshot, ep))
                self._connecting[key] = task
                task.add_done_callback(functools.partial(self._connect_done, key))
            conn = await asyncio.shield(task)
            if conn.usable:
                return conn

    async def _connect(self, key: tuple[str, ...], call: H2Call, snapshot: Snapshot, ep: Endpoint) -> H2Upstream:
        proxy = self.rt.proxy
        settings = proxy.settings
        # The wire's own log line is not wanted: every request has one.
        quiet = _QuietSession(proxy.access_log, "outbound")
        conn = H2Upstream(key, f"{ep.ip}:{ep.port}")
        if is_same_node(ep, settings.node_name):
            target = resolve_inbound(snapshot, ep.ip, ep.port, ep.identity)
            # The receiving workload's policy applies to same-node callers too, per request when
            # it has HTTP rules (the guard holds what it says before attach(): start() writes first).
            # The destination side of this hop, as on another node: its own inbound
            # session, so the guard's per-request decisions (policy and rule) are logged.
            inner = proxy.new_session("inbound", src=call.session.fields.get("src", ""),
                                      source_principal=call.ds.source_id, source_workload=call.ds.source_key,
                                      dst_addr=f"{ep.ip}:{ep.port}", dst_workload=target.workload.key,
                                      dst_identity=target.identity, via="same-node", tls=False)
            try:
                l7 = authz_l7.admit(snapshot, target.workload, ep.port, call.ds.source_id,
                                    str(call.session.fields.get("src", "")).rsplit(":", 1)[0], inner)
                up = await connect_local(target, inner, settings.mark, settings.connect_timeout_s)
            except ProxyError as e:
                inner.fail(e)
                inner.finish()
                raise
            wire = authz_l7.wrap(l7, up, inner)
            conn.start(wire)
            wire.attach(conn)
        else:
            pkey = PoolKey(call.ds.source_id, (ep.node_address, ep.hbone_port), ep.identity)
            try:
                stream, answered, _c = await asyncio.wait_for(
                    proxy.pool.open_stream(pkey, ep.ip, ep.port, quiet), settings.connect_timeout_s)
            except TimeoutError:
                raise ConnectTimeout(f"HBONE connect to {ep.node_address}:{ep.hbone_port} timed out",
                                     hint=f"is port {ep.hbone_port} open between nodes?") from None
            try:
                await asyncio.wait_for(asyncio.shield(answered), settings.connect_timeout_s)
            except TimeoutError:
                _c.cancel_tunnel(stream)
                raise ConnectTimeout(f"no answer to CONNECT {ep.ip}:{ep.port} from {ep.node_address}",
                                     hint="is the destination node's proxy overloaded?") from None
            except ProxyError:
                stream.on_closed()
                raise
            # Our preface first, then what the endpoint already sent: its SETTINGS often
            # rides right behind the CONNECT's 200 (losing it leaves us on default windows).
            conn.start(stream)
            stream.attach(conn)
        self.opened += 1
        conn.on_dead = self._forget
        conn.on_idle = self._idle
        if not self.per_request:
            self.conns.setdefault(key, []).append(conn)
        return conn

    def _connect_done(self, key: tuple[str, ...], _task: object) -> None:
        self._connecting.pop(key, None)

    def _forget(self, conn: H2Upstream) -> None:
        lst = self.conns.get(conn.key)
        if lst and conn in lst:
            lst.remove(conn)
            if not lst:
                self.conns.pop(conn.key, None)

    def _idle(self, conn: H2Upstream) -> None:
        if self.per_request or conn.draining:
            conn.close()
            return
        asyncio.get_running_loop().call_later(self.idle_timeout_s, self._reap, conn)

    def _reap(self, conn: H2Upstream) -> None:
        if not conn.streams and time.monotonic() - conn.last_used >= self.idle_timeout_s - 0.01:
            conn.close()

    def close(self) -> None:
        for lst in list(self.conns.values()):
            for c in list(lst):
                c.close()
        self.conns.clear()

    def __repr__(self) -> str:
        return f"<H2UpstreamPool {sum(len(v) for v in self.conns.values())} conns opened={self.opened}>"


_POOLS: weakref.WeakKeyDictionary[L7Runtime, H2UpstreamPool] = weakref.WeakKeyDictionary()


def pool_of(rt: L7Runtime) -> H2UpstreamPool:
    p = _POOLS.get(rt)
    if p is None:
        p = _POOLS[rt] = H2UpstreamPool(rt)
    return p


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
class H2Call:
    """One HTTP/2 request (stream) through the stack."""

    def __init__(self, ds: H2Downstream, sid: int, headers: Headers) -> None:
        self.ds = ds
        self.rt = ds.rt
        self.sid = sid
        self.pseudo = {k: v for k, v in headers if k.startswith(":")}
        self.headers = [(k, v) for k, v in headers if not k.startswith(":")]
        self.grpc = is_grpc(self.headers)
        self.t0 = self.rt.clock()
        f = ds.conn_session.fields
        self.session: Session = ds.rt.proxy.new_session(
            "outbound", protocol="grpc" if self.grpc else "http2", src=f.get("src", ""),
            source_workload=ds.source_key, source_principal=ds.source_id, dst_addr=f.get("dst_addr", ""),
            dst_service=ds.plan.service, method=self.pseudo.get(":method", ""), path=self.pseudo.get(":path", ""))
        self.status = 0
        self.grpc_status: int | None = None
        self.attempts = 0
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

    # -- local replies --
    def reply_local(self, status: int, text: str, extra: Headers | None = None,
                    grpc_code: int | None = None) -> None:
        """An answer made here: for gRPC a trailers-only response with the status."""
        if self.finished:
            return
        reason, _, detail = text.partition(":")
        self.session.fail(reason.strip(), detail.strip() or text)
        hdrs: Headers
        if self.grpc:
            code = grpc_code if grpc_code is not None else grpc_status_for_http(status)
            self.status, self.grpc_status = 200, code
            hdrs = [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", str(code)),
                    ("grpc-message", grpc_message_escape(text)), ("x-nodemesh-reason", reason[:100]),
                    *(extra or [])]
            self.ds.core.send_headers(self.sid, hdrs, end_stream=True)
        else:
            self.status = status
            body = (text + "\n").encode()
            hdrs = [(":status", str(status)), ("content-type", "text/plain"), ("content-length", str(len(body))),
                    ("x-nodemesh-reason", reason[:100]), *(extra or [])]
            self.ds.core.send_headers(self.sid, hdrs)
            self.ds.core.send_data(self.sid, body)
            self.response_bytes += len(body)
            self.ds.core.end_stream(self.sid)
        self.committed = True
        self.ds.flush()
        self._finish()

    def _deadline_exceeded(self) -> None:
        self.reply_local(504, "deadline_exceeded: the call's deadline passed (route timeout or the caller's "
                              "grpc-timeout / x-nodemesh-deadline-ms)", grpc_code=GRPC_DEADLINE_EXCEEDED)

    # -- the stack --
    async def serve(self) -> None:
        try:
            await self.run()
        except Exception as e:  # a bug must not leave the client hanging
            log.exception("h2 L7 request failed unexpectedly")
            self.reply_local(500, f"internal_error: {e!r}")
        finally:
            if self.cur is not None and not self.finished:
                self.cur.abandon()
            self._finish()
            self.session.set(status=self.status, attempts=self.attempts, request_bytes=self.request_bytes,
                             response_bytes=self.response_bytes)
            if self.grpc_status is not None:
                self.session.set(grpc_status=self.grpc_status)
            self.ds.conn_session.set(**{k: v for k, v in self.session.fields.items()
                                        if k in ("endpoint", "dst_workload", "dst_identity", "via", "upstream_node")})
            self.session.finish()
            self.ds.call_done(self.sid)
            self.ds.flush()

    async def run(self) -> None:
        rt, ds = self.rt, self.ds
        snapshot = rt.proxy.snapshot
        assert snapshot is not None
        tel = getattr(rt.proxy, "telemetry", None)
        if tel is not None:
            # Continue the caller's W3C / B3 trace, as the HTTP/1.1 stack does: this
            # hop's span is its child and the request goes on with it as parent.
            self.headers = tracing.replace_trace_headers(self.headers, tel.request_headers(self.session, self.headers))
        hit = snapshot.by_vip.get((ds.plan.dst_ip, ds.plan.dst_port))
        if hit is None:
            return self.reply_local(503, f"no_route: {ds.plan.service} is no longer in the mesh config")
        sp = hit[1]
        method = self.pseudo.get(":method", "")
        if method == "CONNECT":
            return self.reply_local(405, "bad_request: CONNECT is not proxied on HTTP/2 service ports")
        limits = snapshot.security.mesh.http
        try:  # the one path normalization (pathnorm.py): routed, logged and forwarded as decided
            if len(self.headers) > limits.max_headers:
                raise BadTarget("too_many_headers", f"more than {limits.max_headers} request headers", 431)
            norm = normalize_target(self.pseudo.get(":path", "/"), method, limits.escaped_slash_action, h2=True)
        except BadTarget as e:
            meshmetrics.http_edge_refused("outbound", e.status, e.reason)
            return self.reply_local(e.status, f"{e.reason}: {e}")
        self.session.set(path=norm.target)
        authority = self.pseudo.get(":authority", f"{ds.plan.dst_ip}:{ds.plan.dst_port}")
        table = sp.routes or RouteTable(sp.cluster, (RouteEntry("default", _DEFAULT_MATCH,
                                                                  (WeightedCluster(sp.cluster),)),))
        view_headers = [*self.headers, ("host", authority)]
        view = route_select.RequestView(method, norm.target, tuple(view_headers))
        entry = route_select.select_route(table, view)
        if entry is None:
            return self.reply_local(404, f"no_route: no route of {ds.plan.service} matches {method} {view.path} "
                                         "(check the HTTPRoute / GRPCRoute matches)")
        self.session.set(route=entry.name)
        if entry.redirect is not None:
            loc = route_select.redirect_location(entry.redirect, entry.match, view, authority)
            return self.reply_local(entry.redirect.status_code, f"redirect: {loc}", extra=[("location", loc)])
        if entry.direct_status:
            return self.reply_local(entry.direct_status, f"no_backend: route {entry.name} has no usable backendRefs")
        deadline = Deadline.start(entry.timeout_s or None, incoming_budget(dict(self.headers)), clock=rt.clock)
        if deadline.expired():
            return self._deadline_exceeded()
        fd = faults.decide(entry.fault, rt.rng)
        if fd.delay_s:
            await asyncio.sleep(deadline.bound(fd.delay_s) or fd.delay_s)
            if deadline.expired():
                return self._deadline_exceeded()
        if fd.abort_status or fd.abort_grpc_status >= 0:
            self.session.set(fault="abort")
            code = fd.abort_grpc_status if fd.abort_grpc_status >= 0 else None
            return self.reply_local(fd.abort_status or 200, "fault_injected: aborted by the route's Fault filter",
                                    grpc_code=code)
        headers = route_select.modify_headers(self.headers, entry.request_headers)
        target = route_select.rewrite_path(entry, norm.path) + norm.query
        if entry.host_rewrite:
            authority = entry.host_rewrite
        if entry.mirrors:
            # Fire and forget: each copy waits for the request body on its own task.
            shadows = h2mirror.start_mirrors(self, snapshot, entry.mirrors, method, target, authority, headers)
            if shadows:
                self.session.set(mirror=",".join(shadows))
        got = rt.admit_backend(snapshot, entry)
        if isinstance(got, LocalRefusal):
            self.session.set(cluster=got.cluster)
            return self.reply_local(got.status, got.message, extra=list(got.extra) or None)
        cluster, bsp, dest = got
        self.session.set(cluster=cluster)
        try:
            await self._attempts(snapshot, entry, dest, bsp, method, target, authority, headers, deadline)
        finally:
            dest.breaker.release("requests")
        return None

    def _upstream_headers(self, method: str, target: str, authority: str, headers: Headers,
                          deadline: Deadline) -> Headers:
        out = [(k, v) for k, v in strip_connection_headers(headers)
               if k not in (MESH_DEADLINE_HEADER, GRPC_TIMEOUT_HEADER)]
        rem = deadline.remaining()
        if rem is not None:
            # Pass the deadline on, reduced by what this hop already spent.
            out.append((MESH_DEADLINE_HEADER, str(max(0, int(rem * 1000)))))
            if self.grpc or any(k == GRPC_TIMEOUT_HEADER for k, _ in headers):
                out.append((GRPC_TIMEOUT_HEADER, format_grpc_timeout(rem)))
        scheme = self.pseudo.get(":scheme", "http")
        return [(":method", method), (":scheme", scheme), (":path", target), (":authority", authority), *out]

    async def _attempts(self, snapshot: Snapshot, entry: RouteEntry, dest: Destination, sp: ServicePort,
                        method: str, target: str, authority: str, headers: Headers, deadline: Deadline) -> None:
        rt = self.rt
        dest.budget.record_request()
        policy = entry.retry
        max_attempts = policy.attempts if policy else 1
        tried: set[tuple[str, int]] = set()
        hash_key = _hash_key(dest, headers, str(self.session.fields.get("src", "")))
        last_err = ""
        while True:
            if self.finished:
                return
            self.attempts += 1
            cands = dest.candidates(sp.endpoints, rt.proxy.settings.node_name, "", tried)
            if not cands:
                return self.reply_local(503, f"no_healthy_endpoint: cluster {sp.cluster} has no healthy endpoint "
                                             "(are its workloads registered and passing health checks?)")
            ep = dest.pick(cands, hash_key)
            tried.add((ep.ip, ep.port))
            self.session.set(endpoint=f"{ep.ip}:{ep.port}", dst_workload=ep.workload, dst_identity=ep.identity,
                             via="same-node" if is_same_node(ep, rt.proxy.settings.node_name) else "hbone")
            per_try = deadline.bound(entry.per_try_timeout_s)
            by_deadline = per_try is not None and (not entry.per_try_timeout_s or per_try < entry.per_try_timeout_s)
            fwd = self._upstream_headers(method, target, authority, headers, deadline)
            t0 = rt.clock()
            dest.ewma.start(ep)
            outcome, t, err = await self._try(snapshot, ep, fwd, per_try, dest)
            dest.ewma.finish(ep)
            elapsed = rt.clock() - t0
            why = meshmetrics.outcome_reason(outcome.status, outcome.grpc_status, connect_failure=outcome.connect_failure,
                                         reset=outcome.reset, timeout=outcome.timeout)
            if dest.record(ep, outcome, elapsed if not outcome.gateway_error or outcome.status else
                           max(elapsed, FAILURE_PENALTY_S), len(sp.endpoints)):
                meshmetrics.outlier_ejected(sp.cluster, why)
            last_err = err or last_err
            if self.finished:  # the client went away meanwhile
                if t is not None:
                    t.abandon()
                return
            committed = t is not None and t.decided.done() and t.decided.result() == "commit"
            replayable = not self.overflow or not self.sent_any
            more = (policy is not None and self.attempts < max_attempts and not committed and replayable
                    and retryable(policy, outcome))
            if more and policy is not None:
                wait, stopped = admit_retry(policy, self.attempts, deadline, dest.budget, dest.breaker, rt.rng)
                if stopped:
                    more = False
                    self.session.set(retry_stopped=stopped)
                    if stopped == "max_retries":
                        meshmetrics.breaker_overflow(sp.cluster, "max_retries")
                else:
                    if t is not None:
                        t.abandon()
                    self.cur = None
                    self._live = False
                    rt.counters.retries += 1
                    meshmetrics.retry(sp.cluster, why)
                    try:
                        await asyncio.sleep(wait)
                    finally:
                        dest.breaker.release("retries")
                    continue
            if "retry_stopped" in self.session.fields:
                meshmetrics.retry_stopped(sp.cluster, self.session.fields["retry_stopped"])
            if t is not None:
                return await self._relay(t, entry, deadline)
            if outcome.timeout:
                if by_deadline or deadline.expired():
                    return self._deadline_exceeded()
                return self.reply_local(504, f"upstream_timeout: no response from {ep.ip}:{ep.port} within the "
                                             "per-try timeout (timeouts.backendRequest)")
            code = 503 if outcome.connect_failure else 502
            kind = "upstream_connect_failed" if outcome.connect_failure else "upstream_reset"
            return self.reply_local(code, f"{kind}: {last_err}", grpc_code=GRPC_UNAVAILABLE)

    async def _try(self, snapshot: Snapshot, ep: Endpoint, fwd: Headers, timeout_s: float | None,
                   dest: Destination) -> tuple[Outcome, Try | None, str]:
        """One try; returns the outcome, the try when a response head arrived, and an error text."""
        over = dest.breaker.try_acquire("connections")
        if over:
            meshmetrics.breaker_overflow(dest.cluster, over)
            return Outcome(connect_failure=True), None, f"circuit breaker {over}"
        try:
            return await (asyncio.wait_for(self._try_inner(snapshot, ep, fwd), timeout_s) if timeout_s
                          else self._try_inner(snapshot, ep, fwd))
        except TimeoutError:
            if self.cur is not None:
                self.cur.abandon()
                self.cur = None
                self._live = False
            return Outcome(timeout=True), None, "timeout"
        except ProxyError as e:
            self.session.set(try_error=e.reason)
            return Outcome(connect_failure=True), None, str(e)
        finally:
            dest.breaker.release("connections")

    async def _try_inner(self, snapshot: Snapshot, ep: Endpoint, fwd: Headers) -> tuple[Outcome, Try | None, str]:
        conn = await pool_of(self.rt).get(self, snapshot, ep)
        if self.finished:
            return Outcome(reset=True), None, "client gone"
        t = Try(self, conn, ep)
        data = self.unsent if not self.sent_any else [bytes(self.body)]
        self.unsent = []
        nothing_more = self.req_ended and not any(data) and self.request_trailers is None
        try:
            t.sid = conn.open_stream(fwd, t, end_stream=nothing_more)
        except h2.exceptions.H2Error as e:  # h2 refused the stream (connection closing, stream limit)
            return Outcome(reset=True), None, f"cannot open a stream to {ep.ip}:{ep.port}: {e}"
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
            return Outcome(reset=True), None, t.error
        status = int(header_value(t.head, ":status") or 0)
        gs = grpc_status_of(t.trailers) if t.trailers is not None else grpc_status_of(t.head)
        return Outcome(status=status, grpc_status=gs), t, ""

    async def _relay(self, t: Try, entry: RouteEntry, deadline: Deadline) -> None:
        """Send the try's response to the client: head (filtered), then data and trailers."""
        head = [(k, v) for k, v in strip_connection_headers(t.head)]
        pseudo = [(k, v) for k, v in head if k.startswith(":")]
        regular = route_select.modify_headers([(k, v) for k, v in head if not k.startswith(":")], entry.response_headers)
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
