"""Zero trust through the full mesh: mTLS modes (PeerAuthentication) and
AuthorizationPolicy enforced by the receiving node, with the deciding policy
in its access log."""

from __future__ import annotations

from typing import Any

import pytest

from nodemesh.lab.harness import LAB_BINDINGS, Lab
from tests.conftest import wait_until
from tests.netns.conftest import CLIENT_UID

pytestmark = pytest.mark.netns

CLIENT = "cluster.local/ns/default/sa/client"


def doc(kind: str, name: str, spec: str, ns: str = "default") -> str:
    return (f"---\napiVersion: nodemesh.io/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}, namespace: {ns}}}\n"
            f"spec:\n{spec}\n")


def via_mesh(lab: Lab, vip: str) -> bool:
    # -f: an HTTP-aware source proxy answers a refused tunnel with an HTTP error status.
    return lab.curl(1, f"http://{vip}/", uid=CLIENT_UID, timeout=2, extra=["-f"]).returncode == 0


def plaintext(lab: Lab) -> bool:
    # root on node 1 is not a mesh workload: its connection is not captured and reaches
    # node 2 in clear, where capture hands it to the inbound plaintext listener (15006).
    return lab.curl(1, f"http://{lab.node_ip(2)}:8080/", uid=0, timeout=2).returncode == 0


def inbound(lab: Lab, **match: Any) -> list[dict[str, Any]]:
    return [e for e in lab.access_log(2) if e.get("direction") == "inbound"
            and all(e.get(k) == v for k, v in match.items())]


def test_mtls_modes_strict_refuses_plaintext_permissive_counts_it(mesh: Lab) -> None:
    vip = mesh.service_vip("web")
    # Mesh default: PERMISSIVE. Plaintext is accepted and marked in the access log.
    assert plaintext(mesh)
    wait_until(lambda: bool(inbound(mesh, via="plaintext", plaintext_accepted=True)), 5,
               "the plaintext connection in node-2's access log")
    assert inbound(mesh, via="plaintext")[-1]["mtls_mode"] == "PERMISSIVE"

    # STRICT for the namespace: plaintext refused, mesh traffic unaffected.
    mesh.apply(doc("PeerAuthentication", "strict", "  mtls: {mode: STRICT}"))
    wait_until(lambda: not plaintext(mesh), 10, "plaintext to be refused under STRICT")
    assert via_mesh(mesh, vip)
    refused = inbound(mesh, via="plaintext", authz_reason="mtls_required")
    assert refused and refused[-1]["authz_policy"] == "PeerAuthentication/default/strict"

    # A port-level exception for the workload: PERMISSIVE on 8080 again.
    mesh.apply(doc("PeerAuthentication", "web-8080", "  selector: {matchLabels: {app: web}}\n"
                   "  portLevelMtls: {8080: {mode: PERMISSIVE}}"))
    wait_until(lambda: plaintext(mesh), 10, "the port-level PERMISSIVE override")
    # Mesh-wide STRICT from MeshConfig after removing the namespace policies.
    with mesh.config_client() as c:
        c.delete("PeerAuthentication", "strict", "default")
        c.delete("PeerAuthentication", "web-8080", "default")
    mesh.apply("apiVersion: nodemesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\n"
               f"spec: {{trustDomain: cluster.local, mtls: {{mode: STRICT}}, {LAB_BINDINGS}}}\n")
    wait_until(lambda: not plaintext(mesh), 10, "plaintext refused by the mesh-wide STRICT")
    assert via_mesh(mesh, vip)


def test_authorization_policy_allow_deny_audit_default_deny(mesh: Lab) -> None:
    vip = mesh.service_vip("web")
    assert via_mesh(mesh, vip)

    # DENY by principal.
    mesh.apply(doc("AuthorizationPolicy", "deny-client", f"""\
  selector: {{matchLabels: {{app: web}}}}
  action: DENY
  rules: [{{from: [{{source: {{principals: ["{CLIENT}"]}}}}]}}]"""))
    wait_until(lambda: not via_mesh(mesh, vip), 10, "the DENY policy to take effect")
    denied = inbound(mesh, via="hbone", authz="deny")
    assert denied[-1]["authz_policy"] == "AuthorizationPolicy/default/deny-client"
    assert denied[-1]["authz_rule"] == 0 and denied[-1]["source_principal"] == f"spiffe://{CLIENT}"

    # ALLOW by namespace: a policy for another namespace only is not enough...
    with mesh.config_client() as c:
        c.delete("AuthorizationPolicy", "deny-client", "default")
    mesh.apply(doc("AuthorizationPolicy", "allow",
                   "  action: ALLOW\n  rules: [{from: [{source: {namespaces: [shop]}}]}]"))
    def refused_by_allow() -> bool:
        return not via_mesh(mesh, vip) and inbound(mesh, via="hbone")[-1].get("authz_reason") == "no_allow_match"

    wait_until(refused_by_allow, 10, "the ALLOW policy to refuse the default namespace")
    # ...the caller's namespace is.
    mesh.apply(doc("AuthorizationPolicy", "allow",
                   "  action: ALLOW\n  rules: [{from: [{source: {namespaces: [default]}}]}]"))
    wait_until(lambda: via_mesh(mesh, vip), 10, "the ALLOW policy for namespace default")
    # The stream's inbound line is written when it closes: HTTP requests ride pooled
    # keep-alive streams (closed after at most a few seconds), so wait for it.
    wait_until(lambda: any(e.get("authz_policy") == "AuthorizationPolicy/default/allow"
                           for e in inbound(mesh, via="hbone", authz="allow")), 10,
               "the allowed stream's log line naming the ALLOW policy")

    # Mesh-wide default deny: with no ALLOW policy left, nothing gets in.
    with mesh.config_client() as c:
        c.delete("AuthorizationPolicy", "allow", "default")
    mesh.apply("apiVersion: nodemesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\n"
               f"spec: {{trustDomain: cluster.local, defaultDeny: true, {LAB_BINDINGS}}}\n")
    wait_until(lambda: not via_mesh(mesh, vip), 10, "default deny")
    assert inbound(mesh, via="hbone")[-1]["authz_reason"] == "default_deny"

    # AUDIT: recorded, decides nothing.
    mesh.apply("apiVersion: nodemesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\n"
               f"spec: {{trustDomain: cluster.local, {LAB_BINDINGS}}}\n"
               + doc("AuthorizationPolicy", "audit", "  action: AUDIT\n  rules: [{}]"))
    wait_until(lambda: via_mesh(mesh, vip), 10, "default deny to be lifted")
    # MeshConfig and the policy reach the node as separate xDS types, and a stream's
    # line is written when it closes: keep sending until an audited line shows up.
    def audited() -> bool:
        via_mesh(mesh, vip)
        return any(e.get("authz_audit") == ["AuthorizationPolicy/default/audit#0"]
                   for e in inbound(mesh, via="hbone", authz="allow"))

    wait_until(audited, 15, "an allowed inbound line noting the AUDIT policy")
