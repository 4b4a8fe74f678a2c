"""The xDS contract between the control plane and the node agent: type URLs,
resource names and the metadata keys nodemesh puts into standard Envoy types.

Services travel as standard Cluster (one per service port, EDS) and
ClusterLoadAssignment resources, so that Envoy and proxyless gRPC clients can
consume them; node-level facts travel as nodemesh.v1.Workload and
nodemesh.v1.MeshConfig.

Cluster:   name  outbound|<port>||<service>.<namespace>.svc.<dns_domain>
           (a version subset: outbound|<port>|<label>=<value>[,...]|<host>, the same
           cluster fields plus metadata "subset"; its ClusterLoadAssignment holds only
           the service's endpoints whose workloads carry those labels)
           type EDS, eds_cluster_config.eds_config.ads, lb_policy ROUND_ROBIN
           metadata.filter_metadata["nodemesh"] = {
               "service": str, "namespace": str, "vip": str ("" if none),
               "port": number, "target_port": number, "protocol": str,
               "port_name": str }
ClusterLoadAssignment: cluster_name as above; one LocalityLbEndpoints per node
           (locality.zone = node zone, locality.sub_zone = node name,
           load_balancing_weight = number of endpoints); each LbEndpoint has
           endpoint.address.socket_address = workload ip : target port,
           health_status HEALTHY, load_balancing_weight 1, and
           metadata.filter_metadata["nodemesh"] = {
               "workload": "<namespace>/<name>", "identity": spiffe URI,
               "node": str, "node_address": str, "hbone_port": number }
Workload:  name  <node>/<namespace>/<name>; a Delta node agent subscribes by name to
           its own workloads and to those behind the endpoints it holds, never
           to the wildcard (a fleet's Workloads would otherwise reach every node)
MeshConfig: name "mesh"
Policy:    name  <kind>/<namespace>/<name> (PeerAuthentication, AuthorizationPolicy),
           plus MeshSecurity//mesh (mesh-wide mTLS mode, default deny, root namespace)
"""

from __future__ import annotations

TYPE_PREFIX = "type.googleapis.com/"
CLUSTER = TYPE_PREFIX + "envoy.config.cluster.v3.Cluster"
ENDPOINT = TYPE_PREFIX + "envoy.config.endpoint.v3.ClusterLoadAssignment"
LISTENER = TYPE_PREFIX + "envoy.config.listener.v3.Listener"
ROUTE = TYPE_PREFIX + "envoy.config.route.v3.RouteConfiguration"
WORKLOAD = TYPE_PREFIX + "nodemesh.v1.Workload"
MESH_CONFIG = TYPE_PREFIX + "nodemesh.v1.MeshConfig"
POLICY = TYPE_PREFIX + "nodemesh.v1.Policy"

# What a node agent subscribes to, in the order it subscribes. A snapshot is
# published only once every type has arrived: POLICY always holds the
# "MeshSecurity//mesh" resource, so "no policies" is never "not received yet".
AGENT_TYPES = (MESH_CONFIG, WORKLOAD, CLUSTER, ENDPOINT, POLICY, ROUTE)  # ROUTE: always sent, maybe empty
MESH_SECURITY_RESOURCE = "MeshSecurity//mesh"

METADATA_KEY = "nodemesh"
MESH_CONFIG_NAME = "mesh"
HBONE_PORT = 15008


def service_host(service: str, namespace: str, dns_domain: str) -> str:
    return f"{service}.{namespace}.svc.{dns_domain}"


def cluster_name(service: str, namespace: str, port: int, dns_domain: str, subset: str = "") -> str:
    """`subset`: '' for the whole service, else nodemesh.routespec.subset_name() of its labels."""
    return f"outbound|{port}|{subset}|{service_host(service, namespace, dns_domain)}"


# Endpoint slices: besides the whole ClusterLoadAssignment named after its cluster
# (what Envoy and gRPC subscribe to by name), the control plane publishes one
# ClusterLoadAssignment per cluster and node, named <cluster>/slice/<node>, with
# cluster_name the cluster's. A node agent subscribes to a cluster's slices with
# the glob <cluster>/slice/* (xDS glob collections); a workload starting then
# sends one small slice, not the cluster's whole membership. A wildcard
# subscription never covers slices.
SLICE_MARK = "/slice/"
SLICE_GLOB = SLICE_MARK + "*"


def slice_name(cluster: str, node: str) -> str:
    return f"{cluster}{SLICE_MARK}{node}"


def slice_glob(cluster: str) -> str:
    return cluster + SLICE_GLOB


def is_slice(name: str) -> bool:
    # Only cluster names start "outbound|"; workload and policy names are DNS labels.
    return name.startswith("outbound|") and SLICE_MARK in name


def slice_prefix(name: str) -> str:
    """'<cluster>/slice/<node>' -> '<cluster>/slice/' (a glob minus its '*')."""
    return name[:name.index(SLICE_MARK) + len(SLICE_MARK)]


def workload_resource_name(node: str, namespace: str, name: str) -> str:
    return f"{node}/{namespace}/{name}"


def policy_resource_name(kind: str, namespace: str, name: str) -> str:
    return f"{kind}/{namespace}/{name}"
