"""Refuse at apply what known xDS clients would reject.

Envoy checks every resource against the protoc-gen-validate (PGV) rules carried
in its protos' field options (`validate.rules`, `validate.required`), and NACKs
a whole response when one resource breaks them; the client then silently keeps
its previous configuration while `nodemesh apply` said "configured". This
module reads the same annotations from the generated descriptors (so it follows
the proto files, not a hand-kept list) and checks the resources a config change
translates to, before anything is stored. It covers the rule kinds our
translation can produce: required messages and oneofs, durations, numbers,
strings, repeated and map sizes, and defined enums. Rules it does not know are
not checked (Envoy stays the final judge and NACKs show in `get proxystatus`).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

from google.protobuf import descriptor as _d
from google.protobuf.message import Message
from validate import validate_pb2

from controlplane.xds import build_routes as xds_routes
from controlplane.xds.build import ServiceEntry, _cluster
from nodemesh import model, routespec
from nodemesh.fieldcheck import Problem

_WRAPPERS = {"google.protobuf.UInt32Value", "google.protobuf.Int32Value", "google.protobuf.UInt64Value",
             "google.protobuf.Int64Value", "google.protobuf.DoubleValue", "google.protobuf.FloatValue",
             "google.protobuf.BoolValue", "google.protobuf.StringValue"}
_NUMERIC = ("uint32", "uint64", "int32", "int64", "sint32", "sint64", "fixed32", "fixed64", "sfixed32",
            "sfixed64", "double", "float")
MAX_VIOLATIONS = 20
_WORDS = {"gt": "greater than", "gte": "at least", "lt": "less than", "lte": "at most"}
_CMP = {"gt": operator.gt, "gte": operator.ge, "lt": operator.lt, "lte": operator.le}


def _dur_s(d: Any) -> float:
    return float(d.seconds) + float(d.nanos) / 1e9


def _rules(fd: _d.FieldDescriptor) -> Any:
    opts = fd.GetOptions()
    return opts.Extensions[validate_pb2.rules] if opts.HasExtension(validate_pb2.rules) else None


def _check_num(rule: Any, v: float, path: str, out: list[str]) -> None:
    if rule.HasField("const") and v != rule.const:
        out.append(f"{path}: must equal {rule.const}, is {v}")
    if rule.HasField("gt") and not v > rule.gt:
        out.append(f"{path}: must be greater than {rule.gt}, is {v}")
    if rule.HasField("gte") and not v >= rule.gte:
        out.append(f"{path}: must be at least {rule.gte}, is {v}")
    if rule.HasField("lt") and not v < rule.lt:
        out.append(f"{path}: must be less than {rule.lt}, is {v}")
    if rule.HasField("lte") and not v <= rule.lte:
        out.append(f"{path}: must be at most {rule.lte}, is {v}")
    allowed = list(getattr(rule, "in", ()))  # "in" is a Python keyword: no attribute syntax
    if allowed and v not in allowed:
        out.append(f"{path}: must be one of {allowed}, is {v}")


def _check_scalar(fd: _d.FieldDescriptor, rules: Any, v: Any, path: str, out: list[str]) -> None:
    kind = rules.WhichOneof("type")
    if kind in _NUMERIC:
        _check_num(getattr(rules, kind), v, path, out)
    elif kind == "string":
        r = rules.string
        if r.HasField("min_len") and len(v) < r.min_len:
            out.append(f"{path}: must be at least {r.min_len} character(s), is {v!r}")
        if r.HasField("max_len") and len(v) > r.max_len:
            out.append(f"{path}: must be at most {r.max_len} characters")
        if r.HasField("min_bytes") and len(v.encode()) < r.min_bytes:
            out.append(f"{path}: must be at least {r.min_bytes} byte(s), is {v!r}")
        if r.HasField("max_bytes") and len(v.encode()) > r.max_bytes:
            out.append(f"{path}: must be at most {r.max_bytes} bytes")
        if r.HasField("prefix") and not v.startswith(r.prefix):
            out.append(f"{path}: must start with {r.prefix!r}")
    elif kind == "enum" and rules.enum.defined_only and fd.enum_type.values_by_number.get(v) is None:
        out.append(f"{path}: {v} is not a defined {fd.enum_type.name}")


def violations(msg: Message, path: str = "", out: list[str] | None = None) -> list[str]:
    """Every PGV rule `msg` breaks, as "<field path>: <reason>" (at most MAX_VIOLATIONS)."""
    out = [] if out is None else out
    desc = msg.DESCRIPTOR
    for oneof in desc.oneofs:
        o = oneof.GetOptions()
        if o.HasExtension(validate_pb2.required) and o.Extensions[validate_pb2.required] \
                and msg.WhichOneof(oneof.name) is None:
            out.append(f"{path}{oneof.name}: one of {', '.join(f.name for f in oneof.fields)} is required")
    for fd in desc.fields:
        if len(out) >= MAX_VIOLATIONS:
            return out
        rules = _rules(fd)
        fpath = f"{path}{fd.name}"
        is_msg = fd.type == _d.FieldDescriptor.TYPE_MESSAGE
        if fd.is_repeated:
            values = getattr(msg, fd.name)
            is_map = is_msg and fd.message_type.GetOptions().map_entry
            if rules is not None and rules.WhichOneof("type") in ("repeated", "map"):
                r = getattr(rules, rules.WhichOneof("type"))
                lo = r.min_items if rules.WhichOneof("type") == "repeated" else r.min_pairs
                if lo and len(values) < lo:
                    out.append(f"{fpath}: needs at least {lo} item(s), has {len(values)}")
                if rules.WhichOneof("type") == "repeated" and r.HasField("items"):
                    for i, item in enumerate(values):
                        if not (is_msg and not is_map):
                            _check_scalar(fd, r.items, item, f"{fpath}[{i}]", out)
            if is_msg and not is_map:
                for i, item in enumerate(values):
                    violations(item, f"{fpath}[{i}].", out)
            elif is_map and fd.message_type.fields_by_name["value"].type == _d.FieldDescriptor.TYPE_MESSAGE:
                for k in values:
                    violations(values[k], f"{fpath}[{k!r}].", out)
            continue
        if fd.containing_oneof is not None and msg.WhichOneof(fd.containing_oneof.name) != fd.name:
            continue  # a oneof member's rules count only when it is the one set
        if is_msg:
            present = msg.HasField(fd.name)
            mt = fd.message_type.full_name
            if rules is not None:
                kind = rules.WhichOneof("type")
                if rules.message.required and not present:
                    out.append(f"{fpath}: is required")
                if kind == "duration":
                    r = rules.duration
                    if r.required and not present:
                        out.append(f"{fpath}: is required")
                    elif present:
                        v = _dur_s(getattr(msg, fd.name))
                        for name in ("gt", "gte", "lt", "lte"):
                            if r.HasField(name) and not _CMP[name](v, _dur_s(getattr(r, name))):
                                out.append(f"{fpath}: must be {_WORDS[name]} {_dur_s(getattr(r, name)):g}s, "
                                           f"is {v:g}s")
                elif present and mt in _WRAPPERS and kind is not None and kind != "message":
                    _check_scalar(fd.message_type.fields_by_name["value"], rules,
                                  getattr(msg, fd.name).value, fpath, out)
            if present and mt not in _WRAPPERS and mt != "google.protobuf.Any" \
                    and not mt.startswith("google.protobuf."):
                violations(getattr(msg, fd.name), f"{fpath}.", out)
            continue
        if rules is None:
            continue
        _check_scalar(fd, rules, getattr(msg, fd.name), fpath, out)
    return out


def check_l7(mesh: model.MeshConfig, services: Sequence[model.ServiceSpec],
             docs: Sequence[model.Document]) -> list[Problem]:
    """The routes and destination policies among `docs`, translated against
    `services` as the control plane will, each checked for what Envoy (and so
    every PGV-checking client) would reject. One problem per document."""
    problems: list[Problem] = []
    for d in docs:
        obj = d.obj
        found: list[str] = []
        if isinstance(obj, routespec.DestinationPolicy):
            for svc in services:
                if svc.namespace != obj.namespace or svc.name != obj.service:
                    continue
                for port in svc.ports:
                    c = _cluster(ServiceEntry(svc, ""), port, mesh.dns_domain)
                    xds_routes.apply_policy(c, obj)
                    found += [f"Cluster {c.name}: {v}" for v in violations(c)]
        elif isinstance(obj, routespec.HTTPRoute):
            for name, rcfg in xds_routes.route_configurations(
                    mesh, services, [xds_routes.StoredRoute(obj)]).items():
                found += [f"RouteConfiguration {name}: {v}" for v in violations(rcfg)]
        if found:
            shown = "; ".join(sorted(set(found))[:5])
            problems.append((f"{d.kind} {d.namespace}/{d.name}",
                             f"translates to xDS that Envoy would reject (NACK), so it is refused: {shown}"))
    return problems
