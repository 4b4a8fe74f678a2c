"""AuthorizationPolicy per request for HTTP/2 (gRPC over h2c) on the receiving
node. When HTTP rules apply and the caller's stream starts with the HTTP/2
preface, the InboundHttpGuard (authz_l7.py) hands the connection to an
H2AuthzBridge: an h2 server toward the caller, an h2 client toward the
workload (the guard's one TCP connection to it), and for each request stream
a decision by authz.evaluate with the request's method, :path, :authority and
headers.

- allowed: headers, data and trailers are forwarded both ways; data is
  acknowledged to its sender only once it went on toward the other peer (so
  the receiver's window, not this proxy's memory, bounds what is in flight);
  RST_STREAM, END_STREAM and GOAWAY are propagated;
- denied: the caller gets a trailers-only gRPC answer (grpc-status 7,
  PERMISSION_DENIED, naming the policy and rule) or, for plain HTTP/2, 403;
  nothing reaches the workload; one access log line names the policy and rule.
- time limits (MeshConfig spec.http, ticked by the guard's ConnTimer): a
  request head begun and not complete within requestHeadersTimeoutSeconds
  ends the connection (GOAWAY, counted, logged); a stream that moved nothing
  either way for streamIdleTimeoutSeconds is ended alone: the workload's
  stream is cancelled and the caller gets 408 (gRPC: the mapped status) if no
  response began, else a reset.

Each allowed stream is reported to telemetry through the guard's
ExchangeReport (nodeagent/observe/httpwatch.py) from this parse, as the
HTTP/2 watch would have from the bytes: the bytes are parsed once on this node.

The bridge does no I/O: bytes come in through from_caller()/from_workload() and
go out through the Wire callbacks, so it is tested with two in-memory peers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import h2.errors
import h2.events
import h2.exceptions

from nodeagent.observe import meshmetrics
from nodeagent.observe.httpwatch import Exchange, ExchangeReport, request_exchange

from . import authz
from .http.edge import STREAM_IDLE_TIMEOUT
from .http.h1 import EdgeError
from .http.h2core import (
    GRPC_PERMISSION_DENIED,
    H2Core,
    Headers,
    Received,
    grpc_message_escape,
    grpc_status_for_http,
    header_value,
    is_grpc,
    strip_connection_headers,
)
from .http.pathnorm import BadTarget, normalize_target
from .relay import Session

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Wire:
    """Where the bridge's bytes go (the guard's two ends)."""

    to_caller: Callable[[bytes], None]
    to_workload: Callable[[bytes], None]
    end_caller: Callable[[], None]  # EOF toward the caller (all streams done)
    end_workload: Callable[[], None]
    abort_both: Callable[[], None]  # a connection error: cut both ends
    abort_workload: Callable[[], None]  # the workload never got a request: close it without a word


@dataclass
class _Stream:
    """One allowed request: the caller's stream id and the workload's, and the
    flow-controlled bytes received on each side not yet given back as window."""

    cs: int
    ws: int
    owed_up: int = 0  # caller's bytes queued toward the workload, not yet acknowledged to the caller
    owed_down: int = 0  # workload's bytes queued toward the caller, not yet acknowledged to the workload
    req_done: bool = False
    resp_done: bool = False
    ex: Exchange | None = None  # as reported to telemetry (None: nobody observes)
    grpc: bool = False
    resp_started: bool = False  # a response head went to the caller
    moved: int = 0  # frames that moved on this stream (either way), for the idle timer
    seen: int = -1  # `moved` at the timer's last tick
    idle_for: float = 0.0


@dataclass
class BridgeStats:
    requests: int = 0
    allowed: int = 0
    denied: int = 0
    idle_timeouts: int = 0  # streams ended by streamIdleTimeoutSeconds
    decisions: list[tuple[str, str, int | None]] = field(default_factory=list)  # (path, allow|deny, rule), last 32


def deny_message(v: authz.Verdict) -> str:
    """What a denied caller reads: the policy and the rule (or why none matched)."""
    rule = f"rule {v.rule}" if v.rule is not None else f"no rule matched: {v.reason}"
    return f"RBAC: access denied (policy {v.policy or 'none'}, {rule})"


class H2AuthzBridge:
    """One h2c connection from a caller to the workload, decided per stream."""

    def __init__(self, check: Any, session: Session, wire: Wire, report: ExchangeReport | None = None) -> None:
        self.check = check  # authz_l7.L7Check: the policies and the connection's L4 facts
        self.session = session
        self.report = report
        if report is not None:
            report.detected = True  # the caller's preface: an HTTP/2 connection, followed
        self.wire = wire
        self.srv = H2Core(client=False)  # toward the caller
        self.cli = H2Core(client=True)  # toward the workload
        self.by_caller: dict[int, _Stream] = {}
        self.by_workload: dict[int, _Stream] = {}
        self.stats = BridgeStats()
        self.closing = False  # a GOAWAY or EOF was seen: no new streams, end once the open ones are done
        self.closed = False
        # Nothing goes to the workload (not even the h2 preface) until a request is allowed.
        self.workload_started = False
        self.srv.initiate()
        self.cli.initiate()
        self._flush()

    # ---------------------------------------------------------------- input
    def from_caller(self, data: bytes) -> None:
        if self.closed:
            return
        rec = self.srv.receive_data(data)
        if rec.error:
            if self.report is not None:
                self.report.stop(f"request: {rec.error}", failed=True)
            self._fail("bad_request", f"malformed HTTP/2 from the caller: {rec.error}")
            return
        for ev in rec.events:
            self._caller_event(ev)
        self._release(rec, caller_side=True)
        self._flush()
        self._maybe_finish()

    def from_workload(self, data: bytes) -> None:
        if self.closed:
            return
        rec = self.cli.receive_data(data)
        if rec.error:
            if self.report is not None:
                self.report.stop(f"response: {rec.error}", failed=True)
            self._fail("upstream_protocol_error", f"the workload's HTTP/2 is malformed: {rec.error}")
            return
        for ev in rec.events:
            self._workload_event(ev)
        self._release(rec, caller_side=False)
        self._flush()
        self._maybe_finish()

    def caller_eof(self) -> None:
        """The caller closed its side: nothing more can be asked; let the workload know."""
        if self.closed:
            return
        self.closing = True
        for st in list(self.by_caller.values()):
            if not st.req_done:  # a request cut short: the workload must not take it as complete
                self.cli.reset(st.ws, h2.errors.ErrorCodes.CANCEL)
                self._reset_reported(st, h2.errors.ErrorCodes.CANCEL, "client")
                self._drop(st)
        self.cli.close()
        self._flush()
        self._maybe_finish()

    def workload_eof(self) -> None:
        """The workload closed its connection: streams still waiting fail (the caller may retry)."""
        if self.closed:
            return
        self.closing = True
        for st in list(self.by_caller.values()):
            self.srv.reset(st.cs, h2.errors.ErrorCodes.REFUSED_STREAM if not st.resp_done
                           else h2.errors.ErrorCodes.CANCEL)
            self._drop(st)
        self.srv.close()
        self._flush()
        self._maybe_finish()

    def abort(self) -> None:
        self.closed = True

    # ---------------------------------------------------------------- caller's events
    def _caller_event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.RequestReceived):
            self._on_request(ev.stream_id, _headers(ev.headers), ev.stream_ended is not None)
        elif isinstance(ev, h2.events.DataReceived):
            st = self.by_caller.get(ev.stream_id)
            if st is None:  # a denied or reset stream: give the window back, drop the bytes
                self.srv.acknowledge(ev.stream_id, ev.flow_controlled_length)
                return
            st.owed_up += ev.flow_controlled_length
            st.moved += 1
            if st.ex is not None:
                st.ex.request_bytes += len(ev.data)
            self.cli.send_data(st.ws, ev.data)
            if ev.stream_ended is not None:
                self._request_done(st, None)
        elif isinstance(ev, h2.events.TrailersReceived):
            st = self.by_caller.get(ev.stream_id)
            if st is not None:
                self._request_done(st, strip_connection_headers(_headers(ev.headers)))
        elif isinstance(ev, h2.events.StreamEnded):
            st = self.by_caller.get(ev.stream_id)
            if st is not None and not st.req_done:
                self._request_done(st, None)
        elif isinstance(ev, h2.events.StreamReset):
            st = self.by_caller.get(ev.stream_id)
            if st is not None:
                self.cli.reset(st.ws, ev.error_code)
                self._reset_reported(st, ev.error_code, "client")
                self._drop(st)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._goaway_from(caller=True, code=int(ev.error_code or 0))

    def _request_done(self, st: _Stream, trailers: Headers | None) -> None:
        st.req_done = True
        st.moved += 1
        if st.ex is not None:
            st.ex.request_done = True
        self.cli.end_stream(st.ws, trailers)
        self._maybe_forget(st)

    def _on_request(self, sid: int, headers: Headers, ended: bool) -> None:
        self.stats.requests += 1
        method = (header_value(headers, ":method") or "").upper()
        limits = self.check.policies.mesh.http
        try:  # one path normalization for HTTP/1.1 and HTTP/2 (http/pathnorm.py)
            if len(headers) > limits.max_headers + 4:  # the pseudo-headers are not counted
                raise BadTarget("too_many_headers", f"more than {limits.max_headers} request headers", 431)
            t = normalize_target(header_value(headers, ":path") or "", method, limits.escaped_slash_action, h2=True)
        except BadTarget as e:
            self._refuse_stream(sid, e, ended)
            return
        path, query = t.path, t.query
        host = header_value(headers, ":authority") or header_value(headers, "host") or ""
        grpc = is_grpc(headers)
        plain = tuple((k, v) for k, v in headers if not k.startswith(":"))
        facts = replace(self.check.facts, http=authz.HttpFacts(method, path, host, plain))
        v = authz.evaluate(self.check.policies, facts)
        authz.STATS.record(v)
        self.stats.decisions = (self.stats.decisions + [(path, "allow" if v.allowed else "deny", v.rule)])[-32:]
        self.session.set(**v.log_fields(), authz_layer="L7", protocol="grpc" if grpc else "http2",
                         http_method=method, http_path=path, authz_requests=self.stats.requests)
        if not v.allowed:
            self.stats.denied += 1
            self._log_decision(v, grpc)
            self._deny(sid, v, grpc, ended)
            return
        self.stats.allowed += 1
        self._log_decision(v, grpc)
        if self.closing:  # the workload said GOAWAY: this stream would never be answered
            self.srv.reset(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        out = [(k, (path + query) if k == ":path" else v_) for k, v_ in strip_connection_headers(headers)]
        try:
            ws = self.cli.new_request(out, end_stream=ended)
        except h2.exceptions.TooManyStreamsError:
            # The workload's own MAX_CONCURRENT_STREAMS is lower than ours: the caller may retry.
            self.srv.reset(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
            return
        self.workload_started = True
        st = _Stream(sid, ws, req_done=ended, grpc=grpc)
        self.by_caller[sid] = st
        self.by_workload[ws] = st
        if self.report is not None:
            self._report_request(self.report, st, method, path + query, headers, grpc)

    @staticmethod
    def _report_request(report: ExchangeReport, st: _Stream, method: str, target: str, headers: Headers,
                        grpc: bool) -> None:
        """The stream as the HTTP/2 watch would have reported it (observe/h2watch.py)."""
        ex = request_exchange(method, target, headers, report.clock)
        ex.grpc = grpc
        ex.request_done = st.req_done
        ex.extra.update(authority=header_value(headers, ":authority") or "", protocol="http2", stream=st.ws)
        if grpc and target.count("/") == 2:
            service, _, rpc = target[1:].partition("/")
            ex.extra["grpc_service"], ex.extra["grpc_method"] = service, rpc
        if report.start(ex):
            st.ex = ex

    def _reset_reported(self, st: _Stream, code: int, by: str) -> None:
        ex, st.ex = st.ex, None
        if ex is not None and self.report is not None:
            ex.t_end = self.report.clock()
            ex.extra["reset"], ex.extra["reset_by"] = int(code), by
            self.report.done(ex)

    def _response_reported(self, st: _Stream, headers: Headers | None) -> None:
        """A response head or trailers: the status and grpc-status; with `headers` None, its end."""
        ex = st.ex
        if ex is None or self.report is None:
            return
        if headers is None:
            st.ex = None
            self.report.response_end(ex)
            return
        for k, v in headers:
            if k == ":status" and v.isdigit():
                ex.status = int(v)
            elif k == "grpc-status":  # in the trailers, or in the head of a trailers-only answer
                ex.grpc_status = v

    def _log_decision(self, v: authz.Verdict, grpc: bool) -> None:
        """One line per decided stream, like the HTTP/1.1 guard's (authz_l7._log_decision)."""
        if self.session.fields.get("direction") != "inbound":
            return
        rec = dict(self.session.fields)
        rec.update(event="authz_request", authz_request=self.stats.requests)
        if not v.allowed:
            rec.update(reason="denied_by_policy" if v.reason != "mtls_required" else "mtls_required",
                       error=v.message, http_status=200 if grpc else 403)
            if grpc:
                rec["grpc_status"] = GRPC_PERMISSION_DENIED
        self.session._log.write(rec)

    def _refuse_stream(self, sid: int, e: BadTarget, ended: bool) -> None:
        """A request the edge refuses before deciding it (bad :path, too many headers): counted and logged."""
        meshmetrics.http_edge_refused("inbound", e.status, e.reason)
        self.session.set(http_status=e.status, http_path="")
        if self.session.fields.get("direction") == "inbound":
            rec = dict(self.session.fields)
            rec.update(event="authz_request", authz_request=self.stats.requests, reason=e.reason, error=str(e))
            self.session._log.write(rec)
        body = f"{e.reason}: {e}\n".encode()
        self.srv.send_headers(sid, [(":status", str(e.status)), ("content-type", "text/plain"),
                                    ("content-length", str(len(body))), ("x-nodemesh-reason", e.reason)])
        self.srv.send_data(sid, body)
        self.srv.end_stream(sid)
        if not ended:
            self.srv.reset(sid, h2.errors.ErrorCodes.NO_ERROR)

    def _deny(self, sid: int, v: authz.Verdict, grpc: bool, ended: bool) -> None:
        msg = deny_message(v)
        tag = f"deny; policy={v.policy}{';rule=' + str(v.rule) if v.rule is not None else ''}"
        if grpc:
            # Trailers-only: the way a gRPC server answers a call it refuses outright.
            self.srv.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc"),
                                        ("grpc-status", str(GRPC_PERMISSION_DENIED)),
                                        ("grpc-message", grpc_message_escape(msg)),
                                        ("x-nodemesh-authz", tag)], end_stream=True)
        else:
            body = (msg + "\n").encode()
            self.srv.send_headers(sid, [(":status", "403"), ("content-type", "text/plain"),
                                        ("content-length", str(len(body))), ("x-nodemesh-authz", tag)])
            self.srv.send_data(sid, body)
            self.srv.end_stream(sid)
        if not ended:
            # The answer is complete before the request is (RFC 9113 section 8.1): stop the upload.
            self.srv.reset(sid, h2.errors.ErrorCodes.NO_ERROR)

    # ---------------------------------------------------------------- workload's events
    def _workload_event(self, ev: h2.events.Event) -> None:
        if isinstance(ev, h2.events.ConnectionTerminated):
            self._goaway_from(caller=False, code=int(ev.error_code or 0), last=ev.last_stream_id)
            return
        sid = getattr(ev, "stream_id", None)
        st = self.by_workload.get(sid) if sid is not None else None
        if isinstance(ev, h2.events.DataReceived):
            if st is None:
                self.cli.acknowledge(ev.stream_id, ev.flow_controlled_length)
                return
            st.owed_down += ev.flow_controlled_length
            st.moved += 1
            if st.ex is not None:
                st.ex.response_bytes += len(ev.data)
            self.srv.send_data(st.cs, ev.data)
            if ev.stream_ended is not None:
                self._response_done(st, None)
            return
        if st is None:
            return
        if isinstance(ev, h2.events.ResponseReceived):
            ended = ev.stream_ended is not None
            st.resp_started = True
            st.moved += 1
            head = _headers(ev.headers)
            self._response_reported(st, head)
            # A trailers-only answer (HEADERS with END_STREAM) stays one frame: gRPC reads its status there.
            self.srv.send_headers(st.cs, strip_connection_headers(head), end_stream=ended)
            if ended:
                st.resp_done = True
                self._response_reported(st, None)
                self._maybe_forget(st)
        elif isinstance(ev, h2.events.InformationalResponseReceived):
            self.srv.send_headers(st.cs, _headers(ev.headers))
        elif isinstance(ev, h2.events.TrailersReceived):
            trailers = strip_connection_headers(_headers(ev.headers))
            self._response_reported(st, trailers)
            self._response_done(st, trailers)
        elif isinstance(ev, h2.events.StreamEnded):
            if not st.resp_done:
                self._response_done(st, None)
        elif isinstance(ev, h2.events.StreamReset):
            self.srv.reset(st.cs, ev.error_code)
            self._reset_reported(st, ev.error_code, "workload")
            self._drop(st)

    def _response_done(self, st: _Stream, trailers: Headers | None) -> None:
        st.resp_done = True
        st.moved += 1
        self._response_reported(st, None)
        self.srv.end_stream(st.cs, trailers)
        self._maybe_forget(st)

    # ---------------------------------------------------------------- time limits
    def head_in_progress(self) -> bool:
        """A request head (HEADERS/CONTINUATION) from the caller begun and not complete."""
        return not self.closed and self.srv.head_in_progress()

    def head_timeout(self, e: EdgeError) -> None:
        """requestHeadersTimeoutSeconds passed with a head still incomplete: GOAWAY, end the connection."""
        if self.closed:
            return
        meshmetrics.http_edge_refused("inbound", e.status, e.reason)
        log.info("h2c connection from %s: %s", self.session.fields.get("src", "?"), e.message)
        self.session.fail(e.reason, e.message)
        self.srv.close(h2.errors.ErrorCodes.NO_ERROR)
        self._flush()
        self.closed = True
        self.wire.end_caller()
        self.wire.abort_workload()

    def tick_idle(self, elapsed: float, limit: float) -> None:
        """One tick of the guard's timer: a stream that moved nothing either way
        for `limit` seconds (streamIdleTimeoutSeconds) is ended alone."""
        if self.closed:
            return
        for st in list(self.by_caller.values()):
            if st.moved != st.seen:
                st.seen, st.idle_for = st.moved, 0.0
                continue
            st.idle_for += elapsed
            if st.idle_for >= limit:
                self._stream_idle(st, limit)
        self._flush()
        self._maybe_finish()

    def _stream_idle(self, st: _Stream, limit: float) -> None:
        self.stats.idle_timeouts += 1
        meshmetrics.http_edge_refused("inbound", 408, STREAM_IDLE_TIMEOUT)
        why = f"no byte moved for {limit:g}s (MeshConfig spec.http.streamIdleTimeoutSeconds)"
        log.info("stream from %s: %s; ended", self.session.fields.get("src", "?"), why)
        if self.session.fields.get("direction") == "inbound":
            rec = dict(self.session.fields)
            rec.update(event="stream_idle_timeout", reason=STREAM_IDLE_TIMEOUT, error=why)
            self.session._log.write(rec)
        self.cli.reset(st.ws, h2.errors.ErrorCodes.CANCEL)
        if st.resp_started:
            self.srv.reset(st.cs, h2.errors.ErrorCodes.CANCEL)
        elif st.grpc:
            self.srv.send_headers(st.cs, [(":status", "200"), ("content-type", "application/grpc"),
                                          ("grpc-status", str(grpc_status_for_http(408))),
                                          ("grpc-message", grpc_message_escape(why)),
                                          ("x-nodemesh-reason", STREAM_IDLE_TIMEOUT)], end_stream=True)
        else:
            body = f"{STREAM_IDLE_TIMEOUT}: {why}\n".encode()
            self.srv.send_headers(st.cs, [(":status", "408"), ("content-type", "text/plain"),
                                          ("content-length", str(len(body))),
                                          ("x-nodemesh-reason", STREAM_IDLE_TIMEOUT)])
            self.srv.send_data(st.cs, body)
            self.srv.end_stream(st.cs)
        if not st.resp_started and not st.req_done:
            self.srv.reset(st.cs, h2.errors.ErrorCodes.NO_ERROR)  # the answer is complete: stop the upload
        self._reset_reported(st, h2.errors.ErrorCodes.CANCEL, "proxy (streamIdleTimeoutSeconds)")
        self._drop(st)

    # ---------------------------------------------------------------- flow control and lifecycle
    def _release(self, rec: Received, caller_side: bool) -> None:
        """Give window back for bytes that moved on: data queued toward the
        other peer is acknowledged to its sender only once it left the queue."""
        del rec, caller_side  # any receive may have opened a window on either side
        for st in list(self.by_caller.values()):
            if st.owed_up:
                moved = st.owed_up - self.cli.queued(st.ws)
                if moved > 0:
                    self.srv.acknowledge(st.cs, moved)
                    st.owed_up -= moved
            if st.owed_down:
                moved = st.owed_down - self.srv.queued(st.cs)
                if moved > 0:
                    self.cli.acknowledge(st.ws, moved)
                    st.owed_down -= moved
            self._maybe_forget(st)

    def _maybe_forget(self, st: _Stream) -> None:
        if st.req_done and st.resp_done and not st.owed_up and not st.owed_down \
                and not self.cli.queued(st.ws) and not self.srv.queued(st.cs):
            self._drop(st, give_back=False)

    def _drop(self, st: _Stream, give_back: bool = True) -> None:
        """Forget a stream; bytes still owed are returned to the connection windows
        (h2 credits the connection even for a closed stream)."""
        self.by_caller.pop(st.cs, None)
        self.by_workload.pop(st.ws, None)
        if give_back:
            self.srv.acknowledge(st.cs, st.owed_up)
            self.cli.acknowledge(st.ws, st.owed_down)
        self.srv.forget(st.cs)
        self.cli.forget(st.ws)

    def _goaway_from(self, caller: bool, code: int, last: int | None = None) -> None:
        self.closing = True
        if code:
            other = "workload" if caller else "caller"
            self.session.set(h2_goaway=f"from the {'caller' if caller else 'workload'}: error code {code}")
            self.cli.close(code) if caller else self.srv.close(code)
            self._flush()
            self._fail("upstream_protocol_error" if not caller else "bad_request",
                       f"GOAWAY with error code {code}; the {other} connection is closed too")
            return
        if caller:
            self.cli.close()
            return
        # Streams above the workload's last processed id were never seen: refused, the caller may retry.
        for st in list(self.by_caller.values()):
            if last is not None and st.ws > last:
                self.srv.reset(st.cs, h2.errors.ErrorCodes.REFUSED_STREAM)
                if st.ex is not None and self.report is not None:
                    self.report.drop(st.ex)  # never processed by the workload: not a request it served
                self._drop(st)
        self.srv.close()

    def _maybe_finish(self) -> None:
        if self.closing and not self.closed and not self.by_caller:
            self._flush()
            self.closed = True
            self.wire.end_caller()
            if self.workload_started:
                self.wire.end_workload()
            else:
                self.wire.abort_workload()

    def _fail(self, reason: str, message: str) -> None:
        self._flush()
        self.closed = True
        self.session.fail(reason, message)
        self.wire.abort_both()

    def _flush(self) -> None:
        out = self.srv.data_to_send()
        if out:
            self.wire.to_caller(out)
        if self.workload_started:
            out = self.cli.data_to_send()
            if out:
                self.wire.to_workload(out)


def looks_like_h2_server_start(data: bytes) -> bool:
    """Whether a workload's first bytes are an HTTP/2 SETTINGS frame (type 4,
    no ACK, stream 0): an h2 server speaking before the caller's preface."""
    return len(data) >= 9 and data[3] == 0x04 and not data[4] & 0x01 and data[5:9] == b"\x00\x00\x00\x00"


def _headers(raw: Any) -> Headers:
    """h2 gives str pairs (header_encoding utf-8); bytes only if that changes."""
    return [(k.decode() if isinstance(k, bytes) else k, v.decode() if isinstance(v, bytes) else v) for k, v in raw]

