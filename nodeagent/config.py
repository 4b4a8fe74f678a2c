"""The node agent's config file (agent.yaml), parsed once into a frozen AgentConfig.

Unknown fields and bad values are rejected with the field's path and the reason,
so an operator can fix the file without reading the code.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import yaml

from nodeagent.meshview.snapshot import LocalWorkload
from nodeagent.supervision import settings as defaults
from nodeagent.supervision.settings import ProxySettings
from nodemesh.fieldcheck import FieldChecker, Fields
from nodemesh.identity import IdentityError, check_dns_label

CAPTURE_MODES = ("iptables", "nftables", "ebpf", "auto")
# Modes the design names but this version does not implement yet.
CAPTURE_MODES_LATER: tuple[str, ...] = ()
INBOUND_MODES = ("tproxy", "redirect")
FAILURE_POLICIES = ("open", "closed")
DEFAULT_STATE_DIR = "/var/lib/nodemesh"
DEFAULT_CONTROL_PLANE_PORT = 15010


class ConfigError(ValueError):
    """The agent config is not valid; `path` names the offending field."""

    def __init__(self, path: str, reason: str) -> None:
        self.path = path
        self.reason = reason
        super().__init__(f"{path or '<config>'}: {reason}")


@dataclass(frozen=True)
class NodeConfig:
    name: str
    address: str
    addresses: tuple[str, ...] = ()  # extra addresses, after `address`
    zone: str = ""

    @property
    def all_addresses(self) -> tuple[str, ...]:
        return (self.address,) + tuple(a for a in self.addresses if a != self.address)


@dataclass(frozen=True)
class ControlPlaneConfig:
    address: str  # "host:port" or "unix:/path"
    # Node attestation (nodeagent/identity/attest.py): a one-time token used when stateDir holds
    # no valid node certificate yet, and the CA that verifies the control plane's TLS
    # (else the one the join brought, pinned by the token).
    join_token_file: str = ""
    ca_bundle_file: str = ""
    join_address: str = ""  # server-only TLS port for the join; default: address's port + 1
    # Other control plane replicas (several on one etcd), tried in order when `address`
    # cannot be reached: gRPC pick_first over every address (nodeagent/cpchannel.py).
    addresses: tuple[str, ...] = ()
    # "delta" (incremental ADS: a change sends only what changed) or "sotw" (state of the world).
    xds_protocol: str = "delta"
    # Scoped discovery (Delta): the services ("namespace/name") this node's workloads call;
    # the node receives endpoints of these only. Empty: of every service (docs/architecture.md).
    depends_on: tuple[str, ...] = ()

    @property
    def is_unix(self) -> bool:
        return self.address.startswith("unix:")

    @property
    def host(self) -> str:
        """The host part of a TCP address ("" for unix sockets)."""
        if self.is_unix:
            return ""
        host, _, _ = self.address.rpartition(":")
        return host.strip("[]")

    @property
    def grpc_target(self) -> str:
        if self.addresses:
            return "ipv4:" + ",".join((self.address,) + self.addresses)
        return self.address


@dataclass(frozen=True)
class CaptureConfig:
    mode: str = "iptables"
    exclude_cidrs: tuple[str, ...] = ()
    # open: if capture cannot be installed or the proxy dies, traffic flows
    # directly (unmeshed); closed: the agent fails rather than let it bypass.
    failure_policy: str = "open"
    # Inbound plaintext capture (docs/capture.md): tproxy keeps the caller's
    # address end to end; redirect is nat REDIRECT.
    inbound: str = "tproxy"
    tproxy_mark: int = defaults.TPROXY_MARK
    tproxy_table: int = defaults.TPROXY_TABLE


@dataclass(frozen=True)
class ProxyConfig:
    workers: int = 1
    access_log: str = ""
    outbound_port: int = defaults.OUTBOUND_PORT
    inbound_port: int = defaults.INBOUND_PLAIN_PORT
    hbone_port: int = defaults.HBONE_PORT
    admin_port: int = defaults.ADMIN_PORT
    # Observability (docs/observability.md): see ProxySettings for the meaning.
    tracing: str = ""
    trace_sampling: float = defaults.DEFAULT_TRACE_SAMPLING
    access_log_sampling: float = 1.0


@dataclass(frozen=True)
class DnsConfig:
    """The agent's DNS proxy (nodeagent/dns, docs/dns.md); the mesh domain comes
    from MeshConfig dnsDomain. Empty upstreams = the node's resolv.conf."""

    enabled: bool = True
    address: str = "127.0.0.1"
    port: int = 15053
    upstreams: tuple[str, ...] = ()  # "ip" or "ip:port"
    upstream_timeout_s: float = 2.0


@dataclass(frozen=True)
class WorkloadConfig:
    name: str
    namespace: str
    service_account: str
    ports: tuple[int, ...]
    uid: int | None = None
    cgroup: str | None = None
    ip: str = ""  # "" = node.address
    labels: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class AgentConfig:
    node: NodeConfig
    control_plane: ControlPlaneConfig
    capture: CaptureConfig = field(default_factory=CaptureConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    workloads: tuple[WorkloadConfig, ...] = ()
    state_dir: str = DEFAULT_STATE_DIR
    dns: DnsConfig = field(default_factory=DnsConfig)

    def control_plane_exclusions(self) -> tuple[str, ...]:
        """CIDRs of the control plane that capture must never redirect. A host
        name cannot be known without DNS; the supervisor resolves it."""
        host = self.control_plane.host
        if not host:
            return ()
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return ()
        replicas = [ipaddress.ip_address(a.rpartition(":")[0]) for a in self.control_plane.addresses]
        return tuple(dict.fromkeys(f"{i}/{i.max_prefixlen}" for i in [ip, *replicas]))

    def proxy_settings(self, extra_exclusions: tuple[str, ...] = ()) -> ProxySettings:
        excluded = _dedupe(self.control_plane_exclusions() + extra_exclusions + self.capture.exclude_cidrs)
        return ProxySettings(
            node_name=self.node.name,
            node_address=self.node.address,
            outbound_port=self.proxy.outbound_port,
            inbound_plain_port=self.proxy.inbound_port,
            hbone_port=self.proxy.hbone_port,
            workers=self.proxy.workers,
            access_log=self.proxy.access_log,
            excluded_cidrs=excluded,
            inbound_mode=self.capture.inbound,
            tproxy_mark=self.capture.tproxy_mark,
            tproxy_table=self.capture.tproxy_table,
            tproxy_rule_pref=self.capture.tproxy_table,
            tracing=self.proxy.tracing,
            trace_sampling=self.proxy.trace_sampling,
            access_log_sampling=self.proxy.access_log_sampling,
        )

    def local_workloads(self) -> tuple[LocalWorkload, ...]:
        return tuple(
            LocalWorkload(
                name=w.name,
                namespace=w.namespace,
                service_account=w.service_account,
                ip=w.ip or self.node.address,
                ports=w.ports,
                uid=w.uid,
                cgroup=w.cgroup,
                labels=w.labels,
            )
            for w in self.workloads
        )


def _dedupe(items: tuple[str, ...]) -> tuple[str, ...]:
    return tuple(dict.fromkeys(items))


# ------------------------------------------------------------------ parsing

T = TypeVar("T")


def _raise(path: str, reason: str) -> NoReturn:
    raise ConfigError(path, reason)


# The shared field validator (nodemesh/fieldcheck.py), stopping at the first problem.
_check = FieldChecker(fail=_raise)


def _fields(raw: Any, path: str) -> Fields:
    return Fields(_check, raw, path)


def _str(v: Any, path: str) -> str:
    return _check.text(v, path)


def _nonempty(v: Any, path: str) -> str:
    return _check.text(v, path, required=True)


def _label(v: Any, path: str) -> str:
    try:
        return check_dns_label(_str(v, path), "value")
    except IdentityError as e:
        _raise(path, str(e))


def _int(lo: int, hi: int) -> Callable[[Any, str], int]:
    return lambda v, path: _check.integer(v, path, lo, hi, lo)


_port = _int(1, 65535)


def _fraction(v: Any, path: str) -> float:
    """A sampling fraction."""
    return _check.number(v, path, 0.0, 1.0, 0.0)


def _flag(v: Any, path: str) -> bool:
    return _check.flag(v, path)


def _ip(v: Any, path: str) -> str:
    s = _str(v, path)
    try:
        return str(ipaddress.ip_address(s))
    except ValueError:
        raise ConfigError(path, f"{s!r} is not an IP address") from None


def _cidr(v: Any, path: str) -> str:
    s = _str(v, path)
    try:
        return str(ipaddress.ip_network(s, strict=False))
    except ValueError:
        raise ConfigError(path, f"{s!r} is not a CIDR (e.g. 10.0.0.0/8)") from None


def _list(item: Callable[[Any, str], T]) -> Callable[[Any, str], tuple[T, ...]]:
    def check(v: Any, path: str) -> tuple[T, ...]:
        return tuple(item(x, f"{path}[{i}]") for i, x in enumerate(_check.entries(v, path)))
    return check


def _one_of(choices: tuple[str, ...]) -> Callable[[Any, str], str]:
    return lambda v, path: _check.one_of(v, path, choices, "")


def _labels(v: Any, path: str) -> tuple[tuple[str, str], ...]:
    return _check.labels(v, path)


def _replica_address(v: Any, path: str) -> str:
    """A control plane replica for failover: an IPv4 address and port (gRPC lists
    several addresses only as IP literals; a host name with several A records
    needs no list at all)."""
    s = _control_plane_address(v, path)
    host = s.rpartition(":")[0]
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        raise ConfigError(path, f"{s!r}: with controlPlane.addresses, every control plane address must be "
                                "IPv4:port (or use one host name that resolves to every replica, and no list)"
                          ) from None
    return s


def _control_plane_address(v: Any, path: str) -> str:
    s = _nonempty(v, path)
    if s.startswith("unix:"):
        if len(s) <= len("unix:"):
            raise ConfigError(path, "unix: needs a socket path, e.g. unix:/run/nodemesh/cp.sock")
        return s
    host, sep, port = s.rpartition(":")
    if not sep or not host:
        raise ConfigError(path, f"{s!r} must be host:port or unix:/path")
    try:
        _port(int(port), path)
    except ValueError:
        raise ConfigError(path, f"port {port!r} is not a number") from None
    return s


def _cgroup(v: Any, path: str) -> str:
    s = _nonempty(v, path)
    if ".." in s.split("/") or '"' in s or any(c.isspace() for c in s):
        raise ConfigError(path, f"{s!r} is not a plain cgroup v2 path (e.g. /nodemesh/web)")
    return "/" + s.strip("/")


def _workload(v: Any, path: str) -> WorkloadConfig:
    f = _fields(v, path)
    w = WorkloadConfig(
        name=f.need("name", _label),
        namespace=f.get("namespace", _label, "default"),
        service_account=f.get("serviceAccount", _label, None) or "",
        ports=f.get("ports", _list(_port), ()),
        uid=f.get("uid", _int(0, 2**32 - 2), None),
        cgroup=f.get("cgroup", _cgroup, None),
        ip=f.get("ip", _ip, ""),
        labels=f.get("labels", _labels, ()),
    )
    f.done()
    if (w.uid is None) == (w.cgroup is None):
        raise ConfigError(path, "exactly one of uid or cgroup must be set (how the agent recognises its processes)")
    if len(set(w.ports)) != len(w.ports):
        raise ConfigError(f"{path}.ports", "lists a port twice")
    if not w.service_account:
        # Kubernetes' convention: a workload without a service account runs as "default".
        w = WorkloadConfig(w.name, w.namespace, "default", w.ports, w.uid, w.cgroup, w.ip, w.labels)
    return w


def parse_config(raw: Any) -> AgentConfig:
    """Validate a loaded YAML document; raises ConfigError naming the field."""
    top = _fields(raw, "")

    def node(v: Any, path: str) -> NodeConfig:
        f = _fields(v, path)
        n = NodeConfig(
            name=f.need("name", _label),
            address=f.need("address", _ip),
            addresses=f.get("addresses", _list(_ip), ()),
            zone=f.get("zone", _str, ""),
        )
        f.done()
        return n

    def _service_key(v: Any, path: str) -> str:
        s = _str(v, path)
        ns, _, name = s.partition("/")
        if not ns or not name or "/" in name:
            raise ConfigError(path, f"{s!r} must be namespace/name of a service")
        return s

    def _xds_protocol(v: Any, path: str) -> str:
        s = _str(v, path)
        if s not in ("delta", "sotw"):
            raise ConfigError(path, f"{s!r} must be delta (incremental ADS, the default) or sotw (state of the world)")
        return s

    def control_plane(v: Any, path: str) -> ControlPlaneConfig:
        f = _fields(v, path)
        c = ControlPlaneConfig(address=f.need("address", _control_plane_address),
                               join_token_file=f.get("joinTokenFile", _str, ""),
                               ca_bundle_file=f.get("caBundleFile", _str, ""),
                               join_address=f.get("joinAddress", _control_plane_address, ""),
                               addresses=f.get("addresses", _list(_replica_address), ()),
                               xds_protocol=f.get("xdsProtocol", _xds_protocol, "delta"),
                               depends_on=f.get("dependsOn", _list(_service_key), ()))
        if c.addresses:
            _replica_address(c.address, f.sub("address"))
        f.done()
        return c

    def capture(v: Any, path: str) -> CaptureConfig:
        f = _fields(v, path)
        mode = f.get("mode", _str, "iptables")
        if mode in CAPTURE_MODES_LATER:
            raise ConfigError(f.sub("mode"), f"capture mode {mode!r} is not implemented yet; use iptables")
        _one_of(CAPTURE_MODES)(mode, f.sub("mode"))
        c = CaptureConfig(
            mode=mode,
            exclude_cidrs=f.get("excludeCidrs", _list(_cidr), ()),
            failure_policy=f.get("failurePolicy", _one_of(FAILURE_POLICIES), "open"),
            inbound=f.get("inbound", _one_of(INBOUND_MODES), "tproxy"),
            tproxy_mark=f.get("tproxyMark", _int(1, 2**32 - 1), defaults.TPROXY_MARK),
            tproxy_table=f.get("tproxyTable", _int(1, 2**31 - 1), defaults.TPROXY_TABLE),
        )
        f.done()
        if c.tproxy_mark & defaults.PROXY_MARK:
            raise ConfigError(f.sub("tproxyMark"), f"{c.tproxy_mark:#x} shares bits with the proxy's own socket "
                                                   f"mark {defaults.PROXY_MARK:#x}; pick a mark without them "
                                                   "(e.g. 0x10000)")
        if c.tproxy_table in (253, 254, 255):
            raise ConfigError(f.sub("tproxyTable"), f"{c.tproxy_table} is a kernel routing table (default/main/local)")
        return c

    def proxy(v: Any, path: str) -> ProxyConfig:
        f = _fields(v, path)
        p = ProxyConfig(
            workers=f.get("workers", _int(1, 256), 1),
            access_log=f.get("accessLog", _str, ""),
            outbound_port=f.get("outboundPort", _port, defaults.OUTBOUND_PORT),
            inbound_port=f.get("inboundPort", _port, defaults.INBOUND_PLAIN_PORT),
            hbone_port=f.get("hbonePort", _port, defaults.HBONE_PORT),
            admin_port=f.get("adminPort", _port, defaults.ADMIN_PORT),
            tracing=f.get("tracing", _str, ""),
            trace_sampling=f.get("traceSampling", _fraction, defaults.DEFAULT_TRACE_SAMPLING),
            access_log_sampling=f.get("accessLogSampling", _fraction, 1.0),
        )
        f.done()
        ports = {"outboundPort": p.outbound_port, "inboundPort": p.inbound_port,
                 "hbonePort": p.hbone_port, "adminPort": p.admin_port}
        seen: dict[int, str] = {}
        for key, port in ports.items():
            if port in seen:
                raise ConfigError(f"{path}.{key}", f"port {port} is also {path}.{seen[port]}")
            seen[port] = key
        return p

    def dns(v: Any, path: str) -> DnsConfig:
        from nodeagent.dns.forwarder import parse_upstream

        def upstream(u: Any, upath: str) -> str:
            try:
                return str(parse_upstream(_nonempty(u, upath)))
            except ValueError as e:
                raise ConfigError(upath, str(e)) from None

        def timeout(t: Any, tpath: str) -> float:
            return _check.number(t, tpath, 0.05, 30.0, 2.0)  # seconds

        f = _fields(v, path)
        d = DnsConfig(
            enabled=f.get("enabled", _flag, True),
            address=f.get("address", _ip, "127.0.0.1"),
            port=f.get("port", _port, 15053),
            upstreams=f.get("upstreams", _list(upstream), ()),
            upstream_timeout_s=f.get("upstreamTimeout", timeout, 2.0),
        )
        f.done()
        return d

    cfg = AgentConfig(
        node=top.need("node", node),
        control_plane=top.need("controlPlane", control_plane),
        capture=top.get("capture", capture, CaptureConfig()),
        proxy=top.get("proxy", proxy, ProxyConfig()),
        workloads=top.get("workloads", _list(_workload), ()),
        state_dir=top.get("stateDir", _nonempty, DEFAULT_STATE_DIR),
        dns=top.get("dns", dns, DnsConfig()),
    )
    top.done()
    if cfg.dns.enabled and cfg.dns.port in (cfg.proxy.outbound_port, cfg.proxy.inbound_port,
                                            cfg.proxy.hbone_port, cfg.proxy.admin_port):
        raise ConfigError("dns.port", f"port {cfg.dns.port} is also one of the proxy's ports")
    _check_workloads(cfg)
    return cfg


def _check_workloads(cfg: AgentConfig) -> None:
    names: dict[str, int] = {}
    uids: dict[int, int] = {}
    cgroups: dict[str, int] = {}
    ports: dict[int, int] = {}
    proxy_ports = {cfg.proxy.outbound_port, cfg.proxy.inbound_port, cfg.proxy.hbone_port, cfg.proxy.admin_port}
    for i, w in enumerate(cfg.workloads):
        path = f"workloads[{i}]"
        key = f"{w.namespace}/{w.name}"
        if key in names:
            raise ConfigError(f"{path}.name", f"workload {key} is also workloads[{names[key]}]")
        names[key] = i
        if w.uid is not None:
            if w.uid in uids:
                raise ConfigError(f"{path}.uid", f"uid {w.uid} is also used by workloads[{uids[w.uid]}]")
            uids[w.uid] = i
        if w.cgroup is not None:
            if w.cgroup in cgroups:
                raise ConfigError(f"{path}.cgroup", f"cgroup {w.cgroup} is also used by workloads[{cgroups[w.cgroup]}]")
            cgroups[w.cgroup] = i
        for p in w.ports:
            if p in ports:
                raise ConfigError(f"{path}.ports", f"port {p} is also served by workloads[{ports[p]}]")
            if p in proxy_ports:
                raise ConfigError(f"{path}.ports", f"port {p} is one of the proxy's own ports")
            ports[p] = i


def load_config(path: str | Path) -> AgentConfig:
    """Read and validate an agent.yaml; errors name the file and the field."""
    p = Path(path)
    try:
        text = p.read_text()
    except OSError as e:
        raise ConfigError("", f"cannot read {p}: {e.strerror}; does the file exist and is it readable?") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError("", f"{p} is not valid YAML: {e}") from None
    return parse_config(raw)
