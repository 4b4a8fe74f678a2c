"""The one upstream connector (nodeagent/proxy/connector.py) with a scripted
network backend: which path each endpoint takes, what the caller's and the
receiving side's sessions record, and how an unanswered CONNECT or a refused
workload connection fails. No sockets."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from nodeagent.meshview.snapshot import Endpoint, LocalWorkload, MeshSettings, Snapshot
from nodeagent.proxy.accesslog import AccessLog
from nodeagent.proxy.connector import UpstreamConnector
from nodeagent.proxy.errors import ConnectRefused, ConnectTimeout
from nodeagent.proxy.inbound import InboundRefused, InboundTarget
from nodeagent.proxy.pool import PoolKey
from nodeagent.proxy.relay import End, Session

TD = "cluster.local"
CLIENT = f"spiffe://{TD}/ns/default/sa/client"
WEB = f"spiffe://{TD}/ns/default/sa/web"
LOCAL_EP = Endpoint("10.0.0.5", 8080, "default/web", WEB, "n1", "192.168.0.1")
REMOTE_EP = Endpoint("10.0.1.7", 8080, "default/web-2", WEB, "n2", "192.168.0.2", hbone_port=15008)


class _Settings:
    node_name = "n1"
    connect_timeout_s = 0.2
    mark = 0


class _Proxy:
    """What the connector needs of a NodeProxy."""

    def __init__(self) -> None:
        self.settings = _Settings()
        self.log = AccessLog("off")
        self.lines = self.log.capture()
        self.sessions: list[Session] = []

    def new_session(self, direction: str, **fields: Any) -> Session:
        s = Session(self.log, direction, node=self.settings.node_name, **fields)
        self.sessions.append(s)
        return s


class _Wire:
    rx = tx = 0

    def send(self, data: bytes) -> None: ...
    def send_eof(self) -> None: ...
    def abort(self) -> None: ...
    def pause_reading(self) -> None: ...
    def resume_reading(self) -> None: ...


class _Tunnel:
    def __init__(self) -> None:
        self.cancelled: list[Any] = []

    def cancel_tunnel(self, stream: Any) -> None:
        self.cancelled.append(stream)


class _Stream:
    closed = False

    def on_closed(self) -> None:
        self.closed = True


class ScriptedNetwork:
    """A NetworkBackend that records calls and answers as told."""

    def __init__(self, *, answer: bool = True, refuse_workload: bool = False) -> None:
        self.calls: list[tuple[Any, ...]] = []
        self.answer = answer
        self.refuse_workload = refuse_workload
        self.tunnel = _Tunnel()
        self.stream = _Stream()

    async def connect_direct(self, ip: str, port: int, session: Session, partner: End) -> End:
        self.calls.append(("direct", ip, port))
        return _Wire()

    async def connect_workload(self, target: InboundTarget, session: Session) -> End:
        self.calls.append(("workload", target.ip, target.port, target.workload.key, session.fields["direction"]))
        if self.refuse_workload:
            raise ConnectRefused(f"{target.ip}:{target.port} refused")
        return _Wire()

    async def open_hbone_stream(self, key: PoolKey, ip: str, port: int,
                                session: Session) -> tuple[Any, asyncio.Future[None], Any]:
        self.calls.append(("hbone", key, ip, port))
        answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.answer:
            answered.set_result(None)
        return self.stream, answered, self.tunnel


def _snapshot() -> Snapshot:
    web = LocalWorkload("web", "default", "web", "10.0.0.5", (8080,))
    return Snapshot("1", "n1", MeshSettings(trust_domain=TD), (), (), (web,))


def _open(net: ScriptedNetwork, ep: Endpoint) -> tuple[_Proxy, Session, Any]:
    proxy = _Proxy()
    caller = proxy.new_session("outbound", src="10.0.0.9:40000", source_workload="default/client")
    connector = UpstreamConnector(proxy, net)  # type: ignore[arg-type]

    async def go() -> Any:
        return await connector.open(_snapshot(), ep, CLIENT, caller)
    return proxy, caller, asyncio.run(go())


def test_other_node_goes_through_an_hbone_stream_to_the_endpoints_node() -> None:
    net = ScriptedNetwork()
    _, caller, up = _open(net, REMOTE_EP)
    assert net.calls == [("hbone", PoolKey(CLIENT, ("192.168.0.2", 15008), WEB), "10.0.1.7", 8080)]
    assert up.via == "hbone" and up.wire is net.stream and up.inbound is None
    assert caller.fields["via"] == "hbone" and caller.fields["upstream_node"] == "n2"


def test_unanswered_connect_times_out_and_is_cancelled() -> None:
    net = ScriptedNetwork(answer=False)
    with pytest.raises(ConnectTimeout, match="no answer to CONNECT 10.0.1.7:8080"):
        _open(net, REMOTE_EP)
    assert net.tunnel.cancelled == [net.stream]


def test_same_node_connects_the_workload_under_the_receiving_sides_session() -> None:
    net = ScriptedNetwork()
    proxy, caller, up = _open(net, LOCAL_EP)
    assert net.calls == [("workload", "10.0.0.5", 8080, "default/web", "inbound")]
    assert up.via == "same-node" and not up.guarded  # no HTTP rules: decided at L4
    inbound = up.inbound
    assert inbound is not None and inbound.fields["direction"] == "inbound"
    assert inbound.fields["source_principal"] == CLIENT and inbound.fields["dst_workload"] == "default/web"
    assert inbound.fields["src"] == "10.0.0.9:40000" and caller.fields["via"] == "same-node"


def test_same_node_refusal_ends_the_receiving_sides_session_with_the_reason() -> None:
    net = ScriptedNetwork(refuse_workload=True)
    proxy = _Proxy()
    caller = proxy.new_session("outbound", src="10.0.0.9:40000")

    async def go() -> None:
        await UpstreamConnector(proxy, net).open(_snapshot(), LOCAL_EP, CLIENT, caller)  # type: ignore[arg-type]
    with pytest.raises(ConnectRefused):
        asyncio.run(go())
    inbound = [ln for ln in proxy.lines if ln.get("direction") == "inbound"]
    assert len(inbound) == 1 and inbound[0]["reason"] == "connect_refused", inbound


def test_same_node_endpoint_without_a_local_workload_is_refused_before_connecting() -> None:
    net = ScriptedNetwork()
    ghost = Endpoint("10.0.0.6", 9090, "default/ghost", WEB, "n1", "192.168.0.1")
    with pytest.raises(InboundRefused, match="no local workload serves 10.0.0.6:9090"):
        _open(net, ghost)
    assert net.calls == []


def test_passthrough_connects_directly() -> None:
    net = ScriptedNetwork()
    proxy = _Proxy()
    session = proxy.new_session("outbound")

    async def go() -> End:
        return await UpstreamConnector(proxy, net).open_direct("203.0.113.9", 443, session, _Wire())  # type: ignore[arg-type]
    asyncio.run(go())
    assert net.calls == [("direct", "203.0.113.9", 443)] and session.fields["via"] == "passthrough"
