"""The agent's supervisor: starts the proxy workers, the registry session, the
xDS client and the certificate manager, installs capture only once the proxy can
serve, and on shutdown removes capture before anything else stops. Under systemd
a restart hands over instead (nodeagent/supervision/handover.py): capture and the listening
sockets stay, the old workers drain, and the next agent serves from the kept
listeners, snapshot and certificates before the control plane answers.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import ipaddress
import json
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import nodemesh
from nodeagent.capture import select as capture_select
from nodeagent.capture.base import AgentFailover, CaptureBackend, CaptureError, ProxyState
from nodeagent.capture.failover import Failover
from nodeagent.config import AgentConfig, ConfigError, load_config
from nodeagent.cpregistration import RegistrySession, registration_from_config
from nodeagent.dns.dnsserver import DnsServer, dns_server_for
from nodeagent.identity.certs import CertManager, grpc_issuer
from nodeagent.meshview.snapshot import LocalWorkload, Snapshot, SnapshotError
from nodeagent.proxy.proxy import LISTENER_NAMES, open_listeners
from nodeagent.supervision import handover
from nodeagent.supervision.settings import Certs, ProxySettings
from nodeagent.xds.client import AdsClient
from nodemesh.sdnotify import Notifier, listen_fds

log = logging.getLogger("nodeagent")

HEALTH_CHECK_S = 1.0
# How often a workload whose cgroup does not exist yet is looked for again.
CGROUP_RETRY_S = 1.0
# How long capture waits for the control plane to list this node's own workloads.
OWN_WORKLOADS_WAIT_S = 5.0
# How long a reload waits for new workloads' snapshot and SVIDs before capturing them.
RELOAD_WAIT_S = 10.0


class AgentError(RuntimeError):
    def __init__(self, reason: str, message: str) -> None:
        self.reason = reason
        super().__init__(message)


class Pool(Protocol):
    """What the supervisor needs of nodeagent.proxy.worker.WorkerPool."""

    async def start(self) -> None: ...
    async def stop(self) -> None: ...
    def publish(self, *, snapshot: Snapshot, certs: Certs) -> None: ...
    def alive(self) -> bool: ...


def _default_pool(settings: ProxySettings) -> Pool:
    from nodeagent.proxy.worker import WorkerPool

    pool: Pool = WorkerPool(settings)
    return pool


def resolve_control_plane(config: AgentConfig) -> tuple[str, ...]:
    """CIDRs of a control plane named by host name (IP literals need no DNS)."""
    host = config.control_plane.host
    if not host or config.control_plane_exclusions():
        return ()
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise AgentError("control_plane_unresolved",
                         f"cannot resolve control plane host {host!r} ({e}): is DNS or /etc/hosts set up "
                         "on this node?") from None
    ips = {str(info[4][0]) for info in infos}
    return tuple(sorted(f"{ip}/{ipaddress.ip_address(ip).max_prefixlen}" for ip in ips))


def cgroup2_root() -> str:
    """The cgroup v2 mount workload cgroup paths are relative to ("" if none)."""
    from nodeagent.capture import bpfnode

    try:
        return bpfnode.cgroup2_mount()
    except CaptureError:
        return ""


def split_by_cgroup(workloads: tuple[LocalWorkload, ...]) -> tuple[tuple[LocalWorkload, ...],
                                                                  tuple[LocalWorkload, ...]]:
    """(workloads capture can select now, workloads whose declared cgroup does
    not exist). iptables refuses a whole ruleset naming a missing cgroup and a
    cgroup attach needs the directory, so the missing ones wait."""
    if not any(w.cgroup for w in workloads):
        return workloads, ()
    root = cgroup2_root()
    if not root:
        return workloads, ()  # cannot tell: let capture report it
    missing = tuple(w for w in workloads if w.cgroup and not os.path.isdir(os.path.join(root, w.cgroup.strip("/"))))
    return tuple(w for w in workloads if w not in missing), missing


def identities_for(snapshot: Snapshot) -> set[str]:
    return {snapshot.identity_of(lw) for lw in snapshot.local_workloads}


class Agent:
    def __init__(self, config: AgentConfig, *, config_path: str | None = None,
                 pool_factory: Callable[[ProxySettings], Pool] = _default_pool) -> None:
        self.config = config
        self.config_path = config_path
        self._pool_factory = pool_factory
        self.state_dir = Path(config.state_dir)
        self.settings = config.proxy_settings(resolve_control_plane(config))
        # systemd (Type=notify, nodemesh install): READY once capture serves, RELOADING
        # around SIGHUP, STOPPING, and the watchdog fed only while every worker answers.
        self.notifier = Notifier()
        if config.capture.mode in ("ebpf", "auto"):
            # bcc compiles bpf/ now (seconds; the first start on a machine also merges the
            # kernel headers): say so rather than look dead (status.json, systemctl status).
            self._early_status("compiling BPF programs")
        self.capture = self._capture_for(config)
        self.snapshot: Snapshot | None = None
        self.certs: Certs | None = None
        self.capture_installed = False
        self.capture_error = ""
        self.phase = "starting"
        self._stop = asyncio.Event()
        self._ready_changed = asyncio.Event()
        self._published: tuple[str, int] | None = None
        self.pool: Pool | None = None
        self.ads: AdsClient | None = None
        self.registry: RegistrySession | None = None
        self.cert_manager: CertManager | None = None
        self.admin: Any = None  # nodeagent.supervision.admin.AdminServer, once started
        self.dns: DnsServer | None = None  # mesh DNS (nodeagent/dns), started after the first snapshot
        self.dns_failed = False
        self.health: Any = None  # nodeagent.observe.healthprober.HealthMonitor, once the registry session exists
        self.vip_route = ""  # the service VIP range this agent routed to lo while capturing
        # Restarts (nodeagent/handover.py): what the previous agent kept for this one, and
        # the memfd the next one reads the last snapshot and certificates from.
        self.resumed = False
        self.kept_listeners = False
        self.state_store = handover.StateStore(self.notifier)
        self.draining_pids: list[int] = []
        self._background: set[asyncio.Task[None]] = set()

    def _capture_for(self, config: AgentConfig) -> CaptureBackend:
        # Port 53 is captured only while the DNS proxy serves (docs/dns.md).
        dns_port = config.dns.port if config.dns.enabled and not getattr(self, "dns_failed", False) else None
        # `auto` probes once; later rebuilds (reload, DNS failure) keep that backend.
        mode = getattr(self, "capture_mode", "") or config.capture.mode
        present, missing = split_by_cgroup(config.local_workloads())
        self._note_pending(missing)
        choice = capture_select.choose(mode, self.settings, present,
                                       failure_policy=config.capture.failure_policy, dns_port=dns_port)
        if not getattr(self, "capture_mode", ""):
            self.capture_mode, self.capture_reason = choice.mode, choice.reason
            log.info("capture backend %s (%s), inbound %s, failurePolicy %s", choice.mode, choice.reason,
                     self.settings.inbound_mode, config.capture.failure_policy)
        if not hasattr(self, "failover"):
            # eBPF: live = listener AND the workers' kernel heartbeat is fresh (a hung proxy too).
            self.failover = Failover(config.capture.failure_policy, self.settings.outbound_port,
                                     probe=self._proxy_serving)
            if choice.mode == "ebpf":
                from nodeagent.capture import bpfprobe

                self.failover = Failover(config.capture.failure_policy, self.settings.outbound_port,
                                         probe=bpfprobe.proxy_probe())
        self.failover.failure_policy = config.capture.failure_policy
        return choice.backend

    def _proxy_serving(self, port: int) -> bool:
        """iptables/nftables failover: the outbound port listens AND a worker runs to
        accept from it (the agent and systemd's fd store keep the listening socket open
        when every worker has died, so the socket alone no longer tells)."""
        from nodeagent.capture import liveness

        up = getattr(getattr(self, "pool", None), "up", None)
        return liveness.listening(port) and (up is None or up() > 0)

    def _note_pending(self, missing: tuple[LocalWorkload, ...]) -> None:
        """Workloads whose cgroup does not exist (yet): named once each, captured
        when it appears (_watch_cgroups), never a reason to capture nobody."""
        before = {w.key for w in getattr(self, "pending", ())}
        self.pending = missing
        for w in missing:
            if w.key not in before:
                log.error("workload %s: its cgroup %r does not exist (yet) under the cgroup v2 mount %s; capturing "
                          "the other workloads, and this one as soon as the cgroup appears (cgroup paths are "
                          "relative to the cgroup v2 mount, e.g. system.slice/web.service)",
                          w.key, w.cgroup, cgroup2_root() or "?")
        for key in before - {w.key for w in missing}:
            log.info("workload %s: its cgroup appeared; capturing it", key)

    async def _watch_cgroups(self) -> None:
        """Every CGROUP_RETRY_S while a declared cgroup is missing: once it exists,
        rebuild capture with it (the running capture stays meanwhile)."""
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), CGROUP_RETRY_S)
            if self._stop.is_set() or not self.pending or not self.capture_installed:
                continue
            _, missing = split_by_cgroup(self.config.local_workloads())
            if {w.key for w in missing} != {w.key for w in self.pending}:
                self.capture = self._capture_for(self.config)
                await self._install_capture()
                # The workers resolve cgroup ids once per snapshot: send it again so
                # they recognise the new cgroup's connections as that workload's.
                self._published = None
                self._publish()

    # ------------------------------------------------------------ status file

    def status(self) -> dict[str, Any]:
        certs = self.certs.svids if self.certs else {}
        return {
            "pid": os.getpid(),
            "agent_version": nodemesh.__version__,
            "node": self.config.node.name,
            "phase": self.phase,
            "capture_installed": self.capture_installed,
            "capture_error": self.capture_error,
            "capture_pending": [{"workload": w.key, "cgroup": w.cgroup, "reason": "cgroup does not exist"}
                                for w in getattr(self, "pending", ())],
            "capture_backend": self.capture_mode,
            "capture_backend_reason": self.capture_reason,
            "capture_inbound": self.settings.inbound_mode,
            **self.failover.status(),
            "snapshot_version": self.snapshot.version if self.snapshot else "",
            "certs": {
                ident: {"not_after_unix": svid.not_after_unix,
                        "not_after": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(svid.not_after_unix))}
                for ident, svid in certs.items()
            },
            "certs_version": self.certs.version if self.certs else 0,
            "control_plane_connected": bool(self.ads and self.ads.connected),
            "registry_connected": bool(self.registry and self.registry.connected),
            # What the control plane refused this node, and why (identity bindings, addresses, revocation).
            "refusals": self._refusals(),
            "workers_alive": bool(self.pool and self.pool.alive()),
            "dns_listening": bool(self.dns and self.dns.listening),
            "workers_up": self.pool.up() if self.pool is not None and hasattr(self.pool, "up") else 0,
            "health": [dataclasses.asdict(v) for v in self.health.verdicts()] if self.health is not None else [],
            "updated_unix": time.time(),
        }

    def _refusals(self) -> list[str]:
        out = [f"registration: {self.registry.last_refusal}"] if self.registry and self.registry.last_refusal else []
        refused = self.cert_manager.refusals if self.cert_manager is not None else {}
        return out + [f"certificate {ident}: {why}" for ident, why in sorted(refused.items())]

    def _early_status(self, phase: str) -> None:
        """Before the agent is set up enough for status(): the phase alone."""
        self.notifier.status(phase)
        log.info("%s", phase)
        self.write_status({"pid": os.getpid(), "agent_version": nodemesh.__version__, "node": self.config.node.name,
                           "phase": phase, "capture_installed": False, "updated_unix": time.time()})

    def write_status(self, status: dict[str, Any] | None = None) -> None:
        """Atomically replace stateDir/status.json (the CLI and tests read it)."""
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            tmp = self.state_dir / "status.json.tmp"
            tmp.write_text(json.dumps(status or self.status(), indent=2, sort_keys=True) + "\n")
            os.replace(tmp, self.state_dir / "status.json")
            (self.state_dir / "agent.pid").write_text(f"{os.getpid()}\n")
        except OSError as e:
            log.warning("cannot write status to %s (%s): is stateDir writable?", self.state_dir, e)

    # ------------------------------------------------------------ callbacks

    def _on_snapshot(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot
        if self.health is not None:
            self.health.set_snapshot(snapshot)  # active checks on this node's endpoints
        if self.dns is not None:
            self.dns.set_snapshot(snapshot)
        if self.cert_manager is not None:
            self.cert_manager.set_identities(identities_for(snapshot), snapshot.mesh.trust_bundle)
        self._publish()
        # With kept listeners, connections queued while no agent ran are answered as soon as
        # the workers have this snapshot: their VIP must be routed again by then.
        if (self.capture_installed or self.kept_listeners) and snapshot.mesh.vip_cidr != self.vip_route:
            t = asyncio.get_running_loop().create_task(self._route_vips())
            self._background.add(t)
            t.add_done_callback(self._background.discard)

    def _on_certs(self, certs: Certs) -> None:
        if self.resumed and self.certs is not None and self.snapshot is not None:
            # The certificate manager issues one identity at a time: until it holds them
            # all, the carried SVIDs fill in (a partial set would fail mTLS for the rest).
            missing = identities_for(self.snapshot) - set(certs.svids)
            if missing:
                kept = {i: svid for i, svid in self.certs.svids.items() if i in missing}
                certs = dataclasses.replace(certs, svids={**kept, **certs.svids})
            else:
                self.resumed = False  # a complete fresh set: the carried one is done with
        self.certs = certs
        self._publish()

    def _on_connection(self, _connected: bool) -> None:
        self.write_status()

    def _own_workloads_visible(self) -> bool:
        if self.snapshot is None:
            return False
        seen = {(w.node, w.namespace, w.name) for w in self.snapshot.workloads}
        return all((self.config.node.name, lw.namespace, lw.name) in seen
                   for lw in self.snapshot.local_workloads)

    def _certs_complete(self) -> bool:
        if self.snapshot is None or self.certs is None:
            return False
        return identities_for(self.snapshot) <= set(self.certs.svids)

    def _publish(self) -> None:
        """Hand the workers the current snapshot and certs, once both are known."""
        if self.pool is not None and self.snapshot is not None and self.certs is not None:
            key = (self.snapshot.version, self.certs.version)
            if key != self._published:
                self.pool.publish(snapshot=self.snapshot, certs=self.certs)
                self._published = key
                self.state_store.save(self.snapshot, self.certs)
                log.info("published snapshot %s and certs v%d to the proxy workers",
                         self.snapshot.version, self.certs.version)
        self._ready_changed.set()
        self.write_status()

    # ------------------------------------------------------------ capture

    async def _install_capture(self) -> None:
        again = self.capture_installed  # a reload or a cgroup that appeared: our own rules, re-rendered
        try:
            await asyncio.to_thread(self.capture.install)
        except CaptureError as e:
            self.capture_installed = False
            self.capture_error = str(e)
            if self.config.capture.failure_policy == "closed":
                raise AgentError("capture_failed", f"cannot install capture (failurePolicy closed): {e}") from None
            log.error("cannot install capture; workloads' traffic flows unmeshed (failurePolicy open): %s", e)
            return
        self.capture_installed = True
        self.capture_error = ""
        found = getattr(self.capture, "replaced", "")
        if found and not again:
            if self.resumed:
                log.info("capture: took over the rules the previous agent kept across the restart (%s)", found)
            elif self.config.capture.failure_policy == "closed":
                log.info("capture: replacing the rules a previous agent left refusing (failurePolicy closed: %s)",
                         found)
            else:
                log.warning("capture: replacing leftover rules of an agent that did not remove them (%s)", found)
        log.info("capture installed: traffic of %d workload(s) now goes through the proxy",
                 len(getattr(self.capture, "workloads", ())))
        await self._route_vips()

    async def _route_vips(self) -> None:
        """Make the service VIP range routable while capture is installed (a node
        without a default route would fail connect() before capture sees it)."""
        cidr = self.snapshot.mesh.vip_cidr if self.snapshot is not None else ""
        if not cidr or cidr == self.vip_route:
            return
        from nodeagent.capture import policyroute

        try:
            if await asyncio.to_thread(policyroute.install_vip_route, cidr):
                log.info("routed the service VIP range %s to lo while capture is installed", cidr)
            self.vip_route = cidr
        except CaptureError as e:
            log.error("%s; on a node without a default route, connections to service VIPs fail", e)

    async def _start_dns(self) -> None:
        """Mesh DNS, once a snapshot exists. If it cannot listen, port 53 is not
        captured, so workloads keep the node's own DNS (never a dead port)."""
        if not self.config.dns.enabled or self.snapshot is None:
            return
        server = dns_server_for(self.config.dns, self.settings.mark)
        server.set_snapshot(self.snapshot)
        try:
            await server.start()
        except OSError as e:
            log.error("%s; mesh names will not resolve and port 53 is not captured", e)
            self.dns_failed = True
            self.capture = self._capture_for(self.config)
            return
        self.dns = server

    async def _remove_capture(self) -> None:
        from nodeagent.capture import policyroute

        # The VIP route first: a SYN to a VIP that capture no longer redirects would
        # be dropped on lo and retried for seconds; unrouted, connect() fails at once.
        try:
            for cidr in await asyncio.to_thread(policyroute.remove_vip_routes):
                log.info("removed the route of the service VIP range %s", cidr)
        except CaptureError as e:
            log.error("%s", e)
        self.vip_route = ""
        try:
            removed = await asyncio.to_thread(self.capture.remove)
            if removed:
                log.info("capture removed")
        except CaptureError as e:
            log.error("cannot remove capture: %s; run `nodemesh capture remove` in this network namespace", e)
        self.capture_installed = False

    # ------------------------------------------------------------ reload

    async def reload(self) -> None:
        """SIGHUP: reread the config; workloads and capture exclusions change in
        place, anything else needs a restart."""
        if not self.config_path:
            log.warning("SIGHUP ignored: the agent was not started from a config file")
            return
        self.notifier.reloading()
        try:
            await self._reload()
        finally:
            self.notifier.ready(self._ready_status())

    async def _await_serving(self, workloads: tuple[LocalWorkload, ...], timeout_s: float) -> None:
        """Wait (bounded) until the published snapshot lists `workloads` as local and
        the certificates cover every local identity."""
        want = {w.key for w in workloads}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s

        def serving() -> bool:
            have = {w.key for w in self.snapshot.local_workloads} if self.snapshot is not None else set()
            return want <= have and self._certs_complete() and self._published == (
                self.snapshot.version if self.snapshot else "", self.certs.version if self.certs else -1)

        while not serving() and not self._stop.is_set() and loop.time() < deadline:
            self._ready_changed.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready_changed.wait(), max(0.0, deadline - loop.time()))
        if not serving():
            log.warning("reload: capturing the new workload list although the proxy does not serve all of it yet "
                        "(waited %.0fs for its snapshot and certificates)", timeout_s)

    async def _reload(self) -> None:
        if not self.config_path:
            return
        try:
            new = load_config(self.config_path)
        except ConfigError as e:
            log.error("reload: %s; keeping the running config", e)
            return
        restart_only = [name for name, old, cur in (
            ("node", self.config.node, new.node), ("controlPlane", self.config.control_plane, new.control_plane),
            ("proxy", self.config.proxy, new.proxy), ("stateDir", self.config.state_dir, new.state_dir),
            ("capture.mode", self.config.capture.mode, new.capture.mode),
            ("capture.inbound/tproxyMark/tproxyTable",
             (self.config.capture.inbound, self.config.capture.tproxy_mark, self.config.capture.tproxy_table),
             (new.capture.inbound, new.capture.tproxy_mark, new.capture.tproxy_table)),
            ("dns", self.config.dns, new.dns)) if old != cur]
        if restart_only:
            log.warning("reload: changes to %s take effect only after a restart", ", ".join(restart_only))
        workloads = new.local_workloads()
        if self.ads is not None:
            try:
                self.ads.set_local_workloads(workloads)
            except SnapshotError as e:
                log.error("reload: the new workloads are inconsistent with the mesh (%s); keeping the old ones", e)
                return
        self.config = AgentConfig(node=self.config.node, control_plane=self.config.control_plane,
                                  # The workers' listeners follow the inbound mode: it changes on restart only.
                                  capture=dataclasses.replace(new.capture, inbound=self.config.capture.inbound,
                                                              tproxy_mark=self.config.capture.tproxy_mark,
                                                              tproxy_table=self.config.capture.tproxy_table),
                                  proxy=self.config.proxy, workloads=new.workloads,
                                  state_dir=self.config.state_dir, dns=self.config.dns)
        self.settings = self.config.proxy_settings(resolve_control_plane(self.config))
        self.capture = self._capture_for(self.config)
        if self.registry is not None:
            self.registry.update(registration_from_config(self.config))
        if self.capture_installed:
            # A new workload's connections are captured only once the proxy knows it and
            # holds its SVID: captured earlier, its first connections hung or got a 503.
            await self._await_serving(workloads, RELOAD_WAIT_S)
            await self._install_capture()
        log.info("reload: now serving %d local workload(s)", len(workloads))
        self.write_status()

    # ------------------------------------------------------------ main

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._request_stop, sig)
        reloads: set[asyncio.Task[None]] = set()

        def on_hup() -> None:
            t = loop.create_task(self.reload())
            reloads.add(t)
            t.add_done_callback(reloads.discard)

        loop.add_signal_handler(signal.SIGHUP, on_hup)
        tasks: list[asyncio.Task[None]] = []
        keep_capture = False
        restarting = False
        if self.notifier.watchdog_s:
            tasks.append(loop.create_task(self._feed_watchdog(), name="systemd-watchdog"))
        try:
            await self._start(tasks)
            await self._serve()
        except AgentError as e:
            # failurePolicy closed: a dead proxy must not let traffic bypass the mesh.
            keep_capture = e.reason == "workers_died" and self.config.capture.failure_policy == "closed"
            raise
        finally:
            if self._stop.is_set() and self.phase == "running" and self.notifier.enabled:
                restarting, why = await asyncio.to_thread(handover.restart_pending, handover.own_unit())
                log.info("SIGTERM: %s", f"a restart ({why})" if restarting else f"a stop ({why})")
            self.phase = "stopping"
            if restarting:
                self.notifier.stopping("restarting: capture and the listeners stay, the workers drain")
                keep_capture = True
            else:
                self.notifier.stopping("stopping: capture first, then the proxy workers")
            if (not keep_capture and self.capture_installed and self.config.capture.failure_policy == "closed"
                    and isinstance(self.capture, AgentFailover)):
                # Stop or restart under failurePolicy closed: workloads must never
                # go unmeshed, so leave capture refusing until the next agent
                # installs it again (`nodemesh capture remove` takes it away).
                try:
                    await asyncio.to_thread(self.capture.set_proxy_state, ProxyState.REFUSE)
                    keep_capture = True
                except CaptureError as err:
                    log.error("cannot switch capture to refuse on stop: %s", err)
            if restarting:
                log.info("restarting: capture stays in place; the next agent serves from the kept listeners")
            elif keep_capture:
                log.error("leaving capture installed (failurePolicy closed): workloads' connections "
                          "are refused until the agent is back")
            else:
                log.info("stopping: removing capture first, so workloads never point at a stopped proxy")
                await self._remove_capture()
            if self.dns is not None:
                await self.dns.stop()
            if self.pool is not None and restarting and hasattr(self.pool, "drain"):
                self.draining_pids = self.pool.drain(handover.HANDOVER_WAIT_S, handover.DRAIN_TIMEOUT_S)
                handover.note_draining(self.state_dir, self.draining_pids)
                log.info("proxy worker(s) %s accept until the next agent's workers serve, then drain their "
                         "connections (up to %gs)", ", ".join(map(str, self.draining_pids)), handover.DRAIN_TIMEOUT_S)
            elif self.pool is not None:
                log.info("stopping proxy workers")
                await self.pool.stop()
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.health is not None:
                await self.health.close()
            if self.cert_manager is not None:
                await self.cert_manager.close()
            if self.admin is not None:
                await self.admin.close()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
            self.phase = "stopped"
            self.write_status()
            log.info("agent stopped")

    def _request_stop(self, sig: int) -> None:
        log.info("received %s", signal.Signals(sig).name)
        self._stop.set()
        self._ready_changed.set()

    async def _start(self, tasks: list[asyncio.Task[None]]) -> None:
        cfg = self.config
        log.info("nodemesh agent %s starting: node %s (%s), control plane %s, %d workload(s)",
                 nodemesh.__version__, cfg.node.name, cfg.node.address, cfg.control_plane.address,
                 len(cfg.workloads))
        self.write_status()
        t0 = asyncio.get_running_loop().time()
        # What a previous agent of this unit kept in systemd's fd store (a restart, an
        # upgrade, or a crash): its listening sockets, snapshot and certificates.
        carried = handover.adopt(listen_fds(), self.settings, self.notifier) if self.notifier.enabled else None
        # Resumed: serving at once from the kept listeners, snapshot and certificates. Kept
        # listeners alone (no usable state) are still adopted: a second socket on the
        # same port would queue connections that nobody accepts.
        self.resumed = carried is not None and bool(carried.listeners) and carried.serving_state
        self.kept_listeners = carried is not None and bool(carried.listeners)
        if cfg.capture.failure_policy == "open" and not self.resumed:
            # Leftovers of a killed agent would send workloads to a proxy that is
            # not serving yet; until ready, let their traffic flow directly.
            await self._remove_capture()
        # (1) proxy workers first, so capture never points at nothing.
        self.pool = self._pool_factory(self.settings)
        if self.resumed and carried is not None:
            # Before the workers start: they accept the queued connections at once.
            self.snapshot, self.certs = carried.snapshot, carried.certs
            self._publish()
        if self.notifier.enabled and hasattr(self.pool, "listeners"):
            # Under systemd the listeners outlive this process (the fd store): adopted
            # from the previous agent, or opened here once and shared by the workers.
            if carried is not None and carried.listeners:
                self.pool.listeners = [carried.listeners[name] for name in LISTENER_NAMES]
            else:
                try:
                    self.pool.listeners = open_listeners(self.settings)
                except OSError as e:
                    raise AgentError("listen_failed", str(e)) from None
        if self.resumed:
            # Capture and the VIP route before the workers accept: connections queued in the
            # kept listeners while no agent ran (after a kill -9 under failurePolicy open,
            # ExecStopPost removed the route) are answered to a VIP the node routes again;
            # without the route those answers were lost and the callers hung.
            await self._install_capture()
        log.info("starting %d proxy worker(s)%s", self.settings.workers,
                 " on the listeners the previous agent kept" if carried is not None and carried.listeners else "")
        await self.pool.start()
        shared: list[socket.socket] = getattr(self.pool, "listeners", [])
        if self.notifier.enabled and shared:
            handover.store_listeners(self.notifier, shared)
        if self.resumed and carried is not None and carried.snapshot is not None and carried.certs is not None:
            # Serve now with what the previous agent served; the control plane's
            # answers replace it when they come.
            await self._start_dns()
            if self.dns_failed:
                await self._install_capture()  # again, without port 53
            self._begin_serving(tasks)
            log.info("serving %.2fs after start with the previous agent's listeners, snapshot %s and "
                     "certificates v%d", asyncio.get_running_loop().time() - t0, carried.snapshot.version,
                     carried.certs.version)
        await self._start_admin()
        # (2) control plane sessions, over a channel the node certificate authenticates
        # (nodeagent/identity/attest.py: joins with the one-time token, or reuses stateDir/node.pem).
        from nodeagent.identity.attest import AttestError, NodeAttestation

        self.attestation = NodeAttestation(cfg, self.state_dir)
        try:
            if not await self.attestation.ensure(self._stop):
                return
        except AttestError as e:
            raise AgentError(e.reason, str(e)) from None
        tasks.append(asyncio.get_running_loop().create_task(self.attestation.run(), name="node-cert"))
        target = cfg.control_plane.grpc_target
        self.cert_manager = CertManager(cfg.node.name, grpc_issuer(target), self._on_certs)
        self.ads = AdsClient(target, cfg.node.name, cfg.local_workloads(), self._on_snapshot,
                             zone=cfg.node.zone, on_connection=self._on_connection,
                             protocol=cfg.control_plane.xds_protocol,
                             depends_on=cfg.control_plane.depends_on or None)
        self.registry = RegistrySession(target, registration_from_config(cfg), on_connection=self._on_connection)
        if self.admin is not None:
            self.registry.telemetry = self.admin.telemetry_json  # heartbeats carry the mesh view's summary
        self.health = self._health_monitor(self.registry)
        loop = asyncio.get_running_loop()
        tasks.append(loop.create_task(self.registry.run(), name="registry"))
        tasks.append(loop.create_task(self.ads.run(), name="xds"))
        if self.phase == "running":
            return  # resumed: serving already; the control plane's answers replace the carried state
        self.phase = "waiting for snapshot and certificates"
        self.write_status()
        log.info("waiting for the first complete snapshot and certificates from %s", target)
        # (3) capture only once the proxy can actually serve.
        while not self._stop.is_set() and not self._certs_complete():
            self._ready_changed.clear()
            await self._ready_changed.wait()
        if self._stop.is_set():
            return
        # The first snapshot can predate this node's own registration: capturing
        # then would make its local services look endpoint-less for a moment.
        # Wait (bounded) until the mesh shows this node's workloads.
        deadline = loop.time() + OWN_WORKLOADS_WAIT_S
        while not self._stop.is_set() and not self._own_workloads_visible() and loop.time() < deadline:
            self._ready_changed.clear()
            try:
                await asyncio.wait_for(self._ready_changed.wait(), max(0.0, deadline - loop.time()))
            except TimeoutError:
                break
        if not self._own_workloads_visible():
            log.warning("installing capture although the control plane does not list this node's "
                        "workloads yet (waited %.0fs): is the registry session up?", OWN_WORKLOADS_WAIT_S)
        if self._stop.is_set():
            return
        self._publish()
        await self._start_dns()
        await self._install_capture()
        self._begin_serving(tasks)

    def _begin_serving(self, tasks: list[asyncio.Task[None]]) -> None:
        released = handover.release_draining(self.state_dir)
        if released:
            log.info("the previous agent's worker(s) %s stop accepting and drain", ", ".join(map(str, released)))
        # Watchdog: switch capture to bypass/refuse within ~POLL_S of the proxy's
        # listeners vanishing, and back once they return.
        tasks.append(asyncio.get_running_loop().create_task(self.failover.run(
            lambda: self.capture, lambda: self.capture_installed, self.write_status, self._stop), name="failover"))
        tasks.append(asyncio.get_running_loop().create_task(self._watch_cgroups(), name="pending-cgroups"))
        self.phase = "running"
        self.write_status()
        self.notifier.ready(self._ready_status())

    def _ready_status(self) -> str:
        capture = (f"capture {self.capture_mode} installed" if self.capture_installed
                   else f"capture NOT installed ({self.capture_error or 'see the log'})")
        return (f"serving: {capture}, snapshot {self.snapshot.version if self.snapshot else '-'}, "
                f"{len(self.config.local_workloads())} local workload(s)")

    async def _feed_watchdog(self) -> None:
        """WatchdogSec: ping systemd only while this loop runs AND every running
        proxy worker answers over its control channel, so a wedged worker (or a
        wedged agent) gets the unit restarted. A worker the pool is restarting
        is not counted against it."""
        interval = self.notifier.watchdog_s / 3
        while not self._stop.is_set():
            late: list[int] = []
            if self.pool is not None and hasattr(self.pool, "unresponsive"):
                late = await self.pool.unresponsive(timeout=interval)
            if late:
                log.error("proxy worker(s) %s did not answer within %.1fs: not feeding the systemd watchdog",
                          ", ".join(map(str, late)), interval)
            else:
                self.notifier.watchdog()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), interval)

    def _health_monitor(self, registry: RegistrySession) -> Any:
        """Active health checks of local endpoints, reported on the registry session."""
        from nodeagent.observe.healthprober import HealthMonitor, HealthVerdict
        from nodemesh.v1 import mesh_pb2

        def report(verdicts: list[HealthVerdict]) -> None:
            registry.set_health(mesh_pb2.HealthReport(endpoints=[
                mesh_pb2.EndpointHealth(workload=v.workload, port=v.port, healthy=v.healthy, detail=v.detail)
                for v in verdicts]))
            self.write_status()

        return HealthMonitor(report, mark=self.settings.mark)

    async def _start_admin(self) -> None:
        """The admin endpoint (nodeagent/supervision/admin.py); the mesh serves without it, so a
        port clash is reported, not fatal."""
        from nodeagent.supervision.admin import AdminServer

        admin = AdminServer(self, port=self.config.proxy.admin_port)
        try:
            await admin.start()
        except OSError as e:
            log.error("cannot serve the admin endpoint on 127.0.0.1:%d (%s): is another agent or process using "
                      "proxy.adminPort? metrics and the node CLI are unavailable", self.config.proxy.admin_port, e)
            return
        self.admin = admin

    async def _serve(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), timeout=HEALTH_CHECK_S)
            if self._stop.is_set():
                return
            if self.pool is not None and not self.pool.alive():
                raise AgentError("workers_died", "the proxy workers exited; see their log lines above")


async def run_agent(config: AgentConfig, config_path: str | None = None) -> None:
    """Run the agent until SIGTERM/SIGINT."""
    await Agent(config, config_path=config_path).run()
