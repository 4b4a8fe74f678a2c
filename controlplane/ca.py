"""The mesh certificate authority: a self-signed ECDSA root kept in the state
directory, and the CertificateService that signs workload certificates (SVIDs)
for registered workloads."""

from __future__ import annotations

import datetime
import hashlib
import hmac
import ipaddress
import json
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import grpc
from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from controlplane.noderegistry import NodeRegistry
from nodemesh.identity import Identity, IdentityError
from nodemesh.keyfiles import write_private, write_public
from nodemesh.revocation import svid_serial
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc

log = logging.getLogger("nodemesh.controlplane.ca")

ROOT_CERT_FILE = "ca-root.pem"
ROOT_KEY_FILE = "ca-root.key"
# Roots replaced by a rotation, still trusted until their overlap ends:
# [{"pem": ..., "trusted_until_unix": ...}]
PREVIOUS_ROOTS_FILE = "ca-previous-roots.json"
DEFAULT_ROTATION_OVERLAP_S = 2 * 24 * 3600  # two default SVID lifetimes: every old leaf is renewed by then
ROOT_LIFETIME = datetime.timedelta(days=3650)
DEFAULT_CERT_TTL_S = 24 * 3600
MAX_CERT_TTL_S = 7 * 24 * 3600
MIN_CERT_TTL_S = 60
# Leaves start a little in the past so a peer whose clock lags still accepts them.
BACKDATE = datetime.timedelta(minutes=5)
SERVER_CERT_LIFETIME = datetime.timedelta(days=365)


class CaError(Exception):
    """The CA cannot start; the message says which file to check."""


class CertificateRefused(Exception):
    """A certificate request that is refused. `code` is the gRPC status to return."""

    def __init__(self, code: grpc.StatusCode, message: str) -> None:
        self.code = code
        super().__init__(message)


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex()[:16]


@dataclass(frozen=True)
class PreviousRoot:
    pem: str
    trusted_until_unix: float


class CertificateAuthority:
    """Holds the signing key and signs leaves. Time comes from `clock` (unix seconds).

    The signing certificate is the self-signed root (default), or an
    intermediate signed by the operator's own root (from_files). `chain` is
    what follows a leaf in the chain it is served with; `trust_bundle` the roots
    peers must trust: the current one and those replaced by a rotation whose
    overlap has not ended.
    """

    def __init__(self, root_cert: x509.Certificate, root_key: ec.EllipticCurvePrivateKey,
                 clock: Callable[[], float] = time.time, *, chain: tuple[x509.Certificate, ...] = (),
                 trust_anchors: tuple[x509.Certificate, ...] = (), state_dir: str | None = None,
                 previous: tuple[PreviousRoot, ...] = ()) -> None:
        self.root_cert = root_cert  # the signing certificate (a root or an intermediate)
        self._root_key = root_key
        self._clock = clock
        self.root_pem = _pem(root_cert)
        self._chain = tuple(_pem(c) for c in chain)  # intermediates above the signing cert
        self._anchors = tuple(_pem(c) for c in trust_anchors) or (self.root_pem,)
        self._state_dir = state_dir
        self.previous = previous
        self.rotatable = state_dir is not None and not chain and not trust_anchors

    @property
    def chain(self) -> list[str]:
        """PEMs that follow a leaf: the signing certificate and its intermediates."""
        return [self.root_pem, *self._chain]

    @property
    def trust_bundle(self) -> list[str]:
        now = self._clock()
        return [*self._anchors, *(p.pem for p in self.previous if p.trusted_until_unix > now)]

    def next_bundle_change(self) -> float | None:
        """When a previous root leaves the bundle (unix seconds), if any is still in."""
        now = self._clock()
        pending = [p.trusted_until_unix for p in self.previous if p.trusted_until_unix > now]
        return min(pending) if pending else None

    @classmethod
    def from_files(cls, cert_file: str, key_file: str, chain_file: str = "",
                   clock: Callable[[], float] = time.time) -> CertificateAuthority:
        """An intermediate CA the operator made with their own root: `cert_file`
        is the intermediate (a CA certificate), `key_file` its key (read into
        this process only: never copied, written or logged), `chain_file` the
        certificates above it up to and including the operator's root (the
        last one, self-signed, is the trust anchor peers get). Every problem
        raises CaError naming the flag and file to fix."""
        cert = _load_one_cert(cert_file, "--ca-cert")
        key = _load_key(key_file)
        chain: list[x509.Certificate] = []
        if chain_file:
            try:
                with open(chain_file, "rb") as f:
                    chain = x509.load_pem_x509_certificates(f.read())
            except (OSError, ValueError) as e:
                raise CaError(f"--ca-chain {chain_file}: cannot read PEM certificates from it: {e}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise CaError(f"--ca-key {key_file} is not an ECDSA private key (nodemesh signs with ECDSA P-256)")
        if cert.public_key() != key.public_key():
            raise CaError(f"--ca-cert {cert_file} and --ca-key {key_file} do not belong together "
                          "(the certificate's public key is not the key's)")
        _check_ca_cert(cert, f"--ca-cert {cert_file}", clock)
        try:
            cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
        except x509.ExtensionNotFound:
            raise CaError(f"--ca-cert {cert_file} has no subjectKeyIdentifier; add one when signing it") from None
        issuer = cert
        for i, above in enumerate(chain):
            _check_ca_cert(above, f"--ca-chain {chain_file} certificate {i} ({above.subject.rfc4514_string()})",
                           clock)
            try:
                issuer.verify_directly_issued_by(above)
            except (ValueError, TypeError, InvalidSignature) as e:
                below = "--ca-cert" if i == 0 else f"chain certificate {i - 1}"
                raise CaError(f"--ca-chain {chain_file}: certificate {i} ({above.subject.rfc4514_string()}) did "
                              f"not issue {below} ({issuer.subject.rfc4514_string()}): {e}; list the chain from "
                              "the intermediate's issuer up to the root, in that order") from None
            issuer = above
        anchor = chain[-1] if chain else cert
        if not _self_signed(anchor):
            where = f"--ca-chain {chain_file}" if chain else f"--ca-cert {cert_file}"
            raise CaError(f"{where}: the last certificate ({anchor.subject.rfc4514_string()}) is not a "
                          "self-signed root; the chain must end with the operator's root, the trust anchor "
                          "every node is given" + ("" if chain else " (pass --ca-chain)"))
        log.info("using the operator's intermediate CA %s (trust anchor %s, %s)", cert.subject.rfc4514_string(),
                 anchor.subject.rfc4514_string(), fingerprint(anchor))
        return cls(cert, key, clock, chain=tuple(chain[:-1]) if chain else (), trust_anchors=(anchor,))

    @classmethod
    def load_or_create(cls, state_dir: str, trust_domain: str = "cluster.local",
                       clock: Callable[[], float] = time.time, *, cert_file: str = ROOT_CERT_FILE,
                       key_file: str = ROOT_KEY_FILE, purpose: str = "mesh") -> CertificateAuthority:
        """The CA whose certificate and key are `cert_file`/`key_file` in
        `state_dir`, made there at the first start. purpose "mesh": the mesh
        root that signs SVIDs (rotatable); "control-plane": the CA of the control
        plane's own TLS, node and operator certificates (controlplane/cpca.py)."""
        cert_path = os.path.join(state_dir, cert_file)
        key_path = os.path.join(state_dir, key_file)
        have_cert, have_key = os.path.exists(cert_path), os.path.exists(key_path)
        mesh = purpose == "mesh"
        if have_cert and have_key:
            try:
                with open(cert_path, "rb") as f:
                    cert = x509.load_pem_x509_certificate(f.read())
                with open(key_path, "rb") as f:
                    key = serialization.load_pem_private_key(f.read(), password=None)
            except (OSError, ValueError) as e:
                raise CaError(f"cannot load the {purpose} CA from {cert_path} and {key_path}: {e}; restore both "
                              "from a backup") from e
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise CaError(f"{key_path} is not an ECDSA private key")
            if cert.public_key() != key.public_key():
                raise CaError(f"{cert_path} and {key_path} do not belong together; restore both "
                              "from the same backup")
            log.info("loaded the %s CA %s", purpose, cert.subject.rfc4514_string())
            if mesh:
                return cls(cert, key, clock, state_dir=state_dir, previous=_load_previous(state_dir))
            return cls(cert, key, clock)
        if have_cert or have_key:
            raise CaError(f"only one of {cert_path} and {key_path} exists; restore the missing one "
                          "or remove both to create a new CA (every node must then fetch new certificates"
                          f"{'' if mesh else ' and join again with a new token'})")
        os.makedirs(state_dir, exist_ok=True)
        cert, key = _new_root(trust_domain, clock, purpose)
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        # Create the key file with 0600 from the start: never world-readable, not even briefly.
        fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(key_pem)
        with open(cert_path, "wb") as f:
            f.write(cert.public_bytes(serialization.Encoding.PEM))
        log.info("created a new %s CA in %s", purpose, state_dir)
        if mesh:
            return cls(cert, key, clock, state_dir=state_dir)
        return cls(cert, key, clock)

    # ------------------------------------------------------------ the same CA type, both uses

    @property
    def cert(self) -> x509.Certificate:
        return self.root_cert

    @property
    def pem(self) -> str:
        return self.root_pem

    @property
    def pin(self) -> str:
        """SHA-256 of the CA certificate (DER): what a join token carries."""
        return hashlib.sha256(self.root_cert.public_bytes(serialization.Encoding.DER)).hexdigest()

    def derive_key(self, label: bytes) -> bytes:
        """A secret derived from the CA's private key (e.g. the audit chain's
        HMAC key); the key itself never leaves this object."""
        der = self._root_key.private_bytes(serialization.Encoding.DER, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption())
        return hmac.new(hashlib.sha256(der).digest(), label, hashlib.sha256).digest()

    def issue(self, public_key: Any, sans: list[x509.GeneralName], ttl: datetime.timedelta,
              usages: list[x509.ObjectIdentifier], serial: int | None = None) -> x509.Certificate:
        """A leaf for `public_key` with these names and extended key usages
        (`serial`: a random one unless given)."""
        now = datetime.datetime.fromtimestamp(self._clock(), datetime.UTC)
        ski = self.root_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nodemesh")]))
            .issuer_name(self.root_cert.subject)
            .public_key(public_key)
            .serial_number(serial if serial is not None else x509.random_serial_number())
            .not_valid_before(now - BACKDATE).not_valid_after(min(now + ttl, self.root_cert.not_valid_after_utc))
            # The subject is empty, so the SAN carries the identity and must be critical (RFC 5280).
            .add_extension(x509.SubjectAlternativeName(sans), critical=True)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                         key_encipherment=True, data_encipherment=False,
                                         key_agreement=False, key_cert_sign=False, crl_sign=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski), critical=False)
            .sign(self._root_key, hashes.SHA256())
        )

    def sign_client(self, public_key: Any, uri: str, ttl: datetime.timedelta) -> str:
        """A client certificate (node or operator) for the SPIFFE ID `uri` (PEM)."""
        cert = self.issue(public_key, [x509.UniformResourceIdentifier(uri)], ttl, [ExtendedKeyUsageOID.CLIENT_AUTH])
        return _pem(cert)

    def server_credentials(self, sans: list[x509.GeneralName]) -> tuple[grpc.ServerCredentials,
                                                                         grpc.ServerCredentials]:
        """TLS for the TCP listeners, with a fresh server key (in memory only):
        (mutual TLS: a client certificate chaining to this CA is required;
        server-only TLS: for Join and bearer-token operators). gRPC Python can
        either require a client certificate or not ask for one, never ask
        optionally, hence two ports."""
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = self.issue(key.public_key(), sans, SERVER_CERT_LIFETIME, [ExtendedKeyUsageOID.SERVER_AUTH])
        chain = leaf.public_bytes(serialization.Encoding.PEM) + self.pem.encode()
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        return (grpc.ssl_server_credentials([(key_pem, chain)], root_certificates=self.pem.encode(),
                                            require_client_auth=True),
                grpc.ssl_server_credentials([(key_pem, chain)]))

    def rotate(self, trust_domain: str, overlap_s: float = DEFAULT_ROTATION_OVERLAP_S) -> tuple[str, str]:
        """Replace the root: new leaves are signed by a new root at once, and the
        old root stays in the trust bundle for `overlap_s` so that leaves it
        signed keep verifying until agents have renewed them. Returns the old
        and new fingerprints."""
        if not self.rotatable or self._state_dir is None:
            raise CaError("only the control plane's own root can be rotated; with an operator intermediate, "
                          "issue a new intermediate and restart with --ca-cert/--ca-key/--ca-chain")
        if overlap_s < 0:
            raise CaError("the overlap must not be negative")
        old = self.root_cert
        cert, key = _new_root(trust_domain, self._clock)
        now = self._clock()
        previous = tuple(p for p in self.previous if p.trusted_until_unix > now) + (
            PreviousRoot(self.root_pem, now + overlap_s),)
        # Persist the old root's overlap before the new root replaces it, so a crash
        # in between never leaves leaves that nothing trusts.
        write_public(os.path.join(self._state_dir, PREVIOUS_ROOTS_FILE), json.dumps(
            [{"pem": p.pem, "trusted_until_unix": p.trusted_until_unix} for p in previous]).encode())
        write_private(os.path.join(self._state_dir, ROOT_KEY_FILE), key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
        write_public(os.path.join(self._state_dir, ROOT_CERT_FILE), cert.public_bytes(serialization.Encoding.PEM))
        self.root_cert, self._root_key, self.root_pem = cert, key, _pem(cert)
        self._anchors = (self.root_pem,)
        self.previous = previous
        log.info("rotated the CA root %s -> %s; the old root stays trusted for %.0fs", fingerprint(old),
                 fingerprint(cert), overlap_s)
        return fingerprint(old), fingerprint(cert)

    def sign(self, csr: x509.CertificateSigningRequest, identity: Identity, ttl_s: int,
             serial: int | None = None) -> x509.Certificate:
        """A workload SVID (server and client use) for `identity`; `serial` says
        which node and issuance epoch it is for (nodemesh/revocation.py)."""
        return self.issue(csr.public_key(), [x509.UniformResourceIdentifier(identity.uri)],
                          datetime.timedelta(seconds=ttl_s),
                          [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], serial)


def _new_root(trust_domain: str, clock: Callable[[], float],
              purpose: str = "mesh") -> tuple[x509.Certificate, ec.EllipticCurvePrivateKey]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.fromtimestamp(clock(), datetime.UTC)
    cn = f"nodemesh root CA {trust_domain}" if purpose == "mesh" else "nodemesh control plane CA"
    name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nodemesh"),
                      x509.NameAttribute(NameOID.COMMON_NAME, cn),
                      # Two roots of one mesh (a rotation) must not share a subject name.
                      x509.NameAttribute(NameOID.SERIAL_NUMBER, f"{x509.random_serial_number():x}"[:16])])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - BACKDATE).not_valid_after(now + ROOT_LIFETIME)
        # The control plane's CA signs only leaves (path length 0).
        .add_extension(x509.BasicConstraints(ca=True, path_length=None if purpose == "mesh" else 0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False,
                                     key_encipherment=False, data_encipherment=False,
                                     key_agreement=False, key_cert_sign=True, crl_sign=True,
                                     encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return cert, key


def _load_previous(state_dir: str) -> tuple[PreviousRoot, ...]:
    path = os.path.join(state_dir, PREVIOUS_ROOTS_FILE)
    try:
        with open(path) as f:
            raw = json.load(f)
        out = tuple(PreviousRoot(str(r["pem"]), float(r["trusted_until_unix"])) for r in raw)
        for p in out:
            x509.load_pem_x509_certificate(p.pem.encode())
        return out
    except FileNotFoundError:
        return ()
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CaError(f"cannot read the previous roots in {path}: {e}; restore it from a backup, or remove "
                      "it if every node already holds certificates from the current root") from None


def _load_one_cert(path: str, flag: str) -> x509.Certificate:
    try:
        with open(path, "rb") as f:
            certs = x509.load_pem_x509_certificates(f.read())
    except (OSError, ValueError) as e:
        raise CaError(f"{flag} {path}: cannot read a PEM certificate from it: {e}") from None
    if len(certs) != 1:
        raise CaError(f"{flag} {path} holds {len(certs)} certificates; it must hold only the intermediate "
                      "(put the certificates above it in --ca-chain)")
    return certs[0]


def _load_key(path: str) -> object:
    """The operator's CA key, from the file the operator named. Its bytes stay in
    this function; errors name the file, never quote its content."""
    try:
        st = os.stat(path)
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise CaError(f"--ca-key {path}: cannot read it: {e.strerror or e}") from None
    if st.st_mode & 0o007:
        raise CaError(f"--ca-key {path} is readable or writable by every user (mode {st.st_mode & 0o777:o}); "
                      f"run `chmod 600 {path}` (and keep it owned by the control plane's user)")
    if st.st_mode & 0o070:
        log.warning("--ca-key %s is accessible to its group (mode %o); 0600 is recommended", path,
                    st.st_mode & 0o777)
    try:
        return serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError) as e:
        # The parser's message never contains key bytes; keep it (it says e.g. "encrypted").
        raise CaError(f"--ca-key {path} is not an unencrypted PEM private key: {e}") from None


def _check_ca_cert(cert: x509.Certificate, what: str, clock: Callable[[], float]) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise CaError(f"{what} is not a CA certificate (basicConstraints CA:TRUE is needed)")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign:
            raise CaError(f"{what} may not sign certificates (its keyUsage lacks keyCertSign)")
    except x509.ExtensionNotFound:
        pass
    now = datetime.datetime.fromtimestamp(clock(), datetime.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise CaError(f"{what} is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d %H:%M} to "
                      f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC); issue a new one")


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


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
              trust_domain: str, attested_node: str | None = None) -> Identity:
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
    if attested_node is not None and attested_node != node_name:
        # Node attestation (controlplane/auth.py): the node certificate, not the request, says who calls.
        raise CertificateRefused(
            grpc.StatusCode.PERMISSION_DENIED,
            f"the caller's node certificate is for node {attested_node!r}, but the request names node "
            f"{node_name!r}; a node can only get certificates for its own workloads")
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
    # Without a node certificate (the local-admin unix socket), the interim address check stays.
    if attested_node is None and not peer.is_local and peer.address not in node.addresses:
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
                 max_ttl_s: int = MAX_CERT_TTL_S, *, bound: Callable[[str, str, str], str] | None = None,
                 on_refusal: Callable[..., None] | None = None,
                 svid_epoch: Callable[[str], int] | None = None) -> None:
        self._ca = ca
        # node -> its issuance epoch (controlplane/nodeids.py), put in each SVID's serial so that
        # peers can refuse the SVIDs of a revoked node (nodemesh/revocation.py).
        self._svid_epoch = svid_epoch
        # (node, namespace, service account) -> '' or which identity binding is missing
        # (controlplane/auth.py Security.identity_check; nodemesh/bindings.py).
        self._bound = bound
        self._on_refusal = on_refusal
        self._registry = registry
        self._trust_domain = trust_domain
        self._default_ttl_s = min(default_ttl_s, max_ttl_s)
        self._max_ttl_s = max_ttl_s

    def create(self, req: mesh_pb2.CertificateRequest, peer: str) -> mesh_pb2.CertificateResponse:
        csr, uri = parse_csr(req.csr_pem)
        from controlplane.interceptor import attested_node

        identity = authorize(uri, req.node_name, parse_peer(peer), self._registry, self._trust_domain(),
                             attested_node())
        if self._bound is not None:
            why = self._bound(req.node_name, identity.namespace, identity.service_account)
            if why:
                raise CertificateRefused(grpc.StatusCode.PERMISSION_DENIED, f"no certificate for {identity.uri}: {why}")
        ttl = clamp_ttl(req.ttl_seconds, self._default_ttl_s, self._max_ttl_s)
        epoch = self._svid_epoch(req.node_name) if self._svid_epoch is not None else 0
        leaf = self._ca.sign(csr, identity, ttl, svid_serial(req.node_name, epoch))
        log.info("issued a certificate for %s to node %s (ttl %ds, serial %x)", identity.uri, req.node_name, ttl,
                 leaf.serial_number)
        return mesh_pb2.CertificateResponse(
            cert_chain=[leaf.public_bytes(serialization.Encoding.PEM).decode(), *self._ca.chain],
            trust_bundle=self._ca.trust_bundle)

    async def CreateCertificate(self, request: mesh_pb2.CertificateRequest,
                                context: grpc.aio.ServicerContext) -> mesh_pb2.CertificateResponse:
        try:
            return self.create(request, context.peer())
        except CertificateRefused as e:
            if self._on_refusal is not None:  # counted, and logged at a bounded rate
                self._on_refusal(f"node/{request.node_name}", "CertificateService/CreateCertificate", e.code.name,
                                 str(e), context.peer() or "")
            else:
                log.warning("refused a certificate to node %s: %s", request.node_name, e)
            await context.abort(e.code, str(e))
            raise  # not reached: abort raises
