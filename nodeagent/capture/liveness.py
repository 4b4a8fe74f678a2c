"""Is the proxy serving? The agent's answer for iptables/nftables failover:
a TCP socket LISTENs on the outbound port in this network namespace.

Rules cannot see whether a socket listens, so the agent's watchdog polls this
(cheap: one read of /proc/net/tcp) and switches capture between states.
When every worker dies, the kernel closes their listening sockets at once.
"""

from __future__ import annotations

from pathlib import Path

TCP_LISTEN = "0A"


def listening_ports(text: str) -> set[int]:
    """Local ports in LISTEN state from /proc/net/tcp(6) text (pure)."""
    ports: set[int] = set()
    for line in text.splitlines()[1:]:
        parts = line.split()
        if len(parts) < 4 or parts[3] != TCP_LISTEN:
            continue
        _, _, port_hex = parts[1].rpartition(":")
        try:
            ports.add(int(port_hex, 16))
        except ValueError:
            continue
    return ports


def listening(port: int, proc_net: str = "/proc/net") -> bool:
    for name in ("tcp", "tcp6"):
        try:
            text = Path(proc_net, name).read_text()
        except OSError:
            continue
        if port in listening_ports(text):
            return True
    return False
