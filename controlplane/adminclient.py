"""The Admin service client (controlplane/adminapi.py's servicer): join tokens,
operators, node identities, audit and CA rotation, over the same channel and
credentials as the config client. Used by `nodemesh token|operator|node|audit|ca`,
the namespace lab and tests."""

from __future__ import annotations

from typing import TypeVar

from controlplane.apiclient import ConfigClient
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc

_Response = TypeVar("_Response")


class AdminClient(ConfigClient):
    """The Admin service over the same channel and credentials as the config client."""

    def admin(self, method: str, request: object, want: type[_Response]) -> _Response:
        return self._call(method, request, want, mesh_pb2_grpc.AdminStub(self._channel))  # type: ignore[no-untyped-call]

    def create_join_token(self, node: str, ttl_s: int = 0) -> mesh_pb2.CreateJoinTokenResponse:
        return self.create_join_token_labels(node, ttl_s, {})

    def create_join_token_labels(self, node: str, ttl_s: int,
                                 labels: dict[str, str]) -> mesh_pb2.CreateJoinTokenResponse:
        req = mesh_pb2.CreateJoinTokenRequest(node_name=node, ttl_seconds=ttl_s, node_labels=labels)
        return self.admin("CreateJoinToken", req, mesh_pb2.CreateJoinTokenResponse)

    def create_operator(self, name: str, role: str, csr_pem: str = "",
                        ttl_s: int = 0) -> mesh_pb2.CreateOperatorResponse:
        req = mesh_pb2.CreateOperatorRequest(name=name, role=role, csr_pem=csr_pem, ttl_seconds=ttl_s)
        return self.admin("CreateOperator", req, mesh_pb2.CreateOperatorResponse)

    def revoke_operator(self, name: str = "", credential_id: str = "", serial: str = "") -> bool:
        req = mesh_pb2.RevokeOperatorRequest(name=name, credential_id=credential_id, serial=serial)
        return self.admin("RevokeOperator", req, mesh_pb2.RevokeOperatorResponse).revoked

    def revoke_node(self, name: str) -> mesh_pb2.RevokeNodeResponse:
        return self.admin("RevokeNode", mesh_pb2.RevokeNodeRequest(name=name), mesh_pb2.RevokeNodeResponse)

    def node_identities(self) -> list[mesh_pb2.NodeIdentity]:
        resp = self.admin("ListNodeIdentities", mesh_pb2.ListNodeIdentitiesRequest(),
                          mesh_pb2.ListNodeIdentitiesResponse)
        return list(resp.nodes)

    def verify_audit(self) -> mesh_pb2.VerifyAuditResponse:
        return self.admin("VerifyAudit", mesh_pb2.VerifyAuditRequest(), mesh_pb2.VerifyAuditResponse)

    def refusals(self, limit: int = 50) -> mesh_pb2.RefusalsResponse:
        return self.admin("Refusals", mesh_pb2.RefusalsRequest(limit=limit), mesh_pb2.RefusalsResponse)

    def audit(self, limit: int = 100) -> list[mesh_pb2.AuditEntry]:
        return list(self.admin("Audit", mesh_pb2.AuditRequest(limit=limit), mesh_pb2.AuditResponse).entries)

    def rotate_root(self, overlap_s: int = 0) -> mesh_pb2.RotateRootResponse:
        return self.admin("RotateRoot", mesh_pb2.RotateRootRequest(overlap_seconds=overlap_s),
                          mesh_pb2.RotateRootResponse)
