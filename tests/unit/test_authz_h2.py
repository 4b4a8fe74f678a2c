"""gRPC / HTTP/2 per-request authorization on the receiving node, with two
in-memory h2 peers (a caller and a workload) on either side of the
InboundHttpGuard: allowed calls pass with trailers intact, denied ones get
grpc-status 7 naming the policy and rule (or 403 for plain HTTP/2), streaming,
several MB under flow control, RST_STREAM both ways, GOAWAY, and malformed
frames failing only their own connection."""

from __future__ import annotations

import math
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events

from nodeagent.meshview.snapshot import LocalWorkload
from nodeagent.proxy import authz_l7
from nodeagent.proxy.authz import inbound_facts
from nodeagent.proxy.relay import Session
from nodemesh import model
from nodemesh.security import MeshSecurity, SecurityPolicies

CLIENT = "spiffe://cluster.local/ns/default/sa/client"
OTHER = "spiffe://cluster.local/ns/shop/sa/cart"
ECHO = LocalWorkload("echo-2", "default", "echo", "10.0.0.12", (50051,), uid=2001, labels=(("app", "echo"),))

POLICY = """\
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: echo-get, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/client"]}}]
    to: [{operation: {paths: ["/echo.Echo/Get*", "/echo.Echo/Delete", "/plain/*"]}}]
---
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-delete, namespace: default}
spec:
  selector: {matchLabels: {app: echo}}
  action: DENY
  rules:
  - to: [{operation: {paths: ["/echo.Echo/Delete", "/plain/secret"]}}]
"""


class Log:
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def write(self, rec: dict[str, Any]) -> None:
        self.lines.append(rec)


class FakeEnd:
    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self.aborted = False
        self.partner: Any = None

    def send(self, data: bytes) -> None:
        self.data += data

    def send_eof(self) -> None:
        self.eof = True

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def attach(self, partner: Any) -> None:
        self.partner = partner


class Mesh:
    """A caller h2 client, the guard, and a workload h2 server, pumped by hand."""

    def __init__(self, principal: str = CLIENT, auto_ack: bool = True) -> None:
        docs = model.parse_documents(POLICY)
        pols = SecurityPolicies(MeshSecurity(), (), tuple(d.obj for d in docs if d.kind == "AuthorizationPolicy"))
        self.log = Log()
        self.session = Session(self.log, "inbound")  # type: ignore[arg-type]
        check = authz_l7.L7Check(pols, inbound_facts(ECHO, 50051, principal, "10.0.0.11"))
        self.caller_end, self.workload_end = FakeEnd(), FakeEnd()
        self.guard = authz_l7.InboundHttpGuard(check, self.workload_end, self.session)
        self.guard.attach(self.caller_end)  # type: ignore[arg-type]
        self.client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        self.server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False,
                                                                           header_encoding="utf-8"))
        self.client.initiate_connection()
        self.server.initiate_connection()
        self.auto_ack = auto_ack
        self.client_events: list[Any] = []
        self.server_events: list[Any] = []
        self.pump()

    def pump(self) -> None:
        for _ in range(10000):
            moved = False
            out = self.client.data_to_send()
            if out:
                self.guard.send(out)
                moved = True
            out = self.server.data_to_send()
            if out:
                self.guard.workload_side.send(out)
                moved = True
            if self.workload_end.data:
                data, self.workload_end.data = bytes(self.workload_end.data), bytearray()
                for ev in self.server.receive_data(data):
                    self.server_events.append(ev)
                    if isinstance(ev, h2.events.DataReceived) and self.auto_ack:
                        self.server.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                moved = True
            if self.caller_end.data:
                data, self.caller_end.data = bytes(self.caller_end.data), bytearray()
                for ev in self.client.receive_data(data):
                    self.client_events.append(ev)
                    if isinstance(ev, h2.events.DataReceived):
                        self.client.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                moved = True
            if not moved:
                return
        raise AssertionError("the peers never went quiet")

    def call(self, path: str, body: bytes = b"\x00\x00\x00\x00\x02hi", grpc: bool = True, end: bool = True) -> int:
        sid = int(self.client.get_next_available_stream_id())
        headers = [(":method", "POST"), (":scheme", "http"), (":authority", "echo.default:50051"), (":path", path)]
        if grpc:
            headers += [("content-type", "application/grpc"), ("te", "trailers")]
        self.client.send_headers(sid, headers)
        if body:
            self.client.send_data(sid, body, end_stream=end)
        elif end:
            self.client.end_stream(sid)
        self.pump()
        return sid

    def of(self, kind: type, events: list[Any], sid: int | None = None) -> list[Any]:
        return [e for e in events if isinstance(e, kind) and (sid is None or getattr(e, "stream_id", None) == sid)]

    def answer(self, ws: int, body: bytes = b"\x00\x00\x00\x00\x02ok", status: str = "0") -> None:
        self.server.send_headers(ws, [(":status", "200"), ("content-type", "application/grpc")])
        self.server.send_data(ws, body)
        self.server.send_headers(ws, [("grpc-status", status), ("grpc-message", "fine"), ("x-trailer", "kept")],
                                 end_stream=True)
        self.pump()


def test_allowed_unary_call_passes_with_trailers_intact() -> None:
    m = Mesh()
    sid = m.call("/echo.Echo/GetUser")
    req = m.of(h2.events.RequestReceived, m.server_events)
    assert len(req) == 1 and dict(req[0].headers)[":path"] == "/echo.Echo/GetUser"
    assert dict(req[0].headers)["te"] == "trailers"
    assert b"".join(e.data for e in m.of(h2.events.DataReceived, m.server_events)) == b"\x00\x00\x00\x00\x02hi"
    m.answer(req[0].stream_id)
    assert dict(m.of(h2.events.ResponseReceived, m.client_events, sid)[0].headers)[":status"] == "200"
    assert b"".join(e.data for e in m.of(h2.events.DataReceived, m.client_events, sid)) == b"\x00\x00\x00\x00\x02ok"
    trailers = dict(m.of(h2.events.TrailersReceived, m.client_events, sid)[0].headers)
    assert trailers == {"grpc-status": "0", "grpc-message": "fine", "x-trailer": "kept"}
    assert m.session.fields["authz"] == "allow"
    assert m.session.fields["authz_policy"] == "AuthorizationPolicy/default/echo-get"
    assert m.session.fields["authz_layer"] == "L7" and m.session.fields["protocol"] == "grpc"
    assert [(r["http_path"], r["authz"]) for r in m.log.lines] == [("/echo.Echo/GetUser", "allow")]
    assert not m.guard._h2.by_caller  # type: ignore[union-attr]  # the finished stream is forgotten


def test_denied_call_gets_permission_denied_naming_the_policy() -> None:
    m = Mesh()
    sid = m.call("/echo.Echo/Delete")
    resp = m.of(h2.events.ResponseReceived, m.client_events, sid)
    assert resp and m.of(h2.events.StreamEnded, m.client_events, sid)
    h = dict(resp[0].headers)
    assert h[":status"] == "200" and h["content-type"] == "application/grpc" and h["grpc-status"] == "7"
    assert h["grpc-message"] == "RBAC: access denied (policy AuthorizationPolicy/default/no-delete, rule 0)"
    assert not m.of(h2.events.RequestReceived, m.server_events)  # nothing reached the workload
    line = m.log.lines[-1]
    assert line["authz"] == "deny" and line["authz_policy"] == "AuthorizationPolicy/default/no-delete"
    assert line["authz_rule"] == 0 and line["grpc_status"] == 7 and line["http_path"] == "/echo.Echo/Delete"
    assert line["event"] == "authz_request" and line["reason"] == "denied_by_policy"
    # The connection keeps serving: an allowed call on it still goes through.
    sid2 = m.call("/echo.Echo/GetUser")
    m.answer(m.of(h2.events.RequestReceived, m.server_events)[0].stream_id)
    assert dict(m.of(h2.events.TrailersReceived, m.client_events, sid2)[0].headers)["grpc-status"] == "0"


def test_no_allow_match_and_plain_http2_get_403() -> None:
    m = Mesh(principal=OTHER)
    sid = m.call("/echo.Echo/GetUser")
    h = dict(m.of(h2.events.ResponseReceived, m.client_events, sid)[0].headers)
    assert h["grpc-status"] == "7" and "no rule matched: no_allow_match" in h["grpc-message"]
    m = Mesh()
    sid = m.call("/plain/secret", body=b"", grpc=False)
    h = dict(m.of(h2.events.ResponseReceived, m.client_events, sid)[0].headers)
    assert h[":status"] == "403" and "policy=AuthorizationPolicy/default/no-delete;rule=0" in h["x-nodemesh-authz"]
    body = b"".join(e.data for e in m.of(h2.events.DataReceived, m.client_events, sid))
    assert b"RBAC: access denied (policy AuthorizationPolicy/default/no-delete, rule 0)" in body
    assert m.log.lines[-1]["http_status"] == 403


def test_dot_segments_cannot_dodge_the_deny() -> None:
    m = Mesh()
    sid = m.call("/echo.Echo/GetX/../Delete")
    assert dict(m.of(h2.events.ResponseReceived, m.client_events, sid)[0].headers)["grpc-status"] == "7"
    assert not m.of(h2.events.RequestReceived, m.server_events)


def test_streaming_call_both_ways() -> None:
    m = Mesh()
    sid = m.call("/echo.Echo/GetStream", body=b"\x00\x00\x00\x00\x01a", end=False)
    ws = m.of(h2.events.RequestReceived, m.server_events)[0].stream_id
    m.server.send_headers(ws, [(":status", "200"), ("content-type", "application/grpc")])
    for i in range(5):
        m.client.send_data(sid, b"\x00\x00\x00\x00\x01" + bytes([48 + i]))
        m.server.send_data(ws, b"\x00\x00\x00\x00\x01" + bytes([65 + i]))
        m.pump()
    m.client.end_stream(sid)
    m.server.send_headers(ws, [("grpc-status", "0")], end_stream=True)
    m.pump()
    assert b"".join(e.data for e in m.of(h2.events.DataReceived, m.server_events)).count(b"\x00\x00\x00\x00\x01") == 6
    got = b"".join(e.data for e in m.of(h2.events.DataReceived, m.client_events, sid))
    assert got == b"".join(b"\x00\x00\x00\x00\x01" + bytes([65 + i]) for i in range(5))
    assert m.of(h2.events.StreamEnded, m.server_events) and m.of(h2.events.TrailersReceived, m.client_events, sid)


def test_several_megabytes_flow_under_flow_control() -> None:
    big = bytes(range(256)) * (6 * 4096)  # 6 MiB
    m = Mesh(auto_ack=False)  # the workload reads nothing at first
    sid = m.call("/echo.Echo/GetBlob", body=b"", end=False)
    ws = m.of(h2.events.RequestReceived, m.server_events)[0].stream_id
    sent = 0
    while sent < len(big):  # send what the caller's window allows
        n = min(m.client.local_flow_control_window(sid), m.client.max_outbound_frame_size, len(big) - sent)
        if n <= 0:
            break
        m.client.send_data(sid, big[sent:sent + n])
        sent += n
        m.pump()
    # Stalled: the caller may not send more than the guard's windows, and the guard
    # holds back no more than the workload's window lets through.
    assert 0 < sent < len(big)
    h2b = m.guard._h2
    assert h2b is not None and h2b.cli.queued(h2b.by_caller[sid].ws) <= 2 << 20
    # The workload reads: windows open end to end, everything arrives in order.
    received = bytearray(b"".join(e.data for e in m.of(h2.events.DataReceived, m.server_events)))
    for e in m.of(h2.events.DataReceived, m.server_events):
        m.server.acknowledge_received_data(e.flow_controlled_length, ws)
    m.auto_ack = True
    m.server_events.clear()
    m.pump()
    while sent < len(big):
        n = min(m.client.local_flow_control_window(sid), m.client.max_outbound_frame_size, len(big) - sent)
        assert n > 0, "the caller's window never reopened"
        m.client.send_data(sid, big[sent:sent + n], end_stream=sent + n == len(big))
        sent += n
        m.pump()
    received += b"".join(e.data for e in m.of(h2.events.DataReceived, m.server_events))
    assert bytes(received) == big and m.of(h2.events.StreamEnded, m.server_events)
    # And the same amount back to the caller.
    m.server.send_headers(ws, [(":status", "200"), ("content-type", "application/grpc")])
    done = 0
    while done < len(big):
        n = min(m.server.local_flow_control_window(ws), m.server.max_outbound_frame_size, len(big) - done)
        assert n > 0, "the workload's window never reopened"
        m.server.send_data(ws, big[done:done + n])
        done += n
        m.pump()
    m.server.send_headers(ws, [("grpc-status", "0")], end_stream=True)
    m.pump()
    assert b"".join(e.data for e in m.of(h2.events.DataReceived, m.client_events, sid)) == big
    assert dict(m.of(h2.events.TrailersReceived, m.client_events, sid)[0].headers)["grpc-status"] == "0"


def test_rst_stream_propagates_both_ways() -> None:
    m = Mesh()
    a = m.call("/echo.Echo/GetA", end=False)
    b = m.call("/echo.Echo/GetB", end=False)
    wa, wb = (e.stream_id for e in m.of(h2.events.RequestReceived, m.server_events))
    m.client.reset_stream(a, h2.errors.ErrorCodes.CANCEL)
    m.pump()
    rst = m.of(h2.events.StreamReset, m.server_events, wa)
    assert rst and rst[0].error_code == h2.errors.ErrorCodes.CANCEL
    m.server.reset_stream(wb, h2.errors.ErrorCodes.REFUSED_STREAM)
    m.pump()
    rst = m.of(h2.events.StreamReset, m.client_events, b)
    assert rst and rst[0].error_code == h2.errors.ErrorCodes.REFUSED_STREAM
    assert not m.guard._h2.by_caller  # type: ignore[union-attr]


def test_workload_goaway_refuses_unseen_streams_and_ends_the_connection() -> None:
    m = Mesh()
    a = m.call("/echo.Echo/GetA")
    b = m.call("/echo.Echo/GetB", end=False)
    wa, _wb = (e.stream_id for e in m.of(h2.events.RequestReceived, m.server_events))
    m.answer(wa)
    assert not m.caller_end.eof
    m.server.close_connection(last_stream_id=wa)  # stream B was never processed
    m.pump()
    assert dict(m.of(h2.events.TrailersReceived, m.client_events, a)[0].headers)["grpc-status"] == "0"
    rst = m.of(h2.events.StreamReset, m.client_events, b)
    assert rst and rst[0].error_code == h2.errors.ErrorCodes.REFUSED_STREAM  # safe for the caller to retry
    assert m.of(h2.events.ConnectionTerminated, m.client_events)
    assert all(end.eof for end in (m.caller_end, m.workload_end))


def test_malformed_frames_fail_only_their_connection() -> None:
    bad, good = Mesh(), Mesh()
    bad.guard.send(b"\x00\x00\x08\x06\x00\x00\x00\x00\x01garbage!!" + b"\xff" * 20)  # PING on stream 1: invalid
    assert bad.caller_end.aborted and bad.workload_end.aborted
    assert bad.session.fields["reason"] == "bad_request" and "HTTP/2" in bad.session.fields["error"]
    sid = good.call("/echo.Echo/GetUser")
    good.answer(good.of(h2.events.RequestReceived, good.server_events)[0].stream_id)
    assert dict(good.of(h2.events.TrailersReceived, good.client_events, sid)[0].headers)["grpc-status"] == "0"
    assert not good.caller_end.aborted


def test_preface_in_pieces_switches_to_h2() -> None:
    m = Mesh()
    assert m.guard.state == authz_l7.H2 and m.session.fields["protocol"] == "http2"
    # A guard that gets the preface a few bytes at a time gets there too, and speaks h2 to the workload.
    g = authz_l7.InboundHttpGuard(m.guard.check, FakeEnd(), Session(Log(), "inbound"))  # type: ignore[arg-type]
    caller = FakeEnd()
    g.attach(caller)  # type: ignore[arg-type]
    preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    for i in range(0, len(preface), 3):
        g.send(preface[i:i + 3])
    assert g.state == authz_l7.H2 and caller.data[3] == 0x04  # our SETTINGS frame toward the caller
    assert not g.up.data  # the workload hears nothing until a request is allowed


def test_workload_settings_before_the_callers_preface_are_held() -> None:
    """An h2 server may send SETTINGS on accept; that must not make the guard decide at L4."""
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    server.initiate_connection()
    g = authz_l7.InboundHttpGuard(Mesh().guard.check, FakeEnd(), Session(Log(), "inbound"))  # type: ignore[arg-type]
    caller = FakeEnd()
    g.attach(caller)  # type: ignore[arg-type]
    g.workload_side.send(server.data_to_send())
    assert g.state == authz_l7.DETECT and not caller.data and not caller.aborted
    g.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
    assert g.state == authz_l7.H2 and not caller.aborted
    assert g._h2 is not None and not g._h2.closed


def test_a_caller_that_writes_before_attach_gets_the_guards_settings() -> None:
    """The same-node HTTP/2 stack starts its H2Upstream (preface sent into the
    guard) before it attaches the guard to it: the bridge's SETTINGS and its
    connection WINDOW_UPDATE are produced while the guard has no caller yet.
    They must be held and delivered on attach(); dropped, the upstream's windows
    stay at 65535 and a 3 MiB request stalls for good (DEADLINE_EXCEEDED)."""
    from nodeagent.proxy.http.h2upstream import H2Upstream, StreamHandler

    docs = model.parse_documents(POLICY)
    pols = SecurityPolicies(MeshSecurity(), (), tuple(d.obj for d in docs if d.kind == "AuthorizationPolicy"))
    check = authz_l7.L7Check(pols, inbound_facts(ECHO, 50051, CLIENT, "10.0.0.12"))
    workload_end = FakeEnd()
    guard = authz_l7.InboundHttpGuard(check, workload_end, Session(Log(), "outbound"))  # type: ignore[arg-type]
    conn = H2Upstream(("k",), "echo-2")
    conn.start(guard)  # the order of h2upstream.H2UpstreamPool._connect's same-node branch
    guard.attach(conn)
    assert guard._h2 is not None
    assert conn.core.h2.remote_settings.initial_window_size == 1 << 20  # the guard's SETTINGS arrived
    server = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False, header_encoding="utf-8"))
    server.initiate_connection()
    received = bytearray()

    def pump_workload() -> None:
        while True:
            out = server.data_to_send()
            if out:
                guard.workload_side.send(out)
            if not workload_end.data:
                if not out:
                    return
                continue
            data, workload_end.data = bytes(workload_end.data), bytearray()
            for ev in server.receive_data(data):
                if isinstance(ev, h2.events.DataReceived):
                    received.extend(ev.data)
                    server.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)

    sid = conn.open_stream([(":method", "POST"), (":scheme", "http"), (":authority", "echo:50051"),
                            (":path", "/echo.Echo/GetItem"), ("content-type", "application/grpc"),
                            ("te", "trailers")], StreamHandler(), end_stream=False)
    big = bytes(range(256)) * (12 * 1024)  # 3 MiB
    for i in range(0, len(big), 16384):
        conn.core.send_data(sid, big[i:i + 16384])
        conn.flush()
        pump_workload()
    conn.core.end_stream(sid)
    conn.flush()
    pump_workload()
    assert conn.core.queued(sid) == 0, "the upstream's window toward the guard never reopened"
    assert bytes(received) == big


def test_eof_for_the_caller_before_attach_is_delivered_on_attach() -> None:
    check = authz_l7.L7Check(SecurityPolicies(MeshSecurity(), (), ()),
                             inbound_facts(ECHO, 50051, CLIENT, "10.0.0.12"))
    guard = authz_l7.InboundHttpGuard(check, FakeEnd(), Session(Log(), "outbound"))  # type: ignore[arg-type]
    guard.send(b"\x16\x03\x01")  # not HTTP: decided at L4 (allowed), relayed
    guard.workload_side.send(b"banner")
    guard.workload_side.send_eof()
    caller = FakeEnd()
    guard.attach(caller)  # type: ignore[arg-type]
    assert bytes(caller.data) == b"banner" and caller.eof


# -- the guard's own time limits for HTTP/2 (MeshConfig spec.http), its timer driven by hand --

def test_stream_idle_timeout_ends_only_the_quiet_stream() -> None:
    m = Mesh()
    limit = m.guard.limits.stream_idle_timeout_s
    quiet = m.call("/echo.Echo/GetQuiet", end=False)  # no response yet: answered 408 / its gRPC status
    busy = m.call("/echo.Echo/GetBusy", end=False)
    started = m.call("/plain/started", body=b"", grpc=False, end=False)  # response begun: reset
    wq, wb, ws = (e.stream_id for e in m.of(h2.events.RequestReceived, m.server_events))
    m.server.send_headers(ws, [(":status", "200")])
    m.pump()
    period = m.guard.timer.period
    assert period <= limit / 4  # ticks often enough for the stream limit
    ticks = math.ceil(limit / period)  # the first tick starts each stream's clock, then this many reach it
    for _ in range(ticks):
        assert m.guard.timer.tick(period)
    m.client.send_data(busy, b"\x00\x00\x00\x00\x01z")  # the busy stream keeps moving
    m.pump()
    assert not m.of(h2.events.StreamReset, m.server_events)  # below the limit: nothing ended
    assert m.guard.timer.tick(period)  # the connection's timer keeps ticking after a stream limit
    m.pump()
    h = dict(m.of(h2.events.ResponseReceived, m.client_events, quiet)[0].headers)
    assert h["grpc-status"] == "2" and h["x-nodemesh-reason"] == "stream_idle_timeout"  # 408 as gRPC: UNKNOWN
    assert "streamIdleTimeoutSeconds" in h["grpc-message"]
    assert [e.stream_id for e in m.of(h2.events.StreamReset, m.server_events)] == [wq, ws]  # cancelled upstream
    assert m.of(h2.events.StreamReset, m.client_events, started)  # its response had begun: reset
    assert not m.of(h2.events.StreamReset, m.client_events, busy) and wb in {
        e.stream_id for e in m.of(h2.events.DataReceived, m.server_events)}
    assert m.guard._h2.stats.idle_timeouts == 2  # type: ignore[union-attr]
    assert [r["event"] for r in m.log.lines if r.get("reason") == "stream_idle_timeout"] == ["stream_idle_timeout"] * 2
    assert not m.caller_end.eof and not m.caller_end.aborted  # the connection lives on
    sid = m.call("/echo.Echo/GetAfter")
    m.answer(m.of(h2.events.RequestReceived, m.server_events)[-1].stream_id)
    assert dict(m.of(h2.events.TrailersReceived, m.client_events, sid)[0].headers)["grpc-status"] == "0"


def test_request_head_timeout_ends_the_connection_with_goaway() -> None:
    m = Mesh()
    head_s = m.guard.limits.request_head_timeout_s
    m.guard.timer.tick(head_s * 2)  # a connection with no head pending: nothing fires, however long
    assert not m.of(h2.events.ConnectionTerminated, m.client_events)
    # HEADERS without END_HEADERS (":method GET", indexed): the block waits for a CONTINUATION that never comes.
    m.guard.send(b"\x00\x00\x01\x01\x00\x00\x00\x00\x01\x82")
    assert m.guard._h2.head_in_progress()  # type: ignore[union-attr]
    assert m.guard.timer.tick(head_s / 2)  # the first tick that sees the head starts its clock
    assert m.guard.timer.tick(head_s / 2)
    assert not m.guard.timer.tick(head_s / 2)  # fired
    m.pump()
    assert m.of(h2.events.ConnectionTerminated, m.client_events)  # GOAWAY
    assert m.caller_end.eof and m.workload_end.aborted
    assert m.session.fields["reason"] == "request_head_timeout"
    assert m.session.fields["error"].endswith(f"the request head did not arrive within {head_s:g}s")
    assert not m.of(h2.events.RequestReceived, m.server_events)
