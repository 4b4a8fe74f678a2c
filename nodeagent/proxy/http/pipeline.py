"""The one outbound L7 request pipeline, protocol-agnostic. Every request on an
HTTP port, whatever it arrived on (HTTP/1.1: h1stack.py, HTTP/2 and gRPC:
h2stack.py), goes through the same stages in this order:

  route -> redirect / direct response -> deadline -> fault (delay, abort)
  -> request header filter, URL and host rewrite -> mirrors -> backend
  (weighted cluster) and breaker admission -> tries (endpoint choice,
  per-try timeout) with budgeted retries -> response

A protocol adapter (a `Call` subclass) supplies only the wire: how a local
reply looks, how headers go upstream, one try on an upstream connection,
relaying the chosen try's response, and mirror copies. Anything the proxy
answers itself is a `LocalReply` (a class per reason, raised by a stage and
rendered once by the adapter). Per-proxy state lives in one `L7Runtime` the
proxy owns (no module globals).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
import weakref
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, cast

from nodeagent.meshview.l7snapshot import RouteEntry, RouteTable, WeightedCluster
from nodeagent.meshview.snapshot import Endpoint, ServicePort, Snapshot
from nodeagent.observe import meshmetrics, tracing
from nodemesh.routespec import RouteMatch

from .. import detect
from ..errors import ProxyError
from ..plan import OutboundPlan, is_same_node
from ..relay import Session
from . import fault as faults
from . import route_select
from .destination import Destination
from .h1pool import UpstreamPool
from .retry import Outcome, admit_retry, retryable
from .timeout import Deadline, incoming_budget

if TYPE_CHECKING:
    from ..accesslog import AccessLog
    from ..outbound import OutboundConnection
    from ..proxy import NodeProxy
    from .h2stack import H2Downstream
    from .h2upstream import H2UpstreamPool

log = logging.getLogger(__name__)

Headers = list[tuple[str, str]]  # lower-case names, in order, repeats allowed

MAX_BUFFERED_BODY = 1 << 20  # request bodies are kept this far for retries (HTTP/1.1: bigger is a 413)
FAILURE_PENALTY_S = 1.0  # what a failed try counts as in the endpoint's latency average
_DEFAULT_MATCH = RouteMatch()
_UPSTREAM_FIELDS = ("endpoint", "dst_workload", "dst_identity", "via", "upstream_node")


# ---------------------------------------------------------------- local replies
class LocalReply(Exception):
    """A request the proxy answers itself. `reason` is the stable code (access log,
    `x-nodemesh-reason`, metrics); the message says what to check."""

    reason: ClassVar[str] = "local_reply"
    status: int = 500
    grpc_code: int | None = None  # gRPC status when the caller speaks gRPC (None: mapped from status)
    failure: ClassVar[bool] = True  # counted as a failed request in the access log
    cluster = ""  # the backend it concerns, when one was chosen

    def __init__(self, message: str, *, status: int | None = None, grpc_code: int | None = None,
                 extra: tuple[tuple[str, str], ...] = ()) -> None:
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
        if grpc_code is not None:
            self.grpc_code = grpc_code
        self.extra = extra

    @property
    def text(self) -> str:
        """The body line: `reason: message`."""
        return f"{self.reason}: {self.message}"


class NoRoute(LocalReply):
    reason = "no_route"
    status = 404


class Redirected(LocalReply):
    reason = "redirect"
    failure = False


class NoBackend(LocalReply):
    reason = "no_backend"


class BackendNotFound(LocalReply):
    reason = "backend_not_found"


class Overflow(LocalReply):
    reason = "overflow"
    status = 503


class FaultInjected(LocalReply):
    reason = "fault_injected"


class DeadlineExceeded(LocalReply):
    reason = "deadline_exceeded"
    status = 504
    grpc_code = 4  # DEADLINE_EXCEEDED


class NoHealthyEndpointLeft(LocalReply):
    reason = "no_healthy_endpoint"
    status = 503


class UpstreamTimedOut(LocalReply):
    reason = "upstream_timeout"
    status = 504


class UpstreamConnectFailed(LocalReply):
    reason = "upstream_connect_failed"
    status = 503
    grpc_code = 14  # UNAVAILABLE


class UpstreamResetBeforeResponse(LocalReply):
    reason = "upstream_reset"
    status = 502
    grpc_code = 14


class BadRequest(LocalReply):
    status = 400

    def __init__(self, reason: str, message: str, status: int = 400) -> None:
        super().__init__(message, status=status)
        self.reason = reason  # type: ignore[misc]  # the edge's own reason codes (h1.py, pathnorm.py)


class RequestTooLarge(LocalReply):
    reason = "request_too_large"
    status = 413


class StreamIdleTimeout(LocalReply):
    reason = "stream_idle_timeout"
    status = 408


class InternalError(LocalReply):
    reason = "internal_error"


# ---------------------------------------------------------------- the client's connection
class Downstream(asyncio.Protocol):
    """The client's connection once a protocol adapter took it over from the L4
    relay (h1stack.H1Downstream, h2stack.H2Downstream): what both keep of it."""

    def __init__(self, rt: L7Runtime, end: OutboundConnection, snapshot: Snapshot, source_key: str,
                 source_id: str, plan: OutboundPlan, tcp_fallback: Callable[[], None]) -> None:
        self.rt = rt
        self.end = end
        self.transport = cast(asyncio.Transport, end.transport)  # set: the relay end is connected
        self.conn_session = end.session
        self.source_key = source_key
        self.source_id = source_id
        self.plan = plan
        self.tcp_fallback = tcp_fallback  # hands the connection back to the L4 relay
        self.snapshot = snapshot  # at accept; each request runs on the config current when it starts
        self.limits = snapshot.security.mesh.http  # read once per connection


# ---------------------------------------------------------------- per-proxy state
@dataclass
class Counters:
    requests: int = 0
    retries: int = 0
    detect_timeouts: int = 0
    detected_tcp: int = 0


@dataclass
class MirrorStats:
    """Mirror counters per runtime (per proxy worker); visible for tests and debugging."""

    started: int = 0  # copies decided on (the percentage said yes)
    sent: int = 0  # copies that reached a mirror endpoint's stream
    completed: int = 0  # the mirror endpoint answered (whatever the status)
    failed: int = 0  # connect failure, reset or timeout
    skipped_body: int = 0  # request body over the buffer bound
    skipped_incomplete: int = 0  # the original ended before its request body did
    skipped_no_endpoint: int = 0  # unknown mirror cluster or no healthy endpoint


class L7Runtime:
    """Per proxy (per worker), owned by NodeProxy (`proxy.l7`): destinations by
    cluster, the upstream connection pools of both protocols, counters, clock and RNG."""

    def __init__(self, proxy: NodeProxy, clock: Callable[[], float] = time.monotonic,
                 rng: random.Random | None = None, detect_timeout_s: float = detect.DEFAULT_TIMEOUT_S) -> None:
        from .h2upstream import H2UpstreamPool

        self.proxy = proxy
        self.clock = clock
        self.rng = rng or random.Random()
        self.detect_timeout_s = detect_timeout_s
        self.counters = Counters()
        self.mirror_stats = MirrorStats()
        self.dests: dict[str, Destination] = {}
        self._index_for: Snapshot | None = None
        self._by_cluster: dict[str, ServicePort] = {}
        self.upstreams = UpstreamPool(clock=clock)  # HTTP/1.1 keep-alive upstream conns (h1pool.py)
        self.h2_upstreams: H2UpstreamPool = H2UpstreamPool(self)  # multiplexed h2c upstream conns
        self.h2_clients: weakref.WeakSet[H2Downstream] = weakref.WeakSet()  # the clients' h2c connections

    def drain_h2_clients(self) -> int:
        """A restart: every client h2c connection gets its GOAWAY (H2Downstream.drain);
        returns how many. (HTTP/1.1 clients get `Connection: close` per response.)"""
        n = 0
        for ds in list(self.h2_clients):
            if not ds.closed:
                ds.drain()
                n += 1
        return n

    def port_of_cluster(self, snapshot: Snapshot, cluster: str) -> ServicePort | None:
        if self._index_for is not snapshot:
            self._by_cluster = {sub.cluster: sub for s in snapshot.services for sp in s.ports
                                for sub in (sp, *sp.subsets) if sub.cluster}
            self._index_for = snapshot
        return self._by_cluster.get(cluster)

    def admit_backend(self, snapshot: Snapshot, entry: RouteEntry) -> tuple[str, ServicePort, Destination]:
        """The weighted backend for a request and one "requests" slot of its breaker
        (the caller releases it); raises the LocalReply that says why not."""
        cluster = route_select.choose_cluster(entry, self.rng)
        bsp = self.port_of_cluster(snapshot, cluster)
        refusal: LocalReply | None = None
        if bsp is None:
            refusal = BackendNotFound(f"cluster {cluster} is not known (does the backendRef name an existing "
                                      "Service and port?)")
        else:
            dest = self.destination(bsp)
            over = dest.breaker.try_acquire("requests")
            if not over:
                return cluster, bsp, dest
            meshmetrics.breaker_overflow(cluster, over)
            refusal = Overflow(f"circuit breaker {over} reached for {cluster}",
                               extra=(("x-nodemesh-overloaded", "true"),))
        refusal.cluster = cluster
        raise refusal

    def destination(self, sp: ServicePort) -> Destination:
        d = self.dests.get(sp.cluster)
        if d is None or d.policy != (sp.policy or d.policy):
            d = self.dests[sp.cluster] = Destination(sp.cluster, sp.policy, clock=self.clock, rng=self.rng)
        return d

    def close(self) -> None:
        self.upstreams.close_all()
        self.h2_upstreams.close()


# ---------------------------------------------------------------- the request
@dataclass(frozen=True)
class Request:
    """A request as the pipeline sees it, whatever its protocol: the path already
    normalized (pathnorm.py), `headers` regular ones with `host` (HTTP/2: the
    :authority) among them."""

    method: str
    path: str
    query: str  # with its '?', or ""
    headers: tuple[tuple[str, str], ...]

    @property
    def target(self) -> str:
        return self.path + self.query

    @property
    def authority(self) -> str:
        return route_select.host_of(self.headers)

    def with_headers(self, headers: Headers) -> Request:
        return Request(self.method, self.path, self.query, tuple(headers))  # (dataclasses.replace costs 4x)


@dataclass
class TryResult:
    """How one try went: its outcome, the adapter's handle on a response that
    arrived (None if none did), and an error text for the log."""

    outcome: Outcome
    response: Any = None
    error: str = ""


class Call(ABC):
    """One request through the pipeline. A protocol adapter subclasses it for the wire."""

    grpc: bool = False

    def __init__(self, rt: L7Runtime, session: Session, plan: OutboundPlan, source_id: str) -> None:
        self.rt = rt
        self.session = session
        self.plan = plan
        self.source_id = source_id
        self.status = 0
        self.attempts = 0

    # -- what an adapter supplies --
    @abstractmethod
    def reply(self, r: LocalReply) -> None:
        """Answer the client locally (the adapter renders `r` for its protocol)."""

    @abstractmethod
    def upstream_headers(self, req: Request, deadline: Deadline) -> Headers:
        """The headers one try sends (deadline passed on, connection headers dropped)."""

    @abstractmethod
    async def try_once(self, snapshot: Snapshot, ep: Endpoint, req: Request, headers: Headers,
                       release: Callable[[], None]) -> TryResult:
        """Send the request to `ep` and wait for what decides the try. `release` frees
        the try's breaker "connections" slot (idempotent; called by the pipeline
        otherwise once the try is over). Raises ProxyError on a connect failure."""

    @abstractmethod
    def drop_try(self, response: Any) -> None:
        """Give up on a try (about to be retried; None: the one in flight, which
        timed out or failed to connect)."""

    @abstractmethod
    async def relay(self, response: Any, entry: RouteEntry, deadline: Deadline) -> None:
        """Send the chosen try's response to the client (response header filter applied)."""

    @abstractmethod
    def mirror(self, snapshot: Snapshot, cluster: str, req: Request) -> None:
        """Send a fire-and-forget copy of the request to one endpoint of `cluster`."""

    def upstream_fields(self) -> dict[str, Any]:
        """Where the request went, for the client connection's own log line."""
        f = self.session.fields
        return {k: f[k] for k in _UPSTREAM_FIELDS if k in f}

    def gone(self) -> bool:
        """The client went away: stop."""
        return False

    def can_retry(self, response: Any) -> bool:
        """Whether the request can still be sent again (its bytes are all held and
        nothing of a response reached the client)."""
        return True

    # -- the pipeline --
    async def serve(self, snapshot: Snapshot, req: Request) -> None:
        """Run the pipeline; every local answer is a LocalReply rendered by the adapter."""
        try:
            await self._run(snapshot, req)
        except LocalReply as r:
            self.answer(r)

    def answer(self, r: LocalReply) -> None:
        if r.failure:
            self.session.fail(r.reason, r.message)
        self.reply(r)

    async def _run(self, snapshot: Snapshot, req: Request) -> None:
        rt, plan = self.rt, self.plan
        hit = snapshot.by_vip.get((plan.dst_ip, plan.dst_port))
        if hit is None:
            raise NoRoute(f"{plan.service} is no longer in the mesh config", status=503)
        sp = hit[1]
        tel = getattr(rt.proxy, "telemetry", None)
        if tel is not None:
            # Continue the caller's W3C / B3 trace: this hop's span is its child, and the
            # request goes on with this span as the parent (tracestate kept).
            hs = list(req.headers)
            req = req.with_headers(tracing.replace_trace_headers(hs, tel.request_headers(self.session, hs)))
        # route
        table = sp.routes or _default_table(sp.cluster)
        view = route_select.RequestView(req.method, req.target, req.headers)
        entry = route_select.select_route(table, view)
        if entry is None:
            raise NoRoute(f"no route of {plan.service} matches {req.method} {view.path} "
                          "(check the HTTPRoute / GRPCRoute matches)")
        self.session.set(route=entry.name)
        # redirect / direct response
        if entry.redirect is not None:
            loc = route_select.redirect_location(entry.redirect, entry.match, view, req.authority)
            raise Redirected(loc, status=entry.redirect.status_code, extra=(("location", loc),))
        if entry.direct_status:
            raise NoBackend(f"route {entry.name} has no usable backendRefs", status=entry.direct_status)
        # deadline
        deadline = Deadline.start(entry.timeout_s or None, incoming_budget(req.headers), clock=rt.clock)
        if deadline.expired():
            raise DeadlineExceeded(self._deadline_text)
        # fault
        fd = faults.decide(entry.fault, rt.rng)
        if fd.delay_s:
            await asyncio.sleep(deadline.bound(fd.delay_s) or fd.delay_s)
            if deadline.expired():
                raise DeadlineExceeded(self._deadline_text)
        if fd.abort_status or fd.abort_grpc_status >= 0:
            self.session.set(fault="abort")
            raise FaultInjected("aborted by the route's Fault filter", status=fd.abort_status or 200,
                                grpc_code=fd.abort_grpc_status if fd.abort_grpc_status >= 0 else None)
        # request header filter, URL and host rewrite
        headers = route_select.modify_headers(list(req.headers), entry.request_headers)
        if entry.host_rewrite:
            headers = [(k, v) for k, v in headers if k != "host"] + [("host", entry.host_rewrite)]
        req = Request(req.method, route_select.rewrite_path(entry, req.path), req.query, tuple(headers))
        # mirrors (fire and forget)
        if entry.mirrors:
            chosen = [m.cluster for m in entry.mirrors if m.percent >= 100.0 or rt.rng.random() * 100 < m.percent]
            if chosen:
                rt.mirror_stats.started += len(chosen)
                self.session.set(mirror=",".join(chosen))
                for cluster in chosen:
                    self.mirror(snapshot, cluster, req)
        # backend and breaker admission
        try:
            cluster, bsp, dest = rt.admit_backend(snapshot, entry)
        except LocalReply as e:
            self.session.set(cluster=e.cluster)
            raise
        self.session.set(cluster=cluster)
        try:
            await self._tries(snapshot, entry, dest, bsp, req, deadline)
        finally:
            dest.breaker.release("requests")

    _deadline_text = ("the request's deadline passed (route timeout or the caller's grpc-timeout / "
                      "x-nodemesh-deadline-ms)")

    async def _tries(self, snapshot: Snapshot, entry: RouteEntry, dest: Destination, sp: ServicePort,
                     req: Request, deadline: Deadline) -> None:
        rt = self.rt
        node = rt.proxy.settings.node_name
        dest.budget.record_request()
        policy = entry.retry
        max_attempts = policy.attempts if policy else 1
        tried: set[tuple[str, int]] = set()
        hash_key = _hash_key(dest, req.headers, str(self.session.fields.get("src", "")))
        last_err = ""
        resent_refused = False
        while True:
            if self.gone():
                return
            self.attempts += 1
            cands = dest.candidates(sp.endpoints, node, "", tried)
            if not cands:
                raise NoHealthyEndpointLeft(f"cluster {sp.cluster} has no healthy endpoint (are its workloads "
                                            "registered and passing health checks?)")
            ep = dest.pick(cands, hash_key)
            tried.add((ep.ip, ep.port))
            self.session.set(endpoint=f"{ep.ip}:{ep.port}", dst_workload=ep.workload, dst_identity=ep.identity)
            per_try = deadline.bound(entry.per_try_timeout_s)
            # Whether a timeout of this try is the whole call's deadline (504 deadline_exceeded).
            by_deadline = per_try is not None and (not entry.per_try_timeout_s or per_try < entry.per_try_timeout_s)
            t0 = rt.clock()
            dest.ewma.start(ep)
            got = await self._try(snapshot, ep, req, self.upstream_headers(req, deadline), per_try, dest)
            dest.ewma.finish(ep)
            elapsed = rt.clock() - t0
            outcome = got.outcome
            if outcome.refused and not resent_refused and not self.gone() and self.can_retry(None):
                # The endpoint never processed it (a GOAWAY above it, REFUSED_STREAM): sent again
                # once, on a new connection, whatever the retry policy (RFC 9113 8.7).
                resent_refused = True
                tried.discard((ep.ip, ep.port))
                self.session.set(refused_stream_resent=True)
                continue
            why = meshmetrics.outcome_reason(outcome.status, outcome.grpc_status,
                                             connect_failure=outcome.connect_failure, reset=outcome.reset,
                                             timeout=outcome.timeout)
            if dest.record(ep, outcome, elapsed if not outcome.gateway_error or outcome.status else
                           max(elapsed, FAILURE_PENALTY_S), len(sp.endpoints)):
                meshmetrics.outlier_ejected(sp.cluster, why)
            last_err = got.error or last_err
            if self.gone():  # the client went away meanwhile
                if got.response is not None:
                    self.drop_try(got.response)
                return
            if (policy is not None and self.attempts < max_attempts and self.can_retry(got.response)
                    and retryable(policy, outcome)):
                wait, stopped = admit_retry(policy, self.attempts, deadline, dest.budget, dest.breaker, rt.rng)
                if stopped:
                    self.session.set(retry_stopped=stopped)
                    if stopped == "max_retries":
                        meshmetrics.breaker_overflow(sp.cluster, "max_retries")
                else:
                    if got.response is not None:
                        self.drop_try(got.response)
                    rt.counters.retries += 1
                    meshmetrics.retry(sp.cluster, why)
                    try:
                        await asyncio.sleep(wait)
                    finally:
                        dest.breaker.release("retries")
                    continue
            if "retry_stopped" in self.session.fields:
                meshmetrics.retry_stopped(sp.cluster, self.session.fields["retry_stopped"])
            if got.response is not None:
                return await self.relay(got.response, entry, deadline)
            if outcome.timeout:
                if by_deadline or deadline.expired():
                    raise DeadlineExceeded(self._deadline_text)
                raise UpstreamTimedOut(f"no response from {ep.ip}:{ep.port} within the per-try timeout "
                                       "(timeouts.backendRequest)")
            if outcome.connect_failure:
                raise UpstreamConnectFailed(last_err)
            raise UpstreamResetBeforeResponse(last_err)

    async def _try(self, snapshot: Snapshot, ep: Endpoint, req: Request, headers: Headers,
                   timeout_s: float | None, dest: Destination) -> TryResult:
        """One try under the breaker's "connections" cap and the per-try timeout."""
        over = dest.breaker.try_acquire("connections")
        if over:
            meshmetrics.breaker_overflow(dest.cluster, over)
            return TryResult(Outcome(connect_failure=True), None, f"circuit breaker {over}")
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                dest.breaker.release("connections")

        self.session.set(via="same-node" if is_same_node(ep, self.rt.proxy.settings.node_name) else "hbone")
        try:
            attempt = self.try_once(snapshot, ep, req, headers, release)
            return await (asyncio.wait_for(attempt, timeout_s) if timeout_s else attempt)
        except TimeoutError:
            self.drop_try(None)
            release()
            return TryResult(Outcome(timeout=True), None, "timeout")
        except ProxyError as e:
            self.drop_try(None)
            release()
            self.session.set(try_error=e.reason)
            return TryResult(Outcome(connect_failure=True), None, str(e))
        except asyncio.CancelledError:  # the request was ended (stream idle timeout, client gone)
            self.drop_try(None)
            release()
            raise


@functools.lru_cache(maxsize=4096)
def _default_table(cluster: str) -> RouteTable:
    """A port with no HTTPRoute: every request to its own cluster (built once per cluster, not per request)."""
    return RouteTable(cluster, (RouteEntry("default", _DEFAULT_MATCH, (WeightedCluster(cluster),)),))


def shadow_authority(authority: str) -> str:
    """A mirror copy's Host / :authority, Envoy's rule: `host[:port]` becomes `host-shadow[:port]`."""
    host, sep, port = authority.rpartition(":")
    if sep and port.isdigit() and "]" not in port:
        return f"{host}-shadow:{port}"
    return authority + "-shadow"


def _hash_key(dest: Destination, headers: Sequence[tuple[str, str]], src: str) -> str | None:
    """The consistent-hash key of a request under the destination's policy (None: not hashing)."""
    lb = dest.policy.load_balancer
    if lb.hash_header:
        return next((v for k, v in headers if k == lb.hash_header), "")
    if lb.hash_cookie:
        for k, v in headers:
            if k == "cookie":
                for part in v.split(";"):
                    name, _, val = part.strip().partition("=")
                    if name == lb.hash_cookie:
                        return val
        return ""
    if lb.hash_source_ip:
        return src.rpartition(":")[0]
    return None


class QuietSession(Session):
    """Bookkeeping for an upstream stream the L7 pipeline opens: the request's own
    line is the log. Its HBONE CONNECT carries the trace context and baggage (the
    caller's workload and service) of the request that opened it, as an L4 tunnel
    does: the destination node names the source by them."""

    def __init__(self, access_log: AccessLog, caller: Session) -> None:
        super().__init__(access_log, "outbound")
        self._caller = caller

    def connect_headers(self) -> tuple[tuple[str, str], ...]:
        return self._caller.connect_headers()

    def finish(self) -> None:
        if self._done:
            return
        self._done = True
        for cb in self.on_finish:
            cb()
