"""The mesh certificate authority: a self-signed ECDSA root kept in the state
directory, and the CertificateService that signs workload certificates (SVIDs)
for registered workloads."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controlplane.registry import NodeRegistry
from nodemesh.identity import Identity, IdentityError
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc

log = logging.getLogger("nodemesh.controlplane.ca")

ROOT_CERT_FILE = "ca-root.pem"
ROOT_KEY_FILE = "ca-root.key"
ROOT_LIFETIME = datetime.timedelta(days=3650)
DEFAULT_CERT_TTL_S = 24 * 3600
MAX_CERT_TTL_S = 7 * 24 * 3600
MIN_CERT_TTL_S = 60
# Leaves start a little in the past so a peer whose clock lags still accepts them.
BACKDATE = datetime.timedelta(minutes=5)


class CaError(Exception):
    """The CA cannot start; the message says which file to check."""


class CertificateRefused(Exception):
    """A certificate request that is refused. `code` is the gRPC status to return."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        super().__init__(message)


class CertificateAuthority:
    """Holds the root key and signs leaves. Time comes from `clock` (unix seconds)."""

    def __init__(self, root_cert: x509.Certificate, root_key: ec.EllipticCurvePrivateKey,
                 clock: Callable[[], float] = time.time) -> None:
        self.root_cert = root_cert
        self._root_key = root_key
        self._clock = clock
        self.root_pem = root_cert.public_bytes(serialization.Encoding.PEM).decode()

    @classmethod
    def load_or_create(cls, state_dir: str, trust_domain: str = "cluster.local",
                       clock: Callable[[], float] = time.time) -> CertificateAuthority:
        cert_path = os.path.join(state_dir, ROOT_CERT_FILE)
        key_path = os.path.join(state_dir, ROOT_KEY_FILE)
        have_cert, have_key = os.path.exists(cert_path), os.path.exists(key_path)
        if have_cert and have_key:
            try:
                with open(cert_path, "rb") as f:
                    cert = x509.load_pem_x509_certificate(f.read())
                with open(key_path, "rb") as f:
                    key = serialization.load_pem_private_key(f.read(), password=None)
            except (OSError, ValueError) as e:
                raise CaError(f"cannot load the CA root from {cert_path} and {key_path}: {e}") from e
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise CaError(f"{key_path} is not an ECDSA private key")
            if cert.public_key() != key.public_key():
                raise CaError(f"{cert_path} and {key_path} do not belong together; restore both "
                              "from the same backup")
            log.info("loaded CA root %s", cert.subject.rfc4514_string())
            return cls(cert, key, clock)
        if have_cert or have_key:
            raise CaError(f"only one of {cert_path} and {key_path} exists; restore the missing one "
                          "or remove both to create a new root (every node must then fetch new certificates)")
        os.makedirs(state_dir, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        now = datetime.datetime.fromtimestamp(clock(), datetime.UTC)
        name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nodemesh"),
                          x509.NameAttribute(NameOID.COMMON_NAME, f"nodemesh root CA {trust_domain}")])
        cert = (
            x509.CertificateBuilder()
            .subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(now + ROOT_LIFETIME)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=False, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=True, crl_sign=True,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        # Create the key file with 0600 from the start: never world-readable, not even briefly.
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        with open(cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        log.info("created a new CA root in %s", state_dir)
        return cls(cert, key, clock)

    def sign(self, csr: x509.CertificateSigningRequest, identity: Identity, ttl_s: int) -> x509.Certificate:
        now = datetime.datetime.fromtimestamp(self._clock(), datetime.UTC)
        not_after = min(now + datetime.timedelta(seconds=ttl_s), self.root_cert.not_valid_after_utc)
        ski = self.root_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nodemesh")]))
            .issuer_name(self.root_cert.subject)
            .public_key(csr.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(not_after)
            # The subject is empty, so the SAN carries the identity and must be critical (RFC 5280).
            .add_extension(x509.SubjectAlternativeName(
                [x509.UniformResourceIdentifier(identity.uri)]), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=True, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH,
                                                  ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski),
                           critical=False)
            .sign(self._root_key, hashes.SHA256())
        )


# ---------------------------------------------------------------- decisions


@dataclass(frozen=True)
class Peer:
    kind: str  # ipv4 | ipv6 | unix | other
    address: str  # the IP for ipv4/ipv6, the path for unix

    @property
    def is_local(self) -> bool:
        if self.kind == "unix":
            return True
        if self.kind in ("ipv4", "ipv6"):
            try:
                return ipaddress.ip_address(self.address).is_loopback
            except ValueError:
                return False
        return False


def parse_peer(peer: str) -> Peer:
    """Parse grpc's context.peer(): 'ipv4:10.0.0.1:5000', 'ipv6:[::1]:5000', 'unix:/path'."""
    peer = unquote(peer or "")
    scheme, _, rest = peer.partition(":")
    if scheme == "ipv4":
        return Peer("ipv4", rest.rsplit(":", 1)[0])
    if scheme == "ipv6":
        host = rest.rsplit(":", 1)[0] if rest.startswith("[") else rest
        return Peer("ipv6", host.strip("[]"))
    if scheme in ("unix", "unix-abstract"):
        return Peer("unix", rest)
    return Peer("other", peer)


def parse_csr(csr_pem: str) -> tuple[x509.CertificateSigningRequest, str]:
    """Load a CSR, check its signature and return it with its single URI SAN."""
    try:
        csr = x509.load_pem_x509_csr(csr_pem.encode())
    except ValueError as e:
        raise CertificateRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"csr_pem is not a PEM certificate signing request: {e}") from e
    try:
        valid = csr.is_signature_valid
    except (InvalidSignature, ValueError):
        valid = False
    if not valid:
        raise CertificateRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                 "the CSR's signature does not verify with its own public key; "
                                 "check that the agent signs the CSR with the key it sends")
    pub = csr.public_key()
    if not (isinstance(pub, (ec.EllipticCurvePublicKey, ed25519.Ed25519PublicKey))
            or (isinstance(pub, rsa.RSAPublicKey) and pub.key_size >= 2048)):
        raise CertificateRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                 "the CSR's key must be ECDSA, Ed25519 or RSA of at least 2048 bits")
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise CertificateRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                 "the CSR has no subjectAltName; it must carry exactly one URI SAN "
                                 "with the workload's SPIFFE ID") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    others = [n for n in san if not isinstance(n, x509.UniformResourceIdentifier)]
    if len(uris) != 1 or others:
        raise CertificateRefused(grpc.StatusCode.INVALID_ARGUMENT,
                                 f"the CSR must carry exactly one SAN, a URI with the SPIFFE ID; it has "
                                 f"{len(uris)} URI(s) and {len(others)} other name(s)")
    return csr, uris[0]


def authorize(uri: str, node_name: str, peer: Peer, registry: NodeRegistry,
              trust_domain: str) -> Identity:
    """Decide whether `node_name`, calling from `peer`, may get a certificate for `uri`.

    Interim attestation: the caller must come from one of the node's registered
    addresses, or over a unix socket / loopback (the agent on the control
    plane's own host). This trusts the network; node attestation with join
    tokens and node certificates replaces it in a later change.
    """
    try:
        identity = Identity.parse(uri)
    except IdentityError as e:
        raise CertificateRefused(grpc.StatusCode.INVALID_ARGUMENT, f"CSR URI SAN: {e}") from e
    if identity.trust_domain != trust_domain:
        raise CertificateRefused(
            grpc.StatusCode.PERMISSION_DENIED,
            f"{uri} is in trust domain {identity.trust_domain!r} but this mesh's trust domain is "
            f"{trust_domain!r}; check the agent's trust domain against MeshConfig spec.trustDomain")
    node = registry.get(node_name)
    if node is None:
        raise CertificateRefused(
            grpc.StatusCode.PERMISSION_DENIED,
            f"node {node_name!r} is not registered; the agent must open a registry session "
            "(and keep its lease) before asking for certificates")
    if not any(w.namespace == identity.namespace and w.service_account == identity.service_account
               for w in node.workloads):
        raise CertificateRefused(
            grpc.StatusCode.PERMISSION_DENIED,
            f"node {node_name} registers no workload with namespace {identity.namespace!r} and "
            f"service account {identity.service_account!r}; check the node's workload list")
    if not peer.is_local and peer.address not in node.addresses:
        raise CertificateRefused(
            grpc.StatusCode.PERMISSION_DENIED,
            f"the request came from {peer.address or peer.kind}, which is not an address registered "
            f"by node {node_name} ({', '.join(node.addresses)}); check the node's registered addresses")
    return identity


def clamp_ttl(requested: int, default_s: int, max_s: int) -> int:
    if requested <= 0:
        return default_s
    return max(MIN_CERT_TTL_S, min(requested, max_s))


class CertificateServicer(mesh_pb2_grpc.CertificateServiceServicer):
    """nodemesh.v1.CertificateService."""

    def __init__(self, ca: CertificateAuthority, registry: NodeRegistry,
                 trust_domain: Callable[[], str], default_ttl_s: int = DEFAULT_CERT_TTL_S,
                 max_ttl_s: int = MAX_CERT_TTL_S) -> None:
        self._ca = ca
        self._registry = registry
        self._trust_domain = trust_domain
        self._default_ttl_s = min(default_ttl_s, max_ttl_s)
        self._max_ttl_s = max_ttl_s

    def create(self, req: mesh_pb2.CertificateRequest, peer: str) -> mesh_pb2.CertificateResponse:
        csr, uri = parse_csr(req.csr_pem)
        identity = authorize(uri, req.node_name, parse_peer(peer), self._registry, self._trust_domain())
        ttl = clamp_ttl(req.ttl_seconds, self._default_ttl_s, self._max_ttl_s)
        leaf = self._ca.sign(csr, identity, ttl)
        log.info("issued a certificate for %s to node %s (ttl %ds)", identity.uri, req.node_name, ttl)
        return mesh_pb2.CertificateResponse(
            cert_chain=[leaf.public_bytes(serialization.Encoding.PEM).decode(), self._ca.root_pem],
            trust_bundle=[self._ca.root_pem])

    async def CreateCertificate(self, request: mesh_pb2.CertificateRequest,
                                context: grpc.aio.ServicerContext) -> mesh_pb2.CertificateResponse:
        try:
            return self.create(request, context.peer())
        except CertificateRefused as e:
            log.warning("refused a certificate to node %s: %s", request.node_name, e)
            await context.abort(e.code, str(e))
            raise  # not reached: abort raises
