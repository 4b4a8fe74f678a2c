"""sock_diag: the kernel names the owner of a loopback TCP connection."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from nodeagent.meshview.snapshot import LocalWorkload, MeshSettings, Snapshot
from nodeagent.proxy import netutil, sockdiag


@pytest.fixture
def conn() -> Iterator[tuple[socket.socket, socket.socket]]:
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen()
    cli = socket.create_connection(srv.getsockname())
    acc, _ = srv.accept()
    yield cli, acc
    for s in (cli, acc, srv):
        s.close()


def test_owner_of_client_socket(conn: tuple[socket.socket, socket.socket]) -> None:
    cli, _ = conn
    owner = sockdiag.query_owner(cli.getsockname(), cli.getpeername())
    assert owner.uid == os.getuid()
    assert owner.inode == os.fstat(cli.fileno()).st_ino
    expected = sockdiag.this_process_cgroup_id()
    if expected is not None:
        assert owner.cgroup_id == expected


def test_server_side_is_a_different_socket(conn: tuple[socket.socket, socket.socket]) -> None:
    cli, acc = conn
    owner = sockdiag.query_owner(acc.getsockname(), acc.getpeername())
    assert owner.inode == os.fstat(acc.fileno()).st_ino != os.fstat(cli.fileno()).st_ino


def test_no_such_socket_is_a_clear_error() -> None:
    with pytest.raises(sockdiag.SockDiagError, match="no TCP socket 127.0.0.1:1 -> 127.0.0.1:2"):
        sockdiag.query_owner(("127.0.0.1", 1), ("127.0.0.1", 2))


def test_identify_prefers_cgroup_then_uid(tmp_path: os.PathLike[str]) -> None:
    root = str(tmp_path)
    os.makedirs(os.path.join(root, "mesh/web"))
    web = LocalWorkload("web", "default", "web", "10.0.0.2", (80,), cgroup="/mesh/web")
    db = LocalWorkload("db", "default", "db", "10.0.0.3", (5432,), uid=1234)
    ghost = LocalWorkload("ghost", "default", "ghost", "10.0.0.4", (81,), cgroup="mesh/none")
    snap = Snapshot("1", "n1", MeshSettings(), local_workloads=(web, db, ghost))
    index = sockdiag.cgroup_index(snap, root)
    web_id = os.stat(os.path.join(root, "mesh/web")).st_ino
    assert index == {web_id: web}  # the missing cgroup is skipped, not fatal
    assert sockdiag.identify(snap, index, sockdiag.SocketOwner(1234, 1, web_id)) is web
    assert sockdiag.identify(snap, index, sockdiag.SocketOwner(1234, 1, 999)) is db
    assert sockdiag.identify(snap, index, sockdiag.SocketOwner(5, 1, None)) is None


def test_parse_error_reply() -> None:
    import struct

    reply = struct.pack("=IHHII", 36, netutil.NLMSG_ERROR, 0, 1, 0) + struct.pack("=i", -13) + b"\0" * 16
    with pytest.raises(sockdiag.SockDiagError, match="Permission denied"):
        sockdiag.parse_response(reply)
