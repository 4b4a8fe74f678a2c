"""The control plane process: one grpc.aio server with the config API, the
registry, the CA and ADS, and a publisher that rebuilds the xDS snapshot
whenever config or registry change."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import grpc

from controlplane import auth as cp_auth
from controlplane.api import ConfigServicer, current_mesh, current_services
from controlplane.ca import DEFAULT_CERT_TTL_S, MAX_CERT_TTL_S, CertificateAuthority, CertificateServicer
from controlplane.leader import Leadership
from controlplane.looplag import watch_loop_lag
from controlplane.metrics import ControlPlaneMetrics
from controlplane.nodeids import SvidRevocations
from controlplane.noderegistry import DEFAULT_LEASE_SECONDS, Lapse, NodeRegistry, RegistryServicer
from controlplane.policies import current_policies
from controlplane.rollout import controller as rollout_controller
from controlplane.rollout.readings import Readings
from controlplane.store import Store
from controlplane.xds import build_routes as xds_routes
from controlplane.xds.build import build_snapshot
from controlplane.xds.cache import SnapshotCache, XdsSnapshot
from controlplane.xds.server import SERVER_OPTIONS, AdsServicer, add_to_server
from nodemesh.revocation import RevocationList
from nodemesh.v1 import mesh_pb2_grpc

log = logging.getLogger("nodemesh.controlplane")

DEFAULT_LISTEN = "unix:/run/nodemesh/controlplane.sock"
DB_FILE = "nodemesh.db"
DEBOUNCE_S = 0.05
# A rebuild waits, after the debounce, until the streams have answered the previous
# push and then as long again as that took (SnapshotPublisher._hold), but never
# longer than this in all.
PUBLISH_HOLD_MAX_S = 2.0
HOLD_POLL_S = 0.02


@dataclass(frozen=True)
class ControlPlaneSettings:
    state_dir: str
    listen: tuple[str, ...] = (DEFAULT_LISTEN,)  # "host:port" or "unix:/path"
    lease_seconds: float = DEFAULT_LEASE_SECONDS
    default_cert_ttl_s: int = DEFAULT_CERT_TTL_S
    max_cert_ttl_s: int = MAX_CERT_TTL_S
    log_level: str = "INFO"
    debounce_s: float = DEBOUNCE_S
    expiry_interval_s: float = 1.0
    web_listen: str = ""  # the mesh view's HTTP "host:port"; "" = not served (controlplane/web)
    web_hosts: tuple[str, ...] = ()  # more names (or name:port) the mesh view answers to; Host is checked
    # TLS on TCP listeners, node and operator access (controlplane/auth.py, docs/security.md).
    sans: tuple[str, ...] = ()  # extra server-certificate names/IPs beyond the listen addresses
    node_cert_ttl_s: int = 12 * 3600  # hours, renewed at half life (controlplane/tokens.py)
    # The operator's intermediate CA (CertificateAuthority.from_files); "" = the self-signed root.
    ca_cert: str = ""
    ca_key: str = ""
    ca_chain: str = ""
    # Where config and registrations live: sqlite (one control plane) or etcd (several
    # replicas on one etcd; controlplane/store_etcd.py, docs/reference.md).
    store: str = "sqlite"
    etcd_endpoints: tuple[str, ...] = ()
    etcd_prefix: str = "/nodemesh"
    # Client TLS to etcd (https endpoints): etcd's CA, this control plane's certificate and key.
    etcd_ca: str = ""
    etcd_cert: str = ""
    etcd_key: str = ""
    etcd_server_name: str = ""

    def __post_init__(self) -> None:
        if self.store not in ("sqlite", "etcd"):
            raise ValueError(f"--store {self.store!r} must be sqlite or etcd")
        if self.store == "etcd" and not self.etcd_endpoints:
            raise ValueError("--store etcd needs --etcd-endpoints (e.g. http://127.0.0.1:2379)")
        if self.store == "etcd" and not self.ca_cert:
            # Every replica must sign SVIDs under one CA; a self-signed root per replica
            # would split the mesh, and the root's key is not something to put in etcd.
            raise ValueError("--store etcd (several control plane replicas) needs the operator intermediate CA: "
                             "give every replica the same --ca-cert, --ca-key and --ca-chain "
                             "(docs/security.md \"Operator CA\", docs/reference.md \"Store backends and replicas\")")
        if (self.etcd_ca or self.etcd_cert or self.etcd_key) and not (self.etcd_ca and self.etcd_cert
                                                                        and self.etcd_key):
            raise ValueError("--etcd-ca, --etcd-cert and --etcd-key go together: etcd's CA, this control plane's "
                             "client certificate and its key")
        if self.store == "etcd":
            from controlplane.etcd_client import grpc_target

            grpc_target(self.etcd_endpoints, self.etcd_tls())  # ValueError saying what to change
        if (self.ca_cert or self.ca_key or self.ca_chain) and not (self.ca_cert and self.ca_key and self.ca_chain):
            raise ValueError("--ca-cert, --ca-key and --ca-chain go together: the intermediate, its key, and "
                             "the certificates above it up to the operator's root")
        if not self.listen:
            raise ValueError("at least one listen address is needed (host:port or unix:/path)")
        if self.lease_seconds <= 0:
            raise ValueError("lease_seconds must be positive")
        if self.default_cert_ttl_s <= 0:
            raise ValueError("default_cert_ttl_s must be positive")

    def etcd_tls(self) -> Any:
        """controlplane.etcd_client.EtcdTLS when the etcd TLS files are given, else None."""
        if not self.etcd_ca:
            return None
        from controlplane.etcd_client import EtcdTLS

        return EtcdTLS(self.etcd_ca, self.etcd_cert, self.etcd_key, self.etcd_server_name)


class SnapshotPublisher:
    """Rebuilds the snapshot after changes, coalescing bursts: a change marks
    the snapshot dirty, and one rebuild follows `debounce_s` later, once the
    streams have answered the previous push and as long again has passed (so
    pushes take at most about half of the event loop), at most `max_hold_s`
    later still.

    The hold is what keeps a join storm from feeding itself: each rebuild is
    pushed to every connected stream, and each push costs the one event loop a
    response and an ACK per stream; rebuilding every `debounce_s` while a
    thousand nodes join kept that loop busy for minutes, so new calls waited in
    gRPC's queue until gRPC cancelled them (controlplane/looplag.py) and were
    retried. Holding the rebuild until the last push is answered makes the
    changes of a burst share one push; a change long after the last push
    never waits."""

    def __init__(self, store: Store, registry: NodeRegistry, cache: SnapshotCache,
                 trust_bundle: Callable[[], list[str]], debounce_s: float = DEBOUNCE_S,
                 in_flight: Callable[[], bool] | None = None, max_hold_s: float = PUBLISH_HOLD_MAX_S) -> None:
        self._store = store
        self._registry = registry
        self._cache = cache
        self._trust_bundle = trust_bundle
        self._debounce_s = debounce_s
        # True while the last push is still unanswered by the streams (ADS sync tracker).
        self._in_flight = in_flight
        self._max_hold_s = max_hold_s
        # Follows the last push until the streams have answered it: (published, answered) times.
        self._absorbing: asyncio.Task[tuple[float, float]] | None = None
        self._dirty = asyncio.Event()
        self.published = 0
        self.observer: Any = None  # controlplane.metrics.ControlPlaneMetrics: changed() / published(snap)
        # SVIDs every node refuses (controlplane/nodeids.py SvidRevocations.current).
        self.revocations: Callable[[], RevocationList] = RevocationList
        registry.subscribe(self.trigger)

    def trigger(self) -> None:
        if self.observer is not None:
            self.observer.changed()
        self._dirty.set()

    def _build(self) -> XdsSnapshot:
        return build_snapshot(current_mesh(self._store), current_services(self._store),
                              self._registry.nodes(), self._trust_bundle(),
                              current_policies(self._store), l7=xds_routes.load(self._store),
                              splits=rollout_controller.splits(self._store),
                              previous=self._cache.default_snapshot, revocations=self.revocations())

    def publish_now(self) -> None:
        """Build and publish at once, answering every watch before returning
        (start-up, and callers that need the new snapshot in force right away)."""
        snap = self._build()
        self._cache.set_default(snap)
        self.published += 1
        if self.observer is not None:
            self.observer.published(snap)
        log.debug("published xDS snapshot %d", self.published)

    async def publish(self) -> None:
        """Build, then fan out in batches with the event loop let through between
        them (SnapshotCache.publish_default), so pushes never hold up heartbeats
        or API calls."""
        snap = self._build()
        if self.observer is not None:
            self.observer.published(snap)
        result = await self._cache.publish_default(snap)
        self.published += 1
        if self.observer is not None:
            self.observer.fanned_out(result.seconds)
        log.debug("published xDS snapshot %d: %d of %d watches answered in %.3fs", self.published,
                  result.answered, result.examined, result.seconds)

    async def run(self) -> None:
        watcher = asyncio.create_task(self._watch_store())
        try:
            while True:
                await self._dirty.wait()
                await asyncio.sleep(self._debounce_s)
                await self._hold()
                self._dirty.clear()
                try:
                    published = asyncio.get_running_loop().time()
                    await self.publish()
                    if self._in_flight is not None:
                        self._absorbing = asyncio.create_task(self._absorbed(published))
                except Exception:
                    # Keep serving the last good snapshot; the next change retries.
                    log.exception("building the xDS snapshot failed; the previous one stays in force")
        finally:
            watcher.cancel()
            if self._absorbing is not None:
                self._absorbing.cancel()

    async def _absorbed(self, published: float) -> tuple[float, float]:
        """(published, answered): when the streams have answered the push made at
        `published` (or max_hold_s has passed: a client that never answers)."""
        loop = asyncio.get_running_loop()
        while self._in_flight is not None and self._in_flight() and loop.time() - published < self._max_hold_s:
            await asyncio.sleep(HOLD_POLL_S)
        return published, loop.time()

    async def _hold(self) -> None:
        """Wait until the previous push is answered, then as long again as that
        took; max_hold_s at most in all."""
        if self._absorbing is None:
            return
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        try:
            published, answered = await asyncio.wait_for(asyncio.shield(self._absorbing), self._max_hold_s)
            pause = answered + (answered - published) - loop.time()
            if pause > 0:
                await asyncio.sleep(min(pause, self._max_hold_s - (loop.time() - t0)))
        except TimeoutError:
            pass
        held = loop.time() - t0
        if held > 0.001 and self.observer is not None:
            self.observer.held(held)

    async def _watch_store(self) -> None:
        async for _ in self._store.watch(since_revision=self._store.revision()):
            self.trigger()


def _fanout(*sinks: Callable[[str, str], None]) -> Callable[[str, str], None]:
    """One heartbeat's telemetry to several readers (rollout analysis, the mesh view)."""
    def ingest(node: str, text: str) -> None:
        for sink in sinks:
            sink(node, text)
    return ingest


def _hold_slack(ads: AdsServicer) -> int:
    """Streams that may still owe an answer when the next rebuild goes ahead: a
    client that never answers (or a few slow ones) must not hold every push."""
    return 2 + ads.stats.streams_active // 50


def _replica_name(store: Store) -> str:
    replica = getattr(store, "replica_id", "")
    return f"control plane replica {replica}" if replica else "control plane"


def _expiry_recorder(metrics: ControlPlaneMetrics, audit: Any, principal: str) -> Callable[[Lapse], None]:
    """Each node this replica expires: counted by cause, and a line in the audit log
    naming the node and why (the registry logs it too)."""
    def record(lapse: Lapse) -> None:
        metrics.node_expired(lapse.cause)
        audit.append(f"{principal} (leader)", "ExpireNode", f"node {lapse.name}: {lapse.reason}", "ok")
    return record


def _bind_address(addr: str) -> str:
    if addr.startswith("unix:"):
        path = addr[len("unix:"):]
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        if os.path.exists(path):
            os.unlink(path)  # a stale socket from an earlier run
    return addr


async def start(settings: ControlPlaneSettings) -> ControlPlane:
    """Open state, build the first snapshot and start serving."""
    os.makedirs(settings.state_dir, exist_ok=True)
    from controlplane import store_etcd

    store = store_etcd.open_store(settings.store, sqlite_path=os.path.join(settings.state_dir, DB_FILE),
                                  etcd_endpoints=settings.etcd_endpoints, etcd_prefix=settings.etcd_prefix,
                                  node_lease_s=settings.lease_seconds, etcd_tls=settings.etcd_tls())
    try:
        mesh = current_mesh(store)
        if isinstance(store, store_etcd.EtcdStore):
            store.claim_cp_ca(settings.state_dir)  # one control-plane CA for every replica
        ca = (CertificateAuthority.from_files(settings.ca_cert, settings.ca_key, settings.ca_chain)
              if settings.ca_cert else CertificateAuthority.load_or_create(settings.state_dir, mesh.trust_domain))
    except BaseException:
        store.close()
        raise
    registry = NodeRegistry(store, settings.lease_seconds)
    leader = Leadership.sole()
    if isinstance(store, store_etcd.EtcdStore):
        # Registrations and health are shared: the other replicas' nodes count while etcd keeps them.
        restored = store_etcd.share_registry(store, registry)
        leader = Leadership()
        store.start_election(leader)
    else:
        restored = registry.restore()
    cache = SnapshotCache()
    # The bundle holds roots replaced by a rotation until their overlap ends (ca.py).
    ads = AdsServicer(cache)
    publisher = SnapshotPublisher(store, registry, cache, lambda: ca.trust_bundle, settings.debounce_s,
                                  in_flight=lambda: ads.sync.awaiting_answers() > _hold_slack(ads))
    cp_metrics = ControlPlaneMetrics()
    publisher.observer = cp_metrics
    security = cp_auth.Security.open(settings.state_dir, os.path.join(settings.state_dir, DB_FILE),
                                     settings.node_cert_ttl_s, store=store)
    # Revoked nodes' SVIDs, refused at every node's HBONE port (nodemesh/revocation.py).
    security.revocations = SvidRevocations(security.nodes, settings.max_cert_ttl_s)
    publisher.revocations = security.revocations.current
    publisher.publish_now()
    ads.sync.observer = cp_metrics
    registry_servicer = RegistryServicer(registry)
    registry_servicer.admit = security.admit_registration(lambda: current_mesh(store))

    server = grpc.aio.server(interceptors=[security.interceptor], options=SERVER_OPTIONS)
    security.register(server, ca, lambda: current_mesh(store).trust_domain, publisher.publish_now, registry)
    # The generated registration helpers carry no type hints.
    mesh_pb2_grpc.add_ConfigServiceServicer_to_server(  # type: ignore[no-untyped-call]
        ConfigServicer(store, workloads=lambda: [(w.namespace, dict(w.labels)) for n in registry.nodes()
                                                 for w in n.workloads],
                       proxy_status=ads.sync.rows), server)
    mesh_pb2_grpc.add_RegistryServicer_to_server(  # type: ignore[no-untyped-call]
        registry_servicer, server)
    mesh_pb2_grpc.add_CertificateServiceServicer_to_server(  # type: ignore[no-untyped-call]
        CertificateServicer(ca, registry, lambda: current_mesh(store).trust_domain,
                            settings.default_cert_ttl_s, settings.max_cert_ttl_s,
                            bound=security.identity_check(lambda: current_mesh(store)),
                            on_refusal=security.refusals.record, svid_epoch=security.svid_epoch), server)
    add_to_server(ads, server)
    bound = []
    token_bound: list[str] = []  # server-only TLS ports, after the listen addresses
    tls = None
    for addr in settings.listen:
        try:
            if addr.startswith("unix:"):
                cp_auth.prepare_unix_socket(addr[len("unix:"):])  # plaintext: local admin only
                with cp_auth.private_umask():  # the socket file is born 0600, never group-connectable
                    port = server.add_insecure_port(_bind_address(addr))
            else:
                # Mutual TLS here (agents, operator certificates); server-only TLS on the
                # next port (Join, bearer-token operators): controlplane/auth.py.
                tls = tls or security.server_credentials_for(settings.listen, settings.sans)
                port = server.add_secure_port(_bind_address(addr), tls[0])
                token_addr = cp_auth.token_port_address(addr)
                token_port = server.add_secure_port(token_addr, tls[1])
                token_bound.append(token_addr if not token_addr.endswith(":0")
                                   else f"{token_addr.rsplit(':', 1)[0]}:{token_port}")
        except RuntimeError as e:
            store.close()
            raise OSError(f"cannot listen on {addr}: {e}; check that the address is free and "
                          "the directory is writable") from e
        bound.append(addr if addr.startswith("unix:") or not addr.endswith(":0")
                     else f"{addr.rsplit(':', 1)[0]}:{port}")
    bound += token_bound
    with cp_auth.private_umask():  # in case the transport binds the unix socket only at start
        await server.start()
    for addr in bound:
        if addr.startswith("unix:"):
            cp_auth.secure_unix_socket(addr[len("unix:"):])
    # Rollouts (controlplane/rollout/): analysis reads the agents' heartbeat telemetry.
    readings = Readings()
    registry_servicer.on_telemetry = readings.ingest
    rollouts = rollout_controller.RolloutController(
        store, registry.nodes, lambda: {e.service.key: e.service for e in current_services(store)}, readings,
        registry=cp_metrics.registry)
    tasks = [asyncio.create_task(publisher.run()),
             # Only the elected replica drives rollouts (controlplane/leader.py); the driver lease
             # in each Rollout's status still fences a replica that has not yet learnt it lost.
             asyncio.create_task(leader.run_while_leader("rollouts", rollouts.run)),
             # Node lease expiry runs once, on the elected replica (controlplane/noderegistry.py).
             asyncio.create_task(leader.run_while_leader(
                 "node lease expiry", lambda: registry.run_expiry(settings.expiry_interval_s))),
             asyncio.create_task(cp_auth.watch_trust_bundle(ca, publisher.trigger)),
             asyncio.create_task(cp_auth.watch_revocations(security.revocations, publisher.trigger)),
             asyncio.create_task(security.interceptor.recheck_streams()),
             asyncio.create_task(watch_loop_lag(cp_metrics.lagged))]
    if isinstance(store, store_etcd.EtcdStore):
        # Singleton duties: only the elected replica sweeps the shared records.
        tasks.append(asyncio.create_task(leader.run_while_leader("shared-records sweep", store.collect_garbage)))
    log.info("control plane ready on %s (state %s, %d nodes restored, trust domain %s)",
             ", ".join(bound), settings.state_dir, restored, mesh.trust_domain)
    cp = ControlPlane(settings, server, store, registry, cache, ads, publisher, ca, tasks, tuple(bound))
    cp.leader = leader
    cp.metrics = cp_metrics
    cp.security = security
    registry.on_departure(cp_metrics.forget_node)
    registry.on_expiry = _expiry_recorder(cp_metrics, security.audit, _replica_name(store))
    cp.rollouts = rollouts
    registry.on_departure(readings.forget)
    if settings.web_listen:
        from controlplane.web import MeshView  # the mesh view and /metrics (docs/observability.md)

        cp.web = MeshView(cp)
        registry_servicer.on_telemetry = _fanout(readings.ingest, cp.web.telemetry.ingest)
        registry.on_departure(cp.web.telemetry.forget)
        await cp.web.start(settings.web_listen)
    if isinstance(store, store_etcd.EtcdStore):
        # Every replica's mesh view and rollout analysis see every node's telemetry.
        registry_servicer.on_telemetry = store_etcd.TelemetryShare(store, registry,
                                                                   registry_servicer.on_telemetry).offer
    return cp


@dataclass
class ControlPlane:
    settings: ControlPlaneSettings
    server: grpc.aio.Server
    store: Store
    registry: NodeRegistry
    cache: SnapshotCache
    ads: AdsServicer
    publisher: SnapshotPublisher
    ca: CertificateAuthority
    tasks: list[asyncio.Task[None]]
    addresses: tuple[str, ...]
    metrics: Any = None  # controlplane.metrics.ControlPlaneMetrics
    web: Any = None  # controlplane.web.MeshView when settings.web_listen is set
    security: Any = None  # controlplane.auth.Security
    rollouts: Any = None  # controlplane.rollout.controller.RolloutController
    leader: Any = None  # controlplane.leader.Leadership: this replica runs the singleton duties


    async def stop(self, grace: float = 1.0) -> None:
        if self.web is not None:
            await self.web.close()
        for t in self.tasks:
            t.cancel()
        await self.server.stop(grace)
        for t in self.tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        resign = getattr(self.store, "resign", None)
        if resign is not None:  # a clean stop hands leadership over at once, not after a lease
            await asyncio.to_thread(resign)
        await asyncio.to_thread(self.store.close)
        if self.security is not None:
            self.security.close()
        for addr in self.addresses:
            if addr.startswith("unix:"):
                with contextlib.suppress(OSError):
                    os.unlink(addr[len("unix:"):])


async def serve(settings: ControlPlaneSettings) -> None:
    """Run until SIGTERM or SIGINT, then stop cleanly."""
    from nodemesh.sdnotify import Notifier

    cp = await start(settings)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # Type=notify (nodemesh install): ready once every listener serves; the
    # watchdog is fed from this loop, so a wedged loop gets the unit restarted.
    notifier = Notifier()
    notifier.ready(f"serving on {', '.join(settings.listen)}")
    watchdog = loop.create_task(_feed_watchdog(notifier, stop)) if notifier.watchdog_s else None
    try:
        await stop.wait()
        log.info("stopping the control plane")
        notifier.stopping("stopping")
    finally:
        if watchdog is not None:
            watchdog.cancel()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        await cp.stop()


async def _feed_watchdog(notifier: Any, stop: asyncio.Event) -> None:
    while not stop.is_set():
        notifier.watchdog()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), notifier.watchdog_s / 3)
