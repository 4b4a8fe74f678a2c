"""`nodemesh demo`: a two-node mesh on this machine, traffic across it, and what happened.

Builds the namespace lab (nodemesh.lab), starts the control plane on its SQLite
default, an agent per node, an HTTP service `web` with a replica on each node and
a `client` workload, applies the sample config, sends requests by the service's
VIP and shows which replica answered, over which proxies, with which identities,
and that nothing but TLS crossed the wire between the nodes. Everything it made
is removed at the end or on Ctrl-C.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import time
import uuid
from pathlib import Path

from nodemesh.lab.harness import Lab, LabError, LabWorkload

SAMPLE_CONFIG = """\
apiVersion: nodemesh.io/v1alpha1
kind: MeshConfig
metadata:
  name: mesh
spec:
  trustDomain: cluster.local
  outboundPolicy: ALLOW_ANY
  # Which identities may run where (default deny): the operator binds them.
  identityBindings:
    - name: web
      nodes: [node-1, node-2]
      serviceAccounts: [default/web]
      workloadLabels: {app: [web]}
    - name: client
      nodes: [node-1]
      serviceAccounts: [default/client]
      workloadLabels: {app: [client]}
---
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata:
  name: web
  namespace: default
spec:
  selector:
    app: web
  ports:
    - name: http
      port: 80
      targetPort: 8080
      protocol: http
"""


DEMO_LAB_ID = "demo"


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: unwinds like Ctrl-C (a KeyboardInterrupt subclass, so every
    handler that cleans up after Ctrl-C cleans up after SIGTERM too)."""


def _terminated(_sig: int, _frame: object) -> None:
    raise Terminated()


def _say(msg: str = "") -> None:
    print(msg, flush=True)


def _step(msg: str) -> None:
    _say(f"\n==> {msg}")


def pcap_summary(path: Path, marker: bytes) -> tuple[bool, int]:
    """(marker seen in clear, count of TLS application-data record headers) in a pcap."""
    data = path.read_bytes() if path.exists() else b""
    return marker in data, data.count(b"\x17\x03\x03")


def run_demo(requests: int = 6, keep: bool = False) -> int:
    if os.geteuid() != 0:
        _say("nodemesh demo: run as root (it creates network namespaces and capture rules)")
        return 1
    for tool in ("ip", "iptables-restore", "curl", "tcpdump"):
        if shutil.which(tool) is None:
            _say(f"nodemesh demo: {tool} is missing; run `make setup` (scripts/setup.sh) first")
            return 1
    lab = Lab(nodes=2, lab_id=DEMO_LAB_ID)
    # A demo interrupted earlier may have left its namespaces behind (only the
    # demo's own: test labs may be running beside it).
    from nodemesh.lab.harness import cleanup_all

    cleanup_all(DEMO_LAB_ID)
    # SIGTERM (kill, systemd, a terminal closing) ends the demo like Ctrl-C:
    # through the `finally` below, which removes everything it made.
    previous = signal.signal(signal.SIGTERM, _terminated)
    try:
        _step("creating two node namespaces joined by a bridge")
        lab.create()
        for k in (1, 2):
            _say(f"    {lab.node_name(k)}: netns {lab.node_ns(k)}, address {lab.node_ip(k)}")
        _say(f"    control plane: netns {lab.hub}, {lab.cp_addr} (state in {lab.workdir}/cp-state)")

        _step("starting the control plane (SQLite store, CA, xDS) and applying the sample config")
        lab.start_controlplane()
        for line in SAMPLE_CONFIG.strip().splitlines():
            _say(f"    | {line}")
        for r in lab.apply(SAMPLE_CONFIG):
            _say(f"    {r.kind} {(r.namespace + '/') if r.namespace else ''}{r.name}: {r.action}")
        vip = lab.service_vip("web")
        _say(f"    service default/web got VIP {vip}")

        _step("starting an agent on each node, with its workloads")
        lab.add_workload(LabWorkload("web-1", node=1, uid=2001, ports=(8080,), service_account="web",
                                     labels={"app": "web"}))
        lab.add_workload(LabWorkload("web-2", node=2, uid=2001, ports=(8080,), service_account="web",
                                     labels={"app": "web"}))
        lab.add_workload(LabWorkload("client", node=1, uid=3001, service_account="client",
                                     labels={"app": "client"}))
        for name in ("web-1", "web-2"):
            lab.start_app(name)
        for k in (1, 2):
            lab.start_agent(k)
            st = lab.agent_status(k)
            _say(f"    {lab.node_name(k)}: capture installed, snapshot {st.get('snapshot_version', '?')}, "
                 f"identities {', '.join(sorted(st.get('certs', {}))) or '-'}")

        import json

        def send(label: str) -> dict[str, int]:
            answers: dict[str, int] = {}
            for i in range(requests):
                res = lab.curl(1, f"http://{vip}/hello?marker={marker}", uid=3001,
                               extra=["-H", f"x-demo-marker: {marker}"])
                if res.returncode != 0:
                    _say(f"    {label} request {i + 1}: FAILED: {res.stderr.strip()}")
                    continue
                body = json.loads(res.stdout)
                answers[body["replica"]] = answers.get(body["replica"], 0) + 1
                _say(f"    {label} request {i + 1}: answered by {body['replica']} on {body['node']}")
            time.sleep(0.5)  # access logs are written at connection close
            return answers

        def show_logs(since: list[int]) -> None:
            for k in (1, 2):
                entries = lab.access_log(k)
                for e in entries[since[k - 1]:]:
                    _say(f"    {lab.node_name(k)} {e.get('direction', '?'):8} "
                         f"{e.get('source_principal') or e.get('source_workload', '?')} -> "
                         f"{e.get('dst_service') or e.get('dst_workload') or e.get('dst_addr', '?')} "
                         f"[{e.get('dst_workload', '?')} as {e.get('dst_identity') or '-'}] "
                         f"via {e.get('via', '?')}{' (mTLS)' if e.get('tls') else ''} "
                         f"{e.get('bytes_sent', '?')}B out/{e.get('bytes_received', '?')}B back"
                         + (f" error={e.get('error')}" if e.get("error") else ""))
                since[k - 1] = len(entries)

        marker = f"demo-{uuid.uuid4().hex[:12]}"
        seen = [0, 0]
        _step(f"client on node-1 (uid 3001) sends {requests} requests to http://{vip}/ "
              "(both replicas up)")
        first = send("vip")
        _say("    (the proxy picks a replica per connection with power of two choices over a peak-EWMA "
             "of connect latency and outstanding connections)")
        _step("what the node proxies saw (access logs)")
        show_logs(seen)

        _step("scaling web down to the replica on node-2: web-1 leaves node-1's agent config (SIGHUP)")
        lab.stop("app-web-1")
        del lab.workloads["web-1"]
        lab.reload_agent(1)
        lab.wait_for(lambda: lab.curl(1, f"http://{vip}/", uid=3001).stdout.find("web-2") >= 0, 15,
                     "node-1 to route web to node-2")
        seen = [len(lab.access_log(1)), len(lab.access_log(2))]
        pcap = lab.workdir / "bridge.pcap"
        _step(f"client on node-1 sends {requests} more requests to http://{vip}/, "
              "capturing the bridge between the nodes")
        with lab.capture_bridge(pcap):
            second = send("vip")
        _step("what the node proxies saw (access logs)")
        show_logs(seen)

        _step("what crossed the bridge between the nodes")
        clear, records = pcap_summary(pcap, marker.encode())
        _say(f"    TLS application-data records: {records}; request marker seen in clear text: "
             f"{'YES (not encrypted!)' if clear else 'no'}")
        ok = (sum(first.values()) == requests and second.get("web-2") == requests and not clear
              and records > 0)
        answers = {k: first.get(k, 0) + second.get(k, 0) for k in set(first) | set(second)}
        _step("summary: " + ", ".join(f"{k} answered {v}" for k, v in sorted(answers.items()))
              + (" - mesh OK" if ok else " - something failed, see the logs in " + str(lab.workdir)))
        if not ok:
            lab.keep_workdir = True
        if keep:
            _say(f"\nlab left running (logs in {lab.workdir}); Ctrl-C to remove it")
            lab.keep_workdir = True
            while True:
                time.sleep(3600)
        return 0 if ok else 1
    except LabError as e:
        _say(f"\nnodemesh demo failed: {e}")
        lab.keep_workdir = True
        _say(f"logs kept in {lab.workdir}")
        return 1
    except Terminated:
        return 128 + signal.SIGTERM
    except KeyboardInterrupt:
        return 130
    finally:
        # A second Ctrl-C or SIGTERM must not cut the clean-up short.
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        interrupt = signal.signal(signal.SIGINT, signal.SIG_IGN)
        try:
            _step("removing every namespace, rule and process the demo made")
            lab.destroy()
            _say("    done")
        finally:
            signal.signal(signal.SIGINT, interrupt)
            signal.signal(signal.SIGTERM, previous)


if __name__ == "__main__":
    sys.exit(run_demo())
