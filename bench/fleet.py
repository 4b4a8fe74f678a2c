# ruff: noqa: E402 - the project's imports follow the sys.path line, so the script runs from a checkout
"""Fleet simulator: N simulated node agents in one process against a real
control plane in its own process, to measure what a fleet costs the control
plane (issue 13).

Each simulated agent does what a node agent does on the wire, nothing less:
- joins with a one-time token (NodeAttestation.Join over the server-only TLS
  port, a CSR for its own key) and gets a node certificate;
- opens one mutual-TLS channel with that certificate;
- holds a registry session (Registry.Session: registers its workloads,
  heartbeats at a third of the lease);
- holds an ADS stream (Delta by default, or state of the world) subscribed to
  every agent type, decodes every response and ACKs it.
It does not run a proxy or build the agent's Snapshot (that is per-node CPU
the control plane never sees).

Measured, with the control plane's CPU and RSS read from /proc:
- join storm: all N join at once; time until every agent holds every
  workload of the mesh; CPU; no lease expiry, no reconnect loop;
- route change (an HTTPRoute applied) and one workload start (a node
  re-registers with one more workload): per node, the time from the API call
  (or the re-registration) until the node has ACKed the change; p50/p99/max,
  total bytes received by all agents, control plane CPU per change;
- control plane memory per connected node, and its RSS over a soak of
  heartbeats.

    .venv/bin/python bench/fleet.py --nodes 100 [--protocol delta|sotw] [--out FILE]

Raw results go to --out as JSON (docs/bench-data/).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import discovery_pb2

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from controlplane.adminclient import AdminClient
from controlplane.apiclient import ConfigClient
from nodeagent.identity.attest import node_csr
from nodemesh import xdsnames
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc

ADS = "/envoy.service.discovery.v3.AggregatedDiscoveryService/"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def pctl(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def summary(values: list[float]) -> dict[str, float]:
    return {"n": len(values), "p50": pctl(values, 0.5), "p99": pctl(values, 0.99), "max": max(values or [0.0]),
            "mean": statistics.fmean(values) if values else float("nan")}


class Proc:
    """The control plane processes (one per replica): CPU seconds and RSS from
    /proc, summed over them."""

    def __init__(self, *pids: int) -> None:
        self.pids = pids

    def cpu_s(self) -> float:
        total = 0.0
        for pid in self.pids:
            with open(f"/proc/{pid}/stat") as f:
                parts = f.read().rsplit(")", 1)[1].split()
            total += (int(parts[11]) + int(parts[12])) / CLK_TCK  # utime, stime
        return total

    def rss_mb(self) -> float:
        total = 0.0
        for pid in self.pids:
            with open(f"/proc/{pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) / 1024
        return total


def profile_summary(raw_path: str, top: int = 25) -> list[tuple[float, str]]:
    """py-spy's raw collapsed stacks as (percent of samples, function file) by
    inclusive time, skipping the event loop's own frames."""
    inclusive: dict[str, int] = {}
    total = 0
    with open(raw_path) as f:
        for line in f:
            stack, _, count = line.rstrip().rpartition(" ")
            if not count.isdigit():
                continue
            n = int(count)
            total += n
            frames = {fr.split(" (")[0] + " " + fr.split("(")[-1].split(":")[0].rsplit("/", 1)[-1]
                      for fr in stack.split(";")}
            for fr in frames:
                inclusive[fr] = inclusive.get(fr, 0) + n
    skip = ("runners.py", "base_events.py", "events.py", "runpy", "__main__.py", "threading.py", "cli")
    ranked = sorted(((100 * n / max(1, total), fr) for fr, n in inclusive.items()
                     if not any(k in fr for k in skip)), reverse=True)
    return [(round(p, 1), fr) for p, fr in ranked[:top]]


def loop_metrics(web_port: int) -> dict[str, Any]:
    """From the (first) control plane's /metrics: how late its event loop ran
    (controlplane/looplag.py), how many snapshots it published, and how long
    rebuilds were held for the previous push to be answered."""
    import urllib.request

    from nodemesh.prom import histogram_quantile

    with urllib.request.urlopen(f"http://127.0.0.1:{web_port}/metrics", timeout=30) as r:  # noqa: S310
        text = r.read().decode()
    out: dict[str, Any] = {}
    for family, key in (("nodemesh_controlplane_event_loop_lag_seconds", "lag"),
                        ("nodemesh_controlplane_publish_hold_seconds", "hold")):
        bounds, cum, total = [], [], 0.0
        for line in text.splitlines():
            if line.startswith(family + "_bucket{"):
                le = line.split('le="', 1)[1].split('"', 1)[0]
                if le != "+Inf":
                    bounds.append(float(le))
                cum.append(float(line.rsplit(" ", 1)[1]))
            elif line.startswith(family + "_sum"):
                total = float(line.rsplit(" ", 1)[1])
        if cum:  # a family never observed has no buckets
            counts = [c - p for c, p in zip(cum, [0.0, *cum[:-1]], strict=True)]
            out[key] = {"n": int(cum[-1]), "sum_s": round(total, 2),
                        "p50_s": round(histogram_quantile(bounds, counts, 0.5), 3),
                        "p99_s": round(histogram_quantile(bounds, counts, 0.99), 3),
                        "over_1s": int(cum[-1] - next((c for b, c in zip(bounds, cum, strict=False) if b >= 1), 0))}
    for line in text.splitlines():
        if line.startswith("nodemesh_controlplane_snapshots_published_total"):
            out["snapshots_published"] = int(float(line.rsplit(" ", 1)[1]))
        elif line.startswith("nodemesh_controlplane_xds_streams_awaiting_answer "):
            out["streams_awaiting_answer"] = int(float(line.rsplit(" ", 1)[1]))
    return out


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


# ------------------------------------------------------------------ one simulated agent


@dataclass
class Agent:
    name: str
    index: int
    workloads: list[mesh_pb2.WorkloadRegistration]
    key: ec.EllipticCurvePrivateKey
    csr: str
    token: str = ""
    held: dict[str, dict[str, str]] = field(default_factory=dict)  # type -> name -> version
    sotw_versions: dict[str, str] = field(default_factory=dict)
    ads_streams: int = 0
    ads_errors: int = 0
    registry_sessions: int = 0
    registry_errors: int = 0
    bytes_received: int = 0
    responses: int = 0
    nacks: int = 0
    join_errors: list[str] = field(default_factory=list)
    depends: frozenset[str] | None = None  # service names whose endpoints it subscribes to; None: all
    eds_globs: set[str] = field(default_factory=set)
    # As the agent (nodeagent/xds/client.py): Workloads by name, its own and those behind
    # the endpoint slices it holds (slice name -> workload resource names).
    wl_names: set[str] = field(default_factory=set)
    wl_sent: bool = False
    slice_members: dict[str, frozenset[str]] = field(default_factory=dict)
    expected_workloads: int = 0  # how many Workloads it should hold once converged
    ads_outbox: asyncio.Queue[Any] | None = None  # the open ADS stream's requests
    channel: grpc.aio.Channel | None = None
    outbox: asyncio.Queue[mesh_pb2.NodeReport] | None = None
    registration: mesh_pb2.NodeRegistration | None = None

    def count(self, type_url: str) -> int:
        return len(self.held.get(type_url, {}))


class Fleet:
    def __init__(self, args: argparse.Namespace, cp_targets: list[str], ca_pem: bytes, admin: str) -> None:
        self.args = args
        self.cp_targets = cp_targets  # one per replica: agent i joins and connects to replica i % len
        self.ca_pem = ca_pem
        self.admin = admin
        self.agents: list[Agent] = []
        self.watchers: list[tuple[Any, asyncio.Future[None], dict[str, float]]] = []
        self.tasks: list[asyncio.Task[None]] = []
        self.lease_s = 15.0

    # -- checks run after every response --
    def watch(self, pred: Any) -> tuple[asyncio.Future[None], dict[str, float]]:
        """Resolve when pred(agent) holds for every agent; record per-agent times."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        done: dict[str, float] = {}
        for a in self.agents:
            if pred(a):
                done[a.name] = time.monotonic()
        self.watchers.append((pred, fut, done))
        self._check_done()
        return fut, done

    def _observe(self, a: Agent) -> None:
        now = time.monotonic()
        for pred, _fut, done in self.watchers:
            if a.name not in done and pred(a):
                done[a.name] = now
        self._check_done()

    def _check_done(self) -> None:
        for entry in list(self.watchers):
            _pred, fut, done = entry
            if len(done) == len(self.agents) and not fut.done():
                fut.set_result(None)
                self.watchers.remove(entry)

    # -- join --
    async def join(self, a: Agent) -> None:
        creds = grpc.ssl_channel_credentials(root_certificates=self.ca_pem)
        target = self.cp_targets[a.index % len(self.cp_targets)]
        join_target = f"127.0.0.1:{int(target.rsplit(':', 1)[1]) + 1}"  # the server-only TLS port
        async with grpc.aio.secure_channel(join_target, creds) as ch:
            resp = await mesh_pb2_grpc.NodeAttestationStub(ch).Join(  # type: ignore[no-untyped-call]
                mesh_pb2.JoinRequest(token=a.token, node_name=a.name, csr_pem=a.csr), timeout=60)
        chain = "".join(resp.node_cert_chain).encode()
        key_pem = a.key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
        a.channel = grpc.aio.secure_channel(
            target, grpc.ssl_channel_credentials(root_certificates=self.ca_pem, private_key=key_pem,
                                                         certificate_chain=chain),
            options=(("grpc.max_receive_message_length", 64 * 1024 * 1024),))

    # -- registry session --
    async def registry(self, a: Agent) -> None:
        assert a.channel is not None
        a.registration = mesh_pb2.NodeRegistration(
            node_name=a.name, addresses=[f"10.{a.index // 65536}.{a.index // 256 % 256}.{a.index % 256}"],
            agent_version="fleet-sim", zone=f"z{a.index % 3}", workloads=a.workloads)
        while True:
            outbox: asyncio.Queue[mesh_pb2.NodeReport] = asyncio.Queue()
            outbox.put_nowait(mesh_pb2.NodeReport(register=a.registration))
            a.outbox = outbox

            async def reports(q: asyncio.Queue[mesh_pb2.NodeReport] = outbox) -> Any:
                while True:
                    yield await q.get()

            async def beat(q: asyncio.Queue[mesh_pb2.NodeReport] = outbox) -> None:
                await asyncio.sleep(random.uniform(0, self.lease_s / 3))
                beats = 0
                while True:
                    beats += 1
                    q.put_nowait(mesh_pb2.NodeReport(heartbeat=mesh_pb2.Heartbeat(
                        sent_unix_ms=int(time.time() * 1000), telemetry_json=self.telemetry(a, beats))))
                    await asyncio.sleep(self.lease_s / 3)

            a.registry_sessions += 1
            hb = asyncio.create_task(beat())
            try:
                call = mesh_pb2_grpc.RegistryStub(a.channel).Session(reports())  # type: ignore[no-untyped-call]
                async for grant in call:
                    self.lease_s = grant.lease_seconds or self.lease_s
            except grpc.aio.AioRpcError:
                a.registry_errors += 1
            finally:
                hb.cancel()
                a.outbox = None
            await asyncio.sleep(0.5)

    def telemetry(self, a: Agent, beats: int) -> str:
        """A traffic summary as the agent's heartbeat carries it (nodeagent/admin.py
        telemetry_json): --edges edges, cumulative counters growing every beat, so
        the mesh view holds and aggregates what a real fleet reports."""
        if not self.args.edges or not a.workloads:
            return ""
        n, services = self.args.nodes, self.args.services
        edges = []
        for k in range(self.args.edges):
            src = a.workloads[k % len(a.workloads)]
            peer = (a.index + 1 + k * 13) % n
            edges.append({
                "reporter": "source", "source": f"default/{src.name}",
                "destination_service_key": f"default/svc-{(a.index + k) % services}",
                "destination_workload": f"default/w{peer}-0", "destination_service": f"svc-{(a.index + k) % services}",
                "requests": beats * 10, "errors": beats // 10, "tcp_opened": beats, "tcp_closed": beats,
                "tcp_failed": 0, "bytes_sent": beats * 5000, "bytes_received": beats * 20000,
                "p99_ms": 3.0 + (k % 7), "mtls": ["mutual"]})
        return json.dumps({"edges": edges})

    def reregister(self, a: Agent, workloads: list[mesh_pb2.WorkloadRegistration]) -> None:
        assert a.registration is not None and a.outbox is not None
        a.workloads = workloads
        del a.registration.workloads[:]
        a.registration.workloads.extend(workloads)
        a.outbox.put_nowait(mesh_pb2.NodeReport(register=a.registration))
        if self.args.protocol == "delta" and a.ads_outbox is not None:
            req = self._workload_request(a)  # its own new workload, by name
            if req is not None:
                a.ads_outbox.put_nowait(req)

    # -- ADS --
    async def ads(self, a: Agent) -> None:
        assert a.channel is not None
        delta = self.args.protocol == "delta"
        from nodeagent.xds.client import node_proto

        while True:
            q: asyncio.Queue[Any] = asyncio.Queue()
            a.eds_globs = set()
            a.wl_names, a.wl_sent = set(), False
            a.ads_outbox = q
            for t in xdsnames.AGENT_TYPES:
                if delta and t == xdsnames.WORKLOAD:
                    req = self._workload_request(a)
                    if req is not None:
                        q.put_nowait(req)
                elif delta and t == xdsnames.ENDPOINT:
                    # As the agent: endpoint slices by glob per wanted cluster, once clusters are known.
                    req = self._eds_request(a, first=True)
                    if req is not None:
                        q.put_nowait(req)
                elif delta:
                    q.put_nowait(discovery_pb2.DeltaDiscoveryRequest(
                        node=node_proto(a.name), type_url=t, resource_names_subscribe=["*"],
                        initial_resource_versions=a.held.get(t, {})))
                else:
                    q.put_nowait(discovery_pb2.DiscoveryRequest(node=node_proto(a.name), type_url=t,
                                                                version_info=a.sotw_versions.get(t, "")))

            async def requests(q: asyncio.Queue[Any] = q) -> Any:
                while True:
                    yield await q.get()

            resp_cls = discovery_pb2.DeltaDiscoveryResponse if delta else discovery_pb2.DiscoveryResponse
            method = a.channel.stream_stream(
                ADS + ("DeltaAggregatedResources" if delta else "StreamAggregatedResources"),
                request_serializer=lambda m: m.SerializeToString(),
                response_deserializer=lambda b, c=resp_cls: (len(b), c.FromString(b)))
            a.ads_streams += 1
            # Keep the call referenced: grpc.aio cancels a call (CANCELLED) whose object is
            # garbage-collected while its request-consuming task still runs.
            call = method(requests())
            try:
                async for size, resp in call:
                    a.bytes_received += size
                    a.responses += 1
                    t = resp.type_url
                    if delta:
                        held = a.held.setdefault(t, {})
                        for r in resp.resources:
                            held[r.name] = r.version
                            if t == xdsnames.ENDPOINT:
                                a.slice_members[r.name] = self._members(r.resource.value)
                        for n in resp.removed_resources:
                            held.pop(n, None)
                            a.slice_members.pop(n, None)
                        q.put_nowait(discovery_pb2.DeltaDiscoveryRequest(type_url=t, response_nonce=resp.nonce))
                        if t == xdsnames.CLUSTER:
                            req = self._eds_request(a, first=not a.eds_globs)
                            if req is not None:
                                q.put_nowait(req)
                        if t in (xdsnames.CLUSTER, xdsnames.ENDPOINT):
                            req = self._workload_request(a)
                            if req is not None:
                                q.put_nowait(req)
                    else:
                        a.held[t] = {self._sotw_name(t, r): resp.version_info for r in resp.resources}
                        a.sotw_versions[t] = resp.version_info
                        q.put_nowait(discovery_pb2.DiscoveryRequest(type_url=t, version_info=resp.version_info,
                                                                    response_nonce=resp.nonce))
                    self._observe(a)
            except grpc.aio.AioRpcError as e:
                a.ads_errors += 1
                if a.ads_errors <= 3:
                    print(f"  {a.name}: ADS stream ended: {e.code().name} {e.details()}", file=sys.stderr)
            await asyncio.sleep(0.5 + random.random())

    @staticmethod
    def _eds_request(a: Agent, first: bool) -> discovery_pb2.DeltaDiscoveryRequest | None:
        wanted = {xdsnames.slice_glob(c) for c in a.held.get(xdsnames.CLUSTER, {})
                  if a.depends is None or c.rsplit("|", 1)[1].split(".", 1)[0] in a.depends}
        add, drop = wanted - a.eds_globs, a.eds_globs - wanted
        if not add and not drop:
            return None
        a.eds_globs = wanted
        req = discovery_pb2.DeltaDiscoveryRequest(type_url=xdsnames.ENDPOINT, resource_names_subscribe=sorted(add),
                                                  resource_names_unsubscribe=sorted(drop))
        if first:
            req.initial_resource_versions.update(a.held.get(xdsnames.ENDPOINT, {}))
        return req

    @staticmethod
    def _members(cla_bytes: bytes) -> frozenset[str]:
        """The Workload resource names behind one endpoint slice (decoded, as the agent does)."""
        cla = endpoint_pb2.ClusterLoadAssignment.FromString(cla_bytes)
        out = set()
        for loc in cla.endpoints:
            for lb in loc.lb_endpoints:
                meta = lb.metadata.filter_metadata[xdsnames.METADATA_KEY]
                ns, _, name = meta.fields["workload"].string_value.partition("/")
                out.add(xdsnames.workload_resource_name(meta.fields["node"].string_value, ns, name))
        return frozenset(out)

    @staticmethod
    def _workload_request(a: Agent) -> discovery_pb2.DeltaDiscoveryRequest | None:
        held_eds = a.held.get(xdsnames.ENDPOINT, {})
        wanted = {xdsnames.workload_resource_name(a.name, w.namespace, w.name) for w in a.workloads}
        for n, members in a.slice_members.items():
            if n in held_eds:
                wanted |= members
        add, drop = wanted - a.wl_names, a.wl_names - wanted
        if not add and not drop:
            return None
        held = a.held.setdefault(xdsnames.WORKLOAD, {})
        for n in drop:
            held.pop(n, None)
        a.wl_names = wanted
        req = discovery_pb2.DeltaDiscoveryRequest(type_url=xdsnames.WORKLOAD, resource_names_subscribe=sorted(add),
                                                  resource_names_unsubscribe=sorted(drop))
        if not a.wl_sent:
            a.wl_sent = True
            req.node.CopyFrom(Fleet._node(a))
            req.initial_resource_versions.update(held)
        return req

    @staticmethod
    def _node(a: Agent) -> Any:
        from nodeagent.xds.client import node_proto

        return node_proto(a.name)

    @staticmethod
    def _sotw_name(type_url: str, r: Any) -> str:
        # State of the world carries no names beside the resources: take them from the bytes.
        from nodeagent.xds.convert import MESSAGES, default_name

        return default_name(MESSAGES[type_url].FromString(r.value))

    async def start_agent(self, a: Agent) -> None:
        # As the agent (nodeagent/identity/attest.py): a failed join is retried with backoff.
        for attempt in range(8):
            try:
                await self.join(a)
                break
            except grpc.aio.AioRpcError as e:
                a.join_errors.append(f"{e.code().name}: {e.details()}")
                if attempt == 7:
                    raise
                await asyncio.sleep(min(5.0, 0.2 * 2 ** attempt) * random.uniform(0.5, 1.0))
        self.tasks.append(asyncio.create_task(self.registry(a)))
        self.tasks.append(asyncio.create_task(self.ads(a)))


# ------------------------------------------------------------------ the run


def config_docs(services: int, port: int = 80) -> str:
    # The operator's identity bindings (default deny): every simulated node may run the
    # bench's service accounts, at the simulated node and workload addresses.
    docs = ["""apiVersion: nodemesh.io/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec:
  identityBindings:
    - {name: fleet, nodes: ['*'], serviceAccounts: [default/*], workloadLabels: {app: ['*']},
       addresses: [10.0.0.0/8, 172.16.0.0/12, 192.168.0.0/16]}
"""]
    for i in range(services):
        docs.append(f"""apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {{name: svc-{i}}}
spec: {{selector: {{app: svc-{i}}}, ports: [{{port: {port}, targetPort: 8080, protocol: http}}]}}
""")
    return "---\n".join(docs)


def route_doc(n: int) -> str:
    return f"""apiVersion: nodemesh.io/v1alpha1
kind: HTTPRoute
metadata: {{name: bench-route}}
spec:
  parentRefs: [{{name: svc-0}}]
  rules:
  - matches: [{{path: {{type: PathPrefix, value: /v{n}}}}}]
    backendRefs: [{{name: svc-1}}]
  - backendRefs: [{{name: svc-0}}]
"""


def workload(node: int, j: int, services: int) -> mesh_pb2.WorkloadRegistration:
    svc = (node * 7 + j) % services
    return mesh_pb2.WorkloadRegistration(
        name=f"w{node}-{j}", namespace="default", service_account=f"svc-{svc}", labels={"app": f"svc-{svc}"},
        ip=f"172.{16 + node // 16384 % 16}.{node // 64 % 256}.{(node % 64) * 4 + j % 4}", ports=[8080])


async def run(args: argparse.Namespace) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="nodemesh-fleet-"))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    children: list[subprocess.Popen[bytes]] = []  # stopped in reverse order at the end
    common = ["--lease-seconds", "15", "--log-level", "WARNING"]
    if args.replicas > 1:
        # Replicas share one etcd (TLS with client certificates, as in production) and the
        # operator's intermediate CA; the second takes the first's control-plane CA files.
        from controlplane.etcd_client import EtcdTLS, make_etcd_certs, single_member_argv, wait_ready
        from tests.netns.test_security_ca import make_operator_ca

        certs = make_etcd_certs(str(work / "etcd-pki"))
        etcd_port, etcd_peer = free_port(), free_port()
        with open(work / "etcd.log", "w") as elog:  # noqa: ASYNC230 - once, before anything runs
            children.append(subprocess.Popen(  # noqa: ASYNC220
                single_member_argv(str(work / "etcd"), "127.0.0.1", etcd_port, etcd_peer,
                                   shutil.which("etcd") or "etcd", certs=certs), stdout=elog, stderr=elog))
        endpoint = f"https://127.0.0.1:{etcd_port}"
        await asyncio.to_thread(wait_ready, endpoint, 30.0,
                                EtcdTLS(certs.ca, certs.client_cert, certs.client_key, ""))
        cert_f, key_f, chain_f, _ = make_operator_ca(work / "operator-ca")
        common += ["--store", "etcd", "--etcd-endpoints", endpoint, "--etcd-ca", certs.ca, "--etcd-cert",
                   certs.client_cert, "--etcd-key", certs.client_key, "--ca-cert", str(cert_f), "--ca-key",
                   str(key_f), "--ca-chain", str(chain_f)]
    # --profile FILE: the (first) control plane under cProfile (written when it stops).
    prof = ["-m", "cProfile", "-o", args.profile] if args.profile else []
    socks, targets, cps, webs = [], [], [], []
    for r in range(args.replicas):
        port, web = free_port(), free_port()
        while web in (port, port + 1):
            web = free_port()
        webs.append(web)
        state = work / ("cp" if r == 0 else f"cp{r}")
        if r:
            state.mkdir()
            for f in ("cp-ca.pem", "cp-ca.key"):
                shutil.copy2(work / "cp" / f, state / f)
            os.chmod(state / "cp-ca.key", 0o600)
        sock_path = work / f"cp{r}.sock"
        cmd = [sys.executable, *(prof if r == 0 else []), "-m", "nodemesh", "controlplane", "serve",
               "--state-dir", str(state), "--listen", f"unix:{sock_path}", "--listen", f"127.0.0.1:{port}",
               "--web-listen", f"127.0.0.1:{web}", *common]
        with open(work / f"cp{r}.log", "w") as log:  # noqa: ASYNC230 - once per replica, before anything runs
            cp = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=log)  # noqa: ASYNC220
        children.append(cp)
        cps.append(cp)
        for _ in range(600):
            if sock_path.exists() and (state / "cp-ca.pem").exists():
                break
            if cp.poll() is not None:
                raise RuntimeError(f"control plane replica {r} exited: see {work / f'cp{r}.log'}")
            await asyncio.sleep(0.1)
        await asyncio.sleep(0.5)
        socks.append(f"unix:{sock_path}")
        targets.append(f"127.0.0.1:{port}")
    sock = socks[0]
    proc = Proc(*(c.pid for c in cps))
    spy: list[subprocess.Popen[bytes]] = []

    def stop_spy() -> None:
        for p in spy:
            p.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
        spy.clear()

    out: dict[str, Any] = {"nodes": args.nodes, "workloads_per_node": args.workloads, "services": args.services,
                           "protocol": args.protocol, "depends": args.depends,
                           "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    out["replicas"] = args.replicas
    try:
        ca_pem = (work / "cp" / "cp-ca.pem").read_bytes()
        with ConfigClient(sock) as c:
            c.apply(config_docs(args.services))
        fleet = Fleet(args, targets, ca_pem, sock)
        for i in range(args.nodes):
            key = ec.generate_private_key(ec.SECP256R1())
            name = f"fleet-{i:05d}"
            wls = [workload(i, j, args.services) for j in range(args.workloads)]
            depends = None
            if args.depends:
                # Declared dependencies: a few services besides svc-0 and svc-1 (the ones changed below).
                rng = random.Random(i)
                depends = frozenset({"svc-0", "svc-1"} | {f"svc-{rng.randrange(args.services)}"
                                                          for _ in range(args.depends)})
            fleet.agents.append(Agent(name, i, wls, key, node_csr(key, name), depends=depends))
        per_service: dict[str, int] = {}
        for a in fleet.agents:
            for w in a.workloads:
                per_service[w.labels["app"]] = per_service.get(w.labels["app"], 0) + 1
        for a in fleet.agents:
            # Delta: its own workloads and those behind the endpoints it subscribes to; SotW: all.
            if args.protocol == "sotw" or a.depends is None:
                a.expected_workloads = sum(per_service.values())
            else:
                a.expected_workloads = sum(per_service.get(d, 0) for d in a.depends) + sum(
                    1 for w in a.workloads if w.labels["app"] not in a.depends)
        with AdminClient(sock) as admin:
            for a in fleet.agents:
                a.token = admin.create_join_token(a.name, 3600).token
        await asyncio.sleep(1.0)
        rss0 = proc.rss_mb()
        out["cp_rss_mb_before_join"] = rss0  # every replica's, summed

        async def start_spy() -> None:
            # Where the control plane's time goes (raw collapsed stacks: one line per
            # stack with its sample count).
            spy.append(subprocess.Popen(  # noqa: ASYNC220 - once
                [shutil.which("py-spy", path=os.path.dirname(sys.executable)) or "py-spy", "record",
                 "--pid", str(cps[0].pid), "--rate", "50", "--format", "raw", "--nonblocking", "--output", args.py_spy],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
            await asyncio.sleep(1.0)

        if args.py_spy and args.py_spy_from == "storm":
            await start_spy()

        # ---- join storm ----
        cpu0, t0, me0 = proc.cpu_s(), time.monotonic(), self_cpu_s()
        fut, done = fleet.watch(lambda a: a.count(xdsnames.WORKLOAD) >= a.expected_workloads)
        joins = await asyncio.gather(*(fleet.start_agent(a) for a in fleet.agents), return_exceptions=True)
        joined = time.monotonic() - t0
        failed = [repr(e) for e in joins if isinstance(e, BaseException)]
        try:
            await asyncio.wait_for(fut, args.timeout)
            converged = time.monotonic() - t0
        except TimeoutError:
            converged = float("nan")
            late = [a for a in fleet.agents if a.name not in done]
            print(f"  {len(late)} nodes did not converge; e.g. " + "; ".join(
                f"{a.name}: {a.count(xdsnames.WORKLOAD)}/{a.expected_workloads} workloads, {a.responses} responses, "
                f"streams {a.ads_streams}" for a in late[:5]), file=sys.stderr)
            for t in fleet.tasks:
                if t.done() and not t.cancelled() and t.exception() is not None:
                    print(f"  a simulated agent's task failed: {t.exception()!r}", file=sys.stderr)
                    break
        storm_cpu = proc.cpu_s() - cpu0
        out["join_storm"] = {
            "converge_s": converged, "joined_s": joined, "cp_cpu_s": storm_cpu, "sim_cpu_s": self_cpu_s() - me0,
            "join_failures": failed[:5], "n_join_failures": len(failed),
            "per_node_converge": summary([v - t0 for v in done.values()]),
            "ads_reconnects": sum(a.ads_streams - 1 for a in fleet.agents),
            "registry_reconnects": sum(a.registry_sessions - 1 for a in fleet.agents),
            "bytes_received": sum(a.bytes_received for a in fleet.agents),
            "join_retries": sum(len(a.join_errors) for a in fleet.agents),
            "join_errors": sorted({e for a in fleet.agents for e in a.join_errors})[:5],
        }
        try:
            out["join_storm"]["cp_loop"] = loop_metrics(webs[0])
        except (OSError, ValueError) as e:  # a busy control plane may not answer in time: say so
            out["join_storm"]["cp_loop"] = {"error": repr(e)}
        print(f"join storm: {args.nodes} nodes joined in {joined:.2f}s, converged in {converged:.2f}s, "
              f"cp cpu {storm_cpu:.1f}s, "
              f"{out['join_storm']['bytes_received'] / 1e6:.1f} MB; cp loop {out['join_storm']['cp_loop']}",
              flush=True)
        await asyncio.sleep(args.settle)
        rss1 = proc.rss_mb()
        out["cp_rss_mb_after_join"] = rss1
        out["cp_mb_per_node"] = (rss1 - rss0) / args.nodes

        if args.py_spy and args.py_spy_from == "changes":
            await start_spy()

        # ---- route changes ----
        route_name = xdsnames.cluster_name("svc-0", "default", 80, "mesh")
        out["route_changes"] = []
        with ConfigClient(sock) as c:
            for n in range(args.changes):
                before = {a.name: a.held.get(xdsnames.ROUTE, {}).get(route_name) for a in fleet.agents}
                b0 = sum(a.bytes_received for a in fleet.agents)
                cpu0, t0 = proc.cpu_s(), time.monotonic()
                c.apply(route_doc(n))
                fut, done = fleet.watch(lambda a, before=before: a.held.get(xdsnames.ROUTE, {}).get(
                    route_name) not in (None, before[a.name]))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(fut, args.timeout)
                await asyncio.sleep(0.3)  # late stragglers' bytes
                lat = [v - t0 for v in done.values()]
                res: dict[str, Any] = {"latency": summary(lat), "affected": len(done),
                                       "bytes": sum(a.bytes_received for a in fleet.agents) - b0,
                                       "cp_cpu_s": proc.cpu_s() - cpu0}
                out["route_changes"].append(res)
                print(f"route change {n}: p50 {res['latency']['p50'] * 1000:.0f} ms p99 "
                      f"{res['latency']['p99'] * 1000:.0f} ms max {res['latency']['max'] * 1000:.0f} ms, "
                      f"{res['bytes'] / 1e3:.0f} kB, cp cpu {res['cp_cpu_s']:.2f}s", flush=True)
                await asyncio.sleep(1.0)

        # ---- workload starts ----
        if args.py_spy and args.py_spy_from == "starts":
            await start_spy()
        out["workload_starts"] = []
        for n in range(args.changes):
            a0 = fleet.agents[(n * 37) % len(fleet.agents)]
            new = mesh_pb2.WorkloadRegistration(
                name=f"extra-{n}", namespace="default", service_account="svc-1", labels={"app": "svc-1"},
                ip=f"192.168.{n // 256}.{n % 256}", ports=[8080])
            wl_name = xdsnames.workload_resource_name(a0.name, "default", new.name)
            # The node's slice of svc-1 changes too: wait for it where svc-1's endpoints are subscribed.
            sl = (xdsnames.slice_name(xdsnames.cluster_name("svc-1", "default", 80, "mesh"), a0.name)
                  if args.protocol == "delta" else xdsnames.cluster_name("svc-1", "default", 80, "mesh"))
            before = {a.name: a.held.get(xdsnames.ENDPOINT, {}).get(sl) for a in fleet.agents}
            b0 = sum(a.bytes_received for a in fleet.agents)
            awaiting_before = None
            with contextlib.suppress(OSError, ValueError):
                awaiting_before = loop_metrics(webs[0]).get("streams_awaiting_answer")
            cpu0, t0 = proc.cpu_s(), time.monotonic()
            fleet.reregister(a0, list(a0.workloads) + [new])

            def arrived(a: Agent, w: str = wl_name, sl: str = sl, before: dict[str, Any] = before,
                        owner: Agent = a0) -> bool:
                # Affected: the owner (its own workload) and every node that reaches svc-1
                # (Delta with declared dependencies; otherwise every node).
                scoped = args.protocol == "delta" and a.depends is not None and "svc-1" not in a.depends
                if scoped:
                    return a is not owner or w in a.held.get(xdsnames.WORKLOAD, {})
                if w not in a.held.get(xdsnames.WORKLOAD, {}):
                    return False
                return a.held.get(xdsnames.ENDPOINT, {}).get(sl) not in (None, before[a.name])

            fut, done = fleet.watch(arrived)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(fut, args.timeout)
            await asyncio.sleep(0.3)
            affected = [a.name for a in fleet.agents if a is a0 or args.protocol == "sotw"
                        or a.depends is None or "svc-1" in a.depends]
            lat = [done[n] - t0 for n in affected if n in done]
            res = {"latency": summary(lat), "affected": len(affected), "acked": len(lat),
                   "bytes": sum(a.bytes_received for a in fleet.agents) - b0, "cp_cpu_s": proc.cpu_s() - cpu0,
                   "awaiting_before": awaiting_before}
            with contextlib.suppress(OSError, ValueError):
                res["cp_loop"] = loop_metrics(webs[0])
            out["workload_starts"].append(res)
            print(f"workload start {n}: p50 {res['latency']['p50'] * 1000:.0f} ms p99 "
                  f"{res['latency']['p99'] * 1000:.0f} ms max {res['latency']['max'] * 1000:.0f} ms, "
                  f"{res['bytes'] / 1e3:.0f} kB, cp cpu {res['cp_cpu_s']:.2f}s, {len(lat)} of {len(affected)} "
                  "affected nodes", flush=True)
            await asyncio.sleep(1.0)

        stop_spy()
        if args.py_spy and os.path.exists(args.py_spy):
            out["cp_profile"] = {"samples_file": args.py_spy, "top_inclusive": profile_summary(args.py_spy)}

        # ---- soak ----
        samples = []
        t_end = time.monotonic() + args.soak
        cpu0, t0 = proc.cpu_s(), time.monotonic()
        while time.monotonic() < t_end:
            samples.append((round(time.monotonic() - t0, 1), proc.rss_mb()))
            await asyncio.sleep(min(10.0, max(0.1, t_end - time.monotonic())))
        samples.append((round(time.monotonic() - t0, 1), proc.rss_mb()))
        out["soak"] = {"seconds": args.soak, "rss_mb": samples,
                       "cp_cpu_percent": 100 * (proc.cpu_s() - cpu0) / max(0.1, time.monotonic() - t0)}
        out["final"] = {
            "ads_reconnects": sum(a.ads_streams - 1 for a in fleet.agents),
            "registry_reconnects": sum(a.registry_sessions - 1 for a in fleet.agents),
            "cp_rss_mb": proc.rss_mb(),
        }
        ps = []
        for replica_sock in socks:  # each replica knows the streams it holds
            with ConfigClient(replica_sock) as c:
                ps += c.list("proxystatus")
        states: dict[str, int] = {}
        for r in ps:
            st = json.loads(r.status_json)["state"]
            states[st] = states.get(st, 0) + 1
        out["final"]["proxystatus_rows_by_state"] = states
        for t in fleet.tasks:
            t.cancel()
        await asyncio.gather(*fleet.tasks, return_exceptions=True)
        for a in fleet.agents:
            if a.channel is not None:
                await a.channel.close()
        return out
    finally:
        stop_spy()
        for child in reversed(children):
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--nodes", type=int, default=100)
    p.add_argument("--workloads", type=int, default=2, help="workloads per node")
    p.add_argument("--services", type=int, default=20)
    p.add_argument("--protocol", choices=("delta", "sotw"), default="delta")
    p.add_argument("--replicas", type=int, default=1,
                   help="control plane replicas; 2 or more share one etcd (TLS, client certificates) and the "
                        "agents are spread over them (needs etcd on PATH: Debian's etcd-server)")
    p.add_argument("--depends", type=int, default=0,
                   help="scoped discovery: each node declares this many random services (plus svc-0 and svc-1) "
                        "and receives only their endpoints; 0: every service's")
    p.add_argument("--changes", type=int, default=3, help="route changes and workload starts, each")
    p.add_argument("--settle", type=float, default=3.0, help="seconds after the join storm before measuring RSS")
    p.add_argument("--soak", type=float, default=30.0, help="seconds of heartbeats at the end (RSS sampled)")
    p.add_argument("--timeout", type=float, default=120.0)
    p.add_argument("--out", default="", help="write the raw results here (JSON)")
    p.add_argument("--profile", default="", metavar="FILE", help="run the control plane under cProfile")
    p.add_argument("--py-spy", default="", metavar="FILE",
                   help="sample the control plane with py-spy (raw collapsed stacks) for the whole run")
    p.add_argument("--py-spy-from", choices=("storm", "changes", "starts"), default="storm",
                   help="start sampling at the join storm (default), once the changes begin, or at the "
                        "workload starts")
    p.add_argument("--edges", type=int, default=20,
                   help="service edges in each heartbeat's traffic summary (the mesh view's input); 0: none")
    p.add_argument("--keep", action="store_true", help="keep the control plane's state dir and log")
    args = p.parse_args()
    out = asyncio.run(run(args))
    text = json.dumps(out, indent=2)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
