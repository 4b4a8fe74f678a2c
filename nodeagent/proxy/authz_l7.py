"""AuthorizationPolicy at L7 on the receiving node: when a policy that applies
to the destination workload has HTTP rules (methods, paths, hosts,
request.headers[...]), the inbound connection is not decided at connect time
but per request. An InboundHttpGuard sits between the caller's end (an HBONE
CONNECT stream, a plaintext socket, or a same-node caller) and the workload's
TCP end, looks at the caller's first bytes, and

- for HTTP/1.x parses every request with h11, decides it with
  authz.evaluate(..., http=HttpFacts), forwards allowed requests (re-framed by
  h11, path normalised as checked) and answers a denied one itself with
  403 and `Connection: close`;
- for the HTTP/2 preface (gRPC over h2c) terminates HTTP/2 and decides each
  stream (authz_h2.py: grpc-status 7 PERMISSION_DENIED, or 403);
- for anything else (opaque TCP, a server-first protocol) decides once with the
  L4 semantics of authz.evaluate (an HTTP-only ALLOW rule never matches, an
  HTTP-only DENY rule is decided on its L4 parts) and then relays bytes.

The decision (policy, rule, reason) goes into the inbound session's access
log fields, like the L4 decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from dataclasses import dataclass, replace
from typing import Any

import h11

from nodeagent.snapshot import LocalWorkload, Snapshot
from nodemesh.security import MTLS_STRICT, SecurityPolicies

from . import authz, authz_h2, detect
from .relay import End, Session

# How long a denied caller may keep its side open after the 403 before the stream is cut.
DENIED_LINGER_S = 5.0
_UNRESERVED = re.compile(r"%(4[1-9A-F]|5[0-9A]|6[1-9A-F]|7[0-9A]|3[0-9]|2D|2E|5F|7E)", re.IGNORECASE)


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


def wrap(check: L7Check | None, upstream: Any, session: Session) -> Any:
    """The end to give the caller: the workload's own end when L4 decided, else a guard in front of it."""
    return upstream if check is None else InboundHttpGuard(check, upstream, session)


def normalize_path(target: str) -> tuple[str, str]:
    """(path as checked, query) of a request target: unreserved %-escapes decoded
    and dot segments removed (RFC 3986 section 6.2.2), so that /public/../admin
    is checked, and forwarded, as /admin."""
    path, sep, query = target.partition("?")
    if not path.startswith("/"):
        return path, (sep + query)  # "*" (OPTIONS) or an absolute form, decided as written
    path = _UNRESERVED.sub(lambda m: chr(int(m.group(1), 16)), path)
    out: list[str] = []
    segments = path.split("/")[1:]
    for i, seg in enumerate(segments):
        last = i == len(segments) - 1
        if seg == "..":
            if out:
                out.pop()
            if last:
                out.append("")
        elif seg == ".":
            if last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out), (sep + query)


DETECT, PASS, HTTP, CLOSED = "detect", "pass", "http", "closed"
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
        if self.g.caller is not None:
            self.g.caller.pause_reading()

    def resume_reading(self) -> None:
        if self.g.caller is not None:
            self.g.caller.resume_reading()


class InboundHttpGuard:
    """A relay End between the caller and the workload that decides each HTTP
    request (see the module docstring). Response bytes are passed back as
    h11 re-frames them; a denied request gets 403 and the connection ends."""

    def __init__(self, check: L7Check, upstream: Any, session: Session) -> None:
        self.check = check
        self.up = upstream  # the workload's TcpEnd
        self.session = session
        self.caller: End | None = None
        self.workload_side = _WorkloadSide(self)
        self.rx = 0
        self.tx = 0
        self.state = DETECT
        self._buf = bytearray()
        self._srv = h11.Connection(h11.SERVER)  # the caller's requests
        self._cli = h11.Connection(h11.CLIENT)  # the same requests, to the workload
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
        elif self.state == HTTP:
            try:
                self._srv.receive_data(data)
            except RuntimeError:  # bytes after the caller's EOF: nothing to do with them
                return
            self._pump_requests()
        elif self.state == DETECT:
            self._buf += data
            kind = detect.sniff(bytes(self._buf))
            if kind == detect.HTTP1:
                self.state = HTTP
                self.session.set(authz_layer="L7")
                buf, self._buf = bytes(self._buf), bytearray()
                self._srv.receive_data(buf)
                self._pump_requests()
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
        elif self.state == HTTP:
            with contextlib.suppress(RuntimeError):
                self._srv.receive_data(b"")
            self._pump_requests()

    def abort(self) -> None:
        self.state = CLOSED
        self.up.abort()

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
            try:
                self._cli.receive_data(data)
            except RuntimeError:
                return
            self._pump_responses()

    def workload_eof(self) -> None:
        if self.state == DETECT:
            self._decide_l4(detect.TCP)
        if self.state == PASS:
            self._caller_eof()
        elif self.state == H2 and self._h2 is not None:
            self._h2.workload_eof()
        elif self.state == HTTP:
            with contextlib.suppress(RuntimeError):
                self._cli.receive_data(b"")
            self._pump_responses()
            if self.state == HTTP:
                self._caller_eof()

    def workload_aborted(self) -> None:
        self.state = CLOSED
        if self.caller is not None:
            self.caller.abort()

    # -- decisions --
    def _start_h2(self) -> None:
        """The HTTP/2 preface: terminate h2c and decide each stream (authz_h2.py)."""
        self.state = H2
        self.session.set(authz_layer="L7", protocol=detect.HTTP2)
        self._h2 = authz_h2.H2AuthzBridge(self.check, self.session, authz_h2.Wire(
            to_caller=self._to_caller, to_workload=self.up.send, end_caller=self._caller_eof,
            end_workload=self.up.send_eof, abort_both=self._close_both, abort_workload=self.up.abort))
        buf, self._buf = bytes(self._buf), bytearray()
        self._h2.from_caller(buf)
        self._release_early()

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

    def _facts(self, req: h11.Request, path: str) -> authz.RequestFacts:
        headers = tuple((k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in req.headers)
        host = next((v for k, v in headers if k == "host"), "")
        http = authz.HttpFacts(req.method.decode("latin-1").upper(), path, host, headers)
        return replace(self.check.facts, http=http)

    def _pump_requests(self) -> None:
        while self.state == HTTP:
            try:
                ev = self._srv.next_event()
            except h11.RemoteProtocolError as e:
                self._bad_request(e)
                return
            if ev is h11.NEED_DATA or ev is h11.PAUSED:
                return
            if isinstance(ev, h11.Request):
                if not self._on_request(ev):
                    return
            elif isinstance(ev, (h11.Data, h11.EndOfMessage)):
                self._to_workload(ev)
            elif isinstance(ev, h11.ConnectionClosed):
                self.up.send_eof()
                return

    def _on_request(self, req: h11.Request) -> bool:
        self.requests += 1
        path, query = normalize_path(req.target.decode("latin-1"))
        facts = self._facts(req, path)
        v = authz.evaluate(self.check.policies, facts)
        authz.STATS.record(v)
        self.session.set(**v.log_fields(), http_method=facts.http.method if facts.http else "",
                         http_path=path, authz_requests=self.requests)
        self._log_decision(v)
        if not v.allowed:
            self._deny(v)
            return False
        headers = list(req.headers)
        if facts.http is not None and not facts.http.host:
            # HTTP/1.0 without Host: h11 speaks HTTP/1.1 to the workload, which needs one.
            headers.append((b"host", b"localhost"))
        self._to_workload(h11.Request(method=req.method, target=(path + query).encode("latin-1"), headers=headers))
        return True

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
        except h11.LocalProtocolError as e:
            self._bad_request(e)
            return
        if out:
            self.up.send(out)

    def _pump_responses(self) -> None:
        while self.state == HTTP:
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
            try:
                out = self._srv.send(ev)
            except h11.LocalProtocolError as e:
                self.session.fail("upstream_protocol_error", f"cannot relay the workload's response: {e}")
                self._close_both()
                return
            if out:
                self._to_caller(out)
            if isinstance(ev, h11.InformationalResponse) and ev.status_code == 101:
                self._switched()
                return
            if isinstance(ev, h11.EndOfMessage):
                self._end_of_response()

    def _end_of_response(self) -> None:
        srv, cli = self._srv, self._cli
        if srv.our_state is h11.MUST_CLOSE or cli.our_state is h11.MUST_CLOSE or cli.their_state is h11.MUST_CLOSE:
            # One side asked for close: the response is complete, end the caller's stream.
            self._caller_eof()
            self.up.send_eof()
            return
        if srv.states == {h11.CLIENT: h11.DONE, h11.SERVER: h11.DONE} and cli.states == srv.states:
            srv.start_next_cycle()
            cli.start_next_cycle()
            self._pump_requests()  # a pipelined request h11 held back

    def _switched(self) -> None:
        """101 Switching Protocols (e.g. WebSocket): the request was allowed; relay bytes from now on."""
        self.state = PASS
        down, _ = self._srv.trailing_data
        up, _ = self._cli.trailing_data
        if up:
            self._to_caller(bytes(up))
        if down:
            self.up.send(bytes(down))

    def _deny(self, v: authz.Verdict) -> None:
        self.denied += 1
        body = f"RBAC: access denied: {v.message} (reason {v.reason})\n".encode()
        self.session.fail("denied_by_policy", v.message)
        self.session.set(http_status=403)
        out = b""
        try:
            out += self._srv.send(h11.Response(status_code=403, reason=b"Forbidden", headers=[
                ("content-type", "text/plain"), ("content-length", str(len(body))), ("connection", "close"),
                ("x-nodemesh-authz", f"deny; policy={v.policy}{';rule=' + str(v.rule) if v.rule is not None else ''}"),
            ])) or b""
            out += self._srv.send(h11.Data(data=body)) or b""
            out += self._srv.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            out = b""  # a response already started on this connection: just close
        self.state = CLOSED
        if out:
            self._to_caller(out)
        self._caller_eof()
        self.up.abort()
        self._linger_then_abort()

    def _bad_request(self, e: Exception) -> None:
        self.session.fail("bad_request", f"malformed HTTP request from the caller: {e}")
        self.session.set(http_status=400)
        out = b""
        with contextlib.suppress(h11.LocalProtocolError):
            body = f"bad request: {e}\n".encode()
            out += self._srv.send(h11.Response(status_code=400, reason=b"Bad Request", headers=[
                ("content-type", "text/plain"), ("content-length", str(len(body))), ("connection", "close")])) or b""
            out += self._srv.send(h11.Data(data=body)) or b""
            out += self._srv.send(h11.EndOfMessage()) or b""
        self.state = CLOSED
        if out:
            self._to_caller(out)
        self._caller_eof()
        self.up.abort()
        self._linger_then_abort()

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
