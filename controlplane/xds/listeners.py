"""Listener resources (LDS) for clients that are not node agents, and a
bootstrap for Envoy.

- Proxyless gRPC (grpcio with GRPC_XDS_BOOTSTRAP, target
  `xds:///<svc>.<ns>.svc.<domain>:<port>`) asks LDS for exactly that name. It
  gets an *API listener*: an HttpConnectionManager that takes its routes by
  RDS over ADS (route_config_name = the port's cluster name, the
  RouteConfiguration controlplane/xds/build_routes.py already builds), with the
  fault filter and the router filter last (gRPC refuses a chain without the
  router at the end).
- Envoy subscribes LDS as a wildcard and would receive these API listeners
  too; Envoy only accepts an API listener from its bootstrap and skips such
  LDS resources with a warning (no NACK). Envoy is meant to take CDS (and
  EDS, RDS) from ADS with its listeners in the bootstrap: `envoy_bootstrap()`
  renders one, with a loopback listener per service port whose routes come
  by RDS from our ADS.

Node agents do not subscribe to listeners (nodemesh.xdsnames.AGENT_TYPES).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from envoy.config.core.v3 import config_source_pb2
from envoy.config.listener.v3 import listener_pb2
from envoy.extensions.filters.http.fault.v3 import fault_pb2
from envoy.extensions.filters.http.router.v3 import router_pb2
from envoy.extensions.filters.network.http_connection_manager.v3 import http_connection_manager_pb2 as hcm_pb2
from google.protobuf import any_pb2

from nodemesh import model, xdsnames

from .build_routes import FAULT_FILTER, L7_PROTOCOLS

ROUTER_FILTER = "envoy.filters.http.router"
HCM_FILTER = "envoy.filters.network.http_connection_manager"


def listener_name(service: str, namespace: str, port: int, dns_domain: str) -> str:
    """What a gRPC client asks LDS for when dialing xds:///<this>."""
    return f"{xdsnames.service_host(service, namespace, dns_domain)}:{port}"


def _any(msg: Any) -> any_pb2.Any:
    a = any_pb2.Any()
    a.Pack(msg)
    a.value = msg.SerializeToString(deterministic=True)
    return a


def _ads_source() -> config_source_pb2.ConfigSource:
    src = config_source_pb2.ConfigSource(resource_api_version=config_source_pb2.V3)
    src.ads.SetInParent()
    return src


def http_connection_manager(route_config_name: str, stat_prefix: str) -> hcm_pb2.HttpConnectionManager:
    """RDS over ADS, fault filter, router filter last."""
    hcm = hcm_pb2.HttpConnectionManager(stat_prefix=stat_prefix)
    hcm.rds.config_source.CopyFrom(_ads_source())
    hcm.rds.route_config_name = route_config_name
    hcm.http_filters.add(name=FAULT_FILTER, typed_config=_any(fault_pb2.HTTPFault()))
    hcm.http_filters.add(name=ROUTER_FILTER, typed_config=_any(router_pb2.Router()))
    return hcm


def api_listeners(mesh: model.MeshConfig, services: Sequence[model.ServiceSpec]) -> dict[str, listener_pb2.Listener]:
    """One API listener per HTTP-ish service port, named `<svc>.<ns>.svc.<domain>:<port>`."""
    out: dict[str, listener_pb2.Listener] = {}
    for svc in services:
        for port in svc.ports:
            if port.protocol not in L7_PROTOCOLS:
                continue
            name = listener_name(svc.name, svc.namespace, port.port, mesh.dns_domain)
            cluster = xdsnames.cluster_name(svc.name, svc.namespace, port.port, mesh.dns_domain)
            lis = listener_pb2.Listener(name=name)
            lis.api_listener.api_listener.CopyFrom(_any(http_connection_manager(cluster, name)))
            out[name] = lis
    return out


def envoy_bootstrap(node_id: str, node_cluster: str, control_plane: tuple[str, int] | str,
                    listeners: Sequence[tuple[int, str]], admin_port: int,
                    listen_address: str = "127.0.0.1", *, delta: bool = False,
                    tls_files: tuple[str, str, str] | None = None) -> dict[str, Any]:
    """An Envoy bootstrap (as a dict, for JSON/YAML) that takes clusters,
    endpoints and routes from our ADS. `control_plane`: (host, port) or a unix
    socket path; `listeners`: (port, route_config_name) pairs, each a plain
    HTTP listener on `listen_address` routing by RDS. Envoy connects to the
    endpoints directly (no HBONE): use it where endpoints are reachable.
    `delta`: incremental ADS (DELTA_GRPC). `tls_files`: (CA bundle, certificate,
    key) paths for the control plane's mutual-TLS TCP listener: a node
    certificate from `nodemesh join`, or an operator's (docs/security.md)."""
    if isinstance(control_plane, str):
        cp_addr: dict[str, Any] = {"pipe": {"path": control_plane}}
    else:
        cp_addr = {"socket_address": {"address": control_plane[0], "port_value": control_plane[1]}}
    ads = {"ads": {}, "resource_api_version": "V3"}
    xds_cluster: dict[str, Any] = {
        "name": "nodemesh_xds",
        "type": "STATIC",
        "connect_timeout": "2s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                "explicit_http_config": {"http2_protocol_options": {}},
            }},
        "load_assignment": {"cluster_name": "nodemesh_xds", "endpoints": [{"lb_endpoints": [
            {"endpoint": {"address": cp_addr}}]}]},
    }
    if tls_files is not None:
        ca, cert, key = tls_files
        xds_cluster["transport_socket"] = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
                "common_tls_context": {
                    "tls_certificates": [{"certificate_chain": {"filename": cert},
                                          "private_key": {"filename": key}}],
                    "validation_context": {"trusted_ca": {"filename": ca}},
                },
            },
        }
    static_listeners = []
    for port, route in listeners:
        static_listeners.append({
            "name": f"nodemesh_{port}",
            "address": {"socket_address": {"address": listen_address, "port_value": port}},
            "filter_chains": [{"filters": [{
                "name": HCM_FILTER,
                "typed_config": {
                    "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager."
                             "v3.HttpConnectionManager",
                    "stat_prefix": f"nodemesh_{port}",
                    "rds": {"config_source": ads, "route_config_name": route},
                    "http_filters": [
                        {"name": FAULT_FILTER, "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.fault.v3.HTTPFault"}},
                        {"name": ROUTER_FILTER, "typed_config": {
                            "@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}},
                    ],
                },
            }]}],
        })
    return {
        "node": {"id": node_id, "cluster": node_cluster, "metadata": {"nodemesh.client": "envoy"}},
        "admin": {"address": {"socket_address": {"address": "127.0.0.1", "port_value": admin_port}}},
        "dynamic_resources": {
            # CDS from ADS (wildcard); EDS and RDS follow from the clusters and listeners.
            "ads_config": {"api_type": "DELTA_GRPC" if delta else "GRPC", "transport_api_version": "V3",
                           "grpc_services": [{"envoy_grpc": {"cluster_name": "nodemesh_xds"}}]},
            "cds_config": ads,
        },
        "static_resources": {"listeners": static_listeners, "clusters": [xds_cluster]},
    }
