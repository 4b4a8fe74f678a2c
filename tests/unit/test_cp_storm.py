"""What keeps a join storm from feeding itself (docs/benchmarks.md, issue 13):
a rebuild waits until the streams have answered the previous push, the sync
tracker counts the streams still owing an answer, the event loop's lag is
measured, and open streams are re-checked in one trip off the loop."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

from controlplane.interceptor import AuthInterceptor
from controlplane.looplag import watch_loop_lag
from controlplane.nodeids import NodeIdentities
from controlplane.noderegistry import NodeRegistry
from controlplane.operators import Operators
from controlplane.process import SnapshotPublisher
from controlplane.records import Records
from controlplane.store import SQLiteStore
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.sync import MAX_PENDING, SyncTracker

C, E = "t.Cluster", "t.Endpoint"


def test_streams_owing_an_answer_are_counted_until_every_type_is_answered() -> None:
    s = SyncTracker()
    s.opened(1, "delta")
    s.opened(2, "delta")
    assert s.awaiting_answers() == 0
    s.sent(1, C, "v1", "1", 10)
    s.sent(1, E, "v1", "2", 10)
    s.sent(2, C, "v1", "3", 10)
    assert s.awaiting_answers() == 2
    s.answered(1, C, "1", None)
    assert s.awaiting_answers() == 2  # stream 1 still owes its Endpoint answer
    s.answered(1, E, "2", "bad endpoint")  # a NACK is an answer too
    assert s.awaiting_answers() == 1
    s.closed(2)  # a stream that goes away owes nothing
    assert s.awaiting_answers() == 0
    for i in range(MAX_PENDING + 5):  # a client that never answers stays one stream
        s.sent(1, C, "v", str(100 + i), 10)
    assert s.awaiting_answers() == 1


async def _until(pred: object, timeout: float = 5.0) -> None:
    t0 = time.monotonic()
    while not pred():  # type: ignore[operator]
        assert time.monotonic() - t0 < timeout, "condition not reached"
        await asyncio.sleep(0.01)


def test_a_rebuild_waits_for_the_last_push_to_be_answered_and_as_long_again(tmp_path: Path) -> None:
    async def body() -> None:
        store = SQLiteStore(str(tmp_path / "db"))
        in_flight = [True]
        pub = SnapshotPublisher(store, NodeRegistry(), SnapshotCache(), list, debounce_s=0.01,
                                in_flight=lambda: in_flight[0], max_hold_s=30)
        pub.publish_now()
        task = asyncio.create_task(pub.run())
        try:
            pub.trigger()
            await _until(lambda: pub.published == 2)  # nothing pushed before: no wait
            t_push = time.monotonic()
            pub.trigger()
            pub.trigger()
            await asyncio.sleep(0.3)
            assert pub.published == 2  # held: the streams have not answered the last push
            in_flight[0] = False
            t_answered = time.monotonic()
            await _until(lambda: pub.published == 3)  # the two changes share one push ...
            waited = time.monotonic() - t_answered
            assert waited >= 0.8 * (t_answered - t_push)  # ... made as long after the answers again
            await asyncio.sleep(0.1)
            assert pub.published == 3
            await asyncio.sleep(1.0)  # long after the last push was answered: no wait
            pub.trigger()
            t0 = time.monotonic()
            await _until(lambda: pub.published == 4)
            assert time.monotonic() - t0 < 0.2
        finally:
            task.cancel()
            store.close()

    asyncio.run(body())


def test_a_rebuild_is_held_no_longer_than_the_limit(tmp_path: Path) -> None:
    async def body() -> None:
        store = SQLiteStore(str(tmp_path / "db"))
        pub = SnapshotPublisher(store, NodeRegistry(), SnapshotCache(), list, debounce_s=0.01,
                                in_flight=lambda: True, max_hold_s=0.2)  # a client that never answers
        pub.publish_now()
        task = asyncio.create_task(pub.run())
        try:
            pub.trigger()
            await _until(lambda: pub.published == 2)
            t0 = time.monotonic()
            pub.trigger()
            await _until(lambda: pub.published == 3)
            assert 0.15 <= time.monotonic() - t0 < 1.0
        finally:
            task.cancel()
            store.close()

    asyncio.run(body())


def test_the_loop_lag_is_what_a_blocked_loop_owes_its_timers() -> None:
    async def body() -> list[float]:
        seen: list[float] = []
        task = asyncio.create_task(watch_loop_lag(seen.append, interval_s=0.02))
        await asyncio.sleep(0.1)
        time.sleep(0.3)  # the loop held, as by a long turn
        await asyncio.sleep(0.1)
        task.cancel()
        return seen

    seen = asyncio.run(body())
    assert max(seen) >= 0.25
    assert sorted(seen)[len(seen) // 2] < 0.1  # the other turns were on time


def test_open_streams_of_a_revoked_node_are_closed_by_the_recheck(tmp_path: Path) -> None:
    db = sqlite3.connect(tmp_path / "db", isolation_level=None, check_same_thread=False)
    ids = NodeIdentities(Records(db))
    ids.issued("node-a", "aa", time.time() + 3600, join_address="10.0.0.1")
    ids.issued("node-b", "bb", time.time() + 3600, join_address="10.0.0.2")
    icpt = AuthInterceptor(Operators(Records(db)), nodes=ids)

    async def body() -> tuple[bool, bool, str]:
        a = icpt.guard.enter("node-a", "aa")
        b = icpt.guard.enter("node-b", "bb")
        task = asyncio.create_task(icpt.recheck_streams(interval_s=0.02))
        await asyncio.sleep(0.1)
        assert not a.reason and not b.reason
        ids.revoke("node-a", "test")
        await _until(lambda: bool(a.reason))
        task.cancel()
        return bool(a.reason), bool(b.reason), a.reason

    a, b, why = asyncio.run(body())
    assert a and not b and "node node-a was revoked" in why
