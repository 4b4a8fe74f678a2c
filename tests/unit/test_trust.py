"""Identity bindings, node identity records, the audit chain and the refusal log
(pure logic against a real SQLite file; the netns attack tests play them live)."""

from __future__ import annotations

import json
import logging
import sqlite3
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from controlplane.audit import AuditLog, RefusalLog
from controlplane.nodeids import NodeIdentities
from controlplane.records import Records
from nodemesh import bindings, model

KEY = b"k" * 32


def mesh(spec: Mapping[str, Any]) -> model.MeshConfig:
    obj = model.parse_document({"apiVersion": model.API_VERSION, "kind": "MeshConfig", "metadata": {"name": "mesh"},
                                "spec": spec}).obj
    assert isinstance(obj, model.MeshConfig)
    return obj


def problems(spec: dict[str, object]) -> list[str]:
    with pytest.raises(model.ValidationError) as e:
        mesh(spec)
    return [f"{p}: {why}" for p, why in e.value.problems]  # "MeshConfig mesh: <path>: <why>"


PAYMENTS = {"identityBindings": [
    {"name": "payments", "nodeSelector": {"pool": "payments"}, "serviceAccounts": ["payments/payments-api"],
     "workloadLabels": {"app": ["payments-api"], "version": ["*"]}, "addresses": ["10.9.0.0/24"]},
    {"name": "web", "nodes": ["web-*"], "serviceAccounts": ["default/web"], "workloadLabels": {"app": "web"}},
]}


def test_nothing_bound_is_refused_and_the_refusal_names_the_missing_binding() -> None:
    m = mesh({})
    why = bindings.identity_refused(m, "node-1", {}, "payments", "payments-api")
    assert "no MeshConfig spec.identityBindings entry matches node node-1" in why
    assert "serviceAccounts: [payments/payments-api]" in why
    m = mesh(PAYMENTS)
    # The attack of the review: a web node asking for the payments identity.
    why = bindings.identity_refused(m, "web-1", {}, "payments", "payments-api")
    assert "not bound to node web-1" in why and "(web)" in why
    assert bindings.identity_refused(m, "web-1", {}, "default", "web") == ""
    # Node labels come from the operator (join token), never from the node.
    assert bindings.identity_refused(m, "db-7", {"pool": "payments"}, "payments", "payments-api") == ""
    assert bindings.identity_refused(m, "db-7", {"pool": "other"}, "payments", "payments-api")


def test_label_sets_and_addresses_must_be_allowed() -> None:
    m = mesh(PAYMENTS)
    assert bindings.workload_refused(m, "web-1", {}, "default", "web", {"app": "web"}) == ""
    why = bindings.workload_refused(m, "web-1", {}, "default", "web", {"app": "payments-api"})
    assert "label app=payments-api" in why and "web does not allow" in why
    why = bindings.workload_refused(m, "web-1", {}, "default", "web", {"app": "web", "tier": "x"})
    assert "tier=x" in why
    sel = {"pool": "payments"}
    assert bindings.workload_refused(m, "db", sel, "payments", "payments-api",
                                     {"app": "payments-api", "version": "v9"}) == ""
    # Owned: the join address, and what a matching binding declares.
    assert bindings.address_refused(m, "db", sel, ["192.168.1.5"], "192.168.1.5", "ip") == ""
    assert bindings.address_refused(m, "db", sel, ["192.168.1.5"], "10.9.0.77", "ip") == ""
    why = bindings.address_refused(m, "web-1", {}, ["192.168.1.6"], "192.168.1.5", "workload default/web ip")
    assert "192.168.1.5 is not an address node web-1 owns" in why and "192.168.1.6/32" in why


def test_bindings_are_validated_with_field_paths_and_round_trip() -> None:
    got = problems({"identityBindings": [{"name": "x", "serviceAccounts": ["a/b"]},
                                         {"name": "y", "nodes": ["n"], "serviceAccounts": ["bad"]},
                                         {"name": "z", "nodes": ["n"], "serviceAccounts": ["a/b"],
                                          "addresses": ["nope"], "extra": 1}]})
    assert any(p.split(": ", 1)[1].startswith("spec.identityBindings[0]: needs nodes or nodeSelector") for p in got)
    assert any(p.split(": ", 1)[1].startswith("spec.identityBindings[1].serviceAccounts[0]") for p in got)
    assert any(p.split(": ", 1)[1].startswith("spec.identityBindings[2].addresses[0]") for p in got)
    assert any(p.split(": ", 1)[1].startswith("spec.identityBindings[2].extra: unknown field") for p in got)
    m = mesh(PAYMENTS)
    assert mesh(m.spec()) == m
    # The older nodeServiceAccounts shorthand is a binding too (any labels).
    legacy = mesh({"nodeServiceAccounts": {"node-1": ["default/web"]}})
    assert bindings.workload_refused(legacy, "node-1", {}, "default", "web", {"any": "thing"}) == ""
    assert "identityBindings" not in legacy.spec()


def test_node_identities_allow_only_issued_serials_and_revocation_is_immediate(tmp_path: Path) -> None:
    now = [1000.0]
    ids = NodeIdentities(Records(sqlite3.connect(tmp_path / "db", isolation_level=None)), lambda: now[0])
    ids.set_labels("node-1", {"pool": "a"})
    ids.issued("node-1", "aa", 5000.0, join_address="10.0.0.11")
    ids.issued("node-1", "bb", 6000.0)  # a renewal keeps the join address
    rec = ids.get("node-1")
    assert rec.labels == {"pool": "a"} and rec.join_address == "10.0.0.11" and set(rec.serials) == {"aa", "bb"}
    assert ids.certificate_refused("node-1", "aa") == ""
    assert "not one this control plane issued" in ids.certificate_refused("node-1", "cc")
    assert ids.certificate_refused("node-2", "aa")  # another node's serial
    assert ids.revoke("node-1", "operator/admin")[:2] == (True, 2)
    assert "revoked" in ids.certificate_refused("node-1", "bb") and "operator/admin" in ids.certificate_refused(
        "node-1", "bb")
    assert ids.revoke("node-1", "operator/admin")[:2] == (False, 0)
    # A new join (a new token from the operator) lifts it for the new certificate only.
    ids.issued("node-1", "dd", 7000.0, join_address="10.0.0.11")
    assert ids.certificate_refused("node-1", "dd") == "" and ids.certificate_refused("node-1", "aa")
    # ...but the revocation's time is kept: join tokens made before it stay void.
    assert ids.get("node-1").revoked_unix == 0 and ids.get("node-1").last_revoked_unix == 1000.0
    now[0] = 7001.0
    assert "expired" in ids.certificate_refused("node-1", "dd")


def _audit(tmp_path: Path, keep: int = 100_000) -> tuple[AuditLog, sqlite3.Connection]:
    db = sqlite3.connect(tmp_path / "audit.db", isolation_level=None)
    return AuditLog(Records(db), KEY, keep=keep), db


def _edit(db: sqlite3.Connection, seq: int, **fields: object) -> None:
    rec = json.loads(db.execute("SELECT record FROM security_log WHERE tbl='audit' AND seq=?", (seq,)).fetchone()[0])
    rec.update(fields)
    db.execute("UPDATE security_log SET record=? WHERE tbl='audit' AND seq=?", (json.dumps(rec), seq))


def test_audit_chain_verifies_and_catches_edits_deletions_and_truncation(tmp_path: Path) -> None:
    log, db = _audit(tmp_path)
    for i in range(5):
        log.append("operator/admin", "Apply", f"apply Service/default/s{i}", "ok")
    v = log.verify()
    assert v.ok and v.records == 5 and (v.first_seq, v.last_seq) == (1, 5)
    _edit(db, 3, principal="operator/someone-else")
    v = log.verify()
    assert not v.ok and "record 3 was edited" in v.problem and v.last_seq == 2
    _edit(db, 3, principal="operator/admin")
    assert log.verify().ok
    db.execute("DELETE FROM security_log WHERE tbl='audit' AND seq=2")
    assert "record(s) 2..2 are missing" in log.verify().problem
    (tmp_path / "x").mkdir()
    log2, db2 = _audit(tmp_path / "x")
    for i in range(3):
        log2.append("operator/admin", "Delete", f"d{i}", "ok")
    db2.execute("DELETE FROM security_log WHERE tbl='audit' AND seq=3")  # the newest one
    assert "newest records were deleted" in log2.verify().problem
    # Recomputing a plain hash does not help without the key: a forged link is caught.
    _edit(db2, 2, detail="innocent", hash="0" * 64)
    assert "record 2 was edited" in log2.verify().problem


def test_audit_pruning_keeps_a_verifiable_anchor(tmp_path: Path) -> None:
    log, db = _audit(tmp_path, keep=3)
    for i in range(8):
        log.append("operator/admin", "Apply", f"n{i}", "ok")
    log._prune_to(3)
    assert [e.detail for e in log.entries()] == ["n7", "n6", "n5"]
    v = log.verify()
    assert v.ok and (v.first_seq, v.last_seq) == (6, 8)
    log.append("operator/admin", "Apply", "n8", "ok")
    assert log.verify().ok
    anchor = json.loads(db.execute("SELECT record FROM security_records WHERE tbl='audit_head' AND key='anchor'"
                                   ).fetchone()[0])
    anchor["seq"] = 6
    db.execute("UPDATE security_records SET record=? WHERE tbl='audit_head' AND key='anchor'", (json.dumps(anchor),))
    assert "anchor" in log.verify().problem


def test_refusals_are_counted_sampled_and_logged_within_bounds(caplog: pytest.LogCaptureFixture) -> None:
    now = [0.0]
    r = RefusalLog(lambda: now[0])
    with caplog.at_level(logging.WARNING, "nodemesh.controlplane.audit"):
        for i in range(10_000):
            now[0] = i / 1000  # 10 s of 1000 calls a second
            r.record("anonymous", "/nodemesh.v1.ConfigService/Apply", "UNAUTHENTICATED", "no credential", f"p{i}")
    assert r.total == 10_000
    assert r.counts == {("Apply", "UNAUTHENTICATED", "anonymous"): 10_000}
    assert len(r.samples) <= 60  # ~5 a second
    lines = [m for m in caplog.messages if "refused" in m]
    assert 1 <= len(lines) <= 2 and (len(lines) == 1 or "more like it" in lines[-1])
    # Anonymous callers cannot grow the tables: they are one key, however they present themselves.
    for i in range(5000):
        r.record(f"anonymous-{i}", f"/x/M{i % 3}", "UNAUTHENTICATED", "m")
    assert len(r.counts) <= 4
    r.record("node/node-1", "/nodemesh.v1.Registry/Session", "PERMISSION_DENIED", "no binding")
    assert r.node_refusals("node-1")[0].endswith("Session: no binding")
