"""The mesh view's login and the headers every page carries.

- Login with an operator bearer token (ro or rw; the same credential the
  config API takes): POST /login makes a session, kept in memory (bounded,
  expiring), and sets it as a cookie that is HttpOnly and SameSite=Strict, so
  page scripts cannot read it and other sites cannot send it. Every view and
  API path needs a live session; /metrics (Prometheus) and /login stay open.
  A revoked or expired operator credential ends its sessions at the next request.
- `Host` must name this server (its listen address, localhost, loopback, or
  --web-host): a DNS-rebinding page on another name gets 421.
- Every response carries a Content-Security-Policy that allows only this
  page's own inline script and style (by hash), no other origin, no framing.
  The page escapes everything that comes from nodes.
"""

from __future__ import annotations

import base64
import hashlib
import re
import secrets
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

COOKIE = "nm_session"
SESSION_TTL_S = 8 * 3600
MAX_SESSIONS = 1000
MAX_LOGIN_BODY = 4096

LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>nodemesh · log in</title>
<style>body{font:14px system-ui,sans-serif;background:#0f1419;color:#d7dee6;display:flex;justify-content:center;\
margin-top:15vh}form{background:#161d25;padding:1.5rem;border-radius:8px;min-width:22rem}input{width:100%;\
margin:.5rem 0 1rem;padding:.4rem;background:#0f1419;color:#d7dee6;border:1px solid #2d3a47}p.err{color:#f85149}</style>
</head><body><form method="post" action="/login" id="login">
<h1>nodemesh mesh view</h1>{error}
<label for="token">Operator token (<code>nodemesh operator create NAME --role ro</code>)</label>
<input id="token" name="token" type="password" autocomplete="off" autofocus>
<button type="submit" id="submit">Log in</button></form></body></html>
"""

_INLINE = re.compile(rb"<(script|style)>(.*?)</\1>", re.DOTALL)


def csp_for(page: bytes) -> str:
    """A policy allowing exactly the page's own inline <script> and <style> blocks."""
    hashes: dict[str, list[str]] = {"script": [], "style": []}
    for kind, body in _INLINE.findall(page):
        digest = base64.b64encode(hashlib.sha256(body).digest()).decode()
        hashes[kind.decode()].append(f"'sha256-{digest}'")
    return ("default-src 'none'; "
            f"script-src {' '.join(hashes['script']) or chr(39) + 'none' + chr(39)}; "
            f"style-src {' '.join(hashes['style']) or chr(39) + 'none' + chr(39)}; "
            "img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


NO_CONTENT = "default-src 'none'; frame-ancestors 'none'"  # JSON and text: nothing to run or load
# same-origin, not no-referrer: with no-referrer Chromium sends `Origin: null` on the login
# form's POST, which origin_ok() must refuse.
SECURITY_HEADERS = ("X-Content-Type-Options: nosniff\r\nX-Frame-Options: DENY\r\nReferrer-Policy: same-origin\r\n"
                    "Cross-Origin-Opener-Policy: same-origin\r\n")


@dataclass
class LoginSession:
    principal: str
    token: str  # re-checked at each request: a revoked credential ends the session
    expires: float


def header(head: bytes, name: str) -> str | None:
    want = name.lower().encode()
    for line in head.split(b"\r\n")[1:]:
        k, sep, v = line.partition(b":")
        if sep and k.strip().lower() == want:
            return v.strip().decode("latin-1")
    return None


class WebAuth:
    def __init__(self, check_token: Callable[[str], Any], hosts: Iterable[str],
                 clock: Callable[[], float] = time.time) -> None:
        self._check = check_token  # token -> controlplane.operators.Caller
        self.hosts = {h.lower() for h in hosts}
        self._clock = clock
        self._sessions: OrderedDict[str, LoginSession] = OrderedDict()

    @staticmethod
    def hosts_for(listen_host: str, port: int, extra: Iterable[str] = ()) -> set[str]:
        names = {listen_host, "localhost", "127.0.0.1", "[::1]", *extra}
        return {f"{n}:{port}" for n in names if n} | {n for n in extra if ":" in n}

    def host_ok(self, head: bytes) -> bool:
        host = header(head, "host")
        return host is not None and host.lower() in self.hosts

    def origin_ok(self, head: bytes) -> bool:
        """A POST's Origin (when the browser sends one) must be this server."""
        origin = header(head, "origin")
        if origin is None:
            return True
        return urllib.parse.urlsplit(origin).netloc.lower() in self.hosts

    def login(self, body: bytes) -> tuple[str, str] | tuple[None, str]:
        """(session id, principal) or (None, why)."""
        fields = urllib.parse.parse_qs(body.decode("utf-8", "replace"))
        token = (fields.get("token") or [""])[-1].strip()
        if not token:
            return None, "enter an operator token"
        caller = self._check(token)
        if getattr(caller, "kind", "") != "operator":
            return None, "that token is not a live operator token (unknown, revoked or expired)"
        sid = secrets.token_urlsafe(32)
        self._sessions[sid] = LoginSession(caller.principal, token, self._clock() + SESSION_TTL_S)
        while len(self._sessions) > MAX_SESSIONS:
            self._sessions.popitem(last=False)  # the oldest goes first
        return sid, caller.principal

    def session(self, head: bytes) -> LoginSession | None:
        cookies = header(head, "cookie") or ""
        for part in cookies.split(";"):
            k, _, v = part.strip().partition("=")
            if k != COOKIE:
                continue
            s = self._sessions.get(v)
            if s is None:
                return None
            if s.expires <= self._clock() or getattr(self._check(s.token), "kind", "") != "operator":
                self._sessions.pop(v, None)
                return None
            return s
        return None

    @staticmethod
    def cookie(sid: str) -> str:
        return f"Set-Cookie: {COOKIE}={sid}; HttpOnly; SameSite=Strict; Path=/; Max-Age={SESSION_TTL_S}\r\n"

    @staticmethod
    def login_page(error: str = "") -> bytes:
        from html import escape

        return LOGIN_PAGE.replace("{error}", f'<p class="err" id="error">{escape(error)}</p>' if error else "").encode()
