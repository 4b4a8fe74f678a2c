"""The proxy's one error hierarchy: every failure carries a stable reason code
(access logs, metrics) and a hint that tells the operator what to check."""

from __future__ import annotations


class ProxyError(Exception):
    """Base of every error the data plane reports about a connection."""

    reason = "proxy_error"
    hint = ""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if hint is not None:
            self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message


# --- timeouts -------------------------------------------------------------------------------------
class ProxyTimeout(ProxyError):
    reason = "timeout"


class ConnectTimeout(ProxyTimeout):
    reason = "connect_timeout"
    hint = "is the destination up, and is port 15008 open between nodes?"


# --- network --------------------------------------------------------------------------------------
class NetworkError(ProxyError):
    reason = "network_error"


class ConnectRefused(NetworkError):
    reason = "connect_refused"
    hint = "is the destination listening on that port?"


class TlsHandshakeFailed(NetworkError):
    reason = "tls_handshake_failed"
    hint = "do both nodes trust the same CA, and does the peer node hold a certificate for the identity?"


# --- protocol -------------------------------------------------------------------------------------
class ProtocolError(ProxyError):
    reason = "protocol_error"


class LocalProtocolError(ProtocolError):
    reason = "local_protocol_error"


class RemoteProtocolError(ProtocolError):
    reason = "remote_protocol_error"
    hint = "is the peer a nodemesh proxy speaking HBONE on port 15008?"


class StreamRefused(ProtocolError):
    """The peer node proxy answered the CONNECT with a non-200 status."""

    reason = "stream_refused"

    def __init__(self, status: int, peer_reason: str) -> None:
        super().__init__(
            f"peer refused CONNECT with {status}: {peer_reason or 'no reason given'}",
            hint="see the destination node's access log for the same connection",
        )
        self.status = status
        self.peer_reason = peer_reason


# --- policy / identity ----------------------------------------------------------------------------
class PolicyError(ProxyError):
    reason = "policy_error"


class PolicyDenied(PolicyError):
    reason = "policy_denied"
    hint = "the mesh outbound policy is REGISTRY_ONLY: register the destination as a service"


class UnknownSource(PolicyError):
    reason = "unknown_source"
    hint = "declare the workload (uid or cgroup) in the node agent's local workloads"


class NoHealthyEndpoint(PolicyError):
    reason = "no_healthy_endpoint"
    hint = "does the service have registered, healthy endpoints?"


class PeerIdentityMismatch(PolicyError):
    reason = "peer_identity_mismatch"
    hint = "the peer node presented a certificate for another identity: check the endpoint's registration"


class PeerCertificateRevoked(PolicyError):
    reason = "revoked_peer_certificate"
    hint = ("the control plane revoked the node this certificate was issued to (`nodemesh node revoke`); "
            "`nodemesh node list` shows when and by whom")


class NoCertificate(PolicyError):
    reason = "no_certificate"
    hint = "has the node agent obtained an SVID for this workload from the CA?"


class NotReady(PolicyError):
    reason = "not_ready"
    hint = "the proxy has no configuration yet: is the node agent connected to the control plane?"


class UnknownDestination(PolicyError):
    reason = "unknown_destination"
    hint = "is the destination a workload declared on this node?"
