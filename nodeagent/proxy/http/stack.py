"""The outbound L7 stack: takes over a captured client connection on an HTTP
service port, reads requests through the strict edge (h1.py: httptools, no
I/O in the core, limits and one path normalization), and for each
request composes the layers in one place:

  route (router) -> redirect/direct/fault -> deadline (timeout) -> mirror
  -> cluster (weighted) -> breaker -> [endpoint (balance, outlier) -> try
  (per-try timeout)] × retries (policy, budget, backoff) -> response filters

Each request gets its own access log line. A try takes an idle keep-alive
conn to the endpoint from the runtime's pool (h1pool.py: an HBONE CONNECT
stream, or a same-node TCP connection after the authz check) or opens one;
a complete keep-alive response returns the conn to the pool.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from nodeagent.meshview.l7snapshot import RouteEntry, RouteTable, WeightedCluster
from nodeagent.meshview.snapshot import Endpoint, ServicePort, Snapshot
from nodeagent.observe import meshmetrics, tracing
from nodemesh.routespec import RouteMatch

from .. import authz_l7, detect
from ..errors import ConnectTimeout, ProxyError
from ..inbound import connect_local, resolve_inbound
from ..plan import OutboundPlan, is_same_node
from ..pool import PoolKey
from ..relay import Session
from . import fault as faults
from . import h1, route_select
from .destination import Destination
from .edge import HEAD_TIMEOUT, ConnTimer, head_timeout
from .h1 import EdgeError, Event, H2Preface, RequestHead, RequestReader, ResponseFramer
from .h1pool import UpstreamPool
from .h1upstream import ResponseHead, UpstreamConn, UpstreamExchange, UpstreamRequest, UpstreamReset
from .retry import Outcome, admit_retry, retryable
from .timeout import GRPC_TIMEOUT_HEADER, MESH_DEADLINE_HEADER, Deadline, format_grpc_timeout, incoming_budget

if TYPE_CHECKING:
    from ..outbound import OutboundConnection
    from ..proxy import NodeProxy

log = logging.getLogger(__name__)

_OUT_FLUSH_BYTES = 64 * 1024  # response bytes held before a write (_write coalesces per response)
MAX_BUFFERED_BODY = 1 << 20  # a bigger request body is refused with 413 (bodies are buffered for retries)
FAILURE_PENALTY_S = 1.0
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade",
                        "trailer", "content-length"})
_DEFAULT_MATCH = RouteMatch()
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})


def l7_protocol(snapshot: Snapshot, plan: OutboundPlan) -> str | None:
    """'http', 'http2' (http2 and grpc ports: h2stack.py) or 'auto' when the
    plan's service port is handled at L7, else None."""
    if plan.kind != "service":
        return None
    hit = snapshot.by_vip.get((plan.dst_ip, plan.dst_port))
    if hit is None:
        return None
    proto = hit[1].protocol
    if proto == "http":
        return "http"
    if proto in ("http2", "grpc"):
        return "http2"
    if proto == "auto" and not detect.skip_detection(plan.dst_port):
        return "auto"
    return None


@dataclass
class Counters:
    requests: int = 0
    retries: int = 0
    detect_timeouts: int = 0
    detected_tcp: int = 0


@dataclass(frozen=True)
class LocalRefusal:
    """A request the proxy answers itself instead of sending it to a backend."""

    cluster: str
    status: int
    message: str
    extra: tuple[tuple[str, str], ...] = ()


class L7Runtime:
    """Per proxy (per worker): destinations by cluster, counters, clock and RNG."""

    def __init__(self, proxy: NodeProxy, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, detect_timeout_s: float = detect.DEFAULT_TIMEOUT_S) -> None:
        self.proxy = proxy
        self.clock = clock
        self.rng = rng or random.Random()
        self.detect_timeout_s = detect_timeout_s
        self.counters = Counters()
        self._dests: dict[str, Destination] = {}
        self._index_for: Snapshot | None = None
        self._by_cluster: dict[str, ServicePort] = {}
        self.upstreams = UpstreamPool(clock=clock)  # keep-alive upstream conns (h1pool.py)

    def port_of_cluster(self, snapshot: Snapshot, cluster: str) -> ServicePort | None:
        if self._index_for is not snapshot:
            self._by_cluster = {sub.cluster: sub for s in snapshot.services for sp in s.ports
                                for sub in (sp, *sp.subsets) if sub.cluster}
            self._index_for = snapshot
        return self._by_cluster.get(cluster)

    def admit_backend(self, snapshot: Snapshot, entry: Any) -> tuple[str, ServicePort, Destination] | LocalRefusal:
        """The weighted backend for a request and one "requests" slot of its breaker
        (the caller releases it), or why not; shared by the HTTP/1.1 and HTTP/2 stacks."""
        cluster = route_select.choose_cluster(entry, self.rng)
        bsp = self.port_of_cluster(snapshot, cluster)
        if bsp is None:
            return LocalRefusal(cluster, 500, f"backend_not_found: cluster {cluster} is not known (does the "
                                              "backendRef name an existing Service and port?)")
        dest = self.destination(bsp)
        over = dest.breaker.try_acquire("requests")
        if over:
            meshmetrics.breaker_overflow(cluster, over)
            return LocalRefusal(cluster, 503, f"overflow: circuit breaker {over} reached for {cluster}",
                                (("x-nodemesh-overloaded", "true"),))
        return cluster, bsp, dest

    def destination(self, sp: ServicePort) -> Destination:
        d = self._dests.get(sp.cluster)
        if d is None or d.policy != (sp.policy or d.policy):
            d = self._dests[sp.cluster] = Destination(sp.cluster, sp.policy, clock=self.clock, rng=self.rng)
        return d


_RUNTIMES: weakref.WeakKeyDictionary[Any, L7Runtime] = weakref.WeakKeyDictionary()


def runtime_of(proxy: NodeProxy) -> L7Runtime:
    rt = _RUNTIMES.get(proxy)
    if rt is None:
        rt = _RUNTIMES[proxy] = L7Runtime(proxy)
    return rt


def start_l7(proxy: NodeProxy, end: OutboundConnection, snapshot: Snapshot, source_key: str, source_id: str,
             plan: OutboundPlan, mode: str, tcp_fallback: Callable[[], None]) -> None:
    """Take the client connection over from the L4 relay end."""
    assert end.transport is not None
    if mode == "http2":
        from .h2stack import start_h2  # h2c and gRPC (docs/interop.md)

        return start_h2(proxy, end, source_key, source_id, plan, tcp_fallback)
    h = Downstream(runtime_of(proxy), end, snapshot, source_key, source_id, plan, mode, tcp_fallback)
    end.transport.set_protocol(h)
    h.begin()


class Downstream(asyncio.Protocol):
    """The client's HTTP/1.1 connection (server role), one request at a time.
    Requests are read by the strict edge (h1.py: httptools, limits, one path
    normalization); reading pauses while a request is served, so pipelined bytes
    wait in the kernel, not here."""

    def __init__(self, rt: L7Runtime, end: OutboundConnection, snapshot: Snapshot, source_key: str,
                 source_id: str, plan: OutboundPlan, mode: str, tcp_fallback: Callable[[], None]) -> None:
        self.rt = rt
        self.end = end
        self.transport = cast(asyncio.Transport, end.transport)
        self.conn_session = end.session
        self.source_key = source_key
        self.source_id = source_id
        self.plan = plan
        self.mode = mode
        self.tcp_fallback = tcp_fallback
        self.limits = snapshot.security.mesh.http  # read once per connection
        self.reader = RequestReader(self.limits)
        self._queue: deque[Event] = deque()  # parsed, not yet taken (pipelined requests)
        self._sniffed = b""
        self._detect_timer: asyncio.TimerHandle | None = None
        self._req: RequestHead | None = None
        self._body = bytearray()
        self._body_size = 0  # the request body's size, even past MAX_BUFFERED_BODY (istio_request_bytes)
        self.resp_body = 0  # response body bytes written for the current request (istio_response_bytes)
        self._too_big = False
        self._busy = False
        self._closed = False
        self._upstream: UpstreamExchange | None = None
        self.requests = 0
        self._out: list[bytes] = []  # response bytes not yet written (see _write)
        self._out_size = 0
        self._flush_soon = False
        self.framer = ResponseFramer()
        self._head_sent = False  # the current request's response head is written (no local reply now)
        self._close_after = False  # the response in flight is the connection's last
        self.timer = ConnTimer(self.limits, self._probe, self._expired)

    # -- start --
    def begin(self) -> None:
        early, self.end._early = self.end._early, []
        self.end._reading = True  # so the relay end's deferred read re-sync keeps us reading
        self.conn_session.set(protocol="http")
        if self.mode == "auto":
            self._detect_timer = asyncio.get_running_loop().call_later(self.rt.detect_timeout_s, self._detect_timeout)
        self.timer.start()
        self.transport.resume_reading()
        for chunk in early:
            self.data_received(chunk)

    def _detect_timeout(self) -> None:
        self.rt.counters.detect_timeouts += 1
        log.info("protocol detection timed out after %gs for %s:%s: relaying as TCP (server-first protocol? "
                 "declare the port protocol: tcp)", self.rt.detect_timeout_s, self.plan.dst_ip, self.plan.dst_port)
        self.conn_session.set(protocol="tcp", detect="timeout")
        self._to_tcp()

    def _to_tcp(self) -> None:
        self.mode = "tcp"
        self.timer.cancel()
        if self._detect_timer is not None:
            self._detect_timer.cancel()
        self.transport.pause_reading()
        self.end._reading = False
        if self._sniffed:
            self.end._early.append(self._sniffed)
            self.end.rx += len(self._sniffed)
        self.transport.set_protocol(self.end)
        self.tcp_fallback()

    # -- asyncio.Protocol --
    def data_received(self, data: bytes) -> None:
        if self.mode == "auto":
            self._sniffed += data
            kind = detect.sniff(self._sniffed)
            if kind == detect.UNKNOWN:
                return
            if self._detect_timer is not None:
                self._detect_timer.cancel()
            if kind == detect.HTTP2:
                from .h2stack import take_over_from_h1  # the HTTP/2 preface: h2c at L7

                self.timer.cancel()
                take_over_from_h1(self, self._sniffed)
                return
            if kind != detect.HTTP1:
                self.rt.counters.detected_tcp += 1
                self.conn_session.set(protocol="tcp", detect=kind)
                self._to_tcp()
                return
            self.mode = "http"
            data, self._sniffed = self._sniffed, b""
        if self._closed:
            return
        self.end.rx += len(data)
        try:
            events = self.reader.feed(data)
        except EdgeError as e:
            self._refuse(e)
            return
        if events:
            self._queue.extend(events)
            self._process()
            if self._busy and len(self._queue) > 1 and not self._closed:
                self._reading(False)  # bytes beyond the request in flight: not read until it is answered

    def eof_received(self) -> bool:
        if not self._busy:
            # The client is done sending: whatever it began and did not finish is dropped.
            self._flush_out()
            self.transport.close()
        else:
            self._close_after = True
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._closed:
            return
        self._closed = True
        self.timer.cancel()
        if self._detect_timer is not None:
            self._detect_timer.cancel()
        if self._upstream is not None:
            self._upstream.close()
        self.conn_session.set(requests=self.requests)
        self.conn_session.end_closed()

    def pause_writing(self) -> None:
        if self._upstream is not None:
            self._upstream.pause_wire(True)

    def resume_writing(self) -> None:
        if self._upstream is not None:
            self._upstream.pause_wire(False)

    # -- edge limits --
    def _probe(self) -> tuple[bool, bool, int]:
        return self.reader.in_head and not self._busy, self._busy, self.end.rx + self.end.tx

    def _expired(self, what: str) -> None:
        if self._closed:
            return
        if what == HEAD_TIMEOUT:
            self._refuse(head_timeout(self.limits))
            return
        self.conn_session.set(reason="idle_timeout")
        self._flush_out()
        self.transport.close()

    def _refuse(self, e: EdgeError) -> None:
        """A request the edge will not forward: counted, logged, answered, and the connection closed."""
        meshmetrics.http_edge_refused("outbound", e.status, e.reason)
        log.info("refused a request from %s to %s: %s", self.conn_session.fields.get("src", "?"),
                 self.plan.service or self.plan.dst_ip, e)
        self.conn_session.fail(e.reason, e.message)
        self.conn_session.set(http_status=e.status)
        self._queue.clear()
        if not self._busy and not self._closed:
            self._out.append(h1.error_response(e))
            self._flush_out()
        self.transport.close()

    # -- request parsing --
    def _process(self) -> None:
        q = self._queue
        while q and not self._busy and not self._closed:
            ev = q.popleft()
            if isinstance(ev, bytes):
                self._body_size += len(ev)
                if len(self._body) + len(ev) > MAX_BUFFERED_BODY:
                    self._too_big = True
                else:
                    self._body += ev
            elif isinstance(ev, RequestHead):
                self._req, self._body, self._too_big, self._body_size = ev, bytearray(), False, 0
                if ev.upgrade:
                    # Upgrade is hop-by-hop and not carried on this path: served as a plain request.
                    try:
                        q.extend(self.reader.resume_after_upgrade())
                    except EdgeError as e:
                        self._refuse(e)
                        return
            elif isinstance(ev, h1.EndOfRequest):
                req, body = self._req, bytes(self._body)
                assert req is not None
                self._busy = True
                self._close_after = not req.keep_alive
                self._reading(False)
                self.rt.proxy.spawn(self._serve(req, body, self._too_big))
            elif isinstance(ev, H2Preface):
                # An HTTP/1.1 port: HTTP/2 with prior knowledge is refused with the HTTP/2
                # answer for it (GOAWAY HTTP_1_1_REQUIRED), never forwarded as a request.
                meshmetrics.http_edge_refused("outbound", 0, "h2_preface_on_http_port")
                self.conn_session.fail("h2_preface_on_http_port", "the HTTP/2 preface on a port declared "
                                       "http (HTTP/1.1): declare it http2, grpc or auto")
                self.transport.write(H2_REFUSAL)
                self.transport.close()
                return

    # -- responding --
    def write_head(self, status: int, reason: str, headers: list[tuple[str, str]], length: int | None) -> None:
        req = self._req
        self._head_sent = True
        data = self.framer.head(status, reason, headers, method=req.method if req else "GET",
                                version=req.version if req else "1.1",
                                keep_alive=not self._close_after, length=length)
        if self.framer.close:
            self._close_after = True
        self._add_out(data)

    def write_body(self, chunk: bytes) -> None:
        data = self.framer.body(chunk)
        if data:
            self.resp_body += len(chunk)
            self._add_out(data)

    def write_end(self) -> None:
        data = self.framer.end()
        if data:
            self._add_out(data)
        self._flush_out()

    def _add_out(self, data: bytes) -> None:
        self.end.tx += len(data)
        # One send per response, not one per piece: a small response's head, body and end
        # were three write syscalls, each running the peer's receive path.
        self._out.append(data)
        self._out_size += len(data)
        if self._out_size >= _OUT_FLUSH_BYTES:
            self._flush_out()
        elif not self._flush_soon:
            self._flush_soon = True  # a streamed body goes out once this loop pass is done
            asyncio.get_running_loop().call_soon(self._flush_out)

    def _flush_out(self) -> None:
        self._flush_soon = False
        if not self._out:
            return
        out, self._out, self._out_size = self._out, [], 0
        if not self._closed and not self.transport.is_closing():
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _local_reply(self, status: int, text: str, close: bool = False,
                     extra: list[tuple[str, str]] | None = None) -> None:
        body = (text + "\n").encode()
        headers = [("content-type", "text/plain"), ("x-nodemesh-reason", text.split(":")[0][:100]), *(extra or [])]
        if self._head_sent:  # a response already started: it cannot be replaced, only cut
            self.transport.abort()
            return
        if close:
            self._close_after = True
        self.write_head(status, h1.REASONS.get(status, ""), headers, len(body))
        self.write_body(body)
        self.write_end()
        if close:
            self.transport.close()

    def _next_cycle(self) -> None:
        self._busy = False
        self._upstream = None
        if self._closed:
            return
        self._flush_out()
        if self._close_after:
            self.transport.close()
            return
        self._reading(True)
        self._process()

    def _reading(self, on: bool) -> None:
        """Pause while a request is served (pipelined bytes wait in the kernel), resume after.
        The relay end's flag follows, or its deferred re-sync (relay.TcpEnd) would undo a pause."""
        self.end._reading = on
        if on:
            self.transport.resume_reading()
        else:
            self.transport.pause_reading()

    async def _serve(self, req: RequestHead, body: bytes, too_big: bool) -> None:
        self.requests += 1
        self.rt.counters.requests += 1
        call = Call(self, req, body)
        call.request_bytes = self._body_size
        self.resp_body = 0
        self._head_sent = False
        try:
            if too_big:
                meshmetrics.http_edge_refused("outbound", 413, "request_too_large")
                call.fail_local(413, f"request_too_large: body over {MAX_BUFFERED_BODY} bytes (L7 ports buffer "
                                     "request bodies; declare the port protocol: tcp for big uploads)")
            else:
                await call.run()
        except Exception as e:  # a bug must not leave the client hanging
            log.exception("L7 request failed unexpectedly")
            if not self._head_sent:
                call.fail_local(500, f"internal_error: {e!r}")
            else:
                self.transport.abort()
        finally:
            call.finish_log()
            self._next_cycle()


# SETTINGS (empty) then GOAWAY(last stream 0, HTTP_1_1_REQUIRED): the HTTP/2 way to say "speak HTTP/1.1".
H2_REFUSAL = bytes.fromhex("000000040000000000") + bytes.fromhex("0000080700000000000000000000000d")


class Call:
    """One request through the stack."""

    def __init__(self, ds: Downstream, req: RequestHead, body: bytes) -> None:
        self.ds = ds
        self.rt = ds.rt
        self.req = req
        self.body = body
        self.t0 = self.rt.clock()
        f = ds.conn_session.fields
        self.session: Session = ds.rt.proxy.new_session(
            "outbound", protocol="http", src=f.get("src", ""), source_workload=ds.source_key,
            source_principal=ds.source_id, dst_addr=f.get("dst_addr", ""), dst_service=ds.plan.service,
            method=req.method, path=req.target.target)
        self.status = 0
        self.attempts = 0
        self.request_bytes = len(body)

    def fail_local(self, status: int, text: str, extra: list[tuple[str, str]] | None = None) -> None:
        self.status = status
        reason, _, detail = text.partition(":")
        self.session.fail(reason.strip(), detail.strip() or text)
        self.ds._local_reply(status, text, extra=extra)

    def finish_log(self) -> None:
        self.session.set(status=self.status, attempts=self.attempts, request_bytes=self.request_bytes,
                         response_bytes=self.ds.resp_body)
        self.ds.conn_session.set(**{k: v for k, v in self.session.fields.items()
                                    if k in ("endpoint", "dst_workload", "dst_identity", "via", "upstream_node")})
        self.session.finish()

    async def run(self) -> None:
        rt, ds = self.rt, self.ds
        snapshot = rt.proxy.snapshot or ds.end.proxy.snapshot
        assert snapshot is not None
        hit = snapshot.by_vip.get((ds.plan.dst_ip, ds.plan.dst_port))
        if hit is None:
            return self.fail_local(503, f"no_route: {ds.plan.service} is no longer in the mesh config")
        sp = hit[1]
        table = sp.routes or RouteTable(sp.cluster, (RouteEntry("default", _DEFAULT_MATCH,
                                                                  (WeightedCluster(sp.cluster),)),))
        req = self.req
        headers = req.headers
        if req.target.authority is not None:
            # absolute-form: its authority is the Host (RFC 9112 3.2.2), for routing and upstream alike.
            headers = [(k, v) for k, v in headers if k != "host"] + [("host", req.target.authority)]
        tel = getattr(rt.proxy, "telemetry", None)
        if tel is not None:
            # Continue the caller's W3C / B3 trace: this hop's span is its child, and the
            # request goes on with this span as the parent (tracestate kept).
            headers = tracing.replace_trace_headers(headers, tel.request_headers(self.session, headers))
        view = route_select.RequestView(req.method, req.target.target, tuple(headers))
        entry = route_select.select_route(table, view)
        if entry is None:
            return self.fail_local(404, f"no_route: no route of {ds.plan.service} matches "
                                        f"{view.method} {view.path} (check the HTTPRoute matches)")
        self.session.set(route=entry.name)
        if entry.redirect is not None:
            loc = route_select.redirect_location(entry.redirect, entry.match, view, route_select.host_of(headers))
            self.status = entry.redirect.status_code
            self.ds._local_reply(self.status, f"redirect: {loc}", extra=[("location", loc)])
            return None
        if entry.direct_status:
            return self.fail_local(entry.direct_status, f"no_backend: route {entry.name} has no usable backendRefs")
        deadline = Deadline.start(entry.timeout_s or None, incoming_budget(dict(headers)), clock=rt.clock)
        if deadline.expired():
            return self._deadline_exceeded(headers)
        fd = faults.decide(entry.fault, rt.rng)
        if fd.delay_s:
            wait = deadline.bound(fd.delay_s) or fd.delay_s
            await asyncio.sleep(wait)
            if deadline.expired():
                return self._deadline_exceeded(headers)
        if fd.abort_status or fd.abort_grpc_status >= 0:
            self.session.set(fault="abort")
            if fd.abort_grpc_status >= 0:
                self.status = 200
                self.session.fail("fault_injected", f"grpc-status {fd.abort_grpc_status}")
                self.ds._local_reply(200, "fault_injected", extra=[("grpc-status", str(fd.abort_grpc_status))])
                return None
            return self.fail_local(fd.abort_status, "fault_injected: aborted by the route's Fault filter")
        headers = route_select.modify_headers(headers, entry.request_headers)
        target = req.target.target
        path, sep, query = target.partition("?")
        new_path = route_select.rewrite_path(entry, path)
        target = new_path + (sep + query if sep else "")
        if entry.host_rewrite:
            headers = [(k, v) for k, v in headers if k != "host"] + [("host", entry.host_rewrite)]
        for m in entry.mirrors:
            if rt.rng.random() * 100 < m.percent:
                rt.proxy.spawn(_mirror(self, snapshot, m.cluster, target, headers))
        got = rt.admit_backend(snapshot, entry)
        if isinstance(got, LocalRefusal):
            self.session.set(cluster=got.cluster)
            return self.fail_local(got.status, got.message, extra=list(got.extra) or None)
        cluster, bsp, dest = got
        self.session.set(cluster=cluster)
        try:
            await self._attempts(snapshot, entry, dest, bsp, target, headers, deadline)
        finally:
            dest.breaker.release("requests")
        return None

    def _deadline_exceeded(self, headers: list[tuple[str, str]]) -> None:
        if any(k == "content-type" and v.startswith("application/grpc") for k, v in headers):
            self.status = 200
            self.session.fail("deadline_exceeded", "deadline exceeded before the call completed")
            self.ds._local_reply(200, "deadline_exceeded", extra=[("grpc-status", "4"),
                                                                  ("content-type", "application/grpc")])
            return None
        return self.fail_local(504, "deadline_exceeded: the request's deadline passed (route timeout or "
                                    "caller's grpc-timeout / x-nodemesh-deadline-ms)")

    async def _attempts(self, snapshot: Snapshot, entry: RouteEntry, dest: Destination, sp: ServicePort,
                        target: str, headers: list[tuple[str, str]], deadline: Deadline) -> None:
        rt = self.rt
        dest.budget.record_request()
        policy = entry.retry
        max_attempts = policy.attempts if policy else 1
        tried: set[tuple[str, int]] = set()
        hash_key = _hash_key(dest, headers, self.session.fields.get("src", ""))
        last_err = ""
        while True:
            self.attempts += 1
            cands = dest.candidates(sp.endpoints, rt.proxy.settings.node_name, "", tried)
            if not cands:
                return self.fail_local(503, f"no_healthy_endpoint: cluster {sp.cluster} has no healthy "
                                            "endpoint (are its workloads registered and passing health checks?)")
            ep = dest.pick(cands, hash_key)
            tried.add((ep.ip, ep.port))
            self.session.set(endpoint=f"{ep.ip}:{ep.port}", dst_workload=ep.workload, dst_identity=ep.identity)
            per_try = deadline.bound(entry.per_try_timeout_s)
            # Whether a timeout of this try is the whole call's deadline (504 deadline_exceeded).
            by_deadline = per_try is not None and (not entry.per_try_timeout_s or per_try < entry.per_try_timeout_s)
            fwd = _forward_headers(headers, deadline, self.ds.plan)
            t0 = rt.clock()
            dest.ewma.start(ep)
            outcome, ex, err = await self._try(snapshot, ep, target, fwd, per_try, dest)
            dest.ewma.finish(ep)
            elapsed = rt.clock() - t0
            why = meshmetrics.outcome_reason(outcome.status, outcome.grpc_status, connect_failure=outcome.connect_failure,
                                         reset=outcome.reset, timeout=outcome.timeout)
            if dest.record(ep, outcome, elapsed if not outcome.gateway_error or outcome.status else
                           max(elapsed, FAILURE_PENALTY_S), len(sp.endpoints)):
                meshmetrics.outlier_ejected(sp.cluster, why)
            last_err = err or last_err
            more = (policy is not None and self.attempts < max_attempts and retryable(policy, outcome))
            if more and policy is not None:
                wait, stopped = admit_retry(policy, self.attempts, deadline, dest.budget, dest.breaker, rt.rng)
                if stopped:
                    more = False
                    self.session.set(retry_stopped=stopped)
                    if stopped == "max_retries":
                        meshmetrics.breaker_overflow(sp.cluster, "max_retries")
                else:
                    if ex is not None:
                        ex.close()
                    rt.counters.retries += 1
                    meshmetrics.retry(sp.cluster, why)
                    try:
                        await asyncio.sleep(wait)
                    finally:
                        dest.breaker.release("retries")
                    continue
            if "retry_stopped" in self.session.fields:
                meshmetrics.retry_stopped(sp.cluster, self.session.fields["retry_stopped"])
            if ex is not None:
                return await self._relay_response(ex, entry)
            if outcome.timeout:
                if by_deadline or deadline.expired():
                    return self._deadline_exceeded(headers)
                return self.fail_local(504, f"upstream_timeout: no response from {ep.ip}:{ep.port} within the "
                                            "per-try timeout (timeouts.backendRequest)")
            code = 503 if outcome.connect_failure else 502
            return self.fail_local(code, f"{'upstream_connect_failed' if outcome.connect_failure else 'upstream_reset'}"
                                         f": {last_err}")

    async def _try(self, snapshot: Snapshot, ep: Endpoint, target: str, headers: list[tuple[str, str]],
                   timeout_s: float | None, dest: Destination
                   ) -> tuple[Outcome, UpstreamExchange | None, str]:
        """One try; returns the outcome, the exchange when a response head arrived, and an error text."""
        over = dest.breaker.try_acquire("connections")
        if over:
            meshmetrics.breaker_overflow(dest.cluster, over)
            return Outcome(connect_failure=True), None, f"circuit breaker {over}"
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                dest.breaker.release("connections")

        def new_exchange() -> UpstreamExchange:
            e = UpstreamExchange()
            e.done.add_done_callback(lambda _f: release())
            return e

        ex = new_exchange()
        req = UpstreamRequest(self.req.method, target, headers)
        idempotent = self.req.method.upper() in IDEMPOTENT_METHODS

        async def attempt() -> ResponseHead:
            nonlocal ex
            try:
                return await self._connect_and_send(snapshot, ep, ex, req)
            except UpstreamReset:
                # A kept-alive conn the upstream closed as we wrote (the classic race): once, on a
                # fresh conn, when nothing of the response came and resending is safe.
                if not (ex.reused and ex.rx == 0 and (idempotent or not ex.written)):
                    raise
                ex.close()
                ex = new_exchange()
                self.session.set(stale_conn_retry=True)
                return await self._connect_and_send(snapshot, ep, ex, req, fresh=True)

        try:
            head = await asyncio.wait_for(attempt(), timeout_s) if timeout_s else await attempt()
        except TimeoutError:
            ex.close()
            release()
            return Outcome(timeout=True), None, "timeout"
        except ProxyError as e:
            ex.close()
            release()
            self.session.set(try_error=e.reason)
            return Outcome(connect_failure=True), None, str(e)
        except UpstreamReset as e:
            ex.close()
            release()
            return Outcome(reset=True), None, str(e)
        grpc_status = _grpc_status(head)
        return Outcome(status=head.status_code, grpc_status=grpc_status), ex, ""

    async def _connect_and_send(self, snapshot: Snapshot, ep: Endpoint, ex: UpstreamExchange,
                                req: UpstreamRequest, fresh: bool = False) -> ResponseHead:
        """Send on an idle keep-alive conn to the endpoint (h1pool.py), or a new one."""
        pool = self.rt.upstreams
        pool.check_security(snapshot.security)
        key = (self.ds.source_id, ep.ip, ep.port, ep.node_address, ep.hbone_port, ep.identity)
        conn = None if fresh else pool.take(key)
        if conn is not None:
            ex.reused = True
            self.session.set(via="same-node" if is_same_node(ep, self.rt.proxy.settings.node_name) else "hbone",
                             upstream_reused=True)
            if not is_same_node(ep, self.rt.proxy.settings.node_name):
                self.session.set(upstream_node=ep.node)
        else:
            conn = await self._open_conn(snapshot, ep, key)
        ex.on_release = pool.release
        conn.begin(ex, req, self.body, self.session)
        return await ex.head

    async def _open_conn(self, snapshot: Snapshot, ep: Endpoint, key: Any) -> UpstreamConn:
        proxy = self.rt.proxy
        settings = proxy.settings
        conn = self.rt.upstreams.new_conn(key)
        quiet = _QuietSession(proxy.access_log, "outbound")
        quiet.connect_headers = self.session.connect_headers  # type: ignore[method-assign]  # trace context over HBONE
        if is_same_node(ep, settings.node_name):
            self.session.set(via="same-node")
            target = resolve_inbound(snapshot, ep.ip, ep.port, ep.identity)
            # The receiving workload's policy applies to same-node callers too; with HTTP
            # rules a guard decides each request and answers 403 itself (authz_l7.py).
            l7 = authz_l7.admit(snapshot, target.workload, ep.port, self.ds.source_id,
                                str(self.session.fields.get("src", "")).rsplit(":", 1)[0], quiet)
            # The destination side of this hop, as on another node: reporter=destination
            # requests and log lines (nodeagent/observe/telemetry.py watches the workload end).
            inner = proxy.new_session("inbound", src=self.session.fields.get("src", ""),
                                      source_principal=self.ds.source_id, source_workload=self.ds.source_key,
                                      dst_addr=f"{ep.ip}:{ep.port}", dst_workload=target.workload.key,
                                      dst_identity=target.identity, via="same-node", tls=False)
            inner.peer_headers = self.session.connect_headers()
            try:
                up = await connect_local(target, inner, settings.mark, settings.connect_timeout_s)
            except ProxyError as e:
                inner.fail(e)
                inner.finish()
                raise
            wire = authz_l7.wrap(l7, up, self.session)  # the guard's decision goes into this request's line
            if wire is not up:
                # A kept-alive conn carries later requests: their decisions go into their own lines.
                conn.on_reuse = lambda s, g=wire: setattr(g, "session", s)
            conn.wire = wire
            wire.attach(conn)
        else:
            self.session.set(via="hbone", upstream_node=ep.node)
            pkey = PoolKey(self.ds.source_id, (ep.node_address, ep.hbone_port), ep.identity)
            try:
                stream, answered, _conn = await asyncio.wait_for(
                    proxy.pool.open_stream(pkey, ep.ip, ep.port, quiet), settings.connect_timeout_s)
            except TimeoutError:
                raise ConnectTimeout(f"HBONE connect to {ep.node_address}:{ep.hbone_port} timed out") from None
            try:
                await answered
            except ProxyError:
                stream.on_closed()
                raise
            stream.partner = conn
            conn.wire = stream
        return conn

    async def _relay_response(self, ex: UpstreamExchange, entry: RouteEntry) -> None:
        head = ex.head.result()
        self.status = head.status_code
        hdrs = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in head.headers]
        length = next((int(v) for k, v in hdrs if k == "content-length"), None)
        if any(k == "transfer-encoding" for k, _ in hdrs):
            length = None  # llhttp decoded the chunks: framed again for our caller
        hdrs = [(k, v) for k, v in hdrs if k not in HOP_BY_HOP]
        hdrs = route_select.modify_headers(hdrs, entry.response_headers)
        ds = self.ds
        ds._upstream = ex
        ds.write_head(head.status_code, head.reason.decode("latin-1"), hdrs, length)
        ex.set_sink(ds.write_body)
        try:
            await ex.done
        except UpstreamReset as e:
            self.session.fail("upstream_reset", f"response cut short: {e}")
            ds.transport.abort()
            return
        finally:
            ex.close()
        ds.write_end()


class _QuietSession(Session):
    """Bookkeeping for a per-try upstream stream: the request line is the log."""

    def finish(self) -> None:
        if self._done:
            return
        self._done = True
        for cb in self.on_finish:
            cb()


def _grpc_status(head: ResponseHead) -> int | None:
    for k, v in head.headers:
        if k == b"grpc-status":
            try:
                return int(v)
            except ValueError:
                return None
    return None


def _hash_key(dest: Destination, headers: list[tuple[str, str]], src: str) -> str | None:
    lb = dest.policy.load_balancer
    if lb.hash_header:
        return next((v for k, v in headers if k == lb.hash_header), "")
    if lb.hash_cookie:
        for k, v in headers:
            if k == "cookie":
                for part in v.split(";"):
                    name, _, val = part.strip().partition("=")
                    if name == lb.hash_cookie:
                        return val
        return ""
    if lb.hash_source_ip:
        return src.rpartition(":")[0]
    return None


def _forward_headers(headers: list[tuple[str, str]], deadline: Deadline, plan: OutboundPlan) -> list[tuple[str, str]]:
    out = [(k, v) for k, v in headers if k not in HOP_BY_HOP and k not in (MESH_DEADLINE_HEADER,)]
    rem = deadline.remaining()
    if rem is not None:
        # Pass the deadline on, reduced by what this hop already spent.
        out = [(k, v) for k, v in out if k != GRPC_TIMEOUT_HEADER]
        out.append((MESH_DEADLINE_HEADER, str(max(0, int(rem * 1000)))))
        if any(k == GRPC_TIMEOUT_HEADER for k, _ in headers):
            out.append((GRPC_TIMEOUT_HEADER, format_grpc_timeout(rem)))
    if not any(k == "host" for k, _ in out):
        out.append(("host", f"{plan.dst_ip}:{plan.dst_port}"))
    return out  # no `Connection: close`: the upstream conn is kept alive (h1pool.py)


async def _mirror(call: Call, snapshot: Snapshot, cluster: str, target: str, headers: list[tuple[str, str]]) -> None:
    """Fire and forget: its own task, a short timeout, the response discarded."""
    rt = call.rt
    sp = rt.port_of_cluster(snapshot, cluster)
    if sp is None:
        return
    dest = rt.destination(sp)
    cands = dest.candidates(sp.endpoints, rt.proxy.settings.node_name, "")
    if not cands:
        return
    ep = dest.pick(cands, None)
    ex = UpstreamExchange()
    fwd = [(k, v) for k, v in headers if k not in HOP_BY_HOP]
    host = next((v for k, v in fwd if k == "host"), "")
    fwd = [(k, v) for k, v in fwd if k != "host"] + [("host", (host + "-shadow") if host else "shadow")]
    req = UpstreamRequest(call.req.method, target, fwd)
    try:
        await asyncio.wait_for(call._connect_and_send(snapshot, ep, ex, req), 5.0)
        ex.set_sink(lambda _c: None)
        await asyncio.wait_for(ex.done, 5.0)
    except Exception as e:  # noqa: BLE001 - a mirror never affects the original
        log.debug("mirror to %s failed: %r", cluster, e)
    finally:
        ex.close()
