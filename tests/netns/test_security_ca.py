"""The mesh on an operator's own CA, end to end: the control plane signs
workload certificates with an intermediate loaded from files
(`controlplane serve --ca-cert --ca-key --ca-chain`), every node trusts only
the operator's root, HBONE peers verify each other through the intermediate,
and no private key shows up in any log or in a file with a mode other than 0600."""

from __future__ import annotations

import datetime
import json
import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nodemesh.lab.harness import Lab, LabWorkload
from tests.netns.conftest import BASE_CONFIG, CLIENT_UID, WEB_UID

pytestmark = pytest.mark.netns


def make_operator_ca(d: Path) -> tuple[Path, Path, Path, bytes]:
    """An offline root and an intermediate it signed, as an operator would make them."""
    now = datetime.datetime.now(datetime.UTC)
    root_key = ec.generate_private_key(ec.SECP384R1())
    root_name = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Corp"),
                           x509.NameAttribute(NameOID.COMMON_NAME, "Example Corp offline root")])
    root = (x509.CertificateBuilder().subject_name(root_name).issuer_name(root_name)
            .public_key(root_key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=365))
            .add_extension(x509.BasicConstraints(ca=True, path_length=1), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=False, content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                         crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(root_key.public_key()), critical=False)
            .sign(root_key, hashes.SHA384()))
    key = ec.generate_private_key(ec.SECP256R1())
    inter = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Example Corp"),
                                      x509.NameAttribute(NameOID.COMMON_NAME, "mesh intermediate")]))
             .issuer_name(root_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(now + datetime.timedelta(days=30))
             .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
             .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=False, key_encipherment=False,
                                          data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                          crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
             .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
             .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(root_key.public_key()), critical=False)
             .sign(root_key, hashes.SHA384()))
    d.mkdir(mode=0o700)
    cert_f, key_f, chain_f = d / "mesh-ca.pem", d / "mesh-ca.key", d / "chain.pem"
    cert_f.write_bytes(inter.public_bytes(serialization.Encoding.PEM))
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    fd = os.open(key_f, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key_pem)
    chain_f.write_bytes(root.public_bytes(serialization.Encoding.PEM))
    return cert_f, key_f, chain_f, key_pem


# Runs inside node 1: a TLS 1.3 client that trusts only the given root connects to
# node 2's HBONE port and reports whether node 2's certificate chain verified and
# which SPIFFE ID it carries. (It has no client certificate: the handshake still
# completes on the client side before node 2 refuses it.)
PROBE = r"""
import json, socket, ssl, sys
host, ca = sys.argv[1], sys.argv[2]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
ctx.check_hostname = False
ctx.load_verify_locations(ca)
ctx.set_alpn_protocols(["h2"])
out = {}
try:
    with socket.create_connection((host, 15008), timeout=5) as s, \
            ctx.wrap_socket(s, server_hostname="web.default.sa.cluster.local") as t:
        cert = t.getpeercert()
        out = {"verified": True, "san": [v for k, v in cert.get("subjectAltName", ()) if k == "URI"],
               "issuer": dict(x[0] for x in cert["issuer"])}
except ssl.SSLError as e:
    out = {"verified": False, "error": str(e)}
print(json.dumps(out))
"""


def probe(lab: Lab, ca_file: Path) -> dict[str, object]:
    import sys

    r = lab.ns_exec(lab.node_ns(1), [sys.executable, "-c", PROBE, lab.node_ip(2), str(ca_file)], check=False)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def key_files(root: Path) -> list[Path]:
    out = []
    for p in root.rglob("*"):
        if p.is_file() and b"PRIVATE KEY" in p.read_bytes():
            out.append(p)
    return sorted(out)


def test_mesh_on_an_operator_intermediate_ca(lab: Lab) -> None:
    cert_f, key_f, chain_f, inter_key_pem = make_operator_ca(lab.workdir / "operator-ca")
    lab.start_controlplane(["--ca-cert", str(cert_f), "--ca-key", str(key_f), "--ca-chain", str(chain_f)])
    lab.apply(BASE_CONFIG)
    lab.add_workload(LabWorkload("web-2", node=2, uid=WEB_UID, ports=(8080,), service_account="web",
                                 labels={"app": "web"}))
    lab.add_workload(LabWorkload("client", node=1, uid=CLIENT_UID, service_account="client"))
    lab.start_app("web-2")
    lab.start_agent(1)
    lab.start_agent(2)

    # Traffic crosses nodes over HBONE: node 1 verified node 2's chain against the bundle it got.
    vip = lab.service_vip("web")
    r = lab.curl(1, f"http://{vip}/", uid=CLIENT_UID, extra=["-f"])
    assert r.returncode == 0 and '"replica": "web-2"' in r.stdout, r.stderr
    assert any(e.get("via") == "hbone" and e.get("direction") == "inbound" for e in lab.access_log(2))

    # The workload certificate chains to the operator's root, through the intermediate...
    seen = probe(lab, chain_f)
    assert seen["verified"], seen
    assert seen["san"] == ["spiffe://cluster.local/ns/default/sa/web"]
    assert seen["issuer"]["commonName"] == "mesh intermediate"  # type: ignore[index]
    # ...and not to the control plane's own CA (which only signs node and operator certificates).
    assert not probe(lab, lab.workdir / "cp-state" / "cp-ca.pem")["verified"]
    # No self-signed mesh root was made: the operator's CA is the only workload CA.
    assert not (lab.workdir / "cp-state" / "ca-root.key").exists()

    # Key hygiene: no private key in any log; every key file under the state dirs is 0600
    # and is one we expect; the operator's key was never copied anywhere.
    logs = "".join(lab.log(n) for n in ("controlplane", "agent-1", "agent-2", "app-web-2"))
    logs += "".join(p.read_text(errors="replace") for p in lab.workdir.glob("access-*.log"))
    assert "PRIVATE KEY" not in logs
    body = b"".join(inter_key_pem.splitlines()[1:-1]).decode()
    secret = body[48:88]  # past the PKCS#8 header every P-256 key shares: the private scalar
    assert secret not in logs
    state_dirs = [lab.workdir / "cp-state", lab.workdir / "agent-1", lab.workdir / "agent-2"]
    found = [p for d in state_dirs for p in key_files(d)]
    assert {str(p.relative_to(lab.workdir)) for p in found} == {
        "cp-state/cp-ca.key", "agent-1/node.key", "agent-2/node.key"}, found
    for p in found:
        assert stat.S_IMODE(p.stat().st_mode) == 0o600, p
        assert secret not in p.read_text()
    # The status file the CLI reads lists certificates, never keys.
    assert "PRIVATE KEY" not in (lab.workdir / "agent-1" / "status.json").read_text()
