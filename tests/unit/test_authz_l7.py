"""The receiving node's L7 authorization guard, driven with fake relay ends
(no sockets): per-request ALLOW/DENY by method, path and principal with a 403
that names the policy and rule; keep-alive; path normalisation; opaque TCP and
server-first protocols decided at L4; malformed requests answered 400."""

from __future__ import annotations

from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.meshview.snapshot import LocalWorkload
from nodeagent.proxy import authz_l7
from nodeagent.proxy.authz import inbound_facts
from nodeagent.proxy.relay import Session
from nodemesh import model
from nodemesh.security import MeshSecurity, SecurityPolicies

CLIENT = "spiffe://cluster.local/ns/default/sa/client"
OTHER = "spiffe://cluster.local/ns/shop/sa/cart"
WEB = LocalWorkload("web-1", "default", "web", "10.0.0.12", (8080,), uid=2001, labels=(("app", "web"),))

POLICY = """\
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-http, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - to: [{operation: {methods: [GET], paths: ["/public*"]}}]
---
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/client"]}}]
    to: [{operation: {methods: [POST], paths: ["/admin*"]}}]
"""


class Log:
    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def write(self, rec: dict[str, Any]) -> None:
        self.lines.append(rec)


class FakeEnd:
    def __init__(self) -> None:
        self.data = bytearray()
        self.eof = False
        self.aborted = False
        self.partner: Any = None
        self.rx = self.tx = 0

    def send(self, data: bytes) -> None:
        self.data += data

    def send_eof(self) -> None:
        self.eof = True

    def abort(self) -> None:
        self.aborted = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def attach(self, partner: Any) -> None:
        self.partner = partner


def policies(text: str = POLICY) -> SecurityPolicies:
    docs = model.parse_documents(text)
    return SecurityPolicies(MeshSecurity(), (), tuple(d.obj for d in docs if d.kind == "AuthorizationPolicy"))


def guard(principal: str = CLIENT, text: str = POLICY) -> tuple[authz_l7.InboundHttpGuard, FakeEnd, FakeEnd, Session]:
    session = Session(Log(), "inbound")  # type: ignore[arg-type]
    check = authz_l7.L7Check(policies(text), inbound_facts(WEB, 8080, principal, "10.0.0.11"))
    caller, workload = FakeEnd(), FakeEnd()
    g = authz_l7.InboundHttpGuard(check, workload, session)
    g.attach(caller)
    assert workload.partner is g.workload_side
    return g, caller, workload, session


def test_needs_l7_only_with_http_rules() -> None:
    assert authz_l7.needs_l7(policies(), WEB, 8080)
    l4_only = POLICY.split("---")[0].replace('methods: [GET], paths: ["/public*"]', "ports: [8080]")
    assert not authz_l7.needs_l7(policies(l4_only), WEB, 8080)
    assert not authz_l7.needs_l7(policies(), WEB, 5432)  # server-first port: never HTTP


def test_allowed_get_goes_through_and_response_comes_back() -> None:
    g, caller, workload, session = guard()
    g.send(b"GET /public/x?y=1 HTTP/1.1\r\nHost: web\r\n\r\n")
    assert workload.data.startswith(b"GET /public/x?y=1 HTTP/1.1\r\n")
    assert session.fields["authz"] == "allow"
    assert session.fields["authz_policy"] == "AuthorizationPolicy/default/web-http"
    g.workload_side.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    assert bytes(caller.data).startswith(b"HTTP/1.1 200 OK") and caller.data.endswith(b"ok")
    # Keep-alive: a second request on the same connection is decided again.
    g.send(b"POST /admin/users HTTP/1.1\r\nHost: web\r\nContent-Length: 0\r\n\r\n")
    assert b"403 Forbidden" in caller.data
    assert b"AuthorizationPolicy/default/no-admin rule 0" in caller.data
    assert caller.eof and workload.aborted and b"POST" not in workload.data
    assert session.fields["authz_reason"] == "denied_by_policy" and session.fields["authz_rule"] == 0
    assert session.fields["http_method"] == "POST" and session.fields["http_path"] == "/admin/users"


def test_no_allow_match_names_the_allow_policy() -> None:
    g, caller, workload, session = guard(principal=OTHER)
    g.send(b"GET /private HTTP/1.1\r\nHost: web\r\n\r\n")
    assert caller.data.startswith(b"HTTP/1.1 403")
    assert session.fields["authz_reason"] == "no_allow_match" and not workload.data


def test_dot_segments_cannot_dodge_a_deny() -> None:
    g, caller, _workload, session = guard()
    g.send(b"POST /public/../%61dmin HTTP/1.1\r\nHost: web\r\nContent-Length: 0\r\n\r\n")
    assert caller.data.startswith(b"HTTP/1.1 403") and session.fields["http_path"] == "/admin"
    assert authz_l7.normalize_path("/a/./b/../c?q=/..") == ("/a/c", "?q=/..")
    assert authz_l7.normalize_path("/a/..") == ("/", "")


def test_opaque_tcp_is_decided_at_l4() -> None:
    # The ALLOW policy has only an HTTP rule: at L4 it never matches, so TCP is refused.
    g, caller, workload, session = guard()
    g.send(b"\x16\x03\x01 binary\n")
    assert caller.aborted and workload.aborted and session.fields["authz_layer"] == "L4"
    # With only the DENY policy (HTTP fields), an allowed L4 caller's bytes flow untouched.
    deny_only = POLICY.split("---")[1]
    g, caller, workload, session = guard(principal=OTHER, text=deny_only)
    g.send(b"\x00\x01binary\n")
    assert workload.data == b"\x00\x01binary\n"
    g.workload_side.send(b"pong")
    assert caller.data == b"pong"


def test_server_first_protocol_decides_on_the_workloads_first_bytes() -> None:
    deny_only = POLICY.split("---")[1]
    g, caller, _workload, session = guard(principal=OTHER, text=deny_only)
    g.workload_side.send(b"220 smtp ready\r\n")
    assert caller.data == b"220 smtp ready\r\n" and session.fields["authz_layer"] == "L4"


def test_malformed_request_gets_400() -> None:
    g, caller, workload, session = guard()
    g.send(b"GET /public HTTP/1.1\r\nHost web\r\n\r\n")
    assert caller.data.startswith(b"HTTP/1.1 400") and session.fields["reason"] == "bad_request"
    assert not workload.data


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300), st.integers(1, 40))
def test_random_bytes_never_raise_and_never_reach_a_denied_path(data: bytes, chunk: int) -> None:
    g, _caller, workload, _ = guard()
    for i in range(0, len(data), chunk):
        g.send(data[i:i + chunk])
    g.send_eof()
    # Whatever got through is either opaque TCP (refused here: HTTP-only ALLOW) or an allowed request.
    assert not workload.data or workload.data.startswith(b"GET /public")


def test_each_decided_request_on_a_kept_alive_stream_gets_its_own_line() -> None:
    g, caller, _workload, session = guard()
    for path in ("/public/a", "/public/b"):
        g.send(f"GET {path} HTTP/1.1\r\nHost: web\r\n\r\n".encode())
        g.workload_side.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
    g.send(b"POST /admin HTTP/1.1\r\nHost: web\r\nContent-Length: 0\r\n\r\n")
    lines = session._log.lines  # type: ignore[attr-defined]
    assert [(r["http_path"], r["authz"], r["authz_request"]) for r in lines] == [
        ("/public/a", "allow", 1), ("/public/b", "allow", 2), ("/admin", "deny", 3)]
    assert lines[-1]["http_status"] == 403 and lines[-1]["reason"] == "denied_by_policy"
    assert g.logged == 3 and caller.data.count(b"HTTP/1.1 200 OK") == 2
