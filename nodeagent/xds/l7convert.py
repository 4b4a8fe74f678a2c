"""RouteConfiguration and Cluster traffic-policy fields -> nodeagent.meshview.l7snapshot
types. Reads the standard Envoy fields the control plane writes
(controlplane/xds/build_routes.py); anything nodemesh does not implement is
rejected with a reason (the NACK names it) rather than silently ignored."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.type.matcher.v3 import string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import duration_pb2

from nodeagent.meshview.l7snapshot import ClusterPolicy, MirrorTo, PathRewrite, RouteEntry, RouteTable, WeightedCluster
from nodeagent.xds.healthconvert import HealthCheckError, cluster_health_check
from nodemesh import routespec as m

FAULT_FILTER = "envoy.filters.http.fault"
L7_METADATA_KEY = "nodemesh.l7"
_REDIRECT = {rc.RedirectAction.MOVED_PERMANENTLY: 301, rc.RedirectAction.FOUND: 302,
             rc.RedirectAction.SEE_OTHER: 303, rc.RedirectAction.TEMPORARY_REDIRECT: 307,
             rc.RedirectAction.PERMANENT_REDIRECT: 308}
_LB = {cluster_pb2.Cluster.ROUND_ROBIN: "RoundRobin", cluster_pb2.Cluster.LEAST_REQUEST: "LeastRequest",
       cluster_pb2.Cluster.RING_HASH: "RingHash", cluster_pb2.Cluster.MAGLEV: "Maglev",
       cluster_pb2.Cluster.RANDOM: "Random"}


class L7ResourceError(ValueError):
    pass


def _secs(d: duration_pb2.Duration) -> float:
    return float(d.seconds) + float(d.nanos) / 1e9


def _pct(p: percent_pb2.FractionalPercent) -> float:
    denom = {percent_pb2.FractionalPercent.HUNDRED: 100, percent_pb2.FractionalPercent.TEN_THOUSAND: 10000,
             percent_pb2.FractionalPercent.MILLION: 1_000_000}[p.denominator]
    return 100.0 * float(p.numerator) / denom


def _regex(pattern: str, what: str) -> str:
    try:
        re.compile(pattern)
    except re.error as e:
        raise L7ResourceError(f"{what}: bad regex {pattern!r}: {e}") from None
    return pattern


def _string_match(sm: string_pb2.StringMatcher, name: str, what: str) -> m.StringMatch:
    which = sm.WhichOneof("match_pattern")
    if which == "exact":
        return m.StringMatch(name, sm.exact, "Exact")
    if which == "safe_regex":
        return m.StringMatch(name, _regex(sm.safe_regex.regex, what), "RegularExpression")
    raise L7ResourceError(f"{what}: string match {which!r} is not supported (exact, safe_regex)")


def _match(rm: rc.RouteMatch, what: str) -> m.RouteMatch:
    which = rm.WhichOneof("path_specifier")
    if which == "path":
        pt, pv = "Exact", rm.path
    elif which in ("prefix", "path_separated_prefix"):
        pt, pv = "PathPrefix", getattr(rm, which)
    elif which == "safe_regex":
        pt, pv = "RegularExpression", _regex(rm.safe_regex.regex, f"{what} path")
    else:
        raise L7ResourceError(f"{what}: path specifier {which!r} is not supported")
    method = ""
    headers = []
    for i, h in enumerate(rm.headers):
        if h.WhichOneof("header_match_specifier") != "string_match" or h.invert_match:
            raise L7ResourceError(f"{what}.headers[{i}]: only (non-inverted) string_match is supported")
        if h.name == ":method":
            method = h.string_match.exact
            continue
        headers.append(_string_match(h.string_match, h.name.lower(), f"{what}.headers[{i}]"))
    query = []
    for i, q in enumerate(rm.query_parameters):
        if q.WhichOneof("query_parameter_match_specifier") != "string_match":
            raise L7ResourceError(f"{what}.query_parameters[{i}]: only string_match is supported")
        query.append(_string_match(q.string_match, q.name, f"{what}.query_parameters[{i}]"))
    return m.RouteMatch(pt, pv, method, tuple(headers), tuple(query))


def _headers(add: Sequence[base_pb2.HeaderValueOption], remove: Sequence[str]) -> m.HeaderModifier | None:
    if not add and not remove:
        return None
    set_: list[tuple[str, str]] = []
    add_: list[tuple[str, str]] = []
    for o in add:
        pair = (o.header.key.lower(), o.header.value)
        (add_ if o.append_action == base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD else set_).append(pair)
    return m.HeaderModifier(tuple(set_), tuple(add_), tuple(h.lower() for h in remove))


def _fault(route: rc.Route, what: str) -> m.Fault | None:
    a = route.typed_per_filter_config.get(FAULT_FILTER)
    if a is None:
        return None
    f = fault_pb2.HTTPFault()
    if not a.Unpack(f):
        raise L7ResourceError(f"{what}: {FAULT_FILTER} config is not an HTTPFault")
    delay = _secs(f.delay.fixed_delay) if f.HasField("delay") else 0.0
    status = f.abort.http_status if f.HasField("abort") else 0
    gstatus = f.abort.grpc_status if f.HasField("abort") and f.abort.WhichOneof("error_type") == "grpc_status" else -1
    return m.Fault(delay, _pct(f.delay.percentage) if f.HasField("delay") else 0.0, status, gstatus,
                   _pct(f.abort.percentage) if f.HasField("abort") else 0.0)


def _retry(p: rc.RetryPolicy, what: str) -> tuple[m.Retry | None, float]:
    per_try = _secs(p.per_try_timeout) if p.HasField("per_try_timeout") else 0.0
    attempts = (p.num_retries.value if p.HasField("num_retries") else 1) + 1
    conds = [c.strip() for c in p.retry_on.split(",") if c.strip()]
    on = tuple(c for c in conds if c in m.RETRY_ON)
    grpc_on = tuple(c for c in conds if c in m.GRPC_RETRY_ON)
    unknown = [c for c in conds if c not in m.RETRY_ON and c not in m.GRPC_RETRY_ON]
    if unknown:
        raise L7ResourceError(f"{what}: retry_on {', '.join(unknown)} not supported")
    if attempts <= 1:
        return None, per_try
    bo = p.retry_back_off
    base = _secs(bo.base_interval) if bo.HasField("base_interval") else 0.025
    cap = _secs(bo.max_interval) if bo.HasField("max_interval") else base * 10
    return m.Retry(attempts, base, cap, on, tuple(p.retriable_status_codes), grpc_on), per_try


def _route(r: rc.Route, what: str) -> RouteEntry:
    match = _match(r.match, f"{what}.match")
    common = RouteEntry(name=r.name, match=match,
                        request_headers=_headers(r.request_headers_to_add, r.request_headers_to_remove),
                        response_headers=_headers(r.response_headers_to_add, r.response_headers_to_remove),
                        fault=_fault(r, what))
    action = r.WhichOneof("action")
    if action == "redirect":
        rd = r.redirect
        pt, pv = ("", "")
        if rd.WhichOneof("path_rewrite_specifier") == "path_redirect":
            pt, pv = "ReplaceFullPath", rd.path_redirect
        elif rd.WhichOneof("path_rewrite_specifier") == "prefix_rewrite":
            pt, pv = "ReplacePrefixMatch", rd.prefix_rewrite
        return replace(common, redirect=m.Redirect(rd.scheme_redirect, rd.host_redirect, rd.port_redirect,
                                                   pt, pv, _REDIRECT.get(rd.response_code, 302)))
    if action == "direct_response":
        return replace(common, direct_status=r.direct_response.status)
    if action != "route":
        raise L7ResourceError(f"{what}: action {action!r} is not supported")
    act = r.route
    spec = act.WhichOneof("cluster_specifier")
    if spec == "cluster":
        clusters: tuple[WeightedCluster, ...] = (WeightedCluster(act.cluster, 1),)
    elif spec == "weighted_clusters":
        clusters = tuple(WeightedCluster(c.name, c.weight.value if c.HasField("weight") else 1)
                         for c in act.weighted_clusters.clusters)
        if not clusters or sum(c.weight for c in clusters) <= 0:
            raise L7ResourceError(f"{what}: weighted_clusters has no positive weight")
    else:
        raise L7ResourceError(f"{what}: cluster specifier {spec!r} is not supported")
    rewrite = None
    if act.prefix_rewrite:
        rewrite = PathRewrite(prefix=act.prefix_rewrite)
    elif act.HasField("regex_rewrite"):
        rewrite = PathRewrite(None, _regex(act.regex_rewrite.pattern.regex, f"{what} regex_rewrite"),
                              act.regex_rewrite.substitution)
    retry, per_try = _retry(act.retry_policy, f"{what}.retry_policy") if act.HasField("retry_policy") else (None, 0.0)
    mirrors = tuple(MirrorTo(p.cluster, _pct(p.runtime_fraction.default_value)
                             if p.HasField("runtime_fraction") else 100.0) for p in act.request_mirror_policies)
    return replace(common, clusters=clusters, path_rewrite=rewrite, host_rewrite=act.host_rewrite_literal,
                   mirrors=mirrors, timeout_s=_secs(act.timeout) if act.HasField("timeout") else 0.0,
                   per_try_timeout_s=per_try, retry=retry)


def convert_route_configuration(msg: route_pb2.RouteConfiguration) -> RouteTable:
    """Raises L7ResourceError naming the route and field."""
    if len(msg.virtual_hosts) != 1:
        raise L7ResourceError(f"has {len(msg.virtual_hosts)} virtual hosts; nodemesh expects exactly one")
    vh = msg.virtual_hosts[0]
    entries = tuple(_route(r, f"virtual_hosts[0].routes[{i}] ({r.name or 'unnamed'})")
                    for i, r in enumerate(vh.routes))
    return RouteTable(msg.name, entries)


def cluster_policy(msg: cluster_pb2.Cluster) -> ClusterPolicy:
    """Traffic policy of a Cluster: lb_policy, circuit_breakers (first threshold),
    outlier_detection, and the nodemesh.l7 metadata for the rest."""
    meta: dict[str, Any] = {}
    if L7_METADATA_KEY in msg.metadata.filter_metadata:
        meta = dict(msg.metadata.filter_metadata[L7_METADATA_KEY])
    policy = str(meta.get("lb_policy") or _LB.get(msg.lb_policy, "PeakEwma"))
    if policy not in m.LB_POLICIES:
        raise L7ResourceError(f"lb_policy {policy!r} is not one of {', '.join(m.LB_POLICIES)}")
    lb = m.LoadBalancer(policy, str(meta.get("hash_header", "")), str(meta.get("hash_cookie", "")),
                        bool(meta.get("hash_source_ip", False)), bool(meta.get("locality", False)))
    d = m.CircuitBreaker()
    cb = d
    if msg.circuit_breakers.thresholds:
        t = msg.circuit_breakers.thresholds[0]
        cb = m.CircuitBreaker(
            t.max_connections.value if t.HasField("max_connections") else d.max_connections,
            t.max_pending_requests.value if t.HasField("max_pending_requests") else d.max_pending_requests,
            t.max_requests.value if t.HasField("max_requests") else d.max_requests,
            t.max_retries.value if t.HasField("max_retries") else d.max_retries)
    outlier = None
    if msg.HasField("outlier_detection"):
        od = msg.outlier_detection
        o = m.OutlierDetection()
        outlier = m.OutlierDetection(
            od.consecutive_5xx.value if od.HasField("consecutive_5xx") else o.consecutive_5xx,
            od.consecutive_gateway_failure.value if od.HasField("consecutive_gateway_failure")
            else o.consecutive_gateway_errors,
            _secs(od.base_ejection_time) if od.HasField("base_ejection_time") else o.base_ejection_s,
            _secs(od.max_ejection_time) if od.HasField("max_ejection_time") else o.max_ejection_s,
            od.max_ejection_percent.value if od.HasField("max_ejection_percent") else o.max_ejection_percent)
    b = m.RetryBudget()
    budget = m.RetryBudget(float(meta.get("retry_budget_ratio", b.ratio)),
                           float(meta.get("retry_budget_min_per_second", b.min_per_second)),
                           float(meta.get("retry_budget_window_s", b.window_s)))
    try:
        health = cluster_health_check(msg)
    except HealthCheckError as e:
        raise L7ResourceError(str(e)) from None
    idle = 3600.0  # Envoy's default for common_http_protocol_options.idle_timeout
    if msg.HasField("common_http_protocol_options") and msg.common_http_protocol_options.HasField("idle_timeout"):
        idle = _secs(msg.common_http_protocol_options.idle_timeout)
    return ClusterPolicy(lb, cb, outlier, budget, health_check=health, idle_timeout_s=idle)
