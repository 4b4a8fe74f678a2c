"""A small synchronous client of the config API, for the CLI.

Credentials (docs/security.md "Control plane access"): a unix socket is
local-admin and needs none; a TCP address is TLS, verified with the control
plane's CA ($NODEMESH_CA_FILE / --ca-file, its state dir's cp-ca.pem), and
the call carries an operator bearer token ($NODEMESH_TOKEN, or the file
$NODEMESH_TOKEN_FILE / --token-file) or a client certificate
($NODEMESH_CERT and $NODEMESH_KEY / --cert --key)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from typing import Self, TypeVar

import grpc

from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc

DEFAULT_SERVER = "unix:/run/nodemesh/controlplane.sock"
SERVER_ENV = "NODEMESH_SERVER"


_Response = TypeVar("_Response")

TOKEN_ENV = "NODEMESH_TOKEN"  # noqa: S105 (the name of an environment variable)
TOKEN_FILE_ENV = "NODEMESH_TOKEN_FILE"  # noqa: S105 (the name of an environment variable)
CA_FILE_ENV = "NODEMESH_CA_FILE"
CERT_ENV = "NODEMESH_CERT"
KEY_ENV = "NODEMESH_KEY"


def default_server() -> str:
    return os.environ.get(SERVER_ENV) or DEFAULT_SERVER


class _EnvFlag(argparse.Action):
    """A credential flag sets its environment variable, so every client made
    later in the command (config, admin, authz check) sees it."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: object,
                 option_string: str | None = None) -> None:
        os.environ[str(self.const)] = str(values)
        setattr(namespace, self.dest, values)


def add_credential_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--token-file", action=_EnvFlag, const=TOKEN_FILE_ENV, metavar="FILE",
                   help=f"operator bearer token file (default: ${TOKEN_ENV} or ${TOKEN_FILE_ENV})")
    p.add_argument("--ca-file", action=_EnvFlag, const=CA_FILE_ENV, metavar="FILE",
                   help=f"the control plane's CA (cp-ca.pem in its state dir), for TCP addresses (${CA_FILE_ENV})")
    p.add_argument("--cert", action=_EnvFlag, const=CERT_ENV, metavar="FILE",
                   help=f"operator client certificate (${CERT_ENV}); with --key")
    p.add_argument("--key", action=_EnvFlag, const=KEY_ENV, metavar="FILE", help=f"its key (${KEY_ENV})")


@dataclass(frozen=True)
class Credentials:
    token: str = ""
    ca_pem: bytes = b""
    cert_pem: bytes = b""
    key_pem: bytes = b""

    @classmethod
    def from_env(cls) -> Credentials:
        def read(env: str) -> bytes:
            path = os.environ.get(env, "")
            if not path:
                return b""
            try:
                with open(path, "rb") as f:
                    return f.read()
            except OSError as e:
                raise ClientError(None, f"cannot read {path} (${env}): {e}") from None

        token = os.environ.get(TOKEN_ENV, "") or read(TOKEN_FILE_ENV).decode().strip()
        cert, key = read(CERT_ENV), read(KEY_ENV)
        if bool(cert) != bool(key):
            raise ClientError(None, "a client certificate needs both --cert and --key ($NODEMESH_CERT, $NODEMESH_KEY)")
        return cls(token=token, ca_pem=read(CA_FILE_ENV), cert_pem=cert, key_pem=key)

    def metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),) if self.token else ()


def open_channel(target: str, creds: Credentials) -> grpc.Channel:
    if target.startswith("unix:"):
        return grpc.insecure_channel(target)  # local admin: the socket's file mode is the access control
    if not creds.ca_pem:
        raise ClientError(None, f"{target} is a TCP address, where the control plane serves TLS: pass --ca-file "
                                f"(cp-ca.pem in its state dir) or set ${CA_FILE_ENV}")
    return grpc.secure_channel(target, grpc.ssl_channel_credentials(
        creds.ca_pem, creds.key_pem or None, creds.cert_pem or None))


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
    def __init__(self, target: str | None = None, timeout_s: float = 10.0,
                 credentials: Credentials | None = None) -> None:
        self.target = target or default_server()
        self._timeout = timeout_s
        self.credentials = credentials if credentials is not None else Credentials.from_env()
        self._channel = open_channel(self.target, self.credentials)
        self._stub = mesh_pb2_grpc.ConfigServiceStub(self._channel)  # type: ignore[no-untyped-call]

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, request: object, want: type[_Response], stub: object = None) -> _Response:
        try:
            resp = getattr(stub or self._stub, method)(request, timeout=self._timeout,
                                                       metadata=self.credentials.metadata())
        except grpc.RpcError as e:
            code = e.code() if hasattr(e, "code") else None
            details = e.details() if hasattr(e, "details") else str(e)
            if code == grpc.StatusCode.UNAVAILABLE:
                details = (f"cannot reach the control plane at {self.target}: {details}; check that it "
                           f"runs and that --server or ${SERVER_ENV} points at it")
            raise ClientError(code, details) from None
        if not isinstance(resp, want):
            raise ClientError(None, f"{method}: the control plane answered {type(resp).__name__}, not "
                                    f"{want.__name__} (a control plane of another version?)")
        return resp

    def apply(self, documents: str, dry_run: bool = False) -> list[ApplyOutcome]:
        resp = self._call("Apply", mesh_pb2.ApplyRequest(documents=documents, dry_run=dry_run),
                          mesh_pb2.ApplyResponse)
        return [ApplyOutcome(r.kind, r.namespace, r.name, r.action, r.resource_version)
                for r in resp.results]

    def get(self, kind: str, name: str, namespace: str = "") -> mesh_pb2.Resource:
        return self._call("Get", mesh_pb2.ResourceRef(kind=kind, namespace=namespace, name=name), mesh_pb2.Resource)

    def list(self, kind: str = "", namespace: str = "") -> list[mesh_pb2.Resource]:
        return list(self._call("List", mesh_pb2.ListRequest(kind=kind, namespace=namespace),
                               mesh_pb2.ListResponse).resources)

    def delete(self, kind: str, name: str, namespace: str = "") -> bool:
        ref = mesh_pb2.ResourceRef(kind=kind, namespace=namespace, name=name)
        return self._call("Delete", ref, mesh_pb2.DeleteResponse).deleted
