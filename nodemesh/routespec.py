"""L7 config kinds: HTTPRoute and GRPCRoute (Gateway API shapes attached to a
Service, as GAMMA does) and DestinationPolicy (balancing, circuit breaking,
outlier detection, retry budget for one Service). Parsed and validated into
frozen dataclasses; every problem names the field path, like nodemesh.model.

nodemesh extensions to Gateway API are documented in docs/traffic.md: the
`retry` block of a rule (Gateway API's is experimental), the `fault` filter
type, and `timeouts.backendRequest` as the per-try timeout.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nodemesh.fieldcheck import FieldChecker, Problem
from nodemesh.healthcheckspec import HealthCheck, parse_health_checks

KIND_HTTP_ROUTE = "HTTPRoute"
KIND_GRPC_ROUTE = "GRPCRoute"
KIND_DESTINATION_POLICY = "DestinationPolicy"
ROUTE_KINDS = (KIND_HTTP_ROUTE, KIND_GRPC_ROUTE, KIND_DESTINATION_POLICY)
ALIASES = {
    "httproute": KIND_HTTP_ROUTE, "httproutes": KIND_HTTP_ROUTE,
    "grpcroute": KIND_GRPC_ROUTE, "grpcroutes": KIND_GRPC_ROUTE,
    "destinationpolicy": KIND_DESTINATION_POLICY, "destinationpolicies": KIND_DESTINATION_POLICY,
    "dp": KIND_DESTINATION_POLICY,
}

PATH_TYPES = ("Exact", "PathPrefix", "RegularExpression")
VALUE_TYPES = ("Exact", "RegularExpression")
METHODS = ("GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH")
RETRY_ON = ("connect-failure", "reset", "5xx", "gateway-error", "retriable-status-codes")
GRPC_RETRY_ON = ("cancelled", "deadline-exceeded", "internal", "resource-exhausted", "unavailable")
GRPC_CODES = {"cancelled": 1, "deadline-exceeded": 4, "resource-exhausted": 8, "internal": 13,
              "unavailable": 14}
LB_POLICIES = ("PeakEwma", "RoundRobin", "LeastRequest", "RingHash", "Maglev", "Random")
REDIRECT_CODES = (301, 302, 303, 307, 308)
FILTER_TYPES = ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestRedirect", "URLRewrite",
                "RequestMirror", "Fault")
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_GRPC_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*$")



# ---------------------------------------------------------------- objects


@dataclass(frozen=True)
class StringMatch:
    name: str  # header or query parameter name (lower-cased for headers)
    value: str
    type: str = "Exact"  # Exact | RegularExpression


@dataclass(frozen=True)
class RouteMatch:
    path_type: str = "PathPrefix"
    path: str = "/"
    method: str = ""
    headers: tuple[StringMatch, ...] = ()
    query: tuple[StringMatch, ...] = ()


@dataclass(frozen=True)
class BackendRef:
    service: str  # in the route's namespace
    port: int = 0  # 0: the parent's port
    weight: int = 1
    # nodemesh extension: only the service's workloads with these labels (a version
    # subset, e.g. (("version", "v2"),)); sorted pairs, () = the whole service.
    subset: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class HeaderModifier:
    set: tuple[tuple[str, str], ...] = ()
    add: tuple[tuple[str, str], ...] = ()
    remove: tuple[str, ...] = ()


@dataclass(frozen=True)
class Redirect:
    scheme: str = ""
    hostname: str = ""
    port: int = 0
    path_type: str = ""  # "" | ReplaceFullPath | ReplacePrefixMatch
    path: str = ""
    status_code: int = 302


@dataclass(frozen=True)
class Rewrite:
    hostname: str = ""
    path_type: str = ""
    path: str = ""


@dataclass(frozen=True)
class Mirror:
    backend: BackendRef
    percent: float = 100.0


@dataclass(frozen=True)
class Fault:
    delay_s: float = 0.0
    delay_percent: float = 0.0
    abort_status: int = 0
    abort_grpc_status: int = -1
    abort_percent: float = 0.0


@dataclass(frozen=True)
class Retry:
    attempts: int = 1  # total tries, including the first
    backoff_s: float = 0.025
    max_backoff_s: float = 0.25
    retry_on: tuple[str, ...] = ("connect-failure", "reset", "gateway-error")
    codes: tuple[int, ...] = ()
    grpc_retry_on: tuple[str, ...] = ()


@dataclass(frozen=True)
class RouteRule:
    matches: tuple[RouteMatch, ...] = (RouteMatch(),)
    backends: tuple[BackendRef, ...] = ()
    request_headers: HeaderModifier | None = None
    response_headers: HeaderModifier | None = None
    redirect: Redirect | None = None
    rewrite: Rewrite | None = None
    mirrors: tuple[Mirror, ...] = ()
    fault: Fault | None = None
    request_timeout_s: float = 0.0  # whole call, retries included; 0 = none
    backend_timeout_s: float = 0.0  # per try; 0 = none
    retry: Retry | None = None


@dataclass(frozen=True)
class ParentRef:
    service: str
    port: int = 0  # 0: every port of the service


@dataclass(frozen=True)
class HTTPRoute:
    name: str
    namespace: str
    parents: tuple[ParentRef, ...]
    rules: tuple[RouteRule, ...]
    kind: str = KIND_HTTP_ROUTE
    labels: tuple[tuple[str, str], ...] = ()
    raw_spec: tuple[tuple[str, Any], ...] = ()  # canonical spec as applied, for spec()

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def spec(self) -> dict[str, Any]:
        return dict(self.raw_spec)


@dataclass(frozen=True)
class CircuitBreaker:
    max_connections: int = 1024
    max_pending_requests: int = 1024
    max_requests: int = 1024
    max_retries: int = 3


@dataclass(frozen=True)
class OutlierDetection:
    consecutive_5xx: int = 5
    consecutive_gateway_errors: int = 5
    base_ejection_s: float = 30.0
    max_ejection_s: float = 300.0
    max_ejection_percent: int = 50


@dataclass(frozen=True)
class RetryBudget:
    ratio: float = 0.2  # retries allowed per request, over the window
    min_per_second: float = 10.0
    window_s: float = 10.0


@dataclass(frozen=True)
class LoadBalancer:
    policy: str = "PeakEwma"
    hash_header: str = ""
    hash_cookie: str = ""
    hash_source_ip: bool = False
    locality: bool = False  # opt-in: prefer same node, then same zone, failing over


@dataclass(frozen=True)
class DestinationPolicy:
    name: str
    namespace: str
    service: str
    load_balancer: LoadBalancer = LoadBalancer()
    circuit_breaker: CircuitBreaker = CircuitBreaker()
    outlier: OutlierDetection | None = None
    retry_budget: RetryBudget = RetryBudget()
    kind: str = KIND_DESTINATION_POLICY
    labels: tuple[tuple[str, str], ...] = ()
    raw_spec: tuple[tuple[str, Any], ...] = ()
    health_checks: tuple[HealthCheck, ...] = ()  # active checks (nodemesh/healthcheckspec.py)
    idle_timeout_s: float = 3600.0  # connectionPool.idleTimeout: per TCP connection, "0s" = never

    @property
    def key(self) -> str:
        return f"{self.namespace}/{self.name}"

    def spec(self) -> dict[str, Any]:
        return dict(self.raw_spec)


# ---------------------------------------------------------------- helpers


def _string_matches(c: FieldChecker, raw: Any, path: str, header: bool) -> tuple[StringMatch, ...]:
    out = []
    for i, m in enumerate(c.entries(raw, path)):
        p = f"{path}[{i}]"
        d = c.mapping(m, p, ("type", "name", "value")) or {}
        t = c.text(d.get("type", "Exact"), f"{p}.type")
        if t not in VALUE_TYPES:
            c.add(f"{p}.type", f"must be one of {', '.join(VALUE_TYPES)}, got {t!r}")
        name = c.header_name(d.get("name"), f"{p}.name") if header else c.text(d.get("name"), f"{p}.name", True)
        value = c.text(d.get("value"), f"{p}.value", required=True)
        if t == "RegularExpression" and value:
            c.regex(value, f"{p}.value")
        out.append(StringMatch(name, value, t))
    return tuple(out)


def _backend(c: FieldChecker, raw: Any, path: str, weighted: bool) -> BackendRef | None:
    d = c.mapping(raw, path, ("kind", "group", "name", "namespace", "port", "weight", "subset") if weighted
              else ("kind", "group", "name", "namespace", "port"), required=True) or {}
    kind = d.get("kind", "Service")
    if kind != "Service":
        c.add(f"{path}.kind", f"only Service backends are supported, got {kind!r}")
    name = c.text(d.get("name"), f"{path}.name", required=True)
    if name and not _NAME.match(name):
        c.add(f"{path}.name", "must be a DNS label")
    if d.get("namespace") not in (None, ""):
        c.add(f"{path}.namespace", "cross-namespace backends are not supported; omit it")
    port = c.integer(d.get("port"), f"{path}.port", 1, 65535, 0)
    weight = c.integer(d.get("weight"), f"{path}.weight", 0, 1_000_000, 1) if weighted else 1
    subset = _subset(c, d.get("subset"), f"{path}.subset") if weighted else ()
    return BackendRef(name, port, weight, subset) if name else None


_SUBSET_KEY = re.compile(r"^([a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
_SUBSET_VALUE = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$")
MAX_SUBSET_LABELS = 4


def _subset(c: FieldChecker, raw: Any, path: str) -> tuple[tuple[str, str], ...]:
    """A version subset: labels the backend's workloads must carry (e.g. {version: v2})."""
    if raw is None:
        return ()
    if not isinstance(raw, dict) or not raw:
        c.add(path, "must be a non-empty mapping of label to value, like {version: v2}")
        return ()
    if len(raw) > MAX_SUBSET_LABELS:
        c.add(path, f"at most {MAX_SUBSET_LABELS} labels")
    out = []
    for k, v in raw.items():
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if not isinstance(k, str) or not _SUBSET_KEY.match(k):
            c.add(f"{path}.{k}", "invalid label key")
        elif not isinstance(v, str) or not _SUBSET_VALUE.match(v):
            c.add(f"{path}.{k}", "label value must be up to 63 of [A-Za-z0-9._-], starting and ending alphanumeric")
        else:
            out.append((k, v))
    return tuple(sorted(out))


def subset_name(subset: Sequence[tuple[str, str]]) -> str:
    """The subset's part of a cluster name: 'version=v2' (several labels joined by ',')."""
    return ",".join(f"{k}={v}" for k, v in sorted(subset))


def parse_subset_name(text: str) -> tuple[tuple[str, str], ...]:
    """The inverse of subset_name; raises ValueError on a malformed one."""
    out = []
    for part in text.split(","):
        k, eq, v = part.partition("=")
        if not eq or not _SUBSET_KEY.match(k) or not _SUBSET_VALUE.match(v):
            raise ValueError(f"subset {text!r} is not label=value[,label=value]")
        out.append((k, v))
    return tuple(sorted(out))


def _header_modifier(c: FieldChecker, raw: Any, path: str) -> HeaderModifier:
    d = c.mapping(raw, path, ("set", "add", "remove"), required=True) or {}

    def pairs(key: str) -> tuple[tuple[str, str], ...]:
        out = []
        for i, h in enumerate(c.entries(d.get(key), f"{path}.{key}")):
            p = f"{path}.{key}[{i}]"
            hd = c.mapping(h, p, ("name", "value")) or {}
            out.append((c.header_name(hd.get("name"), f"{p}.name"), c.text(hd.get("value"), f"{p}.value")))
        return tuple(out)

    remove = tuple(c.header_name(h, f"{path}.remove[{i}]") for i, h in enumerate(c.entries(d.get("remove"),
                                                                                       f"{path}.remove")))
    return HeaderModifier(pairs("set"), pairs("add"), remove)


def _path_modifier(c: FieldChecker, raw: Any, path: str, has_prefix: bool) -> tuple[str, str]:
    d = c.mapping(raw, path, ("type", "replaceFullPath", "replacePrefixMatch"), required=True) or {}
    t = c.text(d.get("type"), f"{path}.type", required=True)
    if t == "ReplaceFullPath":
        v = c.text(d.get("replaceFullPath"), f"{path}.replaceFullPath", required=True)
    elif t == "ReplacePrefixMatch":
        v = c.text(d.get("replacePrefixMatch"), f"{path}.replacePrefixMatch", required=True)
        if not has_prefix:
            c.add(f"{path}.type", "ReplacePrefixMatch needs every match of the rule to be a PathPrefix match")
    else:
        c.add(f"{path}.type", f"must be ReplaceFullPath or ReplacePrefixMatch, got {t!r}")
        v = ""
    if v and not v.startswith("/"):
        c.add(path, "the replacement path must start with '/'")
    return t, v


def _filters(c: FieldChecker, raw: Any, path: str, rule: dict[str, Any], has_prefix: bool) -> None:
    for i, f in enumerate(c.entries(raw, path)):
        p = f"{path}[{i}]"
        d = c.mapping(f, p, ("type", "requestHeaderModifier", "responseHeaderModifier", "requestRedirect",
                         "urlRewrite", "requestMirror", "fault")) or {}
        t = c.text(d.get("type"), f"{p}.type", required=True)
        if t and t not in FILTER_TYPES:
            c.add(f"{p}.type", f"must be one of {', '.join(FILTER_TYPES)}, got {t!r}")
            continue
        field_name = t[0].lower() + t[1:] if t != "URLRewrite" else "urlRewrite"
        body = d.get(field_name)
        if t and body is None:
            c.add(f"{p}.{field_name}", f"required for a {t} filter")
            continue
        if t in ("RequestHeaderModifier", "ResponseHeaderModifier", "RequestRedirect", "URLRewrite",
                 "Fault") and field_name in rule:
            c.add(f"{p}.type", f"at most one {t} filter per rule")
            continue
        fp = f"{p}.{field_name}"
        if t == "RequestHeaderModifier" or t == "ResponseHeaderModifier":
            rule[field_name] = _header_modifier(c, body, fp)
        elif t == "RequestRedirect":
            rd = c.mapping(body, fp, ("scheme", "hostname", "port", "path", "statusCode")) or {}
            scheme = c.text(rd.get("scheme"), f"{fp}.scheme")
            if scheme and scheme not in ("http", "https"):
                c.add(f"{fp}.scheme", "must be http or https")
            pt, pv = _path_modifier(c, rd["path"], f"{fp}.path", has_prefix) if "path" in rd else ("", "")
            code = c.integer(rd.get("statusCode"), f"{fp}.statusCode", 300, 308, 302)
            if code not in REDIRECT_CODES:
                c.add(f"{fp}.statusCode", f"must be one of {REDIRECT_CODES}")
            rule[field_name] = Redirect(scheme, c.text(rd.get("hostname"), f"{fp}.hostname"),
                                        c.integer(rd.get("port"), f"{fp}.port", 1, 65535, 0), pt, pv, code)
        elif t == "URLRewrite":
            rd = c.mapping(body, fp, ("hostname", "path")) or {}
            pt, pv = _path_modifier(c, rd["path"], f"{fp}.path", has_prefix) if "path" in rd else ("", "")
            rule[field_name] = Rewrite(c.text(rd.get("hostname"), f"{fp}.hostname"), pt, pv)
        elif t == "RequestMirror":
            rd = c.mapping(body, fp, ("backendRef", "percent")) or {}
            b = _backend(c, rd.get("backendRef"), f"{fp}.backendRef", weighted=False)
            pct = c.number(rd.get("percent"), f"{fp}.percent", 0, 100, 100.0)
            if b is not None:
                rule.setdefault("mirrors", []).append(Mirror(b, pct))
        elif t == "Fault":
            rd = c.mapping(body, fp, ("delay", "abort")) or {}
            dl = c.mapping(rd.get("delay"), f"{fp}.delay", ("fixedDelay", "percent")) or {}
            ab = c.mapping(rd.get("abort"), f"{fp}.abort", ("httpStatus", "grpcStatus", "percent")) or {}
            if not dl and not ab:
                c.add(fp, "needs a delay or an abort")
            delay = c.duration(dl.get("fixedDelay"), f"{fp}.delay.fixedDelay") if dl else 0.0
            if dl and "fixedDelay" not in dl:
                c.add(f"{fp}.delay.fixedDelay", "required")
            status = c.integer(ab.get("httpStatus"), f"{fp}.abort.httpStatus", 200, 599, 0) if ab else 0
            gstatus = c.integer(ab.get("grpcStatus"), f"{fp}.abort.grpcStatus", 0, 16, -1) if ab else -1
            if ab and not status and gstatus < 0:
                c.add(f"{fp}.abort", "needs httpStatus or grpcStatus")
            rule[field_name] = Fault(delay, c.number(dl.get("percent"), f"{fp}.delay.percent", 0, 100, 100.0)
                                     if dl else 0.0, status, gstatus,
                                     c.number(ab.get("percent"), f"{fp}.abort.percent", 0, 100, 100.0)
                                     if ab else 0.0)


def _retry(c: FieldChecker, raw: Any, path: str) -> Retry:
    d = c.mapping(raw, path, ("attempts", "backoff", "maxBackoff", "retryOn", "codes", "grpcRetryOn")) or {}
    attempts = c.integer(d.get("attempts"), f"{path}.attempts", 1, 10, 2)
    backoff = c.duration(d.get("backoff"), f"{path}.backoff", 0.025)
    if backoff <= 0:
        # Envoy refuses RetryBackOff.base_interval 0 and would NACK the whole route table.
        c.add(f"{path}.backoff", "must be greater than 0 (Envoy rejects a zero retry back-off); e.g. '1ms'")
    max_backoff = c.duration(d.get("maxBackoff"), f"{path}.maxBackoff", max(0.25, backoff * 10))
    if max_backoff < backoff:
        c.add(f"{path}.maxBackoff", "must not be less than backoff")
    on = []
    for i, v in enumerate(c.entries(d.get("retryOn", ["connect-failure", "reset", "gateway-error"]),
                                 f"{path}.retryOn")):
        if v not in RETRY_ON:
            c.add(f"{path}.retryOn[{i}]", f"must be one of {', '.join(RETRY_ON)}, got {v!r}")
        else:
            on.append(v)
    codes = []
    for i, v in enumerate(c.entries(d.get("codes"), f"{path}.codes")):
        codes.append(c.integer(v, f"{path}.codes[{i}]", 400, 599, 503))
    if codes and "retriable-status-codes" not in on:
        on.append("retriable-status-codes")
    grpc_on = []
    for i, v in enumerate(c.entries(d.get("grpcRetryOn"), f"{path}.grpcRetryOn")):
        if v not in GRPC_RETRY_ON:
            c.add(f"{path}.grpcRetryOn[{i}]", f"must be one of {', '.join(GRPC_RETRY_ON)}, got {v!r}")
        else:
            grpc_on.append(v)
    return Retry(attempts, backoff, max_backoff, tuple(on), tuple(codes), tuple(grpc_on))


def _http_match(c: FieldChecker, raw: Any, p: str) -> RouteMatch:
    d = c.mapping(raw, p, ("path", "method", "headers", "queryParams")) or {}
    pd = c.mapping(d.get("path"), f"{p}.path", ("type", "value")) or {}
    pt = c.text(pd.get("type", "PathPrefix"), f"{p}.path.type")
    if pt not in PATH_TYPES:
        c.add(f"{p}.path.type", f"must be one of {', '.join(PATH_TYPES)}, got {pt!r}")
    pv = c.text(pd.get("value", "/"), f"{p}.path.value")
    if pt == "RegularExpression":
        c.regex(pv, f"{p}.path.value")
    elif pv and not pv.startswith("/"):
        c.add(f"{p}.path.value", "must start with '/'")
    method = c.text(d.get("method"), f"{p}.method")
    if method and method not in METHODS:
        c.add(f"{p}.method", f"must be one of {', '.join(METHODS)}, got {method!r}")
    return RouteMatch(pt, pv or "/", method, _string_matches(c, d.get("headers"), f"{p}.headers", True),
                      _string_matches(c, d.get("queryParams"), f"{p}.queryParams", False))


def _grpc_match(c: FieldChecker, raw: Any, p: str) -> RouteMatch:
    """A GRPCRoute match becomes an HTTP match on POST /<service>/<method>."""
    d = c.mapping(raw, p, ("method", "headers")) or {}
    md = c.mapping(d.get("method"), f"{p}.method", ("type", "service", "method")) or {}
    t = c.text(md.get("type", "Exact"), f"{p}.method.type")
    if t not in VALUE_TYPES:
        c.add(f"{p}.method.type", f"must be one of {', '.join(VALUE_TYPES)}, got {t!r}")
    svc = c.text(md.get("service"), f"{p}.method.service")
    meth = c.text(md.get("method"), f"{p}.method.method")
    headers = _string_matches(c, d.get("headers"), f"{p}.headers", True)
    if t == "Exact":
        for v, what in ((svc, "service"), (meth, "method")):
            if v and not _GRPC_NAME.match(v):
                c.add(f"{p}.method.{what}", f"{v!r} is not a valid gRPC name")
        if svc and meth:
            return RouteMatch("Exact", f"/{svc}/{meth}", "", headers)
        if svc:
            return RouteMatch("PathPrefix", f"/{svc}/", "", headers)
        if meth:
            return RouteMatch("RegularExpression", f"/[^/]+/{re.escape(meth)}", "", headers)
        return RouteMatch("PathPrefix", "/", "", headers)
    s, m = (svc or "[^/]+"), (meth or "[^/]+")
    c.regex(s, f"{p}.method.service")
    c.regex(m, f"{p}.method.method")
    return RouteMatch("RegularExpression", f"/{s}/{m}", "", headers)


def _parse_route(c: FieldChecker, kind: str, name: str, namespace: str, labels: tuple[tuple[str, str], ...],
                 spec_raw: Any) -> HTTPRoute | None:
    spec = c.mapping(spec_raw, "spec", ("parentRefs", "hostnames", "rules"), required=True) or {}
    parents = []
    raw_parents = c.entries(spec.get("parentRefs"), "spec.parentRefs")
    if not raw_parents:
        c.add("spec.parentRefs", "required; name the Service this route attaches to (kind: Service)")
    for i, pr in enumerate(raw_parents):
        p = f"spec.parentRefs[{i}]"
        d = c.mapping(pr, p, ("group", "kind", "name", "namespace", "port")) or {}
        if d.get("kind", "Service") != "Service":
            c.add(f"{p}.kind", f"only Service parents are supported (GAMMA), got {d.get('kind')!r}")
        if d.get("namespace") not in (None, "", namespace):
            c.add(f"{p}.namespace", "a route attaches to Services of its own namespace only")
        svc = c.text(d.get("name"), f"{p}.name", required=True)
        parents.append(ParentRef(svc, c.integer(d.get("port"), f"{p}.port", 1, 65535, 0)))
    rules = []
    raw_rules = c.entries(spec.get("rules"), "spec.rules")
    for i, rr in enumerate(raw_rules):
        p = f"spec.rules[{i}]"
        d = c.mapping(rr, p, ("matches", "backendRefs", "filters", "timeouts", "retry")) or {}
        matcher = _http_match if kind == KIND_HTTP_ROUTE else _grpc_match
        matches = tuple(matcher(c, m, f"{p}.matches[{j}]") for j, m in enumerate(c.entries(d.get("matches"),
                                                                                     f"{p}.matches")))
        if not matches:
            matches = (RouteMatch(),)
        has_prefix = all(m.path_type == "PathPrefix" for m in matches)
        backends = []
        for j, b in enumerate(c.entries(d.get("backendRefs"), f"{p}.backendRefs")):
            ref = _backend(c, b, f"{p}.backendRefs[{j}]", weighted=True)
            if ref is not None:
                backends.append(ref)
        extra: dict[str, Any] = {}
        _filters(c, d.get("filters"), f"{p}.filters", extra, has_prefix)
        if backends and "requestRedirect" in extra:
            c.add(f"{p}.filters", "a RequestRedirect rule must not have backendRefs")
        if backends and all(b.weight == 0 for b in backends):
            c.add(f"{p}.backendRefs", "every weight is 0: the rule could route nowhere")
        td = c.mapping(d.get("timeouts"), f"{p}.timeouts", ("request", "backendRequest")) or {}
        req_t = c.duration(td.get("request"), f"{p}.timeouts.request")
        be_t = c.duration(td.get("backendRequest"), f"{p}.timeouts.backendRequest")
        if req_t and be_t and be_t > req_t:
            c.add(f"{p}.timeouts.backendRequest", "must not exceed timeouts.request (Gateway API rule)")
        retry = _retry(c, d["retry"], f"{p}.retry") if "retry" in d else None
        rules.append(RouteRule(matches, tuple(backends), extra.get("requestHeaderModifier"),
                          extra.get("responseHeaderModifier"), extra.get("requestRedirect"),
                          extra.get("urlRewrite"), tuple(extra.get("mirrors", ())), extra.get("fault"),
                          req_t, be_t, retry))
    if not raw_rules:
        c.add("spec.rules", "required; at least one rule")
    if c.problems:
        return None
    return HTTPRoute(name, namespace, tuple(parents), tuple(rules), kind, labels,
                     tuple(sorted(spec.items())))


def _parse_policy(c: FieldChecker, name: str, namespace: str, labels: tuple[tuple[str, str], ...],
                  spec_raw: Any) -> DestinationPolicy | None:
    spec = c.mapping(spec_raw, "spec", ("targetRef", "loadBalancer", "circuitBreaker", "outlierDetection",
                                    "retryBudget", "healthChecks", "connectionPool"), required=True) or {}
    tr = c.mapping(spec.get("targetRef"), "spec.targetRef", ("group", "kind", "name"), required=True) or {}
    if tr.get("kind", "Service") != "Service":
        c.add("spec.targetRef.kind", "must be Service")
    svc = c.text(tr.get("name"), "spec.targetRef.name", required=True)
    lbd = c.mapping(spec.get("loadBalancer"), "spec.loadBalancer", ("policy", "hashOn", "locality")) or {}
    pol = c.text(lbd.get("policy", "PeakEwma"), "spec.loadBalancer.policy")
    if pol not in LB_POLICIES:
        c.add("spec.loadBalancer.policy", f"must be one of {', '.join(LB_POLICIES)}, got {pol!r}")
    ho = c.mapping(lbd.get("hashOn"), "spec.loadBalancer.hashOn", ("header", "cookie", "sourceIP")) or {}
    if pol in ("RingHash", "Maglev") and not ho:
        c.add("spec.loadBalancer.hashOn", f"required for {pol}: header, cookie or sourceIP")
    if ho and pol not in ("RingHash", "Maglev"):
        c.add("spec.loadBalancer.hashOn", "only meaningful with policy RingHash or Maglev")
    if len(ho) > 1:
        c.add("spec.loadBalancer.hashOn", "give exactly one of header, cookie, sourceIP")
    loc = lbd.get("locality", False)
    if not isinstance(loc, bool):
        c.add("spec.loadBalancer.locality", "must be true or false")
        loc = False
    lb = LoadBalancer(pol, c.header_name(ho["header"], "spec.loadBalancer.hashOn.header") if "header" in ho
                      else "", c.text(ho.get("cookie"), "spec.loadBalancer.hashOn.cookie"),
                      ho.get("sourceIP") is True, loc)
    cbd = c.mapping(spec.get("circuitBreaker"), "spec.circuitBreaker",
                ("maxConnections", "maxPendingRequests", "maxRequests", "maxRetries")) or {}
    d = CircuitBreaker()
    cb = CircuitBreaker(
        c.integer(cbd.get("maxConnections"), "spec.circuitBreaker.maxConnections", 1, 1 << 30, d.max_connections),
        c.integer(cbd.get("maxPendingRequests"), "spec.circuitBreaker.maxPendingRequests", 0, 1 << 30,
              d.max_pending_requests),
        c.integer(cbd.get("maxRequests"), "spec.circuitBreaker.maxRequests", 1, 1 << 30, d.max_requests),
        c.integer(cbd.get("maxRetries"), "spec.circuitBreaker.maxRetries", 0, 1 << 30, d.max_retries))
    outlier = None
    if "outlierDetection" in spec:
        od = c.mapping(spec["outlierDetection"], "spec.outlierDetection",
                   ("consecutive5xx", "consecutiveGatewayErrors", "baseEjectionTime", "maxEjectionTime",
                    "maxEjectionPercent")) or {}
        o = OutlierDetection()
        outlier = OutlierDetection(
            c.integer(od.get("consecutive5xx"), "spec.outlierDetection.consecutive5xx", 0, 1000, o.consecutive_5xx),
            c.integer(od.get("consecutiveGatewayErrors"), "spec.outlierDetection.consecutiveGatewayErrors", 0, 1000,
                  o.consecutive_gateway_errors),
            c.duration(od.get("baseEjectionTime"), "spec.outlierDetection.baseEjectionTime", o.base_ejection_s),
            c.duration(od.get("maxEjectionTime"), "spec.outlierDetection.maxEjectionTime", o.max_ejection_s),
            c.integer(od.get("maxEjectionPercent"), "spec.outlierDetection.maxEjectionPercent", 0, 100,
                  o.max_ejection_percent))
    rb = c.mapping(spec.get("retryBudget"), "spec.retryBudget", ("ratio", "minRetriesPerSecond", "window")) or {}
    b = RetryBudget()
    budget = RetryBudget(c.number(rb.get("ratio"), "spec.retryBudget.ratio", 0, 10, b.ratio),
                         c.number(rb.get("minRetriesPerSecond"), "spec.retryBudget.minRetriesPerSecond", 0, 1e6,
                               b.min_per_second),
                         c.duration(rb.get("window"), "spec.retryBudget.window", b.window_s))
    health_checks = parse_health_checks(c, spec.get("healthChecks"))
    cp = c.mapping(spec.get("connectionPool"), "spec.connectionPool", ("idleTimeout",)) or {}
    idle = c.duration(cp.get("idleTimeout"), "spec.connectionPool.idleTimeout", 3600.0)
    if c.problems:
        return None
    return DestinationPolicy(name, namespace, svc, lb, cb, outlier, budget, KIND_DESTINATION_POLICY, labels,
                             tuple(sorted(spec.items())), health_checks=health_checks, idle_timeout_s=idle)


def parse(subject: str, kind: str, name: str, namespace: str, labels: tuple[tuple[str, str], ...],
          spec_raw: Any) -> tuple[HTTPRoute | DestinationPolicy | None, list[Problem]]:
    """Entry point used by nodemesh.model.parse_document for the kinds of this module."""
    c = FieldChecker(subject)
    obj: HTTPRoute | DestinationPolicy | None
    if kind == KIND_DESTINATION_POLICY:
        obj = _parse_policy(c, name, namespace, labels, spec_raw)
    else:
        obj = _parse_route(c, kind, name, namespace, labels, spec_raw)
    return obj, c.problems
