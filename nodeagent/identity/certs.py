"""Workload certificates (SVIDs) for the identities this node serves: keys made
in memory, CSRs signed by the control plane's CA, renewed at about half-life.

Private keys are never written to disk or logged.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from nodeagent import cpchannel
from nodeagent.supervision.settings import Certs, Svid
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc

log = logging.getLogger(__name__)

RENEW_FRACTION = 0.5
RENEW_JITTER = 0.05  # of the lifetime, either way: agents that started together spread out
RETRY_INITIAL_S = 0.5
RETRY_CAP_S = 30.0
ISSUE_TIMEOUT_S = 10.0
ROTATION_JITTER_S = 1.0  # re-issue after a root rotation within 1-2 s

Issuer = Callable[[mesh_pb2.CertificateRequest], Awaitable[mesh_pb2.CertificateResponse]]


class CertError(RuntimeError):
    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


def make_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def build_csr(key: ec.EllipticCurvePrivateKey, identity: str) -> str:
    """A CSR with an empty subject and the SPIFFE ID as its only SAN (a URI)."""
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        # Critical because the subject is empty (RFC 5280 4.2.1.6).
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(identity)]), critical=True)
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def uri_sans(cert: x509.Certificate | x509.CertificateSigningRequest) -> list[str]:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [str(v) for v in ext.value.get_values_for_type(x509.UniformResourceIdentifier)]


def renewal_delay(not_before: float, not_after: float, now: float,
                  rand: Callable[[], float] = random.random) -> float:
    """Seconds from `now` until the certificate should be renewed: at half its
    lifetime, give or take RENEW_JITTER of it."""
    lifetime = max(0.0, not_after - not_before)
    fraction = RENEW_FRACTION + RENEW_JITTER * (2 * rand() - 1)
    return max(0.0, not_before + lifetime * fraction - now)


def retry_delay(attempt: int, rand: Callable[[], float] = random.random) -> float:
    base = min(RETRY_CAP_S, RETRY_INITIAL_S * float(2 ** min(attempt, 20)))
    return base * (0.5 + 0.5 * rand())


def svid_from_response(identity: str, key: ec.EllipticCurvePrivateKey,
                       response: mesh_pb2.CertificateResponse) -> Svid:
    """Check the CA's answer is a certificate for this identity and key."""
    if not response.cert_chain:
        raise CertError("empty_chain", f"the CA returned no certificate for {identity}")
    try:
        leaf = x509.load_pem_x509_certificate(response.cert_chain[0].encode())
    except ValueError as e:
        raise CertError("bad_certificate", f"the CA returned an unreadable certificate for {identity}: {e}") from None
    sans = uri_sans(leaf)
    if sans != [identity]:
        raise CertError("wrong_identity", f"the CA issued a certificate for {sans} instead of {identity}")
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if leaf.public_key().public_bytes(*spki) != key.public_key().public_bytes(*spki):
        raise CertError("wrong_key", f"the CA's certificate for {identity} does not match the key sent")
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption()).decode()
    return Svid(identity=identity, cert_chain_pem="".join(response.cert_chain), key_pem=key_pem,
                not_after_unix=leaf.not_valid_after_utc.timestamp())


def chains_to(chain_pem: str, root_pem: str) -> bool:
    """Whether the chain (leaf first, as the CA sends it) ends at `root_pem`:
    its top certificate is that root or was issued by it (an operator intermediate)."""
    try:
        top = x509.load_pem_x509_certificates(chain_pem.encode())[-1]
        root = x509.load_pem_x509_certificate(root_pem.encode())
    except (ValueError, IndexError):
        return False
    return top == root or top.issuer == root.subject


def _not_before(svid: Svid) -> float:
    leaf = x509.load_pem_x509_certificate(svid.cert_chain_pem.encode())
    return leaf.not_valid_before_utc.timestamp()


def grpc_issuer(target: str) -> Issuer:
    """CreateCertificate over a channel to the control plane (opened lazily)."""
    channel: grpc.aio.Channel | None = None
    generation = -1

    async def issue(request: mesh_pb2.CertificateRequest) -> mesh_pb2.CertificateResponse:
        nonlocal channel, generation
        # A renewed node certificate (nodeagent/identity/attest.py) is used by a new channel.
        if channel is None or generation != cpchannel.generation():
            old, channel, generation = channel, cpchannel.open_channel(target), cpchannel.generation()
            if old is not None:
                await old.close(grace=None)
        stub = mesh_pb2_grpc.CertificateServiceStub(channel)  # type: ignore[no-untyped-call]
        response: mesh_pb2.CertificateResponse = await stub.CreateCertificate(request, timeout=ISSUE_TIMEOUT_S)
        return response

    return issue


@dataclass(frozen=True)
class _Issued:
    svid: Svid
    trust_bundle: tuple[str, ...]


class CertManager:
    """Keeps one SVID per wanted identity fresh and reports every change."""

    def __init__(self, node_name: str, issuer: Issuer, on_change: Callable[[Certs], None], *,
                 ttl_seconds: int = 0, clock: Callable[[], float] = time.time,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
                 rand: Callable[[], float] = random.random) -> None:
        self.node_name = node_name
        self._issue = issuer
        self._on_change = on_change
        self._ttl = ttl_seconds
        self._clock = clock
        self._sleep = sleep
        self._rand = rand
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._issued: dict[str, _Issued] = {}
        self._mesh_bundle: tuple[str, ...] = ()
        self._version = 0
        self.certs = Certs()
        self.renewals = 0
        # identity -> the control plane's last refusal of it (PERMISSION_DENIED), until one is issued
        self.refusals: dict[str, str] = {}
        self._ready = asyncio.Event()

    @property
    def identities(self) -> tuple[str, ...]:
        return tuple(sorted(self._tasks))

    def ready(self) -> bool:
        return all(i in self._issued for i in self._tasks)

    async def wait_ready(self) -> None:
        await self._ready.wait()

    def set_identities(self, identities: Iterable[str], mesh_trust_bundle: Sequence[str] = ()) -> None:
        """Make the wanted set `identities` (e.g. after the trust domain is known
        or changed); new ones get a key and a certificate, gone ones are dropped."""
        wanted = set(identities)
        changed = tuple(mesh_trust_bundle) != self._mesh_bundle
        self._mesh_bundle = tuple(mesh_trust_bundle)
        for ident in list(self._tasks):
            if ident not in wanted:
                self._tasks.pop(ident).cancel()
                changed = self._issued.pop(ident, None) is not None or changed
        for ident in sorted(wanted - set(self._tasks)):
            self._tasks[ident] = asyncio.get_running_loop().create_task(self._keep_fresh(ident),
                                                                        name=f"svid {ident}")
        if changed and self._mesh_bundle:
            self._reissue_stale()
        if changed:
            self._publish()
        self._update_ready()

    def _reissue_stale(self) -> None:
        """Root rotation: the mesh bundle's first root is the one the CA signs with
        now. Every SVID that does not chain to it is re-issued, after a short
        jitter so that every node holds the new bundle before new certificates
        appear (the old root stays trusted for the overlap meanwhile)."""
        current = self._mesh_bundle[0]
        for ident, issued in list(self._issued.items()):
            if ident in self._tasks and not chains_to(issued.svid.cert_chain_pem, current):
                self._tasks.pop(ident).cancel()
                delay = ROTATION_JITTER_S * (1 + self._rand())
                log.info("certs: the mesh root changed; re-issuing %s from the new root in %.1fs", ident, delay)
                self._tasks[ident] = asyncio.get_running_loop().create_task(
                    self._keep_fresh(ident, first_delay=delay), name=f"svid {ident}")

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _update_ready(self) -> None:
        if self.ready():
            self._ready.set()
        else:
            self._ready.clear()

    def _publish(self) -> None:
        self._version += 1
        bundle: dict[str, None] = {}
        for issued in self._issued.values():
            if not self._mesh_bundle:
                bundle.update(dict.fromkeys(issued.trust_bundle))
            else:
                # The mesh bundle (xDS) is authoritative once known, so a root whose
                # overlap ended leaves; the root of a certificate held now stays.
                bundle.update(dict.fromkeys(r for r in issued.trust_bundle
                                            if chains_to(issued.svid.cert_chain_pem, r)))
        bundle.update(dict.fromkeys(self._mesh_bundle))
        self.certs = Certs(svids={i: v.svid for i, v in sorted(self._issued.items())},
                           trust_bundle=tuple(bundle), version=self._version)
        self._on_change(self.certs)

    async def issue_once(self, identity: str) -> _Issued:
        key = make_key()
        request = mesh_pb2.CertificateRequest(node_name=self.node_name, csr_pem=build_csr(key, identity),
                                              ttl_seconds=self._ttl)
        response = await self._issue(request)
        return _Issued(svid_from_response(identity, key, response), tuple(response.trust_bundle))

    async def _keep_fresh(self, identity: str, first_delay: float = 0.0) -> None:
        if first_delay > 0:
            await self._sleep(first_delay)
        attempt = 0
        while True:
            try:
                issued = await self.issue_once(identity)
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - grpc errors, CA answers we refuse: retry, keep the old one
                reason = f"{e.code().name}: {e.details()}" if isinstance(e, grpc.aio.AioRpcError) else str(e)
                delay = retry_delay(attempt, self._rand)
                old = self._issued.get(identity)
                if old is not None:
                    # Never wait past the old certificate's expiry because of backoff.
                    delay = min(delay, max(0.5, old.svid.not_after_unix - self._clock()))
                attempt += 1
                if isinstance(e, grpc.aio.AioRpcError) and e.code() == grpc.StatusCode.PERMISSION_DENIED:
                    # The control plane's reason (e.g. which identity binding is missing), for `nodemesh status`.
                    self.refusals[identity] = str(e.details())
                log.warning("certs: could not get a certificate for %s (%s): is the control plane's "
                            "CertificateService reachable and does it accept node %s? %s; retrying in %.1fs",
                            identity, reason, self.node_name,
                            "keeping the current one" if old else "none yet", delay)
                await self._sleep(delay)
                continue
            attempt = 0
            self.refusals.pop(identity, None)
            if identity not in self._tasks:
                return
            self._issued[identity] = issued
            svid = issued.svid
            self.renewals += 1
            self._publish()
            self._update_ready()
            # The CA backdates not_before (clock skew); the life this agent can use
            # starts when it received the certificate, so count the half-life from then
            # (else a short-lived certificate would be renewed again at once, in a loop).
            now = self._clock()
            delay = renewal_delay(max(_not_before(svid), now), svid.not_after_unix, now, self._rand)
            log.info("certs: certificate for %s valid until %s; renewing in %.0fs", identity,
                     time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(svid.not_after_unix)), delay)
            await self._sleep(delay)
