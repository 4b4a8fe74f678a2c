"""The strict HTTP/1.1 request edge, on httptools (llhttp, in C) with no I/O:
feed the caller's bytes, get request heads, body chunks and ends back, or an
EdgeError that says which status to answer and why (then close). Used by the
sending node's L7 stack (h1stack.py) and the receiving node's guard
(authz_l7.py), so both edges refuse the same requests for the same reasons.

RFC 9112 as enforced (llhttp in its strict mode does the byte-level work):
- Content-Length together with Transfer-Encoding: 400 and close (smuggling);
  duplicated, conflicting or non-numeric Content-Length: 400;
- any Transfer-Encoding other than exactly `chunked`: 501 (a final coding
  other than chunked, or a coding we would have to pass on undecoded);
- versions other than HTTP/1.0 and 1.1: 505; the HTTP/2 preface
  (`PRI * HTTP/2.0`) is reported as an event (H2Preface) for the caller to
  serve as HTTP/2 or refuse, never parsed as a request;
- obs-fold (a header line starting with whitespace) and bare LF line ends
  are rejected with 400, never rewritten;
- limits (MeshConfig spec.http, nodemesh/httpedge.py): request line 414,
  header count and head size 431, a body too big to buffer is the caller's
  413; the target goes through pathnorm.normalize_target (400 on a fragment,
  a bad escape, an escaped slash by default).
"""

from __future__ import annotations

from typing import Any

import httptools

from nodemesh.httpedge import DEFAULT_LIMITS, HttpLimits

from .pathnorm import BadTarget, Target, normalize_target

REASONS = {100: "Continue", 101: "Switching Protocols", 200: "OK", 201: "Created", 202: "Accepted",
           204: "No Content", 206: "Partial Content", 301: "Moved Permanently", 302: "Found", 303: "See Other",
           304: "Not Modified", 307: "Temporary Redirect", 308: "Permanent Redirect", 400: "Bad Request",
           401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
           408: "Request Timeout", 413: "Content Too Large", 414: "URI Too Long", 429: "Too Many Requests",
           431: "Request Header Fields Too Large", 500: "Internal Server Error", 501: "Not Implemented",
           502: "Bad Gateway", 503: "Service Unavailable", 504: "Gateway Timeout",
           505: "HTTP Version Not Supported"}


class EdgeError(Exception):
    """A request the edge refuses: answer `status`, log `reason` (stable code), then close."""

    def __init__(self, status: int, reason: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.reason = reason
        self.message = message

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


class RequestHead:
    """A parsed, checked, normalized request head. `headers` are (lower-case name, value)
    in order, framing headers (Content-Length, Transfer-Encoding) included as received."""

    __slots__ = (
        "chunked",
        "content_length",
        "headers",
        "keep_alive",
        "method",
        "raw_target",
        "target",
        "upgrade",
        "version",
    )

    def __init__(self, method: str, raw_target: str, target: Target, version: str,
                 headers: list[tuple[str, str]], chunked: bool, content_length: int | None,
                 keep_alive: bool, upgrade: bool) -> None:
        self.method = method
        self.raw_target = raw_target
        self.target = target
        self.version = version
        self.headers = headers
        self.chunked = chunked
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.upgrade = upgrade

    def __repr__(self) -> str:
        return f"<RequestHead {self.method} {self.target.target} HTTP/{self.version}>"

    @property
    def has_body(self) -> bool:
        return self.chunked or bool(self.content_length)

    def header(self, name: str) -> str | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None


class EndOfRequest:
    """The request's body is complete (trailers, if any, in `trailers`)."""

    __slots__ = ("trailers",)

    def __init__(self, trailers: list[tuple[str, str]]) -> None:
        self.trailers = trailers


class H2Preface:
    """The caller sent the HTTP/2 connection preface (`PRI * HTTP/2.0`): `data` is
    every byte from the preface on, for an HTTP/2 server to take over."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


Event = RequestHead | bytes | EndOfRequest | H2Preface
_PRI = b"PRI * HTTP/2.0\r\n"


class RequestReader:
    """One downstream connection's requests (see the module docstring)."""

    def __init__(self, limits: HttpLimits = DEFAULT_LIMITS) -> None:
        self.limits = limits
        self._p = httptools.HttpRequestParser(self)
        self._events: list[Event] = []
        self._err: EdgeError | None = None
        self.dead: EdgeError | None = None  # set once refused: the connection must close
        self.in_head = False  # between the first byte of a head and its end (the head timer runs)
        self.in_message = False  # between a head's first byte and the end of its body
        self.upgraded = False  # an Upgrade/CONNECT request ended: later bytes are in `held`, unparsed
        self.held = bytearray()
        self._started = False  # the first line is known not to be the HTTP/2 preface's (or is it)
        self._sniff = b""  # first bytes that may still be the preface
        self._url: list[bytes] = []
        self._url_len = 0
        self._headers: list[tuple[str, str]] = []
        self._head_bytes = 0
        self._head_fed = 0  # bytes fed in earlier chunks while this head was incomplete
        self._in_trailers = False
        self._trailers: list[tuple[str, str]] = []
        self._pending_head: RequestHead | None = None
        self._done_in_feed = False

    def __repr__(self) -> str:
        return (f"<RequestReader in_head={self.in_head} upgraded={self.upgraded} "
                f"dead={self.dead.reason if self.dead else None}>")

    # -- feeding --
    def feed(self, data: bytes) -> list[Event]:
        """Parse bytes; the events they complete. Raises EdgeError (and stays dead)."""
        if self.dead is not None:
            raise self.dead
        if self.upgraded:
            self.held += data
            return []
        if not self._started and data:
            # The first bytes decide, whatever the pieces: the HTTP/2 preface's first line
            # whole, or not it (then llhttp reads them).
            data = self._sniff + data
            if len(data) < len(_PRI) and _PRI.startswith(data):
                self._sniff = data
                self.in_head = True  # a head has begun (the head timer runs)
                return []
            self._started, self._sniff, self.in_head = True, b"", False
            if data.startswith(_PRI):
                self.upgraded = True
                return [H2Preface(data)]
        was_in_head = self.in_head
        self._done_in_feed = False
        events = self._events = []
        try:
            self._p.feed_data(data)
        except httptools.HttpParserUpgrade as e:
            self._upgrade(data, int(e.args[0]) if e.args else len(data))
        except httptools.HttpParserCallbackError:
            self._die(self._err or EdgeError(400, "bad_request", "malformed HTTP request"))
        except httptools.HttpParserError as e:
            self._die(self._err or _classify(str(e)))
        if self.in_head:
            # Exact when the head started this chunk or an earlier one; when a pipelined
            # request ended earlier in this chunk, the parsed part (an under-count) instead.
            self._head_fed += len(data) if was_in_head or not self._done_in_feed else self._head_bytes
            if self._head_fed > self.limits.max_header_bytes:
                self._die(EdgeError(431, "header_too_large", f"request head over "
                                                             f"{self.limits.max_header_bytes} bytes"))
        return events

    def resume_after_upgrade(self) -> list[Event]:
        """The upgrade did not happen (no 101): parse what was held as HTTP again."""
        held, self.held, self.upgraded = bytes(self.held), bytearray(), False
        self._p = httptools.HttpRequestParser(self)
        return self.feed(held) if held else []

    def _upgrade(self, data: bytes, offset: int) -> None:
        head = self._pending_head
        self._pending_head = None
        if head is not None and head.method == "CONNECT":
            self._die(EdgeError(405, "connect_refused", "CONNECT is not served on an HTTP service port"))
        self.upgraded = True
        self.held += data[offset:]

    def _die(self, err: EdgeError) -> None:
        self.dead = err
        raise err

    # -- httptools callbacks --
    def on_message_begin(self) -> None:
        self.in_head = self.in_message = True
        self._url, self._url_len, self._headers = [], 0, []
        self._head_bytes = self._head_fed = 0
        self._in_trailers = False
        self._trailers = []

    def on_url(self, url: bytes) -> None:
        self._url.append(url)
        self._url_len += len(url)
        self._head_bytes += len(url)
        if self._url_len > self.limits.max_request_line:
            self._fail(EdgeError(414, "uri_too_long", f"request target over {self.limits.max_request_line} bytes"))

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_trailers:
            self._trailers.append((name.decode("latin-1").lower(), value.strip(b" \t").decode("latin-1")))
            if len(self._trailers) > self.limits.max_headers:
                self._fail(EdgeError(431, "too_many_headers", f"more than {self.limits.max_headers} trailers"))
            return
        # Without surrounding whitespace (RFC 9110 5.5; llhttp keeps a trailing tab).
        self._headers.append((name.decode("latin-1").lower(), value.strip(b" \t").decode("latin-1")))
        self._head_bytes += len(name) + len(value) + 4
        if len(self._headers) > self.limits.max_headers:
            self._fail(EdgeError(431, "too_many_headers", f"more than {self.limits.max_headers} request headers"))
        if self._head_bytes > self.limits.max_header_bytes:
            self._fail(EdgeError(431, "header_too_large", f"request head over {self.limits.max_header_bytes} bytes"))

    def on_headers_complete(self) -> None:
        p = self._p
        version = p.get_http_version()
        if version not in ("1.1", "1.0"):
            self._fail(EdgeError(505, "http_version", f"HTTP/{version} is not served (HTTP/1.0 and 1.1 only)"))
        method = p.get_method().decode("latin-1")
        raw = b"".join(self._url).decode("latin-1")
        chunked = False
        length: int | None = None
        for k, v in self._headers:
            if k == "transfer-encoding":
                if chunked or v.strip(" \t").lower() != "chunked":
                    self._fail(EdgeError(501, "transfer_coding", f"Transfer-Encoding {v[:40]!r} is not "
                                                                 "implemented (only chunked)"))
                chunked = True
            elif k == "content-length":
                length = int(v)
        try:
            target = normalize_target(raw, method, self.limits.escaped_slash_action)
        except BadTarget as e:
            self._fail(EdgeError(e.status, e.reason, str(e)))
            raise  # unreachable: _fail raises
        head = RequestHead(method, raw, target, version, self._headers, chunked, length,
                           bool(p.should_keep_alive()), bool(p.should_upgrade()))
        self.in_head = False
        self._in_trailers = True
        self._pending_head = head
        self._events.append(head)

    def on_body(self, body: bytes) -> None:
        self._events.append(body)

    def on_message_complete(self) -> None:
        self.in_message = False
        self._done_in_feed = True
        self._pending_head = None
        self._events.append(EndOfRequest(self._trailers))

    def _fail(self, err: EdgeError) -> Any:
        self._err = err
        raise err


def _classify(msg: str) -> EdgeError:
    """llhttp's error text -> the answer (RFC 9112 / Envoy's choices)."""
    low = msg.lower()
    if "http version" in low:
        return EdgeError(505, "http_version", msg)
    if "transfer-encoding" in low and "content-length" in low:
        return EdgeError(400, "cl_and_te", "both Content-Length and Transfer-Encoding (request smuggling)")
    if "transfer-encoding" in low:
        return EdgeError(501, "transfer_coding", msg)
    if "content-length" in low:
        return EdgeError(400, "bad_content_length", msg)
    if "pri/upgrade" in low:
        return EdgeError(400, "h2_preface", "the HTTP/2 preface inside an HTTP/1.1 connection")
    return EdgeError(400, "bad_request", msg)


# ---------------------------------------------------------------- writing


def error_response(err: EdgeError, extra: list[tuple[str, str]] | None = None) -> bytes:
    """The whole answer to a refused request, with `Connection: close`."""
    body = f"{err.reason}: {err.message}\n".encode()
    lines = [f"HTTP/1.1 {err.status} {REASONS.get(err.status, '')}", "content-type: text/plain",
             f"content-length: {len(body)}", f"x-nodemesh-reason: {err.reason}", "connection: close"]
    lines += [f"{k}: {v}" for k, v in extra or ()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def request_head_bytes(head: RequestHead, headers: list[tuple[str, str]], length: int | None) -> bytes:
    """A request head re-framed for the next hop: the normalized target, the given
    headers minus framing, and our own framing (Content-Length when the length is
    known, else chunked): the next hop sees exactly the boundary this edge used."""
    out = [f"{head.method} {head.target.target} HTTP/1.1\r\n"]
    for k, v in headers:
        if k not in ("content-length", "transfer-encoding"):
            out.append(f"{k}: {v}\r\n")
    if length is not None:
        if length or head.method not in ("GET", "HEAD", "DELETE", "OPTIONS"):
            out.append(f"content-length: {length}\r\n")
    elif head.chunked:
        out.append("transfer-encoding: chunked\r\n")
    out.append("\r\n")
    return "".join(out).encode("latin-1")


NO_BODY_STATUS = frozenset({204, 304})


class ResponseFramer:
    """Frames one response to a downstream HTTP/1.x caller (head in one piece)."""

    __slots__ = ("chunked", "close", "no_body")

    def __init__(self) -> None:
        self.chunked = False
        self.close = False
        self.no_body = False

    def head(self, status: int, reason: str, headers: list[tuple[str, str]], *, method: str, version: str,
             keep_alive: bool, length: int | None) -> bytes:
        """headers: end-to-end only (no framing, no Connection); length: the body size when known."""
        self.no_body = method == "HEAD" or status in NO_BODY_STATUS or status < 200
        self.close = not keep_alive
        lines = [f"HTTP/1.1 {status} {reason or REASONS.get(status, '')}\r\n"]
        lines += [f"{k}: {v}\r\n" for k, v in headers]
        self.chunked = False
        if status >= 200 and status not in NO_BODY_STATUS:
            if length is not None:
                lines.append(f"content-length: {length}\r\n")
            elif self.no_body:
                pass  # HEAD: no length known, none invented
            elif version == "1.1":
                self.chunked = True
                lines.append("transfer-encoding: chunked\r\n")
            else:
                self.close = True  # HTTP/1.0 and no length: the body ends with the connection
        if self.close:
            lines.append("connection: close\r\n")
        elif version == "1.0":
            lines.append("connection: keep-alive\r\n")
        lines.append("\r\n")
        return "".join(lines).encode("latin-1")

    def body(self, data: bytes) -> bytes:
        if self.no_body or not data:
            return b""
        if self.chunked:
            return b"%x\r\n%b\r\n" % (len(data), data)
        return data

    def end(self) -> bytes:
        return b"0\r\n\r\n" if self.chunked and not self.no_body else b""
