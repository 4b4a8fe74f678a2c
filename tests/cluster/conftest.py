"""The systemd cluster tier: one cluster (cp, node1, node2 as booted systemd
machines, nodemesh/cluster.py) for the whole session, provisioned by
vagrant/provision.sh exactly as the Vagrantfile's VMs are. Root only; the base
root filesystem is built on first use (a few minutes) and cached."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator

import pytest

from nodemesh.cluster import Cluster
from tests.conftest import require_root, require_tool

CLIENT_UID = 3001


class Tier:
    def __init__(self, cluster: Cluster) -> None:
        self.c = cluster
        self.vip = json.loads(cluster.run("cp", "nodemesh get service web -o json").stdout)["status"]["vip"]

    def sh(self, host: str, cmd: str, check: bool = True, timeout: float = 120) -> str:
        return self.c.run(host, cmd, check=check, timeout=timeout).stdout

    def prop(self, host: str, name: str, unit: str = "nodemesh-agent") -> str:
        return self.sh(host, f"systemctl show -p {name} --value {unit}").strip()

    def curl(self, host: str, url: str, timeout: float = 3) -> tuple[int, str]:
        res = self.c.run(host, f"setpriv --reuid={CLIENT_UID} curl -s -m {timeout} {url}", check=False,
                         timeout=timeout + 30)
        return res.returncode, res.stdout


@pytest.fixture(scope="session")
def tier() -> Iterator[Tier]:
    require_root("the systemd cluster tier")
    for tool in ("systemd-nspawn", "mmdebstrap", "nsenter", "ip"):
        require_tool(tool)
    c = Cluster(os.environ.get("NODEMESH_CLUSTER_TEST_ID", "tier"),
                net=int(os.environ.get("NODEMESH_CLUSTER_TEST_NET", "57")))
    try:
        c.up()
        c.provision()
        yield Tier(c)
    finally:
        c.down()
