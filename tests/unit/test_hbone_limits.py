"""HBONE limits and timeouts (HboneLimits in nodeagent/proxy/hbone.py): the
stream cap per accepted connection, the idle timeout of an accepted connection,
and the idle timeout every inbound tunnel gets; each plays the peer that
overstays and checks the refusal and its counted reason."""

from __future__ import annotations

import asyncio
import dataclasses
from typing import Any

from nodeagent.proxy import hbone
from nodeagent.proxy.accesslog import AccessLog
from nodeagent.proxy.hbone import ConnectRejected, ConnectRequested, HboneConnection, StreamReset
from nodeagent.proxy.relay import Session
from nodeagent.proxy.tunnel import HboneServerProtocol


def _closed(tr: Any) -> bool:  # (a call: mypy keeps `tr.closed` narrowed by the assert before the sleep)
    return bool(tr.closed)


def _pair(max_streams: int) -> tuple[HboneConnection, HboneConnection]:
    c = HboneConnection(client=True)
    s = HboneConnection(client=False, max_concurrent_streams=max_streams)
    c.initiate()
    s.initiate()
    for _ in range(3):
        s.receive_data(c.data_to_send())
        c.receive_data(s.data_to_send())
    return c, s


def test_streams_over_the_cap_are_refused_and_counted() -> None:
    c, _ = _pair(max_streams=2)
    # The client core honours the server's cap itself...
    c.open_tunnel("10.0.0.1", 80)
    c.open_tunnel("10.0.0.1", 81)
    assert not c.can_open() and c.peer_max_concurrent_streams() == 2
    # ... so play a peer that does not: three CONNECTs on the wire at once.
    evil = HboneConnection(client=True)
    evil.initiate()
    s2 = HboneConnection(client=False, max_concurrent_streams=2)
    s2.initiate()
    evil._peer_max_streams = 10  # ignores the server's SETTINGS
    for port in (80, 81, 82):
        evil.open_tunnel("10.0.0.1", port)
    evs = s2.receive_data(evil.data_to_send())
    assert [e.port for e in evs if isinstance(e, ConnectRequested)] == [80, 81]
    (rej,) = [e for e in evs if isinstance(e, ConnectRejected)]
    assert rej.code == "hbone_stream_limit" and rej.stream_id == 5
    back = evil.receive_data(s2.data_to_send())
    assert StreamReset(5, hbone.ErrorCodes.REFUSED_STREAM, remote=True) in back
    assert s2.open_streams == 2


class _Transport:
    def __init__(self) -> None:
        self.out = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.out += data

    def writelines(self, chunks: list[bytes]) -> None:
        for c in chunks:
            self.out += c

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        self.closed = True

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("10.0.0.9", 40000) if name == "peername" else default


def test_idle_accepted_connection_gets_goaway_and_is_closed() -> None:
    async def body() -> None:
        closed: list[int] = []
        limits = dataclasses.replace(hbone.DEFAULT_LIMITS, server_idle_timeout_s=0.1)

        async def on_connect(*_a: Any) -> Any:
            raise AssertionError("no stream expected")

        proto = HboneServerProtocol(on_connect, lambda *_a: Session(AccessLog("off"), "inbound"),
                                    lambda _o: ("spiffe://td/ns/a/sa/b", ""), limits, lambda: closed.append(1))
        tr = _Transport()
        proto.connection_made(tr)  # type: ignore[arg-type]
        client = HboneConnection(client=True)
        client.initiate()
        proto.data_received(client.data_to_send())  # preface and SETTINGS: no stream
        await asyncio.sleep(0.05)
        assert not tr.closed
        await asyncio.sleep(0.2)
        assert _closed(tr) and closed == [1]
        evs = client.receive_data(bytes(tr.out))
        (goaway,) = [e for e in evs if isinstance(e, hbone.ConnectionClosed)]
        assert "idle timeout" in goaway.reason
    asyncio.run(body())


def test_inbound_tunnels_get_the_stream_idle_timeout() -> None:
    from nodeagent.proxy.proxy import NodeProxy
    from nodeagent.supervision.settings import ProxySettings

    limits = dataclasses.replace(hbone.DEFAULT_LIMITS, stream_idle_timeout_s=42.0)
    proxy = NodeProxy(ProxySettings(node_name="n", node_address="127.0.0.1", access_log="off"),
                      hbone_limits=limits)
    conn = HboneServerProtocol(proxy._on_connect, proxy._hbone_session, proxy._describe_tls, limits)
    session = proxy._hbone_session(conn, ConnectRequested(1, "10.0.0.1", 80, ()))
    assert session.idle_timeout_s == 42.0


# ---------------------------------------------------------------- MeshConfig spec.hbone


def test_shared_defaults_are_the_agents_defaults() -> None:
    from nodemesh.hbonespec import DEFAULT_HBONE

    assert hbone.HboneLimits.from_settings(DEFAULT_HBONE) == hbone.DEFAULT_LIMITS


def test_meshconfig_hbone_is_validated_and_reaches_the_agents() -> None:
    from nodemesh import model
    from nodemesh.hbonespec import parse_hbone
    from nodemesh.security import MeshSecurity

    spec = {"maxConcurrentStreams": 64, "streamWindowBytes": 1 << 20, "idleTimeoutSeconds": 15}
    doc = model.parse_document({"apiVersion": "nodemesh.io/v1alpha1", "kind": "MeshConfig",
                                "metadata": {"name": "mesh"}, "spec": {"hbone": spec}})
    hb = doc.obj.hbone_limits
    assert (hb.max_concurrent_streams, hb.stream_window_bytes, hb.idle_timeout_s) == (64, 1 << 20, 15.0)
    assert doc.obj.spec()["hbone"] == spec
    sec = MeshSecurity(hbone=hb)
    assert MeshSecurity.from_json(sec.to_json()) == sec  # how it reaches the agents
    _, problems = parse_hbone({"streamWindowBytes": 100, "maxFrameBytes": 1 << 25, "bogus": 1,
                               "idleTimeoutSeconds": True})
    assert sorted(p for p, _ in problems) == ["spec.hbone.bogus", "spec.hbone.idleTimeoutSeconds",
                                              "spec.hbone.maxFrameBytes", "spec.hbone.streamWindowBytes"]
    assert "65535" in dict(problems)["spec.hbone.streamWindowBytes"]  # the reason names the bounds


def test_node_proxy_applies_meshconfig_hbone_to_new_connections() -> None:
    from nodeagent.meshview.snapshot import MeshSettings, Snapshot
    from nodeagent.proxy.proxy import NodeProxy
    from nodeagent.supervision.settings import ProxySettings
    from nodemesh.hbonespec import HboneSettings
    from nodemesh.security import MeshSecurity, SecurityPolicies

    proxy = NodeProxy(ProxySettings(node_name="n", node_address="127.0.0.1", access_log="off"))
    spec = HboneSettings(max_concurrent_streams=64, streams_per_connection=8, max_frame_bytes=32_768,
                         stream_idle_timeout_s=42.0)
    snap = Snapshot("1", "n", MeshSettings(trust_domain="td"), security=SecurityPolicies(MeshSecurity(hbone=spec)))
    proxy.update(snap)
    lim = proxy.hbone_limits
    assert (lim.max_streams_per_connection, lim.client_max_streams, lim.max_frame_size) == (64, 8, 32_768)
    assert proxy.pool.book.max_streams == 8
    conn = proxy._hbone_factory()  # a connection accepted from now on
    assert conn.limits is lim and conn.core._max_streams == 64 and conn.core._max_frame == 32_768
    session = proxy._hbone_session(conn, ConnectRequested(1, "10.0.0.1", 80, ()))
    assert session.idle_timeout_s == 42.0
    proxy.update(dataclasses.replace(snap, security=SecurityPolicies(MeshSecurity())))
    assert proxy.hbone_limits == hbone.DEFAULT_LIMITS  # back to what the agent was started with
