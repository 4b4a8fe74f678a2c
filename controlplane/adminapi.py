"""nodemesh.v1.Admin: join tokens, operators and their credentials, node
revocation, the audit chain and refused calls, and root rotation."""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import grpc
from cryptography import x509

from controlplane.interceptor import current_caller
from controlplane.operators import OperatorError, Operators, clamp_operator_ttl
from controlplane.store import off_loop
from controlplane.tokens import DEFAULT_TOKEN_TTL_S, check_node_name, load_csr
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc

if TYPE_CHECKING:
    from controlplane.auth import Security
    from controlplane.ca import CertificateAuthority

log = logging.getLogger("nodemesh.controlplane.auth")

MAX_NODE_LABELS = 32


def check_node_labels(labels: dict[str, str]) -> None:
    if len(labels) > MAX_NODE_LABELS:
        raise ValueError(f"node_labels: at most {MAX_NODE_LABELS} labels")
    for k, v in labels.items():
        if not k or len(k) > 63 or len(v) > 63 or not all(c.isalnum() or c in "-_./" for c in k + v):
            raise ValueError(f"node_labels: {k}={v} must be label names and values (letters, digits, '-', '_', "
                             "'.', '/'; at most 63 characters each)")


class AdminServicer(mesh_pb2_grpc.AdminServicer):
    def __init__(self, security: Security, ca: CertificateAuthority, trust_domain: Callable[[], str],
                 republish: Callable[[], None], registry: Any = None) -> None:
        self._sec = security
        self._ca = ca
        self._trust_domain = trust_domain
        self._republish = republish
        self._registry = registry  # controlplane.noderegistry.NodeRegistry: endpoints of revoked nodes go at once

    async def CreateJoinToken(self, request: mesh_pb2.CreateJoinTokenRequest,
                              context: grpc.aio.ServicerContext) -> mesh_pb2.CreateJoinTokenResponse:
        try:
            check_node_name(request.node_name)
            labels = dict(request.node_labels)
            check_node_labels(labels)
            token, expires = await off_loop(self._sec.tokens.blocking, self._sec.tokens.create, request.node_name,
                                            request.ttl_seconds or DEFAULT_TOKEN_TTL_S, self._sec.cp_ca.pin)
            # The operator's labels for the node: identity bindings match on them (nodeSelector).
            await off_loop(self._sec.blocking, self._sec.nodes.set_labels, request.node_name, labels)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return mesh_pb2.CreateJoinTokenResponse(token=token, expires_unix=int(expires))

    async def CreateOperator(self, request: mesh_pb2.CreateOperatorRequest,
                             context: grpc.aio.ServicerContext) -> mesh_pb2.CreateOperatorResponse:
        try:
            ttl = clamp_operator_ttl(int(request.ttl_seconds))
            if not request.csr_pem:
                token, cid, expires = await off_loop(self._sec.blocking, self._sec.operators.create_token,
                                                     request.name, request.role, ttl)
                return mesh_pb2.CreateOperatorResponse(token=token, server_ca_bundle=[self._sec.cp_ca.pem],
                                                       credential_id=cid, expires_unix=int(expires))
            Operators._check(request.name, request.role)
            uri = f"spiffe://{self._trust_domain()}/operator/{request.name}"
            csr = load_csr(request.csr_pem)
            cert = self._sec.cp_ca.sign_client(csr.public_key(), uri, datetime.timedelta(seconds=ttl))
            leaf = x509.load_pem_x509_certificate(cert.encode())
            serial = format(leaf.serial_number, "x")
            cid = await off_loop(self._sec.blocking, self._sec.operators.register_cert, request.name, request.role,
                                 serial, leaf.not_valid_after_utc.timestamp())
        except (OperatorError, ValueError) as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        return mesh_pb2.CreateOperatorResponse(cert_chain=[cert, self._sec.cp_ca.pem],
                                               server_ca_bundle=[self._sec.cp_ca.pem], credential_id=cid,
                                               serial=serial, expires_unix=int(leaf.not_valid_after_utc.timestamp()))

    async def RevokeOperator(self, request: mesh_pb2.RevokeOperatorRequest,
                             context: grpc.aio.ServicerContext) -> mesh_pb2.RevokeOperatorResponse:
        given = [f for f in ("name", "credential_id", "serial") if getattr(request, f)]
        if len(given) != 1:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                "give exactly one of name, credential_id and serial")
        caller = current_caller()
        ops = self._sec.operators
        target = request.name or ops.credential_owner(request.credential_id or f"cert-{request.serial.lower()}")
        if caller is not None and caller.kind == "operator" and caller.name == target and request.name:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                "an operator cannot revoke itself; use another rw credential")
        if request.name:
            n = await off_loop(self._sec.blocking, ops.revoke, request.name)
        elif request.credential_id:
            n = int(await off_loop(self._sec.blocking, ops.revoke_credential, request.credential_id))
        else:
            n = int(await off_loop(self._sec.blocking, ops.revoke_serial, request.serial))
        return mesh_pb2.RevokeOperatorResponse(revoked=n > 0, credentials_revoked=n)

    async def RevokeNode(self, request: mesh_pb2.RevokeNodeRequest,
                         context: grpc.aio.ServicerContext) -> mesh_pb2.RevokeNodeResponse:
        try:
            check_node_name(request.name)
        except ValueError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        caller = current_caller()
        by = caller.principal if caller is not None else "local"
        fresh, certs, written = await off_loop(self._sec.blocking, self._sec.nodes.revoke, request.name, by)
        if self._sec.revocations is not None:
            # Its SVIDs issued so far go into the push below: every node refuses them at HBONE.
            self._sec.revocations.note(written)
        reason = (f"node {request.name} was revoked by {by} at "
                  f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}")
        closed = self._sec.interceptor.guard.close_node(request.name, reason)
        withdrawn = False
        if self._registry is not None:
            withdrawn = self._registry.withdraw(request.name, reason)  # on the loop: it tells the publisher
        # One push, now: every node drops the revoked node's endpoints and refuses its SVIDs.
        self._republish()
        log.warning("%s: %d certificate(s) refused from now on, %d open stream(s) closed, endpoints %s",
                    reason, certs, closed, "withdrawn" if withdrawn else "were not registered")
        return mesh_pb2.RevokeNodeResponse(revoked=fresh, certificates_revoked=certs, streams_closed=closed,
                                           endpoints_withdrawn=withdrawn)

    async def ListNodeIdentities(self, request: mesh_pb2.ListNodeIdentitiesRequest,
                                 context: grpc.aio.ServicerContext) -> mesh_pb2.ListNodeIdentitiesResponse:
        out = []
        for rec in self._sec.nodes.all():
            out.append(mesh_pb2.NodeIdentity(
                name=rec.name, labels=dict(rec.labels), join_address=rec.join_address,
                joined_unix=int(rec.joined_unix), revoked_unix=int(rec.revoked_unix),
                serials=sorted(rec.serials), refusals=self._sec.refusals.node_refusals(rec.name)))
        return mesh_pb2.ListNodeIdentitiesResponse(nodes=out)

    async def Audit(self, request: mesh_pb2.AuditRequest,
                    context: grpc.aio.ServicerContext) -> mesh_pb2.AuditResponse:
        entries = await off_loop(self._sec.blocking, self._sec.audit.entries, int(request.limit or 100))
        return mesh_pb2.AuditResponse(entries=entries)

    async def VerifyAudit(self, request: mesh_pb2.VerifyAuditRequest,
                          context: grpc.aio.ServicerContext) -> mesh_pb2.VerifyAuditResponse:
        v = await asyncio.to_thread(self._sec.audit.verify)
        return mesh_pb2.VerifyAuditResponse(ok=v.ok, records=v.records, first_seq=v.first_seq, last_seq=v.last_seq,
                                            problem=v.problem)

    async def Refusals(self, request: mesh_pb2.RefusalsRequest,
                       context: grpc.aio.ServicerContext) -> mesh_pb2.RefusalsResponse:
        return self._sec.refusals.response(int(request.limit or 50))

    async def RotateRoot(self, request: mesh_pb2.RotateRootRequest,
                         context: grpc.aio.ServicerContext) -> mesh_pb2.RotateRootResponse:
        from controlplane.ca import DEFAULT_ROTATION_OVERLAP_S, CaError

        overlap = float(request.overlap_seconds or DEFAULT_ROTATION_OVERLAP_S)
        try:
            old, new = await asyncio.to_thread(self._ca.rotate, self._trust_domain(), overlap)
        except CaError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(e))
        # Both roots go out over xDS at once; agents then re-issue their SVIDs from the new root.
        self._republish()
        return mesh_pb2.RotateRootResponse(old_fingerprint=old, new_fingerprint=new,
                                           old_trusted_until_unix=int(time.time() + overlap))
