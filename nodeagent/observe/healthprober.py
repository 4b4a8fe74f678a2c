"""Active health checks, run by the agent on the endpoints of its OWN node (the
one place that sees them without a network in between) and reported to the
control plane, which marks failing endpoints UNHEALTHY in EDS for every node.

Three probes: HTTP/1.1 GET of a path with expected statuses (h11 core), gRPC
grpc.health.v1.Health/Check (h2 core, a unary call with no grpcio channel so
the socket can carry SO_MARK), and a TCP connect. Every probe socket is marked
so capture leaves it alone. Thresholds and jitter follow Envoy: a verdict flips
after `unhealthyThreshold` consecutive failures or `healthyThreshold`
consecutive passes; the very first result decides at once.

The pieces are separate so they test without sockets: HealthState (pure
thresholds), the probe functions (one connection each), and HealthMonitor (one
task per endpoint, a Probe that tests can script, an injectable rng).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass

import h2.config
import h2.connection
import h2.events
import h11

from nodeagent.meshview.snapshot import Snapshot
from nodeagent.observe import meshmetrics
from nodeagent.proxy.netutil import set_mark
from nodemesh.healthcheckspec import HealthCheck

log = logging.getLogger(__name__)

GRPC_HEALTH_PATH = "/grpc.health.v1.Health/Check"
GRPC_SERVING = 1  # grpc.health.v1.HealthCheckResponse.ServingStatus.SERVING
_MAX_RESPONSE = 64 * 1024  # a health answer is tiny; never buffer more than this


@dataclass(frozen=True)
class ProbeTarget:
    """One local endpoint to check: a workload's ip and target port."""

    workload: str  # "<namespace>/<name>"
    ip: str
    port: int
    check: HealthCheck
    cluster: str = ""  # the service port's cluster that asked for it (for logs)

    @property
    def key(self) -> tuple[str, int]:
        return (self.workload, self.port)


@dataclass(frozen=True)
class HealthVerdict:
    workload: str
    port: int
    healthy: bool
    detail: str


class HealthState:
    """Consecutive-result thresholds for one endpoint. `healthy` is None until
    the first result, which decides at once (a new replica is neither held back
    nor left in rotation for unhealthyThreshold intervals)."""

    def __init__(self, healthy_threshold: int, unhealthy_threshold: int) -> None:
        self.healthy_threshold = max(1, healthy_threshold)
        self.unhealthy_threshold = max(1, unhealthy_threshold)
        self.healthy: bool | None = None
        self.passes = 0
        self.failures = 0
        self.detail = "not checked yet"

    def record(self, ok: bool, detail: str) -> bool:
        """Count one result; True when the verdict changed."""
        self.detail = detail
        if ok:
            self.passes, self.failures = self.passes + 1, 0
        else:
            self.passes, self.failures = 0, self.failures + 1
        before = self.healthy
        if before is None:
            self.healthy = ok
        elif before and self.failures >= self.unhealthy_threshold:
            self.healthy = False
        elif not before and self.passes >= self.healthy_threshold:
            self.healthy = True
        return self.healthy != before

    def __repr__(self) -> str:
        return (f"HealthState(healthy={self.healthy}, passes={self.passes}, failures={self.failures}, "
                f"detail={self.detail!r})")


# ---------------------------------------------------------------- probes

ProbeResult = tuple[bool, str]
Probe = Callable[[ProbeTarget, int], Awaitable[ProbeResult]]


async def _connect(ip: str, port: int, mark: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        set_mark(sock, mark)  # capture must not send the agent's own probe into the proxy
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        await asyncio.get_running_loop().sock_connect(sock, (ip, port))
    except BaseException:
        sock.close()
        raise
    return sock


async def probe_tcp(t: ProbeTarget, mark: int) -> ProbeResult:
    sock = await _connect(t.ip, t.port, mark)
    sock.close()
    return True, "tcp connect ok"


async def probe_http(t: ProbeTarget, mark: int) -> ProbeResult:
    loop = asyncio.get_running_loop()
    sock = await _connect(t.ip, t.port, mark)
    try:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=_MAX_RESPONSE)
        out = conn.send(h11.Request(method="GET", target=t.check.http_path, headers=[
            ("Host", f"{t.ip}:{t.port}"), ("User-Agent", "nodemesh-health/1"), ("Connection", "close")]))
        out += conn.send(h11.EndOfMessage())
        await loop.sock_sendall(sock, out)
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await loop.sock_recv(sock, 16384)
                conn.receive_data(data)
                continue
            if isinstance(event, h11.Response):
                ok = t.check.status_ok(event.status_code)
                return ok, f"http {event.status_code} from {t.check.http_path}"
            if isinstance(event, h11.ConnectionClosed):
                return False, f"http: connection closed before a response to {t.check.http_path}"
    except h11.RemoteProtocolError as e:
        return False, f"http: bad response ({e})"
    finally:
        sock.close()


def grpc_health_request(service: str) -> bytes:
    """A length-prefixed grpc.health.v1.HealthCheckRequest {string service = 1}."""
    raw = service.encode()
    body = b""
    if raw:
        n, varint = len(raw), bytearray()
        while True:
            byte = n & 0x7F
            n >>= 7
            varint.append(byte | (0x80 if n else 0))
            if not n:
                break
        body = b"\x0a" + bytes(varint) + raw
    return b"\x00" + struct.pack(">I", len(body)) + body


def grpc_serving_status(message: bytes) -> int:
    """ServingStatus (field 1, varint) of a HealthCheckResponse; 0 (UNKNOWN) if absent."""
    i, status = 0, 0
    while i < len(message):
        tag = message[i]
        i += 1
        if tag == 0x08:  # field 1, varint
            shift, value = 0, 0
            while i < len(message):
                b = message[i]
                i += 1
                value |= (b & 0x7F) << shift
                shift += 7
                if not b & 0x80:
                    break
            status = value
        else:
            return status  # an unknown field: the status, if any, came first
    return status


def _text(v: bytes | str) -> str:
    return v.decode("latin-1") if isinstance(v, bytes) else v


async def probe_grpc(t: ProbeTarget, mark: int) -> ProbeResult:
    loop = asyncio.get_running_loop()
    sock = await _connect(t.ip, t.port, mark)
    try:
        conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
        conn.initiate_connection()
        sid = conn.get_next_available_stream_id()
        conn.send_headers(sid, [(":method", "POST"), (":scheme", "http"), (":path", GRPC_HEALTH_PATH),
                                (":authority", f"{t.ip}:{t.port}"), ("content-type", "application/grpc"),
                                ("te", "trailers"), ("user-agent", "nodemesh-health/1")])
        conn.send_data(sid, grpc_health_request(t.check.grpc_service), end_stream=True)
        await loop.sock_sendall(sock, conn.data_to_send())
        body, grpc_status, http_status, message = b"", "", "", ""
        while True:
            data = await loop.sock_recv(sock, 16384)
            if not data:
                return False, "grpc: connection closed before the call ended"
            for ev in conn.receive_data(data):
                if isinstance(ev, (h2.events.ResponseReceived, h2.events.TrailersReceived)):
                    hdrs = {_text(k): _text(v) for k, v in ev.headers}
                    http_status = str(hdrs.get(":status", http_status))
                    grpc_status = str(hdrs.get("grpc-status", grpc_status))
                    message = str(hdrs.get("grpc-message", message))
                elif isinstance(ev, h2.events.DataReceived):
                    body += ev.data
                    conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    if len(body) > _MAX_RESPONSE:
                        return False, "grpc: response too large for a health answer"
                elif isinstance(ev, h2.events.StreamReset):
                    return False, f"grpc: stream reset (error {ev.error_code})"
                elif isinstance(ev, h2.events.ConnectionTerminated):
                    return False, f"grpc: connection closed by the server (GOAWAY {ev.error_code})"
                elif isinstance(ev, h2.events.StreamEnded):
                    if http_status != "200":
                        return False, f"grpc: http status {http_status or 'missing'}"
                    if grpc_status != "0":
                        # 12 UNIMPLEMENTED: the server has no health service; 5 NOT_FOUND: unknown service.
                        return False, f"grpc: status {grpc_status or 'missing'} {message}".rstrip()
                    if len(body) < 5:
                        return False, "grpc: no response message"
                    (length,) = struct.unpack(">I", body[1:5])
                    status = grpc_serving_status(body[5:5 + length])
                    return status == GRPC_SERVING, f"grpc serving status {status}"
            pending = conn.data_to_send()
            if pending:
                await loop.sock_sendall(sock, pending)
    finally:
        sock.close()


PROBES: Mapping[str, Probe] = {"tcp": probe_tcp, "http": probe_http, "grpc": probe_grpc}


async def run_probe(t: ProbeTarget, mark: int) -> ProbeResult:
    """One check with its timeout; every failure becomes (False, why)."""
    try:
        return await asyncio.wait_for(PROBES[t.check.kind](t, mark), t.check.timeout_s)
    except TimeoutError:
        return False, f"{t.check.kind}: no answer within {t.check.timeout_s * 1000:.0f}ms"
    except ConnectionRefusedError:
        return False, f"{t.check.kind}: connection refused (is the workload listening on {t.port}?)"
    except OSError as e:
        return False, f"{t.check.kind}: {e.strerror or e}"
    except Exception as e:  # noqa: BLE001 - a protocol surprise is a failed check, not a dead monitor
        return False, f"{t.check.kind}: {type(e).__name__}: {e}"


# ---------------------------------------------------------------- monitor


def targets_for(snapshot: Snapshot) -> dict[tuple[str, int], ProbeTarget]:
    """Endpoints of this node that some service port wants health checked. Two
    service ports asking for the same workload port: the first cluster by name wins."""
    out: dict[tuple[str, int], ProbeTarget] = {}
    ports = sorted(((sp.cluster, sp) for svc in snapshot.services for sp in svc.ports), key=lambda x: x[0])
    for cluster, sp in ports:
        hc = sp.policy.health_check if sp.policy is not None else None
        if hc is None:
            continue
        for ep in sp.endpoints:
            if ep.node != snapshot.node:
                continue
            key = (ep.workload, ep.port)
            if key in out and out[key].check != hc:
                log.warning("endpoint %s:%d is health checked by %s and %s with different settings; "
                            "using %s's", ep.workload, ep.port, out[key].cluster, cluster, out[key].cluster)
                continue
            out.setdefault(key, ProbeTarget(ep.workload, ep.ip, ep.port, hc, cluster))
    return out


class HealthMonitor:
    """Runs one check loop per local endpoint and calls `on_report` with every
    verdict whenever one changes (or the set of checked endpoints changes)."""

    def __init__(self, on_report: Callable[[list[HealthVerdict]], None], *, mark: int = 0,
                 probe: Probe = run_probe, rng: random.Random | None = None) -> None:
        self._on_report = on_report
        self._mark = mark
        self._probe = probe
        self._rng = rng or random.Random()
        self._targets: dict[tuple[str, int], ProbeTarget] = {}
        self._states: dict[tuple[str, int], HealthState] = {}
        self._tasks: dict[tuple[str, int], asyncio.Task[None]] = {}
        self.checks_run = 0

    def __repr__(self) -> str:
        return f"HealthMonitor(targets={sorted(self._targets)}, verdicts={self.verdicts()})"

    def set_snapshot(self, snapshot: Snapshot) -> None:
        self.set_targets(targets_for(snapshot))

    def set_targets(self, targets: Mapping[tuple[str, int], ProbeTarget]) -> None:
        changed = False
        for key in list(self._targets):
            if key not in targets or targets[key] != self._targets[key]:
                self._tasks.pop(key).cancel()
                old = self._targets.pop(key)
                # Same check, endpoint moved (ip) or cluster renamed: keep the verdict.
                if key not in targets or targets[key].check != old.check:
                    self._states.pop(key, None)
                changed = True
        loop = asyncio.get_running_loop()
        for key, t in targets.items():
            if key in self._targets:
                continue
            self._targets[key] = t
            self._states.setdefault(key, HealthState(t.check.healthy_threshold, t.check.unhealthy_threshold))
            self._tasks[key] = loop.create_task(self._loop(t), name=f"health {t.workload}:{t.port}")
            log.info("health checking %s at %s:%d (%s every %.2fs) for %s", t.workload, t.ip, t.port,
                     t.check.kind, t.check.interval_s, t.cluster)
        if changed:
            self._report()

    def verdicts(self) -> list[HealthVerdict]:
        out = []
        for key in sorted(self._states):
            st = self._states[key]
            if st.healthy is not None:
                out.append(HealthVerdict(key[0], key[1], st.healthy, st.detail))
        return out

    def _report(self) -> None:
        try:
            self._on_report(self.verdicts())
        except Exception:
            log.exception("health report callback failed")

    async def _loop(self, t: ProbeTarget) -> None:
        hc = t.check
        # Spread the first checks over one interval so a node's endpoints are not probed in lockstep.
        await asyncio.sleep(self._rng.uniform(0, min(hc.interval_s, 0.2)))
        while True:
            ok, detail = await self._probe(t, self._mark)
            self.checks_run += 1
            st = self._states.get(t.key)
            if st is None:  # dropped while the probe ran
                return
            svc = meshmetrics.service_of_cluster(t.cluster)
            meshmetrics.HEALTH_CHECKS.inc({"destination_service": svc, "result": "pass" if ok else "fail"})
            if st.record(ok, detail):
                (log.info if ok else log.warning)(
                    "endpoint %s:%d (%s:%d) is now %s: %s", t.workload, t.port, t.ip, t.port,
                    "healthy" if ok else "UNHEALTHY", detail)
                self._report()
            if st.healthy is not None:
                meshmetrics.ENDPOINT_HEALTHY.set({"destination_service": svc, "workload": t.workload},
                                             1 if st.healthy else 0)
            await asyncio.sleep(hc.interval_s + (self._rng.uniform(0, hc.jitter_s) if hc.jitter_s else 0.0))

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._tasks.clear()
