"""etcd writes per second spent on node liveness (controlplane/noderegistry.py
PUBLISH_FRACTION): N nodes registered with one replica on a real etcd (TLS with
client certificates), each heartbeating at a third of its lease as agents do,
for a while of real time; the writes counted by etcd's own revision (one per
writing transaction). Run once publishing on every heartbeat and once at the
fraction in the code, so the cost of the choice is measured, not assumed.

    .venv/bin/python bench/liveness_writes.py --nodes 1000 --lease 15 --seconds 30

Prints one JSON object per run. Needs etcd on PATH (Debian's etcd-server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from controlplane import noderegistry
from controlplane.etcd_client import make_etcd_certs, single_member_argv, wait_ready
from controlplane.noderegistry import NodeRegistry
from controlplane.store_etcd import EtcdStore, share_registry
from nodemesh.v1 import mesh_pb2


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _registration(k: int) -> mesh_pb2.NodeRegistration:
    ip = f"10.{k // 65536 % 256}.{k // 256 % 256}.{k % 256}"
    return mesh_pb2.NodeRegistration(node_name=f"node-{k:05d}", addresses=[ip], workloads=[
        mesh_pb2.WorkloadRegistration(name=f"w-{k}", namespace="default", service_account="sa", ip=ip,
                                      ports=[8080])])


async def _run(store: EtcdStore, nodes: int, lease: float, seconds: float, fraction: float) -> dict[str, object]:
    noderegistry.PUBLISH_FRACTION = fraction
    registry = NodeRegistry(store, lease)
    share_registry(store, registry)
    for k in range(nodes):
        registry.register(_registration(k))
    await asyncio.to_thread(store.flush)
    period = lease / 3  # nodeagent/cpregistration.py heartbeat_interval
    start = time.monotonic()
    due = [start + period * k / nodes for k in range(nodes)]  # heartbeats spread over a period
    rev0 = await store.client.run(store.client.revision())
    published = 0
    real = store.publish_liveness

    def counted(name: str, until_unix_ms: int) -> None:
        nonlocal published
        published += 1
        real(name, until_unix_ms)

    store.publish_liveness = counted  # type: ignore[method-assign]
    heartbeats = 0
    while (now := time.monotonic()) - start < seconds:
        for k in range(nodes):
            if due[k] <= now:
                registry.renew(f"node-{k:05d}")
                heartbeats += 1
                due[k] += period
        await asyncio.sleep(0.02)
    await asyncio.to_thread(store.flush)
    took = time.monotonic() - start
    rev1 = await store.client.run(store.client.revision())
    store.publish_liveness = real  # type: ignore[method-assign]
    return {"nodes": nodes, "lease_s": lease, "publish_fraction": fraction, "seconds": round(took, 1),
            "heartbeats_per_s": round(heartbeats / took, 1), "publications_per_s": round(published / took, 1),
            "etcd_writes_per_s": round((rev1 - rev0) / took, 1)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--nodes", type=int, default=1000)
    ap.add_argument("--lease", type=float, default=15.0)
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--fractions", default=f"0,{noderegistry.PUBLISH_FRACTION}",
                    help="publish fractions to run, comma-separated (0: every heartbeat)")
    args = ap.parse_args()
    if shutil.which("etcd") is None:
        print("etcd is not on PATH: install etcd-server (scripts/setup.sh does)", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="liveness-bench-") as tmp:
        work = Path(tmp)
        certs = make_etcd_certs(str(work / "pki"))
        port, peer = _free_port(), _free_port()
        with open(work / "etcd.log", "w") as elog:
            proc = subprocess.Popen(single_member_argv(str(work / "etcd"), "127.0.0.1", port, peer, certs=certs),
                                    stdout=elog, stderr=elog, stdin=subprocess.DEVNULL)
        try:
            endpoint = f"https://127.0.0.1:{port}"
            wait_ready(endpoint, tls=certs.tls())
            for i, fraction in enumerate(float(f) for f in args.fractions.split(",")):
                store = EtcdStore([endpoint], f"/bench-{i}", tls=certs.tls(), node_lease_s=args.lease)
                try:
                    print(json.dumps(asyncio.run(_run(store, args.nodes, args.lease, args.seconds, fraction))))
                finally:
                    store.close()
        finally:
            proc.terminate()
            proc.wait(10)
    return 0


if __name__ == "__main__":
    sys.exit(main())
