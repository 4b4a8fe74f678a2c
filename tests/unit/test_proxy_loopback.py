"""End to end on loopback: node A (127.0.0.2) and node B (127.0.0.3) proxies in
one process, mTLS HBONE between them, injected original-destination and
source lookups; plus WorkerPool with real worker processes."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest
import uvloop

from nodeagent.meshview.snapshot import (
    Endpoint,
    LocalWorkload,
    MeshSettings,
    Service,
    ServicePort,
    Snapshot,
    Workload,
)
from nodeagent.proxy.accesslog import AccessLog
from nodeagent.proxy.outbound import SourceMatch
from nodeagent.proxy.proxy import NodeProxy
from nodeagent.proxy.testca import TestCA
from nodeagent.supervision.settings import ProxySettings
from nodemesh.lab.loopback import NODE_A, NODE_B, TRUST_DOMAIN, loopback_settings, spiffe_id

A, B = NODE_A, NODE_B
TD = TRUST_DOMAIN
CLIENT = spiffe_id("client")
ECHO = spiffe_id("echo")
LOCAL = spiffe_id("local")
ECHO_VIP = ("10.96.0.10", 80)
LOCAL_VIP = ("10.96.0.11", 80)
WRONG_VIP = ("10.96.0.12", 80)


class Echo(asyncio.Protocol):
    """Echoes with back-pressure; on EOF answers b'<bye>' and half-closes."""

    def connection_made(self, transport: Any) -> None:
        self.t = transport

    def data_received(self, data: bytes) -> None:
        self.t.write(data)

    def pause_writing(self) -> None:
        self.t.pause_reading()

    def resume_writing(self) -> None:
        self.t.resume_reading()

    def eof_received(self) -> bool:
        self.t.write(b"<bye>")
        self.t.write_eof()
        return True


class Cluster:
    def __init__(self) -> None:
        self.ca = TestCA()
        self.dst: dict[int, tuple[str, int]] = {}
        self.log_a = AccessLog("off")
        self.log_b = AccessLog("off")
        self.rec_a = self.log_a.capture()
        self.rec_b = self.log_b.capture()

    def original_dst(self, sock: socket.socket) -> tuple[str, int]:
        return self.dst[sock.getpeername()[1]]

    def source_lookup(self, snap: Snapshot, client: tuple[str, int], dst: tuple[str, int],
                      local: Callable[[], tuple[str, int]]) -> SourceMatch | None:
        lw = snap.local_by_uid.get(os.getuid())
        if client[1] in self.unknown_ports or lw is None:
            return None
        return SourceMatch(lw, client)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.unknown_ports: set[int] = set()
        self.echo_b = await loop.create_server(Echo, B, 0)
        self.echo_a = await loop.create_server(Echo, A, 0)
        self.echo_b_port = self.echo_b.sockets[0].getsockname()[1]
        self.echo_a_port = self.echo_a.sockets[0].getsockname()[1]

        self.a = NodeProxy(loopback_settings("a", A), access_log=self.log_a, original_dst=self.original_dst,
                           source_lookup=self.source_lookup)
        self.b = NodeProxy(loopback_settings("b", B), access_log=self.log_b, original_dst=self.original_dst,
                           inbound_original_dst=self.original_dst)
        await self.a.start()
        await self.b.start()
        self.a_out = self.a.addresses()[0]
        self.b_plain = self.b.addresses()[1]
        b_hbone = self.b.addresses()[2][1]
        a_hbone = self.a.addresses()[2][1]
        mesh = MeshSettings(trust_domain=TD, trust_bundle=(self.ca.pem,))
        echo_ep = Endpoint(B, self.echo_b_port, "default/echo", ECHO, "b", B, hbone_port=b_hbone)
        local_ep = Endpoint(A, self.echo_a_port, "default/local", LOCAL, "a", A, hbone_port=a_hbone)
        # Claims to be ECHO's address but expects LOCAL's identity: B must not satisfy it.
        wrong_ep = Endpoint(B, self.echo_b_port, "default/echo", LOCAL, "b", B, hbone_port=b_hbone)
        services = (
            Service("echo", "default", ECHO_VIP[0], (ServicePort(80, self.echo_b_port, endpoints=(echo_ep,)),)),
            Service("local", "default", LOCAL_VIP[0], (ServicePort(80, self.echo_a_port, endpoints=(local_ep,)),)),
            Service("wrong", "default", WRONG_VIP[0], (ServicePort(80, self.echo_b_port, endpoints=(wrong_ep,)),)),
        )
        workloads = (
            Workload("echo", "default", "echo", "b", B, (self.echo_b_port,), ECHO, B, b_hbone),
            Workload("local", "default", "local", "a", A, (self.echo_a_port,), LOCAL, A, a_hbone),
        )
        client = LocalWorkload("client", "default", "client", A, (), uid=os.getuid())
        local = LocalWorkload("local", "default", "local", A, (self.echo_a_port,))
        echo = LocalWorkload("echo", "default", "echo", B, (self.echo_b_port,))
        self.a.update(Snapshot("1", "a", mesh, services, workloads, (client, local)),
                      self.ca.certs(CLIENT, LOCAL))
        self.b.update(Snapshot("1", "b", mesh, services, workloads, (echo,)), self.ca.certs(ECHO))

    async def stop(self) -> None:
        await self.a.stop()
        await self.b.stop()
        self.echo_a.close()
        self.echo_b.close()

    async def open(self, dst: tuple[str, int], via: tuple[str, int] | None = None, unknown: bool = False
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        self.dst[port] = dst
        if unknown:
            self.unknown_ports.add(port)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, via or self.a_out)
        return await asyncio.open_connection(sock=sock, limit=1 << 20)


@asynccontextmanager
async def cluster() -> AsyncIterator[Cluster]:
    c = Cluster()
    await c.start()
    try:
        yield c
    finally:
        await c.stop()


def run(fn: Callable[[Cluster], Awaitable[None]]) -> None:
    async def main() -> None:
        async with cluster() as c:
            await asyncio.wait_for(fn(c), 30)

    uvloop.run(main())


async def wait_for_log(records: list[dict[str, Any]], pred: Callable[[dict[str, Any]], bool]) -> dict[str, Any]:
    for _ in range(200):
        for r in records:
            if pred(r):
                return r
        await asyncio.sleep(0.01)
    raise AssertionError(f"no matching access log record in {records}")


def test_bytes_flow_a_to_b_over_mtls_hbone() -> None:
    async def go(c: Cluster) -> None:
        r, w = await c.open(ECHO_VIP)
        w.write(b"hello over hbone")
        await w.drain()
        assert await r.readexactly(16) == b"hello over hbone"
        w.write_eof()
        assert await r.read() == b"<bye>"  # half-close: EOF went through and the answer came back
        w.close()
        inbound = await wait_for_log(c.rec_b, lambda x: x["direction"] == "inbound")
        assert inbound["source_principal"] == CLIENT
        assert inbound["dst_identity"] == ECHO and inbound["via"] == "hbone" and inbound["tls"] is True
        assert inbound["dst_workload"] == "default/echo"
        out = await wait_for_log(c.rec_a, lambda x: x["direction"] == "outbound")
        assert out["via"] == "hbone" and out["dst_service"] == "default/echo" and out["source_principal"] == CLIENT
        assert out["bytes_sent"] == 16 and out["bytes_received"] == 21 and "error" not in out
        # "node" is always the reporting proxy's; the destination's node has its own name.
        assert out["node"] == "a" and out["upstream_node"] == "b" and inbound["node"] == "b"
        assert "1/" in repr(c.a.pool) or "0/" in repr(c.a.pool)

    run(go)


def test_large_transfer_with_slow_reader_is_intact() -> None:
    size = 8 * 1024 * 1024
    blob = os.urandom(size)

    async def go(c: Cluster) -> None:
        r, w = await c.open(ECHO_VIP)

        async def writer() -> None:
            for i in range(0, size, 1 << 16):
                w.write(blob[i: i + (1 << 16)])
                await w.drain()
            w.write_eof()

        wt = asyncio.get_running_loop().create_task(writer())
        got = hashlib.sha256()
        n = 0
        while n < size:
            chunk = await r.readexactly(min(1 << 17, size - n))
            got.update(chunk)
            n += len(chunk)
            if n < 4 * 1024 * 1024:
                await asyncio.sleep(0.002)  # slow reader for the first half
        await wt
        assert n == size and got.digest() == hashlib.sha256(blob).digest()
        assert await r.read() == b"<bye>"
        w.close()

    run(go)


def test_reader_that_stops_reading_stalls_the_writer() -> None:
    """Back-pressure end to end: nothing buffers without bound while the reader sleeps."""
    total = 96 * 1024 * 1024
    chunk = b"z" * (1 << 18)

    async def go(c: Cluster) -> None:
        r, w = await c.open(ECHO_VIP)
        sent = 0

        async def writer() -> None:
            nonlocal sent
            while sent < total:
                w.write(chunk)
                sent += len(chunk)
                await w.drain()

        wt = asyncio.get_running_loop().create_task(writer())
        await asyncio.sleep(1.0)  # the reader reads nothing meanwhile
        stalled_at = sent
        await asyncio.sleep(0.5)
        # Held back: no progress while the reader sleeps. (How much is in flight by then
        # depends on the kernel's socket buffer autotuning on every hop: tens of MB.)
        assert sent == stalled_at < total, f"writer was never held back ({sent} of {total} bytes sent)"
        got = 0
        while got < total:
            got += len(await r.readexactly(min(1 << 20, total - got)))
        await wt
        w.close()

    run(go)


def test_many_connections_share_one_hbone_connection() -> None:
    async def go(c: Cluster) -> None:
        conns = [await c.open(ECHO_VIP) for _ in range(5)]
        for i, (_, w) in enumerate(conns):
            w.write(b"%d" % i)
        for i, (r, _) in enumerate(conns):
            assert await r.readexactly(1) == b"%d" % i
        assert len(c.a.pool.book) == 1
        for _, w in conns:
            w.close()

    run(go)


def test_same_node_endpoint_without_tls() -> None:
    async def go(c: Cluster) -> None:
        r, w = await c.open(LOCAL_VIP)
        w.write(b"local")
        w.write_eof()
        assert await r.read() == b"local<bye>"
        w.close()
        out = await wait_for_log(c.rec_a, lambda x: x["direction"] == "outbound")
        assert out["via"] == "same-node" and out["dst_workload"] == "default/local"
        inbound = await wait_for_log(c.rec_a, lambda x: x["direction"] == "inbound")
        assert inbound["source_principal"] == CLIENT and inbound["tls"] is False
        assert len(c.a.pool.book) == 0

    run(go)


def test_peer_without_expected_identity_refused() -> None:
    async def go(c: Cluster) -> None:
        r, w = await c.open(WRONG_VIP)
        assert await r.read() == b""
        out = await wait_for_log(c.rec_a, lambda x: "reason" in x)
        assert out["reason"] == "tls_handshake_failed" and "sa/local" in out["error"]

    run(go)


def test_unknown_source_refused_at_once() -> None:
    async def go(c: Cluster) -> None:
        r, w = await c.open(ECHO_VIP, unknown=True)
        assert await r.read() == b""
        out = await wait_for_log(c.rec_a, lambda x: "reason" in x)
        assert out["reason"] == "unknown_source" and "declare the workload" in out["error"]

    run(go)


def _refused_after_sending(c: Cluster, payload: bytes) -> socket.socket:
    """A client whose bytes are in the proxy's receive queue before the refusal
    (blocking connect + send before the loop runs the accept)."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    c.dst[port] = ECHO_VIP
    c.unknown_ports.add(port)
    sock.connect(c.a_out)
    sock.sendall(payload)
    sock.setblocking(False)
    return sock


def test_refusal_with_unread_bytes_is_a_clean_close() -> None:
    async def go(c: Cluster) -> None:
        loop = asyncio.get_running_loop()
        with _refused_after_sending(c, b"GET / HTTP/1.1\r\nhost: echo\r\n\r\n") as sock:
            assert await loop.sock_recv(sock, 100) == b""  # FIN, not "connection reset by peer"
            sock.shutdown(socket.SHUT_WR)
            out = await wait_for_log(c.rec_a, lambda x: "reason" in x)
            assert out["reason"] == "unknown_source" and out["bytes_sent"] == 0, out

    run(go)


def test_refusal_resets_a_client_that_keeps_sending() -> None:
    async def go(c: Cluster) -> None:
        loop = asyncio.get_running_loop()
        with _refused_after_sending(c, b"x") as sock:
            assert await loop.sock_recv(sock, 100) == b""
            with pytest.raises((ConnectionResetError, BrokenPipeError)):
                for _ in range(64):  # past REFUSE_DRAIN_BYTES, the drain gives up
                    await loop.sock_sendall(sock, b"y" * 8192)
                    await asyncio.sleep(0.01)

    run(go)


def test_inbound_plaintext_to_local_workload() -> None:
    async def go(c: Cluster) -> None:
        r, w = await c.open((B, c.echo_b_port), via=c.b_plain)
        w.write(b"plain")
        w.write_eof()
        assert await r.read() == b"plain<bye>"
        rec = await wait_for_log(c.rec_b, lambda x: x.get("via") == "plaintext")
        assert rec["dst_workload"] == "default/echo" and rec["source_principal"] == "" and rec["tls"] is False

    run(go)


def test_no_snapshot_refuses_outbound_at_once() -> None:
    async def go() -> None:
        s = ProxySettings(node_name="x", node_address=A, outbound_bind=A, inbound_bind=A, outbound_port=0,
                          inbound_plain_port=0, hbone_port=0, mark=0, access_log="off")
        p = NodeProxy(s, access_log=AccessLog("off"), original_dst=lambda _s: ECHO_VIP)
        await p.start()
        try:
            r, w = await asyncio.open_connection(*p.addresses()[0])
            assert await asyncio.wait_for(r.read(), 2) == b""
        finally:
            await p.stop()

    uvloop.run(go())


def test_listener_bind_failure_is_clear() -> None:
    async def go() -> None:
        s = ProxySettings(node_name="x", node_address="192.0.2.1", outbound_bind=A, inbound_bind="192.0.2.1",
                          outbound_port=0, inbound_plain_port=0, hbone_port=0, mark=0, access_log="off")
        with pytest.raises(OSError, match="cannot bind the inbound plaintext listener on 192.0.2.1"):
            await NodeProxy(s, access_log=AccessLog("off")).start()

    uvloop.run(go())


# --- WorkerPool: real worker processes ------------------------------------------------------------
def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _worker_settings(tmp_path: Any, host: str = "127.0.0.4") -> ProxySettings:
    return ProxySettings(node_name="w", node_address=host, outbound_bind=host, inbound_bind=host,
                         outbound_port=_free_port(host), inbound_plain_port=_free_port(host),
                         hbone_port=_free_port(host), mark=0, workers=2, connect_timeout_s=1.0,
                         access_log=str(tmp_path / "access.log"))


async def _poke(port: int, host: str = "127.0.0.4") -> bytes:
    r, w = await asyncio.open_connection(host, port)
    data = await asyncio.wait_for(r.read(), 5)
    w.close()
    return data


def _log_lines(path: Any) -> list[dict[str, Any]]:
    import json

    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def test_worker_pool_two_processes(tmp_path: Any) -> None:
    from nodeagent.proxy.worker import WorkerPool

    settings = _worker_settings(tmp_path)
    log_path = tmp_path / "access.log"

    async def go() -> None:
        pool = WorkerPool(settings)
        await pool.start()
        try:
            assert pool.alive() and len(set(pool.pids())) == 2
            # No snapshot yet: refused at once, logged as not_ready.
            assert await _poke(settings.outbound_port) == b""
            pool.publish(snapshot=Snapshot("1", "w", MeshSettings()), certs=TestCA().certs(CLIENT))
            await asyncio.sleep(0.3)
            for _ in range(6):
                assert await _poke(settings.outbound_port) == b""
            await asyncio.sleep(0.2)
            reasons = [x.get("reason") for x in _log_lines(log_path)]
            assert reasons[0] == "not_ready"
            # With a snapshot, every worker got past readiness; this connection was not
            # redirected, so reading its original destination fails instead.
            assert reasons[1:] and all(r == "proxy_error" for r in reasons[1:]), reasons
            # A worker that dies is restarted with the last snapshot.
            victim = pool.pids()[0]
            os.kill(victim, 9)
            for _ in range(100):
                await asyncio.sleep(0.05)
                if pool.up() == 2 and victim not in pool.pids():
                    break
            assert pool.alive() and pool.up() == 2 and victim not in pool.pids()
        finally:
            await pool.stop()
        assert not pool.alive() and pool.up() == 0

    uvloop.run(go())


def test_worker_pool_bind_failure_is_clear(tmp_path: Any) -> None:
    from nodeagent.proxy.worker import WorkerPool, WorkerStartError

    settings = _worker_settings(tmp_path)
    blocker = socket.socket()
    blocker.bind(("127.0.0.4", settings.hbone_port))  # no SO_REUSEPORT: the workers cannot share it
    blocker.listen()

    async def go() -> None:
        pool = WorkerPool(settings)
        with pytest.raises(WorkerStartError,
                           match=f"cannot bind the HBONE listener on 127.0.0.4:{settings.hbone_port}"):
            await pool.start()
        assert not pool.alive()

    try:
        uvloop.run(go())
    finally:
        blocker.close()


def test_listeners_keep_their_backlog(tmp_path: Any) -> None:
    """create_server(sock=...) re-listens with 100 unless told: bursts of connects
    (or a busy worker) must queue up to netutil.LISTEN_BACKLOG, not overflow at 100."""
    import subprocess

    from nodeagent.proxy import netutil
    from tests.conftest import require_tool

    require_tool("ss", "iproute2")
    settings = _worker_settings(tmp_path)

    async def go() -> None:
        p = NodeProxy(settings, access_log=AccessLog("off"))
        await p.start()
        try:
            for _host, port in p.addresses():
                out = subprocess.run(["ss", "-ltnH", f"sport = :{port}"], capture_output=True, text=True,
                                     check=True).stdout.split()
                assert int(out[2]) == min(netutil.LISTEN_BACKLOG, _somaxconn()), out
        finally:
            await p.stop()

    uvloop.run(go())


def _somaxconn() -> int:
    with open("/proc/sys/net/core/somaxconn") as f:
        return int(f.read())
