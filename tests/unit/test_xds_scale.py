"""No size cliff: 50,000 endpoint memberships (10 nodes x 1,000 workloads, each
in 5 services) reach a node agent over real gRPC, Delta and state of the
world, where one state-of-the-world endpoint response used to exceed gRPC's
default 4 MiB and fail every agent with RESOURCE_EXHAUSTED in a reconnect loop."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc

from controlplane.nodes import RegisteredNode, RegisteredWorkload
from controlplane.xds.build import ServiceEntry, build_snapshot
from controlplane.xds.cache import SnapshotCache
from controlplane.xds.server import SERVER_OPTIONS, AdsServicer, add_to_server
from nodeagent import cpchannel
from nodeagent.meshview.snapshot import Snapshot
from nodeagent.xds.client import AdsClient
from nodemesh import model, xdsnames

cpchannel.allow_plaintext_tcp()
NODES, PER_NODE, SERVICES = 10, 1000, 5


def mesh() -> Any:
    nodes = [RegisteredNode(f"n{i}", (f"10.1.0.{i + 1}",), workloads=tuple(
        RegisteredWorkload(f"w{i}-{j}", "default", "app", f"10.{10 + i}.{j // 250}.{j % 250 + 1}", (8080,),
                           (("app", "big"),)) for j in range(PER_NODE))) for i in range(NODES)]
    services = [ServiceEntry(model.ServiceSpec(f"s{k}", "default", selector=(("app", "big"),),
                                           ports=(model.ServicePortSpec(80, 8080, "tcp"),)), f"240.240.0.{k + 1}")
                for k in range(SERVICES)]
    return build_snapshot(model.MeshConfig(), services, nodes, [])


def test_fifty_thousand_endpoint_memberships_reach_an_agent_delta_and_sotw() -> None:
    snap = mesh()
    eds = snap.get(xdsnames.ENDPOINT)
    whole = sum(len(eds.resources[n].value) for n in eds.wildcard_names)
    assert whole > 4 * 1024 * 1024  # the old cliff: more than gRPC's default in one SotW response

    async def main() -> None:
        cache = SnapshotCache()
        cache.set_default(snap)
        ads = AdsServicer(cache)
        server = grpc.aio.server(options=SERVER_OPTIONS)
        add_to_server(ads, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            for protocol in ("delta", "sotw"):
                got: list[Snapshot] = []
                client = AdsClient(f"127.0.0.1:{port}", f"agent-{protocol}", (), got.append, protocol=protocol)
                task = asyncio.get_running_loop().create_task(client.run())
                def members(got: list[Snapshot] = got) -> int:
                    return sum(len(sp.endpoints) for s in got[-1].services for sp in s.ports) if got else 0

                try:
                    # Delta answers arrive in ~1 MiB parts: the count grows to the whole.
                    for _ in range(1200):
                        if members() == NODES * PER_NODE * SERVICES:
                            break
                        await asyncio.sleep(0.05)
                    assert members() == NODES * PER_NODE * SERVICES, client.last_error
                    assert client.nacks == 0 and not client.last_error
                finally:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)
            assert ads.stats.streams_opened == 2  # no reconnect loop
            assert ads.stats.nacks == 0
        finally:
            await server.stop(None)

    asyncio.run(main())
