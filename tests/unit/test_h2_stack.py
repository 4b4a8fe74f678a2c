"""The h2c/gRPC L7 stack end to end on loopback: node proxies A and B in one
process over real mTLS HBONE, real grpcio servers on B and a real grpcio
client whose connection A's outbound listener takes as if captured. Route
tables go straight into the snapshot (the xDS path is in test_http_xds.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import socket
import threading
import time
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import h2.errors
import h2.events
import uvloop

from nodeagent.meshview.l7snapshot import ClusterPolicy, MirrorTo, RouteEntry, RouteTable, WeightedCluster
from nodeagent.meshview.snapshot import Endpoint, LocalWorkload, MeshSettings, Service, ServicePort, Snapshot, Workload
from nodeagent.proxy.accesslog import AccessLog
from nodeagent.proxy.http.h2core import MAX_STREAM_ID, H2Core
from nodeagent.proxy.http.pipeline import shadow_authority
from nodeagent.proxy.outbound import by_uid
from nodeagent.proxy.proxy import NodeProxy, open_listeners
from nodeagent.proxy.testca import TestCA
from nodemesh.httpedge import HttpLimits
from nodemesh.lab.loopback import NODE_A, NODE_B, TRUST_DOMAIN, loopback_settings, spiffe_id
from nodemesh.routespec import LoadBalancer, Retry, RouteMatch
from nodemesh.security import MeshSecurity, SecurityPolicies

RR = ClusterPolicy(load_balancer=LoadBalancer(policy="RoundRobin"))  # every replica gets its turn

A, B = NODE_A, NODE_B
TD = TRUST_DOMAIN
CLIENT = spiffe_id("client")
ECHO = spiffe_id("echo")
VIP = ("10.96.0.30", 50051)
CL = "outbound|50051||echo.default.svc.mesh"
CL_V2 = "outbound|50051||echo-v2.default.svc.mesh"
_ident = (lambda b: b, lambda b: b)


class Backend:
    """A grpcio server with a generic handler: /test.Echo/Unary answers
    `<name>:<request>`, /test.Echo/Stream sends n messages; `fail` aborts with
    that status, `delay` sleeps first."""

    def __init__(self, name: str, fail: grpc.StatusCode | None = None, delay: float = 0.0) -> None:
        self.name, self.fail, self.delay = name, fail, delay
        self.calls = 0
        self.seen_timeouts: list[float | None] = []
        self._lock = threading.Lock()

    def _unary(self, req: bytes, ctx: grpc.ServicerContext) -> bytes:
        with self._lock:
            self.calls += 1
        self.seen_timeouts.append(ctx.time_remaining())
        if self.delay:
            time.sleep(self.delay)
        if req.startswith(b"sleep:"):
            time.sleep(float(req[6:]))
        if req == b"notfound":
            ctx.abort(grpc.StatusCode.NOT_FOUND, "no such thing: notfound")
        if self.fail is not None:
            ctx.abort(self.fail, f"{self.name} is failing")
        return self.name.encode() + b":" + req[:64] + (b"#%d" % len(req))

    def _stream(self, req: bytes, ctx: grpc.ServicerContext) -> Iterator[bytes]:
        with self._lock:
            self.calls += 1
        n, size = (int(x) for x in req.split(b","))
        for i in range(n):
            yield (b"%s-%d:" % (self.name.encode(), i)).ljust(size, b".")

    def start(self) -> int:
        handlers = {
            "Unary": grpc.unary_unary_rpc_method_handler(self._unary, *_ident),
            "Stream": grpc.unary_stream_rpc_method_handler(self._stream, *_ident),
        }
        self.server = grpc.server(futures.ThreadPoolExecutor(8))
        self.server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("test.Echo", handlers),))
        port = self.server.add_insecure_port(f"{B}:0")
        self.server.start()
        return int(port)


class Mesh:
    def __init__(self) -> None:
        self.ca = TestCA()
        self.log_a = AccessLog("off")
        self.rec_a = self.log_a.capture()

    async def start(self, v1: list[Backend], v2: list[Backend] | None = None) -> None:
        self.settings_a = loopback_settings("a", A)
        self.a = self.new_a()
        self.settings_b = loopback_settings("b", B)
        self.b = self.new_b()
        # The listening sockets are held here too, as the agent holds them for its workers.
        self.a_listeners = open_listeners(self.a.settings)
        self.b_listeners = open_listeners(self.b.settings)
        self.a2: NodeProxy | None = None
        self.b2: NodeProxy | None = None
        await self.a.start([sk.dup() for sk in self.a_listeners])
        await self.b.start([sk.dup() for sk in self.b_listeners])
        self.a_out = self.a.addresses()[0]
        self.hbone_b = self.b.addresses()[2][1]
        self.backends = v1 + (v2 or [])
        self.ports = [b.start() for b in v1]
        self.v2_ports = [b.start() for b in (v2 or [])]
        self.publish(None)
        self.channel = grpc.insecure_channel(f"{self.a_out[0]}:{self.a_out[1]}")

    def eps(self, ports: list[int], first: int = 0) -> tuple[Endpoint, ...]:
        return tuple(Endpoint(B, p, f"default/echo-{first + i}", ECHO, "b", B, hbone_port=self.hbone_b)
                     for i, p in enumerate(ports))

    def publish(self, routes: RouteTable | None, policy: ClusterPolicy | None = None) -> None:
        mesh = MeshSettings(trust_domain=TD, trust_bundle=(self.ca.pem,))
        all_ports = self.ports + self.v2_ports
        services = (
            Service("echo", "default", VIP[0], (ServicePort(VIP[1], 0, "grpc", "grpc", CL, self.eps(self.ports),
                                                            routes=routes, policy=policy),)),
            Service("echo-v2", "default", "10.96.0.31", (ServicePort(VIP[1], 0, "grpc", "grpc", CL_V2,
                                                                     self.eps(self.v2_ports, len(self.ports))),)),
        )
        workloads = tuple(Workload(f"echo-{i}", "default", "echo", "b", B, (p,), ECHO, B, self.hbone_b)
                          for i, p in enumerate(all_ports))
        client = LocalWorkload("client", "default", "client", A, (), uid=os.getuid())
        echo = LocalWorkload("echo", "default", "echo", B, tuple(all_ports))
        for a in (self.a, self.a2):
            if a is not None:
                a.update(Snapshot("1", "a", mesh, services, workloads, (client,)), self.ca.certs(CLIENT))
        for b in (self.b, self.b2):
            if b is not None:
                b.update(Snapshot("1", "b", mesh, services, workloads, (echo,)), self.ca.certs(ECHO))

    async def unary(self, req: bytes, timeout: float | None = 10.0, method: str = "Unary",
                    metadata: tuple[tuple[str, str], ...] = ()) -> tuple[Any, str, bytes]:
        """(status code, details, response) of one call, made from a thread (grpcio is blocking)."""
        call = self.channel.unary_unary(f"/test.Echo/{method}", *_ident)

        def go() -> tuple[Any, str, bytes]:
            try:
                return grpc.StatusCode.OK, "", call(req, timeout=timeout, metadata=metadata or None)
            except grpc.RpcError as e:
                return e.code(), e.details() or "", b""
        return await asyncio.to_thread(go)

    async def stream(self, n: int, size: int) -> list[bytes]:
        call = self.channel.unary_stream("/test.Echo/Stream", *_ident)
        return await asyncio.to_thread(lambda: list(call(b"%d,%d" % (n, size), timeout=30)))

    def new_a(self) -> NodeProxy:
        # Every connection to A's outbound listener counts as captured on its way to the VIP.
        return NodeProxy(self.settings_a, access_log=self.log_a, original_dst=lambda s: VIP,
                         source_lookup=by_uid(os.getuid()))

    def new_b(self) -> NodeProxy:
        return NodeProxy(self.settings_b, access_log=AccessLog("off"), original_dst=lambda s: VIP)

    async def next_worker(self, node: str = "a") -> NodeProxy:
        """A second proxy of that node serving on its listening sockets (a restart's next worker)."""
        old, new = (self.a, self.new_a()) if node == "a" else (self.b, self.new_b())
        new.update(old.snapshot, old.certs)
        await new.start([sk.dup() for sk in (self.a_listeners if node == "a" else self.b_listeners)])
        if node == "a":
            self.a2 = new
        else:
            self.b2 = new
        return new

    async def stop(self) -> None:
        self.channel.close()
        for b in self.backends:
            b.server.stop(0)
        for p in (self.a, self.a2, self.b, self.b2):
            if p is not None:
                await p.stop()
        for sk in self.a_listeners + self.b_listeners:
            sk.close()

    def grpc_lines(self) -> list[dict[str, Any]]:
        return [r for r in self.rec_a if r.get("protocol") == "grpc"]


def run(coro_fn: Any, v1: list[Backend], v2: list[Backend] | None = None) -> Any:
    async def main() -> Any:
        m = Mesh()
        await m.start(v1, v2)
        try:
            return await coro_fn(m)
        finally:
            await m.stop()
    return uvloop.run(main())


def entry(**kw: Any) -> RouteEntry:
    kw.setdefault("clusters", (WeightedCluster(CL),))
    return RouteEntry(kw.pop("name", "r"), kw.pop("match", RouteMatch()), **kw)


def test_unary_status_codes_preserved_and_one_pooled_connection() -> None:
    async def body(m: Mesh) -> None:
        code, _, resp = await m.unary(b"hello")
        assert code == grpc.StatusCode.OK and resp == b"r0:hello#5"
        code, details, _ = await m.unary(b"notfound")
        assert code == grpc.StatusCode.NOT_FOUND and details == "no such thing: notfound"
        for i in range(20):
            code, _, _ = await m.unary(b"x%d" % i)
            assert code == grpc.StatusCode.OK
        await asyncio.sleep(0.05)
        lines = m.grpc_lines()
        assert len(lines) == 22, lines
        assert lines[0]["grpc_status"] == 0 and lines[0]["dst_identity"] == ECHO and lines[0]["via"] == "hbone"
        assert lines[0]["path"] == "/test.Echo/Unary"
        assert lines[1]["grpc_status"] == 5
        # Every request rode one h2c connection (one CONNECT stream) to the endpoint.
        assert m.a.l7.h2_upstreams.opened == 1
    run(body, [Backend("r0")])


def test_unavailable_with_message_and_retry_hides_failing_replica() -> None:
    async def body(m: Mesh) -> None:
        m.publish(None, RR)
        fails = 0
        for _ in range(10):
            code, details, _ = await m.unary(b"a")
            if code != grpc.StatusCode.OK:
                assert code == grpc.StatusCode.UNAVAILABLE and details == "bad is failing"
                fails += 1
        assert fails > 0  # without a retry policy the failing replica shows
        retry = Retry(attempts=3, backoff_s=0.001, max_backoff_s=0.002, retry_on=(), grpc_retry_on=("unavailable",))
        m.publish(RouteTable(CL, (entry(retry=retry),)), RR)
        for _ in range(30):
            code, details, resp = await m.unary(b"b")
            assert code == grpc.StatusCode.OK, details
            assert resp.startswith(b"good:")
        await asyncio.sleep(0.05)
        assert any(r.get("attempts", 1) > 1 for r in m.grpc_lines()), m.grpc_lines()[-3:]
    run(body, [Backend("bad", fail=grpc.StatusCode.UNAVAILABLE), Backend("good")])


def test_caller_deadline_answered_by_the_proxy_and_passed_on_reduced() -> None:
    async def body(m: Mesh) -> None:
        # The caller's budget (the tighter of grpc-timeout and x-nodemesh-deadline-ms) is
        # 150 ms, its own grpcio deadline 1 s: the proxy's DEADLINE_EXCEEDED comes first,
        # so there is one right outcome (grpcio alone would race its own reset).
        t0 = time.monotonic()
        code, _, _ = await m.unary(b"slow", timeout=1.0, metadata=(("x-nodemesh-deadline-ms", "150"),))
        took = time.monotonic() - t0
        assert code == grpc.StatusCode.DEADLINE_EXCEEDED and took < 0.9, took
        await asyncio.sleep(0.05)
        line = m.grpc_lines()[-1]
        assert line.get("grpc_status") == 4 and line.get("reason") == "deadline_exceeded", json.dumps(line)
        seen = m.backends[0].seen_timeouts[-1]
        assert seen is not None and 0 < seen < 0.15  # the endpoint got the reduced grpc-timeout
    run(body, [Backend("slow", delay=1.0)])


def test_server_streaming_big_response_flows_under_flow_control() -> None:
    async def body(m: Mesh) -> None:
        msgs = await m.stream(400, 64 * 1024)  # 25 MiB: far beyond every HTTP/2 window on the way
        assert len(msgs) == 400 and msgs[399].startswith(b"r0-399:")
        code, _, resp = await m.unary(b"z" * (3 << 20))  # a request body over the retry buffer still passes
        assert code == grpc.StatusCode.OK and resp.endswith(b"#%d" % (3 << 20))
    run(body, [Backend("r0")])


def test_grpcroute_method_match_splits_by_method() -> None:
    table = RouteTable(CL, (
        entry(name="stream-to-v2", match=RouteMatch("Exact", "/test.Echo/Stream"),
              clusters=(WeightedCluster(CL_V2),)),
        entry(name="rest", match=RouteMatch("PathPrefix", "/test.Echo")),
    ))

    async def body(m: Mesh) -> None:
        m.publish(table)
        msgs = await m.stream(3, 16)
        assert msgs[0].startswith(b"v2-0:")
        code, _, resp = await m.unary(b"q")
        assert code == grpc.StatusCode.OK and resp.startswith(b"v1:")
        code, _, _ = await m.unary(b"q", method="Nope")  # matches /test.Echo prefix: reaches v1, unimplemented
        assert code == grpc.StatusCode.UNIMPLEMENTED
    run(body, [Backend("v1")], [Backend("v2")])


def test_no_route_is_unimplemented_and_client_cancel_resets_upstream() -> None:
    table = RouteTable(CL, (entry(name="only", match=RouteMatch("Exact", "/test.Echo/Stream")),))

    async def body(m: Mesh) -> None:
        m.publish(table)
        code, details, _ = await m.unary(b"q")
        assert code == grpc.StatusCode.UNIMPLEMENTED and "no_route" in details
    run(body, [Backend("v1")])


def test_auto_port_detects_http2_preface() -> None:
    async def body(m: Mesh) -> None:
        mesh = MeshSettings(trust_domain=TD, trust_bundle=(m.ca.pem,))
        snap_a = m.a.snapshot
        assert snap_a is not None
        svc = Service("echo", "default", VIP[0], (ServicePort(VIP[1], 0, "auto", "grpc", CL, m.eps(m.ports)),))
        m.a.update(Snapshot("2", "a", mesh, (svc,), snap_a.workloads, snap_a.local_workloads), m.ca.certs(CLIENT))
        code, _, resp = await m.unary(b"auto")
        assert code == grpc.StatusCode.OK and resp == b"r0:auto#4"
        await asyncio.sleep(0.05)
        assert m.grpc_lines()[-1]["grpc_status"] == 0
    run(body, [Backend("r0")])


def test_mirror_reaches_shadow_without_slowing_the_original() -> None:
    table = RouteTable(CL, (entry(mirrors=(MirrorTo(CL_V2, 100.0),)),))

    async def body(m: Mesh) -> None:
        m.publish(table)
        shadow = m.backends[1]
        for i in range(5):
            t0 = time.monotonic()
            code, _, resp = await m.unary(b"m%d" % i)
            took = time.monotonic() - t0
            assert code == grpc.StatusCode.OK and resp == b"orig:m%d#2" % i
            assert took < 0.2, took  # the shadow sleeps 500 ms: nobody waits for it
        st = m.a.l7.mirror_stats
        for _ in range(100):
            if st.completed >= 5:
                break
            await asyncio.sleep(0.05)
        assert shadow.calls == 5 and st.completed == 5 and st.failed == 0, st
        assert m.grpc_lines()[-1]["mirror"] == CL_V2
        # Over the retry buffer: the original passes, the copy is skipped and counted.
        code, _, _ = await m.unary(b"z" * (3 << 20))
        assert code == grpc.StatusCode.OK
        await asyncio.sleep(0.1)
        assert st.skipped_body == 1 and shadow.calls == 5, st
    run(body, [Backend("orig")], [Backend("shadow", delay=0.5)])


def test_mirror_failure_never_reaches_the_original() -> None:
    table = RouteTable(CL, (entry(mirrors=(MirrorTo("outbound|1||nowhere.default.svc.mesh", 100.0),
                                           MirrorTo(CL_V2, 100.0))),))

    async def body(m: Mesh) -> None:
        m.publish(table)
        m.backends[1].server.stop(0)  # the shadow's endpoint refuses connections
        code, _, resp = await m.unary(b"q")
        assert code == grpc.StatusCode.OK and resp == b"orig:q#1"
        st = m.a.l7.mirror_stats
        for _ in range(100):
            if st.failed and st.skipped_no_endpoint:
                break
            await asyncio.sleep(0.05)
        assert st.failed == 1 and st.skipped_no_endpoint == 1, st
    run(body, [Backend("orig")], [Backend("shadow")])


def test_shadow_authority_suffix() -> None:
    assert shadow_authority("echo.default:50051") == "echo.default-shadow:50051"
    assert shadow_authority("echo") == "echo-shadow"
    assert shadow_authority("[::1]:80") == "[::1]-shadow:80"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _with_limits(m: Mesh, limits: HttpLimits) -> None:
    snap = m.a.snapshot
    assert snap is not None
    m.a.update(dataclasses.replace(snap, security=SecurityPolicies(MeshSecurity(http=limits))), m.ca.certs(CLIENT))


def test_stream_with_nothing_moving_is_ended_at_the_stream_idle_timeout() -> None:
    async def body(m: Mesh) -> None:
        _with_limits(m, HttpLimits(stream_idle_timeout_s=0.4))
        t0 = time.monotonic()
        code, _, _ = await m.unary(b"slow", timeout=5.0)
        took = time.monotonic() - t0
        assert code != grpc.StatusCode.OK and 0.4 <= took < 1.8, (code, took)
        await asyncio.sleep(0.05)
        line = m.grpc_lines()[-1]
        assert line["reason"] == "stream_idle_timeout", json.dumps(line)
    run(body, [Backend("slow", delay=2.0)])


def test_h2c_connection_with_a_stalled_request_head_gets_goaway_at_the_deadline() -> None:
    async def body(m: Mesh) -> None:
        _with_limits(m, HttpLimits(request_head_timeout_s=0.4))
        r, w = await asyncio.open_connection(*m.a_out)
        # The preface, empty SETTINGS, then a HEADERS frame announcing 100 bytes and sending 10.
        w.write(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + bytes.fromhex("000000040000000000")
                + bytes.fromhex("000064010400000001") + b"\x00" * 10)
        t0 = time.monotonic()
        out = b""
        while chunk := await asyncio.wait_for(r.read(65536), 5.0):
            out += chunk
        took = time.monotonic() - t0
        w.close()
        assert 0.4 <= took < 2.0, took
        frames = []
        while len(out) >= 9:
            n = int.from_bytes(out[:3], "big")
            frames.append(out[3])
            out = out[9 + n:]
        assert frames[-1] == 0x7, frames  # GOAWAY, then the connection closes
    run(body, [Backend("r0")])


def _grpc_message(payload: bytes) -> bytes:
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


def test_drain_goaway_in_two_steps_in_flight_stream_finishes_new_ones_go_to_the_next_worker() -> None:
    """A draining worker (a restart) sends each client h2c connection GOAWAY with
    the largest stream ID and a PING, then, at the PING's answer, GOAWAY with the
    last stream it took; the stream in flight completes, a stream opened after
    the final GOAWAY is refused (REFUSED_STREAM: never processed), the connection
    ends once idle, and the client's next connection reaches the next worker. A
    real grpcio channel connected to the old worker carries on without an error."""
    async def body(m: Mesh) -> None:
        code, _, _ = await m.unary(b"before")  # grpcio's connection: to the old worker (the only one)
        assert code == grpc.StatusCode.OK
        r, w = await asyncio.open_connection(*m.a_out)
        c = H2Core(client=True)  # h2 that, like grpcio, keeps a GOAWAYed connection's streams going
        c.initiate()
        grpc_head = [(":method", "POST"), (":scheme", "http"), (":path", "/test.Echo/Unary"),
                     (":authority", "echo"), ("content-type", "application/grpc"), ("te", "trailers")]
        sid = c.new_request(grpc_head)
        c.send_data(sid, _grpc_message(b"sleep:0.8"))
        c.end_stream(sid)
        w.write(c.data_to_send())
        await wait_for_async(lambda: m.backends[0].calls == 2)  # the request is at the backend
        await m.next_worker()
        drain = asyncio.create_task(m.a.drain(10.0))
        goaways: list[tuple[Any, Any]] = []
        resp: dict[int, list[Any]] = {}
        refused: dict[int, int] = {}
        late = 0
        while chunk := await asyncio.wait_for(r.read(65536), 5.0):
            got = c.receive_data(chunk)
            assert not got.error, got.error
            for ev in got.events:
                if isinstance(ev, h2.events.ConnectionTerminated):
                    goaways.append((ev.error_code, ev.last_stream_id))
                    if len(goaways) == 2:  # the final one: a stream opened now is never processed
                        late = c.new_request(grpc_head)
                        c.send_data(late, _grpc_message(b"late"))
                        c.end_stream(late)
                elif isinstance(ev, (h2.events.ResponseReceived, h2.events.DataReceived,
                                     h2.events.TrailersReceived)):
                    resp.setdefault(ev.stream_id, []).append(ev)
                elif isinstance(ev, h2.events.StreamReset):
                    refused[ev.stream_id] = ev.error_code
            w.write(c.data_to_send())  # PING ACKs, WINDOW_UPDATEs, the late stream
        w.close()
        assert goaways == [(0, MAX_STREAM_ID), (0, sid)], goaways
        assert late and refused == {late: h2.errors.ErrorCodes.REFUSED_STREAM}, refused
        data = b"".join(bytes(ev.data) for ev in resp[sid] if isinstance(ev, h2.events.DataReceived))
        trailers = {str(k): str(v) for ev in resp[sid] if isinstance(ev, h2.events.TrailersReceived)
                    for k, v in ev.headers}
        assert data == _grpc_message(b"r0:sleep:0.8#9") and trailers["grpc-status"] == "0", (data, trailers)
        assert await drain == 0  # every connection ended before the deadline
        assert m.a2 is not None and not m.a2.open_connections()
        code, _, resp_b = await m.unary(b"after")  # grpcio saw its GOAWAY and reconnected: the next worker
        assert code == grpc.StatusCode.OK and resp_b == b"r0:after#5"
        assert m.a2.open_connections() == 1
        assert not [x for x in m.grpc_lines() if x.get("grpc_status") not in (0, None)], m.grpc_lines()
    run(body, [Backend("r0")])


def test_drain_of_the_receiving_node_moves_pooled_h2_upstreams_to_its_next_worker() -> None:
    """The receiving node's worker drains: its HBONE GOAWAY reaches the sending
    node, whose pooled h2c connection on that tunnel takes no new stream (the
    next call opens a connection to the next worker) and closes once its stream
    in flight is done, so the old worker ends well before its drain deadline."""
    async def body(m: Mesh) -> None:
        code, _, _ = await m.unary(b"before")
        assert code == grpc.StatusCode.OK and m.a.l7.h2_upstreams.opened == 1
        slow = asyncio.create_task(m.unary(b"sleep:0.8"))
        await wait_for_async(lambda: m.backends[0].calls == 2)
        b2 = await m.next_worker("b")
        t0 = time.monotonic()
        drain = asyncio.create_task(m.b.drain(6.0))
        await asyncio.sleep(0.2)  # the first GOAWAY is at node A
        code, _, resp = await m.unary(b"during")
        assert code == grpc.StatusCode.OK and resp == b"r0:during#6"
        assert m.a.l7.h2_upstreams.opened == 2 and b2.open_connections() == 1
        assert (await slow)[0] == grpc.StatusCode.OK
        assert await drain == 0 and time.monotonic() - t0 < 4.0
    run(body, [Backend("r0")])


async def wait_for_async(cond: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "condition not met in time"
        await asyncio.sleep(0.02)
