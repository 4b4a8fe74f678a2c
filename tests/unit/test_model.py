"""The config model: good documents parse into frozen objects with defaults,
bad ones are refused with every (path, reason)."""

from __future__ import annotations

import dataclasses

import pytest

from nodemesh import model

HEAD = "apiVersion: nodemesh.io/v1alpha1\nkind: Service\nmetadata: {name: web}\n"


def svc(spec: str, head: str = HEAD) -> str:
    return head + "spec:\n" + "".join(f"  {line}\n" for line in spec.strip().splitlines())


GOOD = svc("""
ports: [{port: 80, targetPort: 8080, protocol: http, name: http}, {port: 9000}]
selector: {app: web, tier: front}
""")


def problems(text: str) -> list[tuple[str, str]]:
    with pytest.raises(model.ValidationError) as e:
        model.parse_documents(text)
    return list(e.value.problems)


def test_service_parses_with_defaults() -> None:
    [doc] = model.parse_documents(GOOD)
    s = doc.obj
    assert isinstance(s, model.ServiceSpec)
    assert (doc.kind, doc.namespace, doc.name) == ("Service", "default", "web")
    assert s.ports == (model.ServicePortSpec(80, 8080, "http", "http"), model.ServicePortSpec(9000, 9000, "tcp", ""))
    assert s.selector == (("app", "web"), ("tier", "front"))
    assert s.vip == ""
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.name = "x"  # type: ignore[misc]
    assert s.selects("default", {"app": "web", "tier": "front", "x": "y"})
    assert not s.selects("other", {"app": "web", "tier": "front"})
    assert not s.selects("default", {"app": "web"})


def test_spec_round_trips_through_object_from_spec() -> None:
    [doc] = model.parse_documents(GOOD)
    again = model.object_from_spec("Service", "default", "web", doc.obj.spec())
    assert again == doc.obj


def test_mesh_config_defaults_and_cluster_scope() -> None:
    [doc] = model.parse_documents("apiVersion: nodemesh.io/v1alpha1\nkind: MeshConfig\n"
                                  "metadata: {name: mesh, namespace: ignored}\n")
    m = doc.obj
    assert isinstance(m, model.MeshConfig)
    assert doc.namespace == ""
    assert (m.trust_domain, m.vip_range, m.outbound_policy, m.dns_domain) == (
        "cluster.local", "240.240.0.0/16", "ALLOW_ANY", "mesh")


@pytest.mark.parametrize("text, path, reason", [
    (svc("ports: [{port: 80}, {port: 0}]\nselector: {app: web}"),
     "Service default/web: spec.ports[1].port", "must be an integer in 1..65535"),
    (svc("ports: [{port: 70000}]\nselector: {app: web}"),
     "Service default/web: spec.ports[0].port", "must be an integer in 1..65535"),
    (svc("ports: [{port: true}]\nselector: {app: web}"),
     "Service default/web: spec.ports[0].port", "must be an integer in 1..65535"),
    (svc("ports: [{port: '80'}]\nselector: {app: web}"),
     "Service default/web: spec.ports[0].port", "must be an integer in 1..65535"),
    (svc("ports: [{port: 80, targetPort: 0}]\nselector: {app: web}"),
     "Service default/web: spec.ports[0].targetPort", "must be an integer in 1..65535"),
    (svc("ports: [{port: 80, protocol: udp}]\nselector: {app: web}"),
     "Service default/web: spec.ports[0].protocol", "must be one of tcp, http, http2, grpc, auto, got 'udp'"),
    (svc("ports: [{port: 80}, {port: 80}]\nselector: {app: web}"),
     "Service default/web: spec.ports[1].port", "duplicate port 80 (also spec.ports[0])"),
    (svc("ports: [{port: 80, name: a}, {port: 81, name: a}]\nselector: {app: web}"),
     "Service default/web: spec.ports[1].name", "duplicate port name 'a' (also spec.ports[0])"),
    (svc("ports: [{port: 80, name: Bad_Name}]\nselector: {app: web}"),
     "Service default/web: spec.ports[0].name",
     "must be a DNS label (lower case letters, digits and '-', at most 63)"),
    (svc("ports: []\nselector: {app: web}"),
     "Service default/web: spec.ports", "required; must be a non-empty list of ports"),
    (svc("selector: {app: web}"),
     "Service default/web: spec.ports", "required; must be a non-empty list of ports"),
    (svc("ports: [{port: 80, extra: 1}]\nselector: {app: web}"),
     "Service default/web: spec.ports[0].extra", "unknown field; allowed: name, port, targetPort, protocol"),
    (svc("ports: [{port: 80}]"),
     "Service default/web: spec.selector", "required; must map at least one label to a value"),
    (svc("ports: [{port: 80}]\nselector: {}"),
     "Service default/web: spec.selector", "must map at least one label to a value"),
    (svc("ports: [{port: 80}]\nselector: {'bad key!': x}"),
     "Service default/web: spec.selector.bad key!", "invalid label key"),
    (svc("ports: [{port: 80}]\nselector: {app: [1]}"),
     "Service default/web: spec.selector.app", "label value must be a string, got list"),
    (svc("ports: [{port: 80}]\nselector: {app: web}\nvip: nope"),
     "Service default/web: spec.vip", "'nope' is not an IP address"),
    (svc("ports: [{port: 80}]\nselector: {app: web}\nvip: '::1'"),
     "Service default/web: spec.vip", "must be an IPv4 address"),
    (svc("ports: [{port: 80}]\nselector: {app: web}\nreplicas: 3"),
     "Service default/web: spec.replicas", "unknown field; allowed: ports, selector, vip"),
    (HEAD, "Service default/web: spec", "required"),
    (svc("ports: [{port: 80}]\nselector: {app: web}",
         "apiVersion: v1\nkind: Service\nmetadata: {name: web}\n"),
     "Service default/web: apiVersion", "must be 'nodemesh.io/v1alpha1', got 'v1'"),
    (svc("ports: [{port: 80}]\nselector: {app: web}",
         "apiVersion: nodemesh.io/v1alpha1\nkind: Gateway\nmetadata: {name: web}\n"),
     "document 0: kind", "got 'Gateway'"),
    (svc("ports: [{port: 80}]\nselector: {app: web}",
         "apiVersion: nodemesh.io/v1alpha1\nkind: Service\nmetadata: {namespace: x}\n"),
     "document 0: metadata.name", "required"),
    (svc("ports: [{port: 80}]\nselector: {app: web}",
         "apiVersion: nodemesh.io/v1alpha1\nkind: Service\nmetadata: {name: Web}\n"),
     "Service default/Web: metadata.name", "must be a DNS label"),
    (svc("ports: [{port: 80}]\nselector: {app: web}",
         "apiVersion: nodemesh.io/v1alpha1\nkind: Service\nmetadata: {name: web, namespace: A_B}\n"),
     "Service A_B/web: metadata.namespace", "must be a DNS label"),
    (svc("ports: [{port: 80}]\nselector: {app: web}",
         "apiVersion: nodemesh.io/v1alpha1\nkind: Service\nmetadata: {name: web, uid: 1}\n"),
     "Service default/web: metadata.uid", "unknown field"),
    (svc("ports: [{port: 80}]\nselector: {app: web}") + "extra: 1\n",
     "Service default/web: extra", "unknown field"),
    ("- just\n- a list\n", "document 0", "must be a mapping"),
    ("key: [unclosed\n", "yaml", "not valid YAML"),
    ("", "documents", "no documents found"),
    ("apiVersion: nodemesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: other}\n",
     "MeshConfig other: metadata.name", "there is one MeshConfig and it must be named 'mesh'"),
    ("apiVersion: nodemesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {vipRange: 10.0.0.1/8}\n",
     "MeshConfig mesh: spec.vipRange", "must be an IPv4 CIDR with no host bits set"),
    ("apiVersion: nodemesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {vipRange: 10.0.0.0/31}\n",
     "MeshConfig mesh: spec.vipRange", "must be a /30 or larger"),
    ("apiVersion: nodemesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {outboundPolicy: DENY}\n",
     "MeshConfig mesh: spec.outboundPolicy", "must be one of ALLOW_ANY, REGISTRY_ONLY, got 'DENY'"),
    ("apiVersion: nodemesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {trustDomain: 'A B'}\n",
     "MeshConfig mesh: spec.trustDomain", "trust domain 'A B' is not valid"),
    ("apiVersion: nodemesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {dnsDomain: 'a..b'}\n",
     "MeshConfig mesh: spec.dnsDomain", "must be a DNS name"),
    ("apiVersion: nodemesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {mtls: strict}\n",
     "MeshConfig mesh: spec.mtls", "must be a mapping"),
    ("apiVersion: nodemesh.io/v1alpha1\nkind: MeshConfig\nmetadata: {name: mesh}\nspec: {tls: strict}\n",
     "MeshConfig mesh: spec.tls", "unknown field"),
])
def test_bad_documents_name_path_and_reason(text: str, path: str, reason: str) -> None:
    found = problems(text)
    assert any(p == path and reason in r for p, r in found), found


def test_message_format_matches_the_operator_facing_form() -> None:
    with pytest.raises(model.ValidationError) as e:
        model.parse_documents(svc("ports: [{port: 80}, {port: 0}]\nselector: {app: web}"))
    assert str(e.value) == "Service default/web: spec.ports[1].port: must be an integer in 1..65535"


def test_batch_is_validated_whole_and_reports_every_document() -> None:
    bad1 = svc("ports: [{port: 0}]\nselector: {app: web}")
    bad2 = svc("ports: [{port: 80}]", HEAD.replace("name: web", "name: api"))
    found = problems(GOOD + "---\n" + bad1 + "---\n" + bad2)
    paths = [p for p, _ in found]
    assert "Service default/web: spec.ports[0].port" in paths
    assert "Service default/api: spec.selector" in paths


def test_duplicate_object_in_one_batch_is_refused() -> None:
    found = problems(GOOD + "---\n" + GOOD)
    assert found[0][0] == "document 1" and "also appears in document 0" in found[0][1]


def test_fixed_vip_checked_against_mesh_range() -> None:
    [doc] = model.parse_documents(svc("ports: [{port: 80}]\nselector: {app: web}\nvip: 10.0.0.5"))
    assert isinstance(doc.obj, model.ServiceSpec)
    found = model.check_services_against_mesh([doc.obj], model.MeshConfig())
    assert found[0][0] == "Service default/web: spec.vip"
    assert "outside the mesh VIP range 240.240.0.0/16" in found[0][1]
    [doc] = model.parse_documents(svc("ports: [{port: 80}]\nselector: {app: web}\nvip: 240.240.0.0"))
    assert isinstance(doc.obj, model.ServiceSpec)
    assert "network or broadcast" in model.check_services_against_mesh([doc.obj], model.MeshConfig())[0][1]
    [doc] = model.parse_documents(svc("ports: [{port: 80}]\nselector: {app: web}\nvip: 240.240.1.1"))
    assert isinstance(doc.obj, model.ServiceSpec)
    assert model.check_services_against_mesh([doc.obj], model.MeshConfig()) == []


def test_canonical_kind() -> None:
    assert model.canonical_kind("svc") == "Service"
    assert model.canonical_kind("meshconfig") == "MeshConfig"
    with pytest.raises(model.ValidationError):
        model.canonical_kind("pods")
