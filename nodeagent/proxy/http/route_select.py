"""The L7 routing decision as pure functions: which route entry a request
takes (first match in precedence order, as the control plane sorted them),
which weighted cluster, and how filters rewrite the request and response."""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from urllib.parse import parse_qsl

from nodeagent.meshview.l7snapshot import RouteEntry, RouteTable
from nodemesh.routespec import HeaderModifier, Redirect, RouteMatch, StringMatch

Headers = list[tuple[str, str]]  # lower-case names, in order, repeats allowed


@dataclass(frozen=True)
class RequestView:
    method: str
    target: str  # path and query as received
    headers: tuple[tuple[str, str], ...] = ()
    path: str = field(init=False)
    query: tuple[tuple[str, str], ...] = field(init=False)

    def __post_init__(self) -> None:
        path, _, q = self.target.partition("?")
        object.__setattr__(self, "path", path or "/")
        object.__setattr__(self, "query", tuple(parse_qsl(q, keep_blank_values=True)))

    def header(self, name: str) -> str | None:
        vals = [v for k, v in self.headers if k == name]
        return ",".join(vals) if vals else None


@lru_cache(maxsize=1024)
def _rx(pattern: str) -> re.Pattern[str]:
    return re.compile(pattern)


def _value_ok(m: StringMatch, value: str | None) -> bool:
    if value is None:
        return False
    if m.type == "RegularExpression":
        return _rx(m.value).fullmatch(value) is not None
    return value == m.value


def path_matches(m: RouteMatch, path: str) -> bool:
    if m.path_type == "Exact":
        return path == m.path
    if m.path_type == "RegularExpression":
        return _rx(m.path).fullmatch(path) is not None
    prefix = m.path.rstrip("/")
    # Gateway API prefixes match whole segments: /foo matches /foo and /foo/x, not /foobar.
    return not prefix or path == prefix or path.startswith(prefix + "/")


def matches(m: RouteMatch, req: RequestView) -> bool:
    if not path_matches(m, req.path):
        return False
    if m.method and req.method != m.method:
        return False
    for h in m.headers:
        if not _value_ok(h, req.header(h.name)):
            return False
    for q in m.query:
        vals = [v for k, v in req.query if k == q.name]
        if not vals or not _value_ok(q, vals[0]):  # the first value counts, as in Gateway API
            return False
    return True


def select_route(table: RouteTable, req: RequestView) -> RouteEntry | None:
    for entry in table.routes:
        if matches(entry.match, req):
            return entry
    return None


def choose_cluster(entry: RouteEntry, rng: random.Random | None = None) -> str:
    clusters = [c for c in entry.clusters if c.weight > 0]
    if len(clusters) == 1:
        return clusters[0].cluster
    total = sum(c.weight for c in clusters)
    x = (rng or random).uniform(0, total)
    for c in clusters:
        x -= c.weight
        if x < 0:
            return c.cluster
    return clusters[-1].cluster


def rewrite_path(entry: RouteEntry, path: str) -> str:
    rw = entry.path_rewrite
    if rw is None:
        return path
    if rw.prefix is not None:
        prefix = entry.match.path.rstrip("/")
        rest = path[len(prefix):] if entry.match.path_type == "PathPrefix" and path.startswith(prefix) else path
        new = rw.prefix.rstrip("/") + rest if rest else rw.prefix
        return new if new.startswith("/") else "/" + new
    return _rx(rw.regex).sub(rw.substitution, path, count=1)


def redirect_location(rd: Redirect, match: RouteMatch, req: RequestView, host: str) -> str:
    """Absolute Location for a RequestRedirect (Gateway API defaults: keep what is not set)."""
    hostname, _, port_s = host.partition(":")
    scheme = rd.scheme or "http"
    port = rd.port or (int(port_s) if port_s.isdigit() and not rd.scheme else 0)
    path = req.path
    if rd.path_type == "ReplaceFullPath":
        path = rd.path
    elif rd.path_type == "ReplacePrefixMatch":
        prefix = match.path.rstrip("/")
        path = (rd.path.rstrip("/") + req.path[len(prefix):]) or "/"
    default_port = {"http": 80, "https": 443}[scheme]
    authority = (rd.hostname or hostname) + (f":{port}" if port and port != default_port else "")
    q = req.target.partition("?")[2]
    return f"{scheme}://{authority}{path}" + (f"?{q}" if q else "")


def modify_headers(headers: Headers, mod: HeaderModifier | None) -> Headers:
    if mod is None:
        return headers
    drop = {n for n, _ in mod.set} | set(mod.remove)
    out = [(k, v) for k, v in headers if k not in drop]
    out += list(mod.set) + list(mod.add)
    return out


def host_of(headers: Sequence[tuple[str, str]]) -> str:
    for k, v in headers:
        if k == "host":
            return v
    return ""
