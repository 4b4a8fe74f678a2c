"""The CA: root creation and reload, key file mode, and the decisions on who
gets which certificate."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID

from controlplane.ca import (
    ROOT_KEY_FILE,
    CaError,
    CertificateAuthority,
    CertificateRefused,
    CertificateServicer,
    parse_peer,
)
from controlplane.noderegistry import NodeRegistry
from nodemesh.v1 import mesh_pb2

TD = "cluster.local"
URI = f"spiffe://{TD}/ns/shop/sa/web"


def make_csr(*uris: str, dns: tuple[str, ...] = ()) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    names: list[x509.GeneralName] = [x509.UniformResourceIdentifier(u) for u in uris]
    names += [x509.DNSName(d) for d in dns]
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode()


def registry() -> NodeRegistry:
    r = NodeRegistry(clock=lambda: 1000.0)
    r.register(mesh_pb2.NodeRegistration(
        node_name="node-a", addresses=["10.0.0.1", "192.168.1.1"],
        workloads=[mesh_pb2.WorkloadRegistration(name="web-1", namespace="shop", service_account="web",
                                                 ip="10.1.0.5")]))
    return r


@pytest.fixture()
def service(tmp_path: Path) -> CertificateServicer:
    ca = CertificateAuthority.load_or_create(str(tmp_path), TD)
    return CertificateServicer(ca, registry(), lambda: TD, default_ttl_s=3600, max_ttl_s=7200)


def test_root_created_once_with_0600_key_and_reloaded(tmp_path: Path) -> None:
    ca1 = CertificateAuthority.load_or_create(str(tmp_path), TD)
    mode = stat.S_IMODE(os.stat(tmp_path / ROOT_KEY_FILE).st_mode)
    assert mode == 0o600
    root = ca1.root_cert
    assert root.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(root.public_key(), ec.EllipticCurvePublicKey)
    assert (root.not_valid_after_utc - root.not_valid_before_utc).days >= 3650
    ca2 = CertificateAuthority.load_or_create(str(tmp_path), TD)
    assert ca2.root_pem == ca1.root_pem


def test_half_a_root_is_an_error(tmp_path: Path) -> None:
    CertificateAuthority.load_or_create(str(tmp_path), TD)
    os.unlink(tmp_path / ROOT_KEY_FILE)
    with pytest.raises(CaError) as e:
        CertificateAuthority.load_or_create(str(tmp_path), TD)
    assert "only one of" in str(e.value)


def test_issues_a_leaf_for_a_registered_workload(service: CertificateServicer) -> None:
    resp = service.create(mesh_pb2.CertificateRequest(node_name="node-a", csr_pem=make_csr(URI)),
                          "ipv4:10.0.0.1:40000")
    assert len(resp.cert_chain) == 2 and resp.trust_bundle[0] == resp.cert_chain[1]
    leaf = x509.load_pem_x509_certificate(resp.cert_chain[0].encode())
    root = x509.load_pem_x509_certificate(resp.trust_bundle[0].encode())
    leaf.verify_directly_issued_by(root)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [URI]
    assert not leaf.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    ku = leaf.extensions.get_extension_for_class(x509.KeyUsage).value
    assert ku.digital_signature and ku.key_encipherment and not ku.key_cert_sign
    eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    lifetime = leaf.not_valid_after_utc - leaf.not_valid_before_utc
    assert 3600 <= lifetime.total_seconds() <= 3600 + 600  # default ttl + backdating


def test_ttl_is_capped(service: CertificateServicer) -> None:
    resp = service.create(mesh_pb2.CertificateRequest(node_name="node-a", csr_pem=make_csr(URI),
                                                      ttl_seconds=10**7), "unix:/run/x.sock")
    leaf = x509.load_pem_x509_certificate(resp.cert_chain[0].encode())
    assert (leaf.not_valid_after_utc - leaf.not_valid_before_utc).total_seconds() <= 7200 + 600


@pytest.mark.parametrize("node, csr, peer, code, words", [
    ("node-b", make_csr(URI), "ipv4:10.0.0.1:1", grpc.StatusCode.PERMISSION_DENIED, "not registered"),
    ("node-a", make_csr("spiffe://other.td/ns/shop/sa/web"), "ipv4:10.0.0.1:1",
     grpc.StatusCode.PERMISSION_DENIED, "trust domain 'other.td'"),
    ("node-a", make_csr(f"spiffe://{TD}/ns/shop/sa/admin"), "ipv4:10.0.0.1:1",
     grpc.StatusCode.PERMISSION_DENIED, "no workload with namespace 'shop' and service account 'admin'"),
    ("node-a", make_csr(URI), "ipv4:10.9.9.9:1", grpc.StatusCode.PERMISSION_DENIED,
     "not an address registered by node node-a"),
    ("node-a", make_csr(), "ipv4:10.0.0.1:1", grpc.StatusCode.INVALID_ARGUMENT, "no subjectAltName"),
    ("node-a", make_csr(URI, URI.replace("web", "api")), "ipv4:10.0.0.1:1",
     grpc.StatusCode.INVALID_ARGUMENT, "exactly one SAN"),
    ("node-a", make_csr(URI, dns=("web.example",)), "ipv4:10.0.0.1:1",
     grpc.StatusCode.INVALID_ARGUMENT, "exactly one SAN"),
    ("node-a", make_csr("https://example/x"), "ipv4:10.0.0.1:1", grpc.StatusCode.INVALID_ARGUMENT,
     "must start with spiffe://"),
    ("node-a", "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n",
     "ipv4:10.0.0.1:1", grpc.StatusCode.INVALID_ARGUMENT, "not a PEM certificate signing request"),
])
def test_refusals(service: CertificateServicer, node: str, csr: str, peer: str,
                  code: grpc.StatusCode, words: str) -> None:
    with pytest.raises(CertificateRefused) as e:
        service.create(mesh_pb2.CertificateRequest(node_name=node, csr_pem=csr), peer)
    assert e.value.code == code
    assert words in str(e.value)


def test_tampered_csr_signature_is_refused(service: CertificateServicer) -> None:
    # Sign a CSR for one identity, then graft another key into it: the signature no longer verifies.
    good = x509.load_pem_x509_csr(make_csr(URI).encode())
    der = bytearray(good.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0xFF  # inside the signature
    pem = x509.load_der_x509_csr(bytes(der)).public_bytes(serialization.Encoding.PEM).decode()
    with pytest.raises(CertificateRefused) as e:
        service.create(mesh_pb2.CertificateRequest(node_name="node-a", csr_pem=pem), "ipv4:10.0.0.1:1")
    assert e.value.code == grpc.StatusCode.INVALID_ARGUMENT and "signature" in str(e.value)


def test_loopback_and_unix_peers_are_local() -> None:
    assert parse_peer("ipv4:127.0.0.1:5000").is_local
    assert parse_peer("ipv6:[::1]:5000").is_local
    assert parse_peer("ipv6:%5B::1%5D:5000").is_local
    assert parse_peer("unix:/run/nodemesh/cp.sock").is_local
    assert not parse_peer("ipv4:10.0.0.1:5000").is_local
    assert parse_peer("ipv4:10.0.0.1:5000").address == "10.0.0.1"
