"""The proxy's telemetry: turns the facts a connection's Session gathered into
Istio-standard metrics, a span per hop (the trace context crosses nodes in the
HBONE CONNECT headers), the access log's extra fields and its sampling, and a
ring of recent connection summaries for `nodemesh tap/top/logs`.

One ProxyTelemetry per NodeProxy (one per worker process). The label logic is
the pure function `mesh_labels()`, tested without sockets.
"""

from __future__ import annotations

import os
import random
import time
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from nodeagent.meshview.snapshot import Snapshot
from nodeagent.observe import meshmetrics, tracing
from nodeagent.proxy.accesslog import iso_time
from nodeagent.proxy.relay import Session
from nodemesh.xdsnames import service_host

if TYPE_CHECKING:
    from nodeagent.observe.h2watch import H2Watch
    from nodeagent.observe.httpwatch import Exchange, ExchangeReport, Http1Watch
    from nodeagent.proxy.inbound import InboundTarget
    from nodeagent.proxy.proxy import NodeProxy
    from nodeagent.proxy.relay import TcpEnd

RECENT_MAX = 2000
BAGGAGE = "baggage"
# A connection that carried requests the proxy saw at L7 is reported as requests,
# not as a TCP connection (Istio: an HTTP listener reports istio_requests_*, a TCP
# one istio_tcp_*; never both for the same traffic).
L7_PROTOCOLS = frozenset({"http", "http2", "grpc"})
# Fields a destination-side request inherits from its tunnel's session.
_INHERITED = ("src", "source_principal", "source_workload", "dst_addr", "dst_workload", "dst_identity", "via",
              "tls")


@dataclass(slots=True)
class SessionTelemetry:
    """What telemetry keeps on one Session (`Session.telemetry`), set by begin()."""

    t0_unix: float  # wall-clock start, the span's start
    span: tracing.Span | None = None  # this hop's span (outbound: always; inbound: from the caller's context)
    # Inbound on an HTTP port: the watch of its exchanges, or the report of the guard that parses them.
    http_watch: Http1Watch | H2Watch | ExchangeReport | None = None
    http_requests: int = 0  # requests the watch saw on this connection
    labels: meshmetrics.MeshLabels | None = None  # the series opened() counted; closed() closes the same


def _state(session: Session) -> SessionTelemetry:
    st = session.telemetry
    if st is None:  # a session made without begin() (bare tests)
        st = session.telemetry = SessionTelemetry(time.time())
    return st


def l7_port_protocol(snapshot: Snapshot | None, port: int) -> str:
    """How a local workload port is observed on the destination side: "http"
    (nodeagent.observe.httpwatch), "http2" for http2/grpc ports (nodeagent.observe.h2watch), or ""."""
    if snapshot is None:
        return ""
    protos = {sp.protocol for svc in snapshot.services for sp in svc.ports if sp.target_port == port}
    if "http" in protos:
        return "http"
    return "http2" if protos & {"http2", "grpc"} else ""


def http_port(snapshot: Snapshot | None, port: int) -> bool:
    """Whether a local workload port is declared HTTP/1.1 by some service (the
    destination side observes it per request; http2/grpc stay TCP there, see docs)."""
    if snapshot is None:
        return False
    return any(sp.target_port == port and sp.protocol == "http" for svc in snapshot.services for sp in svc.ports)

# Stable reason codes (nodeagent/proxy/errors.py, inbound refusals) -> Envoy response flags.
RESPONSE_FLAGS: Mapping[str, str] = {
    "no_healthy_endpoint": "UH",
    "connect_timeout": "UF",
    "connect_refused": "UF",
    "upstream_connect_failed": "UF",
    "tls_handshake_failed": "UF",
    "stream_refused": "UF",
    "remote_protocol_error": "UPE",
    "local_protocol_error": "DPE",
    "bad_request": "DPE",
    "policy_denied": "NR",
    "unknown_destination": "NR",
    "unknown_source": "NR",
    "not_ready": "NC",
    "no_certificate": "UF",
    "peer_identity_mismatch": "UAEX",
    "identity_mismatch": "UAEX",
    "no_peer_identity": "UAEX",
    "downstream_gone": "DC",
    "timeout": "UT",
}


def response_flags(reason: str | None, error: str | None = None) -> str:
    if reason:
        return RESPONSE_FLAGS.get(reason, "UF" if "connect" in reason else "-")
    if error and "reset" in error:
        return "UC"  # the connection was reset mid-stream
    return "-"


def _split(key: str | None) -> tuple[str, str]:
    """'ns/name' -> (name, ns); unknown pieces stay 'unknown'."""
    if not key or "/" not in key:
        return (key or "unknown", "unknown")
    ns, name = key.split("/", 1)
    return name, ns


def parse_baggage(headers: Sequence[tuple[str, str]]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k, v in headers:
        if k.lower() != BAGGAGE:
            continue
        for member in v.split(","):
            kv = member.split(";", 1)[0].strip()
            if "=" in kv:
                a, b = kv.split("=", 1)
                out[a.strip()] = b.strip()
    return out


def _ns_of_principal(principal: str) -> str:
    parts = principal.split("/")
    return parts[parts.index("ns") + 1] if "ns" in parts and parts.index("ns") + 1 < len(parts) else ""


def _service_of_workload(snapshot: Snapshot, workload: str, port: int) -> str:
    """The one service with this workload's target port as an endpoint; '' if none or several."""
    found = {svc.key for svc in snapshot.services for sp in svc.ports for ep in sp.endpoints
             if ep.workload == workload and ep.port == port}
    return found.pop() if len(found) == 1 else ""


def _workload_of_principal(snapshot: Snapshot, principal: str) -> str:
    found = {w.key for w in snapshot.workloads if w.identity == principal}
    return found.pop() if len(found) == 1 else ""


def mesh_labels(fields: Mapping[str, Any], snapshot: Snapshot | None,
                peer_headers: Sequence[tuple[str, str]] = ()) -> meshmetrics.MeshLabels:
    """Istio labels for one connection from its access-log fields (pure)."""
    outbound = fields.get("direction") == "outbound"
    via = fields.get("via", "")
    src_key = fields.get("source_workload") or ""
    src_principal = fields.get("source_principal") or ""
    dst_key = fields.get("dst_workload") or ""
    svc_key = fields.get("dst_service") or ""
    # Baggage is believed only from callers with a verified identity (mTLS): a plaintext
    # caller has no principal and could name any workload or service in its headers.
    verified_ns = _ns_of_principal(src_principal)
    baggage = parse_baggage(peer_headers) if not outbound and verified_ns else {}
    if not outbound:
        # The caller's node names its workload and service in baggage; believe it only
        # as far as the verified identity allows (same namespace as the principal).
        claimed = baggage.get("k8s.namespace.name", "") + "/" + baggage.get("k8s.workload.name", "")
        if not src_key and baggage.get("k8s.workload.name") and baggage.get("k8s.namespace.name") == verified_ns:
            src_key = claimed
        if not src_key and snapshot is not None and src_principal:
            src_key = _workload_of_principal(snapshot, src_principal)
        if not svc_key and baggage.get("service.name") and snapshot is not None:
            cand = baggage["service.name"]
            if any(s.key == cand for s in snapshot.services):
                svc_key = cand
        if not svc_key and snapshot is not None and dst_key:
            port = str(fields.get("dst_addr", ":0")).rsplit(":", 1)[-1]
            svc_key = _service_of_workload(snapshot, dst_key, int(port) if port.isdigit() else 0)
    src_name, src_ns = _split(src_key or None)
    dst_name, dst_ns = _split(dst_key or None)
    if svc_key:
        svc_name, svc_ns = _split(svc_key)
        domain = snapshot.mesh.dns_domain if snapshot is not None else "mesh"
        svc = service_host(svc_name, svc_ns, domain)
    elif via == "passthrough":
        svc = svc_name = "PassthroughCluster"
        svc_ns = "unknown"
    else:
        svc = svc_name = svc_ns = "unknown"
    if via == "hbone" or fields.get("tls") is True:
        security = "mutual_tls"
    elif via in ("passthrough", "plaintext", "same-node") or fields.get("tls") is False:
        security = "none"
    else:
        security = "unknown"  # refused before a path was chosen
    return meshmetrics.MeshLabels(
        reporter="source" if outbound else "destination",
        source_workload=src_name, source_workload_namespace=src_ns,
        source_principal=src_principal or "unknown",
        destination_workload=dst_name, destination_workload_namespace=dst_ns,
        destination_principal=fields.get("dst_identity") or "unknown",
        destination_service=svc, destination_service_name=svc_name, destination_service_namespace=svc_ns,
        request_protocol="tcp",
        response_flags=response_flags(fields.get("reason"), fields.get("error")),
        connection_security_policy=security,
    )


LABEL_CACHE_MAX = 4096


def _iso(t: float) -> str:
    return iso_time(t)  # the seconds part is cached (nodeagent/proxy/accesslog.py)


class ProxyTelemetry:
    """The Session observer (nodeagent.proxy.relay.Session.observer)."""

    def __init__(self, proxy: NodeProxy, *, rng: random.Random | None = None) -> None:
        self._proxy = proxy
        s = proxy.settings
        self.exporter = tracing.exporter_for(s.tracing, service_name=f"nodemesh-proxy.{s.node_name}")
        self.trace_sampling = s.trace_sampling
        self.log_sampling = s.access_log_sampling
        self._rng = rng or random.Random()
        self.recent: deque[dict[str, Any]] = deque(maxlen=RECENT_MAX)
        self.seq = 0
        # mesh_labels() per distinct input, for the snapshot it was computed with: a
        # request's labels are a dict lookup, not a rebuild (the inputs are mesh names,
        # bounded by the config; trace headers are not part of the key).
        self._labels_for: Snapshot | None = None
        self._labels: dict[tuple[Any, ...], meshmetrics.MeshLabels] = {}

    # -- session hooks --
    @staticmethod
    def is_request(session: Session) -> bool:
        """The HTTP proxy (nodeagent/proxy/http) opens one Session per request, with its method."""
        return "method" in session.fields

    def begin(self, session: Session) -> None:
        direction = session.fields.get("direction", "")
        if not self.is_request(session):
            meshmetrics.PROXY_ACTIVE.inc({"direction": direction})
        st = session.telemetry = SessionTelemetry(time.time())
        if direction == "outbound" and not self.is_request(session):
            # Every outbound connection roots a trace (L4 has no headers to read);
            # the ID also ties both nodes' access log lines together. A request's span
            # waits for its headers (request_headers): a caller's trace decides then.
            st.span = tracing.start_span(None, "outbound", "client", sampled=self._sampled())

    def _sampled(self) -> bool:
        """A new trace's sampling decision (traceSampling), made before its span exists."""
        return self.trace_sampling >= 1.0 or self._rng.random() < self.trace_sampling

    def connect_headers(self, session: Session) -> tuple[tuple[str, str], ...]:
        span = _state(session).span
        out: list[tuple[str, str]] = []
        if span is not None:
            out += tracing.inject(span.context)
        f = session.fields
        bag = []
        name, ns = _split(f.get("source_workload"))
        if ns != "unknown":
            bag += [f"k8s.namespace.name={ns}", f"k8s.workload.name={name}"]
        if f.get("dst_service"):
            bag.append(f"service.name={f['dst_service']}")
        if bag:
            out.append((BAGGAGE, ",".join(bag)))
        return tuple(out)

    def request_headers(self, session: Session, headers: Sequence[tuple[str, str]]) -> list[tuple[str, str]]:
        """For the HTTP proxy: make this request's span a child of the caller's trace
        (W3C or B3 in `headers`) and return the headers to forward upstream instead
        of the incoming trace headers (see tracing.replace_trace_headers)."""
        parent = tracing.extract(headers)
        st = _state(session)
        if parent is not None:
            span = st.span = tracing.start_span(parent, "outbound", "client")
        else:
            span = st.span = st.span or tracing.start_span(None, "outbound", "client", sampled=self._sampled())
        ctx = tracing.TraceContext(span.trace_id, span.span_id, span.sampled,
                                   parent.tracestate if parent else "", parent.b3 if parent else False)
        return tracing.inject(ctx)

    # -- destination side: per-request observation of HTTP ports --
    def workload_end(self, session: Session, end: TcpEnd, target: InboundTarget) -> None:
        """Called by connect_local for the end towards a local workload: on an HTTP
        port of an inbound connection, watch the exchange (nodeagent.observe.httpwatch)."""
        if session.fields.get("direction") != "inbound":
            return
        kind = l7_port_protocol(self._proxy.snapshot, target.port)
        if not kind:
            return
        from nodeagent.observe.h2watch import H2Watch
        from nodeagent.observe.httpwatch import Http1Watch

        watch: Http1Watch | H2Watch = (Http1Watch if kind == "http" else H2Watch)(
            lambda ex: self._dest_request_start(session, ex), lambda ex: self._dest_request_done(ex))
        end.tap = watch
        # A server may speak first (an HTTP/2 server sends its SETTINGS on accept):
        # bytes read before the tap was set wait in the end's early buffer, unseen.
        for chunk in getattr(end, "_early", ()):
            watch.response(chunk)
        st = _state(session)
        st.http_watch = watch
        st.http_requests = 0

    def guard_parses(self, session: Session, end: TcpEnd) -> ExchangeReport | None:
        """Called when a policy guard (nodeagent/proxy/authz_l7.py) is put in front
        of the workload's end: the guard parses every request and response anyway,
        so the watch comes off the end and the guard reports its exchanges through
        the returned report (one parse per node). None when nothing watches `end`."""
        st = session.telemetry
        if st is None or st.http_watch is None or end.tap is not st.http_watch:
            return None
        from nodeagent.observe.httpwatch import ExchangeReport

        end.tap = None
        report = ExchangeReport(lambda ex: self._dest_request_start(session, ex), self._dest_request_done)
        st.http_watch = report
        return report

    def _dest_request_start(self, conn: Session, ex: Exchange) -> None:
        f = conn.fields
        req = self._proxy.new_session("inbound", method=ex.method, path=ex.target,
                                      protocol="grpc" if ex.grpc else str(ex.extra.get("protocol", "http")),
                                      **{k: f[k] for k in _INHERITED if k in f})
        if ex.extra.get("authority"):  # HTTP/2 (nodeagent/observe/h2watch.py): for the access log only, never a label
            req.set(authority=ex.extra["authority"])
        # The request's own trace context first (the caller's proxy put its span
        # there), then the tunnel's baggage (caller workload and service).
        # Baggage only from the tunnel (the calling node), never from the request itself.
        req.peer_headers = tuple(h for h in ex.trace_headers if h[0].lower() != BAGGAGE) + tuple(conn.peer_headers)
        ex.extra["session"] = req
        _state(conn).http_requests += 1

    def _dest_request_done(self, ex: Exchange) -> None:
        req = ex.extra.get("session")
        if not isinstance(req, Session):
            return
        req.set(status=ex.status, request_bytes=ex.request_bytes, response_bytes=ex.response_bytes, attempts=1)
        if ex.grpc_status:
            req.set(grpc_status=ex.grpc_status)
        if "reset" in ex.extra:  # an HTTP/2 stream reset (nodeagent/observe/h2watch.py): response flag UC
            req.set(error=f"stream reset by the {ex.extra.get('reset_by')} (HTTP/2 error code {ex.extra['reset']})")
        elif not ex.complete and ex.status == 0:
            why = ex.extra.get("abandoned")  # the HTTP/2 watch stopped following the connection
            req.fail("downstream_gone", f"not followed to the end: the HTTP/2 watch stopped ({why})" if why
                     else "the connection ended before the workload answered")
        req.finish()

    def labels_of(self, session: Session) -> meshmetrics.MeshLabels:
        """mesh_labels() of a session, memoized on the fields it reads."""
        f = session.fields
        snap = self._proxy.snapshot
        if snap is not self._labels_for or len(self._labels) >= LABEL_CACHE_MAX:
            self._labels.clear()
            self._labels_for = snap
        ph = session.peer_headers
        error = f.get("error")
        key = (f.get("direction"), f.get("via"), f.get("source_workload"), f.get("source_principal"),
               f.get("dst_workload"), f.get("dst_service"), f.get("dst_identity"), f.get("dst_addr"), f.get("tls"),
               f.get("reason"), bool(error and "reset" in error),
               tuple(v for k, v in ph if k.lower() == BAGGAGE) if ph else ())
        got = self._labels.get(key)
        if got is None:
            got = self._labels[key] = mesh_labels(f, snap, ph)
        return got

    def opened(self, session: Session) -> None:
        st = _state(session)
        if st.http_watch is not None:
            return  # decided at close: requests, or a TCP connection if none was seen
        if self.is_request(session):
            return
        labels = self.labels_of(session)
        st.labels = labels  # closed() uses the same series
        meshmetrics.tcp_opened(labels)

    def closed(self, session: Session, rec: dict[str, Any]) -> bool:
        """Record metrics and the span, enrich the log record; False = sampled out of the log."""
        f = session.fields
        direction = f.get("direction", "")
        final = self.labels_of(session)
        if self.is_request(session):
            return self._request_closed(session, final, rec)
        meshmetrics.PROXY_ACTIVE.inc({"direction": direction}, -1.0)
        st = _state(session)
        watch = st.http_watch
        if watch is not None:
            watch.close()
        reason = f.get("reason")
        if reason:
            meshmetrics.PROXY_ERRORS.inc({"direction": direction, "reason": reason})
        if ((f.get("protocol") in L7_PROTOCOLS and not reason) or st.http_requests
                or getattr(watch, "is_l7", False)):  # HTTP/2 seen (h2watch), even if it carried no request
            # Its requests were counted one by one: no TCP series for the same traffic.
            return self._finish_record(session, final, rec, export_span=False)
        labels = st.labels
        if labels is None:
            meshmetrics.tcp_opened(final)  # refused or failed before it was joined: still a connection
            labels = final
        elif labels.response_flags != final.response_flags:
            labels = final  # an error at the end (a reset): the closing series says so
        sent, received = int(rec.get("bytes_sent", 0)), int(rec.get("bytes_received", 0))
        meshmetrics.tcp_closed(labels, sent, received)
        return self._finish_record(session, labels, rec)

    def _request_closed(self, session: Session, labels: meshmetrics.MeshLabels, rec: dict[str, Any]) -> bool:
        f = session.fields
        code = int(f.get("status") or f.get("response_code") or 0)
        if labels.response_flags == "-" and not code:
            labels = replace(labels, response_flags="DC")  # no response at all: the caller went away
        meshmetrics.record_request(labels, response_code=code, duration_ms=float(rec.get("duration_ms", 0.0)),
                               request_bytes=int(f.get("request_bytes", 0) or 0),
                               response_bytes=int(f.get("response_bytes", 0) or 0),
                               grpc_response_status=str(f.get("grpc_status", "") or ""),
                               request_protocol=str(f.get("protocol", "http")))
        rec.setdefault("response_code", code)
        rec["bytes_sent"] = int(f.get("request_bytes", 0) or 0)  # body bytes, as in istio_request_bytes
        rec["bytes_received"] = int(f.get("response_bytes", 0) or 0)
        return self._finish_record(session, labels, rec)

    def _finish_record(self, session: Session, labels: meshmetrics.MeshLabels, rec: dict[str, Any],
                       export_span: bool = True) -> bool:
        f = session.fields
        direction = f.get("direction", "")
        reason = f.get("reason")
        # Access log fields of issue 6 (added beside the existing ones).
        now = time.time()
        rec["end"] = _iso(now)
        rec["reporter"] = labels.reporter
        rec["source_workload_name"] = labels.source_workload
        rec["source_namespace"] = labels.source_workload_namespace
        rec["destination_service"] = labels.destination_service
        rec["route"] = f.get("route", "")
        rec["attempts"] = f.get("attempts", 1 if direction == "outbound" and f.get("endpoint") else 0)
        rec.setdefault("response_code", f.get("response_code"))
        rec["response_flags"] = labels.response_flags
        rec["error_reason"] = reason or ""
        rec["connection_security_policy"] = labels.connection_security_policy
        span = self._span(session, labels, rec, now, export=export_span)
        if span is not None:
            rec["trace_id"] = span.trace_id
            rec["span_id"] = span.span_id
        self.seq += 1
        summary = dict(rec)
        summary["seq"] = self.seq
        summary["pid"] = os.getpid()
        summary["end_unix"] = now
        self.recent.append(summary)
        if reason or rec.get("error"):
            return True  # errors are always logged, whatever the sampling
        return self.log_sampling >= 1.0 or self._rng.random() < self.log_sampling

    def _span(self, session: Session, labels: meshmetrics.MeshLabels, rec: Mapping[str, Any],
              now: float, export: bool = True) -> tracing.Span | None:
        f = session.fields
        st = _state(session)
        span = st.span
        if span is None:
            parent = tracing.extract(session.peer_headers) if session.peer_headers else None
            if parent is None and f.get("direction") != "outbound":
                # Same-node inbound: the outbound session in this process is the parent.
                return None
            # (An outbound request answered before its headers were read roots its own trace.)
            span = tracing.start_span(parent, "inbound", "server", sampled=None if parent else self._sampled())
        if not span.sampled:
            # Sampled out (traceSampling, default 1%): only its IDs are used (the access
            # log line); building attributes nobody exports is per-request waste.
            return span
        span.start_unix_ns = int(st.t0_unix * 1e9)
        span.name = f"{f.get('direction', 'tcp')} {labels.destination_service}"
        span.attributes.update({
            # The reporting proxy's node (an outbound line names the peer's as "upstream_node").
            "nodemesh.node": self._proxy.settings.node_name,
            "nodemesh.direction": f.get("direction", ""),
            "nodemesh.via": f.get("via", ""),
            "nodemesh.reporter": labels.reporter,
            "source.workload": f"{labels.source_workload_namespace}/{labels.source_workload}",
            "source.principal": labels.source_principal,
            "destination.workload": f"{labels.destination_workload_namespace}/{labels.destination_workload}",
            "destination.principal": labels.destination_principal,
            "destination.service": labels.destination_service,
            "net.peer.address": str(f.get("endpoint") or f.get("dst_addr") or ""),
            "nodemesh.bytes_sent": int(rec.get("bytes_sent", 0)),
            "nodemesh.bytes_received": int(rec.get("bytes_received", 0)),
            "nodemesh.response_flags": labels.response_flags,
            "nodemesh.connection_security_policy": labels.connection_security_policy,
        })
        if self.is_request(session):
            span.name = f"{f.get('direction', 'http')} {f.get('method', '')} {labels.destination_service}"
            span.attributes.update({
                "http.request.method": str(f.get("method", "")),
                "http.response.status_code": int(rec.get("response_code") or 0),
                "nodemesh.route": str(f.get("route", "")),
                "nodemesh.attempts": int(rec.get("attempts") or 0),
            })
            if f.get("grpc_status") not in (None, ""):
                span.attributes["rpc.grpc.status_code"] = int(f["grpc_status"])
        reason = f.get("reason")
        code = int(rec.get("response_code") or 0) if self.is_request(session) else 0
        tracing.finish_span(span, status="error" if reason or code >= 500 else "ok",
                            message=str(f.get("error", reason or "")), now_ns=int(now * 1e9))
        if export:
            self.exporter.export(span)
        return span

    def close(self) -> None:
        self.exporter.close()


def worker_stats(proxy: NodeProxy, index: int, request: Any) -> dict[str, Any]:
    """Answer to the agent's "stats" control message: this worker's metrics,
    balancer state and the connection summaries after `request['since']`."""
    tel: ProxyTelemetry | None = getattr(proxy, "telemetry", None)
    since = int(request.get("since", 0)) if isinstance(request, dict) else 0
    recent = [r for r in tel.recent if r["seq"] > since] if tel is not None else []
    bal = getattr(proxy.balancer, "_stats", {})
    l7 = l7_state(proxy)
    return {
        "id": request.get("id", -1) if isinstance(request, dict) else -1,
        "index": index,
        "pid": os.getpid(),
        "snapshot_version": proxy.snapshot.version if proxy.snapshot is not None else "",
        "metrics": meshmetrics.REGISTRY.collect(),
        "balancer": [{"address": f"{ip}:{port}", "ewma_ms": round(st.ewma_s * 1000, 3),
                      "outstanding": st.outstanding, "measured": st.measured}
                     for (ip, port), st in list(bal.items())],
        "l7": l7,
        "recent": recent[-500:],
        "seq": tel.seq if tel is not None else 0,
    }


def l7_state(proxy: NodeProxy) -> list[dict[str, Any]]:
    """This worker's L7 destinations (breaker slots, ejected endpoints, retry
    budget), and the scrape-time gauges made from them: an ejection ends by the
    clock, not by an event, so the gauges are set here rather than on change."""
    from nodeagent.proxy.http.breaker import KINDS
    from nodeagent.proxy.http.pipeline import L7Runtime

    for fam in (meshmetrics.BREAKER_OPEN, meshmetrics.BREAKER_ACTIVE, meshmetrics.OUTLIER_EJECTED):
        fam.clear()
    rt: L7Runtime | None = getattr(proxy, "l7", None)
    out: list[dict[str, Any]] = []
    for cluster, dest in list(rt.dests.items() if rt is not None else ()):
        svc = meshmetrics.service_of_cluster(cluster)
        br = dest.breaker
        meshmetrics.BREAKER_OPEN.set({"destination_service": svc}, 1 if br.open else 0)
        for kind in KINDS:
            meshmetrics.BREAKER_ACTIVE.set({"destination_service": svc, "kind": kind}, getattr(br, kind))
        ejected: list[str] = []
        det = dest.outlier
        if det is not None:
            for key in list(det._st):
                if det.is_ejected(key):
                    ejected.append(f"{key[0]}:{key[1]}")
                    meshmetrics.OUTLIER_EJECTED.set({"destination_service": svc, "endpoint": ejected[-1]}, 1)
        out.append({"cluster": cluster, "breaker_open": br.open, "breaker_overflows": br.overflows,
                    "breaker": {k: getattr(br, k) for k in KINDS}, "ejected": ejected,
                    "ejections": det.ejections if det is not None else 0,
                    "retry_budget_refused": dest.budget.refused})
    return out
