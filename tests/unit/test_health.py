"""Active health checks: config validation, the xDS path (policy -> Cluster ->
agent), thresholds, the three probes against real loopback servers, the
monitor on a scripted probe, and the report path (agent session -> control
plane registry -> EDS health_status -> the agent's plan)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator
from concurrent import futures
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2

from controlplane.noderegistry import NodeRegistry, RegistryServicer
from controlplane.xds.build import ServiceEntry, build_snapshot
from nodeagent.cpregistration import RegistrySession
from nodeagent.meshview.l7snapshot import ClusterPolicy
from nodeagent.meshview.snapshot import Endpoint, LocalWorkload, MeshSettings, Service, ServicePort, Snapshot
from nodeagent.observe import healthprober
from nodeagent.proxy.plan import plan_outbound
from nodeagent.xds import convert, l7convert
from nodemesh import model, xdsnames
from nodemesh.healthcheckspec import HealthCheck
from nodemesh.lab import labapp
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc

POLICY = """\
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: web}
spec: {selector: {app: web}, ports: [{port: 80, targetPort: 8080, protocol: http}, {port: 81, targetPort: 9090}]}
---
apiVersion: nodemesh.io/v1alpha1
kind: DestinationPolicy
metadata: {name: web}
spec:
  targetRef: {name: web}
  healthChecks:
  - {port: 80, interval: 2s, timeout: 300ms, jitter: 200ms, healthyThreshold: 3, unhealthyThreshold: 4,
     http: {path: /healthz, expectedStatuses: [200, "204-206"]}}
  - {port: 81, grpc: {service: my.Svc}}
"""


def _problems(doc: str) -> str:
    with pytest.raises(model.ValidationError) as e:
        model.parse_documents(doc)
    return str(e.value)


def _policy_doc(checks: str) -> str:
    return ("apiVersion: nodemesh.io/v1alpha1\nkind: DestinationPolicy\nmetadata: {name: p}\n"
            f"spec:\n  targetRef: {{name: web}}\n  healthChecks: {checks}\n")


# ---------------------------------------------------------------- config


def test_policy_parses_health_checks() -> None:
    docs = model.parse_documents(POLICY)
    pol = next(d.obj for d in docs if d.kind == "DestinationPolicy")
    http, grpc_hc = pol.health_checks
    assert http == HealthCheck("http", 80, 2.0, 0.3, 0.2, 3, 4, "/healthz", ((200, 200), (204, 206)))
    assert grpc_hc.kind == "grpc" and grpc_hc.port == 81 and grpc_hc.grpc_service == "my.Svc"
    assert (grpc_hc.interval_s, grpc_hc.timeout_s, grpc_hc.unhealthy_threshold) == (1.0, 0.5, 2)
    assert http.status_ok(205) and not http.status_ok(201)


@pytest.mark.parametrize("checks, expect", [
    ("[{port: 80}]", "spec.healthChecks[0]: give exactly one of http, grpc, tcp (got none)"),
    ("[{http: {}, tcp: {}}]", "give exactly one of http, grpc, tcp (got http, tcp)"),
    ("[{tcp: {}, interval: 1s, timeout: 2s}]", "spec.healthChecks[0].timeout: must not exceed interval"),
    ("[{http: {expectedStatuses: [700]}}]", "spec.healthChecks[0].http.expectedStatuses[0]: must be a status"),
    ("[{http: {expectedStatuses: ['300-200']}}]", "expectedStatuses[0]: range '300-200'"),
    ("[{http: {path: healthz}}]", "spec.healthChecks[0].http.path: must start with '/'"),
    ("[{tcp: {}, port: 80}, {http: {}, port: 80}]", "spec.healthChecks[1].port: port 80 already has"),
    ("[{tcp: {}, unhealthyThreshold: 0}]", "spec.healthChecks[0].unhealthyThreshold: must be an integer"),
    ("[{tcp: {}, interval: 10ms}]", "spec.healthChecks[0].interval: must be at least 50ms"),
    ("[{grpc: {service: 'a b'}}]", "spec.healthChecks[0].grpc.service: 'a b' is not a gRPC service name"),
    ("[{tcp: {}, every: 1s}]", "spec.healthChecks[0].every: unknown field"),
    ("{tcp: {}}", "spec.healthChecks: must be a list"),
])
def test_bad_health_checks_name_the_field(checks: str, expect: str) -> None:
    assert expect in _problems(_policy_doc(checks))


# ---------------------------------------------------------------- xDS path


def _snapshot_resources(nodes: Any = ()) -> tuple[dict[str, cluster_pb2.Cluster],
                                                 dict[str, endpoint_pb2.ClusterLoadAssignment]]:
    docs = model.parse_documents(POLICY)
    svcs = [d.obj for d in docs if isinstance(d.obj, model.ServiceSpec)]
    pols = [d.obj for d in docs if d.kind == "DestinationPolicy"]
    snap = build_snapshot(model.MeshConfig(), [ServiceEntry(s, "240.240.0.9") for s in svcs], list(nodes), [],
                          l7=([], pols))
    cls, clas = {}, {}
    for n, a in snap.get(xdsnames.CLUSTER).resources.items():
        cls[n] = cluster_pb2.Cluster()
        a.Unpack(cls[n])
    for n, a in snap.get(xdsnames.ENDPOINT).resources.items():
        clas[n] = endpoint_pb2.ClusterLoadAssignment()
        a.Unpack(clas[n])
    return cls, clas


def test_policy_becomes_cluster_health_checks_and_back() -> None:
    cls, _ = _snapshot_resources()
    c80 = cls[xdsnames.cluster_name("web", "default", 80, "mesh")]
    c81 = cls[xdsnames.cluster_name("web", "default", 81, "mesh")]
    hc = c80.health_checks[0]
    assert hc.http_health_check.path == "/healthz" and hc.unhealthy_threshold.value == 4
    assert [(r.start, r.end) for r in hc.http_health_check.expected_statuses] == [(200, 201), (204, 207)]
    assert c81.health_checks[0].grpc_health_check.service_name == "my.Svc"
    agent = l7convert.cluster_policy(c80).health_check
    assert agent == HealthCheck("http", 0, 2.0, 0.3, 0.2, 3, 4, "/healthz", ((200, 200), (204, 206)))
    assert l7convert.cluster_policy(c81).health_check == HealthCheck("grpc", grpc_service="my.Svc")


def test_agent_refuses_health_checks_it_cannot_run() -> None:
    cls, _ = _snapshot_resources()
    c = cls[xdsnames.cluster_name("web", "default", 80, "mesh")]
    c.health_checks[0].http_health_check.method = 3  # POST
    with pytest.raises(convert.ResourceError, match="http_health_check: send, receive and method"):
        convert.convert_cluster(c)
    c.health_checks.add().CopyFrom(c.health_checks[0])
    with pytest.raises(convert.ResourceError, match="health_checks: 2 given"):
        convert.convert_cluster(c)


def _reg(node: str, ip: str, *workloads: str) -> mesh_pb2.NodeRegistration:
    return mesh_pb2.NodeRegistration(node_name=node, addresses=[f"10.0.0.{ip}"], workloads=[
        mesh_pb2.WorkloadRegistration(name=w, namespace="default", service_account="web", ip=f"10.1.{ip}.{i + 1}",
                                      ports=[8080], labels={"app": "web"}) for i, w in enumerate(workloads)])


def _report(*items: tuple[str, int, bool]) -> mesh_pb2.HealthReport:
    return mesh_pb2.HealthReport(endpoints=[mesh_pb2.EndpointHealth(workload=w, port=p, healthy=h, detail="d")
                                            for w, p, h in items])


def test_reported_health_reaches_eds_and_the_plan() -> None:
    r = NodeRegistry()
    changes: list[int] = []
    r.subscribe(lambda: changes.append(r.version))
    r.register(_reg("node-1", "1", "web-a", "web-b"))
    r.register(_reg("node-2", "2", "web-c"))
    # node-2 may not speak for node-1's workloads: ignored.
    assert not r.set_health("node-2", _report(("default/web-a", 8080, False)))
    assert r.set_health("node-1", _report(("default/web-a", 8080, False), ("default/web-b", 8080, True)))
    assert not r.set_health("node-1", _report(("default/web-a", 8080, False)))  # same set: no rebuild
    assert len(changes) == 3
    _, clas = _snapshot_resources(r.nodes())
    info = convert.convert_assignment(clas[xdsnames.cluster_name("web", "default", 80, "mesh")])
    assert {e.workload: e.healthy for e in info.endpoints} == {
        "default/web-a": False, "default/web-b": True, "default/web-c": True}
    sp = ServicePort(80, 8080, "http", endpoints=info.endpoints)
    snap = Snapshot("v1", "node-1", MeshSettings(), services=(Service("web", "default", "240.240.0.9", (sp,)),))
    plan = plan_outbound(snap, LocalWorkload("c", "default", "c", "10.1.1.9", ()), "240.240.0.9", 80)
    assert plan.kind == "service" and "default/web-a" not in {e.workload for e in plan.endpoints}
    # Recovery, and a lease expiry forgets the report.
    assert r.set_health("node-1", _report(("default/web-a", 8080, True)))
    assert r.nodes()[0].unhealthy == frozenset()


# ---------------------------------------------------------------- thresholds


def _healthy(st: healthprober.HealthState) -> bool | None:
    """Read through a call: mypy keeps an attribute narrowed across the record() calls that change it."""
    return st.healthy


def test_thresholds() -> None:
    st = healthprober.HealthState(healthy_threshold=2, unhealthy_threshold=3)
    assert st.record(True, "ok") and _healthy(st) is True  # the first result decides at once
    assert not st.record(False, "x") and not st.record(False, "x") and _healthy(st)
    assert st.record(False, "x") and _healthy(st) is False  # third failure in a row
    assert not st.record(True, "ok") and not _healthy(st)
    assert not st.record(False, "x")  # a failure resets the pass count
    assert not st.record(True, "ok") and st.record(True, "ok") and _healthy(st)
    fresh = healthprober.HealthState(1, 5)
    assert fresh.record(False, "refused") and fresh.healthy is False


# ---------------------------------------------------------------- probes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _target(kind: str, port: int, **kw: Any) -> healthprober.ProbeTarget:
    return healthprober.ProbeTarget("default/w", "127.0.0.1", port,
                               HealthCheck(kind, timeout_s=kw.pop("timeout_s", 1.0), **kw))


def test_http_and_tcp_probes_against_the_lab_app() -> None:
    port = _free_port()

    async def main() -> list[tuple[bool, str]]:
        app = asyncio.get_running_loop().create_task(labapp._serve("w", "n", "127.0.0.1", port))
        for _ in range(100):
            try:
                (await asyncio.open_connection("127.0.0.1", port))[1].close()
                break
            except OSError:
                await asyncio.sleep(0.02)
        out = [await healthprober.run_probe(_target("http", port, http_path="/healthz"), 0),
               await healthprober.run_probe(_target("http", port, http_path="/x?status=503"), 0),
               await healthprober.run_probe(_target("http", port, http_path="/x?status=503",
                                              expected_statuses=((500, 503),)), 0),
               await healthprober.run_probe(_target("http", port, http_path="/x?delay_ms=500", timeout_s=0.1), 0),
               await healthprober.run_probe(_target("tcp", port), 0)]
        app.cancel()
        out.append(await healthprober.run_probe(_target("tcp", _free_port()), 0))
        out.append(await healthprober.run_probe(_target("http", _free_port()), 0))
        return out

    res = asyncio.run(main())
    assert res[0] == (True, "http 200 from /healthz")
    assert res[1] == (False, "http 503 from /x?status=503")
    assert res[2][0] is True
    assert res[3] == (False, "http: no answer within 100ms")
    assert res[4] == (True, "tcp connect ok")
    assert not res[5][0] and "connection refused" in res[5][1]
    assert not res[6][0] and "connection refused" in res[6][1]


@pytest.fixture
def grpc_server() -> Iterator[int]:
    """A real grpcio server with a grpc.health.v1 service written against raw
    bytes: "" and "ok.Svc" are SERVING, "down.Svc" NOT_SERVING, others NOT_FOUND."""

    def check(request: bytes, context: grpc.ServicerContext) -> bytes:
        service = request[2:].decode() if request else ""
        if service in ("", "ok.Svc"):
            return b"\x08\x01"
        if service == "down.Svc":
            return b"\x08\x02"
        context.abort(grpc.StatusCode.NOT_FOUND, f"unknown service {service}")
        return b""

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler("grpc.health.v1.Health", {
        "Check": grpc.unary_unary_rpc_method_handler(check)}),))
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield port
    server.stop(None)


def test_grpc_probe_speaks_the_health_protocol(grpc_server: int) -> None:
    async def main() -> list[tuple[bool, str]]:
        return [await healthprober.run_probe(_target("grpc", grpc_server, grpc_service=s), 0)
                for s in ("", "ok.Svc", "down.Svc", "nope.Svc")]

    res = asyncio.run(main())
    assert res[0] == (True, "grpc serving status 1") and res[1][0] is True
    assert res[2] == (False, "grpc serving status 2")
    assert res[3] == (False, "grpc: status 5 unknown service nope.Svc")
    assert healthprober.grpc_health_request("ok.Svc") == b"\x00\x00\x00\x00\x08\x0a\x06ok.Svc"


# ---------------------------------------------------------------- monitor


def _snap(node: str, hc: HealthCheck | None, ip: str = "10.1.1.1") -> Snapshot:
    eps = (Endpoint(ip, 8080, "default/web-a", "spiffe://x/ns/default/sa/web", "node-1", "10.0.0.1"),
           Endpoint("10.1.2.1", 8080, "default/web-c", "spiffe://x/ns/default/sa/web", "node-2", "10.0.0.2"))
    sp = ServicePort(80, 8080, "http", cluster="outbound|80||web", endpoints=eps,
                     policy=ClusterPolicy(health_check=hc))
    return Snapshot("v", node, MeshSettings(), services=(Service("web", "default", "240.240.0.9", (sp,)),))


def test_monitor_checks_only_local_endpoints_and_reports_flips() -> None:
    hc = HealthCheck("http", interval_s=0.01, timeout_s=0.01, unhealthy_threshold=2)
    script = iter([True, False, False, False, True] + [True] * 1000)
    probed: list[tuple[str, int]] = []
    reports: list[list[healthprober.HealthVerdict]] = []

    async def probe(t: healthprober.ProbeTarget, mark: int) -> tuple[bool, str]:
        probed.append((t.ip, t.port))
        ok = next(script)
        return ok, "ok" if ok else "http 503"

    async def main() -> None:
        mon = healthprober.HealthMonitor(reports.append, probe=probe)
        mon.set_snapshot(_snap("node-1", hc))
        for _ in range(200):
            if len(reports) >= 3:
                break
            await asyncio.sleep(0.01)
        mon.set_snapshot(_snap("node-1", None))  # the policy is gone: nothing checked, empty report
        await asyncio.sleep(0.03)
        await mon.close()

    asyncio.run(main())
    assert set(probed) == {("10.1.1.1", 8080)}  # node-2's endpoint is node-2's business
    flips = [[(v.workload, v.healthy) for v in r] for r in reports]
    assert flips[:3] == [[("default/web-a", True)], [("default/web-a", False)], [("default/web-a", True)]]
    assert reports[-1] == []


def test_snapshot_without_change_keeps_the_loop() -> None:
    hc = HealthCheck("tcp", interval_s=10, timeout_s=1)

    async def probe(t: healthprober.ProbeTarget, mark: int) -> tuple[bool, str]:
        return True, "ok"

    async def main() -> tuple[int, int]:
        mon = healthprober.HealthMonitor(lambda _v: None, probe=probe)
        mon.set_snapshot(_snap("node-1", hc))
        await asyncio.sleep(0.25)
        first = mon.checks_run
        mon.set_snapshot(_snap("node-1", hc))  # a new snapshot version, same target
        await asyncio.sleep(0.25)
        n = mon.checks_run
        await mon.close()
        return first, n

    assert asyncio.run(main()) == (1, 1)


# ---------------------------------------------------------------- report path over gRPC


def test_agent_session_reports_health(tmp_path: Any) -> None:
    async def main() -> None:
        registry = NodeRegistry()
        server = grpc.aio.server()
        mesh_pb2_grpc.add_RegistryServicer_to_server(RegistryServicer(registry), server)  # type: ignore[no-untyped-call]
        target = f"unix:{tmp_path}/cp.sock"  # the control plane's local transport: no node certificate needed
        server.add_insecure_port(target)
        await server.start()
        session = RegistrySession(target, _reg("node-1", "1", "web-a"), backoff_initial_s=0.05)
        session.set_health(_report(("default/web-a", 8080, False)))  # before connecting: sent after registering
        task = asyncio.get_running_loop().create_task(session.run())
        for _ in range(200):
            if registry.unhealthy("node-1"):
                break
            await asyncio.sleep(0.02)
        assert registry.unhealthy("node-1") == {("default/web-a", 8080): "d"}
        session.set_health(_report(("default/web-a", 8080, True)))
        for _ in range(200):
            if not registry.unhealthy("node-1"):
                break
            await asyncio.sleep(0.02)
        assert registry.unhealthy("node-1") == {}
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await server.stop(None)

    asyncio.run(main())
