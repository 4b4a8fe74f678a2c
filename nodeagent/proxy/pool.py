"""HBONE connection pool: many CONNECT streams share one mTLS HTTP/2 connection
per (source identity, peer node address, expected peer identity); a connection
above the stream cap gets a sibling; idle connections are closed. The
bookkeeping (PoolBook) is pure and returns what to close."""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from .relay import Session
from .tunnel import HboneClientProtocol, StreamEnd


@dataclass(frozen=True, order=True)
class PoolKey:
    source_identity: str
    peer: tuple[str, int]  # node address, HBONE port
    expected_identity: str

    def __str__(self) -> str:
        return f"{self.source_identity} -> {self.peer[0]}:{self.peer[1]} ({self.expected_identity})"


@dataclass
class _Entry:
    conn_id: int
    key: PoolKey
    cap: int
    streams: int = 0
    idle_since: float = 0.0
    usable: bool = True


@dataclass
class PoolBook:
    """Which connection serves the next stream, and which have been idle too long."""

    max_streams: int = 100
    idle_timeout_s: float = 60.0
    _by_key: dict[PoolKey, list[_Entry]] = field(default_factory=dict)
    _by_id: dict[int, _Entry] = field(default_factory=dict)

    def add(self, key: PoolKey, conn_id: int, now: float, peer_cap: int | None = None) -> None:
        cap = min(self.max_streams, peer_cap) if peer_cap else self.max_streams
        e = _Entry(conn_id, key, max(1, cap), idle_since=now)
        self._by_key.setdefault(key, []).append(e)
        self._by_id[conn_id] = e

    def choose(self, key: PoolKey) -> int | None:
        """The busiest connection that still has room: packing streams lets the rest go idle."""
        best: _Entry | None = None
        for e in self._by_key.get(key, ()):
            if e.usable and e.streams < e.cap and (best is None or e.streams > best.streams):
                best = e
        return best.conn_id if best else None

    def stream_opened(self, conn_id: int) -> None:
        self._by_id[conn_id].streams += 1

    def stream_closed(self, conn_id: int, now: float) -> None:
        e = self._by_id.get(conn_id)
        if e is None:
            return
        e.streams = max(0, e.streams - 1)
        if e.streams == 0:
            e.idle_since = now

    def retire(self, conn_id: int) -> None:
        """No new streams (GOAWAY, cert change); it goes when its streams end."""
        e = self._by_id.get(conn_id)
        if e is not None:
            e.usable = False

    def remove(self, conn_id: int) -> None:
        e = self._by_id.pop(conn_id, None)
        if e is None:
            return
        lst = self._by_key.get(e.key, [])
        lst[:] = [x for x in lst if x.conn_id != conn_id]
        if not lst:
            self._by_key.pop(e.key, None)

    def expired(self, now: float) -> list[int]:
        """Connections to close now: idle past the timeout, or retired and empty."""
        out = []
        for e in self._by_id.values():
            if e.streams == 0 and (not e.usable or now - e.idle_since >= self.idle_timeout_s):
                out.append(e.conn_id)
        return out

    def __len__(self) -> int:
        return len(self._by_id)

    def __repr__(self) -> str:
        parts = []
        for key in sorted(self._by_key):
            conns = ", ".join(
                f"#{e.conn_id} {e.streams}/{e.cap}{'' if e.usable else ' retired'}" for e in self._by_key[key]
            )
            parts.append(f"{key}: [{conns}]")
        return f"<PoolBook {len(self._by_id)} conns; " + "; ".join(parts) + ">"


C = TypeVar("C", bound=HboneClientProtocol)


class HbonePool(Generic[C]):
    """Owns client HBONE connections. `connector(key)` establishes a verified one."""

    def __init__(
        self,
        connector: Callable[[PoolKey], Awaitable[C]],
        *,
        max_streams: int = 100,
        idle_timeout_s: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._connector = connector
        self._clock = clock
        self.book = PoolBook(max_streams=max_streams, idle_timeout_s=idle_timeout_s)
        self._conns: dict[int, C] = {}
        self._connecting: dict[PoolKey, asyncio.Task[C]] = {}
        self._next_id = 1

    async def open_stream(
        self, key: PoolKey, ip: str, port: int, session: Session
    ) -> tuple[StreamEnd, asyncio.Future[None], C]:
        """Reserve a stream slot and send the CONNECT; await the returned future for the answer."""
        while True:
            cid = self.book.choose(key)
            if cid is not None:
                conn = self._conns[cid]
                if conn.lost or conn.core.closed:
                    self.book.retire(cid)
                    continue
                self.book.stream_opened(cid)
                end, fut = conn.open_tunnel(ip, port, session)
                return end, fut, conn
            task = self._connecting.get(key)
            if task is None:
                task = asyncio.get_running_loop().create_task(self._connect(key))
                self._connecting[key] = task
                task.add_done_callback(functools.partial(self._connect_done, key))
            await asyncio.shield(task)

    async def _connect(self, key: PoolKey) -> C:
        conn = await self._connector(key)
        cid = self._next_id
        self._next_id += 1
        self._conns[cid] = conn
        self.book.add(key, cid, self._clock(), conn.core.peer_max_concurrent_streams())
        def finished(_sid: int) -> None:
            self.book.stream_closed(cid, self._clock())

        conn.on_stream_finished = finished
        conn.on_lost.append(functools.partial(self._forget, cid))
        return conn

    def _connect_done(self, key: PoolKey, _task: object) -> None:
        self._connecting.pop(key, None)

    def _forget(self, cid: int) -> None:
        self.book.remove(cid)
        self._conns.pop(cid, None)

    def reap(self) -> int:
        """Close idle connections; returns how many."""
        ids = self.book.expired(self._clock())
        for cid in ids:
            conn = self._conns.pop(cid, None)
            self.book.remove(cid)
            if conn is not None:
                conn.close()
        return len(ids)

    def retire_all(self) -> None:
        """New certificates: new streams go on new connections; old ones drain."""
        for cid in list(self._conns):
            self.book.retire(cid)

    def close(self) -> None:
        for conn in self._conns.values():
            conn.close()
        self._conns.clear()
        for cid in list(self.book._by_id):
            self.book.remove(cid)

    def __repr__(self) -> str:
        return f"<HbonePool {self.book!r}>"
