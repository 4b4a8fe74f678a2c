"""mTLS contexts: handshake over loopback with a throwaway CA."""

from __future__ import annotations

import asyncio
import os
import ssl
from typing import Any

import pytest
import uvloop

from nodeagent.proxy import tls
from nodeagent.proxy.errors import NoCertificate, PeerIdentityMismatch
from nodeagent.proxy.testca import TestCA
from nodeagent.supervision.settings import Certs
from nodemesh.identity import Identity

WEB = "spiffe://cluster.local/ns/default/sa/web"
DB = "spiffe://cluster.local/ns/default/sa/db"
CLIENT = "spiffe://cluster.local/ns/default/sa/client"


class _Keep(asyncio.Protocol):
    def __init__(self) -> None:
        self.transport: Any = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport


async def _handshake(
    server: tls.ServerTls, client_ctx: ssl.SSLContext, sni: str, accept_timeout: float = 5.0
) -> tuple[Any, Any]:
    loop = asyncio.get_running_loop()
    accepted: asyncio.Future[Any] = loop.create_future()

    class Srv(_Keep):
        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            if not accepted.done():
                accepted.set_result(transport)

    srv = await loop.create_server(Srv, "127.0.0.1", 0, ssl=server.context)
    port = srv.sockets[0].getsockname()[1]
    try:
        ct, _ = await loop.create_connection(
            _Keep, "127.0.0.1", port, ssl=client_ctx, server_hostname=sni, ssl_handshake_timeout=5
        )
        st = await asyncio.wait_for(accepted, accept_timeout)
        return ct, st
    finally:
        srv.close()


def run(coro: Any) -> Any:
    return uvloop.run(coro)


def test_mutual_tls_and_identities() -> None:
    ca = TestCA()
    certs = ca.certs(WEB, DB, CLIENT)
    server = tls.ServerTls(certs)

    async def go() -> None:
        ct, st = await _handshake(server, tls.client_context(certs, CLIENT), Identity.parse(DB).sni())
        cobj, sobj = ct.get_extra_info("ssl_object"), st.get_extra_info("ssl_object")
        assert cobj.version() == "TLSv1.3" and cobj.selected_alpn_protocol() == "h2"
        # SNI selected the DB certificate, not WEB's.
        assert tls.check_peer_identity(cobj, DB) == DB
        assert server.presented_identity(sobj) == DB
        assert tls.peer_spiffe_id(sobj) == CLIENT
        with pytest.raises(PeerIdentityMismatch, match="expected exactly .*sa/web"):
            tls.check_peer_identity(cobj, WEB)
        ct.close()
        st.close()

    run(go())


def test_unknown_sni_fails_handshake() -> None:
    ca = TestCA()
    certs = ca.certs(WEB, CLIENT)
    server = tls.ServerTls(Certs(svids={WEB: certs.svids[WEB]}, trust_bundle=certs.trust_bundle))

    async def go() -> None:
        with pytest.raises((ssl.SSLError, ConnectionError)):
            await _handshake(server, tls.client_context(certs, CLIENT), Identity.parse(DB).sni())
        assert "no certificate held" in server.last_refusal

    run(go())


def test_foreign_ca_refused_both_ways() -> None:
    ours, theirs = TestCA(), TestCA("foreign")
    server = tls.ServerTls(ours.certs(WEB))
    foreign_client = theirs.certs(CLIENT)
    # The foreign client trusts our CA (so it would accept our server), but we must refuse its cert.
    mixed = Certs(svids=foreign_client.svids, trust_bundle=(ours.pem,))

    async def go() -> None:
        with pytest.raises((ssl.SSLError, ConnectionError, asyncio.TimeoutError)):
            ct, st = await _handshake(
                server, tls.client_context(mixed, CLIENT), Identity.parse(WEB).sni(), accept_timeout=0.5
            )
            # TLS 1.3: the client may finish before the server rejects; the rejection shows on read.
            await asyncio.sleep(0.2)
            if ct.is_closing() or st is None:
                raise ConnectionError("closed by server")
            raise AssertionError("server accepted a certificate from a foreign CA")
        # And a client that trusts only the foreign CA refuses our server.
        only_foreign = Certs(svids=foreign_client.svids, trust_bundle=(theirs.pem,))
        with pytest.raises(ssl.SSLCertVerificationError):
            await _handshake(server, tls.client_context(only_foreign, CLIENT), Identity.parse(WEB).sni())

    run(go())


def test_certificate_update_applies_to_new_handshakes() -> None:
    ca = TestCA()
    server = tls.ServerTls(ca.certs(WEB))
    both = ca.certs(WEB, DB, CLIENT)
    assert server.update(both) == []

    async def go() -> None:
        ct, st = await _handshake(server, tls.client_context(both, CLIENT), Identity.parse(DB).sni())
        assert tls.check_peer_identity(ct.get_extra_info("ssl_object"), DB)
        ct.close()
        st.close()

    run(go())


def test_missing_svid_and_bad_key_are_clear_errors() -> None:
    ca = TestCA()
    certs = ca.certs(WEB)
    with pytest.raises(NoCertificate, match="no SVID held for source identity .*sa/db"):
        tls.client_context(certs, DB)
    bad = ca.issue(DB)
    other = ca.issue(WEB)
    broken = Certs(svids={DB: type(bad)(DB, bad.cert_chain_pem, other.key_pem, bad.not_after_unix)},
                   trust_bundle=certs.trust_bundle)
    errs = tls.ServerTls().update(broken)
    assert errs and "sa/db" in errs[0] and "key" in errs[0]


def test_keys_do_not_touch_disk(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    ca = TestCA()
    certs = ca.certs(CLIENT)
    before = set(os.listdir("/proc/self/fd"))
    tls.client_context(certs, CLIENT)
    assert set(os.listdir("/proc/self/fd")) <= before | set()  # the memfd was closed
