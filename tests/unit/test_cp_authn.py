"""Operator authentication and roles on the control plane: the role table,
refusal messages, hashed and revocable operator tokens, and the real grpc.aio
control plane (mutual-TLS port, server-only TLS port, local-admin unix socket)."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import tempfile
from pathlib import Path
from typing import Any

import grpc
import pytest

from controlplane.adminclient import AdminClient
from controlplane.apiclient import ClientError, Credentials
from controlplane.auth import NODE, OPEN, RO, RW, Caller, Operators, allows, refusal
from controlplane.process import ControlPlaneSettings, start

LOCAL = Caller("local", "unix", RW)
ADMIN = Caller("operator", "admin", RW)
VIEWER = Caller("operator", "viewer", RO)
NODE1 = Caller("node", "node-1")
NOBODY = Caller("anonymous")


@pytest.mark.parametrize(("caller", "need", "allowed"), [
    (LOCAL, RW, True), (LOCAL, NODE, True), (ADMIN, RW, True), (ADMIN, RO, True), (ADMIN, NODE, False),
    (VIEWER, RO, True), (VIEWER, RW, False), (NODE1, NODE, True), (NODE1, RO, False), (NODE1, RW, False),
    (NOBODY, RO, False), (NOBODY, NODE, False), (NOBODY, OPEN, True), (VIEWER, OPEN, True),
])
def test_role_table(caller: Caller, need: str, allowed: bool) -> None:
    assert allows(caller, need) is allowed


def test_refusals_say_what_to_check() -> None:
    code, msg = refusal(NOBODY, "/nodemesh.v1.ConfigService/List", RO)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "--token-file" in msg and "admin.token" in msg
    code, msg = refusal(VIEWER, "/nodemesh.v1.ConfigService/Apply", RW)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "needs the rw role" in msg and "viewer has role ro" in msg
    code, msg = refusal(NODE1, "/nodemesh.v1.ConfigService/Apply", RW)
    assert code == grpc.StatusCode.PERMISSION_DENIED and "node certificates" in msg
    code, msg = refusal(NOBODY, "/nodemesh.v1.Registry/Session", NODE)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "joinTokenFile" in msg
    code, _ = refusal(ADMIN, "/some.Unknown/Method", None)
    assert code == grpc.StatusCode.PERMISSION_DENIED


def test_operator_tokens_are_hashed_and_revocable() -> None:
    db = sqlite3.connect(":memory:", isolation_level=None)
    ops = Operators(db)
    token, cid, _expires = ops.create_token("viewer", RO)
    assert token.split(".")[2] not in str(db.execute("SELECT * FROM security_records").fetchall())
    assert ops.by_token(token) == Caller("operator", "viewer", RO, credential=cid)
    assert ops.by_token(token[:-2] + "xx").kind == "anonymous"
    assert "not an operator token" in ops.by_token("Bearer-ish").why_anonymous
    new, _, _ = ops.create_token("viewer", RW)  # a new token replaces the old one
    assert ops.by_token(token).kind == "anonymous" and ops.by_token(new).role == RW
    assert ops.revoke("viewer") and not ops.revoke("viewer")
    assert ops.by_token(new).kind == "anonymous"
    with pytest.raises(ValueError, match="role 'admin'"):
        ops.create_token("x", "admin")
    with pytest.raises(ValueError, match="cap of 90 days"):
        ops.create_token("x", RO, 365 * 86400)


def test_operator_certificates_are_revoked_by_serial_and_stay_revoked() -> None:
    """Revocation used to be by name and re-creating the operator cleared it: a
    certificate is now a credential of its own, accepted only while its serial
    is recorded and not revoked."""
    now = [1000.0]
    ops = Operators(sqlite3.connect(":memory:", isolation_level=None), clock=lambda: now[0])
    cid = ops.register_cert("alice", RW, "abc123", expires_unix=5000.0)
    assert ops.by_cert("alice", "abc123") == Caller("operator", "alice", RW, credential=cid)
    assert ops.by_cert("bob", "abc123").kind == "anonymous"  # someone else's serial
    assert "unknown" in ops.by_cert("alice", "ffff").why_anonymous  # never issued
    assert ops.revoke("alice") == 1
    ops.register_cert("alice", RW, "def456", expires_unix=5000.0)  # the operator is created again
    assert ops.by_cert("alice", "def456").kind == "operator"
    old = ops.by_cert("alice", "abc123")
    assert old.kind == "anonymous" and "revoked" in old.why_anonymous
    assert ops.revoke_serial("def456") and ops.by_cert("alice", "def456").kind == "anonymous"
    tok, tid, _ = ops.create_token("alice", RO)
    assert ops.revoke_credential(tid) and "revoked" in ops.by_token(tok).why_anonymous
    now[0] = 6000.0  # expired
    ops.register_cert("carol", RO, "0a", expires_unix=5500.0)
    assert "expired" in ops.by_cert("carol", "0a").why_anonymous


def _call(fn: Any) -> tuple[grpc.StatusCode | None, str]:
    try:
        fn()
    except ClientError as e:
        return e.code, str(e)
    return grpc.StatusCode.OK, ""


def test_control_plane_serves_tls_with_operator_roles() -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as d:
            sock = os.path.join(d, "cp.sock")
            state = os.path.join(d, "state")
            cp = await start(ControlPlaneSettings(state_dir=state, listen=("127.0.0.1:0", f"unix:{sock}"),
                                                  debounce_s=0.01))
            try:
                mtls, _unix, tls = cp.addresses
                assert stat.S_IMODE(os.stat(sock).st_mode) == 0o600
                assert stat.S_IMODE(os.stat(os.path.join(state, "admin.token")).st_mode) == 0o600
                assert stat.S_IMODE(os.stat(os.path.join(state, "cp-ca.key")).st_mode) == 0o600
                ca = Path(state, "cp-ca.pem").read_bytes()
                admin = Credentials(token=Path(state, "admin.token").read_text().strip(), ca_pem=ca)

                def calls() -> None:
                    with AdminClient(tls, credentials=Credentials(ca_pem=ca), timeout_s=3) as c:
                        code, msg = _call(lambda: c.list("Service"))
                        assert code == grpc.StatusCode.UNAUTHENTICATED and "operator credential" in msg
                    with AdminClient(tls, credentials=admin, timeout_s=3) as c:
                        assert c.list("Service") == []
                        viewer = c.create_operator("viewer", RO).token
                        assert c.verify_audit().ok
                    with AdminClient(tls, credentials=Credentials(token=viewer, ca_pem=ca), timeout_s=3) as c:
                        assert c.list("Service") == []
                        code, msg = _call(lambda: c.apply("apiVersion: nodemesh.io/v1alpha1\nkind: Service\n"
                                                          "metadata: {name: web}\nspec: {ports: [{port: 80}]}\n"))
                        assert code == grpc.StatusCode.PERMISSION_DENIED and "rw role" in msg
                        code, msg = _call(lambda: c.rotate_root(60))
                        assert code == grpc.StatusCode.PERMISSION_DENIED
                        entries = c.audit()
                        assert c.verify_audit().ok
                    # No client certificate: the mutual-TLS port refuses the handshake.
                    with AdminClient(mtls, credentials=admin, timeout_s=3) as c:
                        code, _ = _call(lambda: c.list("Service"))
                        assert code == grpc.StatusCode.UNAVAILABLE
                    # The unix socket is local admin.
                    with AdminClient(f"unix:{sock}", credentials=Credentials(), timeout_s=3) as c:
                        token = c.create_join_token("node-1", 60)
                        assert token.token.startswith("nmjt1.") and token.expires_unix > 0
                        refused = c.refusals()
                    seen = [(e.principal.split(" ")[0], e.action, e.outcome.split(":")[0]) for e in entries]
                    assert ("operator/admin", "CreateOperator", "ok") in seen
                    # Refused calls are counted apart from the change log.
                    assert not [e for e in entries if e.principal.startswith("operator/viewer")]
                    counts = {(r.method, r.principal): r.count for r in refused.counts}
                    assert counts[("Apply", "operator/viewer")] == 1 and counts[("RotateRoot", "operator/viewer")] == 1

                await asyncio.to_thread(calls)
            finally:
                await cp.stop(0)

    asyncio.run(main())


def test_world_writable_socket_directory_is_refused() -> None:
    async def main() -> None:
        with tempfile.TemporaryDirectory() as d:
            open_dir = os.path.join(d, "open")
            os.mkdir(open_dir)
            os.chmod(open_dir, 0o777)  # noqa: S103 (the unsafe directory this test must see refused)
            with pytest.raises(OSError, match="writable by group or others"):
                await start(ControlPlaneSettings(state_dir=os.path.join(d, "state"),
                                                 listen=(f"unix:{open_dir}/cp.sock",)))

    asyncio.run(main())


def test_unix_socket_is_private_from_bind_on(monkeypatch: pytest.MonkeyPatch) -> None:
    """umask 002 used to leave the socket group-connectable (0775) between bind and
    chmod: the bind itself now happens under umask 077."""
    from controlplane import auth as cp_auth

    monkeypatch.setattr(cp_auth, "secure_unix_socket", lambda _path: None)  # only what bind() made

    async def main() -> int:
        with tempfile.TemporaryDirectory() as d:
            sock = os.path.join(d, "cp.sock")
            old = os.umask(0o002)
            try:
                cp = await start(ControlPlaneSettings(state_dir=os.path.join(d, "state"), listen=(f"unix:{sock}",),
                                                      debounce_s=0.01))
            finally:
                os.umask(old)
            try:
                return stat.S_IMODE(os.stat(sock).st_mode)
            finally:
                await cp.stop(0)

    mode = asyncio.run(main())
    assert mode & 0o077 == 0, oct(mode)
