"""CertManager: CSR shape, SVID checks, renewal at about half-life and retry, with a fake clock."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nodeagent.identity.certs import (
    CertError,
    CertManager,
    build_csr,
    make_key,
    renewal_delay,
    svid_from_response,
    uri_sans,
)
from nodeagent.supervision.settings import Certs
from nodemesh.v1 import mesh_pb2

ID = "spiffe://cluster.local/ns/default/sa/web"
ID2 = "spiffe://cluster.local/ns/default/sa/client"


class FakeCA:
    """Signs CSRs with a throwaway root, valid from the fake clock's now."""

    def __init__(self, clock: FakeClock, lifetime_s: float = 3600) -> None:
        self.key = ec.generate_private_key(ec.SECP256R1())
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fake root")])
        now = dt.datetime.now(dt.UTC)
        self.root = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
                     .public_key(self.key.public_key()).serial_number(1)
                     .not_valid_before(now - dt.timedelta(days=1)).not_valid_after(now + dt.timedelta(days=9))
                     .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                     .sign(self.key, hashes.SHA256()))
        self.clock = clock
        self.lifetime = lifetime_s
        self.requests: list[mesh_pb2.CertificateRequest] = []
        self.fail_next = 0
        self.san_override: str | None = None
        self.backdate_s = 0.0

    def pem(self, cert: x509.Certificate) -> str:
        return cert.public_bytes(serialization.Encoding.PEM).decode()

    async def __call__(self, req: mesh_pb2.CertificateRequest) -> mesh_pb2.CertificateResponse:
        self.requests.append(req)
        if self.fail_next:
            self.fail_next -= 1
            raise ConnectionError("CA unavailable")
        csr = x509.load_pem_x509_csr(req.csr_pem.encode())
        san = self.san_override or uri_sans(csr)[0]
        start = dt.datetime.fromtimestamp(int(self.clock() - self.backdate_s), dt.UTC)
        leaf = (x509.CertificateBuilder().subject_name(x509.Name([])).issuer_name(self.root.subject)
                .public_key(csr.public_key()).serial_number(x509.random_serial_number())
                .not_valid_before(start)
                .not_valid_after(start + dt.timedelta(seconds=self.lifetime + self.backdate_s))
                .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(san)]), critical=True)
                .sign(self.key, hashes.SHA256()))
        return mesh_pb2.CertificateResponse(cert_chain=[self.pem(leaf)], trust_bundle=[self.pem(self.root)])


class FakeClock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0
        self.sleeps: list[float] = []
        self.wakeups: asyncio.Queue[None] = asyncio.Queue()

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        """Records the wait and advances time only when the test releases it."""
        self.sleeps.append(seconds)
        await self.wakeups.get()
        self.now += seconds


def test_csr_has_exactly_the_spiffe_uri_san() -> None:
    key = make_key()
    csr = x509.load_pem_x509_csr(build_csr(key, ID).encode())
    assert csr.is_signature_valid
    san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(san) == [x509.UniformResourceIdentifier(ID)]
    assert len(csr.subject) == 0
    assert isinstance(csr.public_key(), ec.EllipticCurvePublicKey)
    assert csr.public_key().curve.name == "secp256r1"  # type: ignore[union-attr]


def test_renewal_delay_is_half_life_with_bounded_jitter() -> None:
    assert renewal_delay(1000, 4600, 1000, rand=lambda: 0.5) == pytest.approx(1800)
    assert renewal_delay(1000, 4600, 1000, rand=lambda: 0.0) == pytest.approx(1800 - 180)
    assert renewal_delay(1000, 4600, 1000, rand=lambda: 1.0) == pytest.approx(1800 + 180)
    assert renewal_delay(1000, 4600, 4000, rand=lambda: 0.5) == 0  # already overdue


def test_svid_from_wrong_identity_is_refused() -> None:
    async def main() -> None:
        clock = FakeClock()
        ca = FakeCA(clock)
        ca.san_override = ID2
        key = make_key()
        resp = await ca(mesh_pb2.CertificateRequest(csr_pem=build_csr(key, ID)))
        with pytest.raises(CertError, match="instead of"):
            svid_from_response(ID, key, resp)
        with pytest.raises(CertError, match="does not match the key"):
            ca.san_override = None
            other = await ca(mesh_pb2.CertificateRequest(csr_pem=build_csr(make_key(), ID)))
            svid_from_response(ID, key, other)

    asyncio.run(main())


async def settle() -> None:
    for _ in range(20):
        await asyncio.sleep(0)


def test_issue_renew_and_retry_with_fake_clock() -> None:
    async def main() -> None:
        clock = FakeClock()
        ca = FakeCA(clock, lifetime_s=3600)
        published: list[Certs] = []
        mgr = CertManager("node-1", ca, published.append, clock=clock, sleep=clock.sleep, rand=lambda: 0.5)
        mgr.set_identities([ID])
        await asyncio.wait_for(mgr.wait_ready(), 5)
        assert ca.requests[0].node_name == "node-1"
        assert len(published) == 1 and published[0].version == 1
        first = published[0].svids[ID]
        assert first.not_after_unix == pytest.approx(clock.now + 3600)
        assert "PRIVATE KEY" in first.key_pem and published[0].trust_bundle
        await settle()
        assert clock.sleeps == [pytest.approx(1800)]  # renew at half-life
        # Renewal fails twice: the old certificate stays, retries back off.
        ca.fail_next = 2
        clock.wakeups.put_nowait(None)
        await settle()
        assert len(published) == 1 and mgr.certs.svids[ID] is first
        clock.wakeups.put_nowait(None)
        await settle()
        assert clock.sleeps[1] < clock.sleeps[2] <= 30
        clock.wakeups.put_nowait(None)
        await settle()
        assert len(published) == 2 and published[1].version == 2
        renewed = published[1].svids[ID]
        assert renewed.cert_chain_pem != first.cert_chain_pem and renewed.key_pem != first.key_pem
        assert len(ca.requests) == 4
        await mgr.close()

    asyncio.run(main())


def test_identities_added_and_removed() -> None:
    async def main() -> None:
        clock = FakeClock()
        ca = FakeCA(clock)
        published: list[Certs] = []
        mgr = CertManager("node-1", ca, published.append, clock=clock, sleep=clock.sleep, rand=lambda: 0.5)
        mgr.set_identities([ID, ID2])
        await asyncio.wait_for(mgr.wait_ready(), 5)
        assert set(mgr.certs.svids) == {ID, ID2}
        mgr.set_identities([ID2])
        assert set(mgr.certs.svids) == {ID2} and mgr.ready()
        await mgr.close()

    asyncio.run(main())


def test_keys_are_not_logged(caplog: Any) -> None:
    async def main() -> None:
        clock = FakeClock()
        mgr = CertManager("node-1", FakeCA(clock), lambda c: None, clock=clock, sleep=clock.sleep)
        mgr.set_identities([ID])
        await asyncio.wait_for(mgr.wait_ready(), 5)
        await mgr.close()

    caplog.set_level("DEBUG")
    asyncio.run(main())
    assert "PRIVATE KEY" not in caplog.text


def test_backdated_short_lived_certificate_is_not_renewed_in_a_loop() -> None:
    # The control plane's CA backdates not_before by 5 minutes (clock skew). For a
    # 60 s certificate, half-life counted from not_before is already past; the agent
    # must count from receipt and wait about 30 s, not renew again at once.
    async def main() -> None:
        clock = FakeClock()
        ca = FakeCA(clock, lifetime_s=60)
        ca.backdate_s = 300
        published: list[Certs] = []
        mgr = CertManager("node-1", ca, published.append, clock=clock, sleep=clock.sleep, rand=lambda: 0.5)
        mgr.set_identities([ID])
        await asyncio.wait_for(mgr.wait_ready(), 5)
        await settle()
        assert clock.sleeps == [pytest.approx(30, abs=1)]
        assert len(ca.requests) == 1
        await mgr.close()

    asyncio.run(main())
