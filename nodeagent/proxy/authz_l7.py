"""AuthorizationPolicy at L7 on the receiving node: when a policy that applies
to the destination workload has HTTP rules (methods, paths, hosts,
request.headers[...]), the inbound connection is not decided at connect time
but per request. An InboundHttpGuard sits between the caller's end (an HBONE
CONNECT stream, a plaintext socket, or a same-node caller) and the workload's
TCP end, looks at the caller's first bytes, and

- for HTTP/1.x reads every request through the strict edge (http/h1.py:
  httptools, the MeshConfig spec.http limits, the one path normalization of
  http/pathnorm.py), decides it with authz.evaluate(..., http=HttpFacts),
  forwards an allowed request re-framed (its normalized target, the framing
  this edge used: Content-Length, or chunked and no Content-Length), and
  answers a denied one itself with 403 and `Connection: close`; a refused one
  (malformed, over a limit, too slow) gets the edge's status and close;
  request bytes queued behind a request in flight are bounded
  (perConnectionBufferLimitBytes): the caller's reading pauses beyond;
- for the HTTP/2 preface (gRPC over h2c) terminates HTTP/2 and decides each
  stream (authz_h2.py: grpc-status 7 PERMISSION_DENIED, or 403);
- for anything else (opaque TCP, a server-first protocol) decides once with the
  L4 semantics of authz.evaluate (an HTTP-only ALLOW rule never matches, an
  HTTP-only DENY rule is decided on its L4 parts) and then relays bytes.

The decision (policy, rule, reason) goes into the inbound session's access
log fields, like the L4 decision.

The guard parses every request and response it forwards, so it also tells
telemetry about them: wrap() takes the observer's watch off the workload's end
(nodeagent/observe/httpwatch.py) and the guard reports each forwarded request
and its response (method, target, trace headers, status, grpc-status, body
bytes) through an ExchangeReport: the bytes are parsed once on this node.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import re
from collections import deque
from dataclasses import dataclass, replace
from typing import Any

import h11

from nodeagent.meshview.snapshot import LocalWorkload, Snapshot
from nodeagent.observe import meshmetrics
from nodeagent.observe.httpwatch import Exchange, ExchangeReport, request_exchange
from nodemesh.security import MTLS_STRICT, SecurityPolicies

from . import authz, authz_h2, detect
from .http import h1
from .http.edge import HEAD_TIMEOUT, STREAM_IDLE_TIMEOUT, TICKS_PER_LIMIT, ConnTimer, head_timeout
from .http.h1 import EdgeError, EndOfRequest, Event, RequestHead, RequestReader, ResponseFramer
from .http.pathnorm import normalize_target
from .relay import End, Session

log = logging.getLogger(__name__)

# How long a denied caller may keep its side open after the 403 before the stream is cut.
DENIED_LINGER_S = 5.0


def needs_l7(policies: SecurityPolicies, workload: LocalWorkload, port: int) -> bool:
    """Whether requests to this workload port must be decided one by one:
    some applicable AuthorizationPolicy has a rule with HTTP attributes.
    Ports of well-known server-first protocols never carry HTTP."""
    if detect.skip_detection(port):
        return False
    return any(r.http_only for p in authz.applicable(policies, workload.namespace, dict(workload.labels))
               for r in p.rules)


@dataclass(frozen=True)
class L7Check:
    """What the guard needs to decide each request: the policies in force when
    the connection arrived and the L4 facts (identity, address, port)."""

    policies: SecurityPolicies
    facts: authz.RequestFacts


def admit(snapshot: Snapshot, workload: LocalWorkload, port: int, source_principal: str, source_ip: str,
          session: Session | None) -> L7Check | None:
    """The connect-time decision. None: decided at L4 (allowed; a denial raises
    InboundRefused as authz.enforce does). An L7Check: the mTLS mode admits the
    caller and each request is decided by an InboundHttpGuard, which the caller
    of admit() MUST put in front of the workload's end (wrap())."""
    policies = snapshot.security
    if not needs_l7(policies, workload, port):
        authz.enforce(snapshot, workload, port, source_principal, source_ip, session)
        return None
    facts = authz.inbound_facts(workload, port, source_principal, source_ip)
    mode, _ = authz.mtls_mode(policies, workload.namespace, dict(workload.labels), port)
    if not source_principal and mode == MTLS_STRICT:
        authz.enforce(snapshot, workload, port, source_principal, source_ip, session)  # raises mtls_required
    if session is not None:
        session.set(authz_layer="L7", mtls_mode=mode)
    return L7Check(policies, facts)


def wrap(check: L7Check | None, upstream: Any, session: Session, watched: Session | None = None) -> Any:
    """The end to give the caller: the workload's own end when L4 decided, else
    a guard in front of it, which takes over the reporting of the exchanges from
    the watch telemetry put on the workload's end (one parse per node).
    `watched`: the session that owns the workload's connection (default `session`)."""
    if check is None:
        return upstream
    owner = watched or session
    handoff = getattr(owner.observer, "guard_parses", None)
    report = handoff(owner, upstream) if handoff is not None else None
    return InboundHttpGuard(check, upstream, session, report)


def normalize_path(target: str) -> tuple[str, str]:
    """(path as checked, query) of a request target, by the one normalization of
    the data plane (http/pathnorm.py); raises pathnorm.BadTarget."""
    t = normalize_target(target)
    return t.path, t.query


DETECT, PASS, HTTP, CLOSED = "detect", "pass", "http", "closed"
_ANY_HTTP_VERSION = re.compile(rb"[A-Z]{3,10} \S+ HTTP/[0-9]+\.[0-9]+\r?\n")
UPGRADING = "upgrading"  # an upgrade request was forwarded: the caller's later bytes wait for the answer
_HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"content-length",
                         b"upgrade"})


def _head_bytes(status: int, reason: bytes, headers: Any) -> bytes:
    """A response head as received (1xx, 101, or ours), for the caller."""
    lines = [b"HTTP/1.1 %d %b\r\n" % (status, reason or h1.REASONS.get(status, "").encode())]
    lines += [b"%b: %b\r\n" % (k, v) for k, v in headers]
    return b"".join(lines) + b"\r\n"
H2 = "h2"  # h2c: each stream decided by an authz_h2.H2AuthzBridge


class _WorkloadSide:
    """The guard as the workload's TcpEnd sees it: response bytes come in here."""

    def __init__(self, guard: InboundHttpGuard) -> None:
        self.g = guard
        self.rx = 0
        self.tx = 0

    def send(self, data: bytes) -> None:
        self.rx += len(data)
        self.g.from_workload(data)

    def send_eof(self) -> None:
        self.g.workload_eof()

    def abort(self) -> None:
        self.g.workload_aborted()

    def pause_reading(self) -> None:  # the workload's socket is full: stop taking request bytes
        self.g.caller_pause(True, True)

    def resume_reading(self) -> None:
        self.g.caller_pause(True, False)


class InboundHttpGuard:
    """A relay End between the caller and the workload that decides each HTTP
    request (see the module docstring). One request is in flight to the
    workload at a time; the workload's responses are read with h11 and framed
    again for the caller; a denied request gets 403 and the connection ends."""

    def __init__(self, check: L7Check, upstream: Any, session: Session, report: ExchangeReport | None = None) -> None:
        self.check = check
        self.up = upstream  # the workload's TcpEnd
        self.session = session
        self.caller: End | None = None
        self.workload_side = _WorkloadSide(self)
        self.rx = 0
        self.tx = 0
        self.state = DETECT
        self._buf = bytearray()
        self.limits = check.policies.mesh.http  # MeshConfig spec.http, as the connection arrived
        self.reader = RequestReader(self.limits)  # the caller's requests (http/h1.py)
        self._queue: deque[Event] = deque()  # parsed, waiting for the request in flight to be answered
        self._queued = 0  # bytes in _queue (and held after an upgrade request)
        self._buffer_paused = False  # the caller's reading is paused because _queued is over the limit
        self._workload_paused = False  # ... because the workload's socket is full
        self._cur: RequestHead | None = None  # the request in flight (allowed, forwarded)
        self.report = report  # telemetry's view of the forwarded requests (None: nobody observes)
        self._ex: Exchange | None = None  # the request in flight, as reported
        self._caller_done = False  # the caller half-closed
        self._req_done = False
        self._resp_done = False
        self._framer = ResponseFramer()
        self._cli = h11.Connection(h11.CLIENT)  # the requests to the workload, its responses
        self.timer = ConnTimer(self.limits, self._probe, self._expired)
        self.requests = 0
        self.denied = 0
        self.logged = 0  # per-request decision lines written (_log_decision)
        self._linger: asyncio.TimerHandle | None = None
        self._caller_eof_sent = False
        self._h2: authz_h2.H2AuthzBridge | None = None
        self._early_up = bytearray()  # workload bytes held while the caller's protocol is unknown
        # Bytes (and an EOF or abort) for the caller produced before attach(): a caller that
        # writes first (the same-node HTTP/2 stack sends its preface from conn.start(), before
        # it is attached) gets the bridge's SETTINGS and window here, not lost. Without them
        # its windows stay at 64 KiB and a big request stalls.
        self._early_down = bytearray()
        self._early_end: str | None = None  # "eof" or "abort", delivered on attach()

    # -- wiring (HboneServerProtocol._serve / the plaintext and same-node paths) --
    def attach(self, caller: End) -> None:
        self.caller = caller
        self.timer.start()
        if self._early_down:
            early, self._early_down = bytes(self._early_down), bytearray()
            caller.send(early)
        if self._early_end == "abort":
            caller.abort()
        elif self._early_end == "eof":
            self._caller_eof_sent = True
            caller.send_eof()
        self.up.attach(self.workload_side)  # flushes anything the workload already sent

    # -- End, as the caller sees it: request bytes --
    def send(self, data: bytes) -> None:
        self.rx += len(data)
        if self.state == PASS:
            self.up.send(data)
        elif self.state == H2 and self._h2 is not None:
            self._h2.from_caller(data)
        elif self.state in (HTTP, UPGRADING):
            self._feed(data)
        elif self.state == DETECT:
            self._buf += data
            kind = detect.sniff(bytes(self._buf))
            if kind == detect.TCP and _ANY_HTTP_VERSION.match(self._buf):
                kind = detect.HTTP1  # an HTTP request line of a version we do not serve: the edge answers 505
            if kind == detect.HTTP1:
                self.state = HTTP
                self.session.set(authz_layer="L7")
                buf, self._buf = bytes(self._buf), bytearray()
                self._feed(buf)
                self._release_early()
            elif kind == detect.HTTP2:
                self._start_h2()
            elif kind != detect.UNKNOWN:
                self._decide_l4(kind)

    def send_eof(self) -> None:
        if self.state == DETECT:
            self._decide_l4(detect.TCP)
        if self.state == PASS:
            self.up.send_eof()
        elif self.state == H2 and self._h2 is not None:
            self._h2.caller_eof()
        elif self.state in (HTTP, UPGRADING):
            # The caller is done sending: a request it began and did not finish is dropped;
            # the workload's end follows once the request in flight (if any) is answered.
            self._caller_done = True
            if self._cur is None or not self._req_done:
                self._queue.clear()
                self.up.send_eof()

    def abort(self) -> None:
        self.state = CLOSED
        self.timer.cancel()
        self.up.abort()

    def caller_pause(self, workload: bool, on: bool) -> None:
        """Pause the caller's reading while the workload is full or the queue is over the limit."""
        if workload:
            self._workload_paused = on
        else:
            self._buffer_paused = on
        if self.caller is None:
            return
        if on:
            self.caller.pause_reading()
        elif not self._workload_paused and not self._buffer_paused:
            self.caller.resume_reading()

    def pause_reading(self) -> None:  # the caller cannot take more response bytes
        self.up.pause_reading()

    def resume_reading(self) -> None:
        self.up.resume_reading()

    # -- the workload's side --
    def from_workload(self, data: bytes) -> None:
        if self.state == DETECT and (self._early_up or authz_h2.looks_like_h2_server_start(data)):
            # An HTTP/2 server may send its SETTINGS on accept, before the caller's preface: hold them.
            self._early_up += data
            return
        if self.state == DETECT:
            # The workload spoke first: a server-first protocol, not HTTP.
            self._decide_l4(detect.TCP)
        if self.state == PASS:
            self._to_caller(data)
        elif self.state == H2 and self._h2 is not None:
            self._h2.from_workload(data)
        elif self.state == HTTP:
            if self._cur is None:
                # No request in flight: a workload speaking out of turn (a late 408, garbage). Its
                # bytes cannot belong to any request this guard decided: end the connection.
                self.session.fail("upstream_protocol_error", "the workload sent bytes with no request in flight")
                self._close_both()
                return
            try:
                self._cli.receive_data(data)
            except RuntimeError:
                return
            self._pump_responses()
        elif self.state == UPGRADING:
            self._upgrade_answer(data)

    def workload_eof(self) -> None:
        if self.state == DETECT:
            self._decide_l4(detect.TCP)
        if self.state == PASS:
            self._caller_eof()
        elif self.state == H2 and self._h2 is not None:
            self._h2.workload_eof()
        elif self.state in (HTTP, UPGRADING):
            with contextlib.suppress(RuntimeError):
                self._cli.receive_data(b"")
            self._pump_responses()
            if self.state in (HTTP, UPGRADING):
                self._caller_eof()

    def workload_aborted(self) -> None:
        self.state = CLOSED
        if self.caller is not None:
            self.caller.abort()

    # -- decisions --
    def _start_h2(self) -> None:
        """The HTTP/2 preface: terminate h2c and decide each stream (authz_h2.py).
        The timer now ticks for the request-head timeout and each stream's idle
        time (the bridge's); a connection with no stream open is bounded by the
        HBONE tunnel's idle timeout, as before."""
        self.state = H2
        self.session.set(authz_layer="L7", protocol=detect.HTTP2)
        self._h2 = authz_h2.H2AuthzBridge(self.check, self.session, authz_h2.Wire(
            to_caller=self._to_caller, to_workload=self.up.send, end_caller=self._caller_eof,
            end_workload=lambda: self._h2_workload_done(True), abort_both=self._close_both,
            abort_workload=lambda: self._h2_workload_done(False)),
            report=self.report)
        self.timer.cancel()
        self.timer = ConnTimer(replace(self.limits, idle_timeout_s=math.inf, stream_idle_timeout_s=math.inf),
                               self._probe, self._expired)
        self.timer.period = max(0.02, min(self.timer.period, self.limits.stream_idle_timeout_s / TICKS_PER_LIMIT))
        if self.caller is not None:  # else attach() starts it
            self.timer.start()
        buf, self._buf = bytes(self._buf), bytearray()
        self._h2.from_caller(buf)
        self._release_early()

    def _h2_workload_done(self, eof: bool) -> None:
        """The bridge is done with the workload's connection: the timers stop too."""
        self.timer.cancel()
        if eof:
            self.up.send_eof()
        else:
            self.up.abort()

    def _release_early(self) -> None:
        if self._early_up:
            early, self._early_up = bytes(self._early_up), bytearray()
            self.from_workload(early)

    def _decide_l4(self, kind: str) -> None:
        """Not HTTP/1.x: one decision for the connection, with L4 semantics."""
        v = authz.evaluate(self.check.policies, self.check.facts)
        authz.STATS.record(v)
        self.session.set(**v.log_fields(), authz_layer="L4", protocol=kind)
        if not v.allowed:
            self.session.fail("denied_by_policy" if v.reason != "mtls_required" else "mtls_required", v.message)
            self._close_both()
            return
        self.state = PASS
        buf, self._buf = bytes(self._buf), bytearray()
        if buf:
            self.up.send(buf)
        self._release_early()

    def _facts(self, req: RequestHead) -> authz.RequestFacts:
        host = req.target.authority if req.target.authority is not None else (req.header("host") or "")
        http = authz.HttpFacts(req.method.upper(), req.target.path, host, tuple(req.headers))
        return replace(self.check.facts, http=http)

    # -- the caller's requests --
    def _feed(self, data: bytes) -> None:
        try:
            events = self.reader.feed(data)
        except EdgeError as e:
            self._refuse(e)
            return
        if self.reader.upgraded:
            self._queued += len(data)  # held, unparsed, until the workload answers the upgrade
        for ev in events:
            if isinstance(ev, bytes):
                self._queued += len(ev)
        self._queue.extend(events)
        self._pump()
        if self._queued > self.limits.max_buffered_bytes and not self._buffer_paused:
            # A request is in flight and the caller keeps sending: stop reading it (the
            # kernel's buffers and TCP flow control hold the rest), not buffer it here.
            self.caller_pause(False, True)

    def _pump(self) -> None:
        q = self._queue
        while q and self.state in (HTTP, UPGRADING):
            ev = q[0]
            if isinstance(ev, RequestHead):
                if self._cur is not None or self.state == UPGRADING:
                    return  # one request at a time: the next waits for this one's response
                q.popleft()
                if not self._on_request(ev):
                    return
            elif isinstance(ev, bytes):
                q.popleft()
                self._queued -= len(ev)
                if self._ex is not None:
                    self._ex.request_bytes += len(ev)
                self._to_workload(h11.Data(data=ev))
            elif isinstance(ev, EndOfRequest):
                q.popleft()
                self._req_done = True
                if self._ex is not None:
                    self._ex.request_done = True
                self._to_workload(h11.EndOfMessage())
                if self._resp_done:
                    self._end_of_exchange()
            else:  # H2Preface: only before the first request (the detection hands it to HTTP/2)
                q.popleft()
                self._refuse(EdgeError(400, "h2_preface", "the HTTP/2 preface inside an HTTP/1.1 connection"))
                return
        if self._buffer_paused and self._queued <= self.limits.max_buffered_bytes // 2:
            self.caller_pause(False, False)

    def _on_request(self, req: RequestHead) -> bool:
        self.requests += 1
        facts = self._facts(req)
        v = authz.evaluate(self.check.policies, facts)
        authz.STATS.record(v)
        self.session.set(**v.log_fields(), http_method=req.method, http_path=req.target.path,
                         authz_requests=self.requests)
        self._log_decision(v)
        if not v.allowed:
            self._deny(v)
            return False
        self._cur, self._req_done, self._resp_done = req, False, False
        # Re-framed: the workload sees the normalized target and exactly the boundary this
        # edge read (Content-Length, or chunked with no Content-Length; RFC 9112 6.3).
        headers = [(k, v_) for k, v_ in req.headers if k not in ("content-length", "transfer-encoding", "host")]
        host = req.target.authority if req.target.authority is not None else req.header("host")
        headers.insert(0, ("host", host or "localhost"))  # HTTP/1.0 without Host: h11 speaks 1.1, which needs one
        if req.chunked:
            headers.append(("transfer-encoding", "chunked"))
        elif req.content_length is not None:
            headers.append(("content-length", str(req.content_length)))
        try:
            out = h11.Request(method=req.method.encode("latin-1"), target=req.target.target.encode("latin-1"),
                              headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in headers])
        except h11.LocalProtocolError as e:  # the reader let it through, h11 does not: refused, never forwarded
            self._refuse(EdgeError(400, "bad_request", f"cannot forward the request: {e}"))
            return False
        self._to_workload(out)
        if self.report is not None and self.state == HTTP:
            self._report_request(req, self.report)
        if req.upgrade and self.state == HTTP:
            self.state = UPGRADING  # bytes after it are held until the workload answers (101 or not)
        return True

    def _report_request(self, req: RequestHead, report: ExchangeReport) -> None:
        if req.upgrade:  # the bytes after it are another protocol: nothing more is reported
            report.stop("upgrade")
            return
        ex = request_exchange(req.method, req.target.target, req.headers, report.clock)
        if report.start(ex):
            self._ex = ex

    def _log_decision(self, v: authz.Verdict) -> None:
        """One access log line per decided request when the guard's session is a
        connection (inbound: a kept-alive stream carries many requests), so that
        every decision is logged, not only the last. A same-node guard decides into
        the caller's per-request line instead (its session is swapped per request)."""
        if self.session.fields.get("direction") != "inbound":
            return
        rec = dict(self.session.fields)
        rec.update(event="authz_request", authz_request=self.requests)
        if not v.allowed:
            rec.update(reason="denied_by_policy" if v.reason != "mtls_required" else "mtls_required",
                       error=v.message, http_status=403)
        self.logged += 1
        self.session._log.write(rec)

    def _to_workload(self, ev: Any) -> None:
        try:
            out = self._cli.send(ev)
        except (h11.LocalProtocolError, h11.RemoteProtocolError) as e:
            self._refuse(EdgeError(400, "bad_request", f"cannot forward the request: {e}"))
            return
        if out:
            self.up.send(out)

    # -- the workload's responses --
    def _pump_responses(self) -> None:
        while self.state in (HTTP, UPGRADING):
            try:
                ev = self._cli.next_event()
            except h11.RemoteProtocolError as e:
                self.session.fail("upstream_protocol_error", f"the workload's HTTP response is malformed: {e}")
                self._close_both()
                return
            if not isinstance(ev, h11.Event):  # NEED_DATA or PAUSED
                return
            if isinstance(ev, h11.ConnectionClosed):
                self._caller_eof()
                return
            cur = self._cur
            if isinstance(ev, h11.InformationalResponse):
                self._to_caller(_head_bytes(ev.status_code, ev.reason, ev.headers))
                if ev.status_code == 101:
                    self._switched()
                    return
            elif isinstance(ev, h11.Response):
                if self.state == UPGRADING:
                    self._upgrade_refused()
                hdrs = [(k.decode("latin-1"), v.decode("latin-1")) for k, v in ev.headers if k not in _HOP_BY_HOP]
                length = None
                if not any(k == b"transfer-encoding" for k, _ in ev.headers):
                    length = next((int(v) for k, v in ev.headers if k == b"content-length"), None)
                if self._ex is not None:
                    self._ex.status = ev.status_code
                    self._ex.grpc_status = next((v for k, v in hdrs if k == "grpc-status"), "")
                self._to_caller(self._framer.head(
                    ev.status_code, ev.reason.decode("latin-1"), hdrs,
                    method=cur.method if cur else "GET", version=cur.version if cur else "1.1",
                    keep_alive=bool(cur and cur.keep_alive), length=length))
            elif isinstance(ev, h11.Data):
                if self._ex is not None:
                    self._ex.response_bytes += len(ev.data)
                out = self._framer.body(ev.data)
                if out:
                    self._to_caller(out)
            elif isinstance(ev, h11.EndOfMessage):
                ex, self._ex = self._ex, None
                if ex is not None and self.report is not None:
                    for k, v in ev.headers:  # trailers: gRPC over HTTP/1.1 is rare, but honest
                        if k == b"grpc-status":
                            ex.grpc_status = v.decode("latin-1")
                    self.report.response_end(ex)
                out = self._framer.end()
                if out:
                    self._to_caller(out)
                self._resp_done = True
                if self._req_done:
                    self._end_of_exchange()
                elif self._cur is not None:
                    # Answered before the request ended (an early 413, say): nothing more of it is wanted.
                    self._framer.close = True
                    self._end_of_exchange()
                return

    def _end_of_exchange(self) -> None:
        cli = self._cli
        keep = (self._cur is not None and self._cur.keep_alive and not self._framer.close
                and cli.our_state is h11.DONE and cli.their_state is h11.DONE
                and not self._caller_done)
        self._cur = None
        if not keep:
            # One side asked for close (or the caller is gone): the response is complete, end the caller's stream.
            self.state = CLOSED
            self.timer.cancel()
            self._caller_eof()
            self.up.send_eof()
            return
        cli.start_next_cycle()
        self._pump()  # a pipelined request waiting in the queue
        self._pump_responses()

    # -- upgrades (e.g. WebSocket): decided as a request, then bytes --
    def _switched(self) -> None:
        """101 Switching Protocols: the request was allowed; relay bytes from now on."""
        self.state = PASS
        self.timer.cancel()
        up, _ = self._cli.trailing_data
        if up:
            self._to_caller(bytes(up))
        held, self.reader.held = bytes(self.reader.held), bytearray()
        self._queued = 0
        if held:
            self.up.send(held)
        if self._buffer_paused:
            self.caller_pause(False, False)

    def _upgrade_answer(self, data: bytes) -> None:
        try:
            self._cli.receive_data(data)
        except RuntimeError:
            return
        self._pump_responses()

    def _upgrade_refused(self) -> None:
        """A final response to an upgrade request: it stays HTTP; parse what the caller sent meanwhile."""
        self.state = HTTP
        self._queued = 0
        try:
            self._queue.extend(self.reader.resume_after_upgrade())
        except EdgeError as e:
            self._refuse(e)

    # -- refusals --
    def _deny(self, v: authz.Verdict) -> None:
        self.denied += 1
        body = f"RBAC: access denied: {v.message} (reason {v.reason})\n".encode()
        self.session.fail("denied_by_policy", v.message)
        self.session.set(http_status=403)
        rule = f";rule={v.rule}" if v.rule is not None else ""
        out = _head_bytes(403, b"Forbidden", [
            (b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"), (b"x-nodemesh-authz", f"deny; policy={v.policy}{rule}".encode("latin-1"))])
        self._end_refused(out + body)

    def _refuse(self, e: EdgeError) -> None:
        """A request the edge will not decide or forward: counted, logged, answered, closed."""
        meshmetrics.http_edge_refused("inbound", e.status, e.reason)
        log.info("refused a request from %s: %s", self.session.fields.get("src", "?"), e)
        self.session.fail(e.reason if e.reason != "bad_request" else "bad_request",
                          f"malformed or refused HTTP request from the caller: {e.message}")
        self.session.set(http_status=e.status)
        started = self._cur is not None and self._framer_started()
        self._end_refused(b"" if started else h1.error_response(e))

    def _framer_started(self) -> bool:
        return self._cli.their_state not in (h11.IDLE, h11.SEND_RESPONSE)

    def _end_refused(self, out: bytes) -> None:
        self.state = CLOSED
        self.timer.cancel()
        self._queue.clear()
        self.caller_pause(False, True)  # nothing more it sends is read (it is cut after the linger)
        if out:
            self._to_caller(out)
        self._caller_eof()
        self.up.abort()
        self._linger_then_abort()

    # -- time limits (http/edge.py) --
    def _probe(self) -> tuple[bool, bool, int]:
        if self.state == H2 and self._h2 is not None:
            self._h2.tick_idle(self.timer.period, self.limits.stream_idle_timeout_s)
            return self._h2.head_in_progress(), bool(self._h2.by_caller), self.rx + self.tx
        in_head = (self.state == DETECT and bool(self._buf)) or (
            self.state == HTTP and self._cur is None and self.reader.in_head)
        return in_head, self._cur is not None, self.rx + self.tx

    def _expired(self, what: str) -> None:
        if self.state == H2 and self._h2 is not None:
            if what == HEAD_TIMEOUT:
                self.timer.cancel()
                self._h2.head_timeout(head_timeout(self.limits))
            return
        if self.state not in (DETECT, HTTP):
            return
        if what == HEAD_TIMEOUT:
            self._refuse(head_timeout(self.limits))
            return
        if what == STREAM_IDLE_TIMEOUT:  # a request in flight and nothing moving: cut it
            meshmetrics.http_edge_refused("inbound", 0, STREAM_IDLE_TIMEOUT)
            log.info("request from %s in flight with no byte moving for %gs: closed (streamIdleTimeoutSeconds)",
                     self.session.fields.get("src", "?"), self.limits.stream_idle_timeout_s)
        self.session.set(reason=what)
        self._close_both()

    def _linger_then_abort(self) -> None:
        with contextlib.suppress(RuntimeError):  # no running loop (unit tests)
            self._linger = asyncio.get_running_loop().call_later(DENIED_LINGER_S, self._cut_caller)

    def _cut_caller(self) -> None:
        if self.caller is not None:
            self.caller.abort()
        else:
            self._early_end = "abort"

    def _close_both(self) -> None:
        self.state = CLOSED
        self.timer.cancel()
        self.up.abort()
        self._cut_caller()

    def _caller_eof(self) -> None:
        if self._caller_eof_sent:
            return
        if self.caller is None:
            self._early_end = self._early_end or "eof"
            return
        self._caller_eof_sent = True
        self.caller.send_eof()

    def _to_caller(self, data: bytes) -> None:
        self.tx += len(data)
        if self.caller is not None:
            self.caller.send(data)
        else:
            self._early_down += data
