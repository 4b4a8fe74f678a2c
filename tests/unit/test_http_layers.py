"""The pure L7 layers with a fake clock: deadlines, retry policy and budget,
breaker, outlier detection, detection, router details, LB policies."""

from __future__ import annotations

import random
from dataclasses import dataclass

from nodeagent.meshview.l7snapshot import PathRewrite, RouteEntry
from nodeagent.proxy import detect
from nodeagent.proxy.http import route_select
from nodeagent.proxy.http.breaker import Breaker
from nodeagent.proxy.http.outlier import OutlierDetector
from nodeagent.proxy.http.retry import Outcome, RetryBudgetTracker, backoff, retryable
from nodeagent.proxy.http.timeout import Deadline, format_grpc_timeout, incoming_budget, parse_grpc_timeout
from nodeagent.proxy.loadbalance import Maglev, RingHash, RoundRobin, locality_tier
from nodemesh.routespec import CircuitBreaker, OutlierDetection, Redirect, Retry, RetryBudget, RouteMatch


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


@dataclass(frozen=True)
class Ep:
    ip: str
    port: int
    node: str = ""
    zone: str = ""


def test_deadline_and_grpc_timeout() -> None:
    c = Clock()
    assert parse_grpc_timeout("100m") == 0.1 and parse_grpc_timeout("2S") == 2 and parse_grpc_timeout("x") is None
    assert format_grpc_timeout(0.25) == "250m"
    assert incoming_budget({"grpc-timeout": "1S", "x-nodemesh-deadline-ms": "300"}) == 0.3
    d = Deadline.start(2.0, 0.5, clock=c)
    assert d.remaining() == 0.5 and d.bound(1.0) == 0.5 and d.bound(0.1) == 0.1
    c.t += 0.6
    assert d.expired()
    assert Deadline.start(None, clock=c).bound(0) is None
    assert Deadline.start(0.0, clock=c).expired()  # a caller's zero budget is already spent


def test_retry_policy_and_backoff() -> None:
    p = Retry(3, 0.01, 0.04, ("gateway-error", "retriable-status-codes"), (429,), ("unavailable",))
    assert retryable(p, Outcome(status=503)) and retryable(p, Outcome(connect_failure=True))
    assert retryable(p, Outcome(status=429)) and not retryable(p, Outcome(status=500))
    assert retryable(p, Outcome(status=200, grpc_status=14)) and not retryable(p, Outcome(status=200, grpc_status=2))
    rng = random.Random(0)
    assert all(0 <= backoff(p, n, rng) <= min(0.04, 0.01 * 2 ** (n - 1)) for n in range(1, 6) for _ in range(50))


def test_retry_budget_caps_retries_to_ratio() -> None:
    c = Clock()
    b = RetryBudgetTracker(RetryBudget(ratio=0.2, min_per_second=0.0, window_s=10.0), c)
    for _ in range(100):
        b.record_request()
    allowed = sum(b.try_withdraw() for _ in range(100))
    assert allowed == 20 and b.refused == 80
    c.t += 11  # the window slides: old requests no longer earn retries
    assert not b.try_withdraw()
    b2 = RetryBudgetTracker(RetryBudget(ratio=0.0, min_per_second=1.0, window_s=10.0), c)
    assert sum(b2.try_withdraw() for _ in range(50)) == 10  # the floor: 1/s over the window
    assert "refused=40" in repr(b2)


def test_retry_budget_memory_is_bounded_without_retries() -> None:
    """The soak's leak (bench/soak.py): with no retry ever asked, every request's
    timestamp stayed in the budget's window deque (~42 bytes per request)."""
    c = Clock()
    b = RetryBudgetTracker(RetryBudget(ratio=0.2, min_per_second=0.0, window_s=10.0), c)
    for _ in range(100_000):  # 1,000 req/s for 100 s
        c.t += 0.001
        b.record_request()
    assert len(b._requests) <= 10_001  # one window's worth, not 100,000
    assert sum(b.try_withdraw() for _ in range(3000)) == 2000  # the ratio still counts the window's requests


def _is_open(br: Breaker) -> bool:
    """Read through a call: mypy keeps `br.open` narrowed across the calls that change it."""
    return br.open


def test_breaker_limits_and_reasons() -> None:
    br = Breaker(CircuitBreaker(max_connections=1, max_pending_requests=1, max_requests=2, max_retries=0))
    assert br.try_acquire("requests") is None and br.try_acquire("requests") is None
    assert br.try_acquire("requests") == "max_requests" and _is_open(br)
    assert br.try_acquire("retries") == "max_retries"
    br.release("requests")
    assert not _is_open(br) and br.try_acquire("requests") is None
    assert "requests 2/2" in repr(br) and "overflows=2" in repr(br)


def test_outlier_ejection_grows_and_respects_max_percent() -> None:
    c = Clock()
    od = OutlierDetector(OutlierDetection(2, 2, 10.0, 25.0, 50), c)
    a, b = ("10.0.0.1", 80), ("10.0.0.2", 80)
    assert not od.record(a, Outcome(status=500), 2)
    assert od.record(a, Outcome(status=500), 2) and od.is_ejected(a)
    od.record(b, Outcome(status=502), 2)
    assert not od.record(b, Outcome(status=502), 2)  # would eject 100% > 50%
    c.t += 10.1
    assert not od.is_ejected(a)  # readmitted after the base time
    od.record(a, Outcome(status=500), 2)
    assert od.record(a, Outcome(status=500), 2)
    c.t += 15
    assert od.is_ejected(a)  # second ejection lasts 2 × base
    c.t += 6
    assert not od.is_ejected(a)
    assert not od.record(a, Outcome(status=200), 2)
    assert "total_ejections=2" in repr(od)


def test_detect() -> None:
    assert detect.sniff(b"GET / HTTP/1.1\r\nHost: x\r\n") == detect.HTTP1
    assert detect.sniff(b"GET /x HT") == detect.UNKNOWN
    assert detect.sniff(detect.H2_PREFACE) == detect.HTTP2 and detect.sniff(b"PRI * HT") == detect.UNKNOWN
    assert detect.sniff(b"\x16\x03\x01\x02\x00") == detect.TCP
    assert detect.sniff(b"SSH-2.0-OpenSSH\r\n") == detect.TCP
    assert detect.skip_detection(3306) and not detect.skip_detection(8080)


def test_router_path_rewrite_and_redirect() -> None:
    m = RouteMatch("PathPrefix", "/api")
    assert route_select.path_matches(m, "/api") and route_select.path_matches(m, "/api/v1")
    assert not route_select.path_matches(m, "/apiv1")
    e = RouteEntry("r", m, path_rewrite=PathRewrite(prefix="/v2"))
    assert route_select.rewrite_path(e, "/api/users") == "/v2/users"
    e2 = RouteEntry("r", m, path_rewrite=PathRewrite(None, "^.*$", "/fixed"))
    assert route_select.rewrite_path(e2, "/api/x") == "/fixed"
    v = route_select.RequestView("GET", "/api/x?a=1&a=2", (("host", "web:8080"),))
    assert v.query == (("a", "1"), ("a", "2"))
    loc = route_select.redirect_location(Redirect(scheme="https", path_type="ReplacePrefixMatch", path="/b",
                                            status_code=301), m, v, "web:8080")
    assert loc == "https://web/b/x?a=1&a=2"


def test_lb_policies() -> None:
    eps = [Ep(f"10.0.0.{i}", 80, node=f"n{i % 2}", zone="z1" if i < 3 else "z2") for i in range(5)]
    rr = RoundRobin()
    assert [rr.pick(eps).ip for _ in range(6)] == [e.ip for e in eps] + [eps[0].ip]
    for h in (RingHash(), Maglev(table_size=251)):
        first = [h.pick(eps, f"user{i}") for i in range(200)]
        assert first == [h.pick(eps, f"user{i}") for i in range(200)]  # sticky
        assert len(set(first)) == 5  # spread
        # Removing one endpoint moves only the keys it owned (mostly).
        smaller = eps[:-1]
        moved = sum(1 for i, e in enumerate(first) if e != eps[-1] and h.pick(smaller, f"user{i}") != e)
        assert moved < 60
    assert {e.node for e in locality_tier(eps, "n1", "z1")} == {"n1"}
    assert locality_tier(eps, "nX", "z2") == [e for e in eps if e.zone == "z2"]
    assert locality_tier(eps, "nX", "zX") == eps


def test_admit_retry_gates_in_order_deadline_budget_breaker() -> None:
    import random as _random

    from nodeagent.proxy.http.retry import admit_retry
    from nodemesh.routespec import Retry as _Retry

    class Dl:
        def __init__(self, rem: float | None) -> None:
            self.rem = rem

        def remaining(self) -> float | None:
            return self.rem

    class Budget:
        def __init__(self, ok: bool) -> None:
            self.ok, self.calls = ok, 0

        def try_withdraw(self) -> bool:
            self.calls += 1
            return self.ok

    class Brk:
        def __init__(self, full: bool) -> None:
            self.full, self.held = full, 0

        def try_acquire(self, kind: str) -> str | None:
            if self.full:
                return "max_retries"
            self.held += 1
            return None

    policy = _Retry(attempts=3, backoff_s=0.1, max_backoff_s=0.1)
    rng = _random.Random(1)
    b = Budget(True)
    assert admit_retry(policy, 1, Dl(0.0), b, Brk(False), rng) == (0.0, "deadline") and b.calls == 0
    assert admit_retry(policy, 1, Dl(None), Budget(False), Brk(False), rng) == (0.0, "budget")
    assert admit_retry(policy, 1, Dl(5.0), Budget(True), Brk(True), rng) == (0.0, "max_retries")
    brk = Brk(False)
    wait, why = admit_retry(policy, 1, Dl(5.0), Budget(True), brk, rng)
    assert why == "" and 0.0 <= wait <= 0.1 and brk.held == 1
