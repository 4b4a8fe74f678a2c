"""The receiving side's decision as a pure function: mTLS modes at every level,
ALLOW / DENY / AUDIT in Istio's order, wildcards, L4 versus L7 rules, default deny."""

from __future__ import annotations

import pytest

from nodeagent.proxy.authz import HttpFacts, RequestFacts, evaluate, mtls_mode
from nodemesh import model
from nodemesh.security import MeshSecurity, SecurityPolicies

CLIENT = "spiffe://cluster.local/ns/default/sa/client"
OTHER = "spiffe://cluster.local/ns/shop/sa/cart"
WEB_LABELS = (("app", "web"),)


def policies(yaml_text: str = "", **mesh: object) -> SecurityPolicies:
    docs = model.parse_documents(yaml_text) if yaml_text.strip() else []
    pas = tuple(d.obj for d in docs if d.kind == "PeerAuthentication")
    aps = tuple(d.obj for d in docs if d.kind == "AuthorizationPolicy")
    return SecurityPolicies(MeshSecurity(**mesh), pas, aps)  # type: ignore[arg-type]


def facts(principal: str = CLIENT, port: int = 8080, ip: str = "10.0.0.11", ns: str = "default",
          labels: tuple[tuple[str, str], ...] = WEB_LABELS, http: HttpFacts | None = None) -> RequestFacts:
    return RequestFacts(namespace=ns, labels=labels, port=port, source_principal=principal, source_ip=ip,
                        workload=f"{ns}/web-1", http=http)


def doc(kind: str, name: str, spec: str, ns: str = "default") -> str:
    return (f"---\napiVersion: nodemesh.io/v1alpha1\nkind: {kind}\nmetadata: {{name: {name}, namespace: {ns}}}\n"
            f"spec:\n{spec}\n")


# ---------------------------------------------------------------- mTLS modes


def test_mesh_default_is_permissive_and_plaintext_is_counted() -> None:
    v = evaluate(policies(), facts(principal=""))
    assert v.allowed and v.plaintext and v.mtls_mode == "PERMISSIVE"
    assert v.log_fields()["plaintext_accepted"] is True
    assert not evaluate(policies(), facts()).plaintext


def test_strict_refuses_plaintext_and_accepts_mtls() -> None:
    p = policies(mtls_mode="STRICT")
    v = evaluate(p, facts(principal=""))
    assert not v.allowed and v.reason == "mtls_required" and v.policy == "MeshConfig/mesh"
    assert evaluate(p, facts()).allowed


def test_mode_precedence_workload_port_namespace_root() -> None:
    text = (doc("PeerAuthentication", "mesh", "  mtls: {mode: STRICT}", ns="nodemesh-system")
            + doc("PeerAuthentication", "ns", "  mtls: {mode: PERMISSIVE}")
            + doc("PeerAuthentication", "web", "  selector: {matchLabels: {app: web}}\n  mtls: {mode: STRICT}\n"
                  "  portLevelMtls: {9090: {mode: DISABLE}}"))
    p = policies(text)
    assert mtls_mode(p, "default", {"app": "web"}, 8080) == ("STRICT", "PeerAuthentication/default/web")
    assert mtls_mode(p, "default", {"app": "web"}, 9090) == ("DISABLE", "PeerAuthentication/default/web")
    assert mtls_mode(p, "default", {"app": "db"}, 8080) == ("PERMISSIVE", "PeerAuthentication/default/ns")
    assert mtls_mode(p, "shop", {"app": "web"}, 8080) == ("STRICT", "PeerAuthentication/nodemesh-system/mesh")
    v = evaluate(p, facts(principal="", port=8080))
    assert not v.allowed and v.policy == "PeerAuthentication/default/web"
    assert evaluate(p, facts(principal="", port=9090)).allowed


def test_unset_mode_defers_to_the_next_level() -> None:
    text = (doc("PeerAuthentication", "ns", "  mtls: {mode: STRICT}")
            + doc("PeerAuthentication", "web", "  selector: {matchLabels: {app: web}}\n  mtls: {mode: UNSET}"))
    assert mtls_mode(policies(text), "default", {"app": "web"}, 8080)[0] == "STRICT"


# ---------------------------------------------------------------- authorization


def test_no_policy_allows_and_default_deny_denies() -> None:
    v = evaluate(policies(), facts())
    assert v.allowed and v.reason == "no_policy" and v.policy == ""
    v = evaluate(policies(default_deny=True), facts())
    assert not v.allowed and v.reason == "default_deny" and v.policy == "MeshConfig/mesh"


def test_allow_by_principal_with_wildcards() -> None:
    p = policies(doc("AuthorizationPolicy", "allow-client", """\
  selector: {matchLabels: {app: web}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/other/sa/x"]}}]
  - from: [{source: {principals: ["cluster.local/ns/default/sa/cl*"]}}]"""))
    v = evaluate(p, facts())
    assert v.allowed and v.policy == "AuthorizationPolicy/default/allow-client" and v.rule == 1
    v = evaluate(p, facts(principal=OTHER))
    assert not v.allowed and v.reason == "no_allow_match"
    # A plaintext caller has no principal, so it matches no principal rule at all.
    assert not evaluate(p, facts(principal="")).allowed
    # A workload the selector does not pick is not affected.
    assert evaluate(p, facts(principal=OTHER, labels=(("app", "db"),))).allowed


def test_full_spiffe_ids_and_star_match_any_authenticated_caller() -> None:
    p = policies(doc("AuthorizationPolicy", "any", """\
  rules: [{from: [{source: {principals: ["*"]}}]}]"""))
    assert evaluate(p, facts(principal=OTHER)).allowed
    assert not evaluate(p, facts(principal="")).allowed
    p = policies(doc("AuthorizationPolicy", "exact", f"""\
  rules: [{{from: [{{source: {{principals: ["{CLIENT}"]}}}}]}}]"""))
    assert evaluate(p, facts()).allowed and not evaluate(p, facts(principal=OTHER)).allowed


def test_deny_wins_over_allow() -> None:
    text = (doc("AuthorizationPolicy", "allow-all", "  action: ALLOW\n  rules: [{}]")
            + doc("AuthorizationPolicy", "deny-shop",
                  "  action: DENY\n  rules: [{from: [{source: {namespaces: [shop]}}]}]"))
    p = policies(text)
    v = evaluate(p, facts(principal=OTHER))
    assert not v.allowed and v.reason == "denied_by_policy" and v.policy == "AuthorizationPolicy/default/deny-shop"
    assert v.rule == 0
    v = evaluate(p, facts())
    assert v.allowed and v.policy == "AuthorizationPolicy/default/allow-all"


def test_allow_with_no_rules_allows_nothing() -> None:
    p = policies(doc("AuthorizationPolicy", "nothing", "  action: ALLOW"))
    assert not evaluate(p, facts()).allowed


def test_root_namespace_policies_apply_everywhere() -> None:
    p = policies(doc("AuthorizationPolicy", "deny-plain",
                     "  action: DENY\n  rules: [{from: [{source: {notPrincipals: ['*']}}]}]",
                     ns="nodemesh-system"))
    assert not evaluate(p, facts(principal="", ns="shop")).allowed
    assert evaluate(p, facts(ns="shop")).allowed


def test_ip_blocks_ports_and_conditions() -> None:
    p = policies(doc("AuthorizationPolicy", "net", """\
  rules:
  - from: [{source: {ipBlocks: [10.0.0.0/24], notIpBlocks: [10.0.0.99]}}]
    to: [{operation: {ports: [8080]}}]
    when: [{key: source.namespace, values: [default]}]"""))
    assert evaluate(p, facts()).allowed
    assert not evaluate(p, facts(ip="10.0.0.99")).allowed
    assert not evaluate(p, facts(ip="10.1.0.1")).allowed
    assert not evaluate(p, facts(port=9090)).allowed
    assert not evaluate(p, facts(principal=OTHER)).allowed


def test_audit_is_noted_and_changes_nothing() -> None:
    p = policies(doc("AuthorizationPolicy", "audit",
                     "  action: AUDIT\n  rules: [{from: [{source: {namespaces: [default]}}]}]"))
    v = evaluate(p, facts())
    assert v.allowed and v.reason == "no_policy" and v.audited == ("AuthorizationPolicy/default/audit#0",)
    assert evaluate(p, facts(principal=OTHER)).audited == ()


HTTP_ALLOW = doc("AuthorizationPolicy", "get-only", """\
  action: ALLOW
  rules:
  - to: [{operation: {methods: [GET], paths: ["/api/*"], hosts: ["web.*"]}}]
    when: [{key: "request.headers[x-team]", values: [blue]}]""")


def test_http_rules_at_l7() -> None:
    p = policies(HTTP_ALLOW)
    ok = HttpFacts("GET", "/api/items", "web.default.svc.mesh", (("x-team", "blue"),))
    assert evaluate(p, facts(http=ok)).allowed
    for bad in (HttpFacts("POST", "/api/items", "web.x", (("x-team", "blue"),)),
                HttpFacts("GET", "/admin", "web.x", (("x-team", "blue"),)),
                HttpFacts("GET", "/api/x", "db.x", (("x-team", "blue"),)),
                HttpFacts("GET", "/api/x", "web.x", ())):
        assert not evaluate(p, facts(http=bad)).allowed, bad


def test_http_only_rules_at_l4_never_allow_and_always_deny() -> None:
    # Istio's semantics for TCP: an ALLOW rule that needs HTTP attributes does not match...
    v = evaluate(policies(HTTP_ALLOW), facts())
    assert not v.allowed and v.reason == "no_allow_match"
    # ...and a DENY rule that needs them matches on its L4 parts alone (fail closed).
    p = policies(doc("AuthorizationPolicy", "no-delete", """\
  action: DENY
  rules: [{from: [{source: {namespaces: [shop]}}], to: [{operation: {methods: [DELETE]}}]}]"""))
    assert not evaluate(p, facts(principal=OTHER)).allowed
    assert evaluate(p, facts()).allowed
    assert evaluate(p, facts(principal=OTHER, http=HttpFacts("GET", "/", "web"))).allowed


@pytest.mark.parametrize("verdict_field", ["authz", "authz_reason", "mtls_mode"])
def test_log_fields_name_the_decision(verdict_field: str) -> None:
    p = policies(doc("AuthorizationPolicy", "deny", "  action: DENY\n  rules: [{}]"))
    fields = evaluate(p, facts()).log_fields()
    assert verdict_field in fields
    assert fields["authz"] == "deny" and fields["authz_policy"] == "AuthorizationPolicy/default/deny"
    assert fields["authz_rule"] == 0
