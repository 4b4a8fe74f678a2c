"""nodeagent.observe.h2watch: the passive HTTP/2 observer, fed byte streams that h2's
own client and server connections produce (so the frames and HPACK state are
what a real peer sends)."""

from __future__ import annotations

import random
from typing import ClassVar

import h2.config
import h2.connection
import h2.errors
import h2.settings
import pytest

from nodeagent.observe.h2watch import H2Watch
from nodeagent.observe.httpwatch import Exchange

TP = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Pair:
    """An h2 client and server with an H2Watch on the wire between them."""

    def __init__(self, chunk: int = 0, server_settings: dict[int, int] | None = None) -> None:
        self.cli = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.srv = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
        self.t = 0.0
        self.started: list[Exchange] = []
        self.done: list[Exchange] = []
        self.watch = H2Watch(self.started.append, self.done.append, clock=lambda: self.t)
        self.chunk = chunk  # feed in pieces of this size (0: whole writes)
        self.wire: dict[str, bytearray] = {"up": bytearray(), "down": bytearray()}
        self.cli.initiate_connection()
        self.srv.initiate_connection()
        if server_settings:
            self.srv.update_settings(server_settings)
        self.pump()

    def _feed(self, fn: object, data: bytes) -> None:
        if not self.chunk:
            fn(data)  # type: ignore[operator]
            return
        for i in range(0, len(data), self.chunk):
            fn(data[i:i + self.chunk])  # type: ignore[operator]

    def pump(self) -> list[object]:
        events: list[object] = []
        for _ in range(10):
            up = self.cli.data_to_send()
            if up:
                self.wire["up"] += up
                self._feed(self.watch.request, up)
                events += self.srv.receive_data(up)
            down = self.srv.data_to_send()
            if down:
                self.wire["down"] += down
                self._feed(self.watch.response, down)
                events += self.cli.receive_data(down)
            if not up and not down:
                break
        return events

    def grpc_request(self, path: str, body: bytes, extra: list[tuple[str, str]] | None = None) -> int:
        sid = self.cli.get_next_available_stream_id()
        self.cli.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", path),
                                    (":authority", "echo.default.svc.mesh:50051"),
                                    ("content-type", "application/grpc"), ("te", "trailers"),
                                    *(extra or [])])
        self.cli.send_data(sid, frame(body), end_stream=True)
        self.pump()
        return sid

    def grpc_response(self, sid: int, messages: list[bytes], status: int, padding: int = 0) -> None:
        self.srv.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
        for m in messages:
            self.srv.send_data(sid, frame(m), pad_length=padding or None)
        self.srv.send_headers(sid, [("grpc-status", str(status)), ("grpc-message", "x")], end_stream=True)
        self.pump()


def frame(msg: bytes) -> bytes:
    return b"\x00" + len(msg).to_bytes(4, "big") + msg


def test_unary_grpc_ok_and_not_found() -> None:
    p = Pair()
    sid = p.grpc_request("/test.Echo/Unary", b"hello", [("traceparent", TP)])
    assert len(p.started) == 1 and not p.done
    ex = p.started[0]
    assert (ex.method, ex.target, ex.grpc) == ("POST", "/test.Echo/Unary", True)
    assert ex.extra["grpc_service"] == "test.Echo" and ex.extra["grpc_method"] == "Unary"
    assert ex.extra["authority"] == "echo.default.svc.mesh:50051"
    assert ex.trace_headers == (("traceparent", TP),)
    assert ex.request_done and ex.request_bytes == 10
    p.t = 0.25
    p.grpc_response(sid, [b"world!"], 0)
    assert p.done == [ex]
    assert (ex.status, ex.grpc_status, ex.response_bytes, ex.complete) == (200, "0", 11, True)
    assert ex.duration_ms == pytest.approx(250.0)

    sid = p.grpc_request("/test.Echo/Unary", b"notfound")
    p.grpc_response(sid, [], 5)
    assert [(e.status, e.grpc_status) for e in p.done] == [(200, "0"), (200, "5")]
    assert not p.watch.stopped and p.watch.is_l7 and not p.watch.streams


def test_server_streaming_and_padding_chunked_byte_by_byte() -> None:
    p = Pair(chunk=1)
    sid = p.grpc_request("/test.Echo/Stream", b"3")
    p.grpc_response(sid, [b"a-0", b"a-1", b"a-2"], 0, padding=7)
    (ex,) = p.done
    assert ex.response_bytes == 3 * 8  # padding is not body
    assert ex.grpc_status == "0" and ex.status == 200


def test_trailers_only_response() -> None:
    p = Pair()
    sid = p.grpc_request("/test.Echo/Unary", b"x")
    p.srv.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc"), ("grpc-status", "5")],
                       end_stream=True)
    p.pump()
    (ex,) = p.done
    assert (ex.status, ex.grpc_status, ex.response_bytes) == (200, "5", 0)


def test_rst_stream_by_client_and_by_workload() -> None:
    p = Pair()
    sid = p.grpc_request("/test.Echo/Stream", b"100")
    p.srv.send_headers(sid, [(":status", "200"), ("content-type", "application/grpc")])
    p.srv.send_data(sid, frame(b"a"))
    p.pump()
    p.cli.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
    p.pump()
    (ex,) = p.done
    assert ex.extra["reset"] == int(h2.errors.ErrorCodes.CANCEL) and ex.extra["reset_by"] == "client"
    # Late frames of the reset stream are not a new request.
    p.watch.request(b"\x00\x00\x01\x01\x05" + sid.to_bytes(4, "big") + b"\x82")  # HEADERS: :method GET
    assert len(p.started) == 1 and not p.watch.stopped
    assert ex.status == 200 and not ex.complete and ex.response_bytes == 6

    sid = p.grpc_request("/test.Echo/Unary", b"y")
    p.srv.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)
    p.pump()
    assert p.done[1].extra["reset_by"] == "workload" and p.done[1].status == 0


def test_hpack_dynamic_table_reused_across_requests_and_table_size_setting() -> None:
    p = Pair(server_settings={h2.settings.SettingCodes.HEADER_TABLE_SIZE: 256})
    for i in range(5):
        sid = p.grpc_request("/test.Echo/Unary", b"z", [("x-custom", "same-value-every-time"),
                                                        ("x-n", f"value-{i}")])
        p.grpc_response(sid, [b"ok"], 0)
    assert [e.extra["stream"] for e in p.done] == [1, 3, 5, 7, 9]
    assert all(e.target == "/test.Echo/Unary" and e.grpc_status == "0" for e in p.done)
    assert not p.watch.stopped


def test_continuation_frames() -> None:
    p = Pair()
    big = [(f"x-h{i}", "v" * 900) for i in range(40)]  # ~36 KB of headers: HEADERS + CONTINUATION
    sid = p.grpc_request("/test.Echo/Unary", b"c", big)
    p.srv.send_headers(sid, [(":status", "200"), *big])
    p.srv.send_headers(sid, [("grpc-status", "0")], end_stream=True)
    p.pump()
    (ex,) = p.done
    assert (ex.method, ex.status, ex.grpc_status) == ("POST", 200, "0")


def test_plain_http2_get_and_close_with_open_stream() -> None:
    p = Pair()
    sid = p.cli.get_next_available_stream_id()
    p.cli.send_headers(sid, [(":method", "GET"), (":scheme", "http"), (":path", "/a?b=c"), (":authority", "w")],
                       end_stream=True)
    p.pump()
    p.srv.send_headers(sid, [(":status", "404")])
    p.srv.send_data(sid, b"nope", end_stream=True)
    p.pump()
    sid2 = p.cli.get_next_available_stream_id()
    p.cli.send_headers(sid2, [(":method", "GET"), (":scheme", "http"), (":path", "/slow"), (":authority", "w")],
                       end_stream=True)
    p.pump()
    left = p.watch.close()
    assert [(e.method, e.status, e.grpc, e.response_bytes) for e in p.done] == [("GET", 404, False, 4),
                                                                               ("GET", 0, False, 0)]
    assert left == [p.done[1]] and p.watch.is_l7


def test_not_http2_stops_silently() -> None:
    done: list[Exchange] = []
    w = H2Watch(done.append, done.append)
    w.request(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    assert w.stopped and w.failed and not w.is_l7
    w.response(b"HTTP/1.1 200 OK\r\n\r\n")
    assert done == []


def test_malformed_frame_after_preface_stops() -> None:
    p = Pair()
    sid = p.grpc_request("/test.Echo/Unary", b"x")
    # A SETTINGS frame whose length is not a multiple of 6.
    p.watch.request(b"\x00\x00\x05\x04\x00\x00\x00\x00\x00" + b"\x00" * 5)
    assert p.watch.failed and not p.watch.is_l7
    assert [e.extra["stream"] for e in p.done] == [sid] and p.done[0].extra["abandoned"]


def test_fuzz_random_bytes_never_raise() -> None:
    rnd = random.Random(6)
    q = Pair()
    s = q.grpc_request("/test.Echo/Unary", b"seed", [("x-a", "b")])
    q.grpc_response(s, [b"r"], 5, padding=3)
    up, down = bytes(q.wire["up"]), bytes(q.wire["down"])
    for _ in range(300):
        w = H2Watch(lambda ex: None, lambda ex: None)
        if rnd.random() < 0.3:
            blob = bytes(rnd.getrandbits(8) for _ in range(rnd.randrange(0, 400)))
            w.request(blob)
            w.response(blob[::-1])
        else:  # a valid stream with a few bytes flipped: reaches deep into the parser
            b1, b2 = bytearray(up), bytearray(down)
            for buf in (b1, b2):
                for _ in range(rnd.randrange(1, 4)):
                    i = rnd.randrange(24 if buf is b1 else 0, len(buf))
                    buf[i] = rnd.getrandbits(8)
            for i in range(0, max(len(b1), len(b2)), 17):
                w.request(bytes(b1[i:i + 17]))
                w.response(bytes(b2[i:i + 17]))
        w.close()


def test_telemetry_reports_grpc_on_the_destination_and_sees_early_server_bytes() -> None:
    """ProxyTelemetry picks the HTTP/2 watch for a grpc port, feeds it the server
    SETTINGS the workload wrote before the tap was set, and reports each call as a
    reporter=destination request, not a TCP connection."""
    from nodeagent.meshview.snapshot import (
        Endpoint,
        LocalWorkload,
        MeshSettings,
        Service,
        ServicePort,
        Snapshot,
        Workload,
    )
    from nodeagent.observe import meshmetrics
    from nodeagent.proxy.inbound import InboundTarget
    from nodemesh.prom import parse, render, select
    from tests.unit.test_metrics import _FakeProxy

    ep = Endpoint("10.0.0.2", 50051, "default/echo-2", "spiffe://td/ns/default/sa/echo", "n2", "10.0.0.2")
    svc = Service("echo", "default", "240.240.0.2", (ServicePort(50051, 50051, protocol="grpc", endpoints=(ep,)),))
    wl = Workload("client", "default", "client", "n1", "10.0.0.1", (), "spiffe://td/ns/default/sa/client", "10.0.0.1")
    snap = Snapshot("v1", "n2", MeshSettings(trust_domain="td", dns_domain="mesh"), services=(svc,), workloads=(wl,))
    meshmetrics.REGISTRY.reset()
    proxy = _FakeProxy(snap)
    conn = proxy.new_session("inbound", source_principal="spiffe://td/ns/default/sa/client",
                             dst_addr="10.0.0.2:50051", via="hbone", tls=True, dst_workload="default/echo-2")
    p = Pair()  # its own watch saw everything; replay the wire into the telemetry's
    sid = p.grpc_request("/test.Echo/Unary", b"a", [("traceparent", TP)])
    p.grpc_response(sid, [b"echo"], 0)
    sid = p.grpc_request("/test.Echo/Unary", b"notfound")
    p.grpc_response(sid, [], 5)
    up, down = bytes(p.wire["up"]), bytes(p.wire["down"])

    class End:
        tap: object = None
        _early: ClassVar[list[bytes]] = [down[:9 + int.from_bytes(down[:3], "big")]]  # server SETTINGS, pre-tap

    end = End()
    lw = LocalWorkload("echo-2", "default", "echo", "10.0.0.2", (50051,), uid=2005)
    proxy.telemetry.workload_end(conn, end,  # type: ignore[arg-type]
                                 InboundTarget(lw, "spiffe://td/ns/default/sa/echo", "10.0.0.2", 50051))
    assert isinstance(end.tap, H2Watch)
    conn.connected()
    end.tap.request(up)
    end.tap.response(down[len(End._early[0]):])
    assert not end.tap.stopped and end.tap.exchanges == 2
    conn.finish()
    s = parse(render(meshmetrics.REGISTRY.collect()))
    reqs = select(s, "istio_requests_total", reporter="destination")
    assert sorted((d["grpc_response_status"], d["response_code"], d["request_protocol"], v) for d, v in reqs) == [
        ("0", "200", "grpc", 1.0), ("5", "200", "grpc", 1.0)]
    assert select(s, "istio_tcp_connections_closed_total") == []
    lines = [r for r in proxy.lines if "method" in r]
    assert [(r["path"], r["authority"]) for r in lines] == [("/test.Echo/Unary", "echo.default.svc.mesh:50051")] * 2
    assert lines[0]["trace_id"] == TP.split("-")[1]
    meshmetrics.REGISTRY.reset()
