"""Who may call the control plane, and the record of what they changed.

- The control-plane CA (`cp-ca.pem`/`cp-ca.key` in the state dir) signs the
  server certificate of the TCP listeners, node certificates
  (spiffe://<td>/node/<name>, from a join) and operator client certificates
  (spiffe://<td>/operator/<name>). It is separate from the mesh root that signs
  workload SVIDs, so a node or operator certificate is never a workload
  identity at HBONE, and a workload SVID never opens the control plane.
- Operators: a bearer token (`authorization: Bearer nmop1.<id>.<secret>`,
  stored hashed) or a client certificate; the role (ro: Get/List/Watch/Audit,
  rw: everything of the config and admin APIs) is kept in the `operators`
  table, so revoking an operator disables both kinds of credential at once.
- The unix socket is plaintext and local-admin: whoever can open it has the rw
  role and speaks for any node. Its file is 0600 and its directory must not
  be writable by others (checked at start).
- `AuthInterceptor` decides per RPC (METHOD_ACCESS) before any servicer runs,
  hands the caller to servicers via `current_caller()`, and writes every
  change (and every refused change) to the `audit` table.
"""

from __future__ import annotations

import asyncio
import contextvars
import datetime
import hashlib
import hmac
import inspect
import ipaddress
import logging
import os
import secrets
import socket
import sqlite3
import stat
import threading
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controlplane.store import off_loop
from controlplane.tokens import DEFAULT_TOKEN_TTL_S, JoinTokens, NodeAttestationServicer
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc

if TYPE_CHECKING:
    from controlplane.ca import CertificateAuthority

log = logging.getLogger("nodemesh.controlplane.auth")

CP_CA_CERT_FILE = "cp-ca.pem"
CP_CA_KEY_FILE = "cp-ca.key"
ADMIN_TOKEN_FILE = "admin.token"
BOOTSTRAP_OPERATOR = "admin"
OPERATOR_TOKEN_PREFIX = "nmop1"
DEFAULT_OPERATOR_CERT_TTL_S = 30 * 24 * 3600
SERVER_CERT_LIFETIME = datetime.timedelta(days=365)
CA_LIFETIME = datetime.timedelta(days=3650)
BACKDATE = datetime.timedelta(minutes=5)
AUDIT_KEEP = 100_000  # rows; older ones are pruned

RO, RW, NODE, OPEN = "ro", "rw", "node", "open"
ROLES = (RO, RW)
# What each RPC needs. A method not listed is refused (fail closed).
METHOD_ACCESS: dict[str, str] = {
    "/nodemesh.v1.ConfigService/Get": RO,
    "/nodemesh.v1.ConfigService/List": RO,
    "/nodemesh.v1.ConfigService/Watch": RO,
    "/nodemesh.v1.ConfigService/Apply": RW,
    "/nodemesh.v1.ConfigService/Delete": RW,
    "/nodemesh.v1.Admin/Audit": RO,
    "/nodemesh.v1.Admin/CreateJoinToken": RW,
    "/nodemesh.v1.Admin/CreateOperator": RW,
    "/nodemesh.v1.Admin/RevokeOperator": RW,
    "/nodemesh.v1.Admin/RotateRoot": RW,
    "/nodemesh.v1.NodeAttestation/Join": OPEN,
    "/nodemesh.v1.NodeAttestation/RenewNodeCertificate": NODE,
    "/nodemesh.v1.Registry/Session": NODE,
    "/nodemesh.v1.CertificateService/CreateCertificate": NODE,
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources": NODE,
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources": NODE,
}
# Methods whose calls change something: each is written to the audit log.
AUDITED = {m for m, need in METHOD_ACCESS.items() if need == RW} | {"/nodemesh.v1.NodeAttestation/Join"}


# ---------------------------------------------------------------- callers


@dataclass(frozen=True)
class Caller:
    kind: str  # local | operator | node | anonymous
    name: str = ""
    role: str = ""  # ro | rw for operators and local
    why_anonymous: str = ""  # what was presented and why it did not count

    @property
    def principal(self) -> str:
        if self.kind == "local":
            return "local (unix socket)"
        if self.kind in ("operator", "node"):
            return f"{self.kind}/{self.name}"
        return "anonymous"


_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("nodemesh_cp_caller", default=None)


def current_caller() -> Caller | None:
    """The caller of the RPC being served (set by AuthInterceptor); None when
    the servicer runs without the interceptor (unit tests of the servicer alone)."""
    return _CALLER.get()


def attested_node() -> str | None:
    """The node the current call's certificate names, or None when the call
    carries no node certificate (a local-admin unix socket call, or no interceptor),
    in which case the node name in the request is taken as given."""
    caller = current_caller()
    return caller.name if caller is not None and caller.kind == "node" else None


def allows(caller: Caller, need: str) -> bool:
    """The role check, separate from gRPC so it can be tested as a table."""
    if need == OPEN:
        return True
    if caller.kind == "local":
        return True
    if need == NODE:
        return caller.kind == "node"
    if caller.kind != "operator":
        return False
    return caller.role == RW or (need == RO and caller.role == RO)


def refusal(caller: Caller, method: str, need: str | None) -> tuple[grpc.StatusCode, str]:
    """The status and operator-facing message for a call `allows` refused."""
    short = method.rsplit("/", 1)[-1]
    if need is None:
        return grpc.StatusCode.PERMISSION_DENIED, f"{method} is not an API this control plane serves to callers"
    if need == NODE:
        if caller.kind == "anonymous":
            return grpc.StatusCode.UNAUTHENTICATED, (
                f"{short} needs a node certificate{': ' + caller.why_anonymous if caller.why_anonymous else ''}; "
                "check that the agent joined (controlPlane.joinTokenFile) and that its node.key/node.pem "
                "in stateDir are present and unexpired")
        return grpc.StatusCode.PERMISSION_DENIED, (
            f"{short} is for node agents (a node certificate); {caller.principal} may not call it")
    if caller.kind == "anonymous":
        return grpc.StatusCode.UNAUTHENTICATED, (
            f"{short} needs an operator credential"
            f"{' (' + caller.why_anonymous + ')' if caller.why_anonymous else ''}: pass --token-file or "
            "$NODEMESH_TOKEN (the bootstrap one is admin.token in the control plane's state dir), or an "
            "operator certificate with --cert/--key")
    if caller.kind == "node":
        return grpc.StatusCode.PERMISSION_DENIED, (
            f"{short} needs an operator credential; node certificates ({caller.principal}) only serve the "
            "agent APIs")
    return grpc.StatusCode.PERMISSION_DENIED, (
        f"{short} needs the {need} role; {caller.principal} has role {caller.role}: ask an operator with "
        "role rw, or create a credential with `nodemesh operator create NAME --role rw`")


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def write_private(path: str, data: bytes) -> None:
    """Create or replace a file that only its owner can read (0600 from the start)."""
    tmp = f"{path}.tmp"
    try:
        os.unlink(tmp)
    except FileNotFoundError:
        pass
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------- the control-plane CA


def _uri_of(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if len(uris) == 1 else ""


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


class ControlPlaneCA:
    """Signs the control plane's own certificates; never workload SVIDs."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey,
                 clock: Callable[[], float] = time.time) -> None:
        self.cert = cert
        self._key = key
        self._clock = clock
        self.pem = cert.public_bytes(serialization.Encoding.PEM).decode()
        # The pin a join token carries: SHA-256 of the CA certificate (DER).
        self.pin = hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()

    @classmethod
    def load_or_create(cls, state_dir: str, clock: Callable[[], float] = time.time) -> ControlPlaneCA:
        cert_path, key_path = os.path.join(state_dir, CP_CA_CERT_FILE), os.path.join(state_dir, CP_CA_KEY_FILE)
        if os.path.exists(cert_path) and os.path.exists(key_path):
            try:
                with open(cert_path, "rb") as f:
                    cert = x509.load_pem_x509_certificate(f.read())
                with open(key_path, "rb") as f:
                    key = serialization.load_pem_private_key(f.read(), password=None)
            except (OSError, ValueError) as e:
                raise OSError(f"cannot load the control-plane CA from {cert_path} and {key_path}: {e}; "
                              "restore both from a backup") from None
            if not isinstance(key, ec.EllipticCurvePrivateKey) or cert.public_key() != key.public_key():
                raise OSError(f"{cert_path} and {key_path} do not belong together; restore both from one backup")
            return cls(cert, key, clock)
        if os.path.exists(cert_path) or os.path.exists(key_path):
            raise OSError(f"only one of {cert_path} and {key_path} exists; restore the other, or remove "
                          "both (every node must then join again with a new token)")
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.fromtimestamp(clock(), datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nodemesh"),
                          x509.NameAttribute(NameOID.COMMON_NAME, "nodemesh control plane CA")])
        cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - BACKDATE).not_valid_after(now + CA_LIFETIME)
                .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=False, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=True, crl_sign=True, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
                .sign(key, hashes.SHA256()))
        write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
        with open(cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        log.info("created the control-plane CA in %s (pin sha256:%s)", state_dir, cls(cert, key).pin[:16])
        return cls(cert, key, clock)

    def _leaf(self, public_key: Any, sans: list[x509.GeneralName], ttl: datetime.timedelta,
              usage: x509.ObjectIdentifier) -> x509.Certificate:
        now = datetime.datetime.fromtimestamp(self._clock(), datetime.UTC)
        ski = self.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return (x509.CertificateBuilder()
                .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nodemesh")]))
                .issuer_name(self.cert.subject).public_key(public_key)
                .serial_number(x509.random_serial_number())
                .not_valid_before(now - BACKDATE)
                .not_valid_after(min(now + ttl, self.cert.not_valid_after_utc))
                .add_extension(x509.SubjectAlternativeName(sans), critical=True)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                             key_encipherment=True, data_encipherment=False, key_agreement=False,
                                             key_cert_sign=False, crl_sign=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
                .sign(self._key, hashes.SHA256()))

    def sign_client(self, public_key: Any, uri: str, ttl: datetime.timedelta) -> str:
        """A client certificate (node or operator) for the SPIFFE ID `uri`."""
        cert = self._leaf(public_key, [x509.UniformResourceIdentifier(uri)], ttl, ExtendedKeyUsageOID.CLIENT_AUTH)
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    def server_credentials(self, sans: list[x509.GeneralName]) -> tuple[grpc.ServerCredentials,
                                                                         grpc.ServerCredentials]:
        """TLS for the TCP listeners, with a fresh server key (in memory only):
        (mutual TLS: a client certificate chaining to this CA is required;
        server-only TLS: for Join and bearer-token operators). gRPC Python can
        either require a client certificate or not ask for one, never ask
        optionally, hence two ports."""
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = self._leaf(key.public_key(), sans, SERVER_CERT_LIFETIME, ExtendedKeyUsageOID.SERVER_AUTH)
        chain = leaf.public_bytes(serialization.Encoding.PEM) + self.pem.encode()
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return (grpc.ssl_server_credentials([(key_pem, chain)], root_certificates=self.pem.encode(),
                                            require_client_auth=True),
                grpc.ssl_server_credentials([(key_pem, chain)]))


# ---------------------------------------------------------------- operators and audit

_SCHEMA = """
CREATE TABLE IF NOT EXISTS operators (
    name TEXT PRIMARY KEY,
    role TEXT NOT NULL,
    token_id TEXT,
    token_sha256 TEXT,
    created_unix REAL NOT NULL,
    revoked_unix REAL
);
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    unix_ms INTEGER NOT NULL,
    principal TEXT NOT NULL,
    action TEXT NOT NULL,
    detail TEXT NOT NULL,
    outcome TEXT NOT NULL
);
"""


class OperatorError(ValueError):
    """A bad operator request; the message names the field."""


class Operators:
    """The operators and audit tables (the control plane's SQLite file)."""

    blocking = False  # writes wait on the network (store_etcd.EtcdOperators): call them off the loop

    def __init__(self, db: sqlite3.Connection, clock: Callable[[], float] = time.time,
                 lock: threading.Lock | None = None) -> None:
        self._db = db
        self._clock = clock
        self._lock = lock or threading.Lock()
        with self._lock:
            self._db.executescript(_SCHEMA)

    @staticmethod
    def _check(name: str, role: str) -> None:
        if not name or len(name) > 63 or not all(c.isalnum() or c in "-_." for c in name):
            raise OperatorError(f"name {name!r} must be 1-63 letters, digits, '-', '_' or '.'")
        if role not in ROLES:
            raise OperatorError(f"role {role!r} must be one of {', '.join(ROLES)}")

    def count(self) -> int:
        with self._lock:
            return int(self._db.execute("SELECT COUNT(*) FROM operators").fetchone()[0])

    def _upsert(self, name: str, role: str, token_id: str | None, token_hash: str | None) -> None:
        with self._lock:
            self._db.execute(
                "INSERT INTO operators (name, role, token_id, token_sha256, created_unix, revoked_unix) "
                "VALUES (?, ?, ?, ?, ?, NULL) ON CONFLICT(name) DO UPDATE SET role = excluded.role, "
                "token_id = COALESCE(excluded.token_id, operators.token_id), "
                "token_sha256 = COALESCE(excluded.token_sha256, operators.token_sha256), revoked_unix = NULL",
                (name, role, token_id, token_hash, self._clock()))

    def create_token(self, name: str, role: str) -> str:
        """A new bearer token for operator `name` (replacing its old token)."""
        self._check(name, role)
        token_id, secret = secrets.token_hex(6), secrets.token_urlsafe(32)
        self._upsert(name, role, token_id, _hash(secret))
        return f"{OPERATOR_TOKEN_PREFIX}.{token_id}.{secret}"

    def register_cert(self, name: str, role: str) -> None:
        """Operator `name` may use certificates with its SPIFFE ID (keeps any token it has)."""
        self._check(name, role)
        self._upsert(name, role, None, None)

    def revoke(self, name: str) -> bool:
        with self._lock:
            cur = self._db.execute("UPDATE operators SET revoked_unix = ?, token_id = NULL, token_sha256 = NULL "
                                   "WHERE name = ? AND revoked_unix IS NULL", (self._clock(), name))
            return cur.rowcount == 1

    def by_token(self, token: str) -> Caller:
        parts = token.strip().split(".")
        if len(parts) != 3 or parts[0] != OPERATOR_TOKEN_PREFIX:
            return Caller("anonymous", why_anonymous="the bearer token is not an operator token "
                                                     f"({OPERATOR_TOKEN_PREFIX}.<id>.<secret>)")
        with self._lock:
            row = self._db.execute("SELECT name, role, token_sha256 FROM operators WHERE token_id = ? "
                                   "AND revoked_unix IS NULL", (parts[1],)).fetchone()
        if row is None or not hmac.compare_digest(str(row[2]), _hash(parts[2])):
            return Caller("anonymous", why_anonymous="the bearer token is unknown or revoked")
        return Caller("operator", str(row[0]), str(row[1]))

    def by_name(self, name: str) -> Caller:
        with self._lock:
            row = self._db.execute("SELECT role FROM operators WHERE name = ? AND revoked_unix IS NULL",
                                   (name,)).fetchone()
        if row is None:
            return Caller("anonymous", why_anonymous=f"the certificate's operator {name!r} is unknown or revoked")
        return Caller("operator", name, str(row[0]))

    def audit(self, principal: str, action: str, detail: str, outcome: str) -> None:
        with self._lock:
            self._db.execute("INSERT INTO audit (unix_ms, principal, action, detail, outcome) VALUES (?, ?, ?, ?, ?)",
                             (int(self._clock() * 1000), principal, action, detail[:2000], outcome[:500]))
            self._db.execute("DELETE FROM audit WHERE seq <= (SELECT MAX(seq) FROM audit) - ?", (AUDIT_KEEP,))

    def audit_entries(self, limit: int = 100) -> list[mesh_pb2.AuditEntry]:
        with self._lock:
            rows = self._db.execute("SELECT unix_ms, principal, action, detail, outcome FROM audit "
                                    "ORDER BY seq DESC LIMIT ?", (max(1, min(limit, 10_000)),)).fetchall()
        return [mesh_pb2.AuditEntry(unix_ms=r[0], principal=r[1], action=r[2], detail=r[3], outcome=r[4])
                for r in rows]


def bootstrap_admin(state_dir: str, operators: Operators) -> str | None:
    """At the first start (no operator yet) make the rw operator `admin` and
    write its token to <state_dir>/admin.token (0600). Returns the path, if written."""
    if operators.count():
        return None
    path = os.path.join(state_dir, ADMIN_TOKEN_FILE)
    write_private(path, (operators.create_token(BOOTSTRAP_OPERATOR, RW) + "\n").encode())
    operators.audit("control plane", "bootstrap", f"operator {BOOTSTRAP_OPERATOR} (rw), token in {path}", "ok")
    log.info("created the bootstrap operator %r; its token is in %s (mode 0600)", BOOTSTRAP_OPERATOR, path)
    return path


# ---------------------------------------------------------------- the interceptor


def identify(context: grpc.aio.ServicerContext, metadata: Sequence[tuple[str, Any]],
             operators: Operators) -> Caller:
    """Who is calling: the transport first (unix socket, verified client
    certificate), then a bearer token."""
    peer = context.peer() or ""
    if peer.startswith(("unix:", "unix-abstract:")):
        return Caller("local", "unix", RW)
    auth = context.auth_context() or {}
    why = ""
    pems = auth.get("x509_pem_cert") or []
    if pems:
        # gRPC's TLS layer has verified the chain to the control-plane CA and its dates.
        try:
            cert = x509.load_pem_x509_certificate(pems[0] if isinstance(pems[0], bytes) else pems[0].encode())
            uri = _uri_of(cert)
        except ValueError:
            uri = ""
        path = uri.split("/", 3)[3] if uri.startswith("spiffe://") and uri.count("/") >= 3 else ""
        kind, _, name = path.partition("/")
        if kind == "node" and name:
            return Caller("node", name)
        if kind == "operator" and name:
            return operators.by_name(name)
        why = f"the client certificate ({uri or 'no SPIFFE ID'}) is neither a node nor an operator certificate"
    for key, value in metadata:
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            if scheme.lower() != "bearer" or not token:
                return Caller("anonymous", why_anonymous="the authorization metadata must read 'Bearer <token>'")
            return operators.by_token(token)
    return Caller("anonymous", why_anonymous=why)


def audit_detail(method: str, request: Any) -> str:
    """What a change was about, for the audit log (never a secret)."""
    short = method.rsplit("/", 1)[-1]
    try:
        if isinstance(request, mesh_pb2.ApplyRequest):
            refs = []
            for d in yaml.safe_load_all(request.documents):
                if isinstance(d, dict):
                    meta = d.get("metadata") or {}
                    refs.append(f"{d.get('kind', '?')}/{meta.get('namespace', '') or '-'}/{meta.get('name', '?')}")
            return f"apply {', '.join(refs) or '(no documents)'}"
        if isinstance(request, mesh_pb2.ResourceRef):
            return f"delete {request.kind}/{request.namespace or '-'}/{request.name}"
        if isinstance(request, mesh_pb2.CreateJoinTokenRequest):
            return f"join token for node {request.node_name} (ttl {request.ttl_seconds or DEFAULT_TOKEN_TTL_S}s)"
        if isinstance(request, mesh_pb2.CreateOperatorRequest):
            return (f"operator {request.name} role {request.role} "
                    f"({'certificate' if request.csr_pem else 'token'})")
        if isinstance(request, mesh_pb2.RevokeOperatorRequest):
            return f"revoke operator {request.name}"
        if isinstance(request, mesh_pb2.RotateRootRequest):
            return f"rotate the mesh root (overlap {request.overlap_seconds or 'default'}s)"
        if isinstance(request, mesh_pb2.JoinRequest):
            return f"node {request.node_name} joined with a token"
    except Exception as e:  # noqa: BLE001 - a malformed request still gets a line
        return f"{short} (request not summarised: {e})"
    return short


def _skip_audit(request: Any) -> bool:
    return isinstance(request, mesh_pb2.ApplyRequest) and request.dry_run


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticates and authorises every call before its servicer runs."""

    def __init__(self, operators: Operators) -> None:
        self._operators = operators

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                             Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = str(handler_call_details.method)
        metadata = tuple(handler_call_details.invocation_metadata or ())
        need = METHOD_ACCESS.get(method)
        ops = self._operators

        async def admit(context: grpc.aio.ServicerContext, request: Any) -> Caller:
            caller = identify(context, metadata, ops)
            if need is None or not allows(caller, need):
                code, message = refusal(caller, method, need)
                if method in AUDITED and not _skip_audit(request):
                    ops.audit(caller.principal, method.rsplit("/", 1)[-1], audit_detail(method, request),
                              f"denied: {code.name}")
                log.warning("refused %s to %s (%s): %s", method, caller.principal, context.peer(), message)
                await context.abort(code, message)
            return caller

        def record(caller: Caller, request: Any, outcome: str) -> None:
            if method in AUDITED and not _skip_audit(request):
                principal = caller.principal
                if isinstance(request, mesh_pb2.JoinRequest):
                    principal = f"node/{request.node_name}" if outcome == "ok" else "anonymous (join token)"
                ops.audit(principal, method.rsplit("/", 1)[-1], audit_detail(method, request), outcome)

        def outcome_of(context: grpc.aio.ServicerContext, e: BaseException) -> str:
            code = context.code() if hasattr(context, "code") else None
            details = context.details() if hasattr(context, "details") else ""
            if code is not None and code != grpc.StatusCode.OK:
                name = code.name if isinstance(code, grpc.StatusCode) else str(code)
                return f"error: {name}: {details or e}"
            return f"error: {e!r}"

        if not handler.request_streaming and not handler.response_streaming:
            inner = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                caller = await admit(context, request)
                token = _CALLER.set(caller)
                try:
                    response = await inner(request, context)
                except BaseException as e:
                    record(caller, request, outcome_of(context, e))
                    raise
                finally:
                    _CALLER.reset(token)
                record(caller, request, "ok")
                return response

            return handler._replace(unary_unary=unary_unary)

        attr = {(False, True): "unary_stream", (True, False): "stream_unary",
                (True, True): "stream_stream"}[(handler.request_streaming, handler.response_streaming)]
        inner_any = getattr(handler, attr)
        if inspect.isasyncgenfunction(inner_any):
            async def streaming_gen(request: Any, context: grpc.aio.ServicerContext) -> Any:
                caller = await admit(context, request)
                token = _CALLER.set(caller)
                try:
                    async for item in inner_any(request, context):
                        yield item
                finally:
                    _CALLER.reset(token)

            return handler._replace(**{attr: streaming_gen})

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
            caller = await admit(context, request)
            token = _CALLER.set(caller)
            try:
                return await inner_any(request, context)
            finally:
                _CALLER.reset(token)

        return handler._replace(**{attr: streaming})


# ---------------------------------------------------------------- admin API


class AdminServicer(mesh_pb2_grpc.AdminServicer):
    """nodemesh.v1.Admin: join tokens, operators, the audit log and root rotation."""

    def __init__(self, security: Security, ca: CertificateAuthority, trust_domain: Callable[[], str],
                 republish: Callable[[], None]) -> None:
        self._sec = security
        self._ca = ca
        self._trust_domain = trust_domain
        self._republish = republish

    async def CreateJoinToken(self, request: mesh_pb2.CreateJoinTokenRequest,
                              context: grpc.aio.ServicerContext) -> mesh_pb2.CreateJoinTokenResponse:
        try:
            token, expires = await off_loop(self._sec.tokens.blocking, self._sec.tokens.create, request.node_name,
                                            request.ttl_seconds or DEFAULT_TOKEN_TTL_S, self._sec.cp_ca.pin)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return mesh_pb2.CreateJoinTokenResponse(token=token, expires_unix=int(expires))

    async def CreateOperator(self, request: mesh_pb2.CreateOperatorRequest,
                             context: grpc.aio.ServicerContext) -> mesh_pb2.CreateOperatorResponse:
        try:
            if not request.csr_pem:
                token = await off_loop(self._sec.operators.blocking, self._sec.operators.create_token,
                                       request.name, request.role)
                return mesh_pb2.CreateOperatorResponse(token=token, server_ca_bundle=[self._sec.cp_ca.pem])
            Operators._check(request.name, request.role)
            uri = f"spiffe://{self._trust_domain()}/operator/{request.name}"
            from controlplane.tokens import load_csr

            csr = load_csr(request.csr_pem)
            ttl = datetime.timedelta(seconds=request.ttl_seconds or DEFAULT_OPERATOR_CERT_TTL_S)
            cert = self._sec.cp_ca.sign_client(csr.public_key(), uri, ttl)
            await off_loop(self._sec.operators.blocking, self._sec.operators.register_cert, request.name,
                           request.role)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return mesh_pb2.CreateOperatorResponse(cert_chain=[cert, self._sec.cp_ca.pem],
                                               server_ca_bundle=[self._sec.cp_ca.pem])

    async def RevokeOperator(self, request: mesh_pb2.RevokeOperatorRequest,
                             context: grpc.aio.ServicerContext) -> mesh_pb2.RevokeOperatorResponse:
        caller = current_caller()
        if caller is not None and caller.kind == "operator" and caller.name == request.name:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "an operator cannot revoke itself; use another rw credential")
        revoked = await off_loop(self._sec.operators.blocking, self._sec.operators.revoke, request.name)
        return mesh_pb2.RevokeOperatorResponse(revoked=revoked)

    async def Audit(self, request: mesh_pb2.AuditRequest,
                    context: grpc.aio.ServicerContext) -> mesh_pb2.AuditResponse:
        entries = await off_loop(self._sec.operators.blocking, self._sec.operators.audit_entries,
                                 int(request.limit or 100))
        return mesh_pb2.AuditResponse(entries=entries)

    async def RotateRoot(self, request: mesh_pb2.RotateRootRequest,
                         context: grpc.aio.ServicerContext) -> mesh_pb2.RotateRootResponse:
        from controlplane.ca import DEFAULT_ROTATION_OVERLAP_S, CaError

        overlap = float(request.overlap_seconds or DEFAULT_ROTATION_OVERLAP_S)
        try:
            old, new = await asyncio.to_thread(self._ca.rotate, self._trust_domain(), overlap)
        except CaError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        # Both roots go out over xDS at once; agents then re-issue their SVIDs from the new root.
        self._republish()
        return mesh_pb2.RotateRootResponse(old_fingerprint=old, new_fingerprint=new,
                                           old_trusted_until_unix=int(time.time() + overlap))


async def watch_trust_bundle(ca: CertificateAuthority, republish: Callable[[], None],
                             interval_s: float = 1.0) -> None:
    """Republish when the trust bundle changes by itself: a rotated-out root's
    overlap ending drops it from the bundle every agent holds."""
    last = tuple(ca.trust_bundle)
    while True:
        await asyncio.sleep(interval_s)
        now = tuple(ca.trust_bundle)
        if now != last:
            log.info("the trust bundle changed (%d -> %d roots): republishing", len(last), len(now))
            last = now
            republish()


# ---------------------------------------------------------------- wiring


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

    @classmethod
    def open(cls, state_dir: str, db_path: str, node_cert_ttl_s: int,
             clock: Callable[[], float] = time.time, store: Any = None) -> Security:
        cp_ca = ControlPlaneCA.load_or_create(state_dir, clock)
        db: sqlite3.Connection | None = None
        if store is not None and getattr(store, "shares_state", False):
            # Several replicas: operators, audit and join tokens in the shared store
            # (controlplane/store_etcd.py), so a token made on one replica joins on another.
            operators, tokens = store.security_tables(clock)
        else:
            # Its own connection to the store's SQLite file (WAL): own tables, no shared locks.
            db = sqlite3.connect(db_path, check_same_thread=False, isolation_level=None)
            db.execute("PRAGMA busy_timeout=5000")
            lock = threading.Lock()
            operators = Operators(db, clock, lock)
            tokens = JoinTokens(db, clock, lock)
        bootstrap_admin(state_dir, operators)
        return cls(state_dir, cp_ca, operators, tokens, AuthInterceptor(operators), db, node_cert_ttl_s)

    def register(self, server: grpc.aio.Server, ca: CertificateAuthority, trust_domain: Callable[[], str],
                 republish: Callable[[], None]) -> None:
        mesh_pb2_grpc.add_NodeAttestationServicer_to_server(  # type: ignore[no-untyped-call]
            NodeAttestationServicer(self.tokens, self.cp_ca, trust_domain, lambda: ca.trust_bundle,
                                    self.node_cert_ttl_s), server)
        mesh_pb2_grpc.add_AdminServicer_to_server(  # type: ignore[no-untyped-call]
            AdminServicer(self, ca, trust_domain, republish), server)

    def server_credentials_for(self, listen: Sequence[str], extra_sans: Sequence[str]) -> tuple[
            grpc.ServerCredentials, grpc.ServerCredentials]:
        sans = san_entries(listen, extra_sans)
        log.info("serving TLS on TCP with a server certificate for %s",
                 ", ".join(str(getattr(n, "value", n)) for n in sans))
        return self.cp_ca.server_credentials(sans)

    def admit_registration(self, mesh: Callable[[], Any]) -> Callable[[mesh_pb2.NodeRegistration], str]:
        """The registry's check of a registration against the caller and the mesh
        config: '' to accept, else why it is refused."""
        from nodemesh.security import node_may_register

        def check(reg: mesh_pb2.NodeRegistration) -> str:
            node = attested_node()
            if node is not None and node != reg.node_name:
                return (f"this session's node certificate is for node {node!r}, not {reg.node_name!r}; "
                        "check the agent's node.name")
            current = mesh()
            for w in reg.workloads:
                if not node_may_register(current, reg.node_name, w.namespace, w.service_account):
                    return (f"workload {w.namespace}/{w.name} uses service account {w.service_account!r}, which "
                            f"MeshConfig spec.nodeServiceAccounts does not allow on node {reg.node_name}")
            return ""

        return check

    def close(self) -> None:
        if self.db is not None:
            self.db.close()


def token_port_address(addr: str) -> str:
    """The server-only TLS address paired with a mutual-TLS listen address: the next port."""
    host, _, port = addr.rpartition(":")
    return f"{host}:{int(port) + 1}" if int(port) else f"{host}:0"


def prepare_unix_socket(path: str) -> None:
    """The unix socket is plaintext and local-admin: its directory must not be
    writable by group or others (someone could replace the socket)."""
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        os.makedirs(directory, mode=0o700, exist_ok=True)
    st = os.stat(directory)
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise OSError(f"the unix socket's directory {directory} is writable by group or others "
                      f"(mode {stat.S_IMODE(st.st_mode):o}); the socket grants full admin rights: use a "
                      "directory with mode 0700 or 0755 owned by the control plane's user")


def secure_unix_socket(path: str) -> None:
    """Only the owner (root, usually) may connect: connecting needs write permission."""
    try:
        os.chmod(path, 0o600)
    except OSError as e:
        raise OSError(f"cannot make the unix socket {path} mode 0600: {e}") from None
