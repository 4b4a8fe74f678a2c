"""The agent's admin endpoint (127.0.0.1:15000 by default): a small HTTP/1.1
server on the agent's event loop, GET only, one request per connection.

    /metrics      Prometheus text: every worker's registry merged, plus the agent's own gauges
    /healthz      200 while the agent and its workers run
    /ready        200 once capture is installed over a complete snapshot and certificates
    /status       the agent's status (as in stateDir/status.json)
    /config_dump  the current snapshot as JSON (certificates and keys are never in it)
    /clusters     every service port's endpoints with health, peak-EWMA and outstanding
    /certs        each identity's certificate: serial, issuer, validity (no private keys)
    /capture      the capture backend, its state, and the rules it wants in place
    /recent       recent connection summaries from every worker (?since=<unix time>)
    /summary      golden metrics per service edge, computed from the merged metrics

Workers are asked over their control channel ("stats" messages, see
nodeagent.proxy.worker.WorkerPool.stats and nodeagent.observe.telemetry.worker_stats).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hmac
import json
import logging
import os
import secrets
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nodemesh
from nodeagent.observe import meshmetrics
from nodemesh.keyfiles import write_private
from nodemesh.prom import histogram_quantile

if TYPE_CHECKING:
    from nodeagent.meshview.snapshot import Snapshot
    from nodeagent.supervision.supervisor import Agent

log = logging.getLogger(__name__)

MAX_REQUEST_HEAD = 16 * 1024
READ_TIMEOUT_S = 5.0
SUMMARY_REFRESH_S = 1.0
MAX_PUSHED_EDGES = 200

Response = tuple[int, str, bytes]  # status, content type, body


def snapshot_dump(snapshot: Snapshot | None) -> dict[str, Any]:
    """The snapshot as plain JSON-able data (nodemesh.cli.observecmds rebuilds it for explain)."""
    if snapshot is None:
        return {"version": "", "node": "", "services": [], "workloads": [], "local_workloads": [], "mesh": {}}
    d = {f.name: getattr(snapshot, f.name) for f in dataclasses.fields(snapshot) if f.compare}
    return dict(json.loads(json.dumps({k: _plain(v) for k, v in d.items()}, default=str)))


def _plain(v: Any) -> Any:
    if dataclasses.is_dataclass(v) and not isinstance(v, type):
        return {f.name: _plain(getattr(v, f.name)) for f in dataclasses.fields(v)}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _plain(x) for k, x in v.items()}
    return v


def cert_info(identity: str, chain_pem: str, not_after_unix: float, now: float) -> dict[str, Any]:
    info: dict[str, Any] = {"identity": identity, "not_after_unix": not_after_unix,
                            "expires_in_s": round(not_after_unix - now, 1)}
    try:
        from cryptography import x509

        leaf = x509.load_pem_x509_certificate(chain_pem.encode())
        info.update(serial=format(leaf.serial_number, "x"), issuer=leaf.issuer.rfc4514_string(),
                    not_before=leaf.not_valid_before_utc.isoformat(), not_after=leaf.not_valid_after_utc.isoformat(),
                    chain_length=chain_pem.count("BEGIN CERTIFICATE"))
    except Exception as e:  # noqa: BLE001 - show what we can; a bad PEM is reported by the cert manager
        info["parse_error"] = str(e)
    return info


_quantile = histogram_quantile  # moved to nodemesh.prom (the control plane uses it too)


def summarize(families: list[meshmetrics.FamilyData]) -> dict[str, Any]:
    """Per (source workload, destination service) edge, per reporter: requests,
    errors, p99, TCP connections and bytes, mTLS state. Cumulative counts: rates
    are the reader's job (two summaries apart)."""
    by = {fd.name: fd for fd in families}
    edges: dict[tuple[str, ...], dict[str, Any]] = {}

    def edge(fd: meshmetrics.FamilyData, key: tuple[str, ...]) -> dict[str, Any]:
        lab = dict(zip(fd.labelnames, key, strict=True))
        k = (lab["reporter"], lab["source_workload_namespace"], lab["source_workload"],
             lab["destination_service"], lab["destination_workload_namespace"], lab["destination_workload"])
        e = edges.get(k)
        if e is None:
            e = edges[k] = {
                "reporter": k[0], "source": f"{k[1]}/{k[2]}", "destination_service": k[3],
                "destination_service_key": f"{lab['destination_service_namespace']}/{lab['destination_service_name']}",
                "destination_workload": f"{k[4]}/{k[5]}", "requests": 0.0, "errors": 0.0,
                "tcp_opened": 0.0, "tcp_closed": 0.0, "tcp_failed": 0.0, "bytes_sent": 0.0, "bytes_received": 0.0,
                "mtls": set(), "_hist": None, "_buckets": (), "grpc_status": {},
            }
        e["mtls"].add(lab["connection_security_policy"])
        return e

    for name, field_name in (("istio_tcp_connections_opened_total", "tcp_opened"),
                             ("istio_tcp_connections_closed_total", "tcp_closed"),
                             ("istio_tcp_sent_bytes_total", "bytes_sent"),
                             ("istio_tcp_received_bytes_total", "bytes_received"),
                             ("istio_requests_total", "requests")):
        fd = by.get(name)
        if fd is None:
            continue
        for key, v in fd.series.items():
            e = edge(fd, key)
            e[field_name] += v
            lab = dict(zip(fd.labelnames, key, strict=True))
            if name == "istio_requests_total" and (lab["response_code"].startswith("5")
                                                   or lab["response_code"] == "0"):
                e["errors"] += v
            if name == "istio_requests_total" and lab.get("grpc_response_status", "") not in ("", "0"):
                # Rollout analysis counts chosen gRPC status classes as failures (controlplane/rollout/).
                gs = e["grpc_status"]
                gs[lab["grpc_response_status"]] = gs.get(lab["grpc_response_status"], 0.0) + v
            if name == "istio_tcp_connections_closed_total" and lab["response_flags"] != "-":
                e["tcp_failed"] += v
    fd = by.get("istio_request_duration_milliseconds")
    if fd is not None:
        for key, (counts, _s, _n) in fd.series.items():
            e = edge(fd, key)
            h = e["_hist"] or [0.0] * len(counts)
            e["_hist"] = [a + b for a, b in zip(h, counts, strict=True)]
            e["_buckets"] = fd.buckets
    out = []
    for e in edges.values():
        hist = e.pop("_hist")
        buckets = e.pop("_buckets")
        e["p99_ms"] = round(_quantile(buckets, hist, 0.99), 3) if hist else None
        e["p50_ms"] = round(_quantile(buckets, hist, 0.50), 3) if hist else None
        # Cumulative latency bucket counts (bounds in "latency_buckets_ms"): the control
        # plane diffs two summaries for an interval's p99 (rollout analysis).
        if hist:
            e["latency_hist"] = [round(x) for x in hist]
        if not e["grpc_status"]:
            del e["grpc_status"]
        e["mtls"] = sorted(e["mtls"])
        # A request-less (L4) edge's success is its connections that ended without a flag.
        if e["requests"]:
            e["success_rate"] = round(1 - e["errors"] / e["requests"], 4)
        elif e["tcp_closed"]:
            e["success_rate"] = round(1 - e["tcp_failed"] / e["tcp_closed"], 4)
        else:
            e["success_rate"] = None
        out.append(e)
    out.sort(key=lambda e: (e["reporter"], e["source"], e["destination_service"]))
    dur = by.get("istio_request_duration_milliseconds")
    return {"time_unix": time.time(), "edges": out,
            "latency_buckets_ms": list(dur.buckets) if dur is not None else []}


ADMIN_TOKEN_FILE = "admin.token"  # noqa: S105 - a file name, not a secret
# What other workloads' requests looked like (targets, query strings) and the node's full
# config: only for the node's administrator (the admin token, readable by root only).
PROTECTED = frozenset({"/recent", "/config_dump"})


def write_admin_token(state_dir: str | os.PathLike[str] | None) -> tuple[str, str]:
    """A fresh admin token, written 0600 to <stateDir>/admin.token (new at every
    start, so a copy taken earlier stops working). Returns (token, path)."""
    token = secrets.token_urlsafe(32)
    if state_dir is None:
        return token, ""
    directory = Path(state_dir)
    directory.mkdir(parents=True, exist_ok=True)
    write_private(directory / ADMIN_TOKEN_FILE, (token + "\n").encode())
    return token, str(directory / ADMIN_TOKEN_FILE)


class AdminServer:
    def __init__(self, agent: Agent, host: str = "127.0.0.1", port: int = 15000) -> None:
        self.agent = agent
        self.token, self.token_path = write_admin_token(getattr(agent, "state_dir", None))
        self.host = host
        self.port = port
        self._server: asyncio.AbstractServer | None = None
        self.agent_registry = meshmetrics.Registry()
        self._summary_json = ""
        self._refresher: asyncio.Task[None] | None = None
        self._routes: dict[str, Callable[[dict[str, str]], Awaitable[Response]]] = {
            "/metrics": self._metrics, "/healthz": self._healthz, "/ready": self._ready,
            "/status": self._status, "/config_dump": self._config_dump, "/clusters": self._clusters,
            "/certs": self._certs, "/capture": self._capture, "/recent": self._recent, "/summary": self._summary,
            "/explain": self._explain,
            "/": self._index,
        }

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, self.host, self.port, reuse_address=True)
        sock = self._server.sockets[0]
        self.port = sock.getsockname()[1]
        log.info("admin endpoint on http://%s:%d/ (metrics, config_dump, clusters, certs, capture)",
                 self.host, self.port)
        self._refresher = asyncio.get_running_loop().create_task(self._refresh_loop())

    async def _refresh_loop(self) -> None:
        """Keep a summary ready for the registry heartbeat (which cannot wait on workers)."""
        while True:
            try:
                summary = summarize(await self.merged_families(agent_process=False))
                summary["node"] = self.agent.config.node.name
                summary["edges"] = summary["edges"][:MAX_PUSHED_EDGES]
                self._summary_json = json.dumps(summary, separators=(",", ":"))
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("cannot summarize the node's metrics for the control plane")
            await asyncio.sleep(SUMMARY_REFRESH_S)

    def telemetry_json(self) -> str:
        return self._summary_json

    async def close(self) -> None:
        if self._refresher is not None:
            self._refresher.cancel()
        if self._server is not None:
            self._server.close()
            try:
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
            except TimeoutError:
                log.warning("admin endpoint: open connections did not close within 1s")
            self._server = None

    # ------------------------------------------------------------------ HTTP
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT_S)
            status, ctype, body = await self._dispatch(head)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            writer.close()
            return
        except Exception as e:  # a bug in one view must not take the endpoint down
            log.exception("admin request failed")
            status, ctype, body = 500, "text/plain", f"internal error: {e!r}\n".encode()
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  500: "Internal Server Error", 503: "Service Unavailable"}.get(status, "OK")
        writer.write(f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\nContent-Length: {len(body)}\r\n"
                     "Connection: close\r\nCache-Control: no-store\r\n\r\n".encode() + body)
        with contextlib.suppress(ConnectionError):
            await writer.drain()
        writer.close()

    def _authorized(self, head: bytes) -> bool:
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"authorization":
                scheme, _, token = value.strip().decode("latin-1").partition(" ")
                return scheme.lower() == "bearer" and hmac.compare_digest(token.strip(), self.token)
        return False

    async def _dispatch(self, head: bytes) -> Response:
        if len(head) > MAX_REQUEST_HEAD:
            return 400, "text/plain", b"request head too large\n"
        line = head.split(b"\r\n", 1)[0].decode("latin-1")
        parts = line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            return 400, "text/plain", b"bad request line\n"
        method, target = parts[0], parts[1]
        if method not in ("GET", "HEAD"):
            return 405, "text/plain", b"the admin endpoint is read-only: use GET\n"
        url = urllib.parse.urlsplit(target)
        query = {k: v[-1] for k, v in urllib.parse.parse_qs(url.query).items()}
        path = url.path.rstrip("/") or "/"
        route = self._routes.get(path)
        if path in PROTECTED and not self._authorized(head):
            # Any local process can reach this port; what other workloads requested is not for them.
            return 403, "text/plain", (f"{path} needs the node's admin token (Authorization: Bearer, from "
                                       f"{self.token_path or 'the agent stateDir/admin.token'}, readable by root "
                                       "only): run the nodemesh CLI as root\n").encode()
        if route is None:
            return 404, "text/plain", f"no such admin path {url.path}; try one of {sorted(self._routes)}\n".encode()
        return await route(query)

    @staticmethod
    def _json(obj: Any, status: int = 200) -> Response:
        return status, "application/json", (json.dumps(obj, indent=1, sort_keys=True, default=str) + "\n").encode()

    # ------------------------------------------------------------------ data
    async def worker_stats(self, since: float = 0.0) -> list[dict[str, Any]]:
        pool = self.agent.pool
        stats = getattr(pool, "stats", None)
        if stats is None:
            return []
        return list(await stats({"since": 0}))

    def agent_families(self) -> list[meshmetrics.FamilyData]:
        a = self.agent
        r = self.agent_registry
        for fam_name in ("nodemesh_config_version_info", "nodemesh_cert_expiry_timestamp_seconds",
                         "nodemesh_capture_installed"):
            fam = r.family(fam_name)
            if fam is not None:
                fam.clear()  # label sets change (versions, identities): rebuild each scrape
        r.gauge("nodemesh_agent_info", "The agent's version and node.", ("version", "node")).set(
            {"version": nodemesh.__version__, "node": a.config.node.name}, 1)
        r.gauge("nodemesh_xds_connected", "1 while the ADS stream to the control plane is up.").set(
            None, 1 if a.ads is not None and a.ads.connected else 0)
        r.gauge("nodemesh_registry_connected", "1 while the registry session (lease) is up.").set(
            None, 1 if a.registry is not None and a.registry.connected else 0)
        r.gauge("nodemesh_xds_acks", "xDS responses accepted since the agent started (a counter).").set(
            None, float(getattr(a.ads, "acks", 0)))
        r.gauge("nodemesh_xds_nacks", "xDS responses rejected (NACKed) since the agent started (a counter).").set(
            None, float(getattr(a.ads, "nacks", 0)))
        snap = a.snapshot
        r.gauge("nodemesh_config_version_info", "The snapshot version the proxy serves.", ("version",)).set(
            {"version": snap.version if snap else ""}, 1)
        r.gauge("nodemesh_config_services", "Services in the current snapshot.").set(
            None, len(snap.services) if snap else 0)
        r.gauge("nodemesh_config_workloads", "Workloads in the current snapshot.").set(
            None, len(snap.workloads) if snap else 0)
        mode = getattr(getattr(a.config, "capture", None), "mode", "iptables")
        r.gauge("nodemesh_capture_installed", "1 while the capture rules are installed.", ("mode",)).set(
            {"mode": mode}, 1 if a.capture_installed else 0)
        exp = r.gauge("nodemesh_cert_expiry_timestamp_seconds", "When each workload certificate expires.",
                      ("identity",))
        if a.certs is not None:
            for ident, svid in a.certs.svids.items():
                exp.set({"identity": ident}, svid.not_after_unix)
        r.gauge("nodemesh_proxy_workers_up", "Proxy worker processes running.").set(
            None, a.pool.up() if a.pool is not None and hasattr(a.pool, "up") else 0)
        return r.collect()

    async def merged_families(self, agent_process: bool = True) -> list[meshmetrics.FamilyData]:
        """agent_process=False: without the agent process's own families (the per-second summary)."""
        parts = [s["metrics"] for s in await self.worker_stats()]
        extra = [self.agent_process_families()] if agent_process else []
        return meshmetrics.merge([*parts, self.agent_families(), *extra])

    def agent_process_families(self) -> list[meshmetrics.FamilyData]:
        """Families kept in this (agent) process: health checks (nodeagent/observe/healthprober.py,
        fed as results arrive) and the capture watchdog and backend counters."""
        a = self.agent
        fo = getattr(a, "failover", None)
        if fo is not None:
            st = fo.status()
            meshmetrics.CAPTURE_PROXY_STATE.clear()
            meshmetrics.CAPTURE_PROXY_STATE.set({"state": st.get("proxy_state", "serving")}, 1)
            meshmetrics.CAPTURE_DOWN_WINDOWS.set_total(None, float(st.get("proxy_down_windows", 0)))
            meshmetrics.CAPTURE_DOWN_SECONDS.set_total(None, float(st.get("proxy_down_seconds", 0.0)))
        read = getattr(a.capture, "counters", None)
        if callable(read):  # eBPF: the kernel counts what bypassed the proxy (map reads, no bpftool)
            try:
                counters = read() or {}
            except Exception:  # noqa: BLE001 - a scrape must not fail on a capture read
                counters = {}
            for name, reason in (("bypass_stale", "fail_open"), ("skip_excluded", "excluded_cidr")):
                if name in counters:
                    meshmetrics.CAPTURE_BYPASSED.set_total({"reason": reason}, float(counters[name]))
        return meshmetrics.AGENT_REGISTRY.collect()

    # ------------------------------------------------------------------ views
    async def _index(self, _q: dict[str, str]) -> Response:
        paths = "".join(f"{p}\n" for p in sorted(self._routes) if p != "/")
        return 200, "text/plain", f"nodemesh agent {nodemesh.__version__} admin endpoint\n{paths}".encode()

    async def _metrics(self, _q: dict[str, str]) -> Response:
        text = meshmetrics.render(await self.merged_families())
        return 200, "text/plain; version=0.0.4; charset=utf-8", text.encode()

    async def _summary(self, _q: dict[str, str]) -> Response:
        return self._json(summarize(await self.merged_families()))

    async def _healthz(self, _q: dict[str, str]) -> Response:
        a = self.agent
        pool_ok = a.pool is not None and a.pool.alive()
        if a.phase in ("stopping", "stopped") or not pool_ok:
            return 503, "text/plain", f"unhealthy: phase {a.phase}, workers alive {pool_ok}\n".encode()
        return 200, "text/plain", b"ok\n"

    async def _ready(self, _q: dict[str, str]) -> Response:
        a = self.agent
        if a.phase == "running" and (a.capture_installed or a.config.capture.failure_policy == "open"):
            return 200, "text/plain", f"ready: snapshot {a.snapshot.version if a.snapshot else ''}\n".encode()
        why = a.capture_error or f"phase {a.phase}"
        return 503, "text/plain", f"not ready: {why}\n".encode()

    async def _status(self, _q: dict[str, str]) -> Response:
        return self._json(self.agent.status())

    async def _config_dump(self, _q: dict[str, str]) -> Response:
        d = snapshot_dump(self.agent.snapshot)
        # The trust bundle is public, but it is long and useless on a terminal: count it.
        if d.get("mesh"):
            d["mesh"]["trust_bundle"] = [f"<{len(d['mesh'].get('trust_bundle', []))} PEM root(s)>"]
        d["excluded_cidrs"] = list(self.agent.settings.excluded_cidrs)
        d["node_name"] = self.agent.config.node.name
        return self._json(d)

    async def _clusters(self, _q: dict[str, str]) -> Response:
        snap = self.agent.snapshot
        stats = await self.worker_stats()
        bal = self._merge_balancer(stats)
        # Outlier and breaker state live per worker (each sees its own outcomes):
        # an endpoint is ejected if any worker ejected it.
        l7: dict[str, dict[str, Any]] = {}
        for st in stats:
            for d in st.get("l7", []):
                cur = l7.setdefault(d["cluster"], {"ejected": set(), "breaker_open": False, "breaker_overflows": 0,
                                                    "ejections": 0, "retry_budget_refused": 0})
                cur["ejected"].update(d.get("ejected", ()))
                cur["breaker_open"] = cur["breaker_open"] or d.get("breaker_open", False)
                for k in ("breaker_overflows", "ejections", "retry_budget_refused"):
                    cur[k] += int(d.get(k, 0))
        clusters = []
        for svc in snap.services if snap else ():
            for sp in svc.ports:
                eps = []
                cl7 = l7.get(sp.cluster, {})
                for ep in sp.endpoints:
                    addr = f"{ep.ip}:{ep.port}"
                    b = bal.get(addr, {})
                    eps.append({"address": addr, "workload": ep.workload, "identity": ep.identity, "node": ep.node,
                                "zone": ep.zone, "healthy": ep.healthy,
                                "outlier_ejected": addr in cl7.get("ejected", ()),
                                "ewma_ms": b.get("ewma_ms") if b.get("measured") else None,
                                "outstanding": b.get("outstanding", 0)})
                clusters.append({"cluster": sp.cluster, "service": svc.key, "vip": svc.vip, "port": sp.port,
                                 "target_port": sp.target_port, "protocol": sp.protocol, "endpoints": eps,
                                 **({"l7": {k: v for k, v in cl7.items() if k != "ejected"}} if cl7 else {})})
        return self._json({"clusters": clusters})

    async def _certs(self, _q: dict[str, str]) -> Response:
        certs = self.agent.certs
        now = time.time()
        out = [cert_info(i, s.cert_chain_pem, s.not_after_unix, now)
               for i, s in sorted((certs.svids if certs else {}).items())]
        return self._json({"version": certs.version if certs else 0, "certificates": out,
                           "trust_bundle_roots": len(certs.trust_bundle) if certs else 0})

    async def _capture(self, q: dict[str, str]) -> Response:
        a = self.agent
        cap = a.capture
        d: dict[str, Any] = {"mode": a.config.capture.mode, "failure_policy": a.config.capture.failure_policy,
                             "installed": a.capture_installed, "error": a.capture_error,
                             "workloads": [w.key for w in getattr(cap, "workloads", ())]}
        expected = getattr(cap, "expected", None)
        if expected is not None:
            try:
                d["rules"] = {k: list(v) for k, v in expected().items()}
            except Exception as e:  # noqa: BLE001 - shown to the operator
                d["rules_error"] = str(e)
        if q.get("verify") == "1" and hasattr(cap, "verify"):
            try:
                diff = await asyncio.to_thread(cap.verify)
                d["verify"] = diff.describe() if hasattr(diff, "describe") else str(diff)
            except Exception as e:  # noqa: BLE001 - shown to the operator
                d["verify_error"] = f"{e} (is iptables available in this network namespace?)"
        return self._json(d)

    async def balancer_state(self) -> dict[str, dict[str, Any]]:
        return self._merge_balancer(await self.worker_stats())

    @staticmethod
    def _merge_balancer(stats: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
        bal: dict[str, dict[str, Any]] = {}
        for s in stats:
            for b in s.get("balancer", []):
                cur = bal.setdefault(b["address"], {"ewma_ms": 0.0, "outstanding": 0, "measured": False})
                if b["measured"]:
                    cur["ewma_ms"] = max(cur["ewma_ms"], b["ewma_ms"])
                cur["outstanding"] += b["outstanding"]
                cur["measured"] = cur["measured"] or b["measured"]
        return bal

    async def _explain(self, q: dict[str, str]) -> Response:
        from nodeagent.meshview.explain import ExplainError, explain

        snap = self.agent.snapshot
        if snap is None:
            return 503, "application/json", (b'{"error": "no snapshot yet: '
                                             b'is the agent connected to the control plane?"}')
        if not q.get("from") or not q.get("to"):
            return 400, "application/json", b'{"error": "explain needs ?from=<local workload>&to=<ip:port or service>"}'
        try:
            return self._json(explain(snap, self.agent.settings, q["from"], q["to"], await self.balancer_state()))
        except ExplainError as e:
            return 400, "application/json", json.dumps({"error": str(e)}).encode()

    async def _recent(self, q: dict[str, str]) -> Response:
        try:
            since = float(q.get("since", "0"))
        except ValueError:
            return 400, "text/plain", b"since must be a unix time in seconds\n"
        recs = [r for s in await self.worker_stats() for r in s.get("recent", []) if r.get("end_unix", 0) > since]
        recs.sort(key=lambda r: r.get("end_unix", 0))
        return self._json({"time_unix": time.time(), "records": recs[-1000:]})
