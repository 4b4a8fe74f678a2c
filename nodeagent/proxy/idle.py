"""Per-connection idle timeout for L4 (TCP) relays.

A relayed connection that moves no byte either way for `timeout_s` is closed
on both sides, and its access log line says `reason: idle_timeout` (Envoy's
tcp_proxy idle_timeout; the value comes from the destination's
DestinationPolicy `connectionPool.idleTimeout`, carried on the Cluster as
common_http_protocol_options.idle_timeout, default 1 h).

Nothing runs on the data path: the watch compares the session's byte counters
(the downstream End's rx/tx, which the relay keeps anyway) each time its one
timer fires. The timer fires every `timeout_s / CHECKS_PER_TIMEOUT`, so an idle
connection is closed between T and T * (1 + 1/CHECKS_PER_TIMEOUT) after its
last byte; a busy one costs one timer callback per check period.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nodeagent.meshview.snapshot import Snapshot

    from .plan import OutboundPlan
    from .relay import Session

log = logging.getLogger(__name__)

DEFAULT_TCP_IDLE_TIMEOUT_S = 3600.0
CHECKS_PER_TIMEOUT = 8


class IdleWatch:
    """Closes a session's ends once no byte has moved for `timeout_s`."""

    def __init__(self, session: Session, timeout_s: float, loop: asyncio.AbstractEventLoop | None = None,
                 on_idle: Callable[[], None] | None = None) -> None:
        self.session = session
        self.timeout_s = timeout_s
        self.loop = loop or asyncio.get_running_loop()
        self.on_idle = on_idle
        self._period = max(timeout_s / CHECKS_PER_TIMEOUT, 0.001)
        self._seen = self._bytes()
        self._last_change = self.loop.time()
        self._timer: asyncio.TimerHandle | None = self.loop.call_at(self._last_change + self._period, self._check)
        self.fired = False
        session.on_finish.append(self.cancel)

    def _bytes(self) -> int:
        d = self.session.downstream
        return (d.rx + d.tx) if d is not None else 0

    def _check(self) -> None:
        self._timer = None
        now = self.loop.time()
        seen = self._bytes()
        if seen != self._seen:
            self._seen = seen
            self._last_change = now
        elif now - self._last_change >= self.timeout_s - 1e-3:
            self._expire()
            return
        self._timer = self.loop.call_at(min(now + self._period, self._last_change + self.timeout_s), self._check)

    def _expire(self) -> None:
        self.fired = True
        s = self.session
        s.fail("idle_timeout", f"no bytes either way for {self.timeout_s:g}s "
                               "(DestinationPolicy connectionPool.idleTimeout)")
        if self.on_idle is not None:
            self.on_idle()
            return
        down = s.downstream
        partner = getattr(down, "partner", None)
        # Both sides, the same way a reset travels: abort() marks each end as
        # closed by its partner so neither reports a second error.
        for end in (down, partner):
            if end is not None:
                try:
                    end.abort()
                except Exception:
                    log.exception("closing an idle connection failed")

    def cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def watch(session: Session, timeout_s: float) -> IdleWatch | None:
    """Start the watch (no-op for a zero/negative timeout: disabled)."""
    if timeout_s <= 0:
        return None
    return IdleWatch(session, timeout_s)


def idle_timeout_of(snapshot: Snapshot, plan: OutboundPlan) -> float:
    """The destination service port's idle timeout (its Cluster's policy), else the default."""
    hit = snapshot.by_vip.get((plan.dst_ip, plan.dst_port))
    policy = hit[1].policy if hit is not None else None
    return policy.idle_timeout_s if policy is not None else DEFAULT_TCP_IDLE_TIMEOUT_S
