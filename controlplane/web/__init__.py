"""The mesh view: a web page served by the control plane (default
127.0.0.1:15014) with the service graph, a page per service with golden
metrics over time, and the current config, updated live by polling.

Data comes from the agents: each registry heartbeat carries a compact JSON
summary of the node's cumulative traffic per (source workload, destination
service, destination workload) edge (nodeagent.admin.summarize). MeshTelemetry
keeps a short history per node and turns consecutive summaries into rates.

    /                 the page (static HTML + JS, no external assets)
    /api/graph        nodes (services, workloads) and edges with rates, success, p99, mTLS
    /api/service?name=<ns>/<name>   one service: config, edges, a time series
    /api/config       every stored config resource
    /metrics          the control plane's own Prometheus metrics
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
import urllib.parse
from collections import deque
from collections.abc import Callable, Iterable
from importlib import resources
from typing import Any

log = logging.getLogger(__name__)

HISTORY = 600  # summaries kept per node (10 min at 1 s heartbeats)
MAX_SUMMARY_BYTES = 256 * 1024
STALE_AFTER_S = 60.0
RATE_WINDOW_S = 10.0
READ_TIMEOUT_S = 5.0
EDGE_NUMBERS = ("requests", "errors", "tcp_opened", "tcp_closed", "tcp_failed", "bytes_sent", "bytes_received")


class TelemetryError(ValueError):
    pass


def _edge_key(e: dict[str, Any]) -> tuple[str, str, str, str]:
    return (e.get("reporter", ""), e.get("source", ""), e.get("destination_service_key", ""),
            e.get("destination_workload", ""))


def _rate(now: dict[str, Any], prev: dict[str, Any] | None, dt: float, field: str) -> float:
    if prev is None or dt <= 0:
        return 0.0
    return max(0.0, (float(now.get(field) or 0) - float(prev.get(field) or 0)) / dt)


class MeshTelemetry:
    """What the agents reported, per node, with a short history (pure, no I/O)."""

    def __init__(self, clock: Callable[[], float] = time.time, history: int = HISTORY) -> None:
        self._clock = clock
        self._history = history
        self.nodes: dict[str, deque[tuple[float, dict[str, Any]]]] = {}

    def ingest(self, node: str, text: str) -> None:
        """One heartbeat's summary; a malformed one is dropped with a log line naming the node."""
        try:
            summary = self.parse(text)
        except TelemetryError as e:
            log.warning("node %s sent a telemetry summary the mesh view cannot use: %s", node, e)
            return
        self.nodes.setdefault(node, deque(maxlen=self._history)).append((self._clock(), summary))

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
        return d

    def _latest_pairs(self) -> Iterable[tuple[str, float, dict[str, Any], dict[str, Any] | None, float]]:
        now = self._clock()
        for node, hist in self.nodes.items():
            if not hist or now - hist[-1][0] > STALE_AFTER_S:
                continue
            t1, s1 = hist[-1]
            # Rates over the last RATE_WINDOW_S: compare with the oldest summary in that window.
            prev = None
            t0 = t1
            for t, s in reversed(hist):
                if t1 - t > RATE_WINDOW_S:
                    break
                if t1 - t >= 1.0:
                    prev, t0 = s, t
            yield node, t1, s1, prev, t1 - t0

    def edges(self) -> list[dict[str, Any]]:
        """Every current edge, rates from the latest two summaries of its node."""
        out: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        for node, _t, s1, s0, dt in self._latest_pairs():
            prev = {_edge_key(e): e for e in (s0 or {}).get("edges", [])}
            for e in s1.get("edges", []):
                k = _edge_key(e)
                p = prev.get(k)
                cur = out.get(k)
                if cur is None:
                    cur = out[k] = {"reporter": k[0], "source": k[1], "service": k[2], "destination_workload": k[3],
                                    "destination_service": e.get("destination_service", ""),
                                    **{f: 0.0 for f in EDGE_NUMBERS}, "request_rate": 0.0, "connection_rate": 0.0,
                                    "error_rate": 0.0, "p99_ms": None, "mtls": set(), "nodes": []}
                for f in EDGE_NUMBERS:
                    cur[f] += float(e.get(f) or 0)
                cur["request_rate"] += _rate(e, p, dt, "requests")
                cur["connection_rate"] += _rate(e, p, dt, "tcp_opened")
                cur["error_rate"] += _rate(e, p, dt, "errors") + _rate(e, p, dt, "tcp_failed")
                if e.get("p99_ms") is not None:
                    cur["p99_ms"] = max(cur["p99_ms"] or 0.0, float(e["p99_ms"]))
                cur["mtls"].update(e.get("mtls") or [])
                cur["nodes"].append(node)
        result = []
        for e in out.values():
            e["mtls"] = sorted(e["mtls"])
            total = e["requests"] or e["tcp_closed"]
            failed = e["errors"] if e["requests"] else e["tcp_failed"]
            e["success_rate"] = round(1 - failed / total, 4) if total else None
            result.append(e)
        return result

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
        for e in self.edges():
            svc_known = not e["service"].endswith("/unknown") and e["service"] != "unknown/unknown"
            if e["reporter"] == "source":
                src = node("workload", e["source"])
                dst = node("service", e["service"]) if svc_known else node("workload", e["destination_workload"])
            else:
                if svc_known:
                    src = node("service", e["service"])
                else:
                    src = node("workload", e["source"])
                dst = node("workload", e["destination_workload"])
            edges.append({**e, "caller": e["source"], "id": f"{src}->{dst}", "source": src, "target": dst})
        return {"time_unix": self._clock(), "nodes": sorted(nodes.values(), key=lambda n: n["id"]),
                "edges": sorted(edges, key=lambda e: e["id"])}

    def service_series(self, service: str) -> list[dict[str, Any]]:
        """Golden metrics over time for one service (its callers' view, else its own)."""
        buckets: dict[int, dict[str, Any]] = {}
        for hist in self.nodes.values():
            for (t0, s0), (t1, s1) in itertools.pairwise(hist):
                dt = t1 - t0
                if dt <= 0:
                    continue
                prev = {_edge_key(e): e for e in s0.get("edges", [])}
                chosen = [e for e in s1.get("edges", []) if e.get("destination_service_key") == service
                          and e.get("reporter") == "source"]
                if not chosen:
                    chosen = [e for e in s1.get("edges", []) if e.get("destination_service_key") == service]
                if not chosen:
                    continue
                b = buckets.setdefault(int(t1 // 2) * 2, {"t": int(t1 // 2) * 2, "request_rate": 0.0,
                                                          "connection_rate": 0.0, "error_rate": 0.0, "p99_ms": None})
                for e in chosen:
                    p = prev.get(_edge_key(e))
                    b["request_rate"] += _rate(e, p, dt, "requests")
                    b["connection_rate"] += _rate(e, p, dt, "tcp_opened")
                    b["error_rate"] += _rate(e, p, dt, "errors") + _rate(e, p, dt, "tcp_failed")
                    if e.get("p99_ms") is not None:
                        b["p99_ms"] = max(b["p99_ms"] or 0.0, float(e["p99_ms"]))
        out = []
        for b in sorted(buckets.values(), key=lambda b: b["t"]):
            total = b["request_rate"] or b["connection_rate"]
            b["success_rate"] = round(1 - min(1.0, b["error_rate"] / total), 4) if total else None
            out.append(b)
        return out


Response = tuple[int, str, bytes]


class MeshView:
    """The HTTP server; `cp` is controlplane.server.ControlPlane."""

    def __init__(self, cp: Any, telemetry: MeshTelemetry | None = None) -> None:
        self.cp = cp
        self.telemetry = telemetry or MeshTelemetry()
        self._server: asyncio.AbstractServer | None = None
        self.address = ""

    async def start(self, listen: str) -> None:
        host, _, port = listen.rpartition(":")
        try:
            self._server = await asyncio.start_server(self._handle, host or "127.0.0.1", int(port))
        except (OSError, ValueError) as e:
            log.error("cannot serve the mesh view on %s (%s): is the port free? (--web-listen)", listen, e)
            return
        h, p = self._server.sockets[0].getsockname()[:2]
        self.address = f"{h}:{p}"
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
        g["reporting_nodes"] = sorted(self.telemetry.nodes)
        g["config_revision"] = self.cp.store.revision()
        return g

    def service(self, key: str) -> dict[str, Any] | None:
        svc = next((s for s in self.services() if s["key"] == key), None)
        if svc is None:
            return None
        edges = [e for e in self.telemetry.edges() if e["service"] == key]
        return {**svc, "edges": edges, "series": self.telemetry.service_series(key)}

    def config(self) -> dict[str, Any]:
        res, rev = self.cp.store.list()
        return {"revision": rev, "resources": [
            {"kind": r.kind, "namespace": r.namespace, "name": r.name, "spec": json.loads(r.spec_json),
             "status": json.loads(r.status_json or "{}")} for r in res]}

    # ---------------------------------------------------------------- HTTP
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            status, ctype, body = self.dispatch(head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            writer.close()
            return
        except Exception as e:  # one broken view must not stop the server
            log.exception("mesh view request failed")
            status, ctype, body = 500, "text/plain", f"internal error: {e!r}\n".encode()
        writer.write(f"HTTP/1.1 {status} {'OK' if status == 200 else 'Error'}\r\nContent-Type: {ctype}\r\n"
                     f"Content-Length: {len(body)}\r\nConnection: close\r\nCache-Control: no-store\r\n\r\n".encode()
                     + body)
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()

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
        if path == "/metrics":
            text = self.cp.metrics.render(self.cp) if self.cp.metrics is not None else ""
            return 200, "text/plain; version=0.0.4; charset=utf-8", text.encode()
        return 404, "text/plain", f"no such page {path}; try /, /api/graph, /api/config, /metrics\n".encode()

    @staticmethod
    def _json(obj: Any) -> Response:
        return 200, "application/json", json.dumps(obj, default=str).encode()
