"""The proxy's process boundary: WorkerPool (in the agent) opens the listening
sockets once (or adopts those a previous agent left in systemd's fd store),
spawns N worker processes (`python -m nodeagent.proxy.worker`) that all accept
from them, each running a NodeProxy on uvloop, and feeds them snapshots and
certificates as length-prefixed pickles over a socketpair. On a restart the
workers drain instead of stopping (drain()): they outlive the agent, stop
accepting and end with their last connection."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import pickle
import signal
import socket
import struct
import sys
from dataclasses import dataclass, field
from typing import Any

from nodeagent.meshview.snapshot import Snapshot
from nodeagent.supervision.settings import Certs, ProxySettings

log = logging.getLogger(__name__)

_LEN = struct.Struct("!I")
MAX_MESSAGE = 256 * 1024 * 1024
READY_TIMEOUT_S = 20.0
RESTART_BACKOFF_S = (0.1, 0.5, 1.0, 2.0, 5.0)
HEALTHY_AFTER_S = 30.0
MAX_RESTART_FAILURES = 5
RESTART_DELAY_ENV = "NODEMESH_TEST_WORKER_RESTART_DELAY_S"


def frame(kind: str, payload: Any) -> bytes:
    body = pickle.dumps((kind, payload), protocol=pickle.HIGHEST_PROTOCOL)
    return _LEN.pack(len(body)) + body


class _Framer:
    """Length-prefixed message reassembly (pure)."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[tuple[str, Any]]:
        self._buf += data
        out = []
        while len(self._buf) >= _LEN.size:
            (n,) = _LEN.unpack_from(self._buf)
            if n > MAX_MESSAGE:
                raise ValueError(f"control message of {n} bytes exceeds {MAX_MESSAGE}")
            if len(self._buf) < _LEN.size + n:
                break
            body = bytes(self._buf[_LEN.size: _LEN.size + n])
            del self._buf[: _LEN.size + n]
            out.append(pickle.loads(body))  # noqa: S301 - both ends are our own processes
        return out


class WorkerStartError(RuntimeError):
    pass


# --- agent side -------------------------------------------------------------------------------------
class _Channel(asyncio.Protocol):
    def __init__(self, worker: _Worker) -> None:
        self.worker = worker
        self.framer = _Framer()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: Any) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            msgs = self.framer.feed(data)
        except Exception as e:  # noqa: BLE001 - a bad control message is reported, never fatal to the agent
            log.error("proxy worker %d sent a bad control message: %s", self.worker.index, e)
            return
        for kind, payload in msgs:
            self.worker.on_message(kind, payload)

    def connection_lost(self, exc: Exception | None) -> None:
        self.worker.on_message("gone", str(exc or "closed"))


@dataclass
class _Worker:
    index: int
    proc: asyncio.subprocess.Process | None = None
    channel: _Channel | None = None
    ready: asyncio.Future[None] | None = None
    restarts: int = 0
    watcher: asyncio.Task[None] | None = None
    messages: list[tuple[str, Any]] = field(default_factory=list)
    stats_waiters: dict[int, asyncio.Future[Any]] = field(default_factory=dict)  # request id -> answer
    ping_waiters: dict[int, asyncio.Future[None]] = field(default_factory=dict)  # ping id -> pong

    def on_message(self, kind: str, payload: Any) -> None:
        if kind == "ready":
            if self.ready is not None and not self.ready.done():
                self.ready.set_result(None)
        elif kind == "error":
            if self.ready is not None and not self.ready.done():
                self.ready.set_exception(WorkerStartError(f"proxy worker {self.index}: {payload}"))
            else:
                log.error("proxy worker %d: %s", self.index, payload)
        elif kind == "pong":
            fut = self.ping_waiters.pop(payload, None)
            if fut is not None and not fut.done():
                fut.set_result(None)
        elif kind == "stats":
            fut = self.stats_waiters.pop(payload.get("id", -1), None)
            if fut is not None and not fut.done():
                fut.set_result(payload)
        elif kind == "gone":
            for fut in self.stats_waiters.values():
                if not fut.done():
                    fut.set_exception(WorkerStartError(f"proxy worker {self.index} is gone ({payload})"))
            self.stats_waiters.clear()
            if self.ready is not None and not self.ready.done():
                self.ready.set_exception(
                    WorkerStartError(f"proxy worker {self.index} exited before it was ready ({payload})")
                )

    def send(self, data: bytes) -> None:
        if self.channel is not None and self.channel.transport is not None and not self.channel.transport.is_closing():
            self.channel.transport.write(data)


class WorkerPool:
    def __init__(self, settings: ProxySettings) -> None:
        if settings.workers < 1:
            raise ValueError(f"settings.workers must be >= 1, got {settings.workers}")
        self.settings = settings
        self._workers = [_Worker(i) for i in range(settings.workers)]
        self._snapshot: Snapshot | None = None
        self._certs: Certs | None = None
        self._stopping = False
        self._gave_up = False
        self._stats_id = 0
        # Outbound, inbound, HBONE (nodeagent.proxy.proxy.LISTENER_NAMES), shared by
        # every worker: set by the agent under systemd (opened once, kept in the fd
        # store across restarts). Empty: each worker binds its own (SO_REUSEPORT), and
        # when every worker is down nothing listens, so capture refuses at once.
        self.listeners: list[socket.socket] = []

    async def start(self) -> None:
        """Spawn every worker; returns once each has its listeners (shared or bound
        by itself)."""
        try:
            await asyncio.gather(*(self._spawn(w) for w in self._workers))
        except BaseException:
            await self.stop(timeout=2.0)
            raise
        for w in self._workers:
            w.watcher = asyncio.get_running_loop().create_task(self._watch(w))

    async def _spawn(self, w: _Worker) -> None:
        loop = asyncio.get_running_loop()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        fds = [sk.fileno() for sk in self.listeners]
        try:
            w.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "nodeagent.proxy.worker", str(child.fileno()), str(w.index),
                ",".join(map(str, fds)), pass_fds=(child.fileno(), *fds),
            )
        finally:
            child.close()
        w.ready = loop.create_future()
        _, w.channel = await loop.create_unix_connection(lambda: _Channel(w), sock=parent)
        w.send(frame("settings", self.settings))
        if self._snapshot is not None:
            w.send(frame("snapshot", self._snapshot))
        if self._certs is not None:
            w.send(frame("certs", self._certs))
        try:
            await asyncio.wait_for(w.ready, READY_TIMEOUT_S)
        except TimeoutError:
            raise WorkerStartError(f"proxy worker {w.index} did not report ready within {READY_TIMEOUT_S:g}s") from None

    async def _watch(self, w: _Worker) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while not self._stopped():
            if w.proc is None:
                return
            started = loop.time()
            rc = await w.proc.wait()
            if self._stopped():
                return
            if loop.time() - started > HEALTHY_AFTER_S:
                w.restarts = 0  # it ran long enough: back off from scratch
            delay = RESTART_BACKOFF_S[min(w.restarts, len(RESTART_BACKOFF_S) - 1)]
            # Test hook: a fixed, longer restart delay makes proxy-down windows observable.
            delay = float(os.environ.get(RESTART_DELAY_ENV, "") or delay)
            log.error("proxy worker %d (pid %d) exited with %s; restarting in %.1fs", w.index, w.proc.pid, rc, delay)
            w.restarts += 1
            await asyncio.sleep(delay)
            if self._stopped():
                return
            try:
                spawned = loop.time()
                await self._spawn(w)  # gets the last snapshot and certs
                failures = 0
                # How long a start takes is what a proxy-down window is made of (cold disks,
                # a loaded machine): said here so a slow one can be told from a slow restart policy.
                log.info("proxy worker %d restarted (pid %d): ready %.2fs after spawn",
                         w.index, w.proc.pid if w.proc else -1, loop.time() - spawned)
            except Exception as e:  # noqa: BLE001 - any failure to respawn is counted and logged
                failures += 1
                log.error("restarting proxy worker %d failed (%d in a row): %s", w.index, failures, e)
                if failures >= MAX_RESTART_FAILURES:
                    self._gave_up = True
                    return

    def publish(self, snapshot: Snapshot | None = None, certs: Certs | None = None) -> None:
        if snapshot is not None:
            self._snapshot = snapshot
            msg = frame("snapshot", snapshot)
            for w in self._workers:
                w.send(msg)
        if certs is not None:
            self._certs = certs
            msg = frame("certs", certs)
            for w in self._workers:
                w.send(msg)

    async def stats(self, request: Any, timeout: float = 2.0) -> list[Any]:
        """Ask every running worker for its telemetry (nodeagent.observe.telemetry.worker_stats);
        a worker that does not answer in time is left out."""
        loop = asyncio.get_running_loop()
        futs = []
        for w in self._workers:
            if w.proc is None or w.proc.returncode is not None or w.channel is None:
                continue
            fut: asyncio.Future[Any] = loop.create_future()
            self._stats_id += 1
            w.stats_waiters[self._stats_id] = fut
            w.send(frame("stats", {**request, "id": self._stats_id}))
            futs.append(fut)
        done, pending = await asyncio.wait(futs, timeout=timeout) if futs else (set(), set())
        for fut in pending:
            fut.cancel()
        for w in self._workers:  # forget unanswered requests (a late answer is dropped)
            for rid in [rid for rid, f in w.stats_waiters.items() if f.done()]:
                del w.stats_waiters[rid]
        return [f.result() for f in futs if f in done and not f.cancelled() and f.exception() is None]

    async def unresponsive(self, timeout: float) -> list[int]:
        """Indexes of running workers whose event loop did not answer a ping within
        `timeout` (stopped, wedged or spinning); the agent's systemd watchdog is fed
        only while this is empty. A worker being restarted is not running: skipped."""
        loop = asyncio.get_running_loop()
        asked: dict[int, asyncio.Future[None]] = {}
        for w in self._workers:
            if w.proc is None or w.proc.returncode is not None or w.channel is None:
                continue
            self._stats_id += 1
            fut: asyncio.Future[None] = loop.create_future()
            w.ping_waiters[self._stats_id] = fut
            w.send(frame("ping", self._stats_id))
            asked[w.index] = fut
        if asked:
            await asyncio.wait(asked.values(), timeout=timeout)
        late = []
        for w in self._workers:
            answer = asked.get(w.index)
            if answer is None:
                continue
            if not answer.done():
                answer.cancel()
                late.append(w.index)
            w.ping_waiters = {k: f for k, f in w.ping_waiters.items() if not f.done()}
        return late

    def _stopped(self) -> bool:
        # A call, not the attribute: stop() flips it while _watch awaits.
        return self._stopping

    def alive(self) -> bool:
        """False once the pool has given up restarting a worker (the agent then exits);
        a worker being restarted still counts as alive."""
        return not self._gave_up and not self._stopping

    def up(self) -> int:
        """How many workers are running now."""
        return sum(1 for w in self._workers if w.proc is not None and w.proc.returncode is None)

    def pids(self) -> list[int]:
        return [w.proc.pid for w in self._workers if w.proc is not None and w.proc.returncode is None]

    def drain(self, handover_wait_s: float, timeout_s: float) -> list[int]:
        """A restart: every worker outlives the agent (systemd's KillMode=process
        leaves it be), keeps accepting until the next agent's workers serve (it
        sends SIGUSR2; at most handover_wait_s), then stops accepting and exits
        once its last connection ended, at most timeout_s later. Returns the
        draining workers' pids."""
        self._stopping = True
        pids = []
        for w in self._workers:
            if w.watcher is not None:
                w.watcher.cancel()
            if w.proc is not None and w.proc.returncode is None:
                w.send(frame("drain", (handover_wait_s, timeout_s)))
                pids.append(w.proc.pid)
        for sk in self.listeners:
            sk.close()
        return pids

    async def stop(self, timeout: float = 5.0) -> None:
        self._stopping = True
        for w in self._workers:
            if w.watcher is not None:
                w.watcher.cancel()
            w.send(frame("stop", None))
        for w in self._workers:
            if w.proc is None or w.proc.returncode is not None:
                continue
            try:
                await asyncio.wait_for(w.proc.wait(), timeout)
            except TimeoutError:
                log.warning("proxy worker %d did not stop within %.1fs: killing it", w.index, timeout)
                w.proc.kill()
                await w.proc.wait()
        for w in self._workers:
            if w.channel is not None and w.channel.transport is not None:
                w.channel.transport.close()
        for sk in self.listeners:
            sk.close()

    def __repr__(self) -> str:
        states = ", ".join(
            f"#{w.index} pid {w.proc.pid if w.proc else '-'} "
            f"{'up' if w.proc and w.proc.returncode is None else 'down'} restarts {w.restarts}"
            for w in self._workers
        )
        return f"<WorkerPool [{states}]>"


# --- worker side ------------------------------------------------------------------------------------
PR_SET_PDEATHSIG = 1


def _die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Die with the agent (sig 0: outlive it, while draining)."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")


async def _worker_main(fd: int, index: int, listener_fds: list[int]) -> None:
    from .proxy import NodeProxy  # imported in the worker only

    loop = asyncio.get_running_loop()
    sock = socket.socket(fileno=fd)
    stop = asyncio.Event()
    proxy: NodeProxy | None = None
    pending: list[tuple[str, Any]] = []
    settings_box: list[ProxySettings] = []
    drain_box: list[tuple[float, float]] = []
    configured = asyncio.Event()  # a snapshot arrived: connections can be served
    # SIGUSR2 from the next agent: its workers accept now (only acted on while draining).
    handed_over = asyncio.Event()
    loop.add_signal_handler(signal.SIGUSR2, handed_over.set)

    class Ctl(asyncio.Protocol):
        def __init__(self) -> None:
            self.framer = _Framer()
            self.t: Any = None

        def connection_made(self, transport: Any) -> None:
            self.t = transport

        def data_received(self, data: bytes) -> None:
            for kind, payload in self.framer.feed(data):
                if kind == "settings":
                    settings_box.append(payload)
                elif kind == "ping":  # answered by this loop: a wedged worker stays silent
                    self.t.write(frame("pong", payload))
                elif kind == "stop":
                    stop.set()
                elif kind == "drain":
                    drain_box.append((float(payload[0]), float(payload[1])))
                    stop.set()
                elif proxy is None:
                    pending.append((kind, payload))
                else:
                    apply(kind, payload)

        def connection_lost(self, exc: Exception | None) -> None:
            stop.set()  # the agent went away

    def apply(kind: str, payload: Any) -> None:
        if proxy is None:
            return
        if kind == "snapshot":
            proxy.update(snapshot=payload)
            configured.set()
        elif kind == "certs":
            for err in proxy.update(certs=payload):
                ctl.t.write(frame("error", err))
        elif kind == "stats":
            from nodeagent.observe.telemetry import worker_stats

            ctl.t.write(frame("stats", worker_stats(proxy, index, payload)))

    _, ctl = await loop.create_unix_connection(Ctl, sock=sock)
    while not settings_box and not stop.is_set():
        await asyncio.sleep(0.01)
    if stop.is_set():
        return
    settings = settings_box[0]
    logging.basicConfig(level=logging.INFO, format=f"proxy[{index}] %(levelname)s %(name)s: %(message)s")
    proxy = NodeProxy(settings)
    # The snapshot and certs first: kept listeners may hold queued connections that
    # are accepted as soon as start() returns.
    for kind, payload in pending:
        apply(kind, payload)
    kept = [socket.socket(fileno=lfd) for lfd in listener_fds] if listener_fds else None
    if kept is not None:
        # The agent bound the listeners (nothing left to fail here). Accept only once
        # a snapshot is here: until then connections wait in the listen queue (capture
        # kept across a kill -9 sends them here) rather than being accepted and closed.
        ctl.t.write(frame("ready", os.getpid()))
        waits = [loop.create_task(configured.wait()), loop.create_task(stop.wait())]
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
        for t in waits:
            t.cancel()
        if not configured.is_set():
            return
    try:
        await proxy.start(kept)
    except OSError as e:
        ctl.t.write(frame("error", str(e)))
        await asyncio.sleep(0.1)
        return
    if kept is None:
        ctl.t.write(frame("ready", os.getpid()))
    # eBPF capture decides fail-open/closed in the kernel from a heartbeat this
    # loop writes (nodeagent/capture/heartbeat.py; idle unless the map is pinned).
    from nodeagent.capture import heartbeat

    beating = loop.create_task(heartbeat.run(stop), name="ebpf-heartbeat")
    dump_dir = os.environ.get("NODEMESH_TRACEMALLOC_DIR")
    # Leak hunting (bench/soak.py --tracemalloc): snapshots every 20 s.
    dumps = loop.create_task(_tracemalloc_dumps(dump_dir)) if dump_dir else None
    await stop.wait()
    if dumps is not None:
        dumps.cancel()
    await beating
    if drain_box:
        _die_with_parent(0)  # the agent exits now; this worker ends with its last connection
        wait_s, drain_s = drain_box[0]
        try:
            await asyncio.wait_for(handed_over.wait(), wait_s)
        except TimeoutError:
            log.warning("the next agent's workers did not take over within %.0fs: draining anyway", wait_s)
        log.info("draining: no new connections; %d open, up to %.0fs", proxy.open_connections(), drain_s)
        left = await proxy.drain(drain_s)
        log.log(logging.WARNING if left else logging.INFO, "drained%s",
                f": closing {left} connection(s) still open at the drain deadline" if left else "")
    await proxy.stop()


async def _tracemalloc_dumps(directory: str, period_s: float = 20.0) -> None:
    """Trace allocations (12 frames) and dump a snapshot every period into
    directory/w<pid>-<n>.snap; slow (tracing costs several times the CPU)."""
    import tracemalloc

    tracemalloc.start(12)
    n = 0
    while True:
        await asyncio.sleep(period_s)
        n += 1
        tracemalloc.take_snapshot().dump(os.path.join(directory, f"w{os.getpid()}-{n:04d}.snap"))


def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: python -m nodeagent.proxy.worker <control fd> <index> [<listener fd>,...]", file=sys.stderr)
        return 2
    _die_with_parent()
    # The agent owns shutdown order (capture is removed before workers stop), so
    # signals sent to the whole process group (systemd, Ctrl-C, SIGHUP reload)
    # must not stop a worker: it stops on the control channel's "stop" or EOF.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    if os.getppid() == 1:
        return 1  # the agent died before prctl took effect
    import uvloop

    listeners = [int(x) for x in argv[2].split(",") if x] if len(argv) == 3 else []
    uvloop.run(_worker_main(int(argv[0]), int(argv[1]), listeners))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
