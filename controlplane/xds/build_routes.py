"""Translate HTTPRoute/GRPCRoute and DestinationPolicy into standard xDS:
one RouteConfiguration per HTTP-ish service port (named by the port's cluster
name, one virtual host "*", routes ordered by Gateway API precedence) and the
traffic-policy fields of that port's Cluster (circuit_breakers,
outlier_detection, lb_policy). Envoy and gRPC read the standard fields; the
node agent reads the same fields (nodeagent/xds/l7convert.py), plus a few
nodemesh-only values kept in the cluster's "nodemesh" metadata.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.core.v3 import base_pb2
from envoy.config.route.v3 import route_components_pb2 as rc
from envoy.config.route.v3 import route_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.type.matcher.v3 import regex_pb2, string_pb2
from envoy.type.v3 import percent_pb2
from google.protobuf import any_pb2, duration_pb2, wrappers_pb2

from controlplane.xds import subsets
from controlplane.xds.subsets import VersionSplit
from nodemesh import model, routespec, xdsnames

log = logging.getLogger(__name__)

L7_PROTOCOLS = ("http", "http2", "grpc", "auto")
FAULT_FILTER = "envoy.filters.http.fault"
L7_METADATA_KEY = "nodemesh.l7"  # cluster metadata for what Envoy has no field for
_REDIRECT_CODES = {301: rc.RedirectAction.MOVED_PERMANENTLY, 302: rc.RedirectAction.FOUND,
                   303: rc.RedirectAction.SEE_OTHER, 307: rc.RedirectAction.TEMPORARY_REDIRECT,
                   308: rc.RedirectAction.PERMANENT_REDIRECT}
_LB = {"PeakEwma": cluster_pb2.Cluster.ROUND_ROBIN,  # no Envoy equivalent; nodemesh reads metadata
       "RoundRobin": cluster_pb2.Cluster.ROUND_ROBIN, "LeastRequest": cluster_pb2.Cluster.LEAST_REQUEST,
       "RingHash": cluster_pb2.Cluster.RING_HASH, "Maglev": cluster_pb2.Cluster.MAGLEV,
       "Random": cluster_pb2.Cluster.RANDOM}


@dataclass(frozen=True)
class StoredRoute:
    route: routespec.HTTPRoute
    created_ms: int = 0  # Gateway API tie-break: the oldest route wins


def load(store: Any) -> tuple[list[StoredRoute], list[routespec.DestinationPolicy]]:
    """Routes and policies from the store; a stored object that no longer validates is skipped."""
    found_routes: list[StoredRoute] = []
    policies: list[routespec.DestinationPolicy] = []
    for kind in routespec.ROUTE_KINDS:
        items, _ = store.list(kind)
        for r in items:
            try:
                obj = model.object_from_spec(r.kind, r.namespace, r.name, r.spec(), dict(r.labels))
            except model.ValidationError as e:
                log.warning("stored %s %s/%s no longer validates, ignoring it: %s", r.kind, r.namespace, r.name, e)
                continue
            if isinstance(obj, routespec.DestinationPolicy):
                policies.append(obj)
            elif isinstance(obj, routespec.HTTPRoute):
                found_routes.append(StoredRoute(obj, int(getattr(r, "created_unix_ms", 0) or 0)))
    return found_routes, policies


def _dur(seconds: float) -> duration_pb2.Duration:
    d = duration_pb2.Duration()
    d.FromNanoseconds(round(seconds * 1e9))
    return d


def _string_match(m: routespec.StringMatch) -> string_pb2.StringMatcher:
    if m.type == "RegularExpression":
        return string_pb2.StringMatcher(safe_regex=regex_pb2.RegexMatcher(regex=m.value))
    return string_pb2.StringMatcher(exact=m.value)


def _match(m: routespec.RouteMatch) -> rc.RouteMatch:
    out = rc.RouteMatch()
    if m.path_type == "Exact":
        out.path = m.path
    elif m.path_type == "RegularExpression":
        out.safe_regex.regex = m.path
    elif m.path == "/" or m.path.endswith("/"):
        out.prefix = m.path
    else:
        out.path_separated_prefix = m.path  # Gateway API prefixes match whole path segments
    if m.method:
        out.headers.add(name=":method", string_match=string_pb2.StringMatcher(exact=m.method))
    for h in m.headers:
        out.headers.add(name=h.name, string_match=_string_match(h))
    for q in m.query:
        out.query_parameters.add(name=q.name, string_match=_string_match(q))
    return out


def _headers(mod: routespec.HeaderModifier) -> tuple[list[base_pb2.HeaderValueOption], list[str]]:
    opts = []
    for name, value in mod.set:
        opts.append(base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=name, value=value),
            append_action=base_pb2.HeaderValueOption.OVERWRITE_IF_EXISTS_OR_ADD))
    for name, value in mod.add:
        opts.append(base_pb2.HeaderValueOption(
            header=base_pb2.HeaderValue(key=name, value=value),
            append_action=base_pb2.HeaderValueOption.APPEND_IF_EXISTS_OR_ADD))
    return opts, list(mod.remove)


def _percent(p: float) -> percent_pb2.FractionalPercent:
    return percent_pb2.FractionalPercent(numerator=round(p * 10000),
                                         denominator=percent_pb2.FractionalPercent.MILLION)


def _fault(f: routespec.Fault) -> any_pb2.Any:
    msg = fault_pb2.HTTPFault()
    if f.delay_s:
        msg.delay.fixed_delay.CopyFrom(_dur(f.delay_s))
        msg.delay.percentage.CopyFrom(_percent(f.delay_percent))
    if f.abort_status:
        msg.abort.http_status = f.abort_status
        msg.abort.percentage.CopyFrom(_percent(f.abort_percent))
    elif f.abort_grpc_status >= 0:
        msg.abort.grpc_status = f.abort_grpc_status
        msg.abort.percentage.CopyFrom(_percent(f.abort_percent))
    a = any_pb2.Any()
    a.Pack(msg)
    return a


def _retry(r: routespec.Retry, per_try_s: float) -> rc.RetryPolicy:
    pol = rc.RetryPolicy(retry_on=",".join((*r.retry_on, *r.grpc_retry_on)),
                         retriable_status_codes=list(r.codes))
    pol.num_retries.value = max(0, r.attempts - 1)
    pol.retry_back_off.base_interval.CopyFrom(_dur(r.backoff_s))
    pol.retry_back_off.max_interval.CopyFrom(_dur(r.max_backoff_s))
    if per_try_s:
        pol.per_try_timeout.CopyFrom(_dur(per_try_s))
    return pol


def _precedence(sr: StoredRoute, rule_i: int, m: routespec.RouteMatch) -> tuple[Any, ...]:
    """Gateway API: exact path, then longest prefix, then method, then most header
    matches, then most query matches; ties go to the oldest route, then by name."""
    kind_rank = {"Exact": 0, "PathPrefix": 1, "RegularExpression": 2}[m.path_type]
    return (kind_rank, -len(m.path) if m.path_type != "RegularExpression" else 0, 0 if m.method else 1,
            -len(m.headers), -len(m.query), sr.created_ms, sr.route.namespace, sr.route.name, rule_i)


def _targets(backends: Sequence[routespec.BackendRef], namespace: str, parent_port: int, dns: str,
             splits: dict[str, tuple[model.ServiceSpec, VersionSplit]]) -> list[tuple[str, int]]:
    """(cluster, weight) per backend. A backend that is a whole service under a
    Rollout becomes that Rollout's weighted version subsets (weights scaled by 100
    so the other backends keep their share); an explicit subset is its subset cluster."""
    out: list[tuple[str, int]] = []
    split_here = any(f"{namespace}/{b.service}" in splits and not b.subset for b in backends)
    scale = 100 if split_here else 1
    for b in backends:
        port = b.port or parent_port
        hit = splits.get(f"{namespace}/{b.service}")
        if hit is not None and not b.subset:
            out += subsets.split_targets(hit[1], hit[0], port, dns, b.weight)
            continue
        name = xdsnames.cluster_name(b.service, namespace, port, dns, routespec.subset_name(b.subset))
        out.append((name, b.weight * scale))
    merged: dict[str, int] = {}
    for n, w in out:
        merged[n] = merged.get(n, 0) + w
    return [(n, w) for n, w in merged.items() if w > 0]


def _set_targets(act: rc.RouteAction, targets: Sequence[tuple[str, int]]) -> None:
    if len(targets) == 1:
        act.cluster = targets[0][0]
        return
    for n, w in targets:
        act.weighted_clusters.clusters.add(name=n, weight=wrappers_pb2.UInt32Value(value=w))


def _route(sr: StoredRoute, rule_i: int, match_i: int, rule: routespec.RouteRule, m: routespec.RouteMatch,
           parent_port: int, dns: str, splits: dict[str, tuple[model.ServiceSpec, VersionSplit]]) -> rc.Route:
    r = sr.route
    out = rc.Route(name=f"{r.kind}/{r.namespace}/{r.name}/rule{rule_i}/match{match_i}", match=_match(m))
    if rule.request_headers:
        opts, rm = _headers(rule.request_headers)
        out.request_headers_to_add.extend(opts)
        out.request_headers_to_remove.extend(rm)
    if rule.response_headers:
        opts, rm = _headers(rule.response_headers)
        out.response_headers_to_add.extend(opts)
        out.response_headers_to_remove.extend(rm)
    if rule.fault:
        out.typed_per_filter_config[FAULT_FILTER].CopyFrom(_fault(rule.fault))
    if rule.redirect:
        rd = rule.redirect
        out.redirect.response_code = _REDIRECT_CODES[rd.status_code]
        if rd.scheme:
            out.redirect.scheme_redirect = rd.scheme
        if rd.hostname:
            out.redirect.host_redirect = rd.hostname
        if rd.port:
            out.redirect.port_redirect = rd.port
        if rd.path_type == "ReplaceFullPath":
            out.redirect.path_redirect = rd.path
        elif rd.path_type == "ReplacePrefixMatch":
            out.redirect.prefix_rewrite = rd.path
        return out
    backends = [b for b in rule.backends if b.weight > 0]
    if not backends:
        # Gateway API: a rule that routes nowhere answers 500.
        out.direct_response.status = 500
        return out
    act = out.route
    _set_targets(act, _targets(backends, r.namespace, parent_port, dns, splits))
    act.timeout.CopyFrom(_dur(rule.request_timeout_s))  # 0s: no timeout (Envoy and nodemesh alike)
    if r.kind == "GRPCRoute" and rule.request_timeout_s:
        # Proxyless gRPC reads no RouteAction.timeout, only max_stream_duration (gRFC A31);
        # Envoy applies both, to the same value, so every client honours the timeout.
        act.max_stream_duration.max_stream_duration.CopyFrom(_dur(rule.request_timeout_s))
    if rule.rewrite:
        rw = rule.rewrite
        if rw.hostname:
            act.host_rewrite_literal = rw.hostname
        if rw.path_type == "ReplacePrefixMatch":
            act.prefix_rewrite = rw.path
        elif rw.path_type == "ReplaceFullPath":
            act.regex_rewrite.pattern.regex = "^.*$"
            act.regex_rewrite.substitution = rw.path
    if rule.retry:
        act.retry_policy.CopyFrom(_retry(rule.retry, rule.backend_timeout_s))
    elif rule.backend_timeout_s:
        pol = rc.RetryPolicy()
        pol.num_retries.value = 0
        pol.per_try_timeout.CopyFrom(_dur(rule.backend_timeout_s))
        act.retry_policy.CopyFrom(pol)
    for mi in rule.mirrors:
        mp = act.request_mirror_policies.add(
            cluster=xdsnames.cluster_name(mi.backend.service, r.namespace, mi.backend.port or parent_port, dns))
        mp.runtime_fraction.default_value.CopyFrom(_percent(mi.percent))
    return out


def route_configurations(mesh: model.MeshConfig, services: Sequence[model.ServiceSpec],
                         stored: Sequence[StoredRoute],
                         splits: Sequence[VersionSplit] = ()) -> dict[str, route_pb2.RouteConfiguration]:
    """One RouteConfiguration per HTTP-ish port of every service. Without an
    attached route, a single catch-all route to the port's own cluster; with one,
    only the routes' matches (GAMMA: unmatched requests get 404). A service under
    a Rollout (`splits`) is split between its version subsets wherever a route
    names the whole service; its TCP ports get a catch-all route too, which the
    node agent applies per connection."""
    out: dict[str, route_pb2.RouteConfiguration] = {}
    by_key = {s.key: s for s in services}
    split_map = {sp.service: (by_key[sp.service], sp) for sp in splits if sp.service in by_key}
    for svc in services:
        for port in svc.ports:
            if port.protocol not in L7_PROTOCOLS:
                if svc.key in split_map:
                    tname = xdsnames.cluster_name(svc.name, svc.namespace, port.port, mesh.dns_domain)
                    tcfg = route_pb2.RouteConfiguration(name=tname)
                    tvh = tcfg.virtual_hosts.add(name=tname, domains=["*"])
                    troute = tvh.routes.add(name="default", match=rc.RouteMatch(prefix="/"))
                    _set_targets(troute.route, subsets.split_targets(split_map[svc.key][1], svc, port.port,
                                                                     mesh.dns_domain))
                    troute.route.timeout.CopyFrom(_dur(0))
                    out[tname] = tcfg
                continue
            name = xdsnames.cluster_name(svc.name, svc.namespace, port.port, mesh.dns_domain)
            cands: list[tuple[tuple[Any, ...], rc.Route]] = []
            for sr in stored:
                r = sr.route
                if r.namespace != svc.namespace or not any(
                        p.service == svc.name and p.port in (0, port.port) for p in r.parents):
                    continue
                for ri, rule in enumerate(r.rules):
                    for mi, m in enumerate(rule.matches):
                        cands.append((_precedence(sr, ri, m),
                                      _route(sr, ri, mi, rule, m, port.port, mesh.dns_domain, split_map)))
            rcfg = route_pb2.RouteConfiguration(name=name)
            vh = rcfg.virtual_hosts.add(name=name, domains=["*"])
            if cands:
                vh.routes.extend(r for _, r in sorted(cands, key=lambda c: c[0]))
            else:
                default = vh.routes.add(name="default", match=rc.RouteMatch(prefix="/"))
                if svc.key in split_map:
                    _set_targets(default.route, subsets.split_targets(split_map[svc.key][1], svc, port.port,
                                                                      mesh.dns_domain))
                else:
                    default.route.cluster = name
                default.route.timeout.CopyFrom(_dur(0))
            out[name] = rcfg
    return out


def apply_policy(cluster: cluster_pb2.Cluster, policy: routespec.DestinationPolicy | None) -> None:
    """Write a DestinationPolicy onto a service port's Cluster (standard fields,
    plus nodemesh metadata for what Envoy has no field for)."""
    p = policy or routespec.DestinationPolicy("", "", "")
    lb = p.load_balancer
    cluster.lb_policy = _LB[lb.policy]
    cb = p.circuit_breaker
    th = cluster.circuit_breakers.thresholds.add()
    th.max_connections.value = cb.max_connections
    th.max_pending_requests.value = cb.max_pending_requests
    th.max_requests.value = cb.max_requests
    th.max_retries.value = cb.max_retries
    th.retry_budget.budget_percent.value = p.retry_budget.ratio * 100.0
    th.retry_budget.min_retry_concurrency.value = int(p.retry_budget.min_per_second)
    if p.idle_timeout_s != 3600.0:  # Envoy's default is 1 h too: write it only when it differs
        cluster.common_http_protocol_options.idle_timeout.CopyFrom(_dur(p.idle_timeout_s))
    if p.outlier:
        o = p.outlier
        od = cluster.outlier_detection
        od.consecutive_5xx.value = o.consecutive_5xx
        od.consecutive_gateway_failure.value = o.consecutive_gateway_errors
        od.enforcing_consecutive_gateway_failure.value = 100
        od.base_ejection_time.CopyFrom(_dur(o.base_ejection_s))
        od.max_ejection_time.CopyFrom(_dur(o.max_ejection_s))
        od.max_ejection_percent.value = o.max_ejection_percent
    meta = cluster.metadata.filter_metadata[L7_METADATA_KEY]
    meta.update({
        "lb_policy": lb.policy, "hash_header": lb.hash_header, "hash_cookie": lb.hash_cookie,
        "hash_source_ip": lb.hash_source_ip, "locality": lb.locality,
        "retry_budget_ratio": p.retry_budget.ratio,
        "retry_budget_min_per_second": p.retry_budget.min_per_second,
        "retry_budget_window_s": p.retry_budget.window_s,
    })


def policy_for(policies: Sequence[routespec.DestinationPolicy],
               svc: model.ServiceSpec) -> routespec.DestinationPolicy | None:
    """The policy targeting the service; with several, the first by name (documented)."""
    matching = sorted((p for p in policies if p.namespace == svc.namespace and p.service == svc.name),
                      key=lambda p: p.name)
    return matching[0] if matching else None
