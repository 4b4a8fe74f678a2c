"""Per-connection idle timeout of the L4 relay (nodeagent/proxy/idle.py): a
real relay over loopback closes both sides after a short idle period and logs
`idle_timeout`; traffic keeps it open; the DestinationPolicy field travels
through the Cluster (common_http_protocol_options.idle_timeout) to the agent."""

from __future__ import annotations

import asyncio
import time

import pytest
import uvloop
from envoy.config.cluster.v3 import cluster_pb2

from controlplane.xds.build_routes import apply_policy
from nodeagent.proxy.accesslog import AccessLog
from nodeagent.proxy.relay import Session, TcpEnd
from nodeagent.xds import l7convert
from nodemesh import model, routespec


class _Relay:
    """client <-> [TcpEnd down | TcpEnd up] <-> echo server, one Session."""

    async def start(self, idle_s: float) -> None:
        self.log = AccessLog("off")
        self.rec = self.log.capture()
        loop = asyncio.get_running_loop()

        async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            while data := await r.read(65536):
                w.write(data)
            w.close()
        self.echo = await asyncio.start_server(echo, "127.0.0.1", 0)
        echo_port = self.echo.sockets[0].getsockname()[1]
        self.session = Session(self.log, "outbound")
        self.session.idle_timeout_s = idle_s
        accepted: asyncio.Future[TcpEnd] = loop.create_future()

        def make_down() -> TcpEnd:
            end = TcpEnd(self.session)
            self.session.downstream = end
            accepted.set_result(end)
            return end
        self.front = await loop.create_server(make_down, "127.0.0.1", 0)
        port = self.front.sockets[0].getsockname()[1]
        self.reader, self.writer = await asyncio.open_connection("127.0.0.1", port)
        down = await accepted
        _, up = await loop.create_connection(lambda: TcpEnd(self.session, down), "127.0.0.1", echo_port)
        down.attach(up)
        up.attach(down)

    async def roundtrip(self, data: bytes) -> bytes:
        self.writer.write(data)
        return await asyncio.wait_for(self.reader.readexactly(len(data)), 2)

    async def stop(self) -> None:
        self.writer.close()
        self.front.close()
        self.echo.close()


def test_idle_connection_closed_on_both_sides_and_logged() -> None:
    async def main() -> None:
        r = _Relay()
        await r.start(0.3)
        try:
            t0 = time.monotonic()
            for _ in range(5):  # busy for ~0.5 s: longer than the timeout, never idle that long
                assert await r.roundtrip(b"ping") == b"ping"
                await asyncio.sleep(0.1)
            got = await asyncio.wait_for(r.reader.read(), 2)  # then idle: the proxy closes on us
            took = time.monotonic() - t0
            assert got == b""
            assert 0.65 <= took < 1.1, took  # last byte at ~0.4 s, + 0.3 s (+ one check period)
            for _ in range(50):
                if r.rec:
                    break
                await asyncio.sleep(0.02)
            assert r.rec and r.rec[0]["reason"] == "idle_timeout", r.rec
            assert r.rec[0]["bytes_sent"] == 20
        finally:
            await r.stop()
    uvloop.run(main())


def test_zero_disables_the_timeout() -> None:
    async def main() -> None:
        r = _Relay()
        await r.start(0.0)
        try:
            await r.roundtrip(b"x")
            await asyncio.sleep(0.3)
            assert await r.roundtrip(b"y") == b"y"
        finally:
            await r.stop()
    uvloop.run(main())


POLICY = """\
apiVersion: nodemesh.io/v1alpha1
kind: DestinationPolicy
metadata: {name: db}
spec:
  targetRef: {kind: Service, name: db}
  connectionPool: {idleTimeout: 90s}
"""


def test_policy_field_travels_through_the_cluster() -> None:
    p = model.parse_documents(POLICY)[0].obj
    assert isinstance(p, routespec.DestinationPolicy) and p.idle_timeout_s == 90.0
    c = cluster_pb2.Cluster(name="outbound|5432||db.default.svc.mesh")
    apply_policy(c, p)
    assert c.common_http_protocol_options.idle_timeout.seconds == 90
    assert l7convert.cluster_policy(c).idle_timeout_s == 90.0
    plain = cluster_pb2.Cluster(name="x")
    apply_policy(plain, None)
    assert not plain.HasField("common_http_protocol_options")  # the 1 h default is Envoy's too
    assert l7convert.cluster_policy(plain).idle_timeout_s == 3600.0
    with pytest.raises(model.ValidationError) as ei:
        model.parse_documents(POLICY.replace("90s", "soon"))
    assert any("spec.connectionPool.idleTimeout" in path for path, _ in ei.value.problems)
