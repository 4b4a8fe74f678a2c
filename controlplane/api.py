"""The config API (nodemesh.v1.ConfigService) over the model and the store:
plan a whole batch (validation, VIPs, MeshConfig cross-checks), then write it
in one transaction, or write nothing."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from controlplane.store import (
    CompactedError,
    Delete,
    Put,
    Store,
    StoredResource,
    StoreError,
    Write,
    WriteResult,
)
from controlplane.vip import VipExhausted, allocate_vip, is_usable
from controlplane.xds import validate as xds_validate
from controlplane.xds.build import ServiceEntry
from controlplane.xds.sync import PROXY_STATUS_KIND, PROXY_STATUS_KINDS
from nodemesh import model, rolloutspec
from nodemesh.fieldcheck import Problem
from nodemesh.v1 import mesh_pb2, mesh_pb2_grpc

log = logging.getLogger("nodemesh.controlplane.api")


# ---------------------------------------------------------------- reading config back


def current_mesh(store: Store) -> model.MeshConfig:
    """The stored MeshConfig, or the defaults when none was applied."""
    r = store.get(model.KIND_MESH_CONFIG, "", model.MESH_CONFIG_NAME)
    if r is None:
        return model.MeshConfig()
    obj = model.object_from_spec(r.kind, r.namespace, r.name, r.spec(), dict(r.labels))
    if not isinstance(obj, model.MeshConfig):
        raise TypeError(f"stored MeshConfig parsed as {type(obj).__name__}")
    return obj


def _stored_services(store: Store) -> dict[tuple[str, str, str], tuple[model.ServiceSpec, StoredResource]]:
    out: dict[tuple[str, str, str], tuple[model.ServiceSpec, StoredResource]] = {}
    resources, _ = store.list(model.KIND_SERVICE)
    for r in resources:
        try:
            obj = model.object_from_spec(r.kind, r.namespace, r.name, r.spec(), dict(r.labels))
        except model.ValidationError as e:  # written by an older version with other rules
            log.warning("stored %s %s/%s no longer validates, ignoring it: %s", r.kind, r.namespace,
                        r.name, e)
            continue
        if not isinstance(obj, model.ServiceSpec):
            raise TypeError(f"stored Service {r.namespace}/{r.name} parsed as {type(obj).__name__}")
        out[r.ref] = (obj, r)
    return out


def current_services(store: Store) -> list[ServiceEntry]:
    """Every stored service with its VIP (fixed, or allocated in its status)."""
    out = []
    for svc, r in _stored_services(store).values():
        vip = svc.vip or str(r.status().get("vip", ""))
        out.append(ServiceEntry(svc, vip))
    return sorted(out, key=lambda e: e.service.key)


# ---------------------------------------------------------------- planning


@dataclass(frozen=True)
class Plan:
    writes: list[Write]
    reported: int  # the first `reported` writes are the ones the caller asked for


def _rollout_checks(store: Store, final: dict[tuple[str, str, str], model.ServiceSpec],
                    upserts: Sequence[model.Document], deletes: Sequence[tuple[str, str, str]],
                    workloads: Sequence[tuple[str, dict[str, str]]] | None) -> tuple[list[Problem],
                                                                                      dict[tuple[str, str, str], str]]:
    """Rollouts against the resulting config: their service exists, one per service,
    and a new run's versions each select a registered workload. Returns (problems,
    status to keep per batch Rollout: an unchanged run keeps the controller's state)."""
    stored = {r.ref: r for r in store.list(rolloutspec.KIND_ROLLOUT)[0]}
    final_ro: dict[tuple[str, str, str], rolloutspec.Rollout] = {}
    for ref, r in stored.items():
        if ref in deletes:
            continue
        try:
            obj = model.object_from_spec(r.kind, r.namespace, r.name, r.spec(), dict(r.labels))
        except model.ValidationError:
            continue
        final_ro[ref] = obj
    keep: dict[tuple[str, str, str], str] = {}
    new_runs = []
    for d in upserts:
        if isinstance(d.obj, rolloutspec.Rollout):
            final_ro[d.ref] = d.obj
            old = stored.get(d.ref)
            if old is not None:
                keep[d.ref] = old.status_json
            if old is None or old.status().get("run") != d.obj.run_id:
                new_runs.append(d.obj)
    services = list(final.values())
    problems = rolloutspec.check_against(list(final_ro.values()), services, None)
    if new_runs and workloads is not None:
        problems += rolloutspec.check_against(new_runs, services, workloads)
    return list(dict.fromkeys(problems)), keep


def plan_changes(store: Store, upserts: Sequence[model.Document],
                 deletes: Sequence[tuple[str, str, str]] = (),
                 workloads: Sequence[tuple[str, dict[str, str]]] | None = None) -> Plan:
    """Turn requested changes into store writes: validate cross-object rules
    against the resulting config and (re)allocate VIPs. Raises ValidationError.
    `workloads`: the registered workloads as (namespace, labels), for Rollout checks."""
    problems: list[Problem] = []
    mesh = current_mesh(store)
    for d in upserts:
        if isinstance(d.obj, model.MeshConfig):
            mesh = d.obj
    if (model.KIND_MESH_CONFIG, "", model.MESH_CONFIG_NAME) in deletes:
        mesh = model.MeshConfig()
    net = mesh.vip_network

    stored = _stored_services(store)
    final: dict[tuple[str, str, str], model.ServiceSpec] = {ref: s for ref, (s, _) in stored.items()}
    for ref in deletes:
        final.pop(ref, None)
    batch_refs = set()
    for d in upserts:
        if isinstance(d.obj, model.ServiceSpec):
            final[d.ref] = d.obj
            batch_refs.add(d.ref)
    problems += model.check_services_against_mesh([final[r] for r in sorted(final)], mesh)
    ro_problems, keep_status = _rollout_checks(store, final, upserts, deletes, workloads)
    problems += ro_problems
    # What Envoy would NACK is refused here, not discovered later as a silent stale client.
    problems += xds_validate.check_l7(mesh, [final[r] for r in sorted(final)], upserts)

    # VIPs: fixed ones first, then keep every allocation still valid, then allocate the rest.
    vips: dict[tuple[str, str, str], str] = {}
    owner: dict[str, tuple[str, str, str]] = {}
    for ref in sorted(final):
        svc = final[ref]
        if svc.vip:
            if svc.vip in owner:
                other = final[owner[svc.vip]]
                problems.append((f"Service {svc.key}: spec.vip",
                                 (f"{svc.vip} is already the fixed VIP of Service {other.key}; "
                                  "each service needs its own VIP")))
                continue
            vips[ref] = svc.vip
            owner[svc.vip] = ref
    for ref in sorted(final):
        if ref in vips or ref not in stored:
            continue
        old = str(stored[ref][1].status().get("vip", ""))
        if old and is_usable(net, old) and old not in owner:
            vips[ref] = old
            owner[old] = ref
    for ref in sorted(final):
        if ref in vips:
            continue
        svc = final[ref]
        try:
            vip = allocate_vip(net, svc.key, owner.keys())
        except VipExhausted as e:
            problems.append((f"Service {svc.key}: status.vip", str(e)))
            continue
        vips[ref] = vip
        owner[vip] = ref
    if problems:
        raise model.ValidationError(problems)

    writes: list[Write] = []
    for d in upserts:
        status = {"vip": vips[d.ref]} if d.ref in vips else {}
        status_json = keep_status.get(d.ref) or json.dumps(status)
        writes.append(Put(d.kind, d.namespace, d.name, json.dumps(d.obj.spec()),
                          status_json, d.labels))
    for ref in deletes:
        writes.append(Delete(*ref))
    reported = len(writes)
    # Services outside the batch whose VIP moved (e.g. the VIP range changed).
    for ref in sorted(final):
        if ref in batch_refs or ref not in stored:
            continue
        svc, r = stored[ref]
        if str(r.status().get("vip", "")) != vips[ref]:
            writes.append(Put(r.kind, r.namespace, r.name, r.spec_json, json.dumps({"vip": vips[ref]}),
                              r.labels, r.api_version))
    return Plan(writes, reported)


# ---------------------------------------------------------------- proto edge


def resource_to_proto(r: StoredResource) -> mesh_pb2.Resource:
    return mesh_pb2.Resource(
        api_version=r.api_version, kind=r.kind, namespace=r.namespace, name=r.name,
        spec_json=r.spec_json, status_json=r.status_json, resource_version=r.resource_version,
        created_unix_ms=r.created_unix_ms, updated_unix_ms=r.updated_unix_ms, labels=dict(r.labels))


def resolve_ref(kind: str, namespace: str, name: str) -> tuple[str, str, str]:
    """Canonical (kind, namespace, name): aliases resolved, default namespace filled."""
    k = model.canonical_kind(kind)
    ns = "" if k in model.CLUSTER_SCOPED else (namespace or model.DEFAULT_NAMESPACE)
    return (k, ns, name)


class ConfigServicer(mesh_pb2_grpc.ConfigServiceServicer):
    """nodemesh.v1.ConfigService. Every write goes through plan_changes, then
    one store transaction; snapshot rebuilds follow from the store's watch."""

    def __init__(self, store: Store,
                 workloads: Callable[[], Sequence[tuple[str, dict[str, str]]]] | None = None,
                 proxy_status: Callable[[], list[dict[str, Any]]] | None = None) -> None:
        self._store = store
        self._workloads = workloads  # registered (namespace, labels): Rollout versions must select some
        # Per-client xDS sync rows (controlplane/xds/sync.py), listed as kind ProxyStatus.
        self._proxy_status = proxy_status

    def _planner(self, documents: str) -> tuple[Callable[[], list[Write]], list[Plan]]:
        docs = model.parse_documents(documents)
        planned: list[Plan] = []

        def make() -> list[Write]:
            # Re-run when another control plane replica changed config meanwhile (store_etcd.py).
            planned[:] = [plan_changes(self._store, docs,
                                       workloads=self._workloads() if self._workloads is not None else None)]
            return planned[0].writes

        return make, planned

    def apply(self, documents: str, dry_run: bool = False) -> list[mesh_pb2.ApplyResult]:
        make, planned = self._planner(documents)
        return self._applied(self._store.apply_planned(make, dry_run=dry_run), planned[0], dry_run)

    async def apply_async(self, documents: str, dry_run: bool = False) -> list[mesh_pb2.ApplyResult]:
        """apply() from the event loop: an etcd write does not hold the loop up."""
        make, planned = self._planner(documents)
        return self._applied(await self._store.apply_planned_async(make, dry_run=dry_run), planned[0], dry_run)

    @staticmethod
    def _applied(results: Sequence[WriteResult], plan: Plan, dry_run: bool) -> list[mesh_pb2.ApplyResult]:
        if not dry_run:
            for r in results:
                if r.action != "unchanged":
                    log.info("%s %s %s/%s (revision %d)", r.action, r.kind, r.namespace, r.name,
                             r.resource_version)
        return [mesh_pb2.ApplyResult(kind=r.kind, namespace=r.namespace, name=r.name, action=r.action,
                                     resource_version=r.resource_version)
                for r in results[:plan.reported]]

    async def Apply(self, request: mesh_pb2.ApplyRequest,
                    context: grpc.aio.ServicerContext) -> mesh_pb2.ApplyResponse:
        try:
            results = await self.apply_async(request.documents, request.dry_run)
        except model.ValidationError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT,
                                f"nothing was applied; fix these and apply again:\n{e}")
        except StoreError as e:
            await context.abort(grpc.StatusCode.UNAVAILABLE, f"nothing was applied: {e}")
        return mesh_pb2.ApplyResponse(results=results)

    async def Get(self, request: mesh_pb2.ResourceRef,
                  context: grpc.aio.ServicerContext) -> mesh_pb2.Resource:
        try:
            ref = resolve_ref(request.kind, request.namespace, request.name)
        except model.ValidationError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        r = self._store.get(*ref)
        if r is None:
            hint = " (the defaults are in force)" if ref[0] == model.KIND_MESH_CONFIG else ""
            where = f"{ref[1]}/{ref[2]}" if ref[1] else ref[2]
            await context.abort(grpc.StatusCode.NOT_FOUND, f"{ref[0]} {where} not found{hint}")
            raise AssertionError("abort raises")
        return resource_to_proto(r)

    async def List(self, request: mesh_pb2.ListRequest,
                   context: grpc.aio.ServicerContext) -> mesh_pb2.ListResponse:
        kind = None
        if request.kind.lower() in PROXY_STATUS_KINDS:
            return self._list_proxy_status()
        if request.kind:
            try:
                kind = model.canonical_kind(request.kind)
            except model.ValidationError as e:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        resources, rev = self._store.list(kind, request.namespace or None)
        return mesh_pb2.ListResponse(resources=[resource_to_proto(r) for r in resources], revision=rev)

    def _list_proxy_status(self) -> mesh_pb2.ListResponse:
        """Not stored config: what each connected xDS client holds, as
        `istioctl proxy-status` shows it (synced / stale / nacked with the reason)."""
        rows = self._proxy_status() if self._proxy_status is not None else []
        return mesh_pb2.ListResponse(resources=[
            mesh_pb2.Resource(kind=PROXY_STATUS_KIND, name=r["node"] or f"stream-{r['stream']}",
                              status_json=json.dumps(r, sort_keys=True)) for r in rows],
            revision=self._store.revision())

    async def Delete(self, request: mesh_pb2.ResourceRef,
                     context: grpc.aio.ServicerContext) -> mesh_pb2.DeleteResponse:
        try:
            ref = resolve_ref(request.kind, request.namespace, request.name)
        except model.ValidationError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            if self._store.get(*ref) is None:
                return mesh_pb2.DeleteResponse(deleted=False, resource_version=self._store.revision())
            # Planned in the store's apply: re-run if another replica changed config meanwhile.
            results = await self._store.apply_planned_async(lambda: plan_changes(self._store, [], [ref]).writes)
        except model.ValidationError as e:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION,
                                f"{request.kind} {request.name} was not deleted:\n{e}")
        log.info("deleted %s %s/%s", *ref)
        return mesh_pb2.DeleteResponse(deleted=results[0].action == "deleted",
                                       resource_version=results[0].resource_version)

    async def Watch(self, request: mesh_pb2.WatchRequest,
                    context: grpc.aio.ServicerContext) -> AsyncIterator[mesh_pb2.WatchEvent]:
        kind = None
        try:
            if request.kind:
                kind = model.canonical_kind(request.kind)
        except model.ValidationError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
        try:
            async for ev in self._store.watch(kind, request.namespace or None, request.since_revision):
                yield mesh_pb2.WatchEvent(type=ev.type, resource=resource_to_proto(ev.resource))
        except CompactedError as e:
            await context.abort(grpc.StatusCode.OUT_OF_RANGE, str(e))
        except StoreError as e:
            await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(e))
