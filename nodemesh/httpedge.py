"""The HTTP edge limits (MeshConfig spec.http): what every L7 listener of every
node enforces on the requests it reads, with Envoy-like defaults. Shared by
the control plane (validation, carried to agents in the MeshSecurity
resource) and the agents (nodeagent/proxy/http/h1.py, pathnorm.py)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, fields
from typing import Any

from nodemesh.fieldcheck import FieldChecker, Problem

# Envoy's path_with_escaped_slashes_action values (the ones that make sense for a mesh).
ESCAPED_SLASH_ACTIONS = ("REJECT_REQUEST", "KEEP_UNCHANGED", "UNESCAPE_AND_FORWARD")


@dataclass(frozen=True)
class HttpLimits:
    """Limits on one downstream HTTP connection. Defaults follow Envoy's
    (max_request_headers_count 100, max_request_headers_kb 60,
    per_connection_buffer_limit_bytes 1 MiB, idle_timeout 1 h,
    stream_idle_timeout 5 min); the request-head timeout is on by default
    here (Envoy leaves request_headers_timeout off) because a partial head
    otherwise pins a connection forever."""

    max_headers: int = 100  # 431
    max_header_bytes: int = 60 * 1024  # the whole head, request line included: 431
    max_request_line: int = 16 * 1024  # 414
    max_buffered_bytes: int = 1 << 20  # unread request bytes per connection: reading pauses beyond
    request_head_timeout_s: float = 10.0  # first byte of a head to its end: 408
    idle_timeout_s: float = 3600.0  # a connection with no request in flight and no byte moving
    stream_idle_timeout_s: float = 300.0  # an HTTP/2 stream, or a request in flight, with no byte moving
    escaped_slash_action: str = "REJECT_REQUEST"  # %2F / %5C (and a raw backslash) in a path

    def to_spec(self) -> dict[str, Any]:
        """The non-default fields, as MeshConfig spec.http keys."""
        return non_default_spec(self, _SPEC_NAMES)


DEFAULT_LIMITS = HttpLimits()

_SPEC_NAMES = {
    "max_headers": "maxRequestHeaders",
    "max_header_bytes": "maxRequestHeaderBytes",
    "max_request_line": "maxRequestLineBytes",
    "max_buffered_bytes": "perConnectionBufferLimitBytes",
    "request_head_timeout_s": "requestHeadersTimeoutSeconds",
    "idle_timeout_s": "idleTimeoutSeconds",
    "stream_idle_timeout_s": "streamIdleTimeoutSeconds",
    "escaped_slash_action": "pathWithEscapedSlashesAction",
}
SPEC_FIELDS = tuple(_SPEC_NAMES.values())
_BOUNDS: dict[str, tuple[float, float]] = {
    "max_headers": (1, 10_000),
    "max_header_bytes": (1024, 8 << 20),
    "max_request_line": (64, 8 << 20),
    "max_buffered_bytes": (16 * 1024, 1 << 30),
    "request_head_timeout_s": (0.1, 86_400),
    "idle_timeout_s": (0.1, 7 * 86_400),
    "stream_idle_timeout_s": (0.1, 7 * 86_400),
}


def parse_fields(raw: Mapping[str, Any], path: str, names: Mapping[str, str],
                 bounds: Mapping[str, tuple[float, float]], choices: Mapping[str, tuple[str, ...]] | None = None
                 ) -> tuple[dict[str, Any], list[Problem]]:
    """A limits mapping (spec key -> value) -> dataclass keyword arguments and a
    (field path, reason) per problem, through the shared field validator: unknown
    keys, numbers out of `bounds` (an integer unless the field ends in `_s`),
    values not among `choices`."""
    c = FieldChecker()
    by_spec = {v: k for k, v in names.items()}
    kw: dict[str, Any] = {}
    for key, value in raw.items():
        name, kpath = by_spec.get(key), f"{path}.{key}"
        if name is None:
            c.add(kpath, f"unknown field; allowed: {', '.join(names.values())}")
            continue
        found = len(c.problems)
        allowed = (choices or {}).get(name)
        if allowed is not None:
            v: Any = c.one_of(value, kpath, allowed, "")
        elif name.endswith("_s"):
            v = c.number(value, kpath, *bounds[name], 0.0)
        else:
            lo, hi = bounds[name]
            v = c.integer(value, kpath, int(lo), int(hi), 0)
        if len(c.problems) == found:
            kw[name] = v
    return kw, c.problems


def non_default_spec(obj: Any, names: Mapping[str, str]) -> dict[str, Any]:
    """The fields of a limits dataclass that differ from its defaults, by spec key."""
    d = type(obj)()
    return {names[f.name]: getattr(obj, f.name) for f in fields(obj) if getattr(obj, f.name) != getattr(d, f.name)}


def parse_limits(raw: Mapping[str, Any], path: str = "spec.http") -> tuple[HttpLimits, list[tuple[str, str]]]:
    """spec.http -> HttpLimits and a (field path, reason) per problem; unknown fields are problems."""
    kw, problems = parse_fields(raw, path, _SPEC_NAMES, _BOUNDS, {"escaped_slash_action": ESCAPED_SLASH_ACTIONS})
    if "max_header_bytes" in kw and "max_request_line" not in kw:
        kw["max_request_line"] = min(DEFAULT_LIMITS.max_request_line, kw["max_header_bytes"])
    limits = HttpLimits(**kw)
    if limits.max_request_line > limits.max_header_bytes:
        why = "must not exceed maxRequestHeaderBytes (the request line is part of the head)"
        problems.append((f"{path}.maxRequestLineBytes", why))
    return limits, problems
