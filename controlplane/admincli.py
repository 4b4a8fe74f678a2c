"""Operator commands of the admin API (controlplane/auth.py): `nodemesh token
create`, `nodemesh operator create|revoke`, `nodemesh audit`, `nodemesh ca rotate`."""

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

from controlplane.client import ClientError, ConfigClient, add_credential_flags, default_server
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smhd]?)$")


def parse_duration(text: str) -> int:
    """'90', '90s', '30m', '1h', '2d' -> seconds."""
    m = _DURATION.match(text.strip())
    if not m:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration like 90s, 30m, 1h or 2d")
    return int(float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)])


class AdminClient(ConfigClient):
    """The Admin service over the same channel and credentials as the config client."""

    def admin(self, method: str, request: object) -> object:
        stub = mesh_pb2_grpc.AdminStub(self._channel)  # type: ignore[no-untyped-call]
        return self._call(method, request, stub)

    def create_join_token(self, node: str, ttl_s: int = 0) -> mesh_pb2.CreateJoinTokenResponse:
        resp = self.admin("CreateJoinToken", mesh_pb2.CreateJoinTokenRequest(node_name=node, ttl_seconds=ttl_s))
        assert isinstance(resp, mesh_pb2.CreateJoinTokenResponse)
        return resp

    def create_operator(self, name: str, role: str, csr_pem: str = "", ttl_s: int = 0) -> mesh_pb2.CreateOperatorResponse:
        resp = self.admin("CreateOperator", mesh_pb2.CreateOperatorRequest(name=name, role=role, csr_pem=csr_pem,
                                                                           ttl_seconds=ttl_s))
        assert isinstance(resp, mesh_pb2.CreateOperatorResponse)
        return resp

    def revoke_operator(self, name: str) -> bool:
        resp = self.admin("RevokeOperator", mesh_pb2.RevokeOperatorRequest(name=name))
        assert isinstance(resp, mesh_pb2.RevokeOperatorResponse)
        return resp.revoked

    def audit(self, limit: int = 100) -> list[mesh_pb2.AuditEntry]:
        resp = self.admin("Audit", mesh_pb2.AuditRequest(limit=limit))
        assert isinstance(resp, mesh_pb2.AuditResponse)
        return list(resp.entries)

    def rotate_root(self, overlap_s: int = 0) -> mesh_pb2.RotateRootResponse:
        resp = self.admin("RotateRoot", mesh_pb2.RotateRootRequest(overlap_seconds=overlap_s))
        assert isinstance(resp, mesh_pb2.RotateRootResponse)
        return resp


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
    orv = osub.add_parser("revoke", help="disable an operator's token and certificates")
    orv.add_argument("name")
    _common(orv)
    orv.set_defaults(func=cmd_operator_revoke)

    au = sub.add_parser("audit", help="the audit log: who changed what, when (newest first)")
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
    try:
        with AdminClient(args.server) as c:
            resp = c.create_join_token(args.node, args.ttl)
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
    if key is None:
        print(resp.token)
        print(f"bearer token of operator {args.name} (role {args.role}); it is shown only now", file=sys.stderr)
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
          f"--key {key_path} --ca-file {args.cert_out}-ca.pem")
    return 0


def cmd_operator_revoke(args: argparse.Namespace) -> int:
    try:
        with AdminClient(args.server) as c:
            revoked = c.revoke_operator(args.name)
    except ClientError as e:
        return _fail(e)
    if not revoked:
        print(f"error: operator {args.name} not found (or already revoked)", file=sys.stderr)
        return 1
    print(f"operator {args.name} revoked")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    try:
        with AdminClient(args.server) as c:
            entries = c.audit(args.limit)
    except ClientError as e:
        return _fail(e)
    if args.output == "json":
        print(json.dumps([{"time_unix_ms": a.unix_ms, "principal": a.principal, "action": a.action,
                           "detail": a.detail, "outcome": a.outcome} for a in entries], indent=2))
        return 0
    rows = [("TIME", "PRINCIPAL", "ACTION", "OUTCOME", "DETAIL")]
    for a in entries:
        rows.append((time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(a.unix_ms / 1000)), a.principal, a.action,
                     a.outcome, a.detail))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])
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
