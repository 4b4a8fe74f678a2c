"""A locked-down control plane, node attestation and root rotation, through the
full mesh (docs/security.md "Control plane access"): operator credentials and
roles on the config API, join tokens that work once and expire, node
certificates that decide which node calls, forged/foreign/expired certificates
refused at the control plane and at HBONE, and a root rotation with traffic
flowing throughout."""

from __future__ import annotations

import datetime
import json
import sys
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from nodemesh.lab.harness import Lab
from tests.netns.conftest import BASE_CONFIG, CLIENT_UID
from tests.netns.test_cert_renewal import KEEPALIVE_CLIENT

pytestmark = pytest.mark.netns

SVC = BASE_CONFIG.split("---\n")[1]


def cli(lab: Lab, *argv: str) -> tuple[int, str, str]:
    """`nodemesh ...` from node 1's namespace, where the control plane's TCP ports are reachable."""
    r = lab.ns_exec(lab.node_ns(1), [sys.executable, "-m", "nodemesh", *argv], check=False)
    return r.returncode, r.stdout, r.stderr


def py(lab: Lab, ns: str, code: str, *args: str) -> dict:  # type: ignore[type-arg]
    r = lab.ns_exec(ns, [sys.executable, "-c", code, *args], check=False, timeout=30)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout.strip().splitlines()[-1]))


def make_cert(uri: str, issuer_key: ec.EllipticCurvePrivateKey, issuer_name: x509.Name,
              not_before: datetime.datetime, not_after: datetime.datetime,
              key: ec.EllipticCurvePrivateKey | None = None) -> tuple[bytes, bytes]:
    key = key or ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(x509.Name([]))
            .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
            .sign(issuer_key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM),
            key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                              serialization.NoEncryption()))


def foreign_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Name, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "not the mesh")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(1).not_valid_before(now - datetime.timedelta(hours=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
    return key, name, cert.public_bytes(serialization.Encoding.PEM)


def load_ca(state: Path, cert: str, key: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Name]:
    k = serialization.load_pem_private_key((state / key).read_bytes(), password=None)
    assert isinstance(k, ec.EllipticCurvePrivateKey)
    return k, x509.load_pem_x509_certificate((state / cert).read_bytes()).subject


# One TLS handshake to a node's HBONE port (15008) presenting the given certificate.
HBONE_HANDSHAKE = r"""
import json, socket, ssl, sys
from nodemesh.identity import Identity
host, cert, key, bundle, expect = sys.argv[1:6]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False
ctx.load_verify_locations(bundle); ctx.load_cert_chain(cert, key); ctx.set_alpn_protocols(["h2"])
try:
    with socket.create_connection((host, 15008), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=Identity.parse(expect).sni()) as tls:
            tls.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            tls.settimeout(3)
            data = tls.recv(100)  # TLS 1.3: a refused client certificate shows up at the first read
            print(json.dumps({"ok": bool(data), "error": ""}))
except (ssl.SSLError, OSError) as e:
    print(json.dumps({"ok": False, "error": str(e)}))
"""

# Calls to the control plane's mutual-TLS port with a node's certificate, as that node.
AS_NODE = r"""
import asyncio, json, sys
import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc
target, state, claim, uri = sys.argv[1:5]
creds = grpc.ssl_channel_credentials(open(f"{state}/cp-ca.pem", "rb").read(), open(f"{state}/node.key", "rb").read(),
                                     open(f"{state}/node.pem", "rb").read())
key = ec.generate_private_key(ec.SECP256R1())
csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
       .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
       .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
async def main():
    out = {}
    async with grpc.aio.secure_channel(target, creds) as ch:
        try:
            await mesh_pb2_grpc.CertificateServiceStub(ch).CreateCertificate(
                mesh_pb2.CertificateRequest(node_name=claim, csr_pem=csr), timeout=5)
            out["cert"] = "issued"
        except grpc.aio.AioRpcError as e:
            out["cert"] = f"{e.code().name}: {e.details()}"
        call = mesh_pb2_grpc.RegistryStub(ch).Session()
        try:  # a refused stream can end before our first write completes: the write raises then
            await call.write(mesh_pb2.NodeReport(register=mesh_pb2.NodeRegistration(
                node_name=claim, addresses=["10.9.9.9"], workloads=[mesh_pb2.WorkloadRegistration(
                    name="intruder", namespace="default", service_account="web", ip="10.9.9.9")])))
            await call.read()
            out["register"] = "granted"
        except grpc.aio.AioRpcError as e:
            out["register"] = f"{e.code().name}: {e.details()}"
        call.cancel()
    print(json.dumps(out))
asyncio.run(main())
"""

# A Join with a given token (and a fresh key) on the server-only TLS port.
JOIN = r"""
import asyncio, json, sys
import grpc
from nodeagent.identity.attest import node_csr
from cryptography.hazmat.primitives.asymmetric import ec
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc
target, ca, token, node = sys.argv[1:5]
async def main():
    async with grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(open(ca, "rb").read())) as ch:
        try:
            r = await mesh_pb2_grpc.NodeAttestationStub(ch).Join(mesh_pb2.JoinRequest(
                token=token, node_name=node, csr_pem=node_csr(ec.generate_private_key(ec.SECP256R1()), node)),
                timeout=5)
            print(json.dumps({"result": "joined", "chain": len(r.node_cert_chain)}))
        except grpc.aio.AioRpcError as e:
            print(json.dumps({"result": f"{e.code().name}: {e.details()}"}))
asyncio.run(main())
"""


def test_config_api_needs_operator_credentials_and_roles(lab: Lab) -> None:
    lab.start_controlplane()
    state = lab.workdir / "cp-state"
    assert oct((state / "admin.token").stat().st_mode & 0o777) == "0o600"
    assert oct(Path(lab.cp_unix[len("unix:"):]).stat().st_mode & 0o777) == "0o600"
    ca, tls, mtls = str(state / "cp-ca.pem"), f"{lab.cp_ip}:15011", lab.cp_addr
    # No credential at all.
    code, _, err = cli(lab, "get", "svc", "--server", tls, "--ca-file", ca)
    assert code == 1 and "needs an operator credential" in err and "--token-file" in err, err
    # TCP without the CA to verify the server.
    code, _, err = cli(lab, "get", "svc", "--server", tls)
    assert code == 1 and "--ca-file" in err, err
    # The bootstrap admin token (rw).
    svc = lab.workdir / "svc.yaml"
    svc.write_text(SVC)
    code, out, err = cli(lab, "apply", "-f", str(svc), "--server", tls, "--ca-file", ca,
                         "--token-file", str(state / "admin.token"))
    assert code == 0 and "service/default/web created" in out, err
    # A read-only operator reads but may not write.
    with lab.config_client() as c:
        ro = c.create_operator("viewer", "ro").token
    ro_file = lab.workdir / "viewer.token"
    ro_file.write_text(ro)
    code, out, err = cli(lab, "get", "svc", "--server", tls, "--ca-file", ca, "--token-file", str(ro_file))
    assert code == 0 and "web" in out, err
    code, _, err = cli(lab, "delete", "svc", "web", "--server", tls, "--ca-file", ca, "--token-file", str(ro_file))
    assert code == 1 and "needs the rw role" in err and "viewer has role ro" in err, err
    # An operator certificate on the mutual-TLS port; the key is made by the CLI, 0600.
    prefix = lab.workdir / "alice"
    code, out, err = cli(lab, "operator", "create", "alice", "--role", "rw", "--cert-out", str(prefix),
                         "--server", tls, "--ca-file", ca, "--token-file", str(state / "admin.token"))
    assert code == 0, err
    assert oct(Path(f"{prefix}.key").stat().st_mode & 0o777) == "0o600"
    code, out, err = cli(lab, "get", "svc", "web", "--server", mtls, "--ca-file", ca,
                         "--cert", f"{prefix}.pem", "--key", f"{prefix}.key")
    assert code == 0 and "web" in out, err
    # A forged operator certificate (same SPIFFE ID, foreign CA) never gets past the handshake.
    fkey, fname, _ = foreign_ca()
    now = datetime.datetime.now(datetime.UTC)
    fcert, fk = make_cert("spiffe://cluster.local/operator/alice", fkey, fname, now - datetime.timedelta(hours=1),
                          now + datetime.timedelta(hours=1))
    (lab.workdir / "forged.pem").write_bytes(fcert)
    (lab.workdir / "forged.key").write_bytes(fk)
    code, _, err = cli(lab, "get", "svc", "--server", mtls, "--ca-file", ca, "--cert", str(lab.workdir / "forged.pem"),
                       "--key", str(lab.workdir / "forged.key"))
    assert code == 1, err
    # A revoked operator's certificate stops working.
    with lab.config_client() as c:
        assert c.revoke_operator("alice")
    code, _, err = cli(lab, "get", "svc", "--server", mtls, "--ca-file", ca,
                       "--cert", f"{prefix}.pem", "--key", f"{prefix}.key")
    assert code == 1 and "was revoked" in err, err
    # The audit log has who did what (with which credential); refused calls are counted apart.
    code, out, err = cli(lab, "audit", "-o", "json", "--server", tls, "--ca-file", ca, "--token-file", str(ro_file))
    assert code == 0, err
    entries = json.loads(out)
    seen = {(e["principal"].split(" (")[0] if e["principal"].startswith("operator/") else e["principal"], e["action"],
             e["outcome"].split(":")[0]) for e in entries}
    assert ("operator/admin", "Apply", "ok") in seen
    assert ("operator/admin", "CreateOperator", "ok") in seen
    code, out, err = cli(lab, "audit", "refusals", "-o", "json", "--server", tls, "--ca-file", ca,
                         "--token-file", str(ro_file))
    assert code == 0, err
    counts = {(c["method"], c["principal"]) for c in json.loads(out)["counts"]}
    assert ("Delete", "operator/viewer") in counts, out
    assert ("local (unix socket)", "RevokeOperator", "ok") in seen
    assert any("apply Service/default/web" in e["detail"] for e in entries)


def test_join_token_once_expiry_and_node_identity(mesh: Lab) -> None:
    lab = mesh
    state1 = lab.workdir / "agent-1"
    ca = str(state1 / "cp-ca.pem")
    assert oct((state1 / "node.key").stat().st_mode & 0o777) == "0o600"
    tls = f"{lab.cp_ip}:15011"
    used = (lab.workdir / "agent-1.token").read_text().strip()
    # Used once already by agent 1's join.
    r = py(lab, lab.node_ns(1), JOIN, tls, ca, used, "node-1")
    assert r["result"].startswith("UNAUTHENTICATED") and "already used" in r["result"], r
    with lab.config_client() as c:
        fresh = c.create_join_token("node-3", 60).token
        short = c.create_join_token("node-3", 1).token
    # Bound to its node.
    r = py(lab, lab.node_ns(1), JOIN, tls, ca, fresh, "node-4")
    assert "made for node 'node-3'" in r["result"], r
    time.sleep(1.5)
    r = py(lab, lab.node_ns(1), JOIN, tls, ca, short, "node-3")
    assert "expired" in r["result"], r
    r = py(lab, lab.node_ns(1), JOIN, tls, ca, fresh, "node-3")
    assert r == {"result": "joined", "chain": 2}, r
    r = py(lab, lab.node_ns(1), JOIN, tls, ca, fresh, "node-3")
    assert "already used" in r["result"], r

    web = "spiffe://cluster.local/ns/default/sa/web"  # registered on node 2 only
    # Node 1's certificate claiming to be node 2: refused for certificates and registration.
    r = py(lab, lab.node_ns(1), AS_NODE, lab.cp_addr, str(state1), "node-2", web)
    assert r["cert"].startswith("PERMISSION_DENIED") and "node certificate is for node 'node-1'" in r["cert"], r
    assert r["register"].startswith("PERMISSION_DENIED") and "not 'node-2'" in r["register"], r
    # As itself, node 1 still cannot get web's identity.
    lab.apply("apiVersion: nodemesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {trustDomain: "
              "cluster.local, outboundPolicy: ALLOW_ANY, nodeServiceAccounts: {node-1: [default/client], "
              "node-2: [default/web]}}\n")
    r = py(lab, lab.node_ns(1), AS_NODE, lab.cp_addr, str(state1), "node-1", web)
    assert "registers no workload" in r["cert"] and "service account 'web'" in r["cert"], r
    # ... nor register a workload with a service account the mesh config keeps off node 1.
    assert r["register"].startswith("PERMISSION_DENIED") and "nodeServiceAccounts" in r["register"], r
    # Agent RPCs with no client certificate are refused on the server-only TLS port.
    code, _, err = cli(lab, "get", "svc", "--server", lab.cp_addr, "--ca-file", ca,
                       "--token-file", str(lab.workdir / "cp-state" / "admin.token"))
    assert code == 1, err  # the mutual-TLS port wants a certificate before any token is read


def test_hbone_refuses_foreign_and_expired_certificates(mesh: Lab) -> None:
    lab = mesh
    state = lab.workdir / "cp-state"
    root_key, root_name = load_ca(state, "ca-root.pem", "ca-root.key")
    bundle = str(state / "ca-root.pem")
    now = datetime.datetime.now(datetime.UTC)
    client_id, web_id = "spiffe://cluster.local/ns/default/sa/client", "spiffe://cluster.local/ns/default/sa/web"

    def handshake(cert: bytes, key: bytes) -> dict:  # type: ignore[type-arg]
        (lab.workdir / "c.pem").write_bytes(cert)
        (lab.workdir / "c.key").write_bytes(key)
        return py(lab, lab.hub, HBONE_HANDSHAKE, lab.node_ip(2), str(lab.workdir / "c.pem"),
                  str(lab.workdir / "c.key"), bundle, web_id)

    good = handshake(*make_cert(client_id, root_key, root_name, now - datetime.timedelta(minutes=5),
                                now + datetime.timedelta(hours=1)))
    assert good["ok"], good  # the control: a certificate from the mesh CA is accepted
    fkey, fname, _ = foreign_ca()
    foreign = handshake(*make_cert(client_id, fkey, fname, now - datetime.timedelta(minutes=5),
                                   now + datetime.timedelta(hours=1)))
    assert not foreign["ok"], foreign
    expired = handshake(*make_cert(client_id, root_key, root_name, now - datetime.timedelta(hours=2),
                                   now - datetime.timedelta(hours=1)))
    assert not expired["ok"], expired


def test_root_rotation_with_traffic_flowing(mesh: Lab) -> None:
    lab = mesh
    state = lab.workdir / "cp-state"
    old_key, old_name = load_ca(state, "ca-root.pem", "ca-root.key")
    old_root = (state / "ca-root.pem").read_bytes()
    vip = lab.service_vip("web")
    before = {k: lab.agent_status(k)["certs_version"] for k in (1, 2)}
    client = lab.spawn("keepalive", lab.node_ns(1), [sys.executable, "-c", KEEPALIVE_CLIENT, vip, "12"],
                       uid=CLIENT_UID)
    time.sleep(3)
    with lab.config_client() as c:
        rot = c.rotate_root(6)
    assert rot.old_fingerprint != rot.new_fingerprint
    # Agents re-issue every SVID from the new root (within a few seconds), traffic keeps flowing.
    lab.wait_for(lambda: all(lab.agent_status(k)["certs_version"] > before[k] for k in (1, 2)), 10,
                 "agents to re-issue certificates from the new root")
    assert client.wait(30) == 0, lab.log("keepalive")
    out = json.loads(lab.log("keepalive").strip().splitlines()[-1])
    assert out["fail"] == 0 and out["ok"] > 30, lab.log("keepalive")
    assert len(out["local_ports"]) == 1, "the keep-alive connection was dropped"
    # The overlap (6 s) is over: a new connection works, on certificates from the new root only ...
    r = lab.curl(1, f"http://{vip}/after-rotation", uid=CLIENT_UID)
    assert r.returncode == 0 and json.loads(r.stdout)["replica"] == "web-2", r.stderr
    # ... and the old root is no longer trusted at HBONE.
    (lab.workdir / "old-root.pem").write_bytes(old_root)
    now = datetime.datetime.now(datetime.UTC)
    cert, key = make_cert("spiffe://cluster.local/ns/default/sa/client", old_key, old_name,
                          now - datetime.timedelta(minutes=5), now + datetime.timedelta(hours=1))
    (lab.workdir / "old.pem").write_bytes(cert)
    (lab.workdir / "old.key").write_bytes(key)
    new_bundle = str(state / "ca-root.pem")
    res = py(lab, lab.hub, HBONE_HANDSHAKE, lab.node_ip(2), str(lab.workdir / "old.pem"), str(lab.workdir / "old.key"),
             new_bundle, "spiffe://cluster.local/ns/default/sa/web")
    assert not res["ok"], res
