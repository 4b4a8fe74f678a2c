"""The one request-target normalization of the data plane. Routing,
authorization, metrics and access logs all see the path it returns, and the
proxies forward exactly that path, so no later hop can read a request
differently from the one that was decided (the HTTP/1.1 request target and
the HTTP/2 :path alike).

- absolute-form (`http://web/admin`) becomes origin-form plus the authority,
  which replaces Host (RFC 9112 3.2.2);
- a fragment (`#`) is refused: it never belongs on the wire (RFC 9112 3.2);
- percent-escapes of unreserved characters are decoded, other escapes get
  upper-case hex, a malformed escape is refused (RFC 3986 6.2.2.1-2);
- `%2F`, `%5C` and a raw `\\` follow MeshConfig spec.http.pathWithEscapedSlashesAction
  (REJECT_REQUEST by default; KEEP_UNCHANGED: kept escaped, a raw `\\` as `%5C`;
  UNESCAPE_AND_FORWARD: all three become `/`), so the result is stable:
  normalizing it again gives it back;
- runs of `/` are merged, then dot segments removed (RFC 3986 5.2.4), so
  `//admin`, `/a/../admin` and `/%2e%2e/admin` are all `/admin`;
- `;` parameters stay in their segment and are matched as written
  (`/admin;x=1` is a path under /admin* rules, not /admin);
- the query is kept byte for byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from nodemesh.httpedge import DEFAULT_LIMITS

_HEX = "0123456789ABCDEFabcdef"
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
_AUTHORITY = re.compile(r"^(?:[A-Za-z0-9._~!$&'()*+,;=:-]|%[0-9A-Fa-f]{2}|\[[0-9A-Fa-f:.]+\])*$")


class BadTarget(ValueError):
    """A request target the edge refuses; reason is the stable code, status the answer."""

    def __init__(self, reason: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.reason = reason
        self.status = status


@dataclass(frozen=True, slots=True)
class Target:
    path: str  # normalized, starts with "/" (or is "*")
    query: str  # "" or "?..." as received
    authority: str | None  # from an absolute-form target (replaces Host), else None

    @property
    def target(self) -> str:
        return self.path + self.query


def normalize_target(raw: str, method: str = "GET", escaped_slashes: str = DEFAULT_LIMITS.escaped_slash_action,
                     h2: bool = False) -> Target:
    """The normalized form of a request target (HTTP/1.1) or :path (HTTP/2, where
    only origin-form and "*" exist: RFC 9113 8.3.1); raises BadTarget."""
    if "#" in raw:
        raise BadTarget("fragment_in_target", "a request target must not carry a fragment ('#')")
    authority: str | None = None
    if raw == "*":
        if method != "OPTIONS":
            raise BadTarget("bad_target", "the asterisk form is only for OPTIONS")
        return Target("*", "", None)
    if not raw.startswith("/"):
        if h2:
            raise BadTarget("bad_target", f":path {raw[:60]!r} must start with '/'")
        scheme, sep, rest = raw.partition("://")
        if not sep or scheme.lower() not in ("http", "https"):
            raise BadTarget("bad_target", f"request target {raw[:60]!r} is neither origin-form nor an http(s) "
                                          "absolute-form")
        cut = min((i for i in (rest.find("/"), rest.find("?")) if i >= 0), default=len(rest))
        authority, raw = rest[:cut], rest[cut:]
        if not authority or "@" in authority or not _AUTHORITY.match(authority):
            raise BadTarget("bad_target", f"absolute-form target with a bad authority {authority[:60]!r}")
        if not raw.startswith("/"):
            raw = "/" + raw
    path, sep, query = raw.partition("?")
    if "%" in path or "\\" in path:
        path = _decode(path, escaped_slashes)
    return Target(_remove_dots(path), sep + query, authority)


def _decode(path: str, escaped_slashes: str) -> str:
    out: list[str] = []
    i, n = 0, len(path)
    while i < n:
        c = path[i]
        if c == "%":
            h = path[i + 1:i + 3]
            if len(h) != 2 or h[0] not in _HEX or h[1] not in _HEX:
                raise BadTarget("bad_percent_escape", f"malformed percent-escape at {path[i:i + 3]!r}")
            ch = chr(int(h, 16))
            if ch in "/\\":
                if escaped_slashes == "REJECT_REQUEST":
                    raise BadTarget("escaped_slash", "an escaped '/' or '\\' in the path is refused "
                                                     "(MeshConfig spec.http.pathWithEscapedSlashesAction)")
                # Unescaped, both are "/" (as a raw "\\" is): left as "\\", a hop that normalizes
                # again would read a "/" there and decide on another path (found by fuzzing).
                out.append("/" if escaped_slashes == "UNESCAPE_AND_FORWARD" else "%" + h.upper())
            elif ch in _UNRESERVED:
                out.append(ch)
            else:
                out.append("%" + h.upper())
            i += 3
            continue
        if c == "\\":
            if escaped_slashes == "REJECT_REQUEST":
                raise BadTarget("escaped_slash", "a '\\' in the path is refused "
                                                 "(MeshConfig spec.http.pathWithEscapedSlashesAction)")
            out.append("/" if escaped_slashes == "UNESCAPE_AND_FORWARD" else "%5C")
            i += 1
            continue
        out.append(c)
        i += 1
    return "".join(out)


def _remove_dots(path: str) -> str:
    """Merged slashes, then RFC 3986 5.2.4 on the segments; the result starts with '/'."""
    if "//" not in path and "/." not in path:
        return path  # the common case: nothing to do
    segments = [s for s in path.split("/")]
    out: list[str] = []
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        if i == 0:
            continue  # before the leading "/"
        if seg == "" and i != last:
            continue  # merged slashes
        if seg == "..":
            if out:
                out.pop()
            if i == last:
                out.append("")
        elif seg == ".":
            if i == last:
                out.append("")
        else:
            out.append(seg)
    return "/" + "/".join(out)
