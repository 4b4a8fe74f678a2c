"""`nodemesh token create`, `operator create|revoke`, `node list|revoke`, `audit`,
`ca rotate`: operator commands over the Admin API (controlplane/adminclient.py)."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from controlplane.adminclient import AdminClient
from controlplane.client import ClientError, add_credential_flags, default_server

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")


def parse_duration(text: str) -> int:
    """'90', '90s', '30m', '1h', '2d' -> seconds."""
    m = _DURATION.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 30m, 1h or 2d")
    return int(float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)])


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--server", default=None, help=f"control plane address (default: $NODEMESH_SERVER or "
                                                  f"{default_server()})")
    add_credential_flags(p)


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    tok = sub.add_parser("token", help="join tokens for node agents")
    tsub = tok.add_subparsers(dest="token_command", required=True)
    tc = tsub.add_parser("create", help="a one-time, expiring join token for one node (printed once)")
    tc.add_argument("--node", required=True, help="the node name the agent uses (node.name)")
    tc.add_argument("--ttl", type=parse_duration, default=3600, help="how long it can be used (default 1h)")
    tc.add_argument("--label", action="append", default=[], metavar="KEY=VALUE",
                    help="a label of the node, set by you (identity bindings' nodeSelector matches it); repeatable")
    _common(tc)
    tc.set_defaults(func=cmd_token_create)

    op = sub.add_parser("operator", help="operator credentials for the config and admin APIs")
    osub = op.add_subparsers(dest="operator_command", required=True)
    oc = osub.add_parser("create", help="a bearer token (printed once) or, with --cert-out, a client certificate")
    oc.add_argument("name")
    oc.add_argument("--role", required=True, choices=("ro", "rw"), help="ro: get/list/watch/audit; rw: everything")
    oc.add_argument("--cert-out", metavar="PREFIX", default="",
                    help="write PREFIX.key (0600, made here) and PREFIX.pem instead of making a token")
    oc.add_argument("--ttl", type=parse_duration, default=0, help="certificate lifetime (default 30d)")
    _common(oc)
    oc.set_defaults(func=cmd_operator_create)
    orv = osub.add_parser("revoke", help="revoke an operator (every credential it holds), or one credential by "
                                         "--credential ID or --serial HEX; revoked ones never come back")
    orv.add_argument("name", nargs="?", default="")
    orv.add_argument("--credential", default="", metavar="ID", help="a credential id (token id, or cert-<serial>)")
    orv.add_argument("--serial", default="", metavar="HEX", help="an operator certificate's serial number (hex)")
    _common(orv)
    orv.set_defaults(func=cmd_operator_revoke)

    nd = sub.add_parser("node", help="node identities: list them, revoke one")
    nsub = nd.add_subparsers(dest="node_command", required=True)
    nrv = nsub.add_parser("revoke", help="revoke a node now: its certificates are refused, its open streams "
                                         "closed, its endpoints withdrawn; it must join again with a new token")
    nrv.add_argument("name")
    _common(nrv)
    nrv.set_defaults(func=cmd_node_revoke)
    nls = nsub.add_parser("list", help="node identities: labels, join address, certificates, revocation, "
                                       "recent refusals")
    nls.add_argument("-o", "--output", choices=("table", "json"), default="table")
    _common(nls)
    nls.set_defaults(func=cmd_node_list)

    au = sub.add_parser("audit", help="the audit log: who changed what, when (newest first); `audit verify` "
                                      "checks its hash chain, `audit refusals` shows refused calls")
    au.add_argument("what", nargs="?", choices=("list", "verify", "refusals"), default="list")
    au.add_argument("--limit", type=int, default=50)
    au.add_argument("-o", "--output", choices=("table", "json"), default="table")
    _common(au)
    au.set_defaults(func=cmd_audit)

    ca = sub.add_parser("ca", help="the mesh certificate authority")
    csub = ca.add_subparsers(dest="ca_command", required=True)
    rot = csub.add_parser("rotate", help="new root now; the old one stays trusted for --overlap")
    rot.add_argument("--overlap", type=parse_duration, default=0,
                     help="how long the old root stays trusted (default: the CA's, 48h)")
    _common(rot)
    rot.set_defaults(func=cmd_ca_rotate)


def _fail(e: ClientError) -> int:
    print(f"error: {e}", file=sys.stderr)
    return 1


def cmd_token_create(args: argparse.Namespace) -> int:
    labels = {}
    for item in args.label:
        k, sep, v = item.partition("=")
        if not sep or not k:
            print(f"error: --label {item!r} must read KEY=VALUE", file=sys.stderr)
            return 2
        labels[k] = v
    try:
        with AdminClient(args.server) as c:
            resp = c.create_join_token_labels(args.node, args.ttl, labels)
    except ClientError as e:
        return _fail(e)
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
    try:
        with AdminClient(args.server) as c:
            resp = c.create_operator(args.name, args.role, csr_pem, args.ttl)
    except ClientError as e:
        return _fail(e)
    expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(resp.expires_unix))
    if key is None:
        print(resp.token)
        print(f"bearer token of operator {args.name} (role {args.role}), credential {resp.credential_id}, valid until "
              f"{expires}; it is shown only now", file=sys.stderr)
        return 0
    key_path, cert_path = f"{args.cert_out}.key", f"{args.cert_out}.pem"
    # A fresh file made 0600 and renamed over any old one: truncating an existing
    # file would keep its mode, which may let others read the new key.
    from controlplane.auth import write_private

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
        print("error: give exactly one of NAME, --credential ID and --serial HEX", file=sys.stderr)
        return 2
    what = (f"operator {args.name}" if args.name else f"credential {args.credential}" if args.credential
            else f"certificate serial {args.serial}")
    try:
        with AdminClient(args.server) as c:
            revoked = c.revoke_operator(args.name, args.credential, args.serial)
    except ClientError as e:
        return _fail(e)
    if not revoked:
        print(f"error: {what} not found (or already revoked)", file=sys.stderr)
        return 1
    print(f"{what} revoked")
    return 0


def cmd_node_revoke(args: argparse.Namespace) -> int:
    try:
        with AdminClient(args.server) as c:
            resp = c.revoke_node(args.name)
    except ClientError as e:
        return _fail(e)
    print(f"node {args.name} {'revoked' if resp.revoked else 'was already revoked'}: "
          f"{resp.certificates_revoked} certificate(s) refused from now on, {resp.streams_closed} open stream(s) "
          f"closed, endpoints {'withdrawn' if resp.endpoints_withdrawn else 'not registered'}; it must join again "
          f"with a new token (`nodemesh token create --node {args.name}`)")
    return 0


def cmd_node_list(args: argparse.Namespace) -> int:
    try:
        with AdminClient(args.server) as c:
            nodes = c.node_identities()
    except ClientError as e:
        return _fail(e)

    def iso(t: int) -> str:
        return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t)) if t else ""

    if args.output == "json":
        print(json.dumps([{"name": n.name, "labels": dict(n.labels), "join_address": n.join_address,
                           "joined": iso(n.joined_unix), "revoked": iso(n.revoked_unix),
                           "certificates": list(n.serials), "refusals": list(n.refusals)} for n in nodes], indent=2))
        return 0
    rows = [("NODE", "LABELS", "JOINED FROM", "REVOKED", "CERTS", "LAST REFUSAL")]
    for n in nodes:
        rows.append((n.name, ",".join(f"{k}={v}" for k, v in sorted(n.labels.items())) or "-",
                     n.join_address or "-", iso(n.revoked_unix) or "-", str(len(n.serials)),
                     n.refusals[0] if n.refusals else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[5])
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    if args.what == "verify":
        return cmd_audit_verify(args)
    if args.what == "refusals":
        return cmd_audit_refusals(args)
    try:
        with AdminClient(args.server) as c:
            entries = c.audit(args.limit)
    except ClientError as e:
        return _fail(e)
    if args.output == "json":
        print(json.dumps([{"seq": a.seq, "time_unix_ms": a.unix_ms, "principal": a.principal, "action": a.action,
                           "detail": a.detail, "outcome": a.outcome, "hash": a.hash} for a in entries], indent=2))
        return 0
    rows = [("TIME", "PRINCIPAL", "ACTION", "OUTCOME", "DETAIL")]
    for a in entries:
        rows.append((time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(a.unix_ms / 1000)), a.principal, a.action,
                     a.outcome, a.detail))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
    return 0


def cmd_audit_verify(args: argparse.Namespace) -> int:
    try:
        with AdminClient(args.server) as c:
            v = c.verify_audit()
    except ClientError as e:
        return _fail(e)
    if args.output == "json":
        print(json.dumps({"ok": v.ok, "records": v.records, "first_seq": v.first_seq, "last_seq": v.last_seq,
                          "problem": v.problem}, indent=2))
    elif v.ok:
        print(f"audit chain intact: {v.records} change record(s), seq {v.first_seq}..{v.last_seq}")
    else:
        print(f"AUDIT CHAIN BROKEN after {v.records} good record(s) (seq {v.first_seq}..{v.last_seq}): {v.problem}")
    return 0 if v.ok else 3


def cmd_audit_refusals(args: argparse.Namespace) -> int:
    try:
        with AdminClient(args.server) as c:
            r = c.refusals(args.limit)
    except ClientError as e:
        return _fail(e)
    if args.output == "json":
        print(json.dumps({"total": r.total,
                          "counts": [{"method": x.method, "code": x.code, "principal": x.principal, "count": x.count}
                                     for x in r.counts],
                          "samples": [{"time_unix_ms": x.unix_ms, "principal": x.principal, "method": x.action,
                                       "peer": x.detail, "outcome": x.outcome} for x in r.samples]}, indent=2))
        return 0
    print(f"{r.total} refused call(s) since the control plane started (kept apart from the change log)")
    for x in r.counts:
        print(f"  {x.count:>8}  {x.method}  {x.code}  {x.principal}")
    for x in r.samples:
        print(f"  {time.strftime('%H:%M:%SZ', time.gmtime(x.unix_ms / 1000))} {x.principal} {x.action} "
              f"{x.detail}: {x.outcome}")
    return 0


def cmd_ca_rotate(args: argparse.Namespace) -> int:
    try:
        with AdminClient(args.server) as c:
            resp = c.rotate_root(args.overlap)
    except ClientError as e:
        return _fail(e)
    print(f"rotated the mesh root {resp.old_fingerprint} -> {resp.new_fingerprint}; the old root stays trusted "
          f"until {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(resp.old_trusted_until_unix))}; agents "
          "re-issue their workload certificates from the new root now")
    return 0
