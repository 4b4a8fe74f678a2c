"""A small synchronous client of the config API, for the CLI."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Self

import grpc

from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc

DEFAULT_SERVER = "unix:/run/nodemesh/controlplane.sock"
SERVER_ENV = "NODEMESH_SERVER"


def default_server() -> str:
    return os.environ.get(SERVER_ENV) or DEFAULT_SERVER


class ClientError(Exception):
    """A call to the control plane failed; the message is the server's."""

    def __init__(self, code: grpc.StatusCode | None, message: str) -> None:
        self.code = code
        super().__init__(message)


@dataclass(frozen=True)
class ApplyOutcome:
    kind: str
    namespace: str
    name: str
    action: str
    resource_version: int

    def __str__(self) -> str:
        where = f"{self.namespace}/{self.name}" if self.namespace else self.name
        return f"{self.kind.lower()}/{where} {self.action}"


class ConfigClient:
    def __init__(self, target: str | None = None, timeout_s: float = 10.0) -> None:
        self.target = target or default_server()
        self._timeout = timeout_s
        self._channel = grpc.insecure_channel(self.target)
        self._stub = mesh_pb2_grpc.ConfigServiceStub(self._channel)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: object) -> object:
        try:
            return getattr(self._stub, method)(request, timeout=self._timeout)
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            details = e.details() if hasattr(e, "details") else str(e)
            if code == grpc.StatusCode.UNAVAILABLE:
                details = (f"cannot reach the control plane at {self.target}: {details}; check that it "
                           f"runs and that --server or ${SERVER_ENV} points at it")
            raise ClientError(code, details) from None

    def apply(self, documents: str, dry_run: bool = False) -> list[ApplyOutcome]:
        resp = self._call("Apply", mesh_pb2.ApplyRequest(documents=documents, dry_run=dry_run))
        assert isinstance(resp, mesh_pb2.ApplyResponse)
        return [ApplyOutcome(r.kind, r.namespace, r.name, r.action, r.resource_version)
                for r in resp.results]

    def get(self, kind: str, name: str, namespace: str = "") -> mesh_pb2.Resource:
        resp = self._call("Get", mesh_pb2.ResourceRef(kind=kind, namespace=namespace, name=name))
        assert isinstance(resp, mesh_pb2.Resource)
        return resp

    def list(self, kind: str = "", namespace: str = "") -> list[mesh_pb2.Resource]:
        resp = self._call("List", mesh_pb2.ListRequest(kind=kind, namespace=namespace))
        assert isinstance(resp, mesh_pb2.ListResponse)
        return list(resp.resources)

    def delete(self, kind: str, name: str, namespace: str = "") -> bool:
        resp = self._call("Delete", mesh_pb2.ResourceRef(kind=kind, namespace=namespace, name=name))
        assert isinstance(resp, mesh_pb2.DeleteResponse)
        return resp.deleted
