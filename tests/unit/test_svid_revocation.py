"""A revoked node's workload certificates (SVIDs): the serial layout, the
revocation list, what the control plane records and pushes, what an agent
accepts from xDS, and both HBONE ends refusing such a peer on loopback (the
netns attack test, tests/netns/test_security_trust.py, plays it live)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
import uuid
from pathlib import Path

import pytest
from cryptography import x509

from controlplane.auth import Security
from controlplane.ca import CertificateAuthority, CertificateRefused, CertificateServicer
from controlplane.nodeids import NodeIdentities, SvidRevocations
from controlplane.records import Records
from controlplane.xds.build import build_snapshot
from nodeagent.observe import meshmetrics
from nodeagent.proxy.proxy import NodeProxy
from nodeagent.supervision.settings import Certs
from nodeagent.xds.convert import ResourceError, convert_mesh_config
from nodemesh import model, revocation, xdsnames
from nodemesh.revocation import MAX_REVOKED_NODES, RevocationError, RevocationList, RevokedNode
from nodemesh.v1 import mesh_pb2
from tests.unit.test_cp_ca import URI, make_csr, registry
from tests.unit.test_proxy_loopback import CLIENT, ECHO, ECHO_VIP, Cluster, run, wait_for_log
from tests.unit.test_store_contract import _store, etcd_certs, etcd_endpoint  # noqa: F401 - fixtures
from tests.unit.test_trust import mesh

NOW = 1_800_000_000.0


def entry(node: str = "node-2", epoch: int = 1, by: str = "operator/admin", at: float = NOW,
          until: float = NOW + 3600) -> RevokedNode:
    return RevokedNode(node, epoch, at, by, until)


# ---------------------------------------------------------------- the serial layout


def test_an_svid_serial_names_its_node_and_epoch_and_stays_random() -> None:
    a, b = revocation.svid_serial("node-2", 7), revocation.svid_serial("node-2", 7)
    assert a != b and 0 < a < 1 << 159  # RFC 5280: positive, at most 20 octets
    assert revocation.serial_origin(a) == (revocation.node_tag("node-2"), 7)
    assert revocation.node_tag("node-2") != revocation.node_tag("node-3")
    # A serial in any other layout (another CA, an SVID from before this layout) names no node.
    assert revocation.serial_origin(x509.random_serial_number() >> 8) is None
    assert revocation.serial_origin(1) is None
    with pytest.raises(RevocationError, match="epoch"):
        revocation.svid_serial("node-2", revocation.MAX_EPOCH + 1)


def test_the_list_refuses_the_epochs_before_the_revocation_and_says_whose_and_when() -> None:
    revoked = RevocationList.of([entry()])
    old = revocation.svid_serial("node-2", 0)
    text = format(old, "X")  # OpenSSL prints upper-case hex
    why = revoked.refusal(text, ECHO, now=NOW + 1)
    assert why == (f"certificate {format(old, 'x')} of {ECHO} was issued to node node-2, revoked at "
                   f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(NOW))} by operator/admin")
    assert revoked.refusal("0" + text, ECHO, now=NOW + 1) == why  # a leading zero changes nothing
    # Issued after the revocation (the node joined again with a new token): accepted.
    assert revoked.refusal(format(revocation.svid_serial("node-2", 1), "X"), ECHO, now=NOW + 1) == ""
    # Another node's, a random serial, garbage: accepted here (the TLS checks decide them).
    assert revoked.refusal(format(revocation.svid_serial("node-3", 0), "X"), ECHO, now=NOW + 1) == ""
    assert revoked.refusal(format(x509.random_serial_number(), "X"), ECHO, now=NOW + 1) == ""
    assert revoked.refusal("not hex", ECHO, now=NOW + 1) == "" and revoked.refusal("", "", now=NOW) == ""
    # Once every certificate it covers has expired, the entry refuses nothing more.
    assert revoked.refusal(text, ECHO, now=NOW + 3600) == ""


def test_the_list_is_checked_and_bounded() -> None:
    # One entry per node, the latest epoch wins.
    lst = RevocationList.of([entry(epoch=1), entry(epoch=3), entry("node-1")])
    assert [(e.node, e.epoch) for e in lst.entries] == [("node-1", 1), ("node-2", 3)]
    assert RevocationList.of([entry()]) == RevocationList.of([entry()]) != RevocationList()
    for bad, field in ((entry(epoch=0), "epoch"), (entry(node=""), "node"), (entry(at=0.0), "revoked_unix"),
                       (entry(until=NOW - 1), "until_unix"), (entry(by="x" * 600), "revoked_by")):
        with pytest.raises(RevocationError, match=field):
            RevocationList.of([bad])
    with pytest.raises(RevocationError, match=f"at most {MAX_REVOKED_NODES}"):
        RevocationList.of(entry(f"n{i}") for i in range(MAX_REVOKED_NODES + 1))
    # trim(): expired entries go, then the newest revocations are kept up to the bound.
    kept, dropped = revocation.trim([entry("gone", until=NOW), *(entry(f"n{i}", at=NOW - i)
                                                                 for i in range(MAX_REVOKED_NODES + 2))], NOW)
    assert len(kept) == MAX_REVOKED_NODES and dropped == 2 and kept[0].node == "n0"
    assert all(e.node != "gone" for e in kept)


# ---------------------------------------------------------------- the control plane


def test_a_revocation_moves_the_epoch_on_persists_and_outlives_a_new_join(tmp_path: Path) -> None:
    import sqlite3

    now = [NOW]
    db = tmp_path / "db"
    ids = NodeIdentities(Records(sqlite3.connect(db, isolation_level=None)), lambda: now[0])
    ids.issued("node-2", "aa", NOW + 3600, join_address="10.0.0.12")
    assert ids.get("node-2").svid_epoch == 0 and ids.revoked_nodes(7 * 86400) == []
    result = ids.revoke("node-2", "operator/admin")
    assert result.fresh and result.identity.svid_epoch == 1
    (e,) = ids.revoked_nodes(7 * 86400)
    assert (e.node, e.epoch, e.revoked_unix, e.revoked_by) == ("node-2", 1, NOW, "operator/admin")
    assert e.until_unix >= NOW + 7 * 86400  # every SVID signed before it has expired by then
    # A control plane restart (a new connection to the same file) reads it back.
    again = NodeIdentities(Records(sqlite3.connect(db, isolation_level=None)), lambda: now[0])
    assert again.revoked_nodes(7 * 86400) == [e]
    # The node joins again with a new token: its new SVIDs (epoch 1) are fine, the old ones stay refused.
    now[0] = NOW + 60
    ids.issued("node-2", "bb", NOW + 7200, join_address="10.0.0.12")
    assert ids.get("node-2").svid_epoch == 1 and ids.revoked_nodes(7 * 86400) == [e]
    # A second revocation covers the epochs of both lives.
    now[0] = NOW + 120
    ids.revoke("node-2", "operator/alice")
    (e2,) = ids.revoked_nodes(7 * 86400)
    assert e2.epoch == 2 and e2.revoked_by == "operator/alice"
    # Gone from the list once every SVID it covers has expired.
    now[0] = e2.until_unix
    assert ids.revoked_nodes(7 * 86400) == []


def test_the_pushed_list_changes_at_once_and_on_expiry(tmp_path: Path) -> None:
    import sqlite3

    now = [NOW]
    ids = NodeIdentities(Records(sqlite3.connect(tmp_path / "db", isolation_level=None)), lambda: now[0])
    lst = SvidRevocations(ids, 3600, lambda: now[0])
    assert len(lst.current()) == 0 and not lst.refresh()
    assert lst.note(ids.revoke("node-2", "operator/admin").identity)
    assert [e.node for e in lst.current().entries] == ["node-2"]
    assert not lst.refresh()  # nothing new
    now[0] = NOW + 3600 + 301
    assert lst.refresh() and len(lst.current()) == 0


def test_a_revocation_made_at_one_replica_is_in_every_replicas_list(request: pytest.FixtureRequest) -> None:
    etcd = request.getfixturevalue("etcd_endpoint")  # a real etcd, as in test_store_contract.py
    prefix = f"/t-{uuid.uuid4().hex[:8]}"
    a, b = _store(etcd, prefix), _store(etcd, prefix)
    c = None
    try:
        list_b = SvidRevocations(NodeIdentities(b.security_records()), 3600)
        assert len(list_b.current()) == 0
        NodeIdentities(a.security_records()).revoke("node-2", "operator/admin")
        b.catch_up()  # replica b reads its mirror of etcd, as its 2-second re-read does
        assert list_b.refresh() and [(e.node, e.epoch) for e in list_b.current().entries] == [("node-2", 1)]
        # A replica started afterwards (or a restart) has it from the first snapshot on.
        c = _store(etcd, prefix)
        c.catch_up()
        assert SvidRevocations(NodeIdentities(c.security_records()), 3600).current() == list_b.current()
    finally:
        for s in (a, b, c):
            if s is not None:
                s.close()


def test_the_ca_signs_with_the_nodes_epoch_and_refuses_a_revoked_node(tmp_path: Path) -> None:
    sec = Security.open(str(tmp_path / "cp"), str(tmp_path / "db"))
    try:
        ca = CertificateAuthority.load_or_create(str(tmp_path / "mesh"), "cluster.local")
        bound = mesh({"identityBindings": [{"name": "web", "nodes": ["node-a"], "serviceAccounts": ["shop/web"]}]})
        svc = CertificateServicer(ca, registry(), lambda: "cluster.local", bound=sec.identity_check(lambda: bound),
                                  svid_epoch=sec.svid_epoch)

        def issue() -> x509.Certificate:
            resp = svc.create(mesh_pb2.CertificateRequest(node_name="node-a", csr_pem=make_csr(URI)),
                              "ipv4:10.0.0.1:4000")
            return x509.load_pem_x509_certificate(resp.cert_chain[0].encode())

        before = issue()
        assert revocation.serial_origin(before.serial_number) == (revocation.node_tag("node-a"), 0)
        sec.nodes.revoke("node-a", "operator/admin")
        with pytest.raises(CertificateRefused) as refused:
            issue()
        assert "node node-a was revoked at" in str(refused.value) and "operator/admin" in str(refused.value)
        # Let back in (a join with a new token): new SVIDs carry the new epoch.
        sec.nodes.issued("node-a", "cc", time.time() + 3600, join_address="10.0.0.1")
        assert revocation.serial_origin(issue().serial_number) == (revocation.node_tag("node-a"), 1)
    finally:
        sec.close()


def test_the_snapshot_carries_the_list_and_an_agent_reads_it_back() -> None:
    lst = RevocationList.of([entry(), entry("node-1", epoch=2)])
    snap = build_snapshot(model.MeshConfig(), [], [], [], revocations=lst)
    msg = mesh_pb2.MeshConfig.FromString(snap.get(xdsnames.MESH_CONFIG).resources[xdsnames.MESH_CONFIG_NAME].value)
    assert len(msg.revoked_nodes) == 2
    assert convert_mesh_config(msg).revocations == lst
    # A malformed entry is a NACK naming the field; the agent keeps its previous snapshot.
    msg.revoked_nodes[0].epoch = 0
    with pytest.raises(ResourceError, match="epoch"):
        convert_mesh_config(msg)


# ---------------------------------------------------------------- both HBONE ends, on loopback


def _revoked_total() -> float:
    return float(meshmetrics.PROXY_ERRORS.value({"direction": "inbound", "reason": "revoked_peer_certificate"})
                 or 0.0)


def _revoke(proxy: NodeProxy, *entries: RevokedNode) -> None:
    """Give a proxy a snapshot whose revocation list is `entries` (what one xDS push does)."""
    snap = proxy.snapshot
    assert snap is not None
    mesh_settings = dataclasses.replace(snap.mesh, revocations=RevocationList.of(entries))
    proxy.update(dataclasses.replace(snap, mesh=mesh_settings, version=snap.version + "'"))


def test_hbone_refuses_a_revoked_nodes_svid_both_ways(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nodeagent.proxy.proxy")

    async def go(c: Cluster) -> None:
        # Node a's client SVID and node b's echo SVID, signed in the layout of the mesh CA.
        client_svid = c.ca.issue(CLIENT, serial=revocation.svid_serial("a", 0))
        c.a.update(certs=Certs(svids={CLIENT: client_svid}, trust_bundle=(c.ca.pem,), version=2))
        c.b.update(certs=Certs(svids={ECHO: c.ca.issue(ECHO, serial=revocation.svid_serial("b", 0))},
                               trust_bundle=(c.ca.pem,), version=2))
        # The control: accepted.
        r, w = await c.open(ECHO_VIP)
        w.write(b"before")
        assert await r.readexactly(6) == b"before"
        # Node a is revoked and node b receives the list: the open HBONE connection is cut at once ...
        base = _revoked_total()
        now = time.time()
        _revoke(c.b, RevokedNode("a", 1, now, "operator/admin", now + 3600))
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        # ... and a new one is refused right after its handshake: counted, the reason in b's log.
        r, w = await c.open(ECHO_VIP)
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        assert _revoked_total() >= base + 2
        serial = x509.load_pem_x509_certificate(client_svid.cert_chain_pem.encode()).serial_number
        want = f"certificate {serial:x} of {CLIENT} was issued to node a, revoked at"
        assert any(want in m and "by operator/admin" in m for m in caplog.messages), caplog.messages
        # The sending side checks the peer it dialled: node b revoked, node a refuses b's echo SVID.
        _revoke(c.b)
        _revoke(c.a, RevokedNode("b", 1, now, "operator/admin", now + 3600))
        r, w = await c.open(ECHO_VIP)
        assert await asyncio.wait_for(r.read(), 5) == b""
        w.close()
        out = await wait_for_log(c.rec_a, lambda x: x.get("reason") == "revoked_peer_certificate")
        assert f"of {ECHO} was issued to node b" in out["error"], out

    run(go)


def test_refusals_of_one_peer_are_logged_at_a_bounded_rate(caplog: pytest.LogCaptureFixture) -> None:
    from nodeagent.meshview.snapshot import MeshSettings, Snapshot
    from nodeagent.supervision.settings import ProxySettings

    caplog.set_level(logging.WARNING, logger="nodeagent.proxy.proxy")
    proxy = NodeProxy(ProxySettings(node_name="n", node_address="127.0.0.1", access_log="off"))
    revoked = RevocationList.of([entry(at=time.time() - 1, until=time.time() + 60)])
    proxy.update(Snapshot("1", "n", MeshSettings(revocations=revoked)))
    serial = format(revocation.svid_serial("node-2", 0), "X")
    for _ in range(50):
        assert "issued to node node-2" in proxy.revoked_peer("inbound", serial, ECHO, "10.0.0.2:1")
    assert len(caplog.messages) == 1
    assert proxy.revoked_peer("inbound", format(revocation.svid_serial("node-2", 1), "X"), ECHO, "") == ""
