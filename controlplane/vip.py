"""Virtual IP allocation for services: a pure function of the range, the
service's key and the addresses already taken."""

from __future__ import annotations

import hashlib
import ipaddress
from collections.abc import Set as AbstractSet


class VipExhausted(Exception):
    """Every usable address in the VIP range is taken."""


def usable_count(net: ipaddress.IPv4Network) -> int:
    # The network and broadcast addresses are never handed out.
    return max(net.num_addresses - 2, 0)


def is_usable(net: ipaddress.IPv4Network, vip: str) -> bool:
    try:
        addr = ipaddress.IPv4Address(vip)
    except ValueError:
        return False
    return addr in net and addr not in (net.network_address, net.broadcast_address)


def allocate_vip(net: ipaddress.IPv4Network, key: str, taken: AbstractSet[str]) -> str:
    """Pick a VIP for `key` ("namespace/name"): start at a hash of the key, so
    the same service tends to get the same address even after a wipe, then
    probe linearly past taken addresses."""
    n = usable_count(net)
    if n <= 0:
        raise VipExhausted(f"VIP range {net} has no usable addresses")
    start = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") % n
    base = int(net.network_address) + 1
    for i in range(n):
        candidate = str(ipaddress.IPv4Address(base + (start + i) % n))
        if candidate not in taken:
            return candidate
    raise VipExhausted(f"every address in VIP range {net} is taken ({n} services); "
                       "widen MeshConfig spec.vipRange")
