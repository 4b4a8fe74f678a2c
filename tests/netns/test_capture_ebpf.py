"""eBPF capture with real agents: a cgroup-identified client on node 1 and a
uid-identified web replica on node 2, both agents in capture.mode ebpf.

These run for real: a kernel, bcc or header problem fails the test with the
agent's reason (the agent refuses to start in ebpf mode when it cannot load)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time

import pytest

from nodemesh.lab import Lab, LabWorkload
from tests.netns.conftest import BASE_CONFIG, CLIENT_UID, WEB_UID

pytestmark = pytest.mark.netns


def ebpf_status(lab: Lab, k: int) -> list[str]:
    """nm_* programs serving node k's netns (inside it, as the agent sees them)."""
    res = lab.ns_exec(lab.node_ns(k), [sys.executable, "-m", "nodeagent.capture.ebpf", "status"], check=False)
    assert res.returncode == 0, res.stderr
    return [line for line in res.stdout.splitlines() if line.strip()]


def remove_leftovers(lab: Lab) -> None:
    """Whatever a failed test left attached (programs on the cgroup root would
    outlive the lab's namespaces)."""
    for k in range(1, lab.nodes + 1):
        lab.ns_exec(lab.node_ns(k), [sys.executable, "-m", "nodeagent.capture.ebpf", "remove-leftovers"],
                    check=False)


def start(lab: Lab, policy: str = "open", exclude: tuple[str, ...] = ()) -> str:
    lab.capture_mode = "ebpf"
    lab.capture_extra = {"failurePolicy": policy, **({"excludeCidrs": list(exclude)} if exclude else {})}
    cgroup = f"/nodemesh-lab/{lab.lab_id}/client"
    lab.start_controlplane()
    lab.apply(BASE_CONFIG)
    lab.add_workload(LabWorkload("web-2", node=2, uid=WEB_UID, ports=(8080,), service_account="web",
                                 labels={"app": "web"}))
    lab.add_workload(LabWorkload("client", node=1, uid=CLIENT_UID, service_account="client",
                                 labels={"app": "client"}, cgroup=cgroup))
    lab.ensure_cgroup(cgroup)
    lab.start_app("web-2")
    lab.start_agent(2)
    lab.start_agent(1)
    return cgroup


def curl(lab: Lab, cgroup: str, url: str, timeout: float = 5.0) -> subprocess.CompletedProcess[str]:
    return lab.curl(1, url, uid=CLIENT_UID, timeout=timeout, cgroup=cgroup)


def outbound_lines(lab: Lab) -> list[dict]:
    return [e for e in lab.access_log(1) if e.get("direction") == "outbound"]


def test_ebpf_outbound_exclusions_and_clean_removal(lab: Lab) -> None:
    web_direct = f"http://{lab.node_ip(2)}:8080/direct"
    try:
        cgroup = start(lab, exclude=(f"{lab.node_ip(2)}/32",))
        assert lab.agent_status(1).get("capture_installed"), lab.log("agent-1")[-3000:]
        attached = ebpf_status(lab, 1)
        assert any(f"{cgroup} cgroup_inet4_connect nm_connect4" in a for a in attached), attached
        assert any("cgroup_getsockopt nm_getsockopt" in a for a in attached), attached
        # node 2's workload is identified by uid: programs on the cgroup root, filtered by uid.
        assert any("/ cgroup_inet4_connect nm_connect4_uid" in a for a in ebpf_status(lab, 2))

        # Outbound to a VIP: connect4 sends it to the proxy, getsockopt gives the
        # proxy the VIP, and the proxy's own HBONE connect is not captured again.
        vip = lab.service_vip("web")
        res = curl(lab, cgroup, f"http://{vip}/via-ebpf")
        assert res.returncode == 0, f"{res.stderr}\n{lab.log('agent-1')[-3000:]}"
        body = json.loads(res.stdout)
        assert body["replica"] == "web-2" and body["path"] == "/via-ebpf"
        lab.wait_for(lambda: bool(outbound_lines(lab)), 5, "an outbound access log line")
        line = outbound_lines(lab)[-1]
        assert line.get("source_workload") == "default/client", line  # attributed by cgroup
        assert line.get("dst_identity") == "spiffe://cluster.local/ns/default/sa/web", line

        # Excluded CIDR: the connect goes straight to node 2, not through the proxy.
        before = len(outbound_lines(lab))
        res = curl(lab, cgroup, web_direct)
        assert res.returncode == 0, res.stderr
        assert json.loads(res.stdout)["path"] == "/direct"
        time.sleep(0.5)
        assert len(outbound_lines(lab)) == before, "an excluded destination went through the proxy"

        # A process outside the client's cgroup (same uid) is not captured at all.
        res = lab.curl(1, f"http://{vip}/", uid=CLIENT_UID, timeout=1)
        assert res.returncode != 0

        # Clean removal: a stopped agent leaves nothing attached.
        lab.stop("agent-1")
        lab.stop("agent-2")
        assert ebpf_status(lab, 1) == []
        assert ebpf_status(lab, 2) == []
        tree = subprocess.run(["bpftool", "cgroup", "show", str(lab_cgroup_path(cgroup))],
                              capture_output=True, text=True, check=True).stdout
        assert "nm_" not in tree, tree
    finally:
        remove_leftovers(lab)


def lab_cgroup_path(cgroup: str) -> str:
    from nodemesh.lab import cgroup2_root

    return str(cgroup2_root() / cgroup.strip("/"))


def kill_agent(lab: Lab, k: int) -> None:
    """SIGKILL the agent and its proxy workers: nothing runs remove(), the
    programs stay attached, and the liveness entry goes stale."""
    lab.stop(f"agent-{k}", sig=signal.SIGKILL, timeout=5)


@pytest.mark.parametrize("policy", ["open", "closed"])
def test_ebpf_failure_policy_with_proxy_killed(lab: Lab, policy: str) -> None:
    web_direct = f"http://{lab.node_ip(2)}:8080/after-kill"
    try:
        cgroup = start(lab, policy=policy)
        vip = lab.service_vip("web")
        assert curl(lab, cgroup, f"http://{vip}/").returncode == 0, lab.log("agent-1")[-3000:]
        kill_agent(lab, 1)
        assert ebpf_status(lab, 1), "a killed agent's programs should still be attached"
        time.sleep(2.5)  # past the liveness timeout (2 s)
        t0 = time.monotonic()
        res = curl(lab, cgroup, web_direct, timeout=5)
        took = time.monotonic() - t0
        if policy == "open":
            # Bypass: straight to node 2's workload, unmeshed (counted in the kernel).
            assert res.returncode == 0, res.stderr
            assert json.loads(res.stdout)["path"] == "/after-kill"
        else:
            # Refused at once (EPERM from connect4), never left hanging.
            assert res.returncode != 0, res.stdout
            assert took < 2.0, f"a refused connect took {took:.1f}s"
        # The next agent finds the leftovers, replaces them, and capture works again.
        lab.start_agent(1)
        # (failurePolicy open removes them at start, closed replaces them at install)
        assert "ebpf: detached" in lab.log("agent-1"), lab.log("agent-1")[-3000:]
        assert len([a for a in ebpf_status(lab, 1) if "nm_connect4" in a]) == 1
        res = curl(lab, cgroup, f"http://{vip}/again")
        assert res.returncode == 0, f"{res.stderr}\n{lab.log('agent-1')[-3000:]}"
        lab.stop("agent-1")
        lab.stop("agent-2")
        assert ebpf_status(lab, 1) == []
    finally:
        remove_leftovers(lab)
