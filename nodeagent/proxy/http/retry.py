"""Retry decisions and the retry budget. A retry happens only when the route's
policy covers the outcome, attempts remain, the deadline allows the backoff,
the request body is buffered (or absent) and the budget has room: retries
are capped at `ratio` of recent requests plus a floor of `min_per_second`,
so they never multiply an outage (Linkerd's and Envoy's idea)."""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from nodemesh.routespec import GRPC_CODES, Retry, RetryBudget

GATEWAY_STATUSES = (502, 503, 504)


@dataclass(frozen=True)
class Outcome:
    """How one try ended: a status, or a failure before any response head."""

    status: int = 0  # HTTP status; 0 when no response head arrived
    grpc_status: int | None = None  # from a trailers-only response's grpc-status header
    connect_failure: bool = False
    reset: bool = False
    timeout: bool = False
    refused: bool = False  # reset before the endpoint processed it (HTTP/2 GOAWAY, REFUSED_STREAM)

    @property
    def gateway_error(self) -> bool:
        return self.connect_failure or self.reset or self.timeout or self.status in GATEWAY_STATUSES

    @property
    def server_error(self) -> bool:
        return self.status >= 500 or (self.status == 0 and (self.connect_failure or self.reset or self.timeout))


def retryable(policy: Retry, o: Outcome) -> bool:
    on = policy.retry_on
    if o.connect_failure and "connect-failure" in on:
        return True
    if o.reset and "reset" in on:
        return True
    if (o.status >= 500 or o.reset or o.connect_failure or o.timeout) and "5xx" in on:
        return True
    if o.gateway_error and "gateway-error" in on:
        return True
    if o.status and o.status in policy.codes and "retriable-status-codes" in on:
        return True
    if o.grpc_status is not None:
        for name in policy.grpc_retry_on:
            if GRPC_CODES[name] == o.grpc_status:
                return True
    return False


def backoff(policy: Retry, retry_number: int, rng: random.Random | None = None) -> float:
    """Full jitter over an exponential ceiling: uniform in [0, min(max, base * 2^n)]."""
    ceiling = min(policy.max_backoff_s, policy.backoff_s * (2 ** max(0, retry_number - 1)))
    return (rng or random).uniform(0, ceiling) if ceiling > 0 else 0.0


class _Remaining(Protocol):
    def remaining(self) -> float | None: ...


class _Budget(Protocol):
    def try_withdraw(self) -> bool: ...


class _Breaker(Protocol):
    def try_acquire(self, kind: str) -> str | None: ...


def admit_retry(policy: Retry, retry_number: int, deadline: _Remaining, budget: _Budget,
                breaker: _Breaker, rng: random.Random | None = None) -> tuple[float, str]:
    """Whether another try may start now, for both HTTP stacks: (backoff seconds, "")
    or (0, why not): "deadline" (the backoff would outlive it), "budget" (the retry
    budget is spent), "max_retries" (the breaker's active-retries limit). On success
    the caller holds one "retries" slot of the breaker and must release it."""
    wait = backoff(policy, retry_number, rng)
    rem = deadline.remaining()
    if rem is not None and rem <= wait:
        return 0.0, "deadline"
    if not budget.try_withdraw():
        return 0.0, "budget"
    if breaker.try_acquire("retries"):
        return 0.0, "max_retries"
    return wait, ""


class RetryBudgetTracker:
    """Requests and retries over a sliding window; retries allowed while
    retries < min_per_second * window + ratio * requests."""

    def __init__(self, budget: RetryBudget, clock: Callable[[], float] = time.monotonic) -> None:
        self.budget = budget
        self._clock = clock
        self._requests: deque[float] = deque()
        self._retries: deque[float] = deque()
        self.refused = 0

    def _trim(self, now: float) -> None:
        edge = now - self.budget.window_s
        for q in (self._requests, self._retries):
            while q and q[0] <= edge:
                q.popleft()

    def record_request(self) -> None:
        # Trimmed here too, not only when a retry asks: with no retries the deque
        # grew by one float per request forever (the soak's ~42 bytes/request).
        now = self._clock()
        q = self._requests
        q.append(now)
        edge = now - self.budget.window_s
        while q[0] <= edge:
            q.popleft()

    def try_withdraw(self) -> bool:
        now = self._clock()
        self._trim(now)
        allowed = self.budget.min_per_second * self.budget.window_s + self.budget.ratio * len(self._requests)
        if len(self._retries) + 1 > allowed:
            self.refused += 1
            return False
        self._retries.append(now)
        return True

    def __repr__(self) -> str:
        self._trim(self._clock())
        return (f"<RetryBudget requests={len(self._requests)} retries={len(self._retries)} "
                f"ratio={self.budget.ratio} min/s={self.budget.min_per_second} refused={self.refused}>")
