"""Who is calling, and may they: the gRPC interceptor in front of every servicer.

`AuthInterceptor` identifies the caller (unix socket = local admin; a client
certificate chaining to the control-plane CA: a node, whose certificate serial
must be a valid one of that node (controlplane/nodeids.py), or an operator,
whose certificate serial must be a live credential; else a bearer token),
decides per RPC (METHOD_ACCESS, fail closed) before any servicer runs, hands
the caller to servicers via `current_caller()`, writes admitted changes to the
hash-chained audit log and refused calls to the bounded RefusalLog
(controlplane/audit.py). Streams of nodes are tracked (StreamGuard) so a
revocation closes every open one at once, with the reason.
"""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import logging
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc
import yaml
from cryptography import x509

from controlplane.audit import AuditLog, RefusalLog
from controlplane.nodeids import NodeIdentities
from controlplane.operators import RO, RW, Caller, Operators
from controlplane.tokens import DEFAULT_TOKEN_TTL_S
from nodemesh.v1 import mesh_pb2

log = logging.getLogger("nodemesh.controlplane.auth")

NODE, OPEN = "node", "open"
RECHECK_S = 2.0  # open node streams re-check their certificate (revocations made on other replicas)

# What each RPC needs. A method not listed is refused (fail closed).
METHOD_ACCESS: dict[str, str] = {
    "/nodemesh.v1.ConfigService/Get": RO,
    "/nodemesh.v1.ConfigService/List": RO,
    "/nodemesh.v1.ConfigService/Watch": RO,
    "/nodemesh.v1.ConfigService/Apply": RW,
    "/nodemesh.v1.ConfigService/Delete": RW,
    "/nodemesh.v1.Admin/Audit": RO,
    "/nodemesh.v1.Admin/VerifyAudit": RO,
    "/nodemesh.v1.Admin/Refusals": RO,
    "/nodemesh.v1.Admin/ListNodeIdentities": RO,
    "/nodemesh.v1.Admin/CreateJoinToken": RW,
    "/nodemesh.v1.Admin/CreateOperator": RW,
    "/nodemesh.v1.Admin/RevokeOperator": RW,
    "/nodemesh.v1.Admin/RevokeNode": RW,
    "/nodemesh.v1.Admin/RotateRoot": RW,
    "/nodemesh.v1.NodeAttestation/Join": OPEN,
    "/nodemesh.v1.NodeAttestation/RenewNodeCertificate": NODE,
    "/nodemesh.v1.Registry/Session": NODE,
    "/nodemesh.v1.CertificateService/CreateCertificate": NODE,
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/StreamAggregatedResources": NODE,
    "/envoy.service.discovery.v3.AggregatedDiscoveryService/DeltaAggregatedResources": NODE,
}
# Methods whose calls change something: each admitted one is written to the audit chain.
AUDITED = {m for m, need in METHOD_ACCESS.items() if need == RW} | {"/nodemesh.v1.NodeAttestation/Join"}


_CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("nodemesh_cp_caller", default=None)


def current_caller() -> Caller | None:
    """The caller of the RPC being served (set by AuthInterceptor); None when
    the servicer runs without the interceptor (unit tests of the servicer alone)."""
    return _CALLER.get()


def attested_node() -> str | None:
    """The node the current call's certificate names, or None when the call
    carries no node certificate (a local-admin unix socket call, or no interceptor),
    in which case the node name in the request is taken as given."""
    caller = current_caller()
    return caller.name if caller is not None and caller.kind == "node" else None


def allows(caller: Caller, need: str) -> bool:
    """The role check, separate from gRPC so it can be tested as a table."""
    if need == OPEN:
        return True
    if caller.kind == "local":
        return True
    if need == NODE:
        return caller.kind == "node"
    if caller.kind != "operator":
        return False
    return caller.role == RW or (need == RO and caller.role == RO)


def refusal(caller: Caller, method: str, need: str | None) -> tuple[grpc.StatusCode, str]:
    """The status and operator-facing message for a call `allows` refused."""
    short = method.rsplit("/", 1)[-1]
    if need is None:
        return grpc.StatusCode.PERMISSION_DENIED, f"{method} is not an API this control plane serves to callers"
    if need == NODE:
        if caller.kind == "anonymous":
            if "revoked" in caller.why_anonymous or "not one this control plane issued" in caller.why_anonymous:
                return grpc.StatusCode.PERMISSION_DENIED, f"{short} refused: {caller.why_anonymous}"
            return grpc.StatusCode.UNAUTHENTICATED, (
                f"{short} needs a node certificate{': ' + caller.why_anonymous if caller.why_anonymous else ''}; "
                "check that the agent joined (controlPlane.joinTokenFile) and that its node.key/node.pem "
                "in stateDir are present and unexpired")
        return grpc.StatusCode.PERMISSION_DENIED, (
            f"{short} is for node agents (a node certificate); {caller.principal} may not call it")
    if caller.kind == "anonymous":
        return grpc.StatusCode.UNAUTHENTICATED, (
            f"{short} needs an operator credential"
            f"{' (' + caller.why_anonymous + ')' if caller.why_anonymous else ''}: pass --token-file or "
            "$NODEMESH_TOKEN (the bootstrap one is admin.token in the control plane's state dir), or an "
            "operator certificate with --cert/--key")
    if caller.kind == "node":
        return grpc.StatusCode.PERMISSION_DENIED, (
            f"{short} needs an operator credential; node certificates ({caller.principal}) only serve the "
            "agent APIs")
    return grpc.StatusCode.PERMISSION_DENIED, (
        f"{short} needs the {need} role; {caller.principal} has role {caller.role}: ask an operator with "
        "role rw, or create a credential with `nodemesh operator create NAME --role rw`")


def uri_of(cert: x509.Certificate) -> str:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ""
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    return uris[0] if len(uris) == 1 else ""


def identify(context: grpc.aio.ServicerContext, metadata: Sequence[tuple[str, Any]],
             operators: Operators, nodes: NodeIdentities | None = None) -> Caller:
    """Who is calling: the transport first (unix socket, verified client
    certificate), then a bearer token."""
    peer = context.peer() or ""
    if peer.startswith(("unix:", "unix-abstract:")):
        return Caller("local", "unix", RW)
    auth = context.auth_context() or {}
    why = ""
    pems = auth.get("x509_pem_cert") or []
    if pems:
        # gRPC's TLS layer has verified the chain to the control-plane CA and its dates.
        try:
            cert = x509.load_pem_x509_certificate(pems[0] if isinstance(pems[0], bytes) else pems[0].encode())
            uri, serial = uri_of(cert), format(cert.serial_number, "x")
        except ValueError:
            uri, serial = "", ""
        path = uri.split("/", 3)[3] if uri.startswith("spiffe://") and uri.count("/") >= 3 else ""
        kind, _, name = path.partition("/")
        if kind == "node" and name:
            refused = nodes.certificate_refused(name, serial) if nodes is not None else ""
            if refused:
                return Caller("anonymous", name, why_anonymous=refused, credential=serial)
            return Caller("node", name, credential=serial)
        if kind == "operator" and name:
            return operators.by_cert(name, serial)
        why = f"the client certificate ({uri or 'no SPIFFE ID'}) is neither a node nor an operator certificate"
    for key, value in metadata:
        if key == "authorization":
            text = value.decode() if isinstance(value, bytes) else str(value)
            scheme, _, token = text.partition(" ")
            if scheme.lower() != "bearer" or not token:
                return Caller("anonymous", why_anonymous="the authorization metadata must read 'Bearer <token>'")
            return operators.by_token(token)
    return Caller("anonymous", why_anonymous=why)


def audit_detail(method: str, request: Any) -> str:
    """What a change was about, for the audit log (never a secret)."""
    short = method.rsplit("/", 1)[-1]
    try:
        if isinstance(request, mesh_pb2.ApplyRequest):
            refs = []
            for d in yaml.safe_load_all(request.documents):
                if isinstance(d, dict):
                    meta = d.get("metadata") or {}
                    refs.append(f"{d.get('kind', '?')}/{meta.get('namespace', '') or '-'}/{meta.get('name', '?')}")
            return f"apply {', '.join(refs) or '(no documents)'}"
        if isinstance(request, mesh_pb2.ResourceRef):
            return f"delete {request.kind}/{request.namespace or '-'}/{request.name}"
        if isinstance(request, mesh_pb2.CreateJoinTokenRequest):
            labels = ",".join(f"{k}={v}" for k, v in sorted(request.node_labels.items()))
            return (f"join token for node {request.node_name} (ttl {request.ttl_seconds or DEFAULT_TOKEN_TTL_S}s"
                    f"{', labels ' + labels if labels else ''})")
        if isinstance(request, mesh_pb2.CreateOperatorRequest):
            return (f"operator {request.name} role {request.role} "
                    f"({'certificate' if request.csr_pem else 'token'})")
        if isinstance(request, mesh_pb2.RevokeOperatorRequest):
            what = (f"operator {request.name}" if request.name else f"credential {request.credential_id}"
                    if request.credential_id else f"certificate serial {request.serial}")
            return f"revoke {what}"
        if isinstance(request, mesh_pb2.RevokeNodeRequest):
            return f"revoke node {request.name}"
        if isinstance(request, mesh_pb2.RotateRootRequest):
            return f"rotate the mesh root (overlap {request.overlap_seconds or 'default'}s)"
        if isinstance(request, mesh_pb2.JoinRequest):
            return f"node {request.node_name} joined with a token"
    except Exception as e:  # noqa: BLE001 - a malformed request still gets a line
        return f"{short} (request not summarised: {e})"
    return short


def _skip_audit(request: Any) -> bool:
    return isinstance(request, mesh_pb2.ApplyRequest) and request.dry_run


@dataclass(eq=False)
class TrackedStream:
    """One open node stream: the task serving it, and why it is being closed."""

    sid: int
    node: str
    serial: str  # of the certificate it was opened with (re-checked periodically)
    task: asyncio.Task[Any] | None
    reason: str = ""  # set once the stream is to close
    in_servicer: bool = False  # the task is waiting on the servicer (a cancel lands there)
    cancelled: bool = False  # the guard cancelled the task to close the stream

    def close(self, reason: str) -> None:
        """Close with `reason`: at once if the servicer is waiting (its task is
        cancelled there), else as soon as the response being sent is out."""
        if self.reason:
            return
        self.reason = reason
        if self.in_servicer and self.task is not None and not self.task.done():
            self.cancelled = True
            self.task.cancel()

    def closing(self) -> bool:
        """Whether the stream is to close now (a call, so that it is read afresh
        after every await); takes back the guard's cancel of the task."""
        if not self.reason:
            return False
        if self.cancelled and self.task is not None:
            self.cancelled = False
            self.task.uncancel()
        return True


class StreamGuard:
    """The open streams of each node on this replica, so that a revocation
    closes them at once (and a periodic re-check catches revocations made
    through another replica and certificates that expire)."""

    def __init__(self) -> None:
        self._open: dict[str, dict[int, TrackedStream]] = {}
        self._next = 0

    def enter(self, node: str, serial: str = "") -> TrackedStream:
        self._next += 1
        tracked = TrackedStream(self._next, node, serial, asyncio.current_task())
        self._open.setdefault(node, {})[tracked.sid] = tracked
        return tracked

    def leave(self, tracked: TrackedStream) -> None:
        streams = self._open.get(tracked.node)
        if streams is not None:
            streams.pop(tracked.sid, None)
            if not streams:
                del self._open[tracked.node]

    def close_node(self, node: str, reason: str) -> int:
        streams = list(self._open.get(node, {}).values())
        for tracked in streams:
            tracked.close(reason)
        return len(streams)

    def streams(self) -> list[TrackedStream]:
        return [t for streams in self._open.values() for t in streams.values()]

    def nodes(self) -> list[str]:
        return list(self._open)

    def count(self, node: str) -> int:
        return len(self._open.get(node, {}))


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[misc]
    """Authenticates and authorises every call before its servicer runs."""

    def __init__(self, operators: Operators, audit: AuditLog | None = None, refusals: RefusalLog | None = None,
                 nodes: NodeIdentities | None = None) -> None:
        self._operators = operators
        self.audit = audit
        self.refusals = refusals or RefusalLog()
        self.nodes = nodes
        self.guard = StreamGuard()

    async def recheck_streams(self, interval_s: float = RECHECK_S) -> None:
        """Close open node streams whose certificate stopped being valid (revoked
        through another replica, or expired)."""
        while True:
            await asyncio.sleep(interval_s)
            if self.nodes is None:
                continue
            # One trip to a worker thread per sweep, not one per stream: at 1,000 nodes
            # (2,000 streams) a trip each kept the event loop turning for nothing.
            refused = await asyncio.to_thread(self._refused_streams, self.guard.streams())
            for tracked, why in refused:
                tracked.close(why)

    def _refused_streams(self, streams: list[TrackedStream]) -> list[tuple[TrackedStream, str]]:
        """(stream, why) of the open streams whose certificate is refused now."""
        out: list[tuple[TrackedStream, str]] = []
        nodes = self.nodes
        if nodes is None:
            return out
        for tracked in streams:
            try:
                why = nodes.certificate_refused(tracked.node, tracked.serial)
            except Exception as e:  # noqa: BLE001 - the store may be briefly unreachable; keep serving
                log.debug("re-check of node %s's stream failed: %s", tracked.node, e)
                continue
            if why:
                out.append((tracked, why))
        return out

    async def intercept_service(self, continuation: Callable[[grpc.HandlerCallDetails],
                                                             Awaitable[grpc.RpcMethodHandler]],
                                handler_call_details: grpc.HandlerCallDetails) -> grpc.RpcMethodHandler:
        handler = await continuation(handler_call_details)
        if handler is None:
            return handler
        method = str(handler_call_details.method)
        metadata = tuple(handler_call_details.invocation_metadata or ())
        need = METHOD_ACCESS.get(method)
        ops, audit, refusals, nodes, guard = self._operators, self.audit, self.refusals, self.nodes, self.guard

        async def admit(context: grpc.aio.ServicerContext) -> Caller:
            caller = identify(context, metadata, ops, nodes)
            if need is None or not allows(caller, need):
                code, message = refusal(caller, method, need)
                principal = f"node/{caller.name}" if caller.kind == "anonymous" and caller.name else caller.principal
                # Never into the change log: a flood of refusals must not push history out.
                refusals.record(principal, method, code.name, message, context.peer() or "")
                await context.abort(code, message)
            return caller

        def record(caller: Caller, request: Any, outcome: str) -> None:
            if audit is None or method not in AUDITED or _skip_audit(request):
                return
            principal = caller.principal
            if isinstance(request, mesh_pb2.JoinRequest):
                if outcome != "ok":
                    # A refused join is a refusal, not a change (anyone can send one).
                    refusals.record("anonymous (join token)", method, "UNAUTHENTICATED", outcome)
                    return
                principal = f"node/{request.node_name}"
            if caller.kind == "operator" and caller.credential:
                principal += f" ({caller.credential})"
            audit.append(principal, method.rsplit("/", 1)[-1], audit_detail(method, request), outcome)

        def outcome_of(context: grpc.aio.ServicerContext, e: BaseException) -> str:
            code = context.code() if hasattr(context, "code") else None
            details = context.details() if hasattr(context, "details") else ""
            if code is not None and code != grpc.StatusCode.OK:
                name = code.name if isinstance(code, grpc.StatusCode) else str(code)
                return f"error: {name}: {details or e}"
            return f"error: {e!r}"

        if not handler.request_streaming and not handler.response_streaming:
            inner = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                caller = await admit(context)
                token = _CALLER.set(caller)
                try:
                    response = await inner(request, context)
                except BaseException as e:
                    record(caller, request, outcome_of(context, e))
                    raise
                finally:
                    _CALLER.reset(token)
                record(caller, request, "ok")
                return response

            return handler._replace(unary_unary=unary_unary)

        attr = {(False, True): "unary_stream", (True, False): "stream_unary",
                (True, True): "stream_stream"}[(handler.request_streaming, handler.response_streaming)]
        inner_any = getattr(handler, attr)

        # A node's stream is tracked so that a revocation closes it: no task or
        # future per response, the guard cancels the serving task only while it
        # waits on the servicer (where the cancel lands in servicer code).
        async def closed(context: grpc.aio.ServicerContext, caller: Caller, tracked: TrackedStream) -> None:
            refusals.record(caller.principal, method, "PERMISSION_DENIED", f"open stream closed: {tracked.reason}",
                            context.peer() or "")
            await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"stream closed: {tracked.reason}")

        if inspect.isasyncgenfunction(inner_any):
            async def streaming_gen(request: Any, context: grpc.aio.ServicerContext) -> Any:
                caller = await admit(context)
                token = _CALLER.set(caller)
                gen: AsyncGenerator[Any, None] = inner_any(request, context)
                tracked = guard.enter(caller.name, caller.credential) if caller.kind == "node" else None
                try:
                    if tracked is None:
                        async for item in gen:
                            yield item
                        return
                    while not tracked.closing():
                        tracked.in_servicer = True
                        try:
                            item = await gen.__anext__()
                        except StopAsyncIteration:
                            break
                        except asyncio.CancelledError:
                            if not tracked.closing():
                                raise
                            break
                        finally:
                            tracked.in_servicer = False
                        if tracked.closing():
                            break
                        yield item
                    if tracked.closing():
                        await closed(context, caller, tracked)
                finally:
                    if tracked is not None:
                        guard.leave(tracked)
                    await gen.aclose()  # the servicer's cleanup runs now, not at GC
                    _CALLER.reset(token)

            return handler._replace(**{attr: streaming_gen})

        async def streaming(request: Any, context: grpc.aio.ServicerContext) -> Any:
            caller = await admit(context)
            token = _CALLER.set(caller)
            tracked = guard.enter(caller.name, caller.credential) if caller.kind == "node" else None
            try:
                if tracked is None:
                    return await inner_any(request, context)
                tracked.in_servicer = True
                try:
                    result = await inner_any(request, context)
                except asyncio.CancelledError:
                    if not tracked.closing():
                        raise
                finally:
                    tracked.in_servicer = False
                if not tracked.closing():
                    return result
                await closed(context, caller, tracked)
            finally:
                if tracked is not None:
                    guard.leave(tracked)
                _CALLER.reset(token)

        return handler._replace(**{attr: streaming})


def now_iso(t: float | None = None) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() if t is None else t))
