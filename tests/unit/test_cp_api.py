"""End to end in one process: the real grpc.aio control plane on a unix socket,
driven through the config API, the registry and a raw ADS stream."""

from __future__ import annotations

import asyncio
import json
import os
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
import pytest
from envoy.config.cluster.v3 import cluster_pb2
from envoy.config.endpoint.v3 import endpoint_pb2
from envoy.service.discovery.v3 import ads_pb2_grpc, discovery_pb2

from controlplane.apiclient import ClientError, ConfigClient
from controlplane.process import ControlPlane, ControlPlaneSettings, start
from nodemesh import xdsnames
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc

SERVICE = """
apiVersion: nodemesh.io/v1alpha1
kind: Service
metadata: {name: web, namespace: shop}
spec:
  ports: [{port: 80, targetPort: 8080, protocol: http, name: http}]
  selector: {app: web}
"""


def run(fn: Callable[[ControlPlane, str], Awaitable[Any]]) -> Any:
    async def main() -> Any:
        with tempfile.TemporaryDirectory() as d:
            sock = os.path.join(d, "cp.sock")
            cp = await start(ControlPlaneSettings(state_dir=os.path.join(d, "state"),
                                                  listen=(f"unix:{sock}",), debounce_s=0.01))
            try:
                return await asyncio.wait_for(fn(cp, f"unix:{sock}"), 20)
            finally:
                await cp.stop(0)
    return asyncio.run(main())


async def settled(cp: ControlPlane, type_url: str, pred: Callable[[Any], bool]) -> None:
    """Wait for the (debounced, eventually consistent) snapshot to show a change."""
    for _ in range(200):
        snap = cp.cache.snapshot_for("test-node")
        if snap is not None and pred(snap.get(type_url).resources):
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"snapshot never settled for {type_url}")


class AdsStream:
    """A raw ADS stream read by a background task: cancelling a grpc.aio read
    would cancel the whole call, so timeouts wait on a queue instead."""

    def __init__(self, ch: grpc.aio.Channel) -> None:
        self.call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).StreamAggregatedResources()
        self.responses: asyncio.Queue[Any] = asyncio.Queue()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for r in self.call:
            await self.responses.put(r)

    async def write(self, req: discovery_pb2.DiscoveryRequest) -> None:
        await self.call.write(req)

    async def read(self, timeout: float = 5.0) -> Any:
        return await asyncio.wait_for(self.responses.get(), timeout)

    def cancel(self) -> None:
        self._reader.cancel()
        self.call.cancel()


async def next_of(stream: AdsStream, type_url: str, names: tuple[str, ...], timeout: float = 5.0) -> Any:
    """The next response of `type_url`, ACKing responses of other types on the way;
    None when none comes within `timeout`."""
    while True:
        try:
            r = await stream.read(timeout)
        except TimeoutError:
            return None
        if r.type_url == type_url:
            return r
        await stream.write(request(r.type_url, r.version_info, r.nonce, names))


def request(type_url: str, version: str = "", nonce: str = "", names: tuple[str, ...] = (),
            error: str = "") -> discovery_pb2.DiscoveryRequest:
    req = discovery_pb2.DiscoveryRequest(type_url=type_url, version_info=version, response_nonce=nonce,
                                         resource_names=list(names))
    req.node.id = "test-node"
    if error:
        req.error_detail.code = 3
        req.error_detail.message = error
    return req


BINDING = """
apiVersion: nodemesh.io/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec:
  identityBindings: [{name: shop, nodes: [node-a], serviceAccounts: [shop/web], workloadLabels: {app: [web]}}]
"""


async def register(target: str, workloads: list[mesh_pb2.WorkloadRegistration]) -> None:
    async with grpc.aio.insecure_channel(target) as ch:
        # Identities are bound by the operator (default deny): bind shop/web to node-a.
        await mesh_pb2_grpc.ConfigServiceStub(ch).Apply(mesh_pb2.ApplyRequest(documents=BINDING))  # type: ignore[no-untyped-call]
        call = mesh_pb2_grpc.RegistryStub(ch).Session()  # type: ignore[no-untyped-call]
        reg = mesh_pb2.NodeRegistration(node_name="node-a", addresses=["10.0.0.1"], zone="z1",
                                        workloads=workloads)
        await call.write(mesh_pb2.NodeReport(register=reg))
        grant = await call.read()
        assert grant.node_name == "node-a" and grant.lease_seconds == 15
        await call.done_writing()


def test_apply_then_ads_ack_and_nack() -> None:
    async def body(cp: ControlPlane, target: str) -> None:
        async with grpc.aio.insecure_channel(target) as ch:
            cfg = mesh_pb2_grpc.ConfigServiceStub(ch)  # type: ignore[no-untyped-call]
            resp = await cfg.Apply(mesh_pb2.ApplyRequest(documents=SERVICE))
            assert [(r.kind, r.namespace, r.name, r.action) for r in resp.results] == [
                ("Service", "shop", "web", "created")]
            svc = await cfg.Get(mesh_pb2.ResourceRef(kind="svc", namespace="shop", name="web"))
            vip = json.loads(svc.status_json)["vip"]
            assert vip.startswith("240.240.")
            await register(target, [mesh_pb2.WorkloadRegistration(
                name="web-1", namespace="shop", service_account="web", ip="10.1.0.5",
                ports=[8080], labels={"app": "web"})])

            await settled(cp, xdsnames.CLUSTER, lambda r: len(r) == 1)
            await settled(cp, xdsnames.WORKLOAD, lambda r: len(r) == 1)
            stream = AdsStream(ch)
            await stream.write(request(xdsnames.CLUSTER))
            r1 = await stream.read()
            assert r1.type_url == xdsnames.CLUSTER and r1.nonce
            clusters = [cluster_pb2.Cluster.FromString(a.value) for a in r1.resources]
            assert [c.name for c in clusters] == ["outbound|80||web.shop.svc.mesh"]
            md = clusters[0].metadata.filter_metadata["nodemesh"]
            assert md["vip"] == vip and md["target_port"] == 8080

            # EDS by name: wait until the registration has reached the snapshot.
            name = clusters[0].name
            await stream.write(request(xdsnames.CLUSTER, r1.version_info, r1.nonce))  # ACK
            await stream.write(request(xdsnames.ENDPOINT, names=(name,)))
            e1 = await stream.read()
            cla = endpoint_pb2.ClusterLoadAssignment.FromString(e1.resources[0].value)
            ep = cla.endpoints[0].lb_endpoints[0]
            assert ep.endpoint.address.socket_address.address == "10.1.0.5"
            assert ep.endpoint.address.socket_address.port_value == 8080
            assert cla.endpoints[0].locality.sub_zone == "node-a"
            await stream.write(request(xdsnames.ENDPOINT, e1.version_info, e1.nonce, (name,)))  # ACK

            # NACK the clusters after a config change: nothing is resent until the next change.
            await cfg.Apply(mesh_pb2.ApplyRequest(documents=SERVICE.replace("8080", "9090")))
            r2 = await next_of(stream, xdsnames.CLUSTER, (name,))
            assert r2.version_info != r1.version_info
            await stream.write(request(xdsnames.CLUSTER, r1.version_info, r2.nonce, error="bad cluster"))
            assert await next_of(stream, xdsnames.CLUSTER, (name,), timeout=0.3) is None
            assert cp.ads.stats.nacks == 1 and "bad cluster" in cp.ads.stats.last_nack
            # The NACK is visible per client through the API (`nodemesh get proxystatus`).
            ps = await cfg.List(mesh_pb2.ListRequest(kind="proxystatus"))
            rows = {json.loads(r.status_json)["type"]: json.loads(r.status_json) for r in ps.resources}
            assert rows["Cluster"]["state"] == "nacked" and rows["Cluster"]["nack_reason"] == "bad cluster"
            assert rows["Cluster"]["acked_version"] == r1.version_info
            assert rows["ClusterLoadAssignment"]["state"] == "synced"
            # A request with a stale nonce is ignored.
            await stream.write(request(xdsnames.CLUSTER, r1.version_info, r1.nonce))
            await cfg.Apply(mesh_pb2.ApplyRequest(documents=SERVICE.replace("8080", "7070")))
            r3 = await next_of(stream, xdsnames.CLUSTER, (name,))
            assert r3.version_info not in (r1.version_info, r2.version_info)
            assert cp.ads.stats.stale_requests == 1
            await stream.write(request(xdsnames.CLUSTER, r3.version_info, r3.nonce))
            await asyncio.sleep(0.05)
            assert cp.ads.stats.acks >= 2
            ps = await cfg.List(mesh_pb2.ListRequest(kind="ps"))
            assert {json.loads(r.status_json)["state"] for r in ps.resources} == {"synced"}
            # The mesh view's API shows the same rows.
            from controlplane.web import MeshView

            status, _ctype, body = MeshView(cp).dispatch(b"GET /api/proxystatus HTTP/1.1\r\n")
            view = json.loads(body)
            assert status == 200 and view["summary"]["synced"] == 1 and len(view["clients"]) == len(ps.resources)
            stream.cancel()

    run(body)


def test_invalid_apply_is_rejected_whole_with_every_problem() -> None:
    async def body(cp: ControlPlane, target: str) -> None:
        bad = SERVICE + "---\n" + SERVICE.replace("name: web,", "name: api,").replace("port: 80,", "port: 0,")
        async with grpc.aio.insecure_channel(target) as ch:
            cfg = mesh_pb2_grpc.ConfigServiceStub(ch)  # type: ignore[no-untyped-call]
            with pytest.raises(grpc.aio.AioRpcError) as e:
                await cfg.Apply(mesh_pb2.ApplyRequest(documents=bad))
            assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "Service shop/api: spec.ports[0].port: must be an integer in 1..65535" in e.value.details()
            listed = await cfg.List(mesh_pb2.ListRequest())
            assert list(listed.resources) == []  # the good document was not applied either

    run(body)


def test_sync_client_apply_get_delete_and_dry_run() -> None:
    async def body(cp: ControlPlane, target: str) -> None:
        def client_calls() -> None:
            with ConfigClient(target) as c:
                assert [o.action for o in c.apply(SERVICE, dry_run=True)] == ["created"]
                assert c.list() == []
                assert [str(o) for o in c.apply(SERVICE)] == ["service/shop/web created"]
                assert [o.action for o in c.apply(SERVICE)] == ["unchanged"]
                assert c.get("Service", "web", "shop").name == "web"
                with pytest.raises(ClientError) as e:
                    c.get("Service", "nope", "shop")
                assert e.value.code == grpc.StatusCode.NOT_FOUND
                with pytest.raises(ClientError) as e:
                    c.get("Gateway", "x")
                assert "unknown kind" in str(e.value)
                assert c.delete("svc", "web", "shop") is True
                assert c.delete("svc", "web", "shop") is False
        await asyncio.to_thread(client_calls)

    run(body)


def test_mesh_config_vip_range_change_moves_allocated_vips_and_guards_fixed_ones() -> None:
    async def body(cp: ControlPlane, target: str) -> None:
        fixed = SERVICE.replace("name: web,", "name: fixed,").replace(
            "selector:", "vip: 240.240.0.9\n  selector:")
        mesh = ("apiVersion: nodemesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\n"
                "spec: {vipRange: 10.99.0.0/24}\n")

        def calls() -> None:
            with ConfigClient(target) as c:
                c.apply(SERVICE + "---\n" + fixed)
                with pytest.raises(ClientError) as e:
                    c.apply(mesh)
                assert "Service shop/fixed: spec.vip" in str(e.value)
                assert "outside the mesh VIP range 10.99.0.0/24" in str(e.value)
                c.delete("svc", "fixed", "shop")
                c.apply(mesh)
                vip = json.loads(c.get("svc", "web", "shop").status_json)["vip"]
                assert vip.startswith("10.99.0.")
        await asyncio.to_thread(calls)

    run(body)


def test_delta_ads_serves_the_control_planes_snapshot() -> None:
    """Delta ADS through the real server (the protocol itself: test_cp_delta.py)."""
    async def body(cp: ControlPlane, target: str) -> None:
        async with grpc.aio.insecure_channel(target) as ch:
            await mesh_pb2_grpc.ConfigServiceStub(ch).Apply(mesh_pb2.ApplyRequest(documents=SERVICE))  # type: ignore[no-untyped-call]
            await settled(cp, xdsnames.CLUSTER, lambda r: len(r) == 1)
            call = ads_pb2_grpc.AggregatedDiscoveryServiceStub(ch).DeltaAggregatedResources()
            req = discovery_pb2.DeltaDiscoveryRequest(type_url=xdsnames.CLUSTER)  # legacy wildcard
            req.node.id = "test-node"
            await call.write(req)
            r = await asyncio.wait_for(call.read(), 5)
            assert [x.name for x in r.resources] == ["outbound|80||web.shop.svc.mesh"]
            assert r.resources[0].version and r.nonce and not r.removed_resources
            await call.write(discovery_pb2.DeltaDiscoveryRequest(type_url=xdsnames.CLUSTER,
                                                                 response_nonce=r.nonce))
            for _ in range(100):
                if cp.ads.stats.acks:
                    break
                await asyncio.sleep(0.01)
            assert cp.ads.stats.acks == 1 and cp.ads.stats.nacks == 0
            call.cancel()

    run(body)


def test_restart_keeps_config_registry_and_ca_and_serves_certificates() -> None:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    def csr(uri: str) -> str:
        key = ec.generate_private_key(ec.SECP256R1())
        return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), False)
                .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())

    async def main() -> None:
        with tempfile.TemporaryDirectory() as d:
            sock = os.path.join(d, "cp.sock")
            settings = ControlPlaneSettings(state_dir=os.path.join(d, "state"), listen=(f"unix:{sock}",),
                                            debounce_s=0.01)
            cp = await start(settings)
            try:
                target = f"unix:{sock}"
                async with grpc.aio.insecure_channel(target) as ch:
                    await mesh_pb2_grpc.ConfigServiceStub(ch).Apply(mesh_pb2.ApplyRequest(documents=SERVICE))  # type: ignore[no-untyped-call]
                await register(target, [mesh_pb2.WorkloadRegistration(
                    name="web-1", namespace="shop", service_account="web", ip="10.1.0.5")])
                root1 = cp.ca.root_pem
            finally:
                await cp.stop(0)
            cp = await start(settings)
            try:
                assert cp.ca.root_pem == root1
                assert cp.registry.get("node-a") is not None
                async with grpc.aio.insecure_channel(target) as ch:
                    got = await mesh_pb2_grpc.ConfigServiceStub(ch).Get(  # type: ignore[no-untyped-call]
                        mesh_pb2.ResourceRef(kind="Service", namespace="shop", name="web"))
                    assert got.resource_version == 1
                    certs = mesh_pb2_grpc.CertificateServiceStub(ch)  # type: ignore[no-untyped-call]
                    resp = await certs.CreateCertificate(mesh_pb2.CertificateRequest(
                        node_name="node-a", csr_pem=csr("spiffe://cluster.local/ns/shop/sa/web")))
                    assert resp.trust_bundle == [root1]
                    with pytest.raises(grpc.aio.AioRpcError) as e:
                        await certs.CreateCertificate(mesh_pb2.CertificateRequest(
                            node_name="node-b", csr_pem=csr("spiffe://cluster.local/ns/shop/sa/web")))
                    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
                    assert "node 'node-b' is not registered" in e.value.details()
            finally:
                await cp.stop(0)

    asyncio.run(main())


def test_cli_apply_get_delete(capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    import argparse

    from nodemesh.cli import configcmds
    from nodemesh.cli.output import run as run_command

    parser = argparse.ArgumentParser()
    configcmds.register(parser.add_subparsers(dest="command"))
    f = tmp_path / "svc.yaml"
    f.write_text(SERVICE)

    async def body(cp: ControlPlane, target: str) -> list[int]:
        def calls() -> list[int]:
            codes = []
            for argv in (["apply", "-f", str(f), "--server", target],
                         ["get", "svc", "web", "-n", "shop", "-o", "yaml", "--server", target],
                         ["get", "svc", "--server", target],
                         ["delete", "svc", "web", "-n", "shop", "--server", target],
                         ["delete", "svc", "web", "-n", "shop", "--server", target]):
                args = parser.parse_args(argv)
                codes.append(run_command(args.func, args))
            return codes
        return await asyncio.to_thread(calls)

    assert run(body) == [0, 0, 0, 0, 1]
    out, err = capsys.readouterr()
    assert "service/shop/web created" in out
    assert "kind: Service" in out and "vip: 240.240." in out
    assert "service/shop/web deleted" in out and "service/shop/web not found" in err
    args = parser.parse_args(["controlplane", "serve", "--state-dir", "/x", "--listen", "unix:/x.sock",
                              "--lease-seconds", "5", "--cert-ttl", "600"])
    assert (args.listen, args.lease_seconds, args.cert_ttl, args.func) == (
        ["unix:/x.sock"], 5.0, 600, configcmds.cmd_serve)
