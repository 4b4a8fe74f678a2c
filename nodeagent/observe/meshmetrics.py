"""The mesh's metric families under Istio's standard names and labels, so
existing dashboards work unchanged, and the functions the proxy calls
(`tcp_opened`, `tcp_closed`, `record_request`), on nodemesh.prom's registry.

Every proxy worker process keeps its own REGISTRY; the agent's admin endpoint
asks each worker for `REGISTRY.collect()` over the control channel and merges
the pieces (nodemesh.prom.merge) before rendering. Label values are mesh names
(workloads, services, identities, response codes), never request IDs or paths.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

from nodemesh.prom import (
    BYTES_BUCKETS,
    DURATION_BUCKETS_MS,
    Child,
    FamilyData,
    LabelKey,
    MetricError,
    Registry,
    merge,
    parse,
    render,
    select,
)

__all__ = [  # re-exported from nodemesh.prom for the agent's code and tests
    "AGENT_REGISTRY",
    "BYTES_BUCKETS",
    "DURATION_BUCKETS_MS",
    "REGISTRY",
    "REQUEST_LABELS",
    "TCP_LABELS",
    "FamilyData",
    "LabelKey",
    "MeshLabels",
    "MetricError",
    "Registry",
    "breaker_overflow",
    "http_edge_refused",
    "merge",
    "outlier_ejected",
    "parse",
    "record_request",
    "render",
    "retry",
    "retry_stopped",
    "select",
    "service_of_cluster",
    "tcp_closed",
    "tcp_opened",
]


@dataclass(frozen=True)
class MeshLabels:
    """Istio's standard labels for one connection or request (bounded values only)."""

    reporter: str = "source"  # "source" on the outbound proxy, "destination" on the inbound one
    source_workload: str = "unknown"
    source_workload_namespace: str = "unknown"
    source_principal: str = "unknown"
    destination_workload: str = "unknown"
    destination_workload_namespace: str = "unknown"
    destination_principal: str = "unknown"
    destination_service: str = "unknown"
    destination_service_name: str = "unknown"
    destination_service_namespace: str = "unknown"
    request_protocol: str = "tcp"
    response_flags: str = "-"
    connection_security_policy: str = "unknown"

    def as_dict(self) -> dict[str, str]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


TCP_LABELS: LabelKey = tuple(f.name for f in fields(MeshLabels))
REQUEST_LABELS: LabelKey = (*TCP_LABELS, "response_code", "grpc_response_status")

REGISTRY = Registry()

TCP_OPENED = REGISTRY.counter("istio_tcp_connections_opened_total", "TCP connections opened.", TCP_LABELS)
TCP_CLOSED = REGISTRY.counter("istio_tcp_connections_closed_total", "TCP connections closed.", TCP_LABELS)
TCP_SENT = REGISTRY.counter("istio_tcp_sent_bytes_total",
                            "Bytes sent towards the destination (request direction) on TCP connections.",
                            TCP_LABELS)
TCP_RECEIVED = REGISTRY.counter("istio_tcp_received_bytes_total",
                                "Bytes received from the destination (response direction) on TCP connections.",
                                TCP_LABELS)
REQUESTS = REGISTRY.counter("istio_requests_total", "Requests handled.", REQUEST_LABELS)
REQUEST_DURATION = REGISTRY.histogram("istio_request_duration_milliseconds", "Request duration in milliseconds.",
                                      REQUEST_LABELS, buckets=DURATION_BUCKETS_MS)
REQUEST_BYTES = REGISTRY.histogram("istio_request_bytes", "Request body size in bytes.", REQUEST_LABELS,
                                   buckets=BYTES_BUCKETS)
RESPONSE_BYTES = REGISTRY.histogram("istio_response_bytes", "Response body size in bytes.", REQUEST_LABELS,
                                    buckets=BYTES_BUCKETS)

# nodemesh's own data-plane families, fed by the L7 pipeline (nodeagent/proxy/http/pipeline.py,
# h1stack.py, h2stack.py) through the functions below. `destination_service` is the service host
# (from the cluster name), never an address: bounded by the mesh config.
RETRIES = REGISTRY.counter("nodemesh_retries_total", "Request retries attempted, by what the previous try got.",
                           ("destination_service", "reason"))
RETRY_BUDGET_EXHAUSTED = REGISTRY.counter("nodemesh_retry_budget_exhausted_total",
                                          "Retries refused because the retry budget was spent.",
                                          ("destination_service",))
RETRIES_STOPPED = REGISTRY.counter("nodemesh_retries_stopped_total",
                                   "Retries a policy allowed but did not make (budget, deadline, max_retries).",
                                   ("destination_service", "reason"))
BREAKER_OPEN = REGISTRY.gauge("nodemesh_circuit_breaker_open",
                              "1 while a service's circuit breaker refuses new requests (at scrape time).",
                              ("destination_service",), merge="max")
BREAKER_ACTIVE = REGISTRY.gauge("nodemesh_circuit_breaker_active",
                                "Slots in use per breaker kind (connections, pending, requests, retries).",
                                ("destination_service", "kind"))
BREAKER_OVERFLOWS = REGISTRY.counter("nodemesh_circuit_breaker_overflows_total",
                                     "Requests or tries refused by a circuit breaker, by the limit reached.",
                                     ("destination_service", "limit"))
OUTLIER_EJECTED = REGISTRY.gauge("nodemesh_outlier_ejected",
                                 "1 while an endpoint is ejected by outlier detection (at scrape time).",
                                 ("destination_service", "endpoint"), merge="max")
OUTLIER_EJECTIONS = REGISTRY.counter("nodemesh_outlier_ejections_total", "Endpoint ejections.",
                                     ("destination_service", "reason"))
HTTP_EDGE_REFUSED = REGISTRY.counter("nodemesh_http_edge_refused_total",
                                     "Requests or connections an HTTP edge refused (malformed, over a limit, "
                                     "timed out), by side and reason.", ("side", "status", "reason"))

# Families of the agent process itself (health checks, capture watchdog), merged
# by the admin endpoint beside the workers' registries.
AGENT_REGISTRY = Registry()
HEALTH_CHECKS = AGENT_REGISTRY.counter("nodemesh_health_checks_total", "Active health check results.",
                                       ("destination_service", "result"))
ENDPOINT_HEALTHY = AGENT_REGISTRY.gauge("nodemesh_endpoint_healthy",
                                        "Active health check verdict of a local endpoint (1 healthy, 0 not).",
                                        ("destination_service", "workload"))
CAPTURE_BYPASSED = AGENT_REGISTRY.counter(
    "nodemesh_capture_bypassed_connections_total",
    "Connections of declared workloads that were not proxied, counted by the capture backend "
    "(eBPF kernel counters: fail-open bypass, excluded ranges).", ("reason",))
CAPTURE_PROXY_STATE = AGENT_REGISTRY.gauge("nodemesh_capture_proxy_state",
                                           "1 for the capture watchdog's current state (serving, bypass, refuse).",
                                           ("state",))
CAPTURE_DOWN_WINDOWS = AGENT_REGISTRY.counter("nodemesh_capture_proxy_down_windows_total",
                                              "Windows in which the proxy did not listen and capture was switched "
                                              "to bypass (failurePolicy open) or refuse (closed).")
CAPTURE_DOWN_SECONDS = AGENT_REGISTRY.counter("nodemesh_capture_proxy_down_seconds_total",
                                              "Seconds spent in proxy-down windows.")
PROXY_ACTIVE = REGISTRY.gauge("nodemesh_proxy_active_connections", "Connections open in the proxy now.",
                              ("direction",))
PROXY_ERRORS = REGISTRY.counter("nodemesh_proxy_connection_errors_total",
                                "Connections that ended with an error, by stable reason code.",
                                ("direction", "reason"))


def tcp_opened(labels: MeshLabels) -> None:
    TCP_OPENED.inc(labels.as_dict())


def tcp_closed(labels: MeshLabels, sent_bytes: int, received_bytes: int) -> None:
    d = labels.as_dict()
    TCP_CLOSED.inc(d)
    TCP_SENT.inc(d, float(sent_bytes))
    TCP_RECEIVED.inc(d, float(received_bytes))


class RequestSeries:
    """The four request families' series per label set, resolved once: a request's
    metrics are then four updates, not four label lookups (label sets are bounded
    by the mesh config, so this is bounded too; it is emptied past MAX entries)."""

    MAX = 4096

    def __init__(self) -> None:
        self._by: dict[tuple[MeshLabels, str, int, str], tuple[Child, Child, Child, Child] | None] = {}

    def record(self, labels: MeshLabels, request_protocol: str, response_code: int, grpc_response_status: str,
               duration_ms: float, request_bytes: int, response_bytes: int) -> None:
        key = (labels, request_protocol, response_code, grpc_response_status)
        got = self._by.get(key)
        if got is None and key not in self._by:
            if len(self._by) >= self.MAX:
                self._by.clear()
            d = replace(labels, request_protocol=request_protocol).as_dict()
            d["response_code"] = str(int(response_code))
            d["grpc_response_status"] = grpc_response_status
            r, du, rq, rs = (REQUESTS.child(d), REQUEST_DURATION.child(d), REQUEST_BYTES.child(d),
                             RESPONSE_BYTES.child(d))
            got = self._by[key] = (r, du, rq, rs) if r and du and rq and rs else None
        if got is None:  # over a family's series limit: dropped (and counted) like inc() would
            REQUESTS.inc(replace(labels, request_protocol=request_protocol).as_dict()
                         | {"response_code": str(int(response_code)), "grpc_response_status": grpc_response_status})
            return
        requests, duration, req_bytes, resp_bytes = got
        requests.inc()
        duration.observe(float(duration_ms))
        req_bytes.observe(float(request_bytes))
        resp_bytes.observe(float(response_bytes))


_REQUEST_SERIES = RequestSeries()


def record_request(labels: MeshLabels, *, response_code: int, duration_ms: float, request_bytes: int = 0,
                   response_bytes: int = 0, grpc_response_status: str = "", request_protocol: str = "http") -> None:
    """One finished HTTP/gRPC request, for the L7 proxy to call once per request
    (after the last retry; retries themselves count in nodemesh_retries_total).
    `labels` is the connection's MeshLabels; response_code 0 means no response."""
    _REQUEST_SERIES.record(labels, request_protocol, int(response_code), grpc_response_status, duration_ms,
                           request_bytes, response_bytes)


def service_of_cluster(cluster: str) -> str:
    """'outbound|80||web.default.svc.mesh' -> 'web.default.svc.mesh' (the label value)."""
    return cluster.rsplit("|", 1)[-1] if cluster else "unknown"


def retry(cluster: str, reason: str) -> None:
    """A retry is about to be made; `reason` is what the previous try got (bounded:
    a status class, connect_failure, reset, timeout or a gRPC code name)."""
    RETRIES.inc({"destination_service": service_of_cluster(cluster), "reason": reason})


def retry_stopped(cluster: str, reason: str) -> None:
    svc = service_of_cluster(cluster)
    RETRIES_STOPPED.inc({"destination_service": svc, "reason": reason})
    if reason == "budget":
        RETRY_BUDGET_EXHAUSTED.inc({"destination_service": svc})


def breaker_overflow(cluster: str, limit: str) -> None:
    BREAKER_OVERFLOWS.inc({"destination_service": service_of_cluster(cluster), "limit": limit})


def http_edge_refused(side: str, status: int, reason: str) -> None:
    """side: "outbound" (the sending node's L7 listener) or "inbound" (the receiving
    node's guard); reason: a stable code from nodeagent/proxy/http/h1.py (bounded)."""
    HTTP_EDGE_REFUSED.inc({"side": side, "status": str(status), "reason": reason})


def outlier_ejected(cluster: str, reason: str) -> None:
    OUTLIER_EJECTIONS.inc({"destination_service": service_of_cluster(cluster), "reason": reason})


def outcome_reason(status: int, grpc_status: int | None, *, connect_failure: bool = False, reset: bool = False,
                   timeout: bool = False) -> str:
    """A bounded name for how a try ended (the retry and ejection reason label)."""
    if connect_failure:
        return "connect_failure"
    if reset:
        return "reset"
    if timeout:
        return "timeout"
    if grpc_status not in (None, 0):
        return f"grpc_{grpc_status}"
    return str(status) if status in (500, 502, 503, 504) else f"{status // 100}xx" if status else "none"
