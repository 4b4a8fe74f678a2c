"""A passive HTTP/1.1 observer for the destination side of the mesh.

The inbound proxy relays a tunnel's bytes to the workload at L4; on a port
declared `http` it also feeds those bytes, unchanged and in order, to an
`Http1Watch`, which follows the framing of both directions and reports one
`Exchange` per request/response pair: method, status, body sizes, the request's
trace headers and how long the workload took. The proxy's telemetry turns each
exchange into Istio's `reporter="destination"` request metrics, a span and an
access log line, as Istio's inbound sidecar does for HTTP.

Nothing here can change or delay the traffic: any parse problem (not HTTP after
all, an upgrade, a malformed head or chunk, a head over 64 KiB) stops the watch
(`stopped` says why) and the connection is then accounted as TCP.

The parser is our own and deliberately small (a profile showed two h11 state
machines, which build and re-validate every message, at ~40% of the inbound
proxy's time): per direction it finds the end of the head, reads only the
start line and the headers the events or the framing need, then skips the body
by Content-Length or chunked framing (chunk sizes parsed, chunk data never
copied; trailers read for grpc-status). Responses are framed by their request
(HEAD, 1xx then the final response, 204, 304; read-until-close without a
length), and pipelined requests queue up for their responses in order.

When the receiving node's policy guard (nodeagent/proxy/authz_l7.py, and
authz_h2.py for HTTP/2) stands in front of the workload it parses every
request and response anyway: the watch is then taken off the workload's end
and the guard reports its own parse through an `ExchangeReport` with the
watch's two callbacks, so each byte is parsed once per node. The watches
keep serving the connections no guard decides.
"""

from __future__ import annotations

import logging
import re
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from nodeagent.observe.tracing import TRACE_HEADERS

log = logging.getLogger(__name__)

MAX_HEAD = 64 * 1024  # a request/response head (or a trailer section) larger than this stops the watch
MAX_CHUNK_LINE = 4096  # a chunk-size line, extensions included
MAX_PIPELINED = 128  # requests waiting for their responses; more stops the watch (bounded memory)

# Request line: token method, a target without controls or spaces, HTTP/1.0 or 1.1.
_REQUEST_LINE = re.compile(rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+) ([^\x00-\x20\x7f]+) HTTP/1\.([01])")
_STATUS_LINE = re.compile(rb"HTTP/1\.([01]) ([0-9]{3})(?: [^\x00-\x08\x0a-\x1f\x7f]*)?")
_HEX = re.compile(rb"[0-9A-Fa-f]{1,16}")
_TOKEN_START = frozenset(b"!#$%&'*+.^_`|~0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz-")
_OWS = b" \t"

# The request headers worth decoding: framing, and what the events carry.
_REQUEST_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"connection", b"upgrade",
                              b"content-type", b"baggage"} | {h.encode() for h in TRACE_HEADERS})
_TRACE = frozenset({h.encode() for h in TRACE_HEADERS} | {b"baggage"})
_TRACE_STR = frozenset(TRACE_HEADERS | {"baggage"})
_RESPONSE_HEADERS = frozenset({b"content-length", b"transfer-encoding", b"connection", b"grpc-status"})

# Parser states of one direction.
_HEAD, _LENGTH, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _UNTIL_EOF, _IGNORE = range(8)


@dataclass
class Exchange:
    """One request and its response as the workload saw them."""

    method: str
    target: str
    t0: float  # monotonic, when the request head arrived
    t0_unix: float
    trace_headers: tuple[tuple[str, str], ...] = ()
    grpc: bool = False
    request_bytes: int = 0  # body bytes
    response_bytes: int = 0
    status: int = 0  # 0: no response head (the connection ended first)
    grpc_status: str = ""
    t_end: float = 0.0
    complete: bool = False  # the response ended
    request_done: bool = False  # the request ended (it may end after its response)
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def duration_ms(self) -> float:
        return max(0.0, (self.t_end or self.t0) - self.t0) * 1000.0


def request_exchange(method: str, target: str, headers: Iterable[tuple[str, str]],
                     clock: Callable[[], float] = time.monotonic) -> Exchange:
    """An Exchange begun from a parsed request head ((lower-case name, value)
    pairs): its trace headers and baggage, and whether it is gRPC."""
    trace: list[tuple[str, str]] = []
    grpc = False
    for k, v in headers:
        if k in _TRACE_STR:
            trace.append((k, v))
        elif k == "content-type" and v.startswith("application/grpc"):
            grpc = True
    return Exchange(method, target, clock(), time.time(), tuple(trace), grpc=grpc)


class ExchangeReport:
    """The exchanges of one connection as a guard parsed them, reported through
    a watch's callbacks (see the module docstring). Telemetry keeps it where it
    kept the watch: `close()` reports what is still open (status 0 when no
    response head came), `is_l7` says an HTTP/2 connection was followed."""

    def __init__(self, on_start: Callable[[Exchange], None], on_done: Callable[[Exchange], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._on_start = on_start
        self._on_done = on_done
        self.clock = clock
        self._open: list[Exchange] = []  # started, not reported (oldest first)
        self.stopped = ""  # why no more exchanges are reported ("" while they are)
        self.failed = False  # stopped on bytes that were not HTTP (the connection is accounted as TCP)
        self.detected = False  # an HTTP/2 connection preface was followed
        self.exchanges = 0

    def __repr__(self) -> str:
        return f"<ExchangeReport exchanges={self.exchanges} open={len(self._open)} stopped={self.stopped!r}>"

    @property
    def is_l7(self) -> bool:
        return self.detected and not self.failed

    def start(self, ex: Exchange) -> bool:
        """A request went to the workload; False (not followed) once stopped."""
        if self.stopped:
            return False
        self._open.append(ex)
        self._call(self._on_start, ex)
        return True

    def response_end(self, ex: Exchange) -> None:
        """The response ended: the exchange is over for the workload."""
        ex.t_end = self.clock()
        ex.complete = True
        self.done(ex)

    def done(self, ex: Exchange) -> None:
        if self._take(ex):
            self.exchanges += 1
            self._call(self._on_done, ex)

    def drop(self, ex: Exchange) -> None:
        """Never processed by the workload (refused by its GOAWAY): not reported."""
        self._take(ex)

    def _take(self, ex: Exchange) -> bool:
        for i, open_ex in enumerate(self._open):
            if open_ex is ex:  # by identity: two exchanges may hold equal fields
                del self._open[i]
                return True
        return False

    def stop(self, why: str, failed: bool = False) -> None:
        """No more exchanges (an upgrade, or bytes that are not HTTP: `failed`);
        on a failure the open ones are reported now, abandoned."""
        if self.stopped:
            return
        self.stopped, self.failed = why, failed
        if failed:
            now = self.clock()
            for ex in self._open:
                ex.t_end = ex.t_end or now
                ex.extra["abandoned"] = why
            self._report_open()

    def close(self) -> None:
        now = self.clock()
        for ex in self._open:
            if not ex.complete or not ex.t_end:
                ex.t_end = now
        self._report_open()
        if not self.stopped:
            self.stopped = "closed"

    def _report_open(self) -> None:
        left, self._open = self._open, []
        for ex in left:
            self.exchanges += 1
            self._call(self._on_done, ex)

    @staticmethod
    def _call(cb: Callable[[Exchange], None], ex: Exchange) -> None:
        try:
            cb(ex)
        except Exception:  # observing must never break the traffic it reports
            log.exception("reporting an HTTP exchange failed")


class _Malformed(Exception):
    """The bytes are not (or no longer) HTTP/1.1 we can follow."""


class _Side:
    """The framing state of one direction."""

    __slots__ = ("buf", "close_after", "ex", "remaining", "scan", "state", "trailer_bytes")

    def __init__(self) -> None:
        self.buf = bytearray()  # an incomplete head / chunk-size line / trailer; never body bytes
        self.state = _HEAD
        self.remaining = 0  # body or chunk bytes still to skip
        self.scan = 0  # how far into the pending head its end was looked for (no rescans byte by byte)
        self.trailer_bytes = 0
        self.ex: Exchange | None = None  # the message being read belongs to this exchange
        self.close_after = False  # the message in flight is the connection's last


def _headers(head: bytes, wanted: frozenset[bytes]) -> list[tuple[bytes, bytes]]:
    """The wanted headers of a head (start line excluded), names lowercased, in order."""
    out: list[tuple[bytes, bytes]] = []
    for line in head.split(b"\r\n"):
        i = line.find(b":")
        if i <= 0 or line[0] in _OWS or line[i - 1] in _OWS:  # no name, obs-fold, space before ':'
            raise _Malformed(f"bad header line {line[:40]!r}")
        name = line[:i].lower()
        if name in wanted:
            out.append((name, line[i + 1:].strip(_OWS)))
    return out


def _content_length(values: list[bytes]) -> int:
    parts = {p.strip(_OWS) for v in values for p in v.split(b",")}
    if len(parts) != 1:
        raise _Malformed(f"conflicting Content-Length {b','.join(values)[:40]!r}")
    (v,) = parts
    if not v.isdigit() or len(v) > 18:
        raise _Malformed(f"bad Content-Length {v[:40]!r}")
    return int(v)


def _framing(hdrs: list[tuple[bytes, bytes]]) -> tuple[list[bytes], list[bytes], list[bytes], bytes | None]:
    """The headers that frame a message, from a head's (lowercase name, value)
    pairs: Content-Length values, Transfer-Encoding values, Connection values,
    and the last grpc-status (a response's, when gRPC answers in the head)."""
    lengths: list[bytes] = []
    codings: list[bytes] = []
    connection: list[bytes] = []
    grpc_status: bytes | None = None
    for k, v in hdrs:
        if k == b"content-length":
            lengths.append(v)
        elif k == b"transfer-encoding":
            codings.append(v)
        elif k == b"connection":
            connection.append(v)
        elif k == b"grpc-status":
            grpc_status = v
    return lengths, codings, connection, grpc_status


def _chunked(values: list[bytes]) -> bool:
    """True when the last transfer coding is chunked (RFC 9112 6.3)."""
    codings = [p.strip(_OWS).lower() for v in values for p in v.split(b",") if p.strip(_OWS)]
    return bool(codings) and codings[-1] == b"chunked"


def _close_after(version: bytes, connection: list[bytes]) -> bool:
    tokens = {p.strip(_OWS).lower() for v in connection for p in v.split(b",")}
    return b"close" in tokens or (version == b"0" and b"keep-alive" not in tokens)


class Http1Watch:
    """Feed `request(bytes)` (towards the workload) and `response(bytes)` (from it)."""

    def __init__(self, on_start: Callable[[Exchange], None], on_done: Callable[[Exchange], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._req = _Side()
        self._resp = _Side()
        self._open: deque[Exchange] = deque()  # started, not yet reported (oldest first)
        self._awaiting: deque[Exchange] = deque()  # requests whose response has not ended
        self._on_start = on_start
        self._on_done = on_done
        self._clock = clock
        self.stopped = ""  # why the watch gave up ("" while it follows the traffic)
        self.exchanges = 0  # completed request/response pairs

    def __repr__(self) -> str:
        return f"<Http1Watch exchanges={self.exchanges} stopped={self.stopped!r}>"

    @property
    def current(self) -> Exchange | None:
        """The oldest exchange not reported yet."""
        return self._open[0] if self._open else None

    # -- feeding --
    def request(self, data: bytes) -> None:
        self._watch("request", self._req, data, self._request_head)

    def response(self, data: bytes) -> None:
        self._watch("response", self._resp, data, self._response_head)

    def _watch(self, what: str, side: _Side, data: bytes, on_head: Callable[[_Side, bytes], None]) -> None:
        if self.stopped or not data:
            return
        try:
            self._feed(side, data, on_head)
        except _Malformed as e:
            self._stop(f"{what}: {e}")
        except Exception as e:  # observing must never break the relay it watches
            log.exception("HTTP watch failed; the connection is accounted as TCP from now on")
            self._stop(f"internal error: {e!r}")

    def close(self) -> Exchange | None:
        """The connection ended: requests still waiting for (the end of) their
        response are reported (status 0 when no head came); the oldest is returned.
        A response read until the connection closed is complete now."""
        first = self._open[0] if self._open else None
        if not self.stopped and self._resp.state == _UNTIL_EOF and self._resp.ex is not None:
            self._resp.ex.complete = True
        now = self._clock()
        while self._open:
            ex = self._open.popleft()
            if not ex.complete or not ex.t_end:
                ex.t_end = now
            try:
                self._on_done(ex)
            except Exception:  # observing must never break the connection's teardown
                log.exception("HTTP watch: reporting the last exchange failed")
        self._awaiting.clear()
        if not self.stopped:
            self.stopped = "closed"
        return first

    # -- internals --
    def _stop(self, why: str) -> None:
        self.stopped = why or "stopped"

    def _feed(self, side: _Side, data: bytes | bytearray, on_head: Callable[[_Side, bytes], None]) -> None:
        buf = side.buf
        if buf:  # an incomplete head or line from the last read: only then are bytes copied
            buf += data
            data = buf
        pos, n = 0, len(data)
        while pos < n and not self.stopped:
            state = side.state
            if state in (_LENGTH, _CHUNK_DATA):
                take = min(side.remaining, n - pos)
                side.remaining -= take
                pos += take
                self._count(side, take)
                if side.remaining == 0:
                    if state == _LENGTH:
                        self._message_end(side)
                    else:
                        side.state = _CHUNK_END
            elif state == _HEAD:
                if side is self._req:  # blank lines between requests are allowed (RFC 9112 2.2)
                    while pos < n and data[pos] in b"\r\n":
                        pos += 1
                    if pos == n:
                        break
                end = data.find(b"\r\n\r\n", pos + side.scan)
                if end < 0:
                    if data[pos] not in _TOKEN_START:
                        raise _Malformed(f"not an HTTP/1 head: {bytes(data[pos:pos + 16])!r}")
                    if n - pos > MAX_HEAD:
                        raise _Malformed(f"head larger than {MAX_HEAD} bytes")
                    side.scan = max(0, n - pos - 3)  # relative to the head's start, kept at buf[0]
                    break
                head = bytes(data[pos:end])
                pos = end + 4
                side.scan = 0
                on_head(side, head)
            elif state == _CHUNK_SIZE:
                end = data.find(b"\r\n", pos, pos + MAX_CHUNK_LINE)
                if end < 0:
                    if n - pos >= MAX_CHUNK_LINE:
                        raise _Malformed("chunk-size line too long")
                    break
                size = data[pos:end].split(b";", 1)[0].strip(_OWS)
                if not _HEX.fullmatch(size):
                    raise _Malformed(f"bad chunk size {bytes(size[:20])!r}")
                pos = end + 2
                side.remaining = int(size, 16)
                side.state = _CHUNK_DATA if side.remaining else _TRAILERS
                side.trailer_bytes = 0
            elif state == _CHUNK_END:
                if n - pos < 2:
                    if data[pos] != 13:
                        raise _Malformed("chunk data not followed by CRLF")
                    break
                if data[pos] != 13 or data[pos + 1] != 10:
                    raise _Malformed("chunk data not followed by CRLF")
                pos += 2
                side.state = _CHUNK_SIZE
            elif state == _TRAILERS:
                end = data.find(b"\r\n", pos + side.scan)
                if end < 0:
                    if side.trailer_bytes + n - pos > MAX_HEAD:
                        raise _Malformed(f"trailers larger than {MAX_HEAD} bytes")
                    side.scan = max(0, n - pos - 1)
                    break
                side.scan = 0
                line = bytes(data[pos:end])
                side.trailer_bytes += end + 2 - pos
                if side.trailer_bytes > MAX_HEAD:
                    raise _Malformed(f"trailers larger than {MAX_HEAD} bytes")
                pos = end + 2
                if not line:
                    self._message_end(side)
                elif side is self._resp:  # gRPC over HTTP/1.1 is rare, but honest
                    for k, v in _headers(line, _RESPONSE_HEADERS):
                        if k == b"grpc-status" and side.ex is not None:
                            side.ex.grpc_status = v.decode("latin-1")
                else:
                    _headers(line, _RESPONSE_HEADERS)  # validated only
            elif state == _UNTIL_EOF:
                self._count(side, n - pos)
                pos = n
            else:  # _IGNORE: bytes after the connection's last message
                pos = n
        if data is buf:
            del buf[:pos]
        elif pos < n:
            side.buf = bytearray(data[pos:])

    def _count(self, side: _Side, n: int) -> None:
        ex = side.ex
        if ex is not None:
            if side is self._req:
                ex.request_bytes += n
            else:
                ex.response_bytes += n

    def _request_head(self, side: _Side, head: bytes) -> None:
        line, _, rest = head.partition(b"\r\n")
        m = _REQUEST_LINE.fullmatch(line)
        if m is None:
            raise _Malformed(f"bad request line {line[:60]!r}")
        method, target, version = m.groups()
        hdrs = _headers(rest, _REQUEST_HEADERS) if rest else []
        if method == b"CONNECT" or any(k == b"upgrade" for k, _ in hdrs):
            self._stop("upgrade")  # the bytes after it are another protocol
            return
        lengths, codings, connection, _ = _framing(hdrs)
        if codings:
            if not _chunked(codings):
                raise _Malformed("request Transfer-Encoding does not end in chunked")
            state, remaining = _CHUNK_SIZE, 0
        elif lengths:
            remaining = _content_length(lengths)
            state = _LENGTH if remaining else _HEAD
        else:
            state, remaining = _HEAD, 0
        if len(self._awaiting) >= MAX_PIPELINED:
            raise _Malformed(f"more than {MAX_PIPELINED} pipelined requests unanswered")
        ex = Exchange(method.decode("latin-1"), target.decode("latin-1"), self._clock(), time.time(),
                      tuple((k.decode("latin-1"), v.decode("latin-1")) for k, v in hdrs if k in _TRACE),
                      grpc=any(k == b"content-type" and v.startswith(b"application/grpc") for k, v in hdrs))
        side.ex = ex
        side.close_after = _close_after(version, connection)
        side.state, side.remaining = state, remaining
        self._open.append(ex)
        self._awaiting.append(ex)
        self._on_start(ex)
        if state == _HEAD:  # no body: the request ended with its head
            self._message_end(side)

    def _response_head(self, side: _Side, head: bytes) -> None:
        line, _, rest = head.partition(b"\r\n")
        m = _STATUS_LINE.fullmatch(line)
        if m is None:
            raise _Malformed(f"bad status line {line[:60]!r}")
        if not self._awaiting:
            raise _Malformed("a response with no request outstanding")
        version, code = m.groups()
        status = int(code)
        hdrs = _headers(rest, _RESPONSE_HEADERS) if rest else []
        if status < 200:
            if status == 101:
                self._stop("upgrade")
                return
            return  # interim (100 Continue, 103 Early Hints): the final response follows
        ex = self._awaiting[0]
        ex.status = status
        lengths, codings, connection, grpc_status = _framing(hdrs)
        if grpc_status is not None:
            ex.grpc_status = grpc_status.decode("latin-1")
        side.ex = ex
        side.close_after = _close_after(version, connection)
        if ex.method == "HEAD" or status in (204, 304):
            side.state = _HEAD  # no body, whatever the headers say
        elif codings:
            side.state = _CHUNK_SIZE if _chunked(codings) else _UNTIL_EOF
        elif lengths:
            side.remaining = _content_length(lengths)
            side.state = _LENGTH if side.remaining else _HEAD
        else:
            side.state = _UNTIL_EOF  # delimited by the connection's end
        if side.state == _HEAD:
            self._message_end(side)

    def _message_end(self, side: _Side) -> None:
        ex, side.ex = side.ex, None
        side.state = _IGNORE if side.close_after else _HEAD
        if ex is None:
            return
        if side is self._req:
            ex.request_done = True
        else:
            ex.t_end = self._clock()
            ex.complete = True
            if self._awaiting and self._awaiting[0] is ex:
                self._awaiting.popleft()
        # Report in order: an exchange is done when both its request and its response ended
        # (the response may end first: a server may answer before reading the whole body).
        while self._open and self._open[0].request_done and self._open[0].complete:
            done = self._open.popleft()
            self.exchanges += 1
            self._on_done(done)
