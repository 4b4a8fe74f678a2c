"""Security policies as the control plane serves them: read from the store,
turned into nodemesh.v1.Policy xDS resources (one per policy, plus the
mesh-wide MeshSecurity settings, always present)."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence

from controlplane.store import Store
from nodemesh import model, security, xdsnames
from nodemesh.v1 import mesh_pb2

log = logging.getLogger("nodemesh.controlplane.policies")

Policy = security.PeerAuthentication | security.AuthorizationPolicy


def current_policies(store: Store) -> list[Policy]:
    """Every stored PeerAuthentication and AuthorizationPolicy that still validates."""
    out: list[Policy] = []
    for kind in (model.KIND_PEER_AUTHENTICATION, model.KIND_AUTHORIZATION_POLICY):
        resources, _ = store.list(kind)
        for r in resources:
            try:
                obj = model.object_from_spec(r.kind, r.namespace, r.name, r.spec(), dict(r.labels))
            except model.ValidationError as e:  # stored by an older version with other rules
                log.warning("stored %s %s/%s no longer validates, not serving it: %s", r.kind, r.namespace,
                            r.name, e)
                continue
            out.append(obj)
    return sorted(out, key=lambda p: (p.kind, p.namespace, p.name))


def policy_resources(mesh: model.MeshConfig, policies: Sequence[Policy]) -> dict[str, mesh_pb2.Policy]:
    """name -> nodemesh.v1.Policy, MeshSecurity//mesh included."""
    sec = security.mesh_security_of(mesh)
    out = {xdsnames.MESH_SECURITY_RESOURCE: mesh_pb2.Policy(
        kind=security.KIND_MESH_SECURITY, namespace="", name="mesh", spec_json=sec.to_json())}
    for p in policies:
        out[xdsnames.policy_resource_name(p.kind, p.namespace, p.name)] = mesh_pb2.Policy(
            kind=p.kind, namespace=p.namespace, name=p.name, spec_json=json.dumps(p.spec(), sort_keys=True))
    return out
