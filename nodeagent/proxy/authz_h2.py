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

The bridge does no I/O: bytes come in through from_caller()/from_workload() and
go out through the Wire callbacks, so it is tested with two in-memory peers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import h2.errors
import h2.events
import h2.exceptions

from nodeagent.observe import meshmetrics

from . import authz
from .http.h2core import (
    GRPC_PERMISSION_DENIED,
    H2Core,
    Headers,
    Received,
    grpc_message_escape,
    header_value,
    is_grpc,
    strip_connection_headers,
)
from .http.pathnorm import BadTarget, normalize_target
from .relay import Session


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


@dataclass
class BridgeStats:
    requests: int = 0
    allowed: int = 0
    denied: int = 0
    decisions: list[tuple[str, str, int | None]] = field(default_factory=list)  # (path, allow|deny, rule), last 32


def deny_message(v: authz.Verdict) -> str:
    """What a denied caller reads: the policy and the rule (or why none matched)."""
    rule = f"rule {v.rule}" if v.rule is not None else f"no rule matched: {v.reason}"
    return f"RBAC: access denied (policy {v.policy or 'none'}, {rule})"


class H2AuthzBridge:
    """One h2c connection from a caller to the workload, decided per stream."""

    def __init__(self, check: Any, session: Session, wire: Wire) -> None:
        self.check = check  # authz_l7.L7Check: the policies and the connection's L4 facts
        self.session = session
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
                self._drop(st)
        elif isinstance(ev, h2.events.ConnectionTerminated):
            self._goaway_from(caller=True, code=int(ev.error_code or 0))

    def _request_done(self, st: _Stream, trailers: Headers | None) -> None:
        st.req_done = True
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
        st = _Stream(sid, ws, req_done=ended)
        self.by_caller[sid] = st
        self.by_workload[ws] = st

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
            self.srv.send_data(st.cs, ev.data)
            if ev.stream_ended is not None:
                self._response_done(st, None)
            return
        if st is None:
            return
        if isinstance(ev, h2.events.ResponseReceived):
            ended = ev.stream_ended is not None
            # A trailers-only answer (HEADERS with END_STREAM) stays one frame: gRPC reads its status there.
            self.srv.send_headers(st.cs, strip_connection_headers(_headers(ev.headers)), end_stream=ended)
            if ended:
                st.resp_done = True
                self._maybe_forget(st)
        elif isinstance(ev, h2.events.InformationalResponseReceived):
            self.srv.send_headers(st.cs, _headers(ev.headers))
        elif isinstance(ev, h2.events.TrailersReceived):
            self._response_done(st, strip_connection_headers(_headers(ev.headers)))
        elif isinstance(ev, h2.events.StreamEnded):
            if not st.resp_done:
                self._response_done(st, None)
        elif isinstance(ev, h2.events.StreamReset):
            self.srv.reset(st.cs, ev.error_code)
            self._drop(st)

    def _response_done(self, st: _Stream, trailers: Headers | None) -> None:
        st.resp_done = True
        self.srv.end_stream(st.cs, trailers)
        self._maybe_forget(st)

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

