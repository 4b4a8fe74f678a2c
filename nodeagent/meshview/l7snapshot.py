"""L7 parts of the agent's snapshot: route tables (one per HTTP service port,
from RouteConfiguration) and per-cluster traffic policy (from Cluster). Frozen,
built once by nodeagent.xds.l7convert; the proxy never sees protobufs.

Match, filter and policy leaves reuse the config model's frozen types
(nodemesh.routespec), since they mean the same thing on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from nodemesh.healthcheckspec import HealthCheck
from nodemesh.routespec import (
    CircuitBreaker,
    Fault,
    HeaderModifier,
    LoadBalancer,
    OutlierDetection,
    Redirect,
    Retry,
    RetryBudget,
    RouteMatch,
)


@dataclass(frozen=True)
class WeightedCluster:
    cluster: str
    weight: int = 1


@dataclass(frozen=True)
class MirrorTo:
    cluster: str
    percent: float = 100.0


@dataclass(frozen=True)
class PathRewrite:
    """Either a prefix replacement (of the matched prefix) or a regex substitution."""

    prefix: str | None = None
    regex: str = ""
    substitution: str = ""


@dataclass(frozen=True)
class RouteEntry:
    """One match and what to do with the requests it takes. Ordered by precedence."""

    name: str
    match: RouteMatch
    clusters: tuple[WeightedCluster, ...] = ()
    direct_status: int = 0  # answer locally (e.g. 500 for a rule without backends)
    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None
    redirect: Redirect | None = None
    path_rewrite: PathRewrite | None = None
    host_rewrite: str = ""
    mirrors: tuple[MirrorTo, ...] = ()
    fault: Fault | None = None
    timeout_s: float = 0.0  # whole call, retries included; 0 = none
    per_try_timeout_s: float = 0.0
    retry: Retry | None = None


@dataclass(frozen=True)
class RouteTable:
    name: str  # the RouteConfiguration name: the service port's cluster name
    routes: tuple[RouteEntry, ...] = ()


@dataclass(frozen=True)
class ClusterPolicy:
    load_balancer: LoadBalancer = field(default_factory=LoadBalancer)
    circuit_breaker: CircuitBreaker = field(default_factory=CircuitBreaker)
    outlier: OutlierDetection | None = None
    retry_budget: RetryBudget = field(default_factory=RetryBudget)
    health_check: HealthCheck | None = None  # run by the endpoint's own node (nodeagent/observe/healthprober.py)
    idle_timeout_s: float = 3600.0  # L4 relay: no bytes either way this long closes it (0 = never)


DEFAULT_POLICY = ClusterPolicy()
