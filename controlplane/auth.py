"""Who may call the control plane, and the record of what they changed: the
wiring of the pieces, each in a module of its own.

- controlplane/cpca.py: the control plane's CA (the mesh CA's type, a second
  instance): the TCP listeners' server certificate, node and operator
  certificates; san_entries, token_port_address.
- controlplane/operators.py: operators and their credentials (tokens and
  certificates by serial, each revocable, TTLs capped), the bootstrap admin.
- controlplane/nodeids.py: node identity records (operator labels, join
  address, valid certificate serials, revocation).
- controlplane/interceptor.py: identify the caller, decide per RPC, audit,
  close the open streams of revoked nodes.
- controlplane/audit.py: the hash-chained change log and the bounded refusal log.
- controlplane/adminapi.py: nodemesh.v1.Admin.
- controlplane/trustwatch.py: republish when the trust bundle or the SVID
  revocation list changes.
- controlplane/unixsock.py: the local-admin unix socket, created private.
- nodemesh/bindings.py: which identities the operator bound to which nodes.

The unix socket is plaintext and local-admin: whoever can open it has the rw
role and speaks for any node. This module re-exports the names other modules
used to import from it.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

from controlplane.adminapi import AdminServicer
from controlplane.audit import AUDIT_KEEP, AuditLog, RefusalLog
from controlplane.cpca import CP_CA_CERT_FILE, CP_CA_KEY_FILE, ControlPlaneCA, san_entries, token_port_address
from controlplane.interceptor import (
    AUDITED,
    METHOD_ACCESS,
    NODE,
    OPEN,
    AuthInterceptor,
    StreamGuard,
    allows,
    attested_node,
    audit_detail,
    current_caller,
    identify,
    refusal,
)
from controlplane.interceptor import uri_of as _uri_of
from controlplane.nodeids import NodeIdentities, SvidRevocations
from controlplane.operators import (
    ADMIN_TOKEN_FILE,
    BOOTSTRAP_OPERATOR,
    DEFAULT_OPERATOR_CERT_TTL_S,
    MAX_OPERATOR_TTL_S,
    OPERATOR_TOKEN_PREFIX,
    RO,
    ROLES,
    RW,
    Caller,
    OperatorError,
    Operators,
    _hash,
    bootstrap_admin,
    migrate_legacy,
)
from controlplane.records import Records
from controlplane.tokens import DEFAULT_NODE_CERT_TTL_S, JoinTokens, NodeAttestationServicer
from controlplane.trustwatch import watch_revocations, watch_trust_bundle
from controlplane.unixsock import prepare_unix_socket, private_umask, secure_unix_socket
from nodemesh.keyfiles import write_private
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc

if TYPE_CHECKING:
    from controlplane.ca import CertificateAuthority

log = logging.getLogger("nodemesh.controlplane.auth")

__all__ = [
    "ADMIN_TOKEN_FILE", "AUDITED", "AUDIT_KEEP", "BOOTSTRAP_OPERATOR", "CP_CA_CERT_FILE", "CP_CA_KEY_FILE",
    "DEFAULT_NODE_CERT_TTL_S", "DEFAULT_OPERATOR_CERT_TTL_S", "MAX_OPERATOR_TTL_S", "METHOD_ACCESS", "NODE", "OPEN",
    "OPERATOR_TOKEN_PREFIX", "RO", "ROLES", "RW", "AdminServicer", "AuditLog", "AuthInterceptor", "Caller",
    "ControlPlaneCA", "NodeIdentities", "OperatorError", "Operators", "RefusalLog", "Security", "StreamGuard",
    "_hash", "_uri_of", "allows", "attested_node", "audit_detail", "bootstrap_admin", "current_caller",
    "identify", "prepare_unix_socket", "private_umask", "refusal", "san_entries", "secure_unix_socket",
    "token_port_address", "watch_revocations", "watch_trust_bundle", "write_private",
]

AUDIT_KEY_LABEL = b"nodemesh audit chain v1"


@dataclass
class Security:
    """Everything the control plane's access control needs, made once at start."""

    state_dir: str
    cp_ca: ControlPlaneCA
    operators: Operators
    tokens: JoinTokens
    interceptor: AuthInterceptor
    db: sqlite3.Connection | None  # None when the records live in a shared store (etcd)
    node_cert_ttl_s: int
    nodes: NodeIdentities
    audit: AuditLog
    refusals: RefusalLog
    # What every node refuses at HBONE: SVIDs of revoked nodes (set by controlplane/process.py).
    revocations: SvidRevocations | None = None

    @classmethod
    def open(cls, state_dir: str, db_path: str, node_cert_ttl_s: int = DEFAULT_NODE_CERT_TTL_S,
             clock: Callable[[], float] = time.time, store: Any = None) -> Security:
        cp_ca = ControlPlaneCA.load_or_create(state_dir, clock)
        db: sqlite3.Connection | None = None
        if store is not None and getattr(store, "shares_state", False):
            # Several replicas: operators, node identities, audit and join tokens in the shared
            # store (controlplane/store_etcd.py), so a token made on one replica joins on another.
            records: Records = store.security_records()
            tokens: JoinTokens = store.join_tokens(clock)
        else:
            # Its own connection to the store's SQLite file (WAL): own tables, no shared locks.
            db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA busy_timeout=5000")
            lock = threading.Lock()
            records = Records(db, lock)
            tokens = JoinTokens(db, clock, lock)
        operators = Operators(records, clock)
        if db is not None:
            migrate_legacy(db, operators, records)
        audit = AuditLog(records, cp_ca.derive_key(AUDIT_KEY_LABEL), clock)
        refusals = RefusalLog(clock)
        nodes = NodeIdentities(records, clock)
        bootstrap_admin(state_dir, operators, audit)
        interceptor = AuthInterceptor(operators, audit, refusals, nodes)
        return cls(state_dir, cp_ca, operators, tokens, interceptor, db, node_cert_ttl_s, nodes, audit, refusals)

    @property
    def blocking(self) -> bool:
        """Whether record writes wait on the network (etcd): callers on the loop use off_loop."""
        return bool(getattr(self.nodes._records, "blocking", False))

    def register(self, server: grpc.aio.Server, ca: CertificateAuthority, trust_domain: Callable[[], str],
                 republish: Callable[[], None], registry: Any = None) -> None:
        mesh_pb2_grpc.add_NodeAttestationServicer_to_server(  # type: ignore[no-untyped-call]
            NodeAttestationServicer(self.tokens, self.cp_ca, trust_domain, lambda: ca.trust_bundle,
                                    self.node_cert_ttl_s, nodes=self.nodes), server)
        mesh_pb2_grpc.add_AdminServicer_to_server(  # type: ignore[no-untyped-call]
            AdminServicer(self, ca, trust_domain, republish, registry), server)

    def server_credentials_for(self, listen: Sequence[str], extra_sans: Sequence[str]) -> tuple[
            grpc.ServerCredentials, grpc.ServerCredentials]:
        sans = san_entries(listen, extra_sans)
        log.info("serving TLS on TCP with a server certificate for %s",
                 ", ".join(str(getattr(n, "value", n)) for n in sans))
        return self.cp_ca.server_credentials(sans)

    def identity_check(self, mesh: Callable[[], Any]) -> Callable[[str, str, str], str]:
        """For the CA: '' when the identity (namespace, service account) is bound
        to the node, else which binding is missing."""
        from nodemesh.bindings import identity_refused

        def check(node: str, namespace: str, service_account: str) -> str:
            rec = self.nodes.get(node)
            if rec.revoked_unix:  # its node certificate is refused too; this holds for the unix socket
                when = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(rec.revoked_unix))
                return (f"node {node} was revoked at {when} by {rec.revoked_by or 'an operator'}; it gets no "
                        "certificate until it joins again with a new token")
            return identity_refused(mesh(), node, dict(rec.labels), namespace, service_account)

        return check

    def svid_epoch(self, node: str) -> int:
        """The node's issuance epoch, for its SVIDs' serials (nodemesh/revocation.py)."""
        return self.nodes.get(node).svid_epoch

    def admit_registration(self, mesh: Callable[[], Any]) -> Callable[[mesh_pb2.NodeRegistration], str]:
        """The registry's check of a registration against the caller, the node's
        identity record and the identity bindings: '' to accept, else why it is refused."""
        from nodemesh.bindings import address_refused, workload_refused

        def check(reg: mesh_pb2.NodeRegistration) -> str:
            node = attested_node()
            if node is not None and node != reg.node_name:
                why = (f"this session's node certificate is for node {node!r}, not {reg.node_name!r}; "
                       "check the agent's node.name")
                self.refusals.record(f"node/{node}", "Registry/Session", "PERMISSION_DENIED", why)
                return why
            current = mesh()
            rec = self.nodes.get(reg.node_name)
            labels = dict(rec.labels)
            problems = []
            if node is not None:
                # Addresses are checked for nodes with a certificate; the local-admin unix
                # socket (an agent on the control plane's host) is trusted like an operator.
                attested = [rec.join_address] if rec.join_address else []
                for i, a in enumerate(reg.addresses):
                    why = address_refused(current, reg.node_name, labels, attested, a, f"addresses[{i}]")
                    if why:
                        problems.append(why)
                for w in reg.workloads:
                    why = address_refused(current, reg.node_name, labels, attested, w.ip or (reg.addresses or [""])[0],
                                          f"workload {w.namespace}/{w.name} ip")
                    if why:
                        problems.append(why)
            for w in reg.workloads:
                why = workload_refused(current, reg.node_name, labels, w.namespace, w.service_account,
                                       dict(w.labels))
                if why:
                    problems.append(f"workload {w.namespace}/{w.name}: {why}")
            if problems:
                text = "; ".join(problems[:5]) + (f"; and {len(problems) - 5} more" if len(problems) > 5 else "")
                self.refusals.record(f"node/{reg.node_name}", "Registry/Session", "PERMISSION_DENIED", text)
                return text
            return ""

        return check

    def close(self) -> None:
        if self.db is not None:
            self.db.close()
