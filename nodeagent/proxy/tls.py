"""mTLS for HBONE: ssl contexts built from in-memory PEMs (keys never touch
disk), TLS 1.3 only, ALPN h2; the server picks its SVID by SNI and the client
checks the peer's SPIFFE ID exactly."""

from __future__ import annotations

import os
import ssl
from collections.abc import Mapping
from typing import Any

from nodeagent.supervision.settings import Certs, Svid
from nodemesh.identity import Identity, IdentityError

from .errors import NoCertificate, PeerIdentityMismatch, TlsHandshakeFailed

ALPN = "h2"


def _load_svid(ctx: ssl.SSLContext, svid: Svid) -> None:
    # The key lives in an anonymous memory file: OpenSSL reads it by path through
    # /proc/self/fd, and it vanishes when the fd is closed.
    fd = os.memfd_create("nodemesh-svid", os.MFD_CLOEXEC)
    try:
        data = (svid.cert_chain_pem.strip() + "\n" + svid.key_pem.strip() + "\n").encode()
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        try:
            ctx.load_cert_chain(f"/proc/self/fd/{fd}")
        except ssl.SSLError as e:
            raise NoCertificate(
                f"SVID for {svid.identity}: certificate chain or key is not usable: {e}",
                hint="check the certificate chain (leaf first) and that the key matches it",
            ) from e
    finally:
        os.close(fd)


def _base(purpose: ssl.Purpose, trust_bundle: tuple[str, ...]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.maximum_version = ssl.TLSVersion.TLSv1_3
    ctx.set_alpn_protocols([ALPN])
    ctx.check_hostname = False  # peers are named by SPIFFE URI SAN, checked after the handshake
    ctx.verify_mode = ssl.CERT_REQUIRED
    if trust_bundle:
        try:
            ctx.load_verify_locations(cadata="\n".join(p.strip() for p in trust_bundle) + "\n")
        except ssl.SSLError as e:
            raise NoCertificate(
                f"trust bundle is not valid PEM: {e}", hint="check the mesh trust_bundle roots"
            ) from e
    return ctx


def client_context(certs: Certs, source_identity: str) -> ssl.SSLContext:
    """Context for connections opened on behalf of `source_identity`."""
    svid = certs.svids.get(source_identity)
    if svid is None:
        raise NoCertificate(f"no SVID held for source identity {source_identity}")
    if not certs.trust_bundle:
        raise NoCertificate("no trust bundle: cannot verify peer nodes", hint="has the agent fetched the CA roots?")
    ctx = _base(ssl.Purpose.SERVER_AUTH, certs.trust_bundle)
    _load_svid(ctx, svid)
    return ctx


class ServerTls:
    """The 15008 listener's TLS: one fixed listener context whose SNI callback
    switches each handshake to the context of the identity the client asked for.
    update() swaps the per-identity contexts; existing connections keep theirs."""

    def __init__(self, certs: Certs | None = None) -> None:
        self.context = _base(ssl.Purpose.CLIENT_AUTH, certs.trust_bundle if certs else ())
        self.context.sni_callback = self._on_sni
        self._by_sni: Mapping[str, tuple[str, ssl.SSLContext]] = {}
        self._identity_by_ctx: dict[int, str] = {}
        self.last_refusal = ""
        if certs is not None:
            self.update(certs)

    def update(self, certs: Certs) -> list[str]:
        """Rebuild per-identity contexts; returns per-SVID errors (those SVIDs are skipped,
        the rest keep serving)."""
        errors: list[str] = []
        by_sni: dict[str, tuple[str, ssl.SSLContext]] = {}
        by_ctx: dict[int, str] = {}
        for identity, svid in certs.svids.items():
            try:
                sni = Identity.parse(identity).sni()
                ctx = _base(ssl.Purpose.CLIENT_AUTH, certs.trust_bundle)
                _load_svid(ctx, svid)
            except (IdentityError, NoCertificate) as e:
                errors.append(f"{identity}: {e}")
                continue
            by_sni[sni] = (identity, ctx)
            by_ctx[id(ctx)] = identity
        # Keep the old contexts known, so connections in flight can still be named.
        self._identity_by_ctx = {**self._identity_by_ctx, **by_ctx} if len(self._identity_by_ctx) < 4096 else by_ctx
        self._by_sni = by_sni
        return errors

    def _on_sni(self, sslobj: Any, server_name: str | None, _ctx: ssl.SSLContext) -> int | None:
        if not server_name:
            self.last_refusal = "client sent no SNI (expected <sa>.<ns>.sa.<trust domain>)"
            return int(ssl.AlertDescription.ALERT_DESCRIPTION_UNRECOGNIZED_NAME)
        hit = self._by_sni.get(server_name)
        if hit is None:
            self.last_refusal = f"no certificate held for SNI {server_name!r}"
            return int(ssl.AlertDescription.ALERT_DESCRIPTION_UNRECOGNIZED_NAME)
        sslobj.context = hit[1]
        return None

    def presented_identity(self, ssl_object: Any) -> str:
        """Which identity this node presented on a finished handshake."""
        if ssl_object is None:
            return ""
        return self._identity_by_ctx.get(id(ssl_object.context), "")


def uri_sans(ssl_object: Any) -> list[str]:
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    if not cert:
        return []
    return [v for k, v in cert.get("subjectAltName", ()) if k == "URI"]


def peer_serial(ssl_object: Any) -> str:
    """The peer certificate's serial as OpenSSL prints it (hex), or "" (checked
    against the mesh's revocation list: nodemesh/revocation.py)."""
    cert = ssl_object.getpeercert() if ssl_object is not None else None
    return str(cert.get("serialNumber", "")) if cert else ""


def peer_spiffe_id(ssl_object: Any) -> str:
    """The peer's SPIFFE ID, or "" if it presented none (or several)."""
    uris = [u for u in uri_sans(ssl_object) if u.startswith("spiffe://")]
    return uris[0] if len(uris) == 1 else ""


def check_peer_identity(ssl_object: Any, expected: str) -> str:
    """Raise PeerIdentityMismatch unless the peer's only URI SAN is `expected`."""
    uris = uri_sans(ssl_object)
    if uris != [expected]:
        got = ", ".join(uris) or "no URI SAN"
        raise PeerIdentityMismatch(f"peer presented {got}; expected exactly {expected}")
    return expected


def describe_handshake_error(exc: BaseException, peer: str) -> TlsHandshakeFailed:
    return TlsHandshakeFailed(f"TLS handshake with {peer} failed: {exc}")
