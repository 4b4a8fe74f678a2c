"""Trust that holds when a node is compromised (docs/security.md "Threat model"):
each test plays the attacker, with one node's credentials or none, and must
fail with a clear reason in the logs.

- a node asking for an identity the operator did not bind to it;
- a node registering another node's address (and a service's labels);
- a revoked node: its open streams closed, its renewal refused, its endpoints
  withdrawn from the other nodes within one push, and the workload certificate
  (SVID) it held refused at the other nodes' HBONE port in that same push;
- an operator re-created after revocation: the old certificate stays refused;
- 10,000 anonymous refused calls: every change record stays, `audit verify` passes;
- an edited audit row: `nodemesh audit verify` names it.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import time

import pytest

from nodemesh import revocation
from nodemesh.lab.harness import Lab, LabWorkload
from nodemesh.prom import parse, select
from tests.netns.conftest import BASE_CONFIG, CLIENT_UID, WEB_UID
from tests.netns.test_security_cp import cli, py

pytestmark = pytest.mark.netns

SVC = BASE_CONFIG.split("---\n")[1]
# The operator's bindings: web only on node-2, client only on node-1, each with its own labels.
NARROW = """\
apiVersion: nodemesh.io/v1alpha1
kind: MeshConfig
metadata: {name: mesh}
spec:
  trustDomain: cluster.local
  outboundPolicy: ALLOW_ANY
  identityBindings:
    - {name: web, nodes: [node-2], serviceAccounts: [default/web], workloadLabels: {app: [web]}}
    - {name: client, nodes: [node-1], serviceAccounts: [default/client], workloadLabels: {app: [client]}}
---
""" + SVC

# Calls to the control plane's mutual-TLS port with a node's own certificate.
AS_NODE = r"""
import asyncio, json, sys
import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from nodeagent.identity.attest import node_csr
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc
target, state, node, spec = sys.argv[1], sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
creds = grpc.ssl_channel_credentials(open(f"{state}/cp-ca.pem", "rb").read(), open(f"{state}/node.key", "rb").read(),
                                     open(f"{state}/node.pem", "rb").read())
def csr(uri):
    key = ec.generate_private_key(ec.SECP256R1())
    return (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
            .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
            .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
async def main():
    out = {}
    async with grpc.aio.secure_channel(target, creds) as ch:
        if "cert" in spec:
            try:
                await mesh_pb2_grpc.CertificateServiceStub(ch).CreateCertificate(
                    mesh_pb2.CertificateRequest(node_name=node, csr_pem=csr(spec["cert"])), timeout=5)
                out["cert"] = "issued"
            except grpc.aio.AioRpcError as e:
                out["cert"] = f"{e.code().name}: {e.details()}"
        if "register" in spec:
            r = spec["register"]
            call = mesh_pb2_grpc.RegistryStub(ch).Session()
            try:  # a refused stream can end before our first write completes: the write raises then
                await call.write(mesh_pb2.NodeReport(register=mesh_pb2.NodeRegistration(
                    node_name=node, addresses=r["addresses"], workloads=[mesh_pb2.WorkloadRegistration(
                        name=w["name"], namespace="default", service_account=w["sa"], ip=w["ip"],
                        labels=w.get("labels", {})) for w in r["workloads"]])))
                await call.read()
                out["register"] = "granted"
            except grpc.aio.AioRpcError as e:
                out["register"] = f"{e.code().name}: {e.details()}"
            call.cancel()
        if "renew" in spec:
            key = ec.generate_private_key(ec.SECP256R1())
            try:
                await mesh_pb2_grpc.NodeAttestationStub(ch).RenewNodeCertificate(
                    mesh_pb2.JoinRequest(node_name=node, csr_pem=node_csr(key, node)), timeout=5)
                out["renew"] = "renewed"
            except grpc.aio.AioRpcError as e:
                out["renew"] = f"{e.code().name}: {e.details()}"
    print(json.dumps(out))
asyncio.run(main())
"""

# As node N (its node certificate): a workload SVID for URI with a key of our own, both written out.
STEAL_SVID = r"""
import json, os, sys
import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc
target, state, node, uri, out = sys.argv[1:6]
creds = grpc.ssl_channel_credentials(open(f"{state}/cp-ca.pem", "rb").read(), open(f"{state}/node.key", "rb").read(),
                                     open(f"{state}/node.pem", "rb").read())
key = ec.generate_private_key(ec.SECP256R1())
csr = (x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
       .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), critical=True)
       .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
with grpc.secure_channel(target, creds) as ch:
    resp = mesh_pb2_grpc.CertificateServiceStub(ch).CreateCertificate(
        mesh_pb2.CertificateRequest(node_name=node, csr_pem=csr), timeout=5)
open(out + ".pem", "w").write("".join(resp.cert_chain))
fd = os.open(out + ".key", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
os.write(fd, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption()))
os.close(fd)
leaf = x509.load_pem_x509_certificate(resp.cert_chain[0].encode())
print(json.dumps({"serial": format(leaf.serial_number, "x")}))
"""

# An HBONE client by hand (h2): TLS to HOST:15008 with the given certificate, SNI for EXPECT, one
# CONNECT to AUTHORITY, then an HTTP/1.1 GET through the tunnel.
HBONE_CONNECT = r"""
import json, socket, ssl, sys
import h2.config, h2.connection, h2.events
from nodemesh.identity import Identity
host, cert, key, bundle, expect, authority = sys.argv[1:7]
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT); ctx.check_hostname = False
ctx.load_verify_locations(bundle); ctx.load_cert_chain(cert, key); ctx.set_alpn_protocols(["h2"])
out = {"status": 0, "body": "", "error": ""}
body = b""
try:
    with socket.create_connection((host, 15008), timeout=5) as raw:
        with ctx.wrap_socket(raw, server_hostname=Identity.parse(expect).sni()) as tls:
            conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding="utf-8"))
            conn.initiate_connection()
            conn.send_headers(1, [(":method", "CONNECT"), (":authority", authority)])
            tls.sendall(conn.data_to_send())
            tls.settimeout(5)
            done = False
            while not done:
                data = tls.recv(65536)
                if not data:
                    out["error"] = out["error"] or "connection closed by the peer"
                    break
                for ev in conn.receive_data(data):
                    if isinstance(ev, h2.events.ResponseReceived):
                        out["status"] = int(dict(ev.headers)[":status"])
                        if out["status"] == 200:
                            req = f"GET / HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n"
                            conn.send_data(1, req.encode())
                        else:
                            done = True
                    elif isinstance(ev, h2.events.DataReceived):
                        body += ev.data
                        conn.acknowledge_received_data(ev.flow_controlled_length, ev.stream_id)
                    elif isinstance(ev, h2.events.ConnectionTerminated):
                        out["error"] = f"GOAWAY {ev.error_code}: {ev.additional_data!r}"
                        done = True
                    elif isinstance(ev, (h2.events.StreamEnded, h2.events.StreamReset)):
                        done = True
                tls.sendall(conn.data_to_send())
except (ssl.SSLError, OSError) as e:
    out["error"] = out["error"] or f"{type(e).__name__}: {e}"
out["body"] = body.decode(errors="replace")
print(json.dumps(out))
"""

# N anonymous calls (server-only TLS, no credential) over one connection, as fast as they go.
FLOOD = r"""
import asyncio, json, sys, time
import grpc
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc
target, ca, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
async def main():
    codes = {}
    t0 = time.monotonic()
    async with grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(open(ca, "rb").read())) as ch:
        stub = mesh_pb2_grpc.ConfigServiceStub(ch)
        async def one(i):
            try:
                await stub.Apply(mesh_pb2.ApplyRequest(documents=f"kind: Service\nmetadata: {{name: x{i}}}\n"),
                                 timeout=30)
                codes["OK"] = codes.get("OK", 0) + 1
            except grpc.aio.AioRpcError as e:
                codes[e.code().name] = codes.get(e.code().name, 0) + 1
        for start in range(0, n, 200):
            await asyncio.gather(*(one(i) for i in range(start, min(n, start + 200))))
    print(json.dumps({"codes": codes, "seconds": time.monotonic() - t0}))
asyncio.run(main())
"""


def narrow_mesh(lab: Lab, client_ports: tuple[int, ...] = ()) -> None:
    """`client_ports`: the client on node-1 also serves (the lab app) on these."""
    lab.start_controlplane()
    lab.apply(NARROW)
    lab.add_workload(LabWorkload("web-2", node=2, uid=WEB_UID, ports=(8080,), service_account="web",
                                 labels={"app": "web"}))
    lab.add_workload(LabWorkload("client", node=1, uid=CLIENT_UID, ports=client_ports, service_account="client",
                                 labels={"app": "client"}))
    lab.start_app("web-2")
    if client_ports:
        lab.start_app("client")
    lab.start_agent(1)
    lab.start_agent(2)
    vip = lab.service_vip("web")
    lab.wait_for(lambda: lab.curl(1, f"http://{vip}/", uid=CLIENT_UID, timeout=2).returncode == 0, 20,
                 "node-1 to reach web-2 through the mesh", lambda: lab.log("agent-1"))


def as_node(lab: Lab, k: int, node: str, spec: dict[str, object]) -> dict:  # type: ignore[type-arg]
    return py(lab, lab.node_ns(k), AS_NODE, lab.cp_addr, str(lab.workdir / f"agent-{k}"), node, json.dumps(spec))


def test_a_node_asking_for_an_unbound_identity_is_refused(lab: Lab) -> None:
    narrow_mesh(lab)
    web = "spiffe://cluster.local/ns/default/sa/web"
    # The attack of the review: node-1, with its own valid certificate, asks for web's identity
    # and registers a web workload to get it.
    r = as_node(lab, 1, "node-1", {"register": {"addresses": [lab.node_ip(1)], "workloads": [
        {"name": "fake-web", "sa": "web", "ip": lab.node_ip(1), "labels": {"app": "web"}}]}, "cert": web})
    assert r["register"].startswith("PERMISSION_DENIED"), r
    assert "service account default/web is not bound to node node-1" in r["register"], r
    assert "(client)" in r["register"], r  # which bindings match node-1, none listing default/web
    assert r["cert"].startswith("PERMISSION_DENIED"), r
    assert "not bound to node node-1" in lab.log("controlplane"), lab.log("controlplane")[-3000:]
    # Defence in depth at the CA: the operator unbinds web from node-2; node-2 (registered with
    # it) gets no new certificate for it, and says which binding is missing.
    lab.apply(NARROW.replace("nodes: [node-2], serviceAccounts: [default/web]",
                             "nodes: [node-9], serviceAccounts: [default/web]"))
    time.sleep(0.5)
    r = as_node(lab, 2, "node-2", {"cert": web})
    assert r["cert"].startswith("PERMISSION_DENIED"), r
    assert "no MeshConfig spec.identityBindings entry matches node node-2" in r["cert"], r
    # A real agent whose config lists an unbound workload: refused, and `nodemesh status` says why.
    lab.add_workload(LabWorkload("payments", node=1, uid=3002, service_account="payments",
                                 labels={"app": "payments"}))
    lab.reload_agent(1)
    lab.wait_for(lambda: any("default/payments is not bound to node node-1" in x
                             for x in lab.agent_status(1).get("refusals", [])), 15,
                 "node-1's status to show the refused registration", lambda: lab.log("agent-1"))
    assert "not bound to node node-1" in lab.log("agent-1")
    with lab.config_client() as c:
        ident = {n.name: n for n in c.node_identities()}
    assert ident["node-1"].join_address == lab.node_ip(1)
    assert any("not bound to node node-1" in x for x in ident["node-1"].refusals), ident["node-1"]


def test_a_node_registering_another_nodes_address_or_a_services_labels_is_refused(lab: Lab) -> None:
    narrow_mesh(lab)
    # node-1 claims node-2's address for its client workload: traffic for it would go to node-1.
    r = as_node(lab, 1, "node-1", {"register": {"addresses": [lab.node_ip(1)], "workloads": [
        {"name": "client", "sa": "client", "ip": lab.node_ip(2), "labels": {"app": "client"}}]}})
    assert r["register"].startswith("PERMISSION_DENIED"), r
    assert f"workload default/client ip {lab.node_ip(2)} is not an address node node-1 owns" in r["register"], r
    assert f"{lab.node_ip(1)}/32" in r["register"], r  # what node-1 owns: its join address
    # ... or as its own HBONE address.
    r = as_node(lab, 1, "node-1", {"register": {"addresses": [lab.node_ip(2)], "workloads": []}})
    assert f"addresses[0] {lab.node_ip(2)} is not an address node node-1 owns" in r["register"], r
    # node-1 gives its bound client workload web's labels, so the web service would select it.
    r = as_node(lab, 1, "node-1", {"register": {"addresses": [lab.node_ip(1)], "workloads": [
        {"name": "client", "sa": "client", "ip": lab.node_ip(1), "labels": {"app": "web"}}]}})
    assert "label app=web" in r["register"] and "client does not allow" in r["register"], r
    assert "is not an address node node-1 owns" in lab.log("controlplane")
    # The operator declares more addresses for a node: then they are its own.
    lab.apply(NARROW.replace("nodes: [node-1], serviceAccounts: [default/client]",
                             f"nodes: [node-1], serviceAccounts: [default/client], addresses: [{lab.node_ip(2)}/32]"))
    time.sleep(0.5)
    r = as_node(lab, 1, "node-1", {"register": {"addresses": [lab.node_ip(1)], "workloads": [
        {"name": "client", "sa": "client", "ip": lab.node_ip(2), "labels": {"app": "client"}}]}})
    assert r["register"] == "granted", r


def hbone_as(lab: Lab, k: int, svid: str, to: int, port: int) -> dict:  # type: ignore[type-arg]
    """From node k's namespace: an HBONE CONNECT to node `to`'s client workload on
    `port`, presenting the SVID in files `svid`.pem/.key (thief/)."""
    return py(lab, lab.node_ns(k), HBONE_CONNECT, lab.node_ip(to), svid + ".pem", svid + ".key",
              str(lab.workdir / "cp-state" / "ca-root.pem"), "spiffe://cluster.local/ns/default/sa/client",
              f"{lab.node_ip(to)}:{port}")


def test_a_revoked_node_is_cut_off_at_once(lab: Lab) -> None:
    narrow_mesh(lab, client_ports=(8080,))
    vip = lab.service_vip("web")
    state2 = lab.workdir / "agent-2"
    stolen = {f: (state2 / f).read_bytes() for f in ("node.key", "node.pem", "cp-ca.pem")}
    assert as_node(lab, 2, "node-2", {"renew": True})["renew"] == "renewed"  # the control: renewal works
    # The thief (root on node-2) takes a workload SVID and its key: one the control plane signs for
    # node-2 on request with the node's own key, as the agent's are (the agent keeps its keys in memory;
    # root could read them there). Both are in node-2's issuance epoch 0, which the revocation ends.
    thief = lab.workdir / "thief"
    thief.mkdir(exist_ok=True)
    web = py(lab, lab.node_ns(2), STEAL_SVID, lab.cp_addr, str(state2), "node-2",
             "spiffe://cluster.local/ns/default/sa/web", str(thief / "web"))
    assert web["serial"], web
    held = json.loads(lab.ns_exec(lab.node_ns(2), ["curl", "-sS", "--max-time", "5",
                                                  "http://127.0.0.1:15000/certs"]).stdout)["certificates"]
    for serial in [web["serial"], *(c["serial"] for c in held)]:
        assert revocation.serial_origin(int(serial, 16)) == (revocation.node_tag("node-2"), 0), (serial, held)
    # The control: before the revocation node-1 accepts that SVID at HBONE (a tunnel to its client app).
    before = hbone_as(lab, 2, str(thief / "web"), 1, 8080)
    assert before["status"] == 200 and '"replica": "client"' in before["body"], before
    t0 = time.monotonic()
    code, out, err = cli(lab, "node", "revoke", "node-2", "--server", f"{lab.cp_ip}:15011", "--ca-file",
                         str(lab.workdir / "cp-state" / "cp-ca.pem"), "--token-file",
                         str(lab.workdir / "cp-state" / "admin.token"))
    assert code == 0 and "node node-2 revoked" in out, (out, err)
    # Registry session and xDS stream of the real agent: closed by the control plane, with the reason.
    assert "open stream(s) closed" in out and not out.split(" certificate(s)")[0].endswith(" 0"), out
    lab.wait_for(lambda: "was revoked" in lab.log("agent-2"), 10, "agent-2 to see its streams closed",
                 lambda: lab.log("agent-2"))
    # Its endpoints are gone from node-1 within one push: the VIP has no backend left.
    lab.wait_for(lambda: lab.curl(1, f"http://{vip}/", uid=CLIENT_UID, timeout=1).returncode != 0, 5,
                 "node-1 to drop web-2's endpoint", lambda: lab.log("agent-1"))
    withdrawn_s = time.monotonic() - t0
    # The same push told node-1 to refuse node-2's SVIDs: the stolen one opens nothing now, and
    # node-1 says why in its log and counts it.
    after = hbone_as(lab, 2, str(thief / "web"), 1, 8080)
    assert after["status"] != 200 and "replica" not in after["body"], after
    why = (f"certificate {web['serial']} of spiffe://cluster.local/ns/default/sa/web was issued to node node-2, "
           "revoked at")
    lab.wait_for(lambda: why in lab.log("agent-1"), 5, "node-1 to log the refused SVID", lambda: lab.log("agent-1"))
    line = next(x for x in lab.log("agent-1").splitlines() if why in x)
    assert " by operator/admin" in line, line
    refused = select(parse(lab.ns_exec(lab.node_ns(1), ["curl", "-sS", "--max-time", "5",
                                                        "http://127.0.0.1:15000/metrics"]).stdout),
                     "nodemesh_proxy_connection_errors_total", direction="inbound", reason="revoked_peer_certificate")
    assert refused and sum(v for _, v in refused) >= 1, refused
    # The stolen key renews nothing, and opens nothing.
    for f, data in stolen.items():
        (lab.workdir / "thief" / f).parent.mkdir(exist_ok=True)
        (lab.workdir / "thief" / f).write_bytes(data)
    r = py(lab, lab.node_ns(2), AS_NODE, lab.cp_addr, str(lab.workdir / "thief"), "node-2",
           json.dumps({"renew": True, "register": {"addresses": [lab.node_ip(2)], "workloads": []}}))
    assert r["renew"].startswith("PERMISSION_DENIED") and "node node-2 was revoked" in r["renew"], r
    assert r["register"].startswith("PERMISSION_DENIED") and "was revoked" in r["register"], r
    log = lab.log("controlplane")
    assert "node node-2 was revoked by" in log and "open stream(s) closed" in log, log[-3000:]
    # The audit chain has the revocation.
    with lab.config_client() as c:
        assert any(e.action == "RevokeNode" and "node-2" in e.detail for e in c.audit(20))
        assert c.verify_audit().ok
    print(f"revocation to endpoints withdrawn on node-1: {withdrawn_s:.2f}s")


def test_an_operator_created_again_after_revocation_keeps_its_old_certificate_refused(lab: Lab) -> None:
    lab.start_controlplane()
    state = lab.workdir / "cp-state"
    tls, mtls, ca = f"{lab.cp_ip}:15011", lab.cp_addr, str(state / "cp-ca.pem")
    admin = ("--server", tls, "--ca-file", ca, "--token-file", str(state / "admin.token"))
    old, new = lab.workdir / "alice-old", lab.workdir / "alice-new"
    code, out, err = cli(lab, "operator", "create", "alice", "--role", "rw", "--cert-out", str(old), *admin)
    assert code == 0 and "serial" in out, err

    def as_cert(prefix: object) -> tuple[int, str]:
        code, _, err = cli(lab, "get", "svc", "--server", mtls, "--ca-file", ca, "--cert", f"{prefix}.pem",
                           "--key", f"{prefix}.key")
        return code, err

    assert as_cert(old)[0] == 0
    code, out, err = cli(lab, "operator", "revoke", "alice", *admin)
    assert code == 0, err
    code, out, err = cli(lab, "operator", "create", "alice", "--role", "rw", "--cert-out", str(new), *admin)
    assert code == 0, err
    assert as_cert(new)[0] == 0
    code, err = as_cert(old)
    assert code == 1 and "was revoked" in err, err
    # One credential, by serial: the new certificate alone.
    serial = out.split("(serial ")[1].split(",")[0]
    code, out, err = cli(lab, "operator", "revoke", "--serial", serial, *admin)
    assert code == 0 and "revoked" in out, err
    code, err = as_cert(new)
    assert code == 1 and "was revoked" in err, err
    # Credential lifetimes are capped.
    code, _, err = cli(lab, "operator", "create", "bob", "--role", "ro", "--ttl", "400d", *admin)
    assert code == 1 and "cap of 90 days" in err, err


def test_a_flood_of_anonymous_refusals_leaves_every_change_record(lab: Lab) -> None:
    lab.start_controlplane()
    state = lab.workdir / "cp-state"
    lab.apply(BASE_CONFIG)
    with lab.config_client() as c:
        c.create_join_token("node-1", 60)
        before = [(e.seq, e.hash) for e in c.audit(1000)]
    assert len(before) >= 3  # bootstrap, apply, token
    res = lab.ns_exec(lab.node_ns(1), [sys.executable, "-c", FLOOD, f"{lab.cp_ip}:15011", str(state / "cp-ca.pem"),
                                       "10000"], check=False, timeout=300)
    assert res.returncode == 0, res.stderr
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["codes"] == {"UNAUTHENTICATED": 10000}, r
    with lab.config_client() as c:
        after = [(e.seq, e.hash) for e in c.audit(1000)]
        v = c.verify_audit()
        refused = c.refusals()
    assert after == before  # nothing added, nothing evicted
    assert v.ok and v.records == len(before), v
    counts = {(x.method, x.principal): x.count for x in refused.counts}
    assert counts[("Apply", "anonymous")] == 10000 and len(refused.samples) <= 200
    lines = [ln for ln in lab.log("controlplane").splitlines() if "refused /nodemesh.v1.ConfigService/Apply" in ln]
    assert 1 <= len(lines) <= 1 + r["seconds"] / 10 + 1, len(lines)  # one line per 10 s, with the count
    print(f"10000 anonymous refusals in {r['seconds']:.1f}s, {len(lines)} log line(s)")


def test_an_edited_audit_row_is_caught_by_audit_verify(lab: Lab) -> None:
    lab.start_controlplane()
    lab.apply(BASE_CONFIG)
    with lab.config_client() as c:
        c.create_join_token("node-1", 60)
        c.delete("Service", "web", "default")
    server = ("--server", lab.cp_unix)
    code, out, _ = cli_local(lab, "audit", "verify", *server)
    assert code == 0 and "audit chain intact" in out, out
    # Someone with write access to the database rewrites who deleted the service.
    db = sqlite3.connect(lab.workdir / "cp-state" / "nodemesh.db", isolation_level=None)
    seq, raw = db.execute("SELECT seq, record FROM security_log WHERE tbl='audit' AND record LIKE '%delete Service%'"
                          ).fetchone()
    rec = json.loads(raw)
    rec["principal"] = "operator/nobody"
    db.execute("UPDATE security_log SET record=? WHERE tbl='audit' AND seq=?", (json.dumps(rec), seq))
    db.close()
    code, out, _ = cli_local(lab, "audit", "verify", *server)
    assert code == 3 and f"record {seq} was edited" in out and "AUDIT CHAIN BROKEN" in out, out


def cli_local(lab: Lab, *argv: str) -> tuple[int, str, str]:
    r = lab.ns_exec(lab.hub, [sys.executable, "-m", "nodemesh", *argv], check=False)
    return r.returncode, r.stdout, r.stderr
