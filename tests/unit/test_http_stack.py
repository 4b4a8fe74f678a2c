"""The L7 stack end to end on loopback: node proxies A and B in one process,
HTTP replicas on B reached over mTLS HBONE, route tables put straight into
the snapshot (the xDS path is tested in test_http_xds.py)."""

from __future__ import annotations

import asyncio
import os
import socket
from typing import Any

import uvloop

from nodeagent.meshview.l7snapshot import ClusterPolicy, RouteEntry, RouteTable, WeightedCluster
from nodeagent.meshview.snapshot import Endpoint, LocalWorkload, MeshSettings, Service, ServicePort, Snapshot, Workload
from nodeagent.proxy.accesslog import AccessLog
from nodeagent.proxy.outbound import by_uid
from nodeagent.proxy.proxy import NodeProxy
from nodeagent.proxy.testca import TestCA
from nodemesh.lab.loopback import NODE_A, NODE_B, TRUST_DOMAIN, loopback_settings, spiffe_id
from nodemesh.routespec import (
    CircuitBreaker,
    Fault,
    OutlierDetection,
    Redirect,
    Retry,
    RetryBudget,
    RouteMatch,
    StringMatch,
)

A, B = NODE_A, NODE_B
TD = TRUST_DOMAIN
CLIENT = spiffe_id("client")
WEB = spiffe_id("web")
VIP = ("10.96.0.20", 80)
CL_WEB = "outbound|80||web.default.svc.mesh"
CL_V2 = "outbound|80||web-v2.default.svc.mesh"


class Replica(asyncio.Protocol):
    """HTTP/1.1 replica: answers `<name> <path>`; behaviour set per server."""

    def __init__(self, srv: Server) -> None:
        self.srv = srv
        self.buf = b""

    def connection_made(self, t: Any) -> None:
        self.t = t

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if b"\r\n\r\n" not in self.buf:
            return
        head = self.buf.split(b"\r\n\r\n")[0].decode()
        self.srv.seen.append(head)
        path = head.split(" ")[1]
        asyncio.get_running_loop().create_task(self.answer(path))

    async def answer(self, path: str) -> None:
        if self.srv.delay:
            await asyncio.sleep(self.srv.delay)
        body = f"{self.srv.name} {path}".encode()
        if self.t.is_closing():
            return
        self.t.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nX-Replica: %s\r\n\r\n%s"
                     % (self.srv.status, len(body), self.srv.name.encode(), body))
        self.t.close()


class Server:
    def __init__(self, name: str, status: int = 200, delay: float = 0.0) -> None:
        self.name, self.status, self.delay = name, status, delay
        self.seen: list[str] = []

    async def start(self) -> int:
        self.s = await asyncio.get_running_loop().create_server(lambda: Replica(self), B, 0)
        return int(self.s.sockets[0].getsockname()[1])


class Mesh:
    def __init__(self) -> None:
        self.ca = TestCA()
        self.dst: dict[int, tuple[str, int]] = {}
        self.log_a = AccessLog("off")
        self.rec_a = self.log_a.capture()

    def original_dst(self, sock: socket.socket) -> tuple[str, int]:
        return self.dst[sock.getpeername()[1]]

    async def start(self, replicas: list[Server], v2: list[Server] | None = None) -> None:
        self.a = NodeProxy(loopback_settings("a", A), access_log=self.log_a, original_dst=self.original_dst,
                           source_lookup=by_uid(os.getuid()))
        self.b = NodeProxy(loopback_settings("b", B), access_log=AccessLog("off"), original_dst=self.original_dst)
        await self.a.start()
        await self.b.start()
        self.a_out = self.a.addresses()[0]
        self.hbone_b = self.b.addresses()[2][1]
        self.ports = [await r.start() for r in replicas]
        self.v2_ports = [await r.start() for r in (v2 or [])]
        self.replicas = replicas
        self.publish(None)

    def eps(self, ports: list[int]) -> tuple[Endpoint, ...]:
        return tuple(Endpoint(B, p, f"default/web-{i}", WEB, "b", B, hbone_port=self.hbone_b)
                     for i, p in enumerate(ports))

    def publish(self, routes: RouteTable | None, policy: ClusterPolicy | None = None) -> None:
        mesh = MeshSettings(trust_domain=TD, trust_bundle=(self.ca.pem,))
        all_ports = self.ports + self.v2_ports
        services = (
            Service("web", "default", VIP[0], (ServicePort(80, 0, "http", "http", CL_WEB, self.eps(self.ports),
                                                           routes=routes, policy=policy),)),
            Service("web-v2", "default", "10.96.0.21", (ServicePort(80, 0, "http", "http", CL_V2,
                                                                    self.eps(self.v2_ports)),)),
        )
        workloads = tuple(Workload(f"web-{i}", "default", "web", "b", B, (p,), WEB, B, self.hbone_b)
                          for i, p in enumerate(all_ports))
        client = LocalWorkload("client", "default", "client", A, (), uid=os.getuid())
        web = LocalWorkload("web", "default", "web", B, tuple(all_ports))
        self.a.update(Snapshot("1", "a", mesh, services, workloads, (client,)), self.ca.certs(CLIENT))
        self.b.update(Snapshot("1", "b", mesh, services, workloads, (web,)), self.ca.certs(WEB))

    async def stop(self) -> None:
        await self.a.stop()
        await self.b.stop()

    async def request(self, path: str, headers: dict[str, str] | None = None,
                      n: int = 1) -> list[tuple[int, dict[str, str], bytes]]:
        """n requests on one keep-alive client connection."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.dst[sock.getsockname()[1]] = VIP
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, self.a_out)
        r, w = await asyncio.open_connection(sock=sock)
        out = []
        try:
            for _ in range(n):
                extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
                w.write(f"GET {path} HTTP/1.1\r\nHost: web\r\n{extra}\r\n".encode())
                status_line = await asyncio.wait_for(r.readline(), 10)
                hdrs: dict[str, str] = {}
                while (line := await r.readline()) not in (b"\r\n", b""):
                    k, _, v = line.decode().partition(":")
                    hdrs[k.strip().lower()] = v.strip()
                body = await r.readexactly(int(hdrs.get("content-length", "0")))
                out.append((int(status_line.split()[1]), hdrs, body))
        finally:
            w.close()
        return out


def run(coro_fn: Any, replicas: list[Server], v2: list[Server] | None = None) -> Any:
    async def main() -> Any:
        m = Mesh()
        await m.start(replicas, v2)
        try:
            return await coro_fn(m)
        finally:
            await m.stop()
    return uvloop.run(main())


def entry(**kw: Any) -> RouteEntry:
    kw.setdefault("clusters", (WeightedCluster(CL_WEB),))
    return RouteEntry(kw.pop("name", "r"), kw.pop("match", RouteMatch()), **kw)


def test_default_route_keepalive_and_access_log() -> None:
    async def body(m: Mesh) -> None:
        res = await m.request("/hello", n=3)
        assert [s for s, _, _ in res] == [200, 200, 200]
        assert res[0][2] == b"r0 /hello"
        await asyncio.sleep(0.05)
        lines = [r for r in m.rec_a if r.get("protocol") == "http" and r.get("method")]
        assert len(lines) == 3 and lines[0]["status"] == 200 and lines[0]["dst_identity"] == WEB
        assert lines[0]["via"] == "hbone" and lines[0]["path"] == "/hello"
        assert lines[0]["node"] == "a" and lines[0]["upstream_node"] == "b"  # reporter's node vs the peer's
    run(body, [Server("r0")])


def test_header_route_split_and_no_match_404() -> None:
    table = RouteTable(CL_WEB, (
        entry(name="canary", match=RouteMatch("PathPrefix", "/", "", (StringMatch("x-canary", "yes"),)),
              clusters=(WeightedCluster(CL_V2),)),
        entry(name="api", match=RouteMatch("PathPrefix", "/api")),
    ))

    async def body(m: Mesh) -> None:
        m.publish(table)
        (s1, _, b1), = await m.request("/api/x", {"x-canary": "yes"})
        (s2, _, b2), = await m.request("/api/x")
        (s3, h3, _), = await m.request("/other")
        assert (s1, b1) == (200, b"v2 /api/x")
        assert (s2, b2) == (200, b"r0 /api/x")
        assert s3 == 404 and h3["x-nodemesh-reason"] == "no_route"
    run(body, [Server("r0")], [Server("v2")])


def test_retry_hides_failing_replica_and_budget_stops_storm() -> None:
    retry = Retry(attempts=3, backoff_s=0.001, max_backoff_s=0.002, retry_on=("5xx",))
    table = RouteTable(CL_WEB, (entry(retry=retry),))

    async def body(m: Mesh) -> None:
        m.publish(table)
        res = await m.request("/", n=20)
        assert all(s == 200 for s, _, _ in res), [s for s, _, _ in res]
        # Every replica failing: the budget (ratio 0, min 0) allows no retries at all.
        m.publish(table, ClusterPolicy(retry_budget=RetryBudget(0.0, 0.0, 10.0)))
        m.replicas[1].status = 503
        before = len(m.replicas[0].seen) + len(m.replicas[1].seen)
        res = await m.request("/", n=10)
        after = len(m.replicas[0].seen) + len(m.replicas[1].seen)
        assert all(s == 503 for s, _, _ in res)
        assert after - before == 10  # one try per request: no retry storm
    run(body, [Server("bad", status=503), Server("good")])


def test_deadline_fails_fast_and_per_try_timeout() -> None:
    async def body(m: Mesh) -> None:
        m.publish(RouteTable(CL_WEB, (entry(timeout_s=0.2),)))
        t0 = asyncio.get_running_loop().time()
        (s, h, _), = await m.request("/")
        assert s == 504 and h["x-nodemesh-reason"] == "deadline_exceeded"
        assert asyncio.get_running_loop().time() - t0 < 1.0
        m.publish(None)
        (s, _, _), = await m.request("/", {"x-nodemesh-deadline-ms": "0"})
        assert s == 504
        (s, _, _), = await m.request("/", {"grpc-timeout": "100m"})
        assert s == 504
    run(body, [Server("slow", delay=2.0)])


def test_breaker_overflow_is_503_fast_then_closes() -> None:
    async def body(m: Mesh) -> None:
        m.publish(None, ClusterPolicy(circuit_breaker=CircuitBreaker(max_requests=1)))
        slow = asyncio.ensure_future(m.request("/"))
        await asyncio.sleep(0.2)
        (s, h, _), = await m.request("/")
        assert s == 503 and h["x-nodemesh-reason"] == "overflow" and h["x-nodemesh-overloaded"] == "true"
        assert (await slow)[0][0] == 200
        (s, _, _), = await m.request("/")
        assert s == 200  # closed again once the slow request finished
    run(body, [Server("r", delay=0.5)])


def test_outlier_ejects_failing_replica() -> None:
    od = OutlierDetection(consecutive_5xx=2, consecutive_gateway_errors=2, base_ejection_s=30,
                          max_ejection_s=60, max_ejection_percent=50)

    async def body(m: Mesh) -> None:
        m.publish(None, ClusterPolicy(outlier=od))
        res = await m.request("/", n=30)
        bad = sum(1 for s, _, _ in res if s == 503)
        assert bad <= 3, bad  # ejected after two consecutive failures
        assert res[-1][0] == 200
    run(body, [Server("bad", status=503), Server("good")])


def test_redirect_fault_and_header_filters() -> None:
    from nodemesh.routespec import HeaderModifier
    table = RouteTable(CL_WEB, (
        entry(name="old", match=RouteMatch("Exact", "/old"),
              redirect=Redirect(path_type="ReplaceFullPath", path="/new", status_code=301), clusters=()),
        entry(name="boom", match=RouteMatch("Exact", "/boom"), fault=Fault(abort_status=418, abort_percent=100)),
        entry(name="hdr", response_headers=HeaderModifier(set=(("x-added", "1"),), remove=("x-replica",)),
              request_headers=HeaderModifier(add=(("x-from-mesh", "yes"),))),
    ))

    async def body(m: Mesh) -> None:
        m.publish(table)
        (s, h, _), = await m.request("/old?q=1")
        assert s == 301 and h["location"] == "http://web/new?q=1"
        (s, _, _), = await m.request("/boom")
        assert s == 418
        (s, h, _), = await m.request("/x")
        assert s == 200 and h["x-added"] == "1" and "x-replica" not in h
        assert "x-from-mesh: yes" in m.replicas[0].seen[-1].lower()
    run(body, [Server("r0")])
