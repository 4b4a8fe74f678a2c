"""eBPF capture with real agents: a cgroup-identified client on node 1 and a
uid-identified web replica on node 2, both agents in capture.mode ebpf.

These run for real: a kernel, bcc or header problem fails the test with the
agent's reason (the agent refuses to start in ebpf mode when it cannot load)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import pytest

from nodemesh.lab.harness import Lab, LabWorkload
from tests.netns.conftest import BASE_CONFIG, CLIENT_UID, WEB_UID

pytestmark = pytest.mark.netns


def ebpf_status(lab: Lab, k: int) -> list[str]:
    """nm_* programs serving node k's netns (inside it, as the agent sees them)."""
    res = lab.ns_exec(lab.node_ns(k), [sys.executable, "-m", "nodeagent.capture.bpfcli", "status"], check=False)
    assert res.returncode == 0, res.stderr
    return [line for line in res.stdout.splitlines() if line.strip()]


def remove_leftovers(lab: Lab) -> None:
    """Whatever a failed test left attached (programs on the cgroup root would
    outlive the lab's namespaces)."""
    for k in range(1, lab.nodes + 1):
        lab.ns_exec(lab.node_ns(k), [sys.executable, "-m", "nodeagent.capture.bpfcli", "remove-leftovers"],
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


def outbound_lines(lab: Lab) -> list[dict[str, Any]]:
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

        # DNS, unconnected sendto() (sendmsg4): a mesh name answered by the agent's
        # DNS proxy, and the reply shows the nameserver the workload asked (recvmsg4).
        res = lab.ns_exec(lab.node_ns(1), [sys.executable, "-c", SENDTO_DNS], uid=CLIENT_UID, cgroup=cgroup,
                          check=False, timeout=10)
        assert res.returncode == 0, res.stderr
        src, answer = json.loads(res.stdout)
        assert src == ["10.255.255.53", 53], src
        assert answer == vip, answer

        # Clean removal: a stopped agent leaves nothing attached and frees its maps.
        maps = map_ids(lab, 1)
        assert maps, "no maps found for the attached programs"
        lab.stop("agent-1")
        lab.stop("agent-2")
        assert ebpf_status(lab, 1) == []
        assert ebpf_status(lab, 2) == []
        tree = subprocess.run(["bpftool", "cgroup", "show", str(lab_cgroup_path(cgroup))],
                              capture_output=True, text=True, check=True).stdout
        assert "nm_" not in tree, tree
        left = [m for m in maps if subprocess.run(["bpftool", "map", "show", "id", str(m)],
                                                  capture_output=True, check=False).returncode == 0]
        assert not left, f"maps still alive (pinned or referenced) after stop: {left}"
    finally:
        remove_leftovers(lab)


SENDTO_DNS = """
import json, socket
from nodeagent.dns.message import (CLASS_IN, FLAG_RD, TYPE_A, Message, Question, build_message, name_from_text,
                                   parse_message)
q = build_message(Message(7, FLAG_RD, (Question(name_from_text("web.default.svc.mesh"), TYPE_A, CLASS_IN),)))
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.settimeout(3)
s.sendto(q, ("10.255.255.53", 53))
data, src = s.recvfrom(4096)
print(json.dumps([list(src), socket.inet_ntoa(parse_message(data).answers[0].rdata)]))
"""


def map_ids(lab: Lab, k: int) -> list[int]:
    """Ids of the maps the programs serving node k use (from bpftool)."""
    ids: set[int] = set()
    for line in ebpf_status(lab, k):
        prog = int(line.rsplit("prog id ", 1)[1].rstrip(")"))
        info = json.loads(subprocess.run(["bpftool", "-j", "prog", "show", "id", str(prog)],
                                         capture_output=True, text=True, check=True).stdout)
        ids.update(info.get("map_ids", []))
    return sorted(ids)


def lab_cgroup_path(cgroup: str) -> str:
    from nodemesh.lab.harness import cgroup2_root

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
        # open: removed on stop; closed: left refusing (like iptables/nftables) until
        # the next agent replaces it or `nodemesh capture remove` takes it away.
        assert bool(ebpf_status(lab, 1)) == (policy == "closed")
        if policy == "closed":
            t0 = time.monotonic()
            assert curl(lab, cgroup, web_direct, timeout=3).returncode != 0
            assert time.monotonic() - t0 < 1.5
            rm = lab.ns_exec(lab.node_ns(1), [sys.executable, "-m", "nodemesh", "capture", "remove"], check=False)
            assert rm.returncode == 0, rm.stderr
            assert ebpf_status(lab, 1) == []
    finally:
        remove_leftovers(lab)


def proxy_workers(lab: Lab, k: int) -> list[int]:
    pids = subprocess.run(["ip", "netns", "pids", lab.node_ns(k)], capture_output=True, text=True,
                          check=False).stdout.split()
    out = []
    for pid in pids:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if b"nodeagent.proxy.worker" in f.read():
                    out.append(int(pid))
        except OSError:
            continue
    return out


@pytest.mark.parametrize("policy", ["open", "closed"])
def test_ebpf_frozen_workers_stop_the_heartbeat(lab: Lab, policy: str) -> None:
    """The workers, not the agent, keep the kernel's liveness entry fresh: with
    their event loops frozen (SIGSTOP; the listeners still exist) the kernel
    applies failurePolicy within ~2 s; SIGCONT resumes capture."""
    web_direct = f"http://{lab.node_ip(2)}:8080/frozen"
    try:
        cgroup = start(lab, policy=policy)
        vip = lab.service_vip("web")
        assert curl(lab, cgroup, f"http://{vip}/").returncode == 0, lab.log("agent-1")[-3000:]
        workers = proxy_workers(lab, 1)
        assert workers
        for pid in workers:
            os.kill(pid, signal.SIGSTOP)
        try:
            time.sleep(2.3)  # past the 2 s liveness timeout
            t0 = time.monotonic()
            res = curl(lab, cgroup, web_direct, timeout=3)
            took = time.monotonic() - t0
            if policy == "open":
                assert res.returncode == 0, f"{res.stderr}\n{lab.log('agent-1')[-2000:]}"
                assert json.loads(res.stdout)["path"] == "/frozen"
                counter = "bypass_stale"
            else:
                assert res.returncode != 0 and took < 1.5, (res.returncode, took)
                counter = "refused_stale"
            lab.wait_for(lambda: lab.agent_status(1).get("proxy_state") == ("bypass" if policy == "open" else "refuse"),
                         3, "the watchdog to see the frozen proxy")
            st = lab.ns_exec(lab.node_ns(1), [sys.executable, "-m", "nodemesh", "capture", "status"], check=False)
            assert f"{counter} " in st.stdout, st.stdout
        finally:
            for pid in workers:
                os.kill(pid, signal.SIGCONT)
        lab.wait_for(lambda: lab.agent_status(1).get("proxy_state") == "serving", 5, "capture back")
        res = curl(lab, cgroup, f"http://{vip}/thawed")
        assert res.returncode == 0, f"{res.stderr}\n{lab.log('agent-1')[-2000:]}"
        assert json.loads(res.stdout)["path"] == "/thawed"
    finally:
        remove_leftovers(lab)


DUAL_STACK_GET = """
import json, socket, sys
host, port, path = sys.argv[1], int(sys.argv[2]), sys.argv[3]
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.settimeout(5)
s.connect((host, port))
peer = s.getpeername()[:2]
s.sendall(f"GET {path} HTTP/1.1\\r\\nHost: web\\r\\nConnection: close\\r\\n\\r\\n".encode())
data = b""
while True:
    chunk = s.recv(65536)
    if not chunk:
        break
    data += chunk
print(json.dumps({"peer": list(peer), "response": data.decode(errors="replace")}))
"""

NATIVE6_SERVER = """
import socket, sys
s = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind((sys.argv[1], int(sys.argv[2])))
s.listen(8)
while True:
    c, peer = s.accept()
    c.sendall(("native6 from " + peer[0]).encode())
    c.close()
"""


def dual_stack(lab: Lab, cgroup: str, host: str, port: int, path: str = "/") -> subprocess.CompletedProcess[str]:
    return lab.ns_exec(lab.node_ns(1), [sys.executable, "-c", DUAL_STACK_GET, host, str(port), path],
                       uid=CLIENT_UID, cgroup=cgroup, check=False, timeout=10)


def test_ebpf_dual_stack_socket_is_captured_native_ipv6_is_not(lab: Lab) -> None:
    """An AF_INET6 socket dialling ::ffff:<VIP> (Java/Node/Python dual-stack
    style) goes through the mesh via connect6 and sees ::ffff:<VIP> as its peer;
    a native IPv6 destination is left alone and counted (v6_native_bypass)."""
    try:
        cgroup = start(lab)
        assert any(f"{cgroup} cgroup_inet6_connect nm_connect6" in a for a in ebpf_status(lab, 1))
        assert any("/ cgroup_inet6_connect nm_connect6_uid" in a for a in ebpf_status(lab, 2))
        vip = lab.service_vip("web")
        logged = len(outbound_lines(lab))
        res = dual_stack(lab, cgroup, f"::ffff:{vip}", 80, "/via-connect6")
        assert res.returncode == 0, f"{res.stderr}\n{lab.log('agent-1')[-3000:]}"
        out = json.loads(res.stdout)
        assert out["peer"] == [f"::ffff:{vip}", 80], out  # getpeername6
        head, _, body = out["response"].partition("\r\n\r\n")
        assert head.startswith("HTTP/1.1 200"), out["response"]
        answer = json.loads(body)
        assert (answer["replica"], answer["path"]) == ("web-2", "/via-connect6"), answer
        lab.wait_for(lambda: len(outbound_lines(lab)) > logged, 5, "an outbound access log line")
        line = outbound_lines(lab)[-1]
        assert line.get("source_workload") == "default/client", line  # cgroup recorded by connect6
        assert line.get("dst_identity") == "spiffe://cluster.local/ns/default/sa/web", line

        # Native IPv6 (a ULA on both nodes' eth0): not meshed, reached directly, counted.
        for k, addr in ((1, "fd00:77::11"), (2, "fd00:77::12")):
            lab.ns_exec(lab.node_ns(k), ["sysctl", "-qw", "net.ipv6.conf.eth0.disable_ipv6=0"], check=False)
            lab.ns_exec(lab.node_ns(k), ["ip", "-6", "addr", "add", f"{addr}/64", "dev", "eth0", "nodad"])
        lab.spawn("native6", lab.node_ns(2), [sys.executable, "-c", NATIVE6_SERVER, "fd00:77::12", "8081"])
        lab.wait_for(lambda: lab._listening(2, 8081), 5, "the native IPv6 listener", lambda: lab.log("native6"))
        before = len(outbound_lines(lab))
        script = ("import socket; s = socket.socket(socket.AF_INET6); s.settimeout(5); "
                  "s.connect(('fd00:77::12', 8081)); print(s.getpeername()[0], s.recv(100).decode())")
        res = lab.ns_exec(lab.node_ns(1), [sys.executable, "-c", script], uid=CLIENT_UID, cgroup=cgroup,
                          check=False, timeout=10)
        assert res.returncode == 0, res.stderr
        assert res.stdout.split() == ["fd00:77::12", "native6", "from", "fd00:77::11"], res.stdout
        time.sleep(0.5)
        assert len(outbound_lines(lab)) == before, "a native IPv6 connect went through the proxy"
        st = lab.ns_exec(lab.node_ns(1), [sys.executable, "-m", "nodemesh", "capture", "status"], check=False)
        assert "v6_native_bypass 1" in st.stdout, st.stdout
    finally:
        remove_leftovers(lab)
