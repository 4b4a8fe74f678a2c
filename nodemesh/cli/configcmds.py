"""`nodemesh controlplane serve` and the config verbs: `apply`, `get` (config kinds
and proxystatus), `delete`, `bootstrap envoy`."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
from typing import Any

from controlplane.apiclient import ConfigClient, default_server
from controlplane.xds.sync import PROXY_STATUS_KINDS
from nodemesh import model, xdsnames
from nodemesh.cli.output import CommandError, add_output_flag, add_server_flags, emit, emit_all, table
from nodemesh.v1 import mesh_pb2


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    cp = subparsers.add_parser("controlplane", help="run the control plane")
    cps = cp.add_subparsers(dest="controlplane_command", required=True)
    serve = cps.add_parser("serve", help="serve the config API, registry, CA and xDS")
    serve.add_argument("--state-dir", default="/var/lib/nodemesh", help="database and CA root live here")
    serve.add_argument("--listen", action="append", default=None, metavar="ADDR",
                       help="host:port or unix:/path; repeatable (default unix:/run/nodemesh/controlplane.sock)")
    serve.add_argument("--lease-seconds", type=float, default=15.0, help="node registration lease")
    serve.add_argument("--cert-ttl", type=int, default=24 * 3600, metavar="S",
                       help="default workload certificate lifetime in seconds")
    serve.add_argument("--log-level", default="INFO")
    serve.add_argument("--san", action="append", default=[], metavar="IP|NAME",
                       help="another name or IP agents and operators use to reach a TCP listener "
                            "(the listen addresses and loopback are always in the server certificate)")
    serve.add_argument("--node-cert-ttl", type=int, default=12 * 3600, metavar="S",
                       help="node certificate lifetime in seconds (default 12h, at most 24h; renewed at half life)")
    serve.add_argument("--web-listen", default="127.0.0.1:15014", metavar="HOST:PORT",
                       help="the mesh view web page and control plane /metrics ('' to turn off)")
    serve.add_argument("--web-host", action="append", default=[], metavar="NAME",
                       help="another name (or name:port) the mesh view answers to; Host is checked against "
                            "the listen address, localhost and loopback plus these (DNS rebinding)")
    # An intermediate signed by the operator's own root (docs/security.md "Operator CA").
    serve.add_argument("--ca-cert", default="", metavar="FILE",
                       help="sign workload certificates with this intermediate CA certificate (PEM) instead "
                            "of the self-signed root in --state-dir; needs --ca-key and --ca-chain")
    serve.add_argument("--ca-key", default="", metavar="FILE",
                       help="the intermediate's private key (PEM, unencrypted, mode 0600); read, never copied")
    serve.add_argument("--ca-chain", default="", metavar="FILE",
                       help="the certificates above the intermediate, ending with the operator's root "
                            "(the trust anchor given to every node)")
    # Several replicas on one etcd (docs/reference.md "Store backends and replicas").
    serve.add_argument("--store", choices=("sqlite", "etcd"), default="sqlite",
                       help="sqlite: one control plane, state in --state-dir; etcd: several replicas sharing "
                            "config and registrations (needs --etcd-endpoints and --ca-cert/--ca-key/--ca-chain)")
    serve.add_argument("--etcd-endpoints", default="", metavar="URLS",
                       help="comma-separated etcd client URLs, e.g. https://10.0.0.5:2379 (several: IP "
                            "addresses); plain http:// only to loopback")
    serve.add_argument("--etcd-prefix", default="/nodemesh", metavar="PREFIX",
                       help="the key prefix of this mesh in etcd")
    serve.add_argument("--etcd-ca", default="", metavar="PEM",
                       help="the CA certificate(s) that signed etcd's server certificate (https endpoints)")
    serve.add_argument("--etcd-cert", default="", metavar="PEM",
                       help="this control plane's client certificate for etcd (etcd --client-cert-auth)")
    serve.add_argument("--etcd-key", default="", metavar="PEM", help="the key of --etcd-cert")
    serve.add_argument("--etcd-server-name", default="", metavar="NAME",
                       help="the name etcd's server certificate must carry (default: the first endpoint's host)")
    serve.set_defaults(func=cmd_serve)

    apply = subparsers.add_parser("apply", help="create or update config from YAML documents")
    apply.add_argument("-f", "--filename", required=True, help="a YAML file, or - for stdin")
    apply.add_argument("--dry-run", action="store_true", help="validate and report, store nothing")
    add_server_flags(apply)
    apply.set_defaults(func=cmd_apply)

    get = subparsers.add_parser("get", help="show config resources")
    get.add_argument("kind", help="Service (svc), MeshConfig, HTTPRoute, …, or proxystatus (ps): what each "
                     "connected xDS client holds, synced / stale / NACKed with the reason")
    get.add_argument("name", nargs="?", default="")
    get.add_argument("-n", "--namespace", default="", help="default: every namespace for a list, "
                     "'default' for one resource")
    add_output_flag(get)
    add_server_flags(get)
    get.set_defaults(func=cmd_get)

    boot = subparsers.add_parser("bootstrap", help="print an Envoy bootstrap that takes its config from nodemesh")
    boot.add_argument("client", choices=("envoy",), help="the xDS client to bootstrap")
    boot.add_argument("--node", required=True, help="the Envoy's node id (as shown by `get proxystatus`)")
    boot.add_argument("--cluster", default="nodemesh", help="the Envoy's node cluster")
    boot.add_argument("--control-plane", default=None, metavar="ADDR",
                      help="unix:/path or host:port of the control plane (default: $NODEMESH_SERVER or "
                           f"{default_server()}); host:port needs --tls-ca/--tls-cert/--tls-key")
    boot.add_argument("--listener", action="append", default=[], metavar="PORT=SERVICE.NAMESPACE:PORT",
                      help="a local HTTP listener routed by the service port's route table; repeatable")
    boot.add_argument("--listen-address", default="127.0.0.1")
    boot.add_argument("--admin-port", type=int, default=9901)
    boot.add_argument("--dns-domain", default="mesh", help="the mesh's DNS domain (MeshConfig spec.dnsDomain)")
    boot.add_argument("--delta", action="store_true", help="incremental ADS (DELTA_GRPC)")
    boot.add_argument("--tls-ca", default="", metavar="FILE", help="CA bundle verifying the control plane")
    boot.add_argument("--tls-cert", default="", metavar="FILE", help="client certificate (node or operator)")
    boot.add_argument("--tls-key", default="", metavar="FILE", help="its private key")
    add_output_flag(boot, ("json", "yaml"), default="json")
    boot.set_defaults(func=cmd_bootstrap)

    delete = subparsers.add_parser("delete", help="delete a config resource")
    delete.add_argument("kind")
    delete.add_argument("name")
    delete.add_argument("-n", "--namespace", default="")
    add_server_flags(delete)
    delete.set_defaults(func=cmd_delete)


def cmd_serve(args: argparse.Namespace) -> int:
    from controlplane.ca import CaError
    from controlplane.process import DEFAULT_LISTEN, ControlPlaneSettings, serve
    from controlplane.store import StoreError

    logging.basicConfig(level=args.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        settings = ControlPlaneSettings(
            state_dir=args.state_dir, listen=tuple(args.listen or [DEFAULT_LISTEN]),
            lease_seconds=args.lease_seconds, default_cert_ttl_s=args.cert_ttl, log_level=args.log_level,
            web_listen=args.web_listen, web_hosts=tuple(args.web_host), sans=tuple(args.san),
            node_cert_ttl_s=args.node_cert_ttl,
            ca_cert=args.ca_cert, ca_key=args.ca_key, ca_chain=args.ca_chain, store=args.store,
            etcd_endpoints=tuple(e.strip() for e in args.etcd_endpoints.split(",") if e.strip()),
            etcd_prefix=args.etcd_prefix, etcd_ca=args.etcd_ca, etcd_cert=args.etcd_cert, etcd_key=args.etcd_key,
            etcd_server_name=args.etcd_server_name)
        asyncio.run(serve(settings))
    except (OSError, ValueError, CaError, StoreError) as e:
        raise CommandError(str(e), f"the flags of `nodemesh controlplane serve`, and --state-dir {args.state_dir}"
                           ) from e
    return 0


def _resource_doc(r: mesh_pb2.Resource) -> dict[str, Any]:
    doc = model.to_yaml_document(r.kind, r.namespace, r.name, json.loads(r.spec_json or "{}"),
                                 dict(r.labels), json.loads(r.status_json or "{}"))
    doc["metadata"]["resourceVersion"] = r.resource_version
    return doc


def _detail(r: mesh_pb2.Resource) -> str:
    spec = json.loads(r.spec_json or "{}")
    status = json.loads(r.status_json or "{}")
    if r.kind == "Rollout":
        ret = status.get("retirement") or {}
        return (f"service={spec.get('service')} {spec.get('stable')}->{spec.get('candidate')} "
                f"phase={status.get('phase', 'Pending')} weight={status.get('weight', 0)}%"
                + (f" {ret.get('version')}={ret.get('state')}" if ret else ""))
    if r.kind == model.KIND_SERVICE:
        ports = ",".join(f"{p['port']}/{p['protocol']}" for p in spec.get("ports", []))
        return f"vip={status.get('vip', spec.get('vip', ''))} ports={ports}"
    return " ".join(f"{k}={v}" for k, v in spec.items())


def _print(resources: list[mesh_pb2.Resource], output: str, single: bool) -> None:
    if output == "table":
        print(table(("KIND", "NAMESPACE", "NAME", "DETAIL", "VERSION"),
                    [(r.kind, r.namespace, r.name, _detail(r), r.resource_version) for r in resources]))
    elif single:
        emit(_resource_doc(resources[0]), output)
    else:
        emit_all([_resource_doc(r) for r in resources], output)


def cmd_apply(args: argparse.Namespace) -> int:
    try:
        if args.filename == "-":
            text = sys.stdin.read()
        else:
            with open(args.filename) as f:
                text = f.read()
    except OSError as e:
        raise CommandError(f"cannot read {args.filename}: {e}", "the path given to -f") from e
    with ConfigClient(args.server) as c:
        for outcome in c.apply(text, args.dry_run):
            print(f"{outcome}{' (dry run)' if args.dry_run else ''}")
    return 0


def _print_proxy_status(resources: list[mesh_pb2.Resource], output: str) -> None:
    rows = [json.loads(r.status_json) for r in resources]
    emit(rows, output, lambda rows: table(
        ("NODE", "CLIENT", "XDS", "TYPE", "STATE", "ACKED", "SENT", "PENDING", "REASON"),
        [(r["node"] or f"stream-{r['stream']}", f"{r['client']} {r['client_version']}".strip(), r["protocol"],
          r["type"], r["state"].upper() if r["state"] != "synced" else "synced", r["acked_version"][:12],
          r["sent_version"][:12], r["pending"], r["nack_reason"]) for r in rows]))


def bootstrap_listener(spec: str, dns_domain: str) -> tuple[int, str]:
    """'8080=web.default:80' -> (8080, 'outbound|80||web.default.svc.<domain>')."""
    port_s, _, target = spec.partition("=")
    host, _, svc_port = target.rpartition(":")
    name, _, namespace = host.partition(".")
    if not (port_s.isdigit() and svc_port.isdigit() and name and namespace):
        raise ValueError(f"--listener {spec!r}: expected PORT=SERVICE.NAMESPACE:PORT, e.g. 8080=web.default:80")
    return int(port_s), xdsnames.cluster_name(name, namespace, int(svc_port), dns_domain)


def cmd_bootstrap(args: argparse.Namespace) -> int:
    from controlplane.xds.listeners import envoy_bootstrap

    target = args.control_plane or default_server()
    tls = (args.tls_ca, args.tls_cert, args.tls_key)
    try:
        listeners = [bootstrap_listener(s, args.dns_domain) for s in args.listener]
        if any(tls) and not all(tls):
            raise ValueError("--tls-ca, --tls-cert and --tls-key go together")
        if target.startswith("unix:"):
            cp: tuple[str, int] | str = target[len("unix:"):]
        else:
            host, _, port = target.rpartition(":")
            if not port.isdigit() or not host:
                raise ValueError(f"--control-plane {target!r}: expected unix:/path or host:port")
            if not all(tls):
                raise ValueError("a TCP control plane listener requires mutual TLS: give --tls-ca, --tls-cert and "
                                 "--tls-key (a node certificate from `nodemesh join`, or an operator certificate)")
            cp = (host.strip("[]"), int(port))
    except ValueError as e:
        raise CommandError(str(e), code=2) from e
    boot = envoy_bootstrap(args.node, args.cluster, cp, listeners, args.admin_port, args.listen_address,
                           delta=args.delta, tls_files=tls if all(tls) else None)
    emit(boot, args.output)
    return 0


def cmd_get(args: argparse.Namespace) -> int:
    with ConfigClient(args.server) as c:
        if args.kind.lower() in PROXY_STATUS_KINDS:
            _print_proxy_status(c.list(args.kind), args.output)
        elif args.name:
            _print([c.get(args.kind, args.name, args.namespace)], args.output, True)
        else:
            items = c.list(args.kind, args.namespace)
            if not items and args.output == "table":
                print("no resources found", file=sys.stderr)
                return 0
            _print(items, args.output, False)
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    with ConfigClient(args.server) as c:
        deleted = c.delete(args.kind, args.name, args.namespace)
    kind = model.canonical_kind(args.kind)  # the server accepted it, so it is known
    ns = "" if kind in model.CLUSTER_SCOPED else (args.namespace or model.DEFAULT_NAMESPACE)
    ref = f"{kind.lower()}/{ns}/{args.name}" if ns else f"{kind.lower()}/{args.name}"
    if not deleted:
        raise CommandError(f"{ref} not found", f"`nodemesh get {kind}` lists what exists")
    print(f"{ref} deleted")
    return 0
