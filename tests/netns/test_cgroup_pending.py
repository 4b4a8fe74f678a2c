"""A workload declared by a cgroup that does not exist yet: the agent names it,
captures the other workloads, and captures it once the cgroup appears."""

from __future__ import annotations

import json

from nodemesh.lab.harness import Lab, LabWorkload, cgroup2_root
from tests.netns.conftest import CLIENT_UID, base_mesh

LATE = "nodemesh-test-late"


def _nat(lab: Lab) -> str:
    return lab.ns_exec(lab.node_ns(1), ["iptables-save", "-t", "nat"]).stdout


def test_missing_cgroup_is_named_the_rest_captured_and_it_is_picked_up(lab: Lab) -> None:
    cg = f"{LATE}-{lab.lab_id}/app"
    path = cgroup2_root() / cg
    assert not path.exists()
    base_mesh(lab)
    lab.add_workload(LabWorkload("late", node=1, uid=0, service_account="late", labels={"app": "late"}, cgroup=cg))
    lab.start_agent(2)
    lab.start_agent(1)
    st = lab.agent_status(1)
    assert st["capture_installed"] is True, st
    pending = {"workload": "default/late", "cgroup": "/" + cg, "reason": "cgroup does not exist"}
    assert st["capture_pending"] == [pending]
    assert "--uid-owner 3001" in _nat(lab) and "--path" not in _nat(lab)
    log = lab.log("agent-1")
    assert f"workload default/late: its cgroup '/{cg}' does not exist (yet)" in log, log[-3000:]
    vip = lab.service_vip("web")
    lab.wait_for(lambda: lab.curl(1, f"http://{vip}/", uid=CLIENT_UID, timeout=2).returncode == 0, 15,
                 "the other workloads to be meshed", lambda: lab.log("agent-1"))
    lab.ensure_cgroup(cg)
    lab.wait_for(lambda: lab.agent_status(1).get("capture_pending") == [], 10, "no pending workloads",
                 lambda: lab.log("agent-1")[-3000:])
    assert "workload default/late: its cgroup appeared" in lab.log("agent-1")
    assert cg in _nat(lab), _nat(lab)
    assert lab.agent_status(1)["capture_installed"] is True
    # Its processes are meshed now, as the late workload (not unknown, not the client).
    res = lab.curl(1, f"http://{vip}/late", uid=4242, timeout=5, cgroup=cg)
    assert res.returncode == 0, res.stderr
    lab.wait_for(lambda: any(e.get("path") == "/late" for e in lab.access_log(1)), 5, "the access log line")
    line = next(e for e in lab.access_log(1) if e.get("path") == "/late" and e.get("direction") == "outbound")
    assert line["source_workload"] == "default/late", json.dumps(line)
