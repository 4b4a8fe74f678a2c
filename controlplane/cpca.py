"""The control plane's own CA: the same CA type as the mesh CA
(controlplane/ca.py CertificateAuthority), a second instance with its own
files (cp-ca.pem / cp-ca.key in the state dir). It signs the server
certificate of the TCP listeners, node certificates (spiffe://<td>/node/<name>,
from a join) and operator client certificates (spiffe://<td>/operator/<name>),
never workload SVIDs: a node or operator certificate is never a workload
identity at HBONE, and a workload SVID never opens the control plane.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Sequence

from cryptography import x509

from controlplane.ca import CaError, CertificateAuthority

CP_CA_CERT_FILE = "cp-ca.pem"
CP_CA_KEY_FILE = "cp-ca.key"


class ControlPlaneCA(CertificateAuthority):
    """A CertificateAuthority loaded from (or made as) the control plane's CA files."""

    @classmethod
    def load_or_create(cls, state_dir: str,  # type: ignore[override]
                       clock: Callable[[], float] = time.time) -> ControlPlaneCA:
        try:
            ca = super().load_or_create(state_dir, "cluster.local", clock, cert_file=CP_CA_CERT_FILE,
                                        key_file=CP_CA_KEY_FILE, purpose="control-plane")
        except CaError as e:
            raise OSError(str(e)) from None
        if not isinstance(ca, ControlPlaneCA):  # load_or_create builds cls; a subclass mix-up is a bug here
            raise TypeError(f"expected a ControlPlaneCA, got {type(ca).__name__}")
        return ca


def san_entries(listen: Sequence[str], extra: Sequence[str] = ()) -> list[x509.GeneralName]:
    """Subject alternative names for the server certificate: the IPs and host
    names of the TCP listen addresses, the --san extras, and loopback."""
    names: dict[str, x509.GeneralName] = {}

    def add(host: str) -> None:
        host = host.strip().strip("[]")
        if not host:
            return
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            names[host.lower()] = x509.DNSName(host.lower())
            return
        if ip.is_unspecified:
            # A wildcard listener: every address of this host, as far as it knows them.
            for info in socket.getaddrinfo(socket.gethostname(), None):
                add(str(info[4][0]))
            return
        names[str(ip)] = x509.IPAddress(ip)

    for addr in listen:
        if not addr.startswith("unix:"):
            add(addr.rsplit(":", 1)[0])
    for s in extra:
        add(s)
    for s in ("127.0.0.1", "::1", "localhost"):
        add(s)
    return list(names.values())


def token_port_address(addr: str) -> str:
    """The server-only TLS address paired with a mutual-TLS listen address: the next port."""
    host, _, port = addr.rpartition(":")
    return f"{host}:{int(port) + 1}" if int(port) else f"{host}:0"
