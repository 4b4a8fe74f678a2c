"""The Admin service client (controlplane/adminapi.py's servicer): join tokens,
operators, node identities, audit and CA rotation, over the same channel and
credentials as the config client. Used by `nodemesh token|operator|node|audit|ca`,
the namespace lab and tests."""

from __future__ import annotations

from controlplane.client import ConfigClient
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc


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

    def create_join_token_labels(self, node: str, ttl_s: int, labels: dict[str, str]) -> mesh_pb2.CreateJoinTokenResponse:
        resp = self.admin("CreateJoinToken", mesh_pb2.CreateJoinTokenRequest(node_name=node, ttl_seconds=ttl_s,
                                                                             node_labels=labels))
        assert isinstance(resp, mesh_pb2.CreateJoinTokenResponse)
        return resp

    def revoke_operator(self, name: str = "", credential_id: str = "", serial: str = "") -> bool:
        resp = self.admin("RevokeOperator", mesh_pb2.RevokeOperatorRequest(name=name, credential_id=credential_id,
                                                                           serial=serial))
        assert isinstance(resp, mesh_pb2.RevokeOperatorResponse)
        return resp.revoked

    def revoke_node(self, name: str) -> mesh_pb2.RevokeNodeResponse:
        resp = self.admin("RevokeNode", mesh_pb2.RevokeNodeRequest(name=name))
        assert isinstance(resp, mesh_pb2.RevokeNodeResponse)
        return resp

    def node_identities(self) -> list[mesh_pb2.NodeIdentity]:
        resp = self.admin("ListNodeIdentities", mesh_pb2.ListNodeIdentitiesRequest())
        assert isinstance(resp, mesh_pb2.ListNodeIdentitiesResponse)
        return list(resp.nodes)

    def verify_audit(self) -> mesh_pb2.VerifyAuditResponse:
        resp = self.admin("VerifyAudit", mesh_pb2.VerifyAuditRequest())
        assert isinstance(resp, mesh_pb2.VerifyAuditResponse)
        return resp

    def refusals(self, limit: int = 50) -> mesh_pb2.RefusalsResponse:
        resp = self.admin("Refusals", mesh_pb2.RefusalsRequest(limit=limit))
        assert isinstance(resp, mesh_pb2.RefusalsResponse)
        return resp

    def audit(self, limit: int = 100) -> list[mesh_pb2.AuditEntry]:
        resp = self.admin("Audit", mesh_pb2.AuditRequest(limit=limit))
        assert isinstance(resp, mesh_pb2.AuditResponse)
        return list(resp.entries)

    def rotate_root(self, overlap_s: int = 0) -> mesh_pb2.RotateRootResponse:
        resp = self.admin("RotateRoot", mesh_pb2.RotateRootRequest(overlap_seconds=overlap_s))
        assert isinstance(resp, mesh_pb2.RotateRootResponse)
        return resp
