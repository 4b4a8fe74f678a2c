"""PeerAuthentication / AuthorizationPolicy / MeshConfig security fields: clear
errors with field paths, a canonical spec that parses back to the same object,
the xDS Policy resource round trip, and fuzzing of the parsers (policies,
Policy resources, CSRs and certificates) with malformed input."""

from __future__ import annotations

import json
from typing import Any

import grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from controlplane.ca import CertificateRefused, parse_csr
from controlplane.policies import policy_resources
from nodeagent.xds.convert import NamedResource, XdsState, convert_batch
from nodemesh import model, security, xdsnames
from nodemesh.v1 import mesh_pb2
from tests.unit.test_xds_convert import full_state, pack


def doc(kind: str, spec: Any, name: str = "p", ns: str = "default") -> dict[str, Any]:
    return {"apiVersion": model.API_VERSION, "kind": kind, "metadata": {"name": name, "namespace": ns},
            "spec": spec}


def problems(d: dict[str, Any]) -> list[tuple[str, str]]:
    try:
        model.parse_document(d)
    except model.ValidationError as e:
        return list(e.problems)
    return []


def test_errors_name_the_field() -> None:
    cases = [
        (doc("PeerAuthentication", {"mtls": {"mode": "ON"}}), "spec.mtls.mode", "must be one of"),
        (doc("PeerAuthentication", {"portLevelMtls": {"80": {"mode": "STRICT"}}}), "spec.portLevelMtls",
         "needs spec.selector"),
        (doc("PeerAuthentication", {"selector": {"matchLabels": {"a": "b"}},
                                    "portLevelMtls": {"x": {"mode": "STRICT"}}}), "spec.portLevelMtls.x", "port"),
        (doc("AuthorizationPolicy", {"action": "LOG"}), "spec.action", "ALLOW, DENY, AUDIT"),
        (doc("AuthorizationPolicy", {"rules": [{"from": [{"source": {"principals": ["a*b*"]}}]}]}),
         "spec.rules[0].from[0].source.principals[0]", "'*'"),
        (doc("AuthorizationPolicy", {"rules": [{"from": [{"source": {}}]}]}), "spec.rules[0].from[0].source",
         "at least one"),
        (doc("AuthorizationPolicy", {"rules": [{"to": [{"operation": {"methods": ["get"]}}]}]}),
         "spec.rules[0].to[0].operation.methods[0]", "upper case"),
        (doc("AuthorizationPolicy", {"rules": [{"to": [{"operation": {"ports": [70000]}}]}]}),
         "spec.rules[0].to[0].operation.ports[0]", "1..65535"),
        (doc("AuthorizationPolicy", {"rules": [{"when": [{"key": "request.auth.claims[x]", "values": ["a"]}]}]}),
         "spec.rules[0].when[0].key", "request.headers"),
        (doc("AuthorizationPolicy", {"rules": [{"from": [{"source": {"ipBlocks": ["10.0.0.0/33"]}}]}]}),
         "spec.rules[0].from[0].source.ipBlocks[0]", "CIDR"),
        (doc("AuthorizationPolicy", {"selector": {"matchLabels": {}}}), "spec.selector.matchLabels", "at least one"),
        ({"apiVersion": model.API_VERSION, "kind": "MeshConfig", "metadata": {"name": "mesh"},
          "spec": {"mtls": {"mode": "OFF"}}}, "spec.mtls.mode", "STRICT, PERMISSIVE, DISABLE"),
        ({"apiVersion": model.API_VERSION, "kind": "MeshConfig", "metadata": {"name": "mesh"},
          "spec": {"defaultDeny": "yes"}}, "spec.defaultDeny", "true or false"),
        ({"apiVersion": model.API_VERSION, "kind": "MeshConfig", "metadata": {"name": "mesh"},
          "spec": {"nodeServiceAccounts": {"node-1": ["web"]}}}, "spec.nodeServiceAccounts.node-1[0]",
         "<namespace>/<service account>"),
    ]
    for d, path, reason in cases:
        found = problems(d)
        assert any(p.endswith(path) and reason in r for p, r in found), (path, found)


def test_canonical_spec_round_trips() -> None:
    spec = {"selector": {"matchLabels": {"app": "web"}}, "action": "DENY",
            "rules": [{"from": [{"source": {"principals": ["cluster.local/ns/a/sa/*"], "notIpBlocks": ["1.2.3.4"]}}],
                       "to": [{"operation": {"ports": ["8080"], "methods": ["GET"], "paths": ["/x*"]}}],
                       "when": [{"key": "request.headers[X-Team]", "notValues": ["red"]}]}]}
    obj = model.parse_document(doc("AuthorizationPolicy", spec)).obj
    again = security.policy_from_json(obj.kind, obj.namespace, obj.name, json.dumps(obj.spec()))
    assert again == obj
    pa = model.parse_document(doc("PeerAuthentication", {"selector": {"matchLabels": {"app": "web"}},
                                                         "mtls": {"mode": "STRICT"},
                                                         "portLevelMtls": {9090: {"mode": "DISABLE"}}})).obj
    assert security.policy_from_json(pa.kind, pa.namespace, pa.name, json.dumps(pa.spec())) == pa


def test_mesh_config_defaults_keep_the_old_spec() -> None:
    m = model.MeshConfig()
    assert set(m.spec()) == {"trustDomain", "vipRange", "outboundPolicy", "dnsDomain"}
    # Nothing bound: refused (identities are bound by the operator, default deny).
    assert not security.node_may_register(m, "node-1", "default", "web")
    strict = model.parse_document({"apiVersion": model.API_VERSION, "kind": "MeshConfig", "metadata": {"name": "mesh"},
                                   "spec": {"mtls": {"mode": "STRICT"}, "defaultDeny": True,
                                            "nodeServiceAccounts": {"node-1": ["default/web"], "*": ["ops/*"]}}}).obj
    assert strict.spec()["mtls"] == {"mode": "STRICT"} and strict.spec()["defaultDeny"] is True
    assert security.node_may_register(strict, "node-1", "default", "web")
    assert not security.node_may_register(strict, "node-1", "default", "admin")
    assert security.node_may_register(strict, "node-2", "ops", "anything")
    assert not security.node_may_register(strict, "node-2", "default", "web")


def test_policies_travel_over_xds_into_the_snapshot() -> None:
    mesh = model.MeshConfig(mtls_mode="STRICT", default_deny=True)
    ap = model.parse_document(doc("AuthorizationPolicy", {"rules": [{}]})).obj
    res = policy_resources(mesh, [ap])
    st_ = full_state()
    r = st_.apply(xdsnames.POLICY, "2", [NamedResource(n, pack(m)) for n, m in res.items()])
    assert r.accepted and r.snapshot is not None
    sec = r.snapshot.security
    assert sec.mesh.mtls_mode == "STRICT" and sec.mesh.default_deny and sec.authorization_policies == (ap,)


def test_bad_policy_resource_is_nacked_and_the_previous_set_stays() -> None:
    st_ = full_state()
    before = st_.snapshot
    bad = mesh_pb2.Policy(kind="AuthorizationPolicy", namespace="default", name="p",
                          spec_json=json.dumps({"action": "MAYBE"}))
    good_mesh = policy_resources(model.MeshConfig(), [])
    items = [NamedResource(n, pack(m)) for n, m in good_mesh.items()]
    r = st_.apply(xdsnames.POLICY, "3", items + [NamedResource("AuthorizationPolicy/default/p", pack(bad))])
    assert not r.accepted and "spec.action" in r.errors[0] and r.errors[0].startswith("AuthorizationPolicy/default/p")
    assert st_.snapshot is before
    # Without the MeshSecurity resource the batch is incomplete: refused too.
    _, errors = convert_batch(xdsnames.POLICY, [])
    assert "MeshSecurity//mesh" in errors[0]


# ---------------------------------------------------------------- fuzzing

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 70000) | st.text(max_size=12)
    | st.sampled_from(["ALLOW", "DENY", "AUDIT", "STRICT", "GET", "/a*", "*", "10.0.0.0/8", "8080"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(
        st.sampled_from(["selector", "matchLabels", "action", "rules", "from", "to", "when", "source",
                         "operation", "principals", "namespaces", "ipBlocks", "ports", "methods", "paths",
                         "hosts", "key", "values", "mtls", "mode", "portLevelMtls", "notPrincipals", "app"]),
        children, max_size=4),
    max_leaves=20)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(["AuthorizationPolicy", "PeerAuthentication", "MeshConfig"]), spec=json_values)
def test_fuzz_policy_parsing_gives_a_result_or_field_errors(kind: str, spec: Any) -> None:
    d = doc(kind, spec, name="mesh" if kind == "MeshConfig" else "p")
    try:
        obj = model.parse_document(d).obj
    except model.ValidationError as e:
        assert e.problems and all(isinstance(p, str) and isinstance(r, str) and r for p, r in e.problems)
        return
    # Whatever parses has a canonical form that parses to the same thing.
    assert model.object_from_spec(kind, obj.namespace, obj.name, json.loads(json.dumps(obj.spec()))) == obj


@settings(max_examples=200, deadline=None)
@given(kind=st.sampled_from(["AuthorizationPolicy", "PeerAuthentication", "MeshSecurity", "Gateway", ""]),
       spec_json=st.text(max_size=40) | json_values.map(json.dumps))
def test_fuzz_policy_resources_never_break_the_agent_state(kind: str, spec_json: str) -> None:
    st_ = XdsState(node="n")
    name = "MeshSecurity//mesh" if kind == "MeshSecurity" else f"{kind}/default/p"
    mesh = kind == "MeshSecurity"
    msg = mesh_pb2.Policy(kind=kind, namespace="" if mesh else "default", name="mesh" if mesh else "p",
                          spec_json=spec_json)
    r = st_.apply(xdsnames.POLICY, "1", [NamedResource(name, pack(msg))])
    assert r.accepted or (r.errors and all(isinstance(e, str) and e for e in r.errors))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=300).map(
    lambda t: f"-----BEGIN CERTIFICATE REQUEST-----\n{t}\n-----END CERTIFICATE REQUEST-----\n".encode()))
def test_fuzz_csr_parsing_is_refused_with_a_reason(data: bytes) -> None:
    try:
        parse_csr(data.decode("utf-8", "replace"))
    except CertificateRefused as e:
        assert e.code == grpc.StatusCode.INVALID_ARGUMENT and str(e)
