"""`nodemesh token create`, `operator create|revoke`, `node list|revoke`, `audit`,
`ca rotate`: operator commands over the Admin API (controlplane/adminclient.py)."""

from __future__ import annotations

import argparse
import re
import sys
import time
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controlplane.adminclient import AdminClient
from nodemesh.cli.output import CommandError, add_output_flag, add_server_flags, emit, table
from nodemesh.keyfiles import write_private

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")


def parse_duration(text: str) -> int:
    """'90', '90s', '30m', '1h', '2d' -> seconds."""
    m = _DURATION.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 30m, 1h or 2d")
    return int(float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)])


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tok = sub.add_parser("token", help="join tokens for node agents")
    tsub = tok.add_subparsers(dest="token_command", required=True)
    tc = tsub.add_parser("create", help="a one-time, expiring join token for one node (printed once)")
    tc.add_argument("--node", required=True, help="the node name the agent uses (node.name)")
    tc.add_argument("--ttl", type=parse_duration, default=3600, help="how long it can be used (default 1h)")
    tc.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                    help="a label of the node, set by you (identity bindings' nodeSelector matches it); repeatable")
    add_server_flags(tc)
    tc.set_defaults(func=cmd_token_create)

    op = sub.add_parser("operator", help="operator credentials for the config and admin APIs")
    osub = op.add_subparsers(dest="operator_command", required=True)
    oc = osub.add_parser("create", help="a bearer token (printed once) or, with --cert-out, a client certificate")
    oc.add_argument("name")
    oc.add_argument("--role", required=True, choices=("ro", "rw"), help="ro: get/list/watch/audit; rw: everything")
    oc.add_argument("--cert-out", metavar="PREFIX", default="",
                    help="write PREFIX.key (0600, made here) and PREFIX.pem instead of making a token")
    oc.add_argument("--ttl", type=parse_duration, default=0, help="certificate lifetime (default 30d)")
    add_server_flags(oc)
    oc.set_defaults(func=cmd_operator_create)
    orv = osub.add_parser("revoke", help="revoke an operator (every credential it holds), or one credential by "
                                         "--credential ID or --serial HEX; revoked ones never come back")
    orv.add_argument("name", nargs="?", default="")
    orv.add_argument("--credential", default="", metavar="ID", help="a credential id (token id, or cert-<serial>)")
    orv.add_argument("--serial", default="", metavar="HEX", help="an operator certificate's serial number (hex)")
    add_server_flags(orv)
    orv.set_defaults(func=cmd_operator_revoke)

    nd = sub.add_parser("node", help="node identities: list them, revoke one")
    nsub = nd.add_subparsers(dest="node_command", required=True)
    nrv = nsub.add_parser("revoke", help="revoke a node now: its certificates are refused, its open streams "
                                         "closed, its endpoints withdrawn; it must join again with a new token")
    nrv.add_argument("name")
    add_server_flags(nrv)
    nrv.set_defaults(func=cmd_node_revoke)
    nls = nsub.add_parser("list", help="node identities: labels, join address, certificates, revocation, "
                                       "recent refusals")
    add_output_flag(nls)
    add_server_flags(nls)
    nls.set_defaults(func=cmd_node_list)

    au = sub.add_parser("audit", help="the audit log: who changed what, when (newest first); `audit verify` "
                                      "checks its hash chain, `audit refusals` shows refused calls")
    au.add_argument("what", nargs="?", choices=("list", "verify", "refusals"), default="list")
    au.add_argument("--limit", type=int, default=50)
    add_output_flag(au)
    add_server_flags(au)
    au.set_defaults(func=cmd_audit)

    ca = sub.add_parser("ca", help="the mesh certificate authority")
    csub = ca.add_subparsers(dest="ca_command", required=True)
    rot = csub.add_parser("rotate", help="new root now; the old one stays trusted for --overlap")
    rot.add_argument("--overlap", type=parse_duration, default=0,
                     help="how long the old root stays trusted (default: the CA's, 48h)")
    add_server_flags(rot)
    rot.set_defaults(func=cmd_ca_rotate)


def cmd_token_create(args: argparse.Namespace) -> int:
    labels = {}
    for item in args.label:
        k, sep, v = item.partition("=")
        if not sep or not k:
            raise CommandError(f"--label {item!r} must read KEY=VALUE", code=2)
        labels[k] = v
    with AdminClient(args.server) as c:
        resp = c.create_join_token_labels(args.node, args.ttl, labels)
    print(resp.token)
    print(f"join token for node {args.node}, valid once until "
          f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(resp.expires_unix))}; put it in the agent's "
          "controlPlane.joinTokenFile", file=sys.stderr)
    return 0


def cmd_operator_create(args: argparse.Namespace) -> int:
    csr_pem = ""
    key = None
    if args.cert_out:
        # The key is made here and never leaves this host; the CSR only proves it
        # (the control plane puts spiffe://<td>/operator/<name> in the certificate).
        key = ec.generate_private_key(ec.SECP256R1())
        csr_pem = (x509.CertificateSigningRequestBuilder()
                   .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, args.name)]))
                   .sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM).decode())
    with AdminClient(args.server) as c:
        resp = c.create_operator(args.name, args.role, csr_pem, args.ttl)
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(resp.expires_unix))
    if key is None:
        print(resp.token)
        print(f"bearer token of operator {args.name} (role {args.role}), credential {resp.credential_id}, valid until "
              f"{expires}; it is shown only now", file=sys.stderr)
        return 0
    key_path, cert_path = f"{args.cert_out}.key", f"{args.cert_out}.pem"
    # A fresh file made 0600 and renamed over any old one: truncating an existing
    # file would keep its mode, which may let others read the new key.
    write_private(key_path, key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.NoEncryption()))
    with open(cert_path, "w") as f:
        f.write("".join(resp.cert_chain))
    with open(f"{args.cert_out}-ca.pem", "w") as f:
        f.write("".join(resp.server_ca_bundle))
    print(f"wrote {cert_path}, {key_path} (0600) and {args.cert_out}-ca.pem: use --cert {cert_path} "
          f"--key {key_path} --ca-file {args.cert_out}-ca.pem (serial {resp.serial}, credential "
          f"{resp.credential_id}, valid until {expires})")
    return 0


def cmd_operator_revoke(args: argparse.Namespace) -> int:
    given = [x for x in (args.name, args.credential, args.serial) if x]
    if len(given) != 1:
        raise CommandError("give exactly one of NAME, --credential ID and --serial HEX", code=2)
    what = (f"operator {args.name}" if args.name else f"credential {args.credential}" if args.credential
            else f"certificate serial {args.serial}")
    with AdminClient(args.server) as c:
        revoked = c.revoke_operator(args.name, args.credential, args.serial)
    if not revoked:
        raise CommandError(f"{what} not found (or already revoked)",
                           "`nodemesh audit` lists operators' changes; a revoked credential stays revoked")
    print(f"{what} revoked")
    return 0


def cmd_node_revoke(args: argparse.Namespace) -> int:
    with AdminClient(args.server) as c:
        resp = c.revoke_node(args.name)
    print(f"node {args.name} {'revoked' if resp.revoked else 'was already revoked'}: "
          f"{resp.certificates_revoked} certificate(s) refused from now on, {resp.streams_closed} open stream(s) "
          f"closed, endpoints {'withdrawn' if resp.endpoints_withdrawn else 'not registered'}; it must join again "
          f"with a new token (`nodemesh token create --node {args.name}`)")
    return 0


def cmd_node_list(args: argparse.Namespace) -> int:
    with AdminClient(args.server) as c:
        nodes = c.node_identities()

    def iso(t: int) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else ""

    docs = [{"name": n.name, "labels": dict(n.labels), "join_address": n.join_address, "joined": iso(n.joined_unix),
             "revoked": iso(n.revoked_unix), "certificates": list(n.serials), "refusals": list(n.refusals)}
            for n in nodes]
    emit(docs, args.output, lambda docs: table(
        ("NODE", "LABELS", "JOINED FROM", "REVOKED", "CERTS", "LAST REFUSAL"),
        [(d["name"], ",".join(f"{k}={v}" for k, v in sorted(d["labels"].items())), d["join_address"], d["revoked"],
          len(d["certificates"]), d["refusals"][0] if d["refusals"] else "") for d in docs]))
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    if args.what == "verify":
        return cmd_audit_verify(args)
    if args.what == "refusals":
        return cmd_audit_refusals(args)
    with AdminClient(args.server) as c:
        entries = c.audit(args.limit)
    docs = [{"seq": a.seq, "time_unix_ms": a.unix_ms, "principal": a.principal, "action": a.action,
             "detail": a.detail, "outcome": a.outcome, "hash": a.hash} for a in entries]
    emit(docs, args.output, lambda docs: table(
        ("TIME", "PRINCIPAL", "ACTION", "OUTCOME", "DETAIL"),
        [(time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(d["time_unix_ms"] / 1000)), d["principal"], d["action"],
          d["outcome"], d["detail"]) for d in docs]))
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    with AdminClient(args.server) as c:
        v = c.verify_audit()
    def human(d: dict[str, Any]) -> str:
        if d["ok"]:
            return f"audit chain intact: {d['records']} change record(s), seq {d['first_seq']}..{d['last_seq']}"
        return (f"AUDIT CHAIN BROKEN after {d['records']} good record(s) (seq {d['first_seq']}..{d['last_seq']}): "
                f"{d['problem']}")

    emit({"ok": v.ok, "records": v.records, "first_seq": v.first_seq, "last_seq": v.last_seq, "problem": v.problem},
         args.output, human)
    return 0 if v.ok else 3


def cmd_audit_refusals(args: argparse.Namespace) -> int:
    with AdminClient(args.server) as c:
        r = c.refusals(args.limit)
    doc = {"total": r.total,
           "counts": [{"method": x.method, "code": x.code, "principal": x.principal, "count": x.count}
                      for x in r.counts],
           "samples": [{"time_unix_ms": x.unix_ms, "principal": x.principal, "method": x.action, "peer": x.detail,
                        "outcome": x.outcome} for x in r.samples]}

    def human(d: dict[str, Any]) -> str:
        lines = [f"{d['total']} refused call(s) since the control plane started (kept apart from the change log)"]
        lines += [f"  {x['count']:>8}  {x['method']}  {x['code']}  {x['principal']}" for x in d["counts"]]
        lines += [f"  {time.strftime('%H:%M:%SZ', time.gmtime(x['time_unix_ms'] / 1000))} {x['principal']} "
                  f"{x['method']} {x['peer']}: {x['outcome']}" for x in d["samples"]]
        return "\n".join(lines)

    emit(doc, args.output, human)
    return 0


def cmd_ca_rotate(args: argparse.Namespace) -> int:
    with AdminClient(args.server) as c:
        resp = c.rotate_root(args.overlap)
    print(f"rotated the mesh root {resp.old_fingerprint} -> {resp.new_fingerprint}; the old root stays trusted "
          f"until {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(resp.old_trusted_until_unix))}; agents "
          "re-issue their workload certificates from the new root now")
    return 0
