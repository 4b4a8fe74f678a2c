"""Security subcommands of `nodemesh`: `authz check` (what the receiving node
would decide, and why, from the current config, without sending traffic) and
`certs` (what each workload on this node holds, from the agent's status.json)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

DEFAULT_AGENT_STATE = "/var/lib/nodemesh"


def register(sub: Any) -> None:
    authz = sub.add_parser("authz", help="authorization policy tools")
    authz_sub = authz.add_subparsers(dest="authz_command", metavar="AUTHZ_COMMAND")
    authz_sub.required = True
    chk = authz_sub.add_parser("check", help="what the receiving node would decide for a caller, and why")
    chk.add_argument("--from", dest="source", required=True,
                     help="the caller: <namespace>/<service account>, a SPIFFE ID, or 'plaintext' (no identity)")
    chk.add_argument("--to", dest="dest", required=True, help="the service: <name> or <namespace>/<name>")
    chk.add_argument("--port", type=int, default=0, help="service port (default: its first port)")
    chk.add_argument("--method", default="", help="HTTP method (checks L7 rules)")
    chk.add_argument("--path", default="", help="HTTP path (checks L7 rules)")
    chk.add_argument("--host", default="", help="HTTP host (default: the service's host name)")
    chk.add_argument("--header", action="append", default=[], metavar="NAME=VALUE", help="HTTP header; repeatable")
    chk.add_argument("--source-ip", default="", help="the caller's address, for ipBlocks rules")
    chk.add_argument("--server", default=None, help="control plane address (default: $NODEMESH_SERVER)")
    from controlplane.client import add_credential_flags

    add_credential_flags(chk)  # --token-file --ca-file --cert --key, as on every config command
    chk.add_argument("--json", action="store_true", help="print JSON")
    chk.set_defaults(func=cmd_authz_check)

    certs = sub.add_parser("certs", help="show the workload certificates the agent on this node holds")
    certs.add_argument("--state-dir", default=DEFAULT_AGENT_STATE, help="the agent's stateDir (holds status.json)")
    certs.add_argument("--json", action="store_true", help="print JSON")
    certs.set_defaults(func=cmd_certs)


def _policies_from_config(client: Any) -> tuple[Any, Any]:
    """(SecurityPolicies, MeshConfig) from what the config API stores."""
    from nodemesh import model, security

    def objs(kind: str) -> list[Any]:
        return [model.object_from_spec(r.kind, r.namespace, r.name, json.loads(r.spec_json or "{}"), dict(r.labels))
                for r in client.list(kind)]

    meshes = objs(model.KIND_MESH_CONFIG)
    mesh = meshes[0] if meshes else model.MeshConfig()
    return security.SecurityPolicies(security.mesh_security_of(mesh), tuple(objs(model.KIND_PEER_AUTHENTICATION)),
                                     tuple(objs(model.KIND_AUTHORIZATION_POLICY))), mesh


def _source_principal(source: str, trust_domain: str) -> str:
    from nodemesh.identity import Identity

    if source in ("plaintext", "-", ""):
        return ""
    if source.startswith("spiffe://"):
        return Identity.parse(source).uri
    ns, sep, sa = source.partition("/")
    if not sep:
        raise ValueError(f"--from {source!r}: use <namespace>/<service account>, a SPIFFE ID or 'plaintext'")
    return Identity(trust_domain, ns, sa).uri


def cmd_authz_check(args: argparse.Namespace) -> int:
    from controlplane.client import ClientError, ConfigClient
    from nodeagent.proxy.authz import HttpFacts, RequestFacts, evaluate
    from nodemesh import model
    from nodemesh.identity import IdentityError

    ns, _, name = args.dest.rpartition("/")
    ns = ns or model.DEFAULT_NAMESPACE
    try:
        with ConfigClient(args.server) as c:
            policies, mesh = _policies_from_config(c)
            res = c.get("Service", name, ns)
        svc = model.object_from_spec(res.kind, res.namespace, res.name, json.loads(res.spec_json), dict(res.labels))
        principal = _source_principal(args.source, mesh.trust_domain)
    except ClientError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (ValueError, IdentityError, model.ValidationError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    port = next((p for p in svc.ports if p.port == args.port), None) if args.port else svc.ports[0]
    if port is None:
        print(f"error: service {ns}/{name} has no port {args.port} (ports: "
              f"{', '.join(str(p.port) for p in svc.ports)})", file=sys.stderr)
        return 2
    http = None
    if args.method or args.path or args.header or args.host:
        headers = []
        for h in args.header:
            k, sep, v = h.partition("=")
            if not sep:
                print(f"error: --header {h!r} must be NAME=VALUE", file=sys.stderr)
                return 2
            headers.append((k.strip().lower(), v))
        http = HttpFacts(args.method.upper() or "GET", args.path or "/",
                         args.host or f"{name}.{ns}.svc.{mesh.dns_domain}", tuple(headers))
    # The backing workloads carry at least the service's selector labels; a policy
    # selecting on other labels is only seen by the real node (see docs/security.md).
    facts = RequestFacts(namespace=ns, labels=svc.selector, port=port.target_port, source_principal=principal,
                         source_ip=args.source_ip, workload=f"service {ns}/{name}", http=http)
    v = evaluate(policies, facts)
    out = {"decision": "ALLOW" if v.allowed else "DENY", "reason": v.reason, "policy": v.policy,
           "rule": v.rule, "mtls_mode": v.mtls_mode, "mtls_policy": v.mtls_policy, "audit": list(v.audited),
           "layer": "L7" if http else "L4", "message": v.message}
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        print(f"{out['decision']}: {v.message}")
        print(f"  reason {v.reason}; mTLS mode {v.mtls_mode}"
              f"{' (' + v.mtls_policy + ')' if v.mtls_policy else ' (mesh default)'}; checked at {out['layer']}")
        if v.policy:
            print(f"  decided by {v.policy}" + (f" rule {v.rule}" if v.rule is not None else ""))
        for a in v.audited:
            print(f"  audited by {a}")
    return 0 if v.allowed else 1


def cmd_certs(args: argparse.Namespace) -> int:
    path = Path(args.state_dir) / "status.json"
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        print(f"error: cannot read {path}: {e}; is the agent running with stateDir {args.state_dir}?",
              file=sys.stderr)
        return 2
    certs: dict[str, Any] = status.get("certs", {})
    now = time.time()
    rows = []
    for ident, info in sorted(certs.items()):
        left = float(info.get("not_after_unix", 0)) - now
        rows.append({"identity": ident, "not_after": info.get("not_after", ""),
                     "expires_in_s": round(left), "expired": left <= 0})
    if args.json:
        print(json.dumps({"node": status.get("node", ""), "certs": rows}, indent=2))
        return 0
    if not rows:
        print(f"node {status.get('node', '?')}: no workload certificates held")
        return 0
    print(f"node {status.get('node', '?')} (certs version {status.get('certs_version', 0)})")
    width = max(len(r["identity"]) for r in rows)
    for r in rows:
        left = r["expires_in_s"]
        when = "EXPIRED" if r["expired"] else f"in {left // 3600}h{(left % 3600) // 60:02d}m"
        print(f"  {r['identity'].ljust(width)}  valid until {r['not_after']}  ({when})")
    return 0


def identity_cert_expiration_timestamps(certs: Any) -> dict[str, float]:
    """identity -> unix expiry of the SVID held, for the metrics endpoint
    (identity_cert_expiration_timestamp_seconds{identity=...}); `certs` is a
    nodeagent.supervision.settings.Certs."""
    return {ident: float(svid.not_after_unix) for ident, svid in certs.svids.items()}
