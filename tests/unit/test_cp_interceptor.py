"""The control plane's auth interceptor around a node's open stream, over real
mutual TLS on a real grpc.aio server: responses pass through, a revocation
closes the stream at once with the reason, and no way a stream ends (the
client cancels, the servicer fails, the server stops) leaves a task behind or
logs anything."""

from __future__ import annotations

import asyncio
import datetime
import gc
import ipaddress
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane.cpca import ControlPlaneCA
from controlplane.interceptor import AuthInterceptor, current_caller
from controlplane.operators import Operators
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc


class Registry(mesh_pb2_grpc.RegistryServicer):
    """Answers each report with a grant naming the caller; a report with this
    node name makes the servicer fail."""

    FAIL = "fail-now"

    def __init__(self) -> None:
        self.ended = 0  # servicer generators that ran their finally

    async def Session(self, request_iterator: AsyncIterator[mesh_pb2.NodeReport],
                      context: grpc.aio.ServicerContext) -> AsyncIterator[mesh_pb2.LeaseGrant]:
        try:
            async for report in request_iterator:
                if report.register.node_name == self.FAIL:
                    raise RuntimeError("servicer failed")
                caller = current_caller()
                yield mesh_pb2.LeaseGrant(lease_seconds=30, node_name=caller.name if caller else "")
        finally:
            self.ended += 1


class Stream:
    """One node's Registry.Session through the interceptor, over mutual TLS."""

    def __init__(self, channel: grpc.aio.Channel) -> None:
        self.outbox: asyncio.Queue[mesh_pb2.NodeReport] = asyncio.Queue()

        async def reports() -> AsyncIterator[mesh_pb2.NodeReport]:
            while True:
                yield await self.outbox.get()

        self.call = mesh_pb2_grpc.RegistryStub(channel).Session(reports())  # type: ignore[no-untyped-call]

    async def ask(self, name: str = "node-1") -> mesh_pb2.LeaseGrant:
        self.outbox.put_nowait(mesh_pb2.NodeReport(register=mesh_pb2.NodeRegistration(node_name=name)))
        grant = await asyncio.wait_for(self.call.read(), 5)
        assert isinstance(grant, mesh_pb2.LeaseGrant), grant
        return grant


Scenario = Callable[[AuthInterceptor, Registry, grpc.aio.Server, Stream], Awaitable[None]]


def run(tmp_path: Path, caplog: pytest.LogCaptureFixture, scenario: Scenario,
        expect_logs: tuple[str, ...] = ()) -> None:
    """Serve the Registry behind the interceptor, open one node stream, play the
    scenario, stop; then nothing may be left: no interceptor task, no stream
    tracked, and no log record at WARNING or above but those the scenario
    expects, one each (asyncio's "Task exception was never retrieved" is logged
    at ERROR when a task is collected)."""
    ca = ControlPlaneCA.load_or_create(str(tmp_path))
    registry = Registry()
    interceptor = AuthInterceptor(Operators(sqlite3.connect(":memory:", isolation_level=None)))

    async def main() -> None:
        server = grpc.aio.server(interceptors=[interceptor])
        mesh_pb2_grpc.add_RegistryServicer_to_server(registry, server)  # type: ignore[no-untyped-call]
        mtls, _ = ca.server_credentials([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))])
        port = server.add_secure_port("127.0.0.1:0", mtls)
        await server.start()
        key = ec.generate_private_key(ec.SECP256R1())
        cert = ca.sign_client(key.public_key(), "spiffe://cluster.local/node/node-1", datetime.timedelta(hours=1))
        creds = grpc.ssl_channel_credentials(
            root_certificates=ca.pem.encode(), certificate_chain=cert.encode(),
            private_key=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                          serialization.NoEncryption()))
        try:
            async with grpc.aio.secure_channel(f"127.0.0.1:{port}", creds) as channel:
                stream = Stream(channel)
                assert (await stream.ask()).node_name == "node-1"  # the caller reached the servicer
                assert interceptor.guard.count("node-1") == 1
                await scenario(interceptor, registry, server, stream)
        finally:
            await server.stop(0)
        for _ in range(50):  # the server's own handler tasks end a few loop turns after stop
            if not interceptor.guard.nodes() and registry.ended:
                break
            await asyncio.sleep(0.01)
        assert interceptor.guard.streams() == []
        assert registry.ended == 1
        left = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        assert not [t for t in left if "interceptor" in repr(t.get_coro())], left

    with caplog.at_level(logging.WARNING):
        asyncio.run(main())
        gc.collect()
    logged = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(logged) == len(expect_logs), logged
    for message, pattern in zip(logged, expect_logs, strict=True):
        assert re.search(pattern, message), (pattern, logged)


def test_responses_pass_and_a_server_stop_ends_the_stream_quietly(tmp_path: Path,
                                                                   caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(_i: AuthInterceptor, _r: Registry, server: grpc.aio.Server, stream: Stream) -> None:
        for _ in range(20):
            assert (await stream.ask()).lease_seconds == 30
        await server.stop(0)
        with pytest.raises(grpc.aio.AioRpcError):
            await asyncio.wait_for(stream.call.read(), 5)

    run(tmp_path, caplog, scenario)


def test_a_client_cancel_ends_the_stream_quietly(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(_i: AuthInterceptor, _r: Registry, _s: grpc.aio.Server, stream: Stream) -> None:
        stream.call.cancel()
        await asyncio.sleep(0.2)

    run(tmp_path, caplog, scenario)


def test_a_failing_servicer_ends_the_stream_with_unknown(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(_i: AuthInterceptor, _r: Registry, _s: grpc.aio.Server, stream: Stream) -> None:
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await stream.ask(Registry.FAIL)
        assert e.value.code() == grpc.StatusCode.UNKNOWN

    # gRPC itself logs the servicer's exception: that one record is the servicer's failure.
    run(tmp_path, caplog, scenario, expect_logs=(r"Unexpected \[RuntimeError\] raised by servicer method",))


def test_a_revocation_closes_the_open_stream_at_once_with_the_reason(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(interceptor: AuthInterceptor, _r: Registry, _s: grpc.aio.Server, stream: Stream) -> None:
        # The servicer is waiting for the next report: the revocation must not wait for it.
        assert interceptor.guard.close_node("node-1", "node node-1 was revoked by operator/admin") == 1
        with pytest.raises(grpc.aio.AioRpcError) as e:
            await asyncio.wait_for(stream.call.read(), 5)
        assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert e.value.details() == "stream closed: node node-1 was revoked by operator/admin"
        assert interceptor.refusals.counts == {("Session", "PERMISSION_DENIED", "node/node-1"): 1}

    run(tmp_path, caplog, scenario, expect_logs=(r"refused /nodemesh.v1.Registry/Session to node/node-1 .*"
                                                 r"open stream closed: node node-1 was revoked by operator/admin",))
