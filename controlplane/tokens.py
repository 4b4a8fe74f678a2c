"""Join tokens and node attestation: `nodemesh token create --node X` makes a
one-time, expiring token bound to node X; the agent presents it once to
NodeAttestation.Join and gets a node certificate (spiffe://<td>/node/X) signed
by the control-plane CA, which authenticates every later call of that agent.

Only a SHA-256 hash of a token's secret is stored; the token is shown once.
A token reads `nmjt1.<ca-pin>.<id>.<secret>`: the pin is the SHA-256 of the
control-plane CA certificate, so an agent without a CA bundle file can check
that it talks to the right control plane before it sends the token.
"""

from __future__ import annotations

import datetime
import functools
import hashlib
import hmac
import logging
import re
import secrets
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature

from controlplane.store import off_loop
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc

if TYPE_CHECKING:
    from controlplane.cpca import ControlPlaneCA
    from controlplane.nodeids import NodeIdentities

log = logging.getLogger("nodemesh.controlplane.tokens")

TOKEN_PREFIX = "nmjt1"  # noqa: S105 (the public prefix that marks a token's kind)
DEFAULT_TOKEN_TTL_S = 3600
MAX_TOKEN_TTL_S = 7 * 24 * 3600
# Node certificates live hours, renewed at half life: a revocation missed by some
# replica or cache ends with the certificate (controlplane/nodeids.py revokes at once).
DEFAULT_NODE_CERT_TTL_S = 12 * 3600
MAX_NODE_CERT_TTL_S = 24 * 3600
_NODE_NAME = re.compile(r"^[a-z0-9]([-a-z0-9.]{0,251}[a-z0-9])?$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS join_tokens (
    id TEXT PRIMARY KEY,
    node_name TEXT NOT NULL,
    secret_sha256 TEXT NOT NULL,
    created_unix REAL NOT NULL,
    expires_unix REAL NOT NULL,
    used_unix REAL
);
"""


class TokenRefused(Exception):
    """A join token that cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class ParsedToken:
    ca_pin: str
    token_id: str
    secret: str


def parse_token(token: str) -> ParsedToken:
    parts = token.strip().split(".")
    if len(parts) != 4 or parts[0] != TOKEN_PREFIX or not all(parts[1:]):
        raise TokenRefused(f"a join token reads {TOKEN_PREFIX}.<ca-pin>.<id>.<secret>; this one does not "
                           "(check the joinTokenFile holds exactly what `nodemesh token create` printed)")
    return ParsedToken(parts[1], parts[2], parts[3])


def _hash(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def check_node_name(name: str) -> str:
    if not _NODE_NAME.match(name or ""):
        raise ValueError(f"node name {name!r} must be lower-case letters, digits, '-' and '.' "
                         "(as in the agent's node.name)")
    return name


class JoinTokens:
    """The join_tokens table (in the control plane's SQLite file). Time comes
    from `clock` so tests can expire tokens."""

    blocking = False  # create/consume wait on the network (store_etcd.EtcdJoinTokens): call them off the loop

    def __init__(self, db: sqlite3.Connection, clock: Callable[[], float] = time.time,
                 lock: threading.Lock | None = None) -> None:
        self._db = db
        self._clock = clock
        self._lock = lock or threading.Lock()
        with self._lock:
            self._db.executescript(_SCHEMA)

    def create(self, node_name: str, ttl_s: float, ca_pin: str) -> tuple[str, float]:
        """A new token for `node_name`, valid `ttl_s` seconds; returns it and its expiry."""
        check_node_name(node_name)
        if ttl_s <= 0 or ttl_s > MAX_TOKEN_TTL_S:
            raise ValueError(f"ttl must be between 1 s and {MAX_TOKEN_TTL_S // 3600} h, got {ttl_s:.0f} s")
        token_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(24)
        now = self._clock()
        self._insert(token_id, node_name, _hash(secret), now, now + ttl_s)
        return f"{TOKEN_PREFIX}.{ca_pin}.{token_id}.{secret}", now + ttl_s

    # Persistence: these three are all a store-backed subclass replaces (controlplane/store_etcd.py).

    def _insert(self, token_id: str, node_name: str, secret_hash: str, created: float, expires: float) -> None:
        with self._lock:
            self._db.execute("DELETE FROM join_tokens WHERE expires_unix < ?", (created - 86400,))
            self._db.execute("INSERT INTO join_tokens (id, node_name, secret_sha256, created_unix, expires_unix) "
                             "VALUES (?, ?, ?, ?, ?)", (token_id, node_name, secret_hash, created, expires))

    def _row(self, token_id: str) -> tuple[str, str, float, float | None, float] | None:
        """(node name, secret hash, expiry, used at or None, created at) of a token."""
        with self._lock:
            row = self._db.execute("SELECT node_name, secret_sha256, expires_unix, used_unix, created_unix "
                                   "FROM join_tokens WHERE id = ?", (token_id,)).fetchone()
        return None if row is None else (str(row[0]), str(row[1]), float(row[2]),
                                         None if row[3] is None else float(row[3]), float(row[4]))

    def _mark_used(self, token_id: str, now: float) -> float | None:
        """Mark a token used unless it already is (one statement: two joins cannot both win).
        Returns None when this call marked it, else when it had been used (read from the
        record itself, not from a cache that may lag behind another join)."""
        with self._lock:
            cur = self._db.execute("UPDATE join_tokens SET used_unix = ? WHERE id = ? AND used_unix IS NULL",
                                   (now, token_id))
            if cur.rowcount == 1:
                return None
            row = self._db.execute("SELECT used_unix FROM join_tokens WHERE id = ?", (token_id,)).fetchone()
        return float(row[0]) if row is not None and row[0] is not None else now

    def consume(self, token: str, node_name: str, revoked_at: float = 0.0) -> None:
        """Use up `token` for `node_name`, or raise TokenRefused. A token works once:
        the row is marked used in the same statement that checks it is unused.
        `revoked_at`: when the node was last revoked (0: never); a token made
        before then is refused, so whoever holds the revoked node's unused tokens
        cannot join it back (only a token the operator makes afterwards can)."""
        parsed = parse_token(token)
        now = self._clock()
        row = self._row(parsed.token_id)
        if row is None or not hmac.compare_digest(row[1], _hash(parsed.secret)):
            raise TokenRefused("the join token is not known to this control plane; create one with "
                               f"`nodemesh token create --node {node_name}`")
        bound, _, expires, used, created = row
        if bound != node_name:
            raise TokenRefused(f"the join token was made for node {bound!r}, not {node_name!r}; "
                               "check the agent's node.name or create a token for this node")
        if used is not None:
            raise _already_used(used, node_name)
        if expires <= now:
            raise TokenRefused(f"the join token expired at {_iso(expires)}; create a new one with "
                               f"`nodemesh token create --node {node_name}`")
        if revoked_at and created <= revoked_at:
            raise TokenRefused(f"node {node_name} was revoked at {_iso(revoked_at)}, after this token was made "
                               f"({_iso(created)}); a token made before a revocation no longer works: create a "
                               f"new one with `nodemesh token create --node {node_name}`")
        used = self._mark_used(parsed.token_id, now)
        if used is not None:  # another join won (on another replica, or this one's cache lagged)
            raise _already_used(used, node_name)


def _already_used(used: float, node_name: str) -> TokenRefused:
    return TokenRefused(f"the join token was already used at {_iso(used)}; a token works once: create a new "
                        f"one with `nodemesh token create --node {node_name}`")


def _iso(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def node_id(trust_domain: str, node_name: str) -> str:
    return f"spiffe://{trust_domain}/node/{node_name}"


def load_csr(csr_pem: str) -> x509.CertificateSigningRequest:
    """Load a CSR and check its signature. Its names are ignored: the control
    plane decides the certificate's identity (from the token, the caller's
    certificate or the operator request), the CSR only proves the key."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
        if not csr.is_signature_valid:
            raise ValueError("its signature does not verify with its own key")
    except (ValueError, InvalidSignature) as e:
        raise ValueError(f"csr_pem is not a usable certificate signing request ({e})") from None
    return csr


class NodeAttestationServicer(mesh_pb2_grpc.NodeAttestationServicer):
    """nodemesh.v1.NodeAttestation: Join (token) and RenewNodeCertificate (node certificate).
    The auth interceptor lets Join through without credentials and puts the caller
    of RenewNodeCertificate in controlplane.interceptor.current_caller()."""

    def __init__(self, tokens: JoinTokens, cp_ca: ControlPlaneCA, trust_domain: Callable[[], str],
                 trust_bundle: Callable[[], list[str]], node_cert_ttl_s: int = DEFAULT_NODE_CERT_TTL_S,
                 nodes: NodeIdentities | None = None) -> None:
        self._tokens = tokens
        self._cp_ca = cp_ca
        self._trust_domain = trust_domain
        self._trust_bundle = trust_bundle
        self._ttl = min(node_cert_ttl_s, MAX_NODE_CERT_TTL_S)
        self._nodes = nodes

    async def _issue(self, node_name: str, csr: x509.CertificateSigningRequest,
               join_address: str | None = None) -> mesh_pb2.JoinResponse:
        cert = self._cp_ca.sign_client(csr.public_key(), node_id(self._trust_domain(), node_name),
                                       datetime.timedelta(seconds=self._ttl))
        if self._nodes is not None:
            # The serial is what the control plane accepts from now on (an allow list), and the
            # address the node joined from is one it owns (nodemesh/bindings.py).
            leaf = x509.load_pem_x509_certificate(cert.encode())
            await off_loop(bool(getattr(self._nodes._records, "blocking", False)), functools.partial(
                self._nodes.issued, node_name, format(leaf.serial_number, "x"), leaf.not_valid_after_utc.timestamp(),
                join_address=join_address))
        return mesh_pb2.JoinResponse(node_cert_chain=[cert, self._cp_ca.pem],
                                     trust_bundle=self._trust_bundle(), server_ca_bundle=[self._cp_ca.pem])

    async def Join(self, request: mesh_pb2.JoinRequest,
                   context: grpc.aio.ServicerContext) -> mesh_pb2.JoinResponse:
        try:
            check_node_name(request.node_name)
            csr = load_csr(request.csr_pem)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            parsed = parse_token(request.token)
            if parsed.ca_pin != self._cp_ca.pin:
                raise TokenRefused("the join token's CA pin is not this control plane's CA; was it made by "
                                   "another control plane?")
            revoked_at = 0.0
            if self._nodes is not None:
                rec = await off_loop(bool(getattr(self._nodes._records, "blocking", False)),
                                     self._nodes.get, request.node_name)
                revoked_at = rec.last_revoked_unix
            await off_loop(self._tokens.blocking, self._tokens.consume, request.token, request.node_name,
                           revoked_at)
        except TokenRefused as e:
            log.warning("refused a join of node %s from %s: %s", request.node_name, context.peer(), e)
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, f"join refused: {e}")
        log.info("node %s joined from %s", request.node_name, context.peer())
        from controlplane.ca import parse_peer

        peer = parse_peer(context.peer() or "")
        return await self._issue(request.node_name, csr, peer.address if peer.kind in ("ipv4", "ipv6") else "")

    async def RenewNodeCertificate(self, request: mesh_pb2.JoinRequest,
                                   context: grpc.aio.ServicerContext) -> mesh_pb2.JoinResponse:
        from controlplane.interceptor import current_caller

        caller = current_caller()
        if caller is None or caller.kind != "node" or caller.name != request.node_name:
            await context.abort(grpc.StatusCode.PERMISSION_DENIED,
                                f"only node {request.node_name!r}'s own certificate can renew it; the caller "
                                f"is {caller.principal if caller else 'unknown'}")
        try:
            csr = load_csr(request.csr_pem)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return await self._issue(request.node_name, csr)
