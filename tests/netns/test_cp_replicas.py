"""Two control plane replicas on one etcd (over TLS with client certificates),
end to end: etcd and replicas A and B in the lab's hub, node 1's agent on A and
node 2's on B (each lists the other replica for failover). Config applied
through A reaches agents on B; each replica sees the other's registrations and
health reports; a replica killed hands its agent to the other, which keeps its
endpoints throughout, and the config stays; the leader killed in the middle of
a push: every node converges and the other replica leads within a lease; a
replica killed with a node that cannot reconnect: the leader expires that node
(once, saying why) within about a lease and its endpoints leave the other node."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import threading
import time
from typing import Any

import pytest

from controlplane.adminclient import AdminClient
from controlplane.apiclient import Credentials
from controlplane.etcd_client import make_etcd_certs, single_member_argv
from nodemesh.lab.harness import LAB_BINDINGS, Lab, LabWorkload
from tests.conftest import require_tool
from tests.netns.test_health import HEALTH_POLICY, endpoint_health
from tests.netns.test_security_ca import make_operator_ca

pytestmark = pytest.mark.netns

MESH = f"""\
apiVersion: nodemesh.io/v1alpha1
kind: MeshConfig
metadata: {{name: mesh}}
spec: {{trustDomain: cluster.local, outboundPolicy: ALLOW_ANY, {LAB_BINDINGS}}}
"""
CLIENT_UID, WEB_UID = 3001, 2001
PORT_A, PORT_B = 15010, 15020


def service(name: str, app: str) -> str:
    return (f"---\napiVersion: nodemesh.io/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n"
            f"spec:\n  selector: {{app: {app}}}\n"
            "  ports: [{name: http, port: 80, targetPort: 8080, protocol: http}]\n")


def client_of(lab: Lab, replica: str) -> Any:
    sock = lab.cp_unix if replica == "a" else f"unix:{lab.workdir}/controlplane-b.sock"
    return AdminClient(sock, timeout_s=10.0, credentials=Credentials())


def vip_of(lab: Lab, replica: str, name: str) -> str:
    with client_of(lab, replica) as c:
        return str(json.loads(c.get("Service", name, "default").status_json)["vip"])


def answers(lab: Lab, node: int, vip: str) -> str:
    r = lab.curl(node, f"http://{vip}/", uid=CLIENT_UID, timeout=3, extra=["-f"])
    if r.returncode != 0:
        return ""
    return str(json.loads(r.stdout).get("replica", ""))


def start_etcd(lab: Lab) -> list[str]:
    """etcd in the hub, on the hub's own loopback, TLS only, clients need a certificate
    of its CA; returns the control plane flags that reach it."""
    require_tool("etcd")
    certs = make_etcd_certs(str(lab.workdir / "etcd-pki"))
    lab.spawn("etcd", lab.hub, single_member_argv(str(lab.workdir / "etcd"), "127.0.0.1", 2379, 2380,
                                                  shutil.which("etcd") or "etcd", certs=certs))
    curl = ["curl", "-sf", "--cacert", certs.ca, "--cert", certs.client_cert, "--key", certs.client_key,
            "https://127.0.0.1:2379/health"]
    lab.wait_for(lambda: lab.ns_exec(lab.hub, curl, check=False).returncode == 0, 20, "etcd",
                 lambda: lab.log("etcd"))
    # Plaintext, or TLS without a client certificate, gets nothing.
    assert lab.ns_exec(lab.hub, ["curl", "-sf", "--max-time", "3", "http://127.0.0.1:2379/health"],
                       check=False).returncode != 0
    assert lab.ns_exec(lab.hub, ["curl", "-sf", "--max-time", "3", "--cacert", certs.ca,
                                 "https://127.0.0.1:2379/v3/kv/range", "-d", '{"key": "Lw=="}'],
                       check=False).returncode != 0
    return ["--etcd-endpoints", "https://127.0.0.1:2379", "--etcd-ca", certs.ca, "--etcd-cert", certs.client_cert,
            "--etcd-key", certs.client_key]


def start_two_replicas(lab: Lab, check_refusal: bool = False) -> list[str]:
    cert_f, key_f, chain_f, _ = make_operator_ca(lab.workdir / "operator-ca")
    common = ["--store", "etcd", *start_etcd(lab),
              "--ca-cert", str(cert_f), "--ca-key", str(key_f), "--ca-chain", str(chain_f)]
    lab.start_controlplane(common)
    state_b = lab.workdir / "cp-state-b"
    state_b.mkdir()
    if check_refusal:
        # A second replica without the shared control-plane CA is refused, saying what to copy.
        r = lab.ns_exec(lab.hub, [sys.executable, "-m", "nodemesh", "controlplane", "serve", "--state-dir",
                                  str(state_b), "--listen", f"unix:{lab.workdir}/refused.sock", "--web-listen", "",
                                  *common], check=False)
        assert r.returncode == 1 and "copy both from that replica's state dir" in r.stderr, r.stderr
    for f in ("cp-ca.pem", "cp-ca.key"):
        shutil.copy2(lab.workdir / "cp-state" / f, state_b / f)
    os.chmod(state_b / "cp-ca.key", 0o600)
    lab.start_controlplane(common + ["--web-listen", "127.0.0.1:15024"], replica="b", port=PORT_B)
    return common


def add_clients_and_start_apps(lab: Lab) -> None:
    lab.add_workload(LabWorkload("client-1", node=1, uid=CLIENT_UID, service_account="client"))
    lab.add_workload(LabWorkload("client-2", node=2, uid=CLIENT_UID, service_account="client"))
    lab.start_app("web-1")
    lab.start_app("web-2")


def start_agents(lab: Lab) -> None:
    """Node 1's agent on A, node 2's on B, each listing the other replica."""
    a_addr, b_addr = f"{lab.cp_ip}:{PORT_A}", f"{lab.cp_ip}:{PORT_B}"
    lab.agent_control_plane[1] = {"address": a_addr, "addresses": [b_addr]}
    lab.agent_control_plane[2] = {"address": b_addr, "addresses": [a_addr]}
    lab.start_agent(1)  # joins and registers at A
    lab.start_agent(2)  # its join token was made at A; it joins and registers at B


def is_leader(lab: Lab, replica: str) -> bool | None:
    """From the replica's /metrics; None when it does not answer."""
    port = 15014 if replica == "a" else 15024
    r = lab.ns_exec(lab.hub, ["curl", "-sf", "--max-time", "2", f"http://127.0.0.1:{port}/metrics"], check=False)
    if r.returncode != 0:
        return None
    return "\nnodemesh_controlplane_leader 1\n" in r.stdout


class EndpointWatch:
    """Samples node k's endpoints of a service in a thread until stopped, keeping
    every sample that lacks `workload`."""

    def __init__(self, lab: Lab, k: int, service: str, workload: str) -> None:
        self.misses: list[tuple[float, dict[str, bool]]] = []
        self.samples = 0
        self._stop = threading.Event()
        t0 = time.monotonic()

        def run() -> None:
            while not self._stop.is_set():
                seen = endpoint_health(lab, k, service)
                self.samples += 1
                if workload not in seen:
                    self.misses.append((round(time.monotonic() - t0, 1), seen))
                self._stop.wait(0.3)

        self._thread = threading.Thread(target=run, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)


def test_two_replicas_share_config_registrations_and_take_over(lab: Lab) -> None:
    start_two_replicas(lab, check_refusal=True)

    lab.apply(MESH + service("beta", "web-b"))  # through replica A
    lab.add_workload(LabWorkload("web-1", node=1, uid=WEB_UID, ports=(8080,), service_account="web",
                                 labels={"app": "web-a"}))
    lab.add_workload(LabWorkload("web-2", node=2, uid=WEB_UID, ports=(8080,), service_account="web",
                                 labels={"app": "web-b"}))
    add_clients_and_start_apps(lab)
    start_agents(lab)

    # Node 1 (snapshot from A) reaches web-2, which is registered at B.
    beta = vip_of(lab, "a", "beta")
    lab.wait_for(lambda: answers(lab, 1, beta) == "web-2", 20, "node 1 to reach beta on node 2",
                 lambda: lab.log("controlplane"))
    # A Service applied through A reaches node 2's agent through B, with web-1 (registered at A).
    lab.apply(MESH + service("beta", "web-b") + service("alpha", "web-a"))
    alpha = vip_of(lab, "b", "alpha")
    assert alpha == vip_of(lab, "a", "alpha")
    lab.wait_for(lambda: answers(lab, 2, alpha) == "web-1", 20, "node 2 to reach alpha (applied via A)",
                 lambda: lab.log("controlplane-b"))
    assert "registered through another control plane replica" in lab.log("controlplane-b")

    # Replica A dies. Node 1's agent fails over to B in time: its endpoints never leave node 2.
    assert endpoint_health(lab, 2, "default/alpha") == {"default/web-1": True}
    lab.stop("controlplane", sig=signal.SIGKILL)
    watch = EndpointWatch(lab, 2, "default/alpha", "default/web-1")
    with client_of(lab, "b") as c:
        c.apply(MESH + service("beta", "web-b") + service("alpha", "web-a") + service("gamma", "web-b"))
    gamma = vip_of(lab, "b", "gamma")
    lab.wait_for(lambda: answers(lab, 1, gamma) == "web-2", 30, "node 1 to get gamma from B after A died",
                 lambda: lab.log("agent-1")[-3000:] + lab.log("controlplane-b"))
    assert "node node-1 registered" in lab.log("controlplane-b"), "node 1's agent did not re-register at B"
    time.sleep(lab.lease_seconds * 1.5 + 1)  # past node 1's last lease published through A
    watch.stop()
    assert watch.samples >= 10 and watch.misses == [], f"{watch.misses} of {watch.samples} samples"
    assert answers(lab, 2, alpha) == "web-1", lab.log("controlplane-b")[-3000:]
    assert "node node-1 expired" not in lab.log("controlplane-b")
    # Config survives: everything applied through either replica is in the store, VIPs unchanged.
    with client_of(lab, "b") as c:
        assert sorted(r.name for r in c.list("Service")) == ["alpha", "beta", "gamma"]
    assert vip_of(lab, "b", "alpha") == alpha and vip_of(lab, "b", "beta") == beta


def test_health_is_shared_and_the_leader_killed_mid_push_hands_over(lab: Lab) -> None:
    start_two_replicas(lab)
    lab.apply(MESH + service("web", "web") + HEALTH_POLICY)  # through replica A
    lab.add_workload(LabWorkload("web-1", node=1, uid=WEB_UID, ports=(8080,), service_account="web",
                                 labels={"app": "web"}))
    lab.add_workload(LabWorkload("web-2", node=2, uid=WEB_UID + 1, ports=(8080,), service_account="web",
                                 labels={"app": "web"}))
    add_clients_and_start_apps(lab)
    start_agents(lab)
    both = {"default/web-1": True, "default/web-2": True}
    lab.wait_for(lambda: endpoint_health(lab, 1) == both and endpoint_health(lab, 2) == both, 20,
                 "both nodes to see both replicas")

    # web-2 dies: node 2's agent reports it to B; node 1, whose agent is on A, stops using it.
    lab.stop("app-web-2")
    lab.wait_for(lambda: endpoint_health(lab, 1).get("default/web-2") is False, 15,
                 "node 1 (on replica A) to learn of web-2's health reported through B",
                 lambda: lab.log("controlplane")[-3000:])
    assert "reported through another replica" in lab.log("controlplane")
    url = f"http://{vip_of(lab, 'a', 'web')}/h"
    res = lab.curl(1, url, uid=CLIENT_UID, timeout=30, extra=[*[url] * 19])
    assert [json.loads(line)["replica"] for line in res.stdout.splitlines() if line.strip()] == ["web-1"] * 20

    # One replica leads. Kill it right after an apply through it, while its push is in flight.
    lab.wait_for(lambda: [is_leader(lab, "a"), is_leader(lab, "b")] in ([True, False], [False, True]), 15,
                 "exactly one leader", lambda: f"a: {is_leader(lab, 'a')}, b: {is_leader(lab, 'b')}\n"
                 + lab.log("controlplane-b")[-3000:])
    leader, other = ("a", "b") if is_leader(lab, "a") else ("b", "a")
    docs = MESH + service("web", "web") + HEALTH_POLICY + "".join(service(f"svc-{i}", "web") for i in range(8))
    with client_of(lab, leader) as c:
        c.apply(docs)
    t0 = time.monotonic()
    lab.stop("controlplane" if leader == "a" else "controlplane-b", sig=signal.SIGKILL)
    lab.wait_for(lambda: is_leader(lab, other) is True, lab.lease_seconds + 6, f"replica {other} to lead",
                 lambda: lab.log("controlplane" if other == "a" else "controlplane-b")[-3000:])
    took = time.monotonic() - t0
    assert took <= lab.lease_seconds + 3, f"replica {other} led {took:.1f} s after the leader died"
    # Every node converges on the config the dead leader wrote, through the survivor.
    vips = [vip_of(lab, other, f"svc-{i}") for i in range(8)]
    for node in (1, 2):
        lab.wait_for(lambda node=node: all(answers(lab, node, v) == "web-1" for v in vips), 40,
                     f"node {node} to reach every new service",
                     lambda node=node: lab.log(f"agent-{node}")[-3000:])
    print(f"leadership moved {took:.2f} s after the leader was killed (lease {lab.lease_seconds} s)")


def metric(lab: Lab, replica: str, line_start: str) -> float | None:
    port = 15014 if replica == "a" else 15024
    r = lab.ns_exec(lab.hub, ["curl", "-sf", "--max-time", "2", f"http://127.0.0.1:{port}/metrics"], check=False)
    for line in r.stdout.splitlines():
        if line.startswith(line_start):
            return float(line.rsplit(" ", 1)[1])
    return None


@pytest.mark.parametrize("leader_dies", [False, True], ids=["follower-dies", "leader-dies"])
def test_a_dead_replicas_node_that_does_not_come_back_is_expired_by_the_leader(lab: Lab, leader_dies: bool) -> None:
    """Node 2's agent and the replica holding its session die together: the other
    replica (the leader, or the new one once it takes over) expires node 2 within
    about a lease of its last heartbeat, once, and node 1 stops seeing web-2."""
    start_two_replicas(lab)
    lab.apply(MESH + service("web", "web"))
    lab.add_workload(LabWorkload("web-1", node=1, uid=WEB_UID, ports=(8080,), service_account="web",
                                 labels={"app": "web"}))
    lab.add_workload(LabWorkload("web-2", node=2, uid=WEB_UID + 1, ports=(8080,), service_account="web",
                                 labels={"app": "web"}))
    add_clients_and_start_apps(lab)
    lab.wait_for(lambda: [is_leader(lab, "a"), is_leader(lab, "b")] in ([True, False], [False, True]), 15,
                 "exactly one leader")
    # The node whose replica dies is on the leader or on the follower, as the case says.
    b_leads = bool(is_leader(lab, "b"))
    a_addr, b_addr = f"{lab.cp_ip}:{PORT_A}", f"{lab.cp_ip}:{PORT_B}"
    doomed, kept = (b_addr, a_addr) if b_leads == leader_dies else (a_addr, b_addr)
    lab.agent_control_plane[1] = {"address": kept, "addresses": [doomed]}
    lab.agent_control_plane[2] = {"address": doomed, "addresses": [kept]}
    lab.start_agent(1)
    lab.start_agent(2)
    both = {"default/web-1": True, "default/web-2": True}
    lab.wait_for(lambda: endpoint_health(lab, 1) == both, 20, "node 1 to see both replicas of web")
    dead, survivor = ("b", "a") if doomed == b_addr else ("a", "b")
    survivor_log = "controlplane" if survivor == "a" else "controlplane-b"
    time.sleep(1.0)  # a heartbeat or two after registering: node 2's lease is its own, not its grant's

    lab.stop("agent-2", sig=signal.SIGKILL)
    t0 = time.monotonic()
    lab.stop("controlplane" if dead == "a" else "controlplane-b", sig=signal.SIGKILL)
    lease = lab.lease_seconds
    # Published leases are up to half a lease stale, so the leader allows that much more:
    # expired 1 to 1.5 leases after the last heartbeat (plus a takeover when the leader died).
    bound = lease * 1.5 + (lease + 1 if leader_dies else 0) + 4
    lab.wait_for(lambda: endpoint_health(lab, 1) == {"default/web-1": True}, bound,
                 "node 1 to lose web-2 after node 2 was expired", lambda: lab.log(survivor_log)[-3000:])
    took = time.monotonic() - t0
    assert took >= lease * 2 / 3, f"node 2 expired {took:.1f} s after its last heartbeat: before its lease ended"
    log = lab.log(survivor_log)
    lines = [line for line in log.splitlines() if "node node-2 expired" in line]
    assert len(lines) == 1 and "no heartbeat reached any replica" in lines[0], lines or log[-3000:]
    assert "node node-1 expired" not in log
    assert is_leader(lab, survivor) is True
    assert metric(lab, survivor, 'nodemesh_controlplane_node_expiries_total{cause="published"}') == 1
    with client_of(lab, survivor) as c:
        entries = [e for e in c.audit(200) if e.action == "ExpireNode"]
    assert len(entries) == 1 and entries[0].detail.startswith("node node-2: no heartbeat reached any replica"), entries
    assert "(leader)" in entries[0].principal
    # Node 1 stays registered and served throughout.
    assert endpoint_health(lab, 1) == {"default/web-1": True}
    print(f"node 2 expired {took:.1f} s after its replica and agent were killed (lease {lease} s, "
          f"{'leader' if leader_dies else 'follower'} killed)")
