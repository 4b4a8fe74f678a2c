"""Settings shared by the agent's supervisor and its proxy workers, and the
certificate material the supervisor hands to workers. Every default lives here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

OUTBOUND_PORT = 15001
INBOUND_PLAIN_PORT = 15006
HBONE_PORT = 15008
ADMIN_PORT = 15000
# Fraction of new traces kept when the config says nothing (Istio's default: 1%).
DEFAULT_TRACE_SAMPLING = 0.01
# SO_MARK the proxy sets on every socket it opens, so capture rules let its own
# traffic through ("nm" in ASCII).
PROXY_MARK = 0x6E6D
# TPROXY inbound: the fwmark (used as value and mask, so it must not share a bit
# with PROXY_MARK), the routing table holding `local 0.0.0.0/0 dev lo`, and the
# preference of the `ip rule` that sends marked packets there.
TPROXY_MARK = 0x10000
TPROXY_TABLE = 15006
TPROXY_RULE_PREF = 15006


@dataclass(frozen=True)
class ProxySettings:
    node_name: str
    node_address: str  # this node's address peers use for HBONE
    outbound_port: int = OUTBOUND_PORT
    inbound_plain_port: int = INBOUND_PLAIN_PORT
    hbone_port: int = HBONE_PORT
    outbound_bind: str = "127.0.0.1"  # captured outbound arrives here (REDIRECT)
    inbound_bind: str = "0.0.0.0"  # noqa: S104 - 15006 and 15008 take callers from other nodes
    mark: int = PROXY_MARK
    workers: int = 1
    connect_timeout_s: float = 5.0
    access_log: str = ""  # path; "" = stderr, "off" = none
    # The control plane's address(es): never captured, and never proxied.
    excluded_cidrs: tuple[str, ...] = ()
    # How plaintext inbound reaches 15006: "redirect" (nat REDIRECT, original
    # destination from SO_ORIGINAL_DST) or "tproxy" (IP_TRANSPARENT listener,
    # original destination from getsockname(), caller's source IP kept).
    inbound_mode: str = "redirect"
    tproxy_mark: int = TPROXY_MARK
    tproxy_table: int = TPROXY_TABLE
    tproxy_rule_pref: int = TPROXY_RULE_PREF
    # Observability: "" = no traces, "http(s)://collector:4318" = OTLP/HTTP JSON,
    # else a file of JSON lines; fractions of traces / successful-connection log lines kept.
    tracing: str = ""
    # 1% of new traces, as Istio's default (a parent's decision is kept): every span
    # written to a file or queued for a collector costs CPU on every request.
    trace_sampling: float = DEFAULT_TRACE_SAMPLING
    access_log_sampling: float = 1.0


@dataclass(frozen=True)
class Svid:
    """One workload identity's certificate and private key, held in memory."""

    identity: str  # SPIFFE URI
    cert_chain_pem: str  # leaf first
    key_pem: str = field(repr=False)  # never in a log line or traceback that prints the object
    not_after_unix: float


@dataclass(frozen=True)
class Certs:
    svids: Mapping[str, Svid] = field(default_factory=dict)  # identity -> Svid
    trust_bundle: tuple[str, ...] = ()  # PEM roots
    version: int = 0
