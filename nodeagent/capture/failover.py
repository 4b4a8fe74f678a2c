"""The agent's capture watchdog for backends whose rules cannot see whether the
proxy listens (iptables, nftables): every POLL_S it checks that the outbound
listener exists and switches capture between SERVING and, per failurePolicy,
BYPASS (open) or REFUSE (closed). eBPF decides in the kernel instead.

Each proxy-down window is counted and logged with its length, so an operator
can see when and for how long traffic bypassed the mesh (or was refused).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from . import liveness
from .base import AgentFailover, CaptureError, ProxyState

log = logging.getLogger("nodeagent.capture")

POLL_S = 0.2


def state_for(serving: bool, failure_policy: str) -> ProxyState:
    if serving:
        return ProxyState.SERVING
    return ProxyState.BYPASS if failure_policy == "open" else ProxyState.REFUSE


class Failover:
    def __init__(self, failure_policy: str, port: int,
                 probe: Callable[[int], bool] = liveness.listening,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.failure_policy = failure_policy
        self.port = port
        self._probe = probe
        self._clock = clock
        self.state = ProxyState.SERVING
        self.windows = 0  # proxy-down windows seen
        self.down_seconds = 0.0  # total length of finished windows
        self._down_since: float | None = None
        self.last_error = ""

    def status(self) -> dict[str, Any]:
        current = self._clock() - self._down_since if self._down_since is not None else 0.0
        return {"proxy_state": self.state.value, "failure_policy": self.failure_policy,
                "proxy_down_windows": self.windows, "proxy_down_seconds": round(self.down_seconds + current, 3),
                "failover_error": self.last_error}

    async def tick(self, capture: Any) -> bool:
        """One check; True if capture was switched."""
        if not isinstance(capture, AgentFailover):
            return False
        want = state_for(self._probe(self.port), self.failure_policy)
        have = getattr(capture, "state", ProxyState.SERVING)
        if want == have:
            return False
        try:
            await asyncio.to_thread(capture.set_proxy_state, want)
        except CaptureError as e:
            self.last_error = str(e)
            log.error("cannot switch capture to %s: %s", want.value, e)
            return False
        self.last_error = ""
        now = self._clock()
        if want is ProxyState.SERVING:
            length = now - self._down_since if self._down_since is not None else 0.0
            self.down_seconds += length
            self._down_since = None
            log.warning("proxy serving again after %.2fs: capture restored (proxy-down window #%d)",
                        length, self.windows)
        else:
            if self._down_since is None:
                self._down_since = now
                self.windows += 1
            if want is ProxyState.BYPASS:
                log.warning("proxy not listening on port %d: workloads' traffic BYPASSES the mesh until it is "
                            "back (failurePolicy open; proxy-down window #%d)", self.port, self.windows)
            else:
                log.warning("proxy not listening on port %d: workloads' connections are REFUSED (reset) until it "
                            "is back (failurePolicy closed; proxy-down window #%d)", self.port, self.windows)
        self.state = want
        return True

    async def run(self, get_capture: Callable[[], Any], active: Callable[[], bool],
                  on_change: Callable[[], None], stop: asyncio.Event) -> None:
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=POLL_S)
            if stop.is_set():
                return
            if active() and await self.tick(get_capture()):
                on_change()
