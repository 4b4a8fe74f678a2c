"""Certificates are short-lived and renewed at about half life, without dropping
connections: a keep-alive connection through the mesh survives a renewal, and new
connections after it use the new certificate."""

from __future__ import annotations

import json
import sys
import time

import pytest

from nodemesh.lab.harness import Lab, LabWorkload
from tests.netns.conftest import BASE_CONFIG, CLIENT_UID, WEB_UID

pytestmark = pytest.mark.netns

KEEPALIVE_CLIENT = r"""
import http.client, json, sys, time
host, seconds = sys.argv[1], float(sys.argv[2])
conn = http.client.HTTPConnection(host, 80, timeout=5)
ok = fail = 0
ports = set()
end = time.time() + seconds
while time.time() < end:
    try:
        conn.request("GET", "/renewal")
        body = json.loads(conn.getresponse().read())
        ok += 1
        ports.add(conn.sock.getsockname()[1])
    except Exception as e:
        fail += 1
        print("error:", e, file=sys.stderr)
        conn = http.client.HTTPConnection(host, 80, timeout=5)
    time.sleep(0.25)
print(json.dumps({"ok": ok, "fail": fail, "local_ports": sorted(ports)}))
"""


def test_renewal_keeps_connections(lab: Lab) -> None:
    lab.start_controlplane(extra=["--cert-ttl", "60"])  # the CA's minimum: renewal at about 30 s
    lab.apply(BASE_CONFIG)
    lab.add_workload(LabWorkload("web-2", node=2, uid=WEB_UID, ports=(8080,), service_account="web",
                                 labels={"app": "web"}))
    lab.add_workload(LabWorkload("client", node=1, uid=CLIENT_UID, service_account="client"))
    lab.start_app("web-2")
    lab.start_agent(1)
    lab.start_agent(2)
    vip = lab.service_vip("web")
    before = {k: lab.agent_status(k)["certs_version"] for k in (1, 2)}
    res = lab.ns_exec(lab.node_ns(1), [sys.executable, "-c", KEEPALIVE_CLIENT, vip, "40"], uid=CLIENT_UID,
                      check=False, timeout=70)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    after = {k: lab.agent_status(k)["certs_version"] for k in (1, 2)}
    assert all(after[k] > before[k] for k in (1, 2)), (before, after)
    assert out["fail"] == 0, res.stderr
    assert out["ok"] > 100
    assert len(out["local_ports"]) == 1, "the keep-alive connection was dropped and re-opened"
    # A new connection after the renewal works (it is set up with the renewed certificates).
    r = lab.curl(1, f"http://{vip}/after", uid=CLIENT_UID)
    assert r.returncode == 0 and json.loads(r.stdout)["replica"] == "web-2"
    time.sleep(0.3)
