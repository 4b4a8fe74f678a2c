"""End to end through the real mesh: two node namespaces, the control plane,
an agent per node with iptables capture, mTLS HBONE between the nodes."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import pytest

from nodeagent.supervision.settings import HBONE_PORT
from nodemesh.lab.harness import Lab, LabWorkload
from tests.conftest import wait_until
from tests.netns.conftest import BASE_CONFIG, CLIENT_UID, WEB_UID
from tests.netns.wirecheck import tcp_flows, walk_tls

pytestmark = pytest.mark.netns


def get_json(lab: Lab, url: str, node: int = 1, uid: int = CLIENT_UID) -> dict[str, Any]:
    res = lab.curl(node, url, uid=uid)
    assert res.returncode == 0, f"curl {url} failed: {res.stderr}\nagent-1:\n{lab.log('agent-1')[-2000:]}"
    doc: dict[str, Any] = json.loads(res.stdout)
    return doc


def test_vip_reaches_replica_on_other_node(mesh: Lab) -> None:
    vip = mesh.service_vip("web")
    body = get_json(mesh, f"http://{vip}/x")
    assert body["replica"] == "web-2"
    assert body["node"] == "node-2"


def test_bytes_between_nodes_are_tls(mesh: Lab) -> None:
    vip = mesh.service_vip("web")
    marker = f"secret-{uuid.uuid4().hex}"
    pcap = mesh.workdir / "bridge.pcap"
    with mesh.capture_bridge(pcap, "tcp"):
        body = get_json(mesh, f"http://{vip}/{marker}")
    assert body["path"] == f"/{marker}"
    flows = tcp_flows(pcap)
    # Only the HBONE port carried the request across the bridge (nothing went to
    # the workload's port directly), both ways, and nowhere in clear text.
    hbone = {f: d for f, d in flows.items() if HBONE_PORT in (f[1], f[3])}
    assert not [f for f in flows if 8080 in (f[1], f[3])], sorted(flows)
    assert any(f[3] == HBONE_PORT for f in hbone) and any(f[1] == HBONE_PORT for f in hbone), sorted(flows)
    assert not any(marker.encode() in d for d in flows.values()), "the request crossed the bridge in clear text"
    # Every byte of every HBONE stream is a TLS record, and data went as application data.
    for flow, data in hbone.items():
        walk = walk_tls(data)
        assert not walk.problem, f"{flow}: {walk.problem}"
        assert walk.records.get("application_data", 0) > 0, f"{flow}: no TLS application data ({walk.records})"


def test_receiving_proxy_records_caller_identity(mesh: Lab) -> None:
    vip = mesh.service_vip("web")
    get_json(mesh, f"http://{vip}/who")

    def inbound_logged() -> bool:
        return any(e.get("direction") == "inbound" and e.get("via") == "hbone" for e in mesh.access_log(2))

    wait_until(inbound_logged, 5, "an inbound access log line on node-2", tolerate=(Exception,))
    inbound = [e for e in mesh.access_log(2) if e.get("direction") == "inbound" and e.get("via") == "hbone"]
    assert inbound[-1]["source_principal"] == "spiffe://cluster.local/ns/default/sa/client"
    outbound = [e for e in mesh.access_log(1) if e.get("direction") == "outbound"]
    assert outbound and outbound[-1].get("dst_identity") == "spiffe://cluster.local/ns/default/sa/web"


def test_scaling_reaches_other_node_without_restart(mesh: Lab) -> None:
    vip = mesh.service_vip("web")
    agent1 = mesh.procs["agent-1"].pid
    # Add a replica on node 2 (a new workload, new port) and tell node-2's agent.
    mesh.add_workload(LabWorkload("web-3", node=2, uid=2002, ports=(8080 + 1,), service_account="web",
                                  labels={"app": "web"}))
    # The service's targetPort is 8080, so the new replica must serve it: use a second
    # service that selects by a label only web-3 has.
    mesh.apply(BASE_CONFIG + """\
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: web3, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 80, targetPort: 8081, protocol: http}]
""")
    mesh.start_app("web-3")
    mesh.reload_agent(2)
    vip3 = mesh.service_vip("web3")
    wait_until(lambda: get_json(mesh, f"http://{vip3}/")["replica"] == "web-3", 15,
               "node-1 to learn about web-3", tolerate=(Exception,))
    # Remove it again: the endpoint leaves node-1's view and web still works.
    mesh.stop("app-web-3")
    del mesh.workloads["web-3"]
    mesh.reload_agent(2)
    wait_until(lambda: mesh.curl(1, f"http://{vip3}/", uid=CLIENT_UID, timeout=2).returncode != 0, 15,
               "node-1 to drop web-3", tolerate=(Exception,))
    assert get_json(mesh, f"http://{vip}/")["replica"] == "web-2"
    assert mesh.procs["agent-1"].pid == agent1 and mesh.procs["agent-1"].poll() is None


def test_replica_added_to_existing_service(mesh: Lab) -> None:
    vip = mesh.service_vip("web")
    # A second replica of web, on node 1 this time; node 1 learns of it from the control plane.
    mesh.add_workload(LabWorkload("web-1", node=1, uid=WEB_UID, ports=(8080,), service_account="web",
                                  labels={"app": "web"}))

    assert get_json(mesh, f"http://{vip}/")["replica"] == "web-2"
    mesh.start_app("web-1")
    mesh.reload_agent(1)
    # A new endpoint is probed as soon as node-1 knows it (it starts as fast as its rival).
    wait_until(lambda: get_json(mesh, f"http://{vip}/")["replica"] == "web-1", 20,
               "the new replica web-1 to answer", tolerate=(Exception,))
    # Scale back down: web-2 carries the service again.
    mesh.stop("app-web-1")
    del mesh.workloads["web-1"]
    mesh.reload_agent(1)
    wait_until(lambda: all(get_json(mesh, f"http://{vip}/")["replica"] == "web-2" for _ in range(5)), 20,
               "web-1 to leave the endpoint set", tolerate=(Exception,))


def test_controlplane_restart_keeps_config_and_traffic(mesh: Lab) -> None:
    vip = mesh.service_vip("web")
    assert get_json(mesh, f"http://{vip}/")["replica"] == "web-2"
    mesh.stop("controlplane")
    # Agents keep serving their last good snapshot meanwhile.
    for _ in range(3):
        assert get_json(mesh, f"http://{vip}/")["replica"] == "web-2"
    mesh.start_controlplane()
    assert mesh.service_vip("web") == vip, "the VIP changed across a control plane restart"
    with mesh.config_client() as c:
        names = {r.name for r in c.list("Service")}
    assert "web" in names
    time.sleep(1.5)
    for _ in range(3):
        assert get_json(mesh, f"http://{vip}/")["replica"] == "web-2"


def test_malformed_apply_refused_with_field_path(mesh: Lab) -> None:
    vip = mesh.service_vip("web")
    bad = """\
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: web, namespace: default}
spec:
  selector: {app: web}
  ports: [{name: http, port: 99999, targetPort: 8080}]
"""
    with pytest.raises(Exception) as err:
        mesh.apply(bad)
    assert "spec.ports[0].port" in str(err.value)
    with mesh.config_client() as c:
        web = c.get("Service", "web", "default")
    assert json.loads(web.spec_json)["ports"][0]["port"] == 80
    assert get_json(mesh, f"http://{vip}/")["replica"] == "web-2"


def test_agent_stop_leaves_no_rule(mesh: Lab) -> None:
    before = mesh.ns_exec(mesh.node_ns(1), ["iptables-save"]).stdout
    assert "NODEMESH" in before
    rc = mesh.stop("agent-1")
    assert rc == 0, mesh.log("agent-1")[-2000:]
    after = mesh.ns_exec(mesh.node_ns(1), ["iptables-save"]).stdout
    assert "NODEMESH" not in after, after
    # With capture gone the workload's traffic is no longer captured, not black-holed:
    # a direct connection to node-2's workload port still works (plain TCP).
    body = get_json(mesh, f"http://{mesh.node_ip(2)}:8080/")
    assert body["replica"] == "web-2"


def test_killed_agent_leftovers_repaired_on_restart(mesh: Lab) -> None:
    import signal

    vip = mesh.service_vip("web")
    mesh.stop("agent-1", sig=signal.SIGKILL)
    rules = mesh.ns_exec(mesh.node_ns(1), ["iptables-save", "-t", "nat"]).stdout
    assert "NODEMESH" in rules  # a killed agent cannot clean up
    mesh.start_agent(1)
    rules = mesh.ns_exec(mesh.node_ns(1), ["iptables-save", "-t", "nat"]).stdout
    assert rules.count("-A OUTPUT -j NODEMESH_OUTPUT") == 1, rules
    # Inbound capture jumps from nat PREROUTING (redirect) or mangle PREROUTING (tproxy, the default).
    every = mesh.ns_exec(mesh.node_ns(1), ["iptables-save"]).stdout
    assert every.count("-A PREROUTING -j NODEMESH_PREROUTING") + every.count("-A PREROUTING -j NODEMESH_TPROXY") == 1
    assert get_json(mesh, f"http://{vip}/")["replica"] == "web-2"
