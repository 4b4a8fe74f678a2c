"""The splice relay (nodeagent/proxy/splice.py): two plain TCP ends joined by
TcpEnd hand their sockets to os.splice; bytes arrive intact both ways, counted
for the access log, EOF travels as a half-close, a reset closes both sides,
and a tapped end (someone watching the bytes) stays on the Protocol relay."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
from typing import Any

import uvloop

from nodeagent.proxy import splice
from nodeagent.proxy.accesslog import AccessLog
from nodeagent.proxy.relay import Session, TcpEnd


class _Sink:
    """A server that hashes what it reads, answers `reply` bytes, and closes on EOF."""

    def __init__(self, reply: int) -> None:
        self.reply = reply
        self.digest = hashlib.sha256()
        self.count = 0
        self.done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    async def handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        w.write(os.urandom(16) * (self.reply // 16))
        while data := await r.read(1 << 16):
            self.digest.update(data)
            self.count += len(data)
        await w.drain()
        w.close()
        self.done.set_result(None)


async def _relay(port: int, tap: Any = None) -> tuple[Session, list[dict[str, Any]], int, asyncio.Server,
                                                     list[TcpEnd]]:
    log = AccessLog("off")
    rec = log.capture()
    session = Session(log, "outbound")
    loop = asyncio.get_running_loop()
    ends: list[TcpEnd] = []

    async def join(down: TcpEnd) -> None:
        _, up = await loop.create_connection(lambda: TcpEnd(session, down), "127.0.0.1", port)
        up.tap = tap
        ends.append(up)
        down.attach(up)

    def make_down() -> TcpEnd:
        end = TcpEnd(session)
        session.downstream = end
        ends.append(end)
        loop.call_soon(lambda: loop.create_task(join(end)))
        return end

    front = await loop.create_server(make_down, "127.0.0.1", 0)
    return session, rec, front.sockets[0].getsockname()[1], front, ends


def test_bulk_both_ways_half_close_and_counts() -> None:
    async def main() -> None:
        sink = _Sink(reply=3 << 20)
        srv = await asyncio.start_server(sink.handle, "127.0.0.1", 0)
        _session, rec, port, front, ends = await _relay(srv.sockets[0].getsockname()[1])
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.1)
        assert all(e._splice is not None for e in ends)  # handed over to splice
        blob = os.urandom(1 << 20) * 20  # 20 MiB up
        w.write(blob)
        await w.drain()
        w.write_eof()  # half-close: the sink sees EOF, then answers and closes
        got = await asyncio.wait_for(r.read(), 20)
        await asyncio.wait_for(sink.done, 20)
        assert sink.count == len(blob) and sink.digest.digest() == hashlib.sha256(blob).digest()
        assert len(got) == 3 << 20
        for _ in range(100):
            if rec:
                break
            await asyncio.sleep(0.02)
        assert rec and rec[0]["bytes_sent"] == len(blob) and rec[0]["bytes_received"] == 3 << 20
        assert "error" not in rec[0], rec[0]
        w.close()
        front.close()
        srv.close()
    uvloop.run(main())


def test_reset_closes_both_sides() -> None:
    async def main() -> None:
        closed = asyncio.get_running_loop().create_future()

        async def resetter(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
            await r.read(1)
            sock = w.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
            w.transport.abort()  # RST
            closed.set_result(None)

        srv = await asyncio.start_server(resetter, "127.0.0.1", 0)
        _session, rec, port, front, _ends = await _relay(srv.sockets[0].getsockname()[1])
        r, w = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.1)
        w.write(b"x")
        await closed
        with contextlib.suppress(ConnectionResetError):
            assert await asyncio.wait_for(r.read(), 5) == b""
        for _ in range(100):
            if rec:
                break
            await asyncio.sleep(0.02)
        assert rec and "reset" in rec[0].get("error", ""), rec
        w.close()
        front.close()
        srv.close()
    uvloop.run(main())


def test_a_tapped_end_is_not_spliced() -> None:
    class Tap:
        def __init__(self) -> None:
            self.seen = 0

        def request(self, data: bytes) -> None:
            self.seen += len(data)

        def response(self, data: bytes) -> None:
            pass

    async def main() -> None:
        sink = _Sink(reply=0)
        srv = await asyncio.start_server(sink.handle, "127.0.0.1", 0)
        tap = Tap()
        _session, _rec, port, front, ends = await _relay(srv.sockets[0].getsockname()[1], tap=tap)
        _r, w = await asyncio.open_connection("127.0.0.1", port)
        await asyncio.sleep(0.1)
        w.write(b"hello" * 1000)
        w.write_eof()
        await asyncio.wait_for(sink.done, 5)
        assert all(e._splice is None for e in ends) and tap.seen == 5000
        w.close()
        front.close()
        srv.close()
    uvloop.run(main())


def test_pipe_is_grown() -> None:
    r, w = splice._pipe()
    try:
        import fcntl
        assert fcntl.fcntl(w, 1032) >= splice.PIPE_SIZE  # F_GETPIPE_SZ (as root; the limit is 1 MiB by default)
    finally:
        os.close(r)
        os.close(w)
