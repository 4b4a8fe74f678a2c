"""Passive outlier detection per cluster: an endpoint with N consecutive 5xx
(or N consecutive gateway failures: connect failure, reset, timeout, 502-504)
is ejected for base_ejection × times-ejected (capped), never more than
max_ejection_percent of the endpoints at once. The request path only reads
`ejected()`; outcomes come in through `record()`."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from nodemesh.routespec import OutlierDetection

from .retry import Outcome


@dataclass
class _State:
    consecutive_5xx: int = 0
    consecutive_gateway: int = 0
    times_ejected: int = 0
    ejected_until: float = 0.0


class OutlierDetector:
    def __init__(self, config: OutlierDetection, clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self._clock = clock
        self._st: dict[tuple[str, int], _State] = {}
        self.ejections = 0

    def record(self, key: tuple[str, int], outcome: Outcome, total_endpoints: int) -> bool:
        """Feed one outcome; returns True when it ejected the endpoint."""
        st = self._st.setdefault(key, _State())
        c = self.config
        if not outcome.server_error:
            st.consecutive_5xx = st.consecutive_gateway = 0
            return False
        st.consecutive_5xx += 1
        if outcome.gateway_error:
            st.consecutive_gateway += 1
        hit = ((c.consecutive_5xx and st.consecutive_5xx >= c.consecutive_5xx)
               or (c.consecutive_gateway_errors and st.consecutive_gateway >= c.consecutive_gateway_errors))
        if not hit or self.is_ejected(key):
            return False
        now = self._clock()
        ejected_now = sum(1 for s in self._st.values() if s.ejected_until > now)
        if total_endpoints <= 0 or (ejected_now + 1) * 100 > c.max_ejection_percent * total_endpoints:
            return False  # would eject too large a share: keep serving from it
        st.times_ejected += 1
        st.ejected_until = now + min(c.max_ejection_s, c.base_ejection_s * st.times_ejected)
        st.consecutive_5xx = st.consecutive_gateway = 0
        self.ejections += 1
        return True

    def is_ejected(self, key: tuple[str, int]) -> bool:
        st = self._st.get(key)
        return st is not None and st.ejected_until > self._clock()

    def __repr__(self) -> str:
        now = self._clock()
        ej = sorted(f"{k[0]}:{k[1]}" for k, s in self._st.items() if s.ejected_until > now)
        return f"<OutlierDetector ejected=[{', '.join(ej)}] total_ejections={self.ejections}>"
