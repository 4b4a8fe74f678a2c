"""Two control plane replicas on one etcd, end to end: etcd and replicas A and B
in the lab's hub, node 1's agent on A and node 2's on B (each lists the other
replica for failover). Config applied through A reaches agents on B; each
replica sees the other's registrations; a replica killed hands its agent to
the other, and the config stays."""

from __future__ import annotations

import json
import os
import shutil
import signal
import sys
import time
from typing import Any

import pytest

from controlplane.admincli import AdminClient
from controlplane.client import Credentials
from controlplane.etcd_client import single_member_argv
from nodemesh.lab import Lab, LabWorkload
from tests.conftest import require_tool
from tests.netns.test_security_ca import make_operator_ca

pytestmark = pytest.mark.netns

MESH = """\
apiVersion: nodemesh.io/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec: {trustDomain: cluster.local, outboundPolicy: ALLOW_ANY}
"""
CLIENT_UID, WEB_UID = 3001, 2001
PORT_A, PORT_B = 15010, 15020


def service(name: str, app: str) -> str:
    return (f"---\napiVersion: nodemesh.io/v1alpha1\nkind: Service\nmetadata: {{name: {name}, namespace: default}}\n"
            f"spec:\n  selector: {{app: {app}}}\n  ports: [{{name: http, port: 80, targetPort: 8080, protocol: http}}]\n")


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


def test_two_replicas_share_config_registrations_and_take_over(lab: Lab) -> None:
    require_tool("etcd")
    # etcd in the hub, on the hub's own loopback.
    lab.spawn("etcd", lab.hub, single_member_argv(str(lab.workdir / "etcd"), "127.0.0.1", 2379, 2380,
                                                  shutil.which("etcd") or "etcd"))
    lab.wait_for(lambda: lab.ns_exec(lab.hub, ["curl", "-sf", "http://127.0.0.1:2379/health"],
                                     check=False).returncode == 0, 20, "etcd", lambda: lab.log("etcd"))
    cert_f, key_f, chain_f, _ = make_operator_ca(lab.workdir / "operator-ca")
    common = ["--store", "etcd", "--etcd-endpoints", "http://127.0.0.1:2379",
              "--ca-cert", str(cert_f), "--ca-key", str(key_f), "--ca-chain", str(chain_f)]
    lab.start_controlplane(common)

    # A second replica without the shared control-plane CA is refused, saying what to copy.
    state_b = lab.workdir / "cp-state-b"
    state_b.mkdir()
    r = lab.ns_exec(lab.hub, [sys.executable, "-m", "nodemesh", "controlplane", "serve", "--state-dir",
                              str(state_b), "--listen", f"unix:{lab.workdir}/refused.sock", "--web-listen", "",
                              *common], check=False)
    assert r.returncode == 1 and "copy both from that replica's state dir" in r.stderr, r.stderr
    for f in ("cp-ca.pem", "cp-ca.key"):
        shutil.copy2(lab.workdir / "cp-state" / f, state_b / f)
    os.chmod(state_b / "cp-ca.key", 0o600)
    lab.start_controlplane(common + ["--web-listen", "127.0.0.1:15024"], replica="b", port=PORT_B)

    lab.apply(MESH + service("beta", "web-b"))  # through replica A
    lab.add_workload(LabWorkload("web-1", node=1, uid=WEB_UID, ports=(8080,), service_account="web",
                                 labels={"app": "web-a"}))
    lab.add_workload(LabWorkload("web-2", node=2, uid=WEB_UID, ports=(8080,), service_account="web",
                                 labels={"app": "web-b"}))
    lab.add_workload(LabWorkload("client-1", node=1, uid=CLIENT_UID, service_account="client"))
    lab.add_workload(LabWorkload("client-2", node=2, uid=CLIENT_UID, service_account="client"))
    lab.start_app("web-1")
    lab.start_app("web-2")
    a_addr, b_addr = f"{lab.cp_ip}:{PORT_A}", f"{lab.cp_ip}:{PORT_B}"
    lab.agent_control_plane[1] = {"address": a_addr, "addresses": [b_addr]}
    lab.agent_control_plane[2] = {"address": b_addr, "addresses": [a_addr]}
    lab.start_agent(1)  # joins and registers at A
    lab.start_agent(2)  # its join token was made at A; it joins and registers at B

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

    # Replica A dies. Node 1's agent fails over to B; its registration outlives A's lease.
    lab.stop("controlplane", sig=signal.SIGKILL)
    with client_of(lab, "b") as c:
        c.apply(MESH + service("beta", "web-b") + service("alpha", "web-a") + service("gamma", "web-b"))
    gamma = vip_of(lab, "b", "gamma")
    lab.wait_for(lambda: answers(lab, 1, gamma) == "web-2", 30, "node 1 to get gamma from B after A died",
                 lambda: lab.log("agent-1")[-3000:] + lab.log("controlplane-b"))
    assert "node node-1 registered" in lab.log("controlplane-b"), "node 1's agent did not re-register at B"
    time.sleep(lab.lease_seconds + 1)  # past A's etcd lease: node 1 counts only if it re-registered at B
    assert answers(lab, 2, alpha) == "web-1", lab.log("controlplane-b")[-3000:]
    # Config survives: everything applied through either replica is in the store, VIPs unchanged.
    with client_of(lab, "b") as c:
        assert sorted(r.name for r in c.list("Service")) == ["alpha", "beta", "gamma"]
    assert vip_of(lab, "b", "alpha") == alpha and vip_of(lab, "b", "beta") == beta
