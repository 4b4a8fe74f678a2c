"""Malformed input against a LIVE control plane and node proxy: mutated YAML
and bad AuthorizationPolicy specs at the config API, random bytes as CSRs,
garbage join tokens, random bytes at the HBONE, inbound and workload ports, and
TLS clients with certificates from no mesh CA. Each gets a clear refusal (the
config and CA errors name the field or what to check) and afterwards both
processes still serve normal requests. Bounded: about 300 inputs, seeded."""

from __future__ import annotations

import json
import random
import re
import sys
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from controlplane.apiclient import ClientError
from nodemesh.lab.harness import Lab
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc
from tests.netns.conftest import CLIENT_UID

pytestmark = pytest.mark.netns

POLICY = """\
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-public, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/*"], ipBlocks: [10.0.0.0/8]}}]
    to: [{operation: {methods: [GET], paths: ["/public*"], ports: [8080]}}]
    when: [{key: "request.headers[x-team]", values: [blue]}]
"""
# (field path named in the error, the bad spec fragment) for structured mistakes.
BAD_SPECS = [
    ("spec.action", "action: MAYBE\n  rules: [{}]"),
    ("spec.rules[0].from[0].source.principals[0]", "rules: [{from: [{source: {principals: [3]}}]}]"),
    ("spec.rules[0].from[0].source.ipBlocks[0]", "rules: [{from: [{source: {ipBlocks: [10.0.0.0/99]}}]}]"),
    ("spec.rules[0].to[0].operation.ports[0]", "rules: [{to: [{operation: {ports: [70000]}}]}]"),
    ("spec.rules[0].to[0].operation.methods", "rules: [{to: [{operation: {methods: GET}}]}]"),
    ("spec.rules[0].when[0].key", "rules: [{when: [{key: request.cookies, values: [x]}]}]"),
    ("spec.selector", "selector: [app, web]\n  rules: [{}]"),
    ("spec.rules", "rules: {a: b}"),
    ("spec.bogus", "bogus: 1"),
]
FIELD_HINT = re.compile(r"yaml|spec|metadata|kind|apiVersion|document", re.IGNORECASE)


def mutate(rng: random.Random, text: str) -> str:
    chars = list(text)
    for _ in range(rng.randint(1, 6)):
        op = rng.randrange(3)
        i = rng.randrange(len(chars) + 1)
        if op == 0 and chars:
            del chars[min(i, len(chars) - 1)]
        elif op == 1:
            chars.insert(i, rng.choice(["{", "}", "[", "]", ":", "-", "'", '"', "\t", "\n", "*", "&", "!", "%",
                                        chr(rng.randrange(0x20, 0x2FF)), "\x07"]))
        elif chars:
            chars[min(i, len(chars) - 1)] = chr(rng.randrange(0x20, 0x7F))
    return "".join(chars)


def node_csr(node: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
           .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
               f"spiffe://cluster.local/node/{node}")]), critical=False)
           .sign(key, hashes.SHA256()))
    return csr.public_bytes(serialization.Encoding.PEM).decode()


# Runs inside node 1: random bytes at node 2's HBONE (15008), inbound (15006) and
# workload (8080, captured into the inbound path) ports, then TLS clients with a
# self-signed certificate at node 2's HBONE port and the control plane's mTLS port.
SOCKET_FUZZ = r"""
import datetime, json, os, random, socket, ssl, sys, tempfile
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
node2, cp, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(7)
sent = 0
for port in (15008, 15006, 8080):
    for i in range(n):
        data = rng.randbytes(rng.randint(1, 600))
        if port == 8080 and i % 3 == 0:  # HTTP-looking garbage, for the L7 guard
            data = b"GET /public HTTP/1.1\r\n" + data
        try:
            with socket.create_connection((node2, port), timeout=1) as s:
                s.settimeout(0.3)
                s.sendall(data)
                s.shutdown(socket.SHUT_WR)
                try:
                    while s.recv(4096):
                        pass
                except (socket.timeout, ConnectionError):
                    pass
            sent += 1
        except OSError:
            sent += 1
now = datetime.datetime.now(datetime.UTC)
key = ec.generate_private_key(ec.SECP256R1())
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "forger")])
cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(
            "spiffe://cluster.local/ns/default/sa/client")]), critical=False)
        .sign(key, hashes.SHA256()))
d = tempfile.mkdtemp()
open(f"{d}/c.pem", "wb").write(cert.public_bytes(serialization.Encoding.PEM))
open(f"{d}/k.pem", "wb").write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
results = {}
for label, host, port in (("hbone", node2, 15008), ("controlplane", cp, 15010)):
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.load_cert_chain(f"{d}/c.pem", f"{d}/k.pem")
    ctx.set_alpn_protocols(["h2"])
    try:
        with socket.create_connection((host, port), timeout=2) as s, ctx.wrap_socket(s) as t:
            t.settimeout(2)
            t.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n")
            got = t.recv(100)
            results[label] = "accepted" if got else "closed"
    except (ssl.SSLError, ConnectionError, socket.timeout) as e:
        results[label] = f"refused: {e}"
print(json.dumps({"sent": sent, "tls": results}))
"""


def test_malformed_input_gets_clear_errors_and_everything_keeps_serving(mesh: Lab) -> None:
    rng = random.Random(20261127)
    vip = mesh.service_vip("web")
    mesh.apply(POLICY.replace('\n    when: [{key: "request.headers[x-team]", values: [blue]}]', ""))
    checked = 0

    with mesh.config_client() as c:
        # 1. Mutated YAML (dry run: a mutation that is still valid must not change the mesh).
        for _ in range(120):
            text = mutate(rng, POLICY)
            try:
                c.apply(text, dry_run=True)
            except ClientError as e:
                assert e.code == grpc.StatusCode.INVALID_ARGUMENT, (text, e)
                assert FIELD_HINT.search(str(e)), (text, str(e))
            checked += 1
        # 2. Structured mistakes in AuthorizationPolicy specs name the field.
        for field, spec in BAD_SPECS:
            text = ("apiVersion: nodemesh.io/v1alpha1\nkind: AuthorizationPolicy\n"
                    f"metadata: {{name: bad, namespace: default}}\nspec:\n  {spec}\n")
            with pytest.raises(ClientError) as ei:
                c.apply(text, dry_run=True)
            assert ei.value.code == grpc.StatusCode.INVALID_ARGUMENT and field in str(ei.value), (field, ei.value)
            checked += 1

    channel = grpc.insecure_channel(mesh.cp_unix)  # local admin: reaches the CA and Join directly
    try:
        certs = mesh_pb2_grpc.CertificateServiceStub(channel)  # type: ignore[no-untyped-call]
        join = mesh_pb2_grpc.NodeAttestationStub(channel)  # type: ignore[no-untyped-call]
        # 3. Random bytes, and random bytes framed as PEM, as a CSR.
        for i in range(40):
            blob = rng.randbytes(rng.randint(0, 400))
            pem = blob.decode("latin-1") if i % 2 else (
                "-----BEGIN CERTIFICATE REQUEST-----\n" + blob.hex() + "\n-----END CERTIFICATE REQUEST-----\n")
            with pytest.raises(grpc.RpcError) as rpc_err:
                certs.CreateCertificate(mesh_pb2.CertificateRequest(node_name="node-1", csr_pem=pem), timeout=5)
            assert rpc_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "csr" in rpc_err.value.details().lower()
            checked += 1
        # 4. Garbage join tokens (with a valid CSR), and garbage node names.
        csr = node_csr("node-9")
        for _ in range(40):
            token = rng.choice(["", "nmjt1.", "nmjt1.a.b.c", "x" * rng.randint(1, 300)]) + rng.randbytes(
                rng.randint(0, 40)).hex()
            with pytest.raises(grpc.RpcError) as rpc_err:
                join.Join(mesh_pb2.JoinRequest(token=token, node_name="node-9", csr_pem=csr), timeout=5)
            assert rpc_err.value.code() == grpc.StatusCode.UNAUTHENTICATED, rpc_err.value.details()
            assert "join token" in rpc_err.value.details(), rpc_err.value.details()
            checked += 1
        for name in ("", "Node_1", "a" * 300, "../etc", "node 1"):
            with pytest.raises(grpc.RpcError) as rpc_err:
                join.Join(mesh_pb2.JoinRequest(token="nmjt1.x.y.z",  # noqa: S106 (a forged token)
                                               node_name=name, csr_pem=csr), timeout=5)
            assert rpc_err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "node name" in rpc_err.value.details()
            checked += 1
    finally:
        channel.close()

    # 5. Random bytes at node 2's ports, and forged TLS clients (from inside node 1).
    r = mesh.ns_exec(mesh.node_ns(1), [sys.executable, "-c", SOCKET_FUZZ, mesh.node_ip(2),
                                        mesh.cp_addr.rsplit(":", 1)[0], "30"], check=False, timeout=90)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["sent"] == 90
    for label, result in out["tls"].items():
        assert result != "accepted", (label, result)
    checked += out["sent"] + 2
    assert checked >= 300

    # Everything still serves: the control plane, node 2's proxy (HBONE and the L7 guard), the agents.
    for name in ("controlplane", "agent-1", "agent-2"):
        assert mesh.procs[name].poll() is None, f"{name} died:\n{mesh.log(name)[-2000:]}"
    r = mesh.curl(1, f"http://{vip}/public/ok", uid=CLIENT_UID, extra=["-f"])
    assert r.returncode == 0 and '"replica": "web-2"' in r.stdout, r.stderr
    assert mesh.curl(1, f"http://{vip}/private", uid=CLIENT_UID, extra=["-o", "/dev/null", "-w", "%{http_code}"]
                     ).stdout == "403"
    with mesh.config_client() as c:
        assert [x.name for x in c.list("AuthorizationPolicy")] == ["web-public"]
    # The guard answered the HTTP-looking garbage itself (400) and refused the opaque bytes at L4.
    # A refused caller's connection lingers (authz_l7.DENIED_LINGER_S) before its line is written.
    def plaintext_lines() -> list[dict[str, Any]]:
        return [e for e in mesh.access_log(2) if e.get("direction") == "inbound" and e.get("via") == "plaintext"]

    mesh.wait_for(lambda: any(e.get("reason") == "bad_request" for e in plaintext_lines()), 10,
                  "node 2's access log line for a request the guard refused (bad_request)")
    lines = plaintext_lines()
    assert any(e.get("authz_layer") == "L4" and e.get("authz") == "deny" for e in lines)
