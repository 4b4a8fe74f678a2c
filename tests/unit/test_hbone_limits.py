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
        assert tr.closed and closed == [1]
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
