"""Per-destination (cluster) state for L7, and endpoint choice per request:
healthy and not ejected, locality tier if asked, then the cluster's policy
(default P2C over peak-EWMA of request latency × outstanding requests)."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence

from nodeagent.meshview.l7snapshot import DEFAULT_POLICY, ClusterPolicy
from nodeagent.meshview.snapshot import Endpoint

from ..errors import NoHealthyEndpoint
from ..loadbalance import Balancer, LeastRequest, Maglev, RingHash, RoundRobin, locality_tier
from .breaker import Breaker
from .outlier import OutlierDetector
from .retry import Outcome, RetryBudgetTracker


class Destination:
    """Everything a worker keeps per cluster; rebuilt when the policy changes."""

    def __init__(self, cluster: str, policy: ClusterPolicy | None, *,
                 clock: Callable[[], float] = time.monotonic, rng: random.Random | None = None) -> None:
        self.cluster = cluster
        self.policy = policy or DEFAULT_POLICY
        self._rng = rng or random.Random()
        self.breaker = Breaker(self.policy.circuit_breaker)
        self.outlier = OutlierDetector(self.policy.outlier, clock) if self.policy.outlier else None
        self.budget = RetryBudgetTracker(self.policy.retry_budget, clock)
        # Request latency, not connect latency: a slow replica shows up here.
        self.ewma = Balancer(clock=clock, rng=self._rng)
        self._rr = RoundRobin()
        self._lr = LeastRequest(self.ewma.outstanding, self._rng)
        self._ring = RingHash()
        self._maglev = Maglev()

    def candidates(self, endpoints: Sequence[Endpoint], node: str, zone: str,
                   avoid: set[tuple[str, int]] = frozenset()) -> list[Endpoint]:  # type: ignore[assignment]
        healthy = [e for e in endpoints if e.healthy]
        if self.outlier is not None:
            kept = [e for e in healthy if not self.outlier.is_ejected((e.ip, e.port))]
            healthy = kept or healthy  # all ejected: panic, use them all rather than fail everything
        if avoid:
            fresh = [e for e in healthy if (e.ip, e.port) not in avoid]
            healthy = fresh or healthy  # a retry prefers an endpoint not tried yet
        if self.policy.load_balancer.locality:
            healthy = locality_tier(healthy, node, zone)
        return healthy

    def pick(self, candidates: Sequence[Endpoint], hash_key: str | None) -> Endpoint:
        if not candidates:
            raise NoHealthyEndpoint(f"cluster {self.cluster} has no healthy endpoint")
        p = self.policy.load_balancer.policy
        if p in ("RingHash", "Maglev") and hash_key is not None:
            return (self._ring if p == "RingHash" else self._maglev).pick(candidates, hash_key)
        if p == "RoundRobin":
            return self._rr.pick(candidates)
        if p == "LeastRequest":
            return self._lr.pick(candidates)
        if p == "Random":
            return self._rng.choice(list(candidates))
        return self.ewma.pick(candidates)

    def record(self, ep: Endpoint, outcome: Outcome, latency_s: float, total: int) -> bool:
        """Feed the balancer and the outlier detector; True if this ejected `ep`."""
        self.ewma.observe(ep, latency_s)
        return self.outlier.record((ep.ip, ep.port), outcome, total) if self.outlier else False

    def __repr__(self) -> str:
        return f"<Destination {self.cluster} {self.policy.load_balancer.policy} {self.breaker!r} {self.outlier!r}>"
