"""How late the control plane's event loop runs what is due, measured and logged.

Every gRPC call reaches a servicer through this one loop, and grpc.aio asks gRPC
core for the next incoming call only once the previous one was handed over (one
call per turn or two of the loop). A loop kept busy for long turns therefore
leaves new calls (joins, registry sessions, ADS streams) waiting in gRPC's own
queue, and gRPC cancels a call that waited there longer than 30 s
(`grpc.server_max_unrequested_time_in_server`): the client sees CANCELLED with
no other detail. That was the join storm's reconnect loop at 1,000 nodes
(docs/benchmarks.md); the lag is what shows it coming.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

log = logging.getLogger("nodemesh.controlplane.looplag")

LAG_INTERVAL_S = 0.1
# A lag this long is logged (at most once per LAG_LOG_EVERY_S): new calls are waiting.
LAG_WARN_S = 2.0
LAG_LOG_EVERY_S = 30.0


async def watch_loop_lag(observe: Callable[[float], None], interval_s: float = LAG_INTERVAL_S,
                         clock: Callable[[], float] = time.monotonic) -> None:
    """Sleep `interval_s` again and again; each time, `observe` how much later
    than asked the loop woke this task up."""
    last_log = -LAG_LOG_EVERY_S
    while True:
        t0 = clock()
        await asyncio.sleep(interval_s)
        lag = max(0.0, clock() - t0 - interval_s)
        observe(lag)
        if lag >= LAG_WARN_S and t0 - last_log >= LAG_LOG_EVERY_S:
            last_log = t0
            log.warning("the control plane's event loop ran %.1f s late: new gRPC calls wait in gRPC's queue "
                        "meanwhile, and one that waits 30 s is cancelled (agents see CANCELLED and retry); "
                        "see nodemesh_controlplane_event_loop_lag_seconds on /metrics", lag)
