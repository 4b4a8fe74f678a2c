"""`nodemesh authz check` and `nodemesh certs`: `authz check` (what the receiving node
would decide, and why, from the current config, without sending traffic) and
`certs` (what each workload on this node holds, from the agent's status.json)."""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from nodemesh.cli.output import CommandError, add_output_flags_with_json, add_server_flags, client_hint, emit, table

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
    add_server_flags(chk)
    add_output_flags_with_json(chk)
    chk.set_defaults(func=cmd_authz_check)

    certs = sub.add_parser("certs", help="show the workload certificates the agent on this node holds")
    certs.add_argument("--state-dir", default=DEFAULT_AGENT_STATE, help="the agent's stateDir (holds status.json)")
    add_output_flags_with_json(certs)
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
    from controlplane.apiclient import ClientError, ConfigClient
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
    except ClientError as e:  # exit 2: no decision could be made (1 is DENY)
        raise CommandError(str(e), client_hint(e), code=2) from e
    except (ValueError, IdentityError, model.ValidationError) as e:
        raise CommandError(str(e), code=2) from e
    port = next((p for p in svc.ports if p.port == args.port), None) if args.port else svc.ports[0]
    if port is None:
        raise CommandError(f"service {ns}/{name} has no port {args.port}",
                           f"its ports: {', '.join(str(p.port) for p in svc.ports)}", code=2)
    http = None
    if args.method or args.path or args.header or args.host:
        headers = []
        for h in args.header:
            k, sep, v = h.partition("=")
            if not sep:
                raise CommandError(f"--header {h!r} must be NAME=VALUE", code=2)
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
    emit(out, args.output, _human_decision)
    return 0 if v.allowed else 1


def _human_decision(d: dict[str, Any]) -> str:
    lines = [f"{d['decision']}: {d['message']}",
             f"  reason {d['reason']}; mTLS mode {d['mtls_mode']}"
             f"{' (' + d['mtls_policy'] + ')' if d['mtls_policy'] else ' (mesh default)'}; checked at {d['layer']}"]
    if d["policy"]:
        lines.append(f"  decided by {d['policy']}" + (f" rule {d['rule']}" if d["rule"] is not None else ""))
    lines += [f"  audited by {a}" for a in d["audit"]]
    return "\n".join(lines)


def cmd_certs(args: argparse.Namespace) -> int:
    path = Path(args.state_dir) / "status.json"
    try:
        status = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CommandError(f"cannot read {path}: {e}",
                           f"is the agent running with stateDir {args.state_dir} (--state-dir)?", code=2) from e
    certs: dict[str, Any] = status.get("certs", {})
    now = time.time()
    rows = []
    for ident, info in sorted(certs.items()):
        left = float(info.get("not_after_unix", 0)) - now
        rows.append({"identity": ident, "not_after": info.get("not_after", ""),
                     "expires_in_s": round(left), "expired": left <= 0})
    def human(d: dict[str, Any]) -> str:
        if not d["certs"]:
            return f"node {d['node'] or '?'}: no workload certificates held"

        def when(r: dict[str, Any]) -> str:
            left = r["expires_in_s"]
            return "EXPIRED" if r["expired"] else f"in {left // 3600}h{(left % 3600) // 60:02d}m"

        return (f"node {d['node'] or '?'} (certs version {d['certs_version']})\n"
                + table(("IDENTITY", "VALID UNTIL", "EXPIRES"), [(r["identity"], r["not_after"], when(r))
                                                                 for r in d["certs"]]))

    emit({"node": status.get("node", ""), "certs_version": status.get("certs_version", 0), "certs": rows},
         args.output, human)
    return 0

