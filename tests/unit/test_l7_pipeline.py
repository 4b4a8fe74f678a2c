"""The one L7 request pipeline (nodeagent/proxy/http/pipeline.py) with a scripted
protocol adapter: the stages in order, each local answer as its LocalReply class,
retries and timeouts. No sockets: the adapter records what the pipeline asks of
the wire (the HTTP/1.1 and HTTP/2 adapters are exercised end to end in
test_http_stack.py and test_h2_stack.py)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from typing import Any

from nodeagent.meshview.l7snapshot import ClusterPolicy, RouteEntry, RouteTable, WeightedCluster
from nodeagent.meshview.snapshot import Endpoint, MeshSettings, Service, ServicePort, Snapshot
from nodeagent.proxy.accesslog import AccessLog
from nodeagent.proxy.http import pipeline
from nodeagent.proxy.http.pipeline import Call, L7Runtime, LocalReply, Request, TryResult
from nodeagent.proxy.http.retry import Outcome
from nodeagent.proxy.http.timeout import Deadline
from nodeagent.proxy.plan import OutboundPlan
from nodeagent.proxy.relay import Session
from nodemesh.routespec import CircuitBreaker, Redirect, Retry, RouteMatch

VIP = ("10.96.0.10", 80)
CL = "outbound|80||web.default.svc.mesh"
EPS = (Endpoint("10.0.1.1", 8080, "default/web-1", "spiffe://td/ns/default/sa/web", "n2", "192.168.0.2"),
       Endpoint("10.0.1.2", 8080, "default/web-2", "spiffe://td/ns/default/sa/web", "n2", "192.168.0.2"))
PLAN = OutboundPlan("service", VIP[0], VIP[1], service="default/web")


class _Settings:
    node_name = "n1"


class _Proxy:
    settings = _Settings()
    telemetry = None


class ScriptedCall(Call):
    """An adapter whose tries answer from a script: a status, "reset", "refused"
    (connect failure), "refused-stream" (GOAWAY / REFUSED_STREAM) or "hang"
    (never answers)."""

    def __init__(self, rt: L7Runtime, script: list[Any]) -> None:
        super().__init__(rt, Session(AccessLog("off"), "outbound", src="10.0.0.9:4000"), PLAN, "spiffe://td/c")
        self.script = script
        self.replies: list[LocalReply] = []
        self.tries: list[tuple[str, str, dict[str, str]]] = []
        self.relayed: list[int] = []
        self.dropped = 0
        self.mirrored: list[tuple[str, str]] = []

    def reply(self, r: LocalReply) -> None:
        self.status = r.status
        self.replies.append(r)

    def upstream_headers(self, req: Request, deadline: Deadline) -> list[tuple[str, str]]:
        return list(req.headers)

    async def try_once(self, snapshot: Snapshot, ep: Endpoint, req: Request, headers: list[tuple[str, str]],
                       release: Callable[[], None]) -> TryResult:
        self.tries.append((ep.ip, req.target, dict(headers)))
        step = self.script.pop(0)
        release()
        if step == "hang":
            await asyncio.sleep(60)
        if step == "reset":
            return TryResult(Outcome(reset=True), None, "reset by peer")
        if step == "refused-stream":  # above a GOAWAY's last stream ID: never processed
            return TryResult(Outcome(reset=True, refused=True), None, "endpoint sent GOAWAY")
        if step == "refused":
            from nodeagent.proxy.errors import ConnectRefused
            raise ConnectRefused("refused")
        return TryResult(Outcome(status=step), step)

    def drop_try(self, response: Any) -> None:
        self.dropped += 1

    async def relay(self, response: Any, entry: RouteEntry, deadline: Deadline) -> None:
        self.status = response
        self.relayed.append(response)

    def mirror(self, snapshot: Snapshot, cluster: str, req: Request) -> None:
        self.mirrored.append((cluster, req.authority))


def _snapshot(*entries: RouteEntry, policy: ClusterPolicy | None = None) -> Snapshot:
    sp = ServicePort(VIP[1], 8080, "http", "http", CL, EPS, routes=RouteTable(CL, entries) if entries else None,
                     policy=policy)
    return Snapshot("1", "n1", MeshSettings(trust_domain="td"), (Service("web", "default", VIP[0], (sp,)),), (), ())


def _entry(**kw: Any) -> RouteEntry:
    kw.setdefault("clusters", (WeightedCluster(CL),))
    return RouteEntry(kw.pop("name", "r"), kw.pop("match", RouteMatch()), **kw)


def run(snapshot: Snapshot, script: list[Any], path: str = "/a", headers: tuple[tuple[str, str], ...] = ()
        ) -> ScriptedCall:
    rt = L7Runtime(_Proxy(), rng=random.Random(1))  # type: ignore[arg-type]
    call = ScriptedCall(rt, script)
    req = Request("GET", path, "", (("host", "web"), *headers))
    asyncio.run(call.serve(snapshot, req))
    return call


def test_a_response_is_relayed_and_the_session_names_route_cluster_and_endpoint() -> None:
    call = run(_snapshot(_entry(name="all")), [200])
    assert call.relayed == [200] and call.replies == [] and call.attempts == 1
    f = call.session.fields
    assert f["route"] == "all" and f["cluster"] == CL and f["endpoint"] in ("10.0.1.1:8080", "10.0.1.2:8080")
    assert "reason" not in f


def test_no_matching_route_is_a_no_route_reply() -> None:
    call = run(_snapshot(_entry(match=RouteMatch("PathPrefix", "/api"))), [200], path="/other")
    [r] = call.replies
    assert isinstance(r, pipeline.NoRoute) and r.status == 404 and call.session.fields["reason"] == "no_route"
    assert call.tries == []


def test_redirect_is_answered_locally_and_is_not_a_failure() -> None:
    call = run(_snapshot(_entry(redirect=Redirect(hostname="new.example", status_code=301))), [])
    [r] = call.replies
    assert isinstance(r, pipeline.Redirected) and r.status == 301
    assert dict(r.extra)["location"].startswith("http://new.example") and "reason" not in call.session.fields


def test_host_rewrite_reaches_the_try_and_the_mirror() -> None:
    from nodeagent.meshview.l7snapshot import MirrorTo

    call = run(_snapshot(_entry(host_rewrite="web.internal", mirrors=(MirrorTo(CL, 100.0),))), [200])
    assert call.tries[0][2]["host"] == "web.internal" and call.mirrored == [(CL, "web.internal")]
    assert call.rt.mirror_stats.started == 1 and call.session.fields["mirror"] == CL


def test_retry_moves_to_another_endpoint_and_relays_the_second_answer() -> None:
    retry = Retry(attempts=3, backoff_s=0.001, max_backoff_s=0.002, retry_on=("5xx",))
    call = run(_snapshot(_entry(retry=retry)), [503, 200])
    assert call.relayed == [200] and call.attempts == 2 and call.dropped == 1
    assert {t[0] for t in call.tries} == {"10.0.1.1", "10.0.1.2"}  # the failed endpoint is not tried again


def test_without_a_retry_policy_a_reset_is_a_502_upstream_reset() -> None:
    call = run(_snapshot(), ["reset"])
    [r] = call.replies
    assert isinstance(r, pipeline.UpstreamResetBeforeResponse) and r.status == 502 and r.grpc_code == 14
    assert "reset by peer" in r.message


def test_connect_failure_is_a_503_naming_the_reason() -> None:
    call = run(_snapshot(), ["refused"])
    [r] = call.replies
    assert isinstance(r, pipeline.UpstreamConnectFailed) and r.status == 503
    assert call.session.fields["try_error"] == "connect_refused"


def test_per_try_timeout_is_upstream_timeout_and_route_timeout_is_deadline_exceeded() -> None:
    call = run(_snapshot(_entry(per_try_timeout_s=0.05)), ["hang"])
    [r] = call.replies
    assert isinstance(r, pipeline.UpstreamTimedOut) and r.status == 504 and call.dropped == 1
    call = run(_snapshot(_entry(timeout_s=0.05)), ["hang"])
    [r] = call.replies
    assert isinstance(r, pipeline.DeadlineExceeded) and r.grpc_code == 4


def test_callers_budget_already_spent_is_answered_before_any_try() -> None:
    call = run(_snapshot(), [200], headers=(("x-nodemesh-deadline-ms", "0"),))
    [r] = call.replies
    assert isinstance(r, pipeline.DeadlineExceeded) and call.tries == []


def test_breaker_overflow_is_a_503_with_the_overloaded_header() -> None:
    policy = ClusterPolicy(circuit_breaker=CircuitBreaker(max_requests=0))
    call = run(_snapshot(policy=policy), [200])
    [r] = call.replies
    assert isinstance(r, pipeline.Overflow) and r.status == 503 and dict(r.extra) == {"x-nodemesh-overloaded": "true"}
    assert call.session.fields["cluster"] == CL and call.tries == []


def test_a_refused_stream_is_sent_again_once_without_a_retry_policy() -> None:
    call = run(_snapshot(), ["refused-stream", 200])
    assert call.relayed == [200] and call.attempts == 2 and call.session.fields["refused_stream_resent"] is True
    call = run(_snapshot(), ["refused-stream", "refused-stream"])
    [r] = call.replies
    assert isinstance(r, pipeline.UpstreamResetBeforeResponse) and len(call.tries) == 2
