"""A CONNECT tunnel's first bytes from the destination are not lost when they
arrive in the same read as the 200 (before the opener attached its partner):
StreamEnd holds them, and EOF, until attach(). Regression test for the gRPC
endpoint's SETTINGS frame being dropped, which left the h2 upstream on default
64 KiB windows and stalled a large request (tests/unit/test_h2_stack.py)."""

from __future__ import annotations

import asyncio
from typing import Any

from nodeagent.proxy.accesslog import AccessLog
from nodeagent.proxy.hbone import ConnectRequested, HboneConnection
from nodeagent.proxy.relay import Session
from nodeagent.proxy.tunnel import HboneClientProtocol


class _Transport:
    """Just enough of an asyncio transport for HboneProtocol: collects writes."""

    def __init__(self) -> None:
        self.out = bytearray()

    def write(self, data: bytes) -> None:
        self.out += data

    def writelines(self, chunks: list[bytes]) -> None:
        for c in chunks:
            self.out += c

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default

    def take(self) -> bytes:
        data, self.out = bytes(self.out), bytearray()
        return data


class _Recorder:
    """A partner End that records what it is given."""

    def __init__(self) -> None:
        self.rx = 0
        self.tx = 0
        self.data = bytearray()
        self.eof = False

    def send(self, data: bytes) -> None:
        self.data += data

    def send_eof(self) -> None:
        self.eof = True

    def abort(self) -> None:
        pass

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def _opened_tunnel() -> tuple[HboneClientProtocol, _Transport, HboneConnection, int, Any, Any]:
    proto = HboneClientProtocol()
    tr = _Transport()
    proto.connection_made(tr)  # type: ignore[arg-type]
    srv = HboneConnection(client=False)
    srv.initiate()
    srv.receive_data(tr.take())
    proto.data_received(srv.data_to_send())
    srv.receive_data(tr.take())
    end, answered = proto.open_tunnel("10.0.0.5", 25, Session(AccessLog("off"), "outbound"))
    (req,) = [e for e in srv.receive_data(tr.take()) if isinstance(e, ConnectRequested)]
    return proto, tr, srv, req.stream_id, end, answered


def test_data_and_eof_right_behind_the_200_wait_for_the_partner() -> None:
    async def body() -> None:
        proto, _tr, srv, sid, end, answered = _opened_tunnel()
        # A server that speaks first: the 200, its greeting and its EOF in one read.
        srv.accept(sid)
        srv.send(sid, b"220 mail ready\r\n")
        srv.end(sid)
        proto.data_received(srv.data_to_send())
        assert answered.done() and answered.exception() is None
        assert end.partner is None  # the opener has not had its turn yet
        rec = _Recorder()
        end.attach(rec)
        assert bytes(rec.data) == b"220 mail ready\r\n" and rec.eof
    asyncio.run(body())


def test_data_after_attach_goes_straight_through() -> None:
    async def body() -> None:
        proto, _tr, srv, sid, end, _answered = _opened_tunnel()
        srv.accept(sid)
        proto.data_received(srv.data_to_send())
        rec = _Recorder()
        end.attach(rec)
        assert not rec.data and not rec.eof
        srv.send(sid, b"hello")
        proto.data_received(srv.data_to_send())
        assert bytes(rec.data) == b"hello" and not rec.eof
    asyncio.run(body())


def test_a_reset_stream_gives_back_the_connection_credit_of_bytes_it_held() -> None:
    """Bytes held while the partner pushed back still count against the connection's
    receive window: when the peer resets the stream they are credited back (found by
    tests/unit/test_hbone_oracle.py: without it, the other tunnels of the connection stalled)."""
    async def body() -> None:
        proto, _tr, srv, sid, end, _answered = _opened_tunnel()
        srv.accept(sid)
        proto.data_received(srv.data_to_send())
        rec = _Recorder()
        end.attach(rec)
        end.pause_reading()  # the partner pushes back: acknowledgements wait
        srv.send(sid, b"x" * 10_000)
        proto.data_received(srv.data_to_send())
        core = proto.core
        credit0 = core._conn_credit + core._recv_window
        srv.reset(sid)
        proto.data_received(srv.data_to_send())
        assert core._conn_credit + core._recv_window == credit0 + 10_000
    asyncio.run(body())
