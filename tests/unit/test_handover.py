"""Restarts that drop nothing (nodeagent/supervision/handover.py): fds stored in
and handed back by "systemd" (a real AF_UNIX notify socket and real LISTEN_FDS
descriptors), the snapshot/certs memfd read back whole or refused, listeners
adopted only when they match the config, and a worker pool draining on request."""

from __future__ import annotations

import array
import dataclasses
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from nodeagent.meshview.snapshot import MeshSettings, Snapshot
from nodeagent.proxy.proxy import LISTENER_NAMES, listener_specs, open_listeners
from nodeagent.supervision import handover
from nodeagent.supervision.settings import Certs, ProxySettings
from nodemesh.sdnotify import LISTEN_FDS_START, Notifier, listen_fds


def _settings(port0: int) -> ProxySettings:
    return ProxySettings(node_name="n1", node_address="127.0.0.1", outbound_bind="127.0.0.1",
                         outbound_port=port0, inbound_bind="127.0.0.1", inbound_plain_port=port0 + 1,
                         hbone_port=port0 + 2, mark=0, access_log="off")


def _free_port_block() -> int:
    for base in range(42000, 60000, 7):
        socks = []
        try:
            for p in range(base, base + 3):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free ports")


def _receive(sock: socket.socket) -> tuple[str, list[int]]:
    msg, anc, _, _ = sock.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
    fds: list[int] = []
    for level, kind, data in anc:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            a = array.array("i")
            a.frombytes(data[: len(data) - len(data) % a.itemsize])
            fds += list(a)
    return msg.decode(), fds


def test_store_fd_sends_the_descriptor_with_its_name(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(path)
        r, w = os.pipe()
        try:
            assert Notifier({"NOTIFY_SOCKET": path}).store_fd("outbound", r)
            msg, fds = _receive(manager)
            assert msg == "FDSTORE=1\nFDNAME=outbound" and len(fds) == 1
            os.write(w, b"x")
            assert os.read(fds[0], 1) == b"x"  # the same pipe, passed over SCM_RIGHTS
            os.close(fds[0])
        finally:
            os.close(r)
            os.close(w)
    with pytest.raises(ValueError, match="fd store name"):
        Notifier({"NOTIFY_SOCKET": path}).store_fd("a:b", 0)


def test_listen_fds_names_ours_only_and_unsets() -> None:
    r, w = os.pipe()
    saved = [os.dup(LISTEN_FDS_START + i) if _is_open(LISTEN_FDS_START + i) else -1 for i in range(2)]
    try:
        os.dup2(r, LISTEN_FDS_START)
        os.dup2(w, LISTEN_FDS_START + 1)
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "2", "LISTEN_FDNAMES": "state:outbound"}
        assert listen_fds(env) == {"state": [LISTEN_FDS_START], "outbound": [LISTEN_FDS_START + 1]}
        assert "LISTEN_FDS" not in env and not os.get_inheritable(LISTEN_FDS_START)
        # Meant for another process: ignored (and still unset).
        env = {"LISTEN_PID": "1", "LISTEN_FDS": "2", "LISTEN_FDNAMES": "a:b"}
        assert listen_fds(env) == {} and env == {}
        assert listen_fds({}) == {}
    finally:
        for i, fd in enumerate(saved):
            if fd >= 0:
                os.dup2(fd, LISTEN_FDS_START + i)
                os.close(fd)
        os.close(r)
        os.close(w)


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


def _snapshot_and_certs() -> tuple[Snapshot, Certs]:
    return Snapshot("v-handover", "n1", MeshSettings()), Certs(version=7)


def test_state_memfd_round_trip_and_torn_writes_are_refused(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(path)
        notifier = Notifier({"NOTIFY_SOCKET": path})
        store = handover.StateStore(notifier)
        snap, certs = _snapshot_and_certs()
        store.save(snap, certs)
        msg, fds = _receive(manager)
        assert msg == f"FDSTORE=1\nFDNAME={handover.STATE_NAME}" and len(fds) == 1
        store.save(Snapshot("v2", "n1", MeshSettings()), certs)  # rewritten in place: the store's copy sees it
        with pytest.raises(BlockingIOError):
            manager.recvmsg(10, 0, socket.MSG_DONTWAIT)  # no second FDSTORE for the same memfd
        carried = handover.adopt({handover.STATE_NAME: [os.dup(fds[0])]}, _settings(1), notifier)
        assert carried.snapshot is not None and carried.snapshot.version == "v2" and carried.certs == certs
        assert carried.serving_state and carried.listeners == {}
        msg, _ = _receive(manager)
        assert msg == f"FDSTOREREMOVE=1\nFDNAME={handover.STATE_NAME}"  # the next agent stores its own
        # A write cut short (kill -9 mid-save): refused, the agent waits for the control plane.
        size = os.fstat(fds[0]).st_size
        os.ftruncate(fds[0], size - 3)
        carried = handover.adopt({handover.STATE_NAME: [os.dup(fds[0])]}, _settings(1), notifier)
        assert carried.snapshot is None and not carried.serving_state
        os.close(fds[0])
        store.close()


def test_listeners_are_adopted_only_when_they_match(tmp_path: Path) -> None:
    path = str(tmp_path / "notify")
    base = _free_port_block()
    settings = _settings(base)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as manager:
        manager.bind(path)
        notifier = Notifier({"NOTIFY_SOCKET": path})
        socks = open_listeners(settings)
        inherited = {name: [os.dup(s.fileno())] for name, s in zip(LISTENER_NAMES, socks, strict=True)}
        carried = handover.adopt(inherited, settings, notifier)
        assert set(carried.listeners) == set(LISTENER_NAMES)
        for name, _host, port, _ in listener_specs(settings):
            assert carried.listeners[name].getsockname()[1] == port
        # A queued connection waits in the kept socket for whoever accepts next.
        c = socket.create_connection(("127.0.0.1", base), timeout=2)
        carried.listeners["outbound"].setblocking(True)
        conn, _ = carried.listeners["outbound"].accept()
        conn.close()
        c.close()
        for s in carried.listeners.values():
            s.close()
        # The config moved the outbound port: that kept socket is dropped from the store,
        # and the others are not used alone (all listeners are opened anew).
        moved = dataclasses.replace(settings, outbound_port=base + 5)
        inherited = {name: [os.dup(s.fileno())] for name, s in zip(LISTENER_NAMES, socks, strict=True)}
        carried = handover.adopt(inherited, moved, notifier)
        assert carried.listeners == {}
        assert _receive(manager)[0] == "FDSTOREREMOVE=1\nFDNAME=outbound"
        for s in socks:
            s.close()


def test_restart_job_parsing() -> None:
    out = "468 nodemesh-agent.service restart running\n470 other.service start waiting\n"
    assert handover.restart_job(out, "nodemesh-agent.service") == "468 restart"
    assert handover.restart_job("12 nodemesh-agent.service stop running\n", "nodemesh-agent.service") == ""
    assert handover.restart_job("", "nodemesh-agent.service") == ""
    assert handover.restart_job(out, "other.service") == ""


def test_release_draining_signals_only_proxy_workers(tmp_path: Path) -> None:
    handover.note_draining(tmp_path, [os.getpid(), 999999999])
    # This test process is not a proxy worker, and the other pid does not exist: nobody is signalled.
    assert handover.release_draining(tmp_path) == []
    assert not (tmp_path / handover.DRAINING_FILE).exists()


def test_worker_pool_drains_and_shares_kept_listeners(tmp_path: Any) -> None:
    """A pool started on given listeners serves on them; drain() keeps the workers
    accepting until SIGUSR2 (the next agent's workers serve), then they exit on
    their own while the listening socket lives on in whoever else holds it."""
    import asyncio
    import signal

    import uvloop

    from nodeagent.proxy.worker import WorkerPool

    base = _free_port_block()
    settings = _settings(base)
    kept = open_listeners(settings)  # "systemd's" copies

    async def go() -> None:
        pool = WorkerPool(settings)
        pool.listeners = [socket.socket(fileno=os.dup(s.fileno())) for s in kept]
        await pool.start()
        pool.publish(snapshot=Snapshot("1", "n1", MeshSettings()), certs=Certs())  # workers accept from here on
        pids = pool.pids()
        assert pids
        drained = pool.drain(30.0, 5.0)
        assert drained == pids
        await asyncio.sleep(0.5)
        assert all(_alive(p) for p in pids)  # still accepting: nobody signalled yet
        for p in pids:
            os.kill(p, signal.SIGUSR2)
        deadline = time.monotonic() + 10
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert not any(_alive(p) for p in pids)

    uvloop.run(go())
    # The kept socket still listens: a connection queues for the next workers.
    c = socket.create_connection(("127.0.0.1", base), timeout=2)
    c.close()
    for s in kept:
        s.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ")[1][0] != "Z"
    except OSError:
        return False


def test_kept_listeners_are_served_only_with_a_snapshot(tmp_path: Any) -> None:
    """Workers on kept listeners accept only once they hold a snapshot: a connection
    captured across a kill -9 waits in the listen queue and is then served, rather
    than being accepted and closed unserved (the race behind an intermittent
    test_kill9_failure_policy_closed_refuses_fast failure)."""
    import asyncio

    import uvloop

    from nodeagent.proxy.worker import WorkerPool

    base = _free_port_block()
    settings = dataclasses.replace(_settings(base), access_log=str(tmp_path / "access.log"))

    async def poke() -> bytes:
        r, w = await asyncio.open_connection("127.0.0.1", base)
        data = await asyncio.wait_for(r.read(), 10)
        w.close()
        return data

    async def go() -> None:
        pool = WorkerPool(settings)
        pool.listeners = open_listeners(settings)
        await pool.start()
        try:
            early = asyncio.ensure_future(poke())
            await asyncio.sleep(0.5)
            assert not early.done()  # connected (the kernel's queue), not accepted
            log = tmp_path / "access.log"
            assert not log.exists() or log.read_text() == ""
            pool.publish(snapshot=Snapshot("1", "n1", MeshSettings()), certs=Certs())
            assert await early == b""  # now served: not redirected, so no original destination
            await asyncio.sleep(0.2)
            assert "\"reason\":\"proxy_error\"" in log.read_text()  # not not_ready
        finally:
            await pool.stop()

    uvloop.run(go())
