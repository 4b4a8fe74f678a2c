"""Namespace-tier fixtures: each test builds its own small cluster and always removes it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from nodemesh.lab.harness import LAB_BINDINGS, Lab, LabWorkload
from tests.conftest import require_root, require_tool

BASE_CONFIG = f"""\
apiVersion: nodemesh.io/v1alpha1
kind: MeshConfig
metadata: {{name: mesh}}
spec: {{trustDomain: cluster.local, outboundPolicy: ALLOW_ANY, {LAB_BINDINGS}}}
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {{name: web, namespace: default}}
spec:
  selector: {{app: web}}
  ports: [{{name: http, port: 80, targetPort: 8080, protocol: http}}]
"""

CLIENT_UID = 3001
WEB_UID = 2001


@pytest.fixture
def lab(request: pytest.FixtureRequest) -> Iterator[Lab]:
    require_root("namespace tests")
    for tool in ("ip", "iptables-restore", "curl", "tcpdump", "setpriv"):
        require_tool(tool)
    lab_id = f"t{abs(hash(request.node.name)) % 100000}"
    with Lab(nodes=2, lab_id=lab_id, lease_seconds=4) as the_lab:
        yield the_lab
        if request.node.rep_call.failed if hasattr(request.node, "rep_call") else False:
            for name in ("controlplane", "agent-1", "agent-2"):
                print(f"--- {name} log ---\n{the_lab.log(name)[-4000:]}")


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):  # type: ignore[no-untyped-def]
    outcome = yield
    rep = outcome.get_result()
    setattr(item, "rep_" + rep.when, rep)


def base_mesh(lab: Lab) -> None:
    """The control plane with BASE_CONFIG, web-2 (started) on node 2 and a client on node 1; no agents yet."""
    lab.start_controlplane()
    lab.apply(BASE_CONFIG)
    lab.add_workload(LabWorkload("web-2", node=2, uid=WEB_UID, ports=(8080,), service_account="web",
                                 labels={"app": "web"}))
    lab.add_workload(LabWorkload("client", node=1, uid=CLIENT_UID, service_account="client",
                                 labels={"app": "client"}))
    lab.start_app("web-2")


@pytest.fixture
def mesh(lab: Lab) -> Lab:
    """Two nodes: web-1 on node 1 is NOT started (so cross-node is forced unless a test adds it),
    web-2 on node 2, and a client on node 1."""
    base_mesh(lab)
    lab.start_agent(1)
    lab.start_agent(2)
    # Discovery is eventually consistent: node-1 learns of web-2 one registry update
    # and one xDS push after node-2's agent registers. Tests start from steady state.
    vip = lab.service_vip("web")
    lab.wait_for(lambda: lab.curl(1, f"http://{vip}/", uid=CLIENT_UID, timeout=2).returncode == 0, 15,
                 "node-1 to reach web-2 through the mesh", lambda: lab.log("agent-1"))
    return lab
