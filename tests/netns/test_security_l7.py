"""AuthorizationPolicy HTTP rules enforced on the receiving node: node 2's proxy
reads each request on the inbound CONNECT stream (or plaintext connection),
answers a denied one with 403 itself, and names the policy and rule in its
access log; `nodemesh authz check`, run with operator credentials against the
real control plane over TLS, predicts the same verdicts."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from nodemesh.lab.harness import Lab
from tests.conftest import wait_until
from tests.netns.conftest import CLIENT_UID

pytestmark = pytest.mark.netns

POLICIES = """\
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: web-public, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - to: [{operation: {methods: [GET], paths: ["/public*"]}}]
  - to: [{operation: {methods: [POST], paths: ["/admin*"]}}]
---
apiVersion: nodemesh.io/v1alpha1
kind: AuthorizationPolicy
metadata: {name: no-admin-for-client, namespace: default}
spec:
  selector: {matchLabels: {app: web}}
  action: DENY
  rules:
  - from: [{source: {principals: ["cluster.local/ns/default/sa/client"]}}]
    to: [{operation: {methods: [POST], paths: ["/admin*"]}}]
"""


def status(lab: Lab, url: str, method: str = "GET", uid: int = CLIENT_UID) -> tuple[int, str]:
    r = lab.curl(1, url, uid=uid, timeout=3, extra=["-X", method, "-o", "-", "-w", "\n%{http_code}"])
    body, _, code = r.stdout.rpartition("\n")
    return int(code or 0), body


def inbound(lab: Lab, **match: Any) -> list[dict[str, Any]]:
    return [e for e in lab.access_log(2) if e.get("direction") == "inbound"
            and all(e.get(k) == v for k, v in match.items())]


def authz_check(lab: Lab, expect: str, *args: str) -> dict[str, Any]:
    """`nodemesh authz check` from node 1, over TLS to the control plane's token port;
    exits 0 for ALLOW and 1 for DENY, so the exit code alone must say `expect`."""
    host = lab.cp_addr.rsplit(":", 1)[0]
    r = lab.ns_exec(lab.node_ns(1), [
        sys.executable, "-m", "nodemesh", "authz", "check", "--json", "--to", "web", *args,
        "--server", f"{host}:15011", "--ca-file", str(lab.cp_ca_file), "--token-file", str(lab.admin_token_file)],
        check=False)
    assert r.returncode == {"ALLOW": 0, "DENY": 1}[expect], (r.returncode, r.stdout, r.stderr)
    out = dict(json.loads(r.stdout))
    assert out["decision"] == expect, out
    return out


def test_http_rules_enforced_by_the_receiving_node(mesh: Lab) -> None:
    vip = mesh.service_vip("web")
    assert status(mesh, f"http://{vip}/admin", "POST")[0] == 200  # no policy yet
    mesh.apply(POLICIES)

    wait_until(lambda: status(mesh, f"http://{vip}/admin", "POST")[0] == 403, 10, "the DENY policy")
    code, body = status(mesh, f"http://{vip}/admin", "POST")
    assert code == 403 and "AuthorizationPolicy/default/no-admin-for-client rule 0" in body
    # Decided on node 2 (the receiver), and logged there with the policy and rule.
    denied = inbound(mesh, via="hbone", authz="deny", http_path="/admin")
    assert denied, mesh.access_log(2)[-3:]
    last = denied[-1]
    assert last["authz_policy"] == "AuthorizationPolicy/default/no-admin-for-client"
    assert last["authz_rule"] == 0 and last["authz_layer"] == "L7" and last["http_method"] == "POST"
    assert last["source_principal"] == "spiffe://cluster.local/ns/default/sa/client"

    # GET /public is allowed by rule 0 of the ALLOW policy; GET /private matches no ALLOW rule.
    code, body = status(mesh, f"http://{vip}/public/page")
    assert code == 200 and '"replica": "web-2"' in body
    allowed = inbound(mesh, via="hbone", authz="allow", http_path="/public/page")
    assert allowed and allowed[-1]["authz_policy"] == "AuthorizationPolicy/default/web-public"
    assert allowed[-1]["authz_rule"] == 0
    # Node 2 reports the request it decided as a destination request, from the guard's own
    # parse (the observer's watch is off a guarded connection: one parse per node).
    wait_until(lambda: inbound(mesh, path="/public/page", method="GET", status=200), 5, "the destination request")
    req = inbound(mesh, path="/public/page", method="GET", status=200)[-1]
    assert req["reporter"] == "destination" and req["source_workload_name"] == "client", req
    assert status(mesh, f"http://{vip}/private")[0] == 403
    assert inbound(mesh, via="hbone", http_path="/private")[-1]["authz_reason"] == "no_allow_match"
    # A dot segment does not get around the DENY rule.
    assert status(mesh, f"http://{vip}/public/../admin", "POST")[0] == 403  # curl sends it as is
    r = mesh.curl(1, f"http://{vip}/public/%2E%2E/admin", uid=CLIENT_UID, timeout=3,
                  extra=["--path-as-is", "-X", "POST", "-o", "/dev/null", "-w", "%{http_code}"])
    assert r.stdout == "403"

    # Plaintext callers reach the same guard through the inbound plaintext listener:
    # without a principal the DENY rule does not match, and rule 1 of the ALLOW policy lets POST /admin in.
    assert status(mesh, f"http://{mesh.node_ip(2)}:8080/admin", "POST", uid=0)[0] == 200
    assert inbound(mesh, via="plaintext", http_path="/admin")[-1]["authz_rule"] == 1
    assert status(mesh, f"http://{mesh.node_ip(2)}:8080/private", uid=0)[0] == 403

    # `nodemesh authz check` (credentials as flags, TLS to the real control plane) predicts each verdict.
    cases = [(("--from", "default/client", "--method", "POST", "--path", "/admin"), "DENY", "no-admin-for-client", 0),
             (("--from", "default/client", "--method", "GET", "--path", "/public/page"), "ALLOW", "web-public", 0),
             (("--from", "default/client", "--method", "GET", "--path", "/private"), "DENY", "web-public", None),
             (("--from", "plaintext", "--method", "POST", "--path", "/admin"), "ALLOW", "web-public", 1)]
    for args, decision, policy, rule in cases:
        out = authz_check(mesh, decision, *args)
        assert out["decision"] == decision and out["policy"] == f"AuthorizationPolicy/default/{policy}", out
        assert out["rule"] == rule and out["layer"] == "L7"
    # Without credentials the check is refused with what to pass.
    r = mesh.ns_exec(mesh.node_ns(1), [sys.executable, "-m", "nodemesh", "authz", "check", "--from", "default/client",
                                       "--to", "web", "--server", f"{mesh.cp_addr.rsplit(':', 1)[0]}:15011",
                                       "--ca-file", str(mesh.cp_ca_file)], check=False)
    assert r.returncode == 2 and "--token-file" in r.stderr
