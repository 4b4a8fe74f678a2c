"""Node proxies on loopback addresses in one process tree, with no root and no
namespaces: the unit tier's end-to-end tests and bench/profile_l7.py run a
sending node on 127.0.0.2 and a receiving node on 127.0.0.3, real mTLS HBONE
between them, the original destination and the source injected instead of
captured. One place for how such a node is set up."""

from __future__ import annotations

from nodeagent.supervision.settings import ProxySettings

NODE_A, NODE_B = "127.0.0.2", "127.0.0.3"  # the sending and the receiving node
TRUST_DOMAIN = "cluster.local"


def spiffe_id(service_account: str, namespace: str = "default") -> str:
    return f"spiffe://{TRUST_DOMAIN}/ns/{namespace}/sa/{service_account}"


def loopback_settings(name: str, address: str, connect_timeout_s: float = 3.0) -> ProxySettings:
    """A node proxy bound to `address` on ephemeral ports (read them from
    NodeProxy.addresses()), no packet mark (nothing is captured), no access log
    file (tests capture the log in memory)."""
    return ProxySettings(node_name=name, node_address=address, outbound_bind=address, inbound_bind=address,
                         outbound_port=0, inbound_plain_port=0, hbone_port=0, mark=0,
                         connect_timeout_s=connect_timeout_s, access_log="off")
