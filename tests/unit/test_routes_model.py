"""HTTPRoute / GRPCRoute / DestinationPolicy validation: good documents parse,
bad ones name the field path and the reason."""

from __future__ import annotations

import pytest
import yaml

from nodemesh import model, routespec

ROUTE = """\
apiVersion: nodemesh.io/v1alpha1
kind: HTTPRoute
metadata: {name: web-split}
spec:
  parentRefs: [{kind: Service, name: web, port: 80}]
  rules:
  - matches: [{path: {type: PathPrefix, value: /api}, headers: [{name: X-Canary, value: "yes"}]}]
    backendRefs: [{name: web-v2, port: 80}]
  - backendRefs: [{name: web-v1, port: 80, weight: 90}, {name: web-v2, port: 80, weight: 10}]
    timeouts: {request: 2s, backendRequest: 500ms}
    retry: {attempts: 3, backoff: 10ms, retryOn: [5xx], codes: [429]}
    filters:
    - type: RequestMirror
      requestMirror: {backendRef: {name: web-shadow, port: 80}, percent: 5}
    - type: Fault
      fault: {abort: {httpStatus: 503, percent: 1}}
"""


def test_good_route_parses() -> None:
    (doc,) = model.parse_documents(ROUTE)
    r = doc.obj
    assert isinstance(r, routespec.HTTPRoute) and r.parents == (routespec.ParentRef("web", 80),)
    first, second = r.rules
    assert first.matches[0].headers == (routespec.StringMatch("x-canary", "yes"),)
    assert [b.weight for b in second.backends] == [90, 10]
    assert second.request_timeout_s == 2.0 and second.backend_timeout_s == 0.5
    assert second.retry == routespec.Retry(3, 0.01, 0.25, ("5xx", "retriable-status-codes"), (429,), ())
    assert second.mirrors[0].percent == 5 and second.fault is not None and second.fault.abort_status == 503
    assert model.parse_documents(yaml.safe_dump(model.to_yaml_document(
        doc.kind, doc.namespace, doc.name, r.spec())))[0].obj == r


@pytest.mark.parametrize("spec, path, reason", [
    ("{rules: [{}]}", "spec.parentRefs", "required"),
    ("{parentRefs: [{kind: Gateway, name: gw}], rules: [{}]}", "spec.parentRefs[0].kind", "only Service"),
    ("{parentRefs: [{name: web}], rules: [{matches: [{path: {type: Regex, value: /}}]}]}",
     "spec.rules[0].matches[0].path.type", "must be one of"),
    ("{parentRefs: [{name: web}], rules: [{matches: [{path: {type: RegularExpression, value: '(('}}]}]}",
     "spec.rules[0].matches[0].path.value", "not a valid regular expression"),
    ("{parentRefs: [{name: web}], rules: [{timeouts: {request: 1s, backendRequest: 2s}}]}",
     "spec.rules[0].timeouts.backendRequest", "must not exceed"),
    ("{parentRefs: [{name: web}], rules: [{retry: {attempts: 0}}]}", "spec.rules[0].retry.attempts", "1..10"),
    ("{parentRefs: [{name: web}], rules: [{retry: {retryOn: [sometimes]}}]}",
     "spec.rules[0].retry.retryOn[0]", "must be one of"),
    ("{parentRefs: [{name: web}], rules: [{backendRefs: [{name: a, weight: 0}]}]}",
     "spec.rules[0].backendRefs", "every weight is 0"),
    ("{parentRefs: [{name: web}], rules: [{filters: [{type: Fault, fault: {}}]}]}",
     "spec.rules[0].filters[0].fault", "needs a delay or an abort"),
])
def test_bad_route_names_field(spec: str, path: str, reason: str) -> None:
    text = f"apiVersion: nodemesh.io/v1alpha1\nkind: HTTPRoute\nmetadata: {{name: r}}\nspec: {spec}\n"
    with pytest.raises(model.ValidationError) as ei:
        model.parse_documents(text)
    assert any(p == f"HTTPRoute default/r: {path}" and reason in r for p, r in ei.value.problems), ei.value.problems


def test_grpc_route_becomes_path_match() -> None:
    text = """\
apiVersion: nodemesh.io/v1alpha1
kind: GRPCRoute
metadata: {name: g}
spec:
  parentRefs: [{name: api}]
  rules: [{matches: [{method: {service: helloworld.Greeter, method: SayHello}}], backendRefs: [{name: api-v2}]}]
"""
    r = model.parse_documents(text)[0].obj
    assert r.rules[0].matches[0] == routespec.RouteMatch("Exact", "/helloworld.Greeter/SayHello")


def test_destination_policy() -> None:
    text = """\
apiVersion: nodemesh.io/v1alpha1
kind: DestinationPolicy
metadata: {name: web}
spec:
  targetRef: {kind: Service, name: web}
  loadBalancer: {policy: RingHash, hashOn: {header: x-user}}
  circuitBreaker: {maxRequests: 10}
  outlierDetection: {consecutive5xx: 3, baseEjectionTime: 5s}
  retryBudget: {ratio: 0.1, minRetriesPerSecond: 1}
"""
    p = model.parse_documents(text)[0].obj
    assert isinstance(p, routespec.DestinationPolicy)
    assert p.load_balancer.hash_header == "x-user" and p.circuit_breaker.max_requests == 10
    assert p.outlier is not None and p.outlier.base_ejection_s == 5.0 and p.retry_budget.ratio == 0.1
    bad = text.replace("hashOn: {header: x-user}", "hashOn: {}")
    with pytest.raises(model.ValidationError) as ei:
        model.parse_documents(bad)
    assert any("spec.loadBalancer.hashOn" in p for p, _ in ei.value.problems)
