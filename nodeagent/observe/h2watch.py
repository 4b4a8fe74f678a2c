"""A passive HTTP/2 (and gRPC) observer for the destination side of the mesh.

The inbound proxy relays a tunnel's bytes to the workload at L4; on a port
declared `http2` or `grpc` it also feeds those bytes, unchanged and in order, to
an `H2Watch` (through `TcpEnd.tap`, as `nodeagent.observe.httpwatch.Http1Watch` is on
HTTP/1.1 ports). The watch parses the connection preface and the frames of both
directions, decodes header blocks with `hpack` (one decoder per direction, so
each one's dynamic table follows the encoder on the other end) and reports one
`Exchange` per stream: method, path, authority, :status, grpc-status (from the
trailers or a trailers-only response), DATA bytes without padding, the request's
trace headers and how long the workload took (request HEADERS -> response
END_STREAM or RST_STREAM).

It keeps its own copy of at most one partial frame per direction (DATA payloads
are counted and skipped, never held), and never touches the traffic: if the
bytes are not HTTP/2 or a frame is malformed the watch stops (`stopped` says
why, `failed` is set) and the connection is accounted as TCP.
"""

from __future__ import annotations

import logging
import struct
import time
from collections.abc import Callable
from typing import Any

import hpack
from hpack import HPACKError

from nodeagent.observe.httpwatch import Exchange
from nodeagent.observe.tracing import TRACE_HEADERS

log = logging.getLogger(__name__)

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

# Frame types (RFC 9113 section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE, PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = range(10)
# Flags.
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20
SETTINGS_HEADER_TABLE_SIZE, SETTINGS_MAX_FRAME_SIZE = 0x1, 0x5
DEFAULT_MAX_FRAME = 16384
MAX_FRAME_LIMIT = (1 << 24) - 1
# Observer's own bounds: a header block larger than this, or more open streams,
# stops the watch instead of growing memory (the relay is unaffected).
MAX_HEADER_BLOCK = 1 << 20
MAX_OPEN_STREAMS = 10000


class Malformed(Exception):
    """The bytes are not (well-formed) HTTP/2: the watch stops."""


class _H2Direction:
    """Frame reassembly for one direction: the bytes of the frame in progress."""

    def __init__(self, name: str, expect_preface: bool) -> None:
        self.name = name
        self.buf = bytearray()
        self.preface_left = PREFACE if expect_preface else b""
        self.first_frame = True  # both sides' prefaces start with a SETTINGS frame
        self.decoder = hpack.Decoder()
        # HPACK's own limit on a decoded list; generous, the workload enforces the real one.
        self.decoder.max_header_list_size = MAX_HEADER_BLOCK
        # The largest frame this direction may carry: what the receiving end advertised.
        self.max_frame = DEFAULT_MAX_FRAME
        self.skip = 0  # DATA payload bytes still to pass over
        self.skip_stream = 0
        self.skip_end = False  # the DATA frame being skipped ends its stream
        # A header block spread over HEADERS + CONTINUATION frames.
        self.block_stream = 0
        self.block = bytearray()
        self.block_flags = 0
        self.block_kind = HEADERS


class H2Watch:
    """Feed `request(bytes)` (towards the workload) and `response(bytes)` (from it)."""

    def __init__(self, on_start: Callable[[Exchange], None], on_done: Callable[[Exchange], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._on_start = on_start
        self._on_done = on_done
        self._clock = clock
        self._req = _H2Direction("request", expect_preface=True)
        self._resp = _H2Direction("response", expect_preface=False)
        self.streams: dict[int, Exchange] = {}
        self.stopped = ""  # why the watch gave up ("" while it follows the traffic)
        self.failed = False  # stopped on bytes that are not HTTP/2 (vs. a normal close)
        self.detected = False  # the client's connection preface was seen
        self.exchanges = 0  # streams reported
        # Client stream IDs only grow: HEADERS on a lower ID belong to a stream
        # already reported (late request trailers), never a new request.
        self._last_client_stream = 0

    def __repr__(self) -> str:
        return f"<H2Watch exchanges={self.exchanges} open={len(self.streams)} stopped={self.stopped!r}>"

    @property
    def is_l7(self) -> bool:
        """The connection carried HTTP/2 the watch followed to the end: its
        requests were reported one by one, so it is not also a TCP connection."""
        return self.detected and not self.failed

    # -- feeding --
    def request(self, data: bytes) -> None:
        self._feed(self._req, data)

    def response(self, data: bytes) -> None:
        self._feed(self._resp, data)

    def close(self) -> list[Exchange]:
        """The connection ended: streams still open are reported (status 0 when no
        response head came) and returned."""
        left = list(self.streams.values())
        self.streams.clear()
        now = self._clock()
        for ex in left:
            ex.t_end = ex.t_end or now
            self._report(ex)
        if not self.stopped:
            self.stopped = "closed"
        return left

    # -- internals --
    def _feed(self, d: _H2Direction, data: bytes) -> None:
        if self.stopped or not data:
            return
        try:
            self._parse(d, memoryview(data))
        except (Malformed, HPACKError) as e:
            self._fail(f"{d.name}: {e}")
        except Exception as e:  # observing must never break the relay it watches
            log.exception("HTTP/2 watch failed; the connection is accounted as TCP from now on")
            self._fail(f"internal error: {e!r}")

    def _fail(self, why: str) -> None:
        self.stopped = why or "stopped"
        self.failed = True
        log.info("HTTP/2 watch stopped, the connection is accounted as TCP (check the port's declared"
                 " protocol): %s", self.stopped)
        # Streams already started are closed now (status 0 unless their head was
        # seen), so no request is left half-open; the rest of the connection is
        # not followed.
        left = list(self.streams.values())
        self.streams.clear()
        now = self._clock()
        for ex in left:
            ex.t_end = ex.t_end or now
            ex.extra["abandoned"] = self.stopped
            self._report(ex)

    def _parse(self, d: _H2Direction, mv: memoryview) -> None:
        if d.preface_left:
            n = min(len(d.preface_left), len(mv))
            if bytes(mv[:n]) != d.preface_left[:n]:
                raise Malformed("no HTTP/2 connection preface")
            d.preface_left = d.preface_left[n:]
            mv = mv[n:]
            if d.preface_left:
                return
            self.detected = True
        while mv and not self.stopped:
            if d.skip:  # the rest of a DATA payload: counted already, not kept
                n = min(d.skip, len(mv))
                d.skip -= n
                mv = mv[n:]
                if not d.skip and d.skip_end:
                    self._end_stream(d, d.skip_stream)
                continue
            # Take just enough for the frame header (and, for DATA, its pad length).
            need = 9 - len(d.buf) if len(d.buf) < 9 else 0
            if need:
                d.buf += mv[:need]
                mv = mv[need:]
                if len(d.buf) < 9:
                    return
            length = int.from_bytes(d.buf[0:3], "big")
            ftype, flags = d.buf[3], d.buf[4]
            stream_id = struct.unpack(">I", bytes(d.buf[5:9]))[0] & 0x7FFFFFFF
            if length > d.max_frame:
                raise Malformed(f"frame of {length} bytes over the advertised maximum {d.max_frame}")
            if d.first_frame:
                if ftype != SETTINGS or flags & ACK:
                    raise Malformed(f"the frame after the preface is type {ftype}, not SETTINGS")
                d.first_frame = False
            if d.block_stream and ftype != CONTINUATION:
                raise Malformed(f"frame type {ftype} inside a header block (CONTINUATION expected)")
            if ftype == DATA:
                if flags & PADDED:
                    if length < 1:
                        raise Malformed("padded DATA without a pad length")
                    if len(d.buf) < 10:  # the pad length byte
                        if not mv:
                            return
                        d.buf += mv[:1]
                        mv = mv[1:]
                self._data(d, stream_id, flags, length)
                d.buf.clear()
                continue
            have = len(d.buf) - 9
            take = min(length - have, len(mv))
            d.buf += mv[:take]
            mv = mv[take:]
            if len(d.buf) - 9 < length:
                return
            payload = bytes(d.buf[9:])
            d.buf.clear()
            self._frame(d, ftype, flags, stream_id, payload)

    def _data(self, d: _H2Direction, stream_id: int, flags: int, length: int) -> None:
        if stream_id == 0:
            raise Malformed("DATA on stream 0")
        body = length
        if flags & PADDED:
            if length < 1:
                raise Malformed("padded DATA without a pad length")
            pad = d.buf[9]
            body = length - 1 - pad
            if body < 0:
                raise Malformed("DATA padding longer than the frame")
            left = length - 1
        else:
            left = length
        ex = self.streams.get(stream_id)
        if ex is not None:
            if d is self._req:
                ex.request_bytes += body
            else:
                ex.response_bytes += body
        d.skip, d.skip_stream, d.skip_end = left, stream_id, bool(flags & END_STREAM)
        if not left and d.skip_end:
            self._end_stream(d, stream_id)

    def _frame(self, d: _H2Direction, ftype: int, flags: int, stream_id: int, payload: bytes) -> None:
        if ftype in (HEADERS, PUSH_PROMISE):
            if stream_id == 0:
                raise Malformed("HEADERS on stream 0")
            pos, end = 0, len(payload)
            if flags & PADDED:
                if not payload:
                    raise Malformed("padded frame without a pad length")
                pos, end = 1, len(payload) - payload[0]
            if ftype == HEADERS and flags & PRIORITY_FLAG:
                pos += 5
            if ftype == PUSH_PROMISE:
                pos += 4
            if end < pos:
                raise Malformed("padding longer than the frame")
            d.block = bytearray(payload[pos:end])
            d.block_flags, d.block_kind, d.block_stream = flags, ftype, stream_id
            if flags & END_HEADERS:
                self._block_done(d)
        elif ftype == CONTINUATION:
            if not d.block_stream or stream_id != d.block_stream:
                raise Malformed("CONTINUATION without a header block in progress on that stream")
            d.block += payload
            if len(d.block) > MAX_HEADER_BLOCK:
                raise Malformed("header block over the observer's 1 MiB bound")
            if flags & END_HEADERS:
                self._block_done(d)
        elif ftype == RST_STREAM:
            if len(payload) != 4 or stream_id == 0:
                raise Malformed("bad RST_STREAM")
            ex = self.streams.pop(stream_id, None)
            if ex is not None:
                ex.t_end = self._clock()
                ex.extra["reset"] = int.from_bytes(payload, "big")
                ex.extra["reset_by"] = "client" if d is self._req else "workload"
                self._report(ex)
        elif ftype == SETTINGS:
            if stream_id != 0 or len(payload) % 6:
                raise Malformed("bad SETTINGS")
            if flags & ACK:
                return
            # Settings a side sends bind what the OTHER side sends to it.
            other = self._resp if d is self._req else self._req
            for i in range(0, len(payload), 6):
                ident, value = struct.unpack(">HI", payload[i:i + 6])
                if ident == SETTINGS_HEADER_TABLE_SIZE:
                    # The encoder towards this side may now use a table this large.
                    other.decoder.max_allowed_table_size = value
                elif ident == SETTINGS_MAX_FRAME_SIZE:
                    if not DEFAULT_MAX_FRAME <= value <= MAX_FRAME_LIMIT:
                        raise Malformed(f"SETTINGS_MAX_FRAME_SIZE {value} out of range")
                    other.max_frame = value
        elif ftype == GOAWAY:
            if len(payload) < 8 or stream_id != 0:
                raise Malformed("bad GOAWAY")
            if d is self._resp:
                # Streams above the last one the workload processed were refused
                # unprocessed (the client may retry them elsewhere): not requests it served.
                last = struct.unpack(">I", payload[:4])[0] & 0x7FFFFFFF
                for sid in [s for s in self.streams if s > last]:
                    del self.streams[sid]
        # PRIORITY, PING, WINDOW_UPDATE and unknown types carry nothing to report.

    def _block_done(self, d: _H2Direction) -> None:
        stream_id, flags, kind = d.block_stream, d.block_flags, d.block_kind
        block, d.block, d.block_stream = bytes(d.block), bytearray(), 0
        # Decode every block, even of streams not followed: the dynamic table must stay in step.
        headers = [(k.decode("latin-1").lower(), v.decode("latin-1")) for k, v in d.decoder.decode(block, raw=True)]
        if kind == PUSH_PROMISE:
            return  # a promised request (server push): not a request the client made
        if d is self._req:
            self._request_headers(stream_id, flags, headers)
        else:
            self._response_headers(stream_id, flags, headers)

    def _request_headers(self, stream_id: int, flags: int, headers: list[tuple[str, str]]) -> None:
        ex = self.streams.get(stream_id)
        if ex is None:
            if stream_id % 2 == 0 or stream_id <= self._last_client_stream:
                return  # not a client-initiated stream, or one already reported
            self._last_client_stream = stream_id
            if len(self.streams) >= MAX_OPEN_STREAMS:
                raise Malformed(f"more than {MAX_OPEN_STREAMS} open streams")
            h = dict(headers)
            method = h.get(":method", "")
            if not method:
                raise Malformed("request HEADERS without :method")
            path = h.get(":path", "")
            grpc = h.get("content-type", "").startswith("application/grpc")
            ex = Exchange(method, path, self._clock(), time.time(),
                          tuple((k, v) for k, v in headers if k in TRACE_HEADERS or k == "baggage"), grpc=grpc)
            ex.extra["authority"] = h.get(":authority", "")
            ex.extra["protocol"] = "http2"
            ex.extra["stream"] = stream_id
            if grpc and path.count("/") == 2:
                service, _, rpc = path[1:].partition("/")
                ex.extra["grpc_service"], ex.extra["grpc_method"] = service, rpc
            self.streams[stream_id] = ex
            self._on_start(ex)
        # else: request trailers (nothing reported from them)
        if flags & END_STREAM:
            self._end_stream(self._req, stream_id)

    def _response_headers(self, stream_id: int, flags: int, headers: list[tuple[str, str]]) -> None:
        ex = self.streams.get(stream_id)
        if ex is None:
            return
        status = next((v for k, v in headers if k == ":status"), "")
        if status:
            if not status.isdigit():
                raise Malformed(f"bad :status {status!r}")
            code = int(status)
            if 100 <= code < 200:
                return  # informational; the final head follows
            ex.status = code
        # grpc-status is in the trailers, or in the head of a trailers-only response.
        for k, v in headers:
            if k == "grpc-status":
                ex.grpc_status = v
        if flags & END_STREAM:
            self._end_stream(self._resp, stream_id)

    def _end_stream(self, d: _H2Direction, stream_id: int) -> None:
        ex = self.streams.get(stream_id)
        if ex is None:
            return
        if d is self._req:
            ex.request_done = True
            return
        # The response ended: the exchange is over for the workload, whatever the
        # client still sends (it may only reset the stream now).
        ex.t_end = self._clock()
        ex.complete = True
        del self.streams[stream_id]
        self._report(ex)

    def _report(self, ex: Exchange) -> None:
        self.exchanges += 1
        try:
            self._on_done(ex)
        except Exception:  # observing must never break the relay it watches
            log.exception("HTTP/2 watch: reporting an exchange failed")

    def snapshot(self) -> dict[str, Any]:
        return {"open": len(self.streams), "exchanges": self.exchanges, "stopped": self.stopped}
