"""The mesh view: a web page served by the control plane (default
127.0.0.1:15014) with the service graph, a page per service with golden
metrics over time, and the current config, updated live by polling.

Data comes from the agents: each registry heartbeat carries a compact JSON
summary of the node's cumulative traffic per (source workload, destination
service, destination workload) edge (nodeagent.supervision.admin.summarize). MeshTelemetry
turns consecutive summaries into deltas as they arrive and keeps only bounded
aggregates (per edge, and a ring of 2 s buckets per service); a node that
leaves is forgotten. The API answers from those aggregates.

    /                 the page (static HTML + JS, no external assets)
    /api/graph        nodes (services, workloads) and edges with rates, success, p99, mTLS
    /api/service?name=<ns>/<name>   one service: config, edges, a time series
    /api/config       every stored config resource
    /api/proxystatus  every connected xDS client's sync state per type
    /metrics          the control plane's own Prometheus metrics
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import math
import time
import urllib.parse
from array import array
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from importlib import resources
from typing import Any

from controlplane.rollout.controller import summaries as rollout_summaries
from controlplane.web.login import MAX_LOGIN_BODY, NO_CONTENT, SECURITY_HEADERS, WebAuth, csp_for, header

log = logging.getLogger(__name__)

BUCKET_S = 2  # the series' resolution (seconds)
HISTORY_S = 600  # how far back a service's series goes (10 min)
HISTORY_BUCKETS = HISTORY_S // BUCKET_S
MAX_SUMMARY_BYTES = 256 * 1024
MAX_EDGES_PER_NODE = 2_000  # edges kept from one node's summary; the rest are dropped with a log line
MAX_SERIES = 5_000  # services with a series; a new one past this is not tracked (bounded memory)
MAX_GRAPH_EDGES = 2_000  # /api/graph shows the busiest this many (a graph of more is unreadable anyway)
MAX_SPREAD_S = 120.0  # a gap between two summaries longer than this is a restart, not traffic to spread
STALE_AFTER_S = 60.0
RATE_WINDOW_S = 10.0
SWEEP_EVERY_S = 10.0
READ_TIMEOUT_S = 5.0
EDGE_NUMBERS = ("requests", "errors", "tcp_opened", "tcp_closed", "tcp_failed", "bytes_sent", "bytes_received")
_REQ, _ERR, _OPENED, _CLOSED, _FAILED = 0, 1, 2, 3, 4

EdgeKey = tuple[str, str, str, str]  # (reporter, source workload, destination service key, destination workload)


class TelemetryError(ValueError):
    pass


def _edge_key(e: dict[str, Any]) -> EdgeKey:
    return (str(e.get("reporter", "")), str(e.get("source", "")), str(e.get("destination_service_key", "")),
            str(e.get("destination_workload", "")))


@dataclass(frozen=True, slots=True)
class _Sample:
    """One edge as a node last reported it: cumulative numbers and its current p99/mTLS."""

    numbers: tuple[float, ...]  # EDGE_NUMBERS order
    p99_ms: float | None
    mtls: frozenset[str]
    destination_service: str


@dataclass(slots=True)
class _NodeState:
    last_unix: float
    edges: dict[EdgeKey, _Sample]


class _Series:
    """A service's golden metrics over the last HISTORY_S, in BUCKET_S buckets on a
    fixed ring: requests, connections opened and errors counted into the buckets
    they happened in, and the highest p99 reported in each (-1: none)."""

    __slots__ = ("last_bucket", "last_t", "slots", "values")

    def __init__(self) -> None:
        self.slots = array("q", [-1]) * HISTORY_BUCKETS  # which bucket each ring slot holds now
        self.values = array("d", [0.0]) * (HISTORY_BUCKETS * 4)
        self.last_bucket = -1
        self.last_t = 0.0  # the newest time counted: the bucket holding it is only partly elapsed

    def _slot(self, bucket: int) -> int:
        i = bucket % HISTORY_BUCKETS
        if self.slots[i] != bucket:
            self.slots[i] = bucket
            self.values[i * 4:i * 4 + 4] = array("d", (0.0, 0.0, 0.0, -1.0))
        self.last_bucket = max(self.last_bucket, bucket)
        return i

    def add(self, t0: float, t1: float, requests: float, opened: float, errors: float, p99: float | None) -> None:
        """Counts that happened between t0 and t1, spread evenly over the buckets in between."""
        # A delta ending exactly on a bucket's start belongs to the bucket before.
        b1 = int((t1 - 1e-6) // BUCKET_S) if t1 > t0 else int(t1 // BUCKET_S)
        b0 = max(int(t0 // BUCKET_S), b1 - HISTORY_BUCKETS + 1)
        self.last_t = max(self.last_t, t1)
        span = max(t1 - t0, 1e-9)
        for b in range(b0, b1 + 1):
            lo, hi = max(t0, b * BUCKET_S), min(t1, (b + 1) * BUCKET_S)
            share = (hi - lo) / span if t1 > t0 else 1.0
            if share <= 0 and b != b1:
                continue
            i = self._slot(b) * 4
            self.values[i] += requests * share
            self.values[i + 1] += opened * share
            self.values[i + 2] += errors * share
        if p99 is not None:
            i = self._slot(b1) * 4
            self.values[i + 3] = max(self.values[i + 3], p99)

    def points(self, now: float) -> list[dict[str, Any]]:
        last = int(now // BUCKET_S)
        out = []
        for b in range(last - HISTORY_BUCKETS + 1, last + 1):
            i = b % HISTORY_BUCKETS
            if self.slots[i] != b:
                continue
            req, opened, err, p99 = self.values[i * 4:i * 4 + 4]
            width = float(BUCKET_S)
            if b == self.last_bucket and self.last_t > b * BUCKET_S:
                width = min(BUCKET_S, self.last_t - b * BUCKET_S)
            rr, cr, er = req / width, opened / width, err / width
            total = rr or cr
            out.append({"t": b * BUCKET_S, "request_rate": rr, "connection_rate": cr, "error_rate": er,
                        "p99_ms": None if p99 < 0 else p99,
                        "success_rate": round(1 - min(1.0, er / total), 4) if total else None})
        return out


@dataclass(slots=True)
class _EdgeAgg:
    """One edge across the nodes reporting it, with its recent deltas for rates."""

    nodes: set[str] = field(default_factory=set)
    # (t0, t1, requests, opened, errors) per summary of the last RATE_WINDOW_S, merged per bucket.
    recent: deque[list[float]] = field(default_factory=lambda: deque(maxlen=int(RATE_WINDOW_S // BUCKET_S) + 2))

    def add(self, t0: float, t1: float, requests: float, opened: float, errors: float) -> None:
        last = self.recent[-1] if self.recent else None
        if last is not None and int(last[1] // BUCKET_S) == int(t1 // BUCKET_S):
            last[0], last[1] = min(last[0], t0), max(last[1], t1)
            last[2] += requests
            last[3] += opened
            last[4] += errors
        else:
            self.recent.append([t0, t1, requests, opened, errors])

    def rates(self, now: float) -> tuple[float, float, float]:
        lo = now - RATE_WINDOW_S
        req = opened = err = 0.0
        t0, t1 = float("inf"), float("-inf")
        for r in self.recent:
            if r[1] > lo:
                req += r[2]
                opened += r[3]
                err += r[4]
                t0 = min(t0, r[0])
                t1 = max(t1, r[1])
        if t1 < t0:
            return 0.0, 0.0, 0.0
        span = max(1.0, t1 - t0)
        return req / span, opened / span, err / span


class MeshTelemetry:
    """What the agents reported, as bounded aggregates (pure, no I/O): per node only
    the latest sample of each of its edges (to turn the next cumulative summary
    into deltas), per edge its reporting nodes and the deltas of the last
    RATE_WINDOW_S, per service a fixed ring of BUCKET_S buckets over HISTORY_S.
    A node that leaves (forget(), or silent for STALE_AFTER_S) takes its samples
    and edges with it. Reads answer from these aggregates without touching summaries."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self.nodes: dict[str, _NodeState] = {}
        self._edges: dict[EdgeKey, _EdgeAgg] = {}
        self._by_service: dict[str, set[EdgeKey]] = {}
        # service -> (series from callers' reports, series from the service's own proxies)
        self._series: dict[str, tuple[_Series | None, _Series | None]] = {}
        self._series_refused = 0
        self._last_sweep = clock()
        self._warned_edges: set[str] = set()

    # ---------------------------------------------------------------- writes

    def ingest(self, node: str, text: str) -> None:
        """One heartbeat's summary; a malformed one is dropped with a log line naming the node."""
        try:
            summary = self.parse(text)
        except TelemetryError as e:
            log.warning("node %s sent a telemetry summary the mesh view cannot use: %s", node, e)
            return
        self.add(node, summary)

    def add(self, node: str, summary: dict[str, Any]) -> None:
        now = self._clock()
        state = self.nodes.get(node)
        prev_t = state.last_unix if state is not None else None
        old = state.edges if state is not None else {}
        edges: dict[EdgeKey, _Sample] = {}
        raw = summary.get("edges", [])
        if len(raw) > MAX_EDGES_PER_NODE and node not in self._warned_edges:
            self._warned_edges.add(node)
            log.warning("node %s reports %d edges; the mesh view keeps the first %d", node, len(raw),
                        MAX_EDGES_PER_NODE)
        for e in raw[:MAX_EDGES_PER_NODE]:
            k = _edge_key(e)
            p99 = e.get("p99_ms")
            edges[k] = sample = _Sample(tuple(float(e.get(f) or 0) for f in EDGE_NUMBERS),
                                        None if p99 is None else float(p99), frozenset(e.get("mtls") or ()),
                                        str(e.get("destination_service", "")))
            agg = self._edges.get(k)
            if agg is None:
                agg = self._edges[k] = _EdgeAgg()
                self._by_service.setdefault(k[2], set()).add(k)
            agg.nodes.add(node)
            p = old.get(k)
            if prev_t is None or now - prev_t > MAX_SPREAD_S or now <= prev_t:
                continue  # the first summary of a node (or after a long silence) is a baseline
            n0 = p.numbers if p is not None else (0.0,) * len(EDGE_NUMBERS)
            d = [max(0.0, a - b) for a, b in zip(sample.numbers, n0, strict=True)]  # went down: a restart
            if p is not None and any(a < b for a, b in zip(sample.numbers, n0, strict=True)):
                d = list(sample.numbers)
            errors = d[_ERR] + d[_FAILED]
            agg.add(prev_t, now, d[_REQ], d[_OPENED], errors)
            self._series_add(k, prev_t, now, d[_REQ], d[_OPENED], errors, sample.p99_ms)
        for k in old.keys() - edges.keys():
            self._drop_edge_node(k, node)
        self.nodes[node] = _NodeState(now, edges)
        if now - self._last_sweep >= SWEEP_EVERY_S:
            self.sweep()

    def _series_add(self, k: EdgeKey, t0: float, t1: float, req: float, opened: float, err: float,
                    p99: float | None) -> None:
        pair = self._series.get(k[2])
        if pair is None:
            if len(self._series) >= MAX_SERIES:
                self._series_refused += 1
                return
            pair = (None, None)
        which = 0 if k[0] == "source" else 1
        s = pair[which]
        if s is None:
            s = _Series()
            pair = (s, pair[1]) if which == 0 else (pair[0], s)
        self._series[k[2]] = pair
        s.add(t0, t1, req, opened, err, p99)

    def _drop_edge_node(self, k: EdgeKey, node: str) -> None:
        agg = self._edges.get(k)
        if agg is None:
            return
        agg.nodes.discard(node)
        if not agg.nodes:
            del self._edges[k]
            keys = self._by_service.get(k[2])
            if keys is not None:
                keys.discard(k)
                if not keys:
                    del self._by_service[k[2]]

    def forget(self, node: str) -> None:
        """The node left (its lease ran out, or it deregistered): drop what it reported.
        Service series keep the history it contributed (aggregated, not per node)."""
        state = self.nodes.pop(node, None)
        self._warned_edges.discard(node)
        if state is not None:
            for k in state.edges:
                self._drop_edge_node(k, node)

    def sweep(self) -> None:
        """Forget nodes silent for STALE_AFTER_S and series without data for HISTORY_S."""
        now = self._clock()
        self._last_sweep = now
        for n in [n for n, s in self.nodes.items() if now - s.last_unix > STALE_AFTER_S]:
            self.forget(n)
        oldest = int(now // BUCKET_S) - HISTORY_BUCKETS
        for svc in [svc for svc, pair in self._series.items()
                    if all(s is None or s.last_bucket <= oldest for s in pair)]:
            del self._series[svc]

    def size(self) -> dict[str, int]:
        """How much is kept (for tests and /metrics): nodes, node samples, edges, series."""
        return {"nodes": len(self.nodes), "samples": sum(len(s.edges) for s in self.nodes.values()),
                "edges": len(self._edges), "recent": sum(len(a.recent) for a in self._edges.values()),
                "series": len(self._series)}

    @staticmethod
    def parse(text: str) -> dict[str, Any]:
        if len(text) > MAX_SUMMARY_BYTES:
            raise TelemetryError(f"summary of {len(text)} bytes exceeds {MAX_SUMMARY_BYTES}")
        try:
            d = json.loads(text)
        except ValueError as err:
            raise TelemetryError(f"not JSON: {err}") from None
        if not isinstance(d, dict) or not isinstance(d.get("edges"), list):
            raise TelemetryError("expected an object with an 'edges' list")
        for i, e in enumerate(d["edges"]):
            if not isinstance(e, dict) or not isinstance(e.get("source"), str) \
                    or not isinstance(e.get("destination_service_key"), str):
                raise TelemetryError(f"edges[{i}] lacks source or destination_service_key")
            # JSON admits NaN, Infinity and negatives: each would poison every sum it enters.
            for f in (*EDGE_NUMBERS, "p99_ms"):
                v = e.get(f)
                if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)
                                      or not math.isfinite(v) or v < 0):
                    raise TelemetryError(f"edges[{i}].{f} is not a finite, non-negative number")
            mtls = e.get("mtls") or []
            if not isinstance(mtls, list) or not all(isinstance(m, str) for m in mtls):
                raise TelemetryError(f"edges[{i}].mtls is not a list of strings")
        return d

    # ---------------------------------------------------------------- reads

    def _edge_view(self, k: EdgeKey, agg: _EdgeAgg, now: float) -> dict[str, Any] | None:
        totals: Sequence[float] = [0.0] * len(EDGE_NUMBERS)
        p99: float | None = None
        mtls: set[str] | frozenset[str] = set()
        dest_service = ""
        nodes = []
        if len(agg.nodes) == 1:  # the usual edge: one reporting node, nothing to add up
            (n,) = agg.nodes
            st = self.nodes.get(n)
            s = st.edges.get(k) if st is not None and now - st.last_unix <= STALE_AFTER_S else None
            if s is None:
                return None
            totals, p99, mtls, dest_service, nodes = s.numbers, s.p99_ms, s.mtls, s.destination_service, [n]
        for n in sorted(agg.nodes) if not nodes else ():
            st = self.nodes.get(n)
            if st is None or now - st.last_unix > STALE_AFTER_S:
                continue
            s = st.edges.get(k)
            if s is None:
                continue
            nodes.append(n)
            totals = [a + b for a, b in zip(totals, s.numbers, strict=True)]
            if s.p99_ms is not None:
                p99 = max(p99 or 0.0, s.p99_ms)
            mtls = mtls | s.mtls
            dest_service = dest_service or s.destination_service
        if not nodes:
            return None
        rr, cr, er = agg.rates(now)
        req, errs, opened, closed, failed_tcp, sent, received = totals
        total = req or closed
        failed = errs if req else failed_tcp
        return {"reporter": k[0], "source": k[1], "service": k[2], "destination_workload": k[3],
                "destination_service": dest_service, "requests": req, "errors": errs, "tcp_opened": opened,
                "tcp_closed": closed, "tcp_failed": failed_tcp, "bytes_sent": sent, "bytes_received": received,
                "request_rate": rr, "connection_rate": cr, "error_rate": er, "p99_ms": p99,
                "mtls": sorted(mtls), "nodes": nodes, "success_rate": round(1 - failed / total, 4) if total else None}

    def edges(self, service: str | None = None) -> list[dict[str, Any]]:
        """Every current edge (or one service's), from the aggregates."""
        now = self._clock()
        keys = self._edges.keys() if service is None else self._by_service.get(service, set())
        out = []
        for k in list(keys):
            e = self._edge_view(k, self._edges[k], now)
            if e is not None:
                out.append(e)
        return out

    def reporting(self) -> list[str]:
        now = self._clock()
        return sorted(n for n, s in self.nodes.items() if now - s.last_unix <= STALE_AFTER_S)

    def graph(self, services: Iterable[str] = (), workloads: Iterable[str] = ()) -> dict[str, Any]:
        """Nodes: services ("svc:<ns>/<name>") and workloads ("wl:<ns>/<name>"). Edges:
        workload -> service as the caller's proxy saw it (reporter source), service ->
        workload as the callee's proxy saw it (reporter destination)."""
        nodes: dict[str, dict[str, Any]] = {}

        def node(kind: str, key: str) -> str:
            nid = f"{'svc' if kind == 'service' else 'wl'}:{key}"
            if nid not in nodes:
                nodes[nid] = {"id": nid, "kind": kind, "key": key, "name": key.split("/")[-1]}
            return nid

        for s in services:
            node("service", s)
        for w in workloads:
            node("workload", w)
        edges = []
        current = self.edges()
        if len(current) > MAX_GRAPH_EDGES:
            current = heapq.nlargest(MAX_GRAPH_EDGES, current,
                                     key=lambda e: (e["request_rate"] + e["connection_rate"], e["requests"]))
        for e in current:
            svc_known = not e["service"].endswith("/unknown") and e["service"] != "unknown/unknown"
            if e["reporter"] == "source":
                src = node("workload", e["source"])
                dst = node("service", e["service"]) if svc_known else node("workload", e["destination_workload"])
            else:
                src = node("service", e["service"]) if svc_known else node("workload", e["source"])
                dst = node("workload", e["destination_workload"])
            edges.append({**e, "caller": e["source"], "id": f"{src}->{dst}", "source": src, "target": dst})
        return {"time_unix": self._clock(), "nodes": sorted(nodes.values(), key=lambda n: n["id"]),
                "edges": sorted(edges, key=lambda e: e["id"]), "edges_total": len(self._edges),
                "edges_shown_max": MAX_GRAPH_EDGES}

    def service_series(self, service: str) -> list[dict[str, Any]]:
        """Golden metrics over time for one service: its callers' view, else its own."""
        now = self._clock()
        for s in self._series.get(service, (None, None)):
            if s is not None:
                points = s.points(now)
                if points:
                    return points
        return []


Response = tuple[int, str, bytes]


class MeshView:
    """The HTTP server; `cp` is controlplane.process.ControlPlane."""

    def __init__(self, cp: Any, telemetry: MeshTelemetry | None = None) -> None:
        self.cp = cp
        self.telemetry = telemetry or MeshTelemetry()
        self._server: asyncio.AbstractServer | None = None
        self.address = ""
        # The login, Host check and CSP (controlplane/web/login.py); hosts are set once bound.
        security = getattr(cp, "security", None)
        self.auth = WebAuth(security.operators.by_token if security is not None else (lambda _t: None), ())
        self.extra_hosts: tuple[str, ...] = tuple(getattr(getattr(cp, "settings", None), "web_hosts", ()) or ())
        page = resources.files(__package__).joinpath("index.html").read_bytes()
        self._csp_page, self._csp_login = csp_for(page), csp_for(WebAuth.login_page().replace(b"{error}", b""))

    async def start(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        try:
            self._server = await asyncio.start_server(self._handle, host or "127.0.0.1", int(port))
        except (OSError, ValueError) as e:
            log.error("cannot serve the mesh view on %s (%s): is the port free? (--web-listen)", listen, e)
            return
        h, p = self._server.sockets[0].getsockname()[:2]
        self.address = f"{h}:{p}"
        self.auth.hosts = WebAuth.hosts_for(h if ":" not in h else f"[{h}]", int(p), self.extra_hosts)
        log.info("mesh view on http://%s/ (control plane metrics on /metrics)", self.address)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            self._server = None

    # ---------------------------------------------------------------- data
    def services(self) -> list[dict[str, Any]]:
        res, _ = self.cp.store.list("Service")
        return [{"key": f"{r.namespace}/{r.name}", "spec": json.loads(r.spec_json),
                 "status": json.loads(r.status_json or "{}")} for r in res]

    def workloads(self) -> list[dict[str, Any]]:
        return [{"key": f"{w.namespace}/{w.name}", "node": n.name, "ip": w.ip,
                 "service_account": w.service_account, "labels": dict(w.labels)}
                for n in self.cp.registry.nodes() for w in n.workloads]

    def graph(self) -> dict[str, Any]:
        g = self.telemetry.graph([s["key"] for s in self.services()], [w["key"] for w in self.workloads()])
        g["reporting_nodes"] = self.telemetry.reporting()
        g["config_revision"] = self.cp.store.revision()
        g["rollouts"] = rollout_summaries(self.cp.store)  # docs/deployments.md
        return g

    def service(self, key: str) -> dict[str, Any] | None:
        """One service: its config (one store read), its edges and series (precomputed)."""
        ns, _, name = key.partition("/")
        r = self.cp.store.get("Service", ns, name) if ns and name else None
        if r is None:
            return None
        return {"key": key, "spec": json.loads(r.spec_json), "status": json.loads(r.status_json or "{}"),
                "edges": self.telemetry.edges(key), "series": self.telemetry.service_series(key)}

    def config(self) -> dict[str, Any]:
        res, rev = self.cp.store.list()
        return {"revision": rev, "resources": [
            {"kind": r.kind, "namespace": r.namespace, "name": r.name, "spec": json.loads(r.spec_json),
             "status": json.loads(r.status_json or "{}")} for r in res]}

    # ---------------------------------------------------------------- HTTP
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        extra = ""
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            status, ctype, body, extra = await self.guarded(head, reader)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            writer.close()
            return
        except Exception as e:  # one broken view must not stop the server
            log.exception("mesh view request failed")
            status, ctype, body = 500, "text/plain", f"internal error: {e!r}\n".encode()
        if "Content-Security-Policy:" not in extra:  # the page's own; nothing else may run anywhere
            extra += f"Content-Security-Policy: {self._csp_page if ctype.startswith('text/html') else NO_CONTENT}\r\n"
        writer.write(f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\nCache-Control: no-store\r\n"
                     f"{SECURITY_HEADERS}{extra}\r\n".encode() + body)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    async def guarded(self, head: bytes, reader: asyncio.StreamReader) -> tuple[int, str, bytes, str]:
        """Host check, login and session in front of dispatch(); returns the
        response and extra header lines."""
        if not self.auth.host_ok(head):
            # DNS rebinding: a page on another name must not read the mesh's config.
            return 421, "text/plain", (b"this server answers only for its own names (Host must be one of: "
                                       + ", ".join(sorted(self.auth.hosts)).encode()
                                       + b"); add more with controlplane serve --web-host\n"), ""
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        method, path = (parts[0], urllib.parse.urlsplit(parts[1]).path) if len(parts) == 3 else ("", "")
        login_csp = f"Content-Security-Policy: {self._csp_login}\r\n"
        if path == "/metrics":
            return (*self.dispatch(head), "")
        if path == "/login":
            if method == "POST":
                length = int(header(head, "content-length") or "0")
                if not self.auth.origin_ok(head):
                    return 403, "text/plain", b"cross-origin login refused\n", ""
                if length > MAX_LOGIN_BODY:
                    return 413, "text/plain", b"login body too large\n", ""
                body = await asyncio.wait_for(reader.readexactly(length), READ_TIMEOUT_S) if length else b""
                sid, why = self.auth.login(body)
                if sid is None:
                    log.warning("mesh view: a login was refused (%s)", why)
                    return 401, "text/html; charset=utf-8", WebAuth.login_page(why), login_csp
                log.info("mesh view: %s logged in", why)
                return 303, "text/plain", b"logged in\n", WebAuth.cookie(sid) + "Location: /\r\n"
            return 200, "text/html; charset=utf-8", WebAuth.login_page(), login_csp
        if self.auth.session(head) is None:
            if path in ("/", "/index.html"):
                return 303, "text/plain", b"log in first\n", "Location: /login\r\n"
            return 401, "application/json", json.dumps(
                {"error": "the mesh view needs a login: POST an operator token to /login"}).encode(), ""
        return (*self.dispatch(head), "")

    def dispatch(self, head: bytes) -> Response:
        parts = head.split(b"\r\n", 1)[0].decode("latin-1").split(" ")
        if len(parts) != 3:
            return 400, "text/plain", b"bad request line\n"
        if parts[0] not in ("GET", "HEAD"):
            return 405, "text/plain", b"the mesh view is read-only: use GET\n"
        url = urllib.parse.urlsplit(parts[1])
        q = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        path = url.path
        if path in ("/", "/index.html"):
            page = resources.files(__package__).joinpath("index.html").read_bytes()
            return 200, "text/html; charset=utf-8", page
        if path == "/api/graph":
            return self._json(self.graph())
        if path == "/api/service":
            svc = self.service(q.get("name", ""))
            if svc is None:
                return 404, "application/json", json.dumps(
                    {"error": f"no service {q.get('name', '')!r}: expected ?name=<namespace>/<name>"}).encode()
            return self._json(svc)
        if path == "/api/config":
            return self._json(self.config())
        if path == "/api/proxystatus":
            # Per xDS client and type: synced / stale / nacked with the reason (controlplane/xds/sync.py).
            return self._json({"summary": self.cp.ads.sync.summary(), "clients": self.cp.ads.sync.rows()})
        if path == "/metrics":
            text = self.cp.metrics.render(self.cp) if self.cp.metrics is not None else ""
            return 200, "text/plain; version=0.0.4; charset=utf-8", text.encode()
        return 404, "text/plain", (f"no such page {path}; try /, /api/graph, /api/config, /api/proxystatus, "
                                   "/metrics\n").encode()

    @staticmethod
    def _json(obj: Any) -> Response:
        return 200, "application/json", json.dumps(obj, default=str).encode()
