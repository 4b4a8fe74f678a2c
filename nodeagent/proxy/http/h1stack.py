"""The HTTP/1.1 adapter of the outbound L7 pipeline (pipeline.py): takes over
a captured client connection on an HTTP service port, reads requests through
the strict edge (h1.py: httptools, no I/O in the core, limits and one path
normalization), and runs each request through the one pipeline as an
`H1Call`, which supplies only the wire: local replies, upstream headers, one
try, the response relayed back and mirror copies.

Each request gets its own access log line. A try takes an idle keep-alive
conn to the endpoint from the runtime's pool (h1pool.py) or opens one through
the one upstream connector (connector.py: an HBONE CONNECT stream, or a
same-node TCP connection after the receiving side's checks); a complete
keep-alive response returns the conn to the pool.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

from nodeagent.meshview.l7snapshot import RouteEntry
from nodeagent.meshview.snapshot import Endpoint, Snapshot
from nodeagent.observe import meshmetrics

from .. import detect
from ..plan import OutboundPlan, is_same_node
from . import h1, route_select
from .edge import HEAD_TIMEOUT, STREAM_IDLE_TIMEOUT, ConnTimer, head_timeout
from .h1 import EdgeError, Event, H2Preface, RequestHead, RequestReader, ResponseFramer
from .h1upstream import ResponseHead, UpstreamConn, UpstreamExchange, UpstreamRequest, UpstreamReset
from .pipeline import (
    MAX_BUFFERED_BODY,
    Call,
    Downstream,
    Headers,
    InternalError,
    L7Runtime,
    LocalReply,
    QuietSession,
    Request,
    RequestTooLarge,
    StreamIdleTimeout,
    TryResult,
    shadow_authority,
)
from .retry import Outcome
from .timeout import GRPC_TIMEOUT_HEADER, MESH_DEADLINE_HEADER, Deadline, format_grpc_timeout

if TYPE_CHECKING:
    from ..outbound import OutboundConnection
    from ..proxy import NodeProxy

log = logging.getLogger(__name__)

_OUT_FLUSH_BYTES = 64 * 1024  # response bytes held before a write (_write coalesces per response)
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "te", "transfer-encoding", "upgrade",
                        "trailer", "content-length"})
IDEMPOTENT_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
MIRROR_TIMEOUT_S = 5.0


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


def start_l7(proxy: NodeProxy, end: OutboundConnection, snapshot: Snapshot, source_key: str, source_id: str,
             plan: OutboundPlan, mode: str, tcp_fallback: Callable[[], None]) -> None:
    """Take the client connection over from the L4 relay end."""
    transport = cast(asyncio.Transport, end.transport)  # set: the relay end is connected
    if mode == "http2":
        from .h2stack import start_h2  # h2c and gRPC (docs/interop.md)

        return start_h2(proxy, end, snapshot, source_key, source_id, plan, tcp_fallback)
    h = H1Downstream(proxy.l7, end, snapshot, source_key, source_id, plan, mode, tcp_fallback)
    transport.set_protocol(h)
    h.begin()


class H1Downstream(Downstream):
    """The client's HTTP/1.1 connection (server role), one request at a time.
    Requests are read by the strict edge (h1.py: httptools, limits, one path
    normalization); reading pauses while a request is served, so pipelined bytes
    wait in the kernel, not here."""

    def __init__(self, rt: L7Runtime, end: OutboundConnection, snapshot: Snapshot, source_key: str,
                 source_id: str, plan: OutboundPlan, mode: str, tcp_fallback: Callable[[], None]) -> None:
        super().__init__(rt, end, snapshot, source_key, source_id, plan, tcp_fallback)
        self.mode = mode
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
        self._call: H1Call | None = None  # the request in flight, and its task
        self._task: asyncio.Task[Any] | None = None
        self._close_after = False  # the response in flight is the connection's last
        self.timer = ConnTimer(self.limits, self._probe, self._expired)

    # -- start --
    def begin(self) -> None:
        early = self.end.take_over()
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
        self.end.hand_back(self._sniffed)
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
        if what == STREAM_IDLE_TIMEOUT and self._call is not None and self._task is not None:
            # The request in flight moved no byte either way for streamIdleTimeoutSeconds:
            # 408 if its response has not started (else cut), and the connection ends.
            meshmetrics.http_edge_refused("outbound", 408, STREAM_IDLE_TIMEOUT)
            self._close_after = True
            self._call.answer(StreamIdleTimeout(f"no byte moved for {self.limits.stream_idle_timeout_s:g}s "
                                                "(MeshConfig spec.http.streamIdleTimeoutSeconds)"))
            self._task.cancel()
            return
        self.conn_session.set(reason=what)
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
                if req is None:  # the reader ends only a request it began
                    raise RuntimeError("end of a request that never began")
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
        if self.rt.proxy.draining:  # a restart: end at this request boundary, never mid-request
            self._close_after = True
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

    def local_reply(self, status: int, reason: str, text: str, extra: Headers) -> None:
        """A response made here (`text` is its body line), unless one already started: then cut."""
        if self._head_sent:
            self.transport.abort()
            return
        body = (text + "\n").encode()
        ctype = [] if any(k == "content-type" for k, _ in extra) else [("content-type", "text/plain")]
        headers = [*ctype, ("x-nodemesh-reason", reason[:100]), *extra]
        self.write_head(status, h1.REASONS.get(status, ""), headers, len(body))
        self.write_body(body)
        self.write_end()

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
        """Pause while a request is served (pipelined bytes wait in the kernel), resume after."""
        self.end.set_reading(on)

    async def _serve(self, req: RequestHead, body: bytes, too_big: bool) -> None:
        self.requests += 1
        self.rt.counters.requests += 1
        call = H1Call(self, req, body)
        call.request_bytes = self._body_size
        self.resp_body = 0
        self._head_sent = False
        self._call, self._task = call, asyncio.current_task()
        try:
            if too_big:
                meshmetrics.http_edge_refused("outbound", 413, "request_too_large")
                call.answer(RequestTooLarge(f"body over {MAX_BUFFERED_BODY} bytes (L7 ports buffer request "
                                            "bodies; declare the port protocol: tcp for big uploads)"))
            else:
                # The config in force when the request starts (a route change applies to the
                # next request of a kept-alive connection, as Envoy does).
                await call.serve(self.rt.proxy.snapshot or self.snapshot, call.request())
        except Exception as e:  # a bug must not leave the client hanging
            log.exception("L7 request failed unexpectedly")
            call.answer(InternalError(repr(e)))
        finally:
            self._call = self._task = None
            call.finish_log()
            self._next_cycle()


# SETTINGS (empty) then GOAWAY(last stream 0, HTTP_1_1_REQUIRED): the HTTP/2 way to say "speak HTTP/1.1".
H2_REFUSAL = bytes.fromhex("000000040000000000") + bytes.fromhex("0000080700000000000000000000000d")


class H1Call(Call):
    """One HTTP/1.1 request through the pipeline."""

    def __init__(self, ds: H1Downstream, req: RequestHead, body: bytes) -> None:
        f = ds.conn_session.fields
        session = ds.rt.proxy.new_session(
            "outbound", protocol="http", src=f.get("src", ""), source_workload=ds.source_key,
            source_principal=ds.source_id, dst_addr=f.get("dst_addr", ""), dst_service=ds.plan.service,
            method=req.method, path=req.target.target)
        super().__init__(ds.rt, session, ds.plan, ds.source_id)
        self.ds = ds
        self.req = req
        self.body = body
        self.request_bytes = len(body)
        self.grpc = any(k == "content-type" and v.startswith("application/grpc") for k, v in req.headers)
        self._ex: UpstreamExchange | None = None  # the try in flight

    def request(self) -> Request:
        req = self.req
        headers = req.headers
        host = req.target.authority  # absolute-form: its authority is the Host (RFC 9112 3.2.2)
        if host is None and not any(k == "host" for k, _ in headers):
            host = f"{self.plan.dst_ip}:{self.plan.dst_port}"
        if host is not None:
            headers = [(k, v) for k, v in headers if k != "host"] + [("host", host)]
        path, sep, query = req.target.target.partition("?")
        return Request(req.method, path, sep + query, tuple(headers))

    # -- the adapter --
    def reply(self, r: LocalReply) -> None:
        extra = list(r.extra)
        status = r.status
        if r.grpc_code is not None and (self.grpc or status == 200):
            # A gRPC answer over HTTP/1.1 (a fault abort with a gRPC status, or a gRPC caller's deadline).
            status = 200
            extra += [("grpc-status", str(r.grpc_code)), ("content-type", "application/grpc")]
        self.status = status
        self.ds.local_reply(status, r.reason, r.text, extra)

    def upstream_headers(self, req: Request, deadline: Deadline) -> Headers:
        out = [(k, v) for k, v in req.headers if k not in HOP_BY_HOP and k != MESH_DEADLINE_HEADER]
        rem = deadline.remaining()
        if rem is not None:
            # Pass the deadline on, reduced by what this hop already spent.
            out = [(k, v) for k, v in out if k != GRPC_TIMEOUT_HEADER]
            out.append((MESH_DEADLINE_HEADER, str(max(0, int(rem * 1000)))))
            if any(k == GRPC_TIMEOUT_HEADER for k, _ in req.headers):
                out.append((GRPC_TIMEOUT_HEADER, format_grpc_timeout(rem)))
        return out  # no `Connection: close`: the upstream conn is kept alive (h1pool.py)

    async def try_once(self, snapshot: Snapshot, ep: Endpoint, req: Request, headers: Headers,
                       release: Callable[[], None]) -> TryResult:
        def new_exchange() -> UpstreamExchange:
            e = UpstreamExchange()
            e.done.add_done_callback(lambda _f: release())  # the connection slot is held until the response ends
            self._ex = e
            return e

        ex = new_exchange()
        ureq = UpstreamRequest(req.method, req.target, headers)
        try:
            try:
                head = await self._send(snapshot, ep, ex, ureq)
            except UpstreamReset:
                # A kept-alive conn the upstream closed as we wrote (the classic race): once, on a
                # fresh conn, when nothing of the response came and resending is safe.
                if not (ex.reused and ex.rx == 0 and (req.method.upper() in IDEMPOTENT_METHODS or not ex.written)):
                    raise
                ex.close()
                ex = new_exchange()
                self.session.set(stale_conn_retry=True)
                head = await self._send(snapshot, ep, ex, ureq, fresh=True)
        except UpstreamReset as e:
            ex.close()
            release()
            return TryResult(Outcome(reset=True), None, str(e))
        return TryResult(Outcome(status=head.status_code, grpc_status=_grpc_status(head)), ex)

    def drop_try(self, response: Any) -> None:
        ex = response if response is not None else self._ex
        if ex is not None:
            ex.close()

    async def _send(self, snapshot: Snapshot, ep: Endpoint, ex: UpstreamExchange, req: UpstreamRequest,
                    fresh: bool = False, body: bytes | None = None) -> ResponseHead:
        """Send on an idle keep-alive conn to the endpoint (h1pool.py), or a new one."""
        pool = self.rt.upstreams
        pool.check_security(snapshot.security)
        key = (self.source_id, ep.ip, ep.port, ep.node_address, ep.hbone_port, ep.identity)
        conn = None if fresh else pool.take(key)
        if conn is not None:
            ex.reused = True
            self.session.set(upstream_reused=True)
            if not is_same_node(ep, self.rt.proxy.settings.node_name):
                self.session.set(upstream_node=ep.node)
        else:
            conn = await self._open_conn(snapshot, ep, key)
        ex.on_release = pool.release
        conn.begin(ex, req, self.body if body is None else body, self.session)
        return await ex.head

    async def _open_conn(self, snapshot: Snapshot, ep: Endpoint, key: Any) -> UpstreamConn:
        proxy = self.rt.proxy
        conn = self.rt.upstreams.new_conn(key)
        quiet = QuietSession(proxy.access_log, self.session)
        # On this node the guard's per-request decisions go into the request's own line.
        up = await proxy.connector.open(snapshot, ep, self.source_id, self.session, stream_session=quiet,
                                        decisions=self.session)
        wire = up.wire
        if up.guarded:
            # A kept-alive conn carries later requests: their decisions go into their own lines.
            conn.on_reuse = lambda s, g=wire: setattr(g, "session", s)
        conn.wire = wire
        if up.inbound is not None:
            wire.attach(conn)
        else:
            wire.partner = conn
        return conn

    async def relay(self, response: Any, entry: RouteEntry, deadline: Deadline) -> None:
        ex: UpstreamExchange = response
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

    def mirror(self, snapshot: Snapshot, cluster: str, req: Request) -> None:
        self.rt.proxy.spawn(self._mirror(snapshot, cluster, req))

    async def _mirror(self, snapshot: Snapshot, cluster: str, req: Request) -> None:
        """Fire and forget: its own task, a short timeout, the response discarded."""
        rt = self.rt
        st = rt.mirror_stats
        sp = rt.port_of_cluster(snapshot, cluster)
        cands = rt.destination(sp).candidates(sp.endpoints, rt.proxy.settings.node_name, "") if sp else []
        if not cands or sp is None:
            st.skipped_no_endpoint += 1
            return
        ep = rt.destination(sp).pick(cands, None)
        # The shadow has its own timeout; the original's deadline headers do not apply to it.
        fwd = [(k, v) for k, v in req.headers if k not in HOP_BY_HOP and k not in (
            "host", MESH_DEADLINE_HEADER, GRPC_TIMEOUT_HEADER)]
        fwd.append(("host", shadow_authority(req.authority or "shadow")))
        ex = UpstreamExchange()
        try:
            await asyncio.wait_for(self._send(snapshot, ep, ex, UpstreamRequest(req.method, req.target, fwd)),
                                   MIRROR_TIMEOUT_S)
            st.sent += 1
            ex.set_sink(lambda _c: None)
            await asyncio.wait_for(ex.done, MIRROR_TIMEOUT_S)
            st.completed += 1
        except Exception as e:  # noqa: BLE001 - a mirror never affects the original
            st.failed += 1
            log.debug("mirror to %s failed: %r", cluster, e)
        finally:
            ex.close()

    def finish_log(self) -> None:
        self.session.set(status=self.status, attempts=self.attempts, request_bytes=self.request_bytes,
                         response_bytes=self.ds.resp_body)
        self.ds.conn_session.set(**self.upstream_fields())
        self.session.finish()


def _grpc_status(head: ResponseHead) -> int | None:
    for k, v in head.headers:
        if k == b"grpc-status":
            try:
                return int(v)
            except ValueError:
                return None
    return None
