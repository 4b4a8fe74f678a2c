"""Upstream keep-alive for the HTTP/1.1 L7 stack: the pool's pure bookkeeping,
N requests over ONE upstream conn (one CONNECT stream, one workload
connection on the receiving node), and the stale-conn retry."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from nodeagent.proxy.http.h1pool import IdleBook

from .test_http_stack import Mesh, Server, run


@dataclass
class FakeConn:
    born: float
    generation: int = 0
    alive: bool = True

    @property
    def reusable(self) -> bool:
        return self.alive


def test_idle_book_reuses_newest_and_returns_what_to_close() -> None:
    book: IdleBook[FakeConn] = IdleBook(max_idle_per_key=2, idle_timeout_s=10, max_age_s=100)
    a, b, c = FakeConn(0), FakeConn(0), FakeConn(0)
    assert book.put("k", a, 1) == [] and book.put("k", b, 2) == []
    assert book.put("k", c, 3) == [a]  # over the cap: the oldest idle conn goes
    assert repr(book) == "<IdleBook keys=1 idle=2 opened=0 reused=0 generation=0>"
    assert book.take("k", 4) == (c, [])  # most recently used first
    b.alive = False
    assert book.take("k", 5) == (None, [b])  # closed under us: handed back to close, not reused
    d = FakeConn(0)
    book.put("k", d, 6)
    assert book.expire(15.9) == [] and book.expire(16) == [d]  # idle timeout
    e = FakeConn(0)
    book.put("k", e, 1)
    assert book.new_generation() == [e] and book.put("k", e, 2) == [e]  # opened under the old policy
    old = FakeConn(born=0, generation=1)
    assert book.put("k", old, 100) == [old]  # too old to reuse


class KeepAliveReplica(asyncio.Protocol):
    """Answers keep-alive; `answer_per_conn` requests per conn, then closes on the next
    request without answering (a server closing an idle conn as the request arrives)."""

    def __init__(self, srv: KeepAliveServer) -> None:
        self.srv = srv
        self.buf = b""
        self.answered = 0

    def connection_made(self, t: Any) -> None:
        self.t = t
        self.srv.conns += 1

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while b"\r\n\r\n" in self.buf:
            head, _, self.buf = self.buf.partition(b"\r\n\r\n")
            self.srv.seen.append(head.decode())
            if self.srv.answer_per_conn and self.answered >= self.srv.answer_per_conn:
                self.t.close()
                return
            self.answered += 1
            body = f"{self.srv.name} {head.split()[1].decode()}".encode()
            self.t.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))


class KeepAliveServer(Server):
    def __init__(self, name: str, answer_per_conn: int = 0) -> None:
        super().__init__(name)
        self.conns = 0
        self.answer_per_conn = answer_per_conn

    async def start(self) -> int:
        self.s = await asyncio.get_running_loop().create_server(lambda: KeepAliveReplica(self), "127.0.0.3", 0)
        return int(self.s.sockets[0].getsockname()[1])


def test_sequential_requests_reuse_one_upstream_conn() -> None:
    srv = KeepAliveServer("r0")

    async def body(m: Mesh) -> None:
        n = 20
        res = []
        for i in range(2):  # two client connections, one after the other: the upstream conn outlives both
            res += await m.request(f"/n{i}", n=n // 2)
        assert [s for s, _, _ in res] == [200] * n and res[-1][2] == b"r0 /n1"
        assert all("connection: close" not in h.lower() for h in srv.seen)
        assert srv.conns == 1, srv.conns  # one workload connection on the receiving node
        book = m.a.l7.upstreams.book
        assert book.opened == 1 and book.reused == n - 1, book
        await asyncio.sleep(0.05)
        lines = [r for r in m.rec_a if r.get("method")]
        assert len(lines) == n and sum(1 for r in lines if r.get("upstream_reused")) == n - 1
    run(body, [srv])


def test_stale_keepalive_conn_is_retried_once_on_a_fresh_conn() -> None:
    srv = KeepAliveServer("r0", answer_per_conn=1)

    async def body(m: Mesh) -> None:
        res = await m.request("/x", n=3)  # no retry policy: the stale-conn retry is not a route retry
        assert [s for s, _, _ in res] == [200, 200, 200], res
        assert srv.conns == 3  # each reused conn was closed under the request; a fresh one answered
        await asyncio.sleep(0.05)
        lines = [r for r in m.rec_a if r.get("method")]
        assert [bool(r.get("stale_conn_retry")) for r in lines] == [False, True, True]
        assert all(r["attempts"] == 1 and r["status"] == 200 for r in lines)
    run(body, [srv])
