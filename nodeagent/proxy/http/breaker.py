"""Circuit breaking per destination (cluster): caps on upstream connections,
pending requests (waiting for a connection), active requests and active
retries. Over a cap the request fails fast with 503 and the reason."""

from __future__ import annotations

from dataclasses import dataclass

from nodemesh.routespec import CircuitBreaker

KINDS = ("connections", "pending", "requests", "retries")


@dataclass
class Breaker:
    limits: CircuitBreaker
    connections: int = 0
    pending: int = 0
    requests: int = 0
    retries: int = 0
    overflows: int = 0

    def _limit(self, kind: str) -> int:
        return {"connections": self.limits.max_connections, "pending": self.limits.max_pending_requests,
                "requests": self.limits.max_requests, "retries": self.limits.max_retries}[kind]

    def try_acquire(self, kind: str) -> str | None:
        """Take one slot; returns None, or the overflow reason (e.g. 'max_requests')."""
        if getattr(self, kind) >= self._limit(kind):
            self.overflows += 1
            return f"max_{kind}"
        setattr(self, kind, getattr(self, kind) + 1)
        return None

    def release(self, kind: str) -> None:
        setattr(self, kind, max(0, getattr(self, kind) - 1))

    @property
    def open(self) -> bool:
        """Whether new requests would be refused right now."""
        return self.requests >= self.limits.max_requests

    def __repr__(self) -> str:
        lim = self.limits
        return (f"<Breaker conns {self.connections}/{lim.max_connections} pending {self.pending}/"
                f"{lim.max_pending_requests} requests {self.requests}/{lim.max_requests} retries "
                f"{self.retries}/{lim.max_retries} overflows={self.overflows}>")
