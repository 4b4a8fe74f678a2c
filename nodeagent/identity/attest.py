"""Node attestation: the agent's node key and certificate for the control plane.

At the first start the agent makes a node key (stateDir/node.key, 0600, never
sent anywhere), presents the one-time join token (controlPlane.joinTokenFile)
with a CSR for spiffe://<td>/node/<name>, and keeps the node certificate
(stateDir/node.pem). Later starts reuse them, so a restarted agent needs no
new token; the certificate is renewed at half life over the authenticated
channel. The control plane's TLS is verified with controlPlane.caBundleFile,
or else with the CA whose SHA-256 the token carries (fetched once, checked
against the pin, saved as stateDir/cp-ca.pem).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random
import socket
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nodeagent import cpchannel
from nodeagent.config import AgentConfig
from nodemesh.keyfiles import write_private, write_public
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc

log = logging.getLogger(__name__)

NODE_KEY_FILE = "node.key"
NODE_CERT_FILE = "node.pem"
CP_CA_FILE = "cp-ca.pem"
RENEW_FRACTION = 0.5
MIN_REMAINING_S = 60.0  # a certificate closer than this to its end is not used, a join is needed
CALL_TIMEOUT_S = 10.0
# Codes that mean "this token or request will never work": stop, do not retry.
FATAL_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED,
               grpc.StatusCode.INVALID_ARGUMENT)


class AttestError(RuntimeError):
    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


def node_csr(key: ec.EllipticCurvePrivateKey, node_name: str) -> str:
    """Proves the node key; the control plane names the certificate spiffe://<td>/node/<name>."""
    return (x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, node_name)]))
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())


def token_pin(token: str) -> str:
    parts = token.strip().split(".")
    if len(parts) != 4 or parts[0] != "nmjt1":
        raise AttestError("bad_join_token", "the join token does not read nmjt1.<ca-pin>.<id>.<secret>; put "
                                            "exactly what `nodemesh token create` printed in joinTokenFile")
    return parts[1]


def fetch_pinned_ca(host: str, port: int, pin: str, timeout: float = 5.0) -> bytes:
    """The control plane's CA from its TLS handshake, accepted only if its SHA-256
    equals the token's pin (nothing is sent before the check)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # verified by the pin below, not by a bundle we do not have yet
    ctx.set_alpn_protocols(["h2"])
    with socket.create_connection((host, port), timeout=timeout) as raw, ctx.wrap_socket(raw) as tls:
        getter = getattr(tls, "get_unverified_chain", None) or tls._sslobj.get_unverified_chain  # type: ignore[attr-defined]
        chain = getter() or []
    for c in chain:
        der = c if isinstance(c, bytes) else c.public_bytes(2)  # 2 = _ssl.ENCODING_DER
        if hashlib.sha256(der).hexdigest() == pin:
            return x509.load_der_x509_certificate(der).public_bytes(serialization.Encoding.PEM)
    raise AttestError("ca_pin_mismatch", f"the control plane at {host}:{port} presented no CA certificate matching "
                                         "the join token's pin: is controlPlane.address the control plane that "
                                         "made the token? (or set controlPlane.caBundleFile)")


class NodeAttestation:
    """Loads or obtains the node certificate and keeps it fresh."""

    def __init__(self, config: AgentConfig, state_dir: Path, clock: Callable[[], float] = time.time) -> None:
        self.config = config
        self.state_dir = state_dir
        self.target = config.control_plane.grpc_target
        self._clock = clock
        self.not_after = 0.0
        self.renewals = 0

    @property
    def join_target(self) -> str:
        """The control plane's server-only TLS port (no client certificate yet)."""
        if self.config.control_plane.join_address:
            return self.config.control_plane.join_address
        host, _, port = self.config.control_plane.address.rpartition(":")  # the first replica's
        return f"{host}:{int(port) + 1}"

    @property
    def needed(self) -> bool:
        return not self.config.control_plane.is_unix

    # ------------------------------------------------------------ files

    def _server_ca(self) -> bytes | None:
        path = self.config.control_plane.ca_bundle_file
        if path:
            try:
                data = Path(path).read_bytes()
                x509.load_pem_x509_certificates(data)
                return data
            except (OSError, ValueError) as e:
                raise AttestError("bad_ca_bundle", f"cannot use controlPlane.caBundleFile {path}: {e}; copy "
                                                   "cp-ca.pem from the control plane's state dir") from None
        saved = self.state_dir / CP_CA_FILE
        return saved.read_bytes() if saved.exists() else None

    def _key(self) -> ec.EllipticCurvePrivateKey:
        path = self.state_dir / NODE_KEY_FILE
        if path.exists():
            try:
                key = serialization.load_pem_private_key(path.read_bytes(), password=None)
            except (OSError, ValueError) as e:
                raise AttestError("bad_node_key", f"cannot read the node key {path}: {e}; remove it (and "
                                                  f"{NODE_CERT_FILE}) and join again with a new token") from None
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise AttestError("bad_node_key", f"{path} is not an ECDSA key; remove it and join again")
            return key
        self.state_dir.mkdir(parents=True, exist_ok=True)
        key = ec.generate_private_key(ec.SECP256R1())
        write_private(path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                               serialization.NoEncryption()))
        return key

    def _usable_chain(self, key: ec.EllipticCurvePrivateKey) -> bytes | None:
        path = self.state_dir / NODE_CERT_FILE
        if not path.exists():
            return None
        try:
            data = path.read_bytes()
            leaf = x509.load_pem_x509_certificates(data)[0]
        except (OSError, ValueError, IndexError) as e:
            log.warning("attest: ignoring unreadable %s (%s); joining again", path, e)
            return None
        if leaf.public_key() != key.public_key():
            log.warning("attest: %s does not belong to %s; joining again", path, NODE_KEY_FILE)
            return None
        if leaf.not_valid_after_utc.timestamp() - self._clock() < MIN_REMAINING_S:
            log.warning("attest: the node certificate expired at %s; joining again (needs a new join token)",
                        leaf.not_valid_after_utc.isoformat())
            return None
        self.not_after = leaf.not_valid_after_utc.timestamp()
        return data

    def _install(self, key: ec.EllipticCurvePrivateKey, chain: bytes, ca: bytes) -> None:
        cpchannel.configure(cpchannel.NodeCredentials(
            server_ca_pem=ca, cert_chain_pem=chain,
            key_pem=key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())))

    def _save(self, resp: mesh_pb2.JoinResponse) -> bytes:
        chain = "".join(resp.node_cert_chain).encode()
        leaf = x509.load_pem_x509_certificates(chain)[0]
        write_public(self.state_dir / NODE_CERT_FILE, chain)
        self.not_after = leaf.not_valid_after_utc.timestamp()
        if not self.config.control_plane.ca_bundle_file and resp.server_ca_bundle:
            write_public(self.state_dir / CP_CA_FILE, "".join(resp.server_ca_bundle).encode())
        return chain

    # ------------------------------------------------------------ join and renew

    async def ensure(self, stop: asyncio.Event | None = None) -> bool:
        """Make cpchannel usable; False if `stop` was set while waiting for the control plane."""
        if not self.needed:
            return True
        key = self._key()
        ca = self._server_ca()
        chain = self._usable_chain(key)
        if chain is not None and ca is not None:
            log.info("attest: using the node certificate in %s (valid until %s)", self.state_dir / NODE_CERT_FILE,
                     time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.not_after)))
            self._install(key, chain, ca)
            return True
        token_file = self.config.control_plane.join_token_file
        if not token_file:
            raise AttestError("no_join_token", f"no valid node certificate in {self.state_dir} and no "
                                               "controlPlane.joinTokenFile: create a token with `nodemesh token create "
                                               f"--node {self.config.node.name}` and point joinTokenFile at it")
        try:
            token = Path(token_file).read_text().strip()
        except OSError as e:
            raise AttestError("no_join_token", f"cannot read controlPlane.joinTokenFile {token_file}: {e}") from None
        pin = token_pin(token)
        join_target = self.join_target
        attempt = 0
        while stop is None or not stop.is_set():
            try:
                if ca is None:
                    host, _, port = join_target.rpartition(":")
                    ca = await asyncio.to_thread(fetch_pinned_ca, host.strip("[]"), int(port), pin)
                    write_public(self.state_dir / CP_CA_FILE, ca)
                async with cpchannel.open_join_channel(join_target, ca) as channel:
                    resp = await mesh_pb2_grpc.NodeAttestationStub(channel).Join(  # type: ignore[no-untyped-call]
                        mesh_pb2.JoinRequest(token=token, node_name=self.config.node.name,
                                             csr_pem=node_csr(key, self.config.node.name)),
                        timeout=CALL_TIMEOUT_S)
                chain = self._save(resp)
                self._install(key, chain, ca)
                log.info("attest: node %s joined the control plane at %s", self.config.node.name, join_target)
                return True
            except grpc.aio.AioRpcError as e:
                if e.code() in FATAL_CODES:
                    raise AttestError("join_refused", f"the control plane refused the join of node "
                                                      f"{self.config.node.name}: {e.details()}") from None
                reason = f"{e.code().name}: {e.details()}"
            except OSError as e:
                reason = str(e)
            delay = min(5.0, 0.2 * 2 ** min(attempt, 10)) * (0.5 + random.random() / 2)
            attempt += 1
            log.warning("attest: cannot join the control plane at %s (%s): is it reachable (the join port is "
                        "the address's port + 1, or controlPlane.joinAddress)? retrying in %.1fs",
                        join_target, reason, delay)
            await asyncio.sleep(delay)
        return False

    async def renew_once(self) -> None:
        key = self._key()
        async with cpchannel.open_channel(self.target) as channel:
            resp = await mesh_pb2_grpc.NodeAttestationStub(channel).RenewNodeCertificate(  # type: ignore[no-untyped-call]
                mesh_pb2.JoinRequest(node_name=self.config.node.name,
                                     csr_pem=node_csr(key, self.config.node.name)),
                timeout=CALL_TIMEOUT_S)
        chain = self._save(resp)
        creds = cpchannel.credentials()
        if creds is None:  # set when the channel was opened for this very call
            raise RuntimeError("no control-plane credentials after a renewal over them")
        self._install(key, chain, creds.server_ca_pem)
        self.renewals += 1
        log.info("attest: renewed the node certificate (valid until %s)",
                 time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.not_after)))

    async def run(self) -> None:
        """Renew the node certificate at about half its remaining life."""
        if not self.needed:
            return
        attempt = 0
        while True:
            remaining = self.not_after - self._clock()
            await asyncio.sleep(max(1.0, remaining * RENEW_FRACTION) if attempt == 0
                                else min(30.0, 2.0 ** attempt))
            try:
                await self.renew_once()
                attempt = 0
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep the current certificate and retry
                attempt += 1
                log.warning("attest: cannot renew the node certificate (%s); it stays valid until %s; retrying",
                            e, time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.not_after)))
