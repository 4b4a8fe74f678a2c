"""The HBONE framing core (nodeagent/proxy/hbone.py) against `h2` as an oracle.

Hypothesis drives random interleavings on a connection between our core and
an `h2` H2Connection (a strict RFC 9113 implementation) on the other side,
both ways round: tunnels opened, accepted or refused, data of random sizes
each way, acknowledgements (window credit) given in random pieces, half-closes
and resets from either side, SETTINGS changes of the initial window mid-stream,
PINGs, and the bytes between the two delivered in random slices. h2 raises on
any protocol or flow-control violation of ours; our core reports any of h2's
as ConnectionClosed. At the end everything is acknowledged and pumped: every
stream that was not reset delivered exactly what was sent, in order, both ways.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.settings
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from nodeagent.proxy import hbone

OPS = ("open", "answer", "send_ours", "send_theirs", "ack_ours", "ack_theirs", "end_ours", "end_theirs",
       "reset_ours", "reset_theirs", "deliver_to_ours", "deliver_to_theirs", "window_theirs", "ping_theirs")

# Weighted: data and delivery are most of a tunnel's life; acks are rarer, so windows fill.
_WEIGHTED = (*OPS, "send_ours", "send_ours", "send_theirs", "send_theirs", "deliver_to_ours", "deliver_to_theirs",
             "open", "answer")
op_st = st.tuples(st.sampled_from(_WEIGHTED), st.integers(0, 7), st.integers(0, 200_000), st.booleans())


@dataclass
class Tun:
    """What each side sent and received on one stream."""

    sid: int
    up: bool = False  # established (2xx seen by the opener)
    refused: bool = False
    reset: bool = False
    ours_sent: bytearray = field(default_factory=bytearray)
    theirs_sent: bytearray = field(default_factory=bytearray)
    ours_got: bytearray = field(default_factory=bytearray)
    theirs_got: bytearray = field(default_factory=bytearray)
    ours_ended: bool = False
    theirs_ended: bool = False
    ours_saw_end: bool = False
    theirs_saw_end: bool = False
    ours_unacked: int = 0
    theirs_unacked: int = 0
    theirs_pending: bytearray = field(default_factory=bytearray)  # h2 side: beyond its window
    theirs_end_pending: bool = False


def _headers(headers: Any) -> dict[str, str]:
    """h2 types event headers as bytes; with header_encoding set they are str."""
    return {str(k): str(v) for k, v in headers}


def _blob(n: int, seed: int) -> bytes:
    return bytes((seed + i * 7) & 0xFF for i in range(n))


class Harness:
    def __init__(self, ours_is_client: bool, stream_window: int, conn_window: int) -> None:
        self.ours_is_client = ours_is_client
        self.ours = hbone.HboneConnection(client=ours_is_client, stream_window=stream_window,
                                          connection_window=conn_window, max_concurrent_streams=6)
        cfg = h2.config.H2Configuration(client_side=not ours_is_client, header_encoding="utf-8",
                                        validate_inbound_headers=True)
        self.theirs = h2.connection.H2Connection(config=cfg)
        self.ours.initiate()
        self.theirs.initiate_connection()
        self.to_ours = bytearray()
        self.to_theirs = bytearray()
        self.tuns: dict[int, Tun] = {}
        self.order: list[int] = []
        self.seed = 0
        self.move()

    # -- plumbing --
    def move(self) -> None:
        self.to_theirs += self.ours.data_to_send()
        self.to_ours += self.theirs.data_to_send()

    def deliver_to_ours(self, n: int | None = None) -> None:
        n = len(self.to_ours) if n is None else min(n, len(self.to_ours))
        chunk, self.to_ours[:n] = bytes(self.to_ours[:n]), b""
        for ev in self.ours.receive_data(chunk):
            self.on_ours(ev)
        self.move()

    def deliver_to_theirs(self, n: int | None = None) -> None:
        n = len(self.to_theirs) if n is None else min(n, len(self.to_theirs))
        chunk, self.to_theirs[:n] = bytes(self.to_theirs[:n]), b""
        for ev in self.theirs.receive_data(chunk):  # raises on any violation of ours
            self.on_theirs(ev)
        self.flush_theirs()
        self.move()

    def pump(self) -> None:
        for _ in range(1000):
            self.move()
            if not self.to_ours and not self.to_theirs:
                return
            self.deliver_to_theirs()
            self.deliver_to_ours()
        raise AssertionError("the two sides never went quiet")

    # -- events --
    def on_ours(self, ev: hbone.Event) -> None:
        assert not isinstance(ev, hbone.ConnectionClosed), f"our core closed the connection: {ev}"
        assert not isinstance(ev, hbone.ConnectRejected), f"a valid CONNECT was rejected: {ev}"
        if isinstance(ev, hbone.ConnectRequested):
            assert ev.host == "10.0.0.5" and ev.port == 8080
            self.tuns.setdefault(ev.stream_id, Tun(ev.stream_id))
            self.order.append(ev.stream_id)
        elif isinstance(ev, hbone.TunnelEstablished):
            self.tuns[ev.stream_id].up = True
        elif isinstance(ev, hbone.TunnelRefused):
            self.tuns[ev.stream_id].refused = True
        elif isinstance(ev, hbone.Data):
            t = self.tuns[ev.stream_id]
            assert not t.ours_saw_end
            t.ours_got += ev.data
            t.ours_unacked += ev.flow_controlled_length
        elif isinstance(ev, hbone.PeerHalfClosed):
            self.tuns[ev.stream_id].ours_saw_end = True
        elif isinstance(ev, hbone.StreamReset):
            self.tuns[ev.stream_id].reset = True

    def on_theirs(self, ev: h2.events.Event) -> None:
        assert not isinstance(ev, h2.events.ConnectionTerminated), f"h2 got GOAWAY from us: {ev}"
        if isinstance(ev, h2.events.RequestReceived):
            hdrs = _headers(ev.headers)
            assert hdrs[":method"] == "CONNECT" and hdrs[":authority"] == "10.0.0.5:8080"
            self.tuns.setdefault(ev.stream_id, Tun(ev.stream_id))
            self.order.append(ev.stream_id)
        elif isinstance(ev, h2.events.ResponseReceived):
            status = int(_headers(ev.headers)[":status"])
            t = self.tuns[ev.stream_id]
            if status == 200:
                t.up = True
            else:
                t.refused = True
        elif isinstance(ev, h2.events.DataReceived):
            t = self.tuns[ev.stream_id]
            t.theirs_got += ev.data
            t.theirs_unacked += ev.flow_controlled_length
        elif isinstance(ev, h2.events.StreamEnded):
            self.tuns[ev.stream_id].theirs_saw_end = True
        elif isinstance(ev, h2.events.StreamReset) and ev.stream_id in self.tuns:
            self.tuns[ev.stream_id].reset = True

    # -- h2's sending side respects its windows: queue beyond them --
    def flush_theirs(self) -> None:
        for t in self.tuns.values():
            if t.reset or t.refused or not t.up:
                continue
            try:
                while t.theirs_pending:
                    room = min(self.theirs.local_flow_control_window(t.sid), self.theirs.max_outbound_frame_size)
                    if room <= 0:
                        break
                    chunk = bytes(t.theirs_pending[:room])
                    self.theirs.send_data(t.sid, chunk)
                    del t.theirs_pending[:room]
                if t.theirs_end_pending and not t.theirs_pending:
                    t.theirs_end_pending = False
                    self.theirs.end_stream(t.sid)
            except h2.exceptions.StreamClosedError:
                t.reset = True

    # -- operations --
    def pick(self, k: int, want_up: bool = True) -> Tun | None:
        live = [self.tuns[s] for s in self.order
                if not self.tuns[s].reset and not self.tuns[s].refused and (self.tuns[s].up or not want_up)]
        return live[k % len(live)] if live else None

    def op(self, name: str, k: int, n: int, flag: bool) -> None:
        t: Tun | None
        if name == "open":
            if len([t for t in self.tuns.values() if not (t.reset or t.refused)]) >= 5:
                return
            if self.ours_is_client:
                sid = self.ours.open_tunnel("10.0.0.5", 8080)
            else:
                if self.theirs.open_outbound_streams >= 6:
                    return  # h2 counts streams until both sides saw them close
                sid = self.theirs.get_next_available_stream_id()
                self.theirs.send_headers(sid, [(":method", "CONNECT"), (":authority", "10.0.0.5:8080")])
            self.tuns[sid] = Tun(sid)
            self.order.append(sid)
        elif name == "answer":
            pending = [t for t in self.tuns.values() if not t.up and not t.refused and not t.reset]
            if not pending:
                return
            t = pending[k % len(pending)]
            server_is_ours = not self.ours_is_client
            if server_is_ours:
                if t.sid not in self.ours._streams:
                    return  # not arrived yet
                if flag:
                    self.ours.accept(t.sid)
                    t.up = True
                else:
                    self.ours.refuse(t.sid, 404, "nothing here")
                    t.refused = True
            else:
                if t.sid not in self.theirs.streams:
                    return
                if flag:
                    self.theirs.send_headers(t.sid, [(":status", "200")])
                    t.up = True
                else:
                    self.theirs.send_headers(t.sid, [(":status", "503"), (hbone.REASON_HEADER, "busy")],
                                             end_stream=True)
                    t.refused = True
        elif name == "send_ours":
            t = self.pick(k)
            if t is None or t.ours_ended:
                return
            self.seed += 1
            data = _blob(n % 70_000 if flag else n % 9000, self.seed)
            if data:
                self.ours.send(t.sid, data)
                t.ours_sent += data
        elif name == "send_theirs":
            t = self.pick(k)
            if t is None or t.theirs_ended:
                return
            self.seed += 1
            data = _blob(n % 70_000 if flag else n % 9000, self.seed)
            t.theirs_pending += data
            t.theirs_sent += data
            self.flush_theirs()
        elif name == "ack_ours":
            t = self.pick(k)
            if t is not None and t.ours_unacked:
                part = t.ours_unacked if flag else max(1, t.ours_unacked * (n % 100) // 100)
                self.ours.acknowledge(t.sid, part)
                t.ours_unacked -= part
        elif name == "ack_theirs":
            t = self.pick(k)
            if t is not None and t.theirs_unacked:
                part = t.theirs_unacked if flag else max(1, t.theirs_unacked * (n % 100) // 100)
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    self.theirs.acknowledge_received_data(part, t.sid)
                t.theirs_unacked -= part
        elif name == "end_ours":
            t = self.pick(k)
            if t is not None and not t.ours_ended:
                t.ours_ended = True
                self.ours.end(t.sid)
        elif name == "end_theirs":
            t = self.pick(k)
            if t is not None and not t.theirs_ended:
                t.theirs_ended = True
                t.theirs_end_pending = True
                self.flush_theirs()
        elif name == "reset_ours":
            t = self.pick(k, want_up=False)
            if t is not None and flag and n % 3 == 0:  # rarer than data
                t.reset = True
                self.ours.reset(t.sid)
        elif name == "reset_theirs":
            t = self.pick(k, want_up=False)
            if t is not None and flag and n % 3 == 0 and t.sid in self.theirs.streams:
                t.reset = True
                with contextlib.suppress(h2.exceptions.StreamClosedError):
                    self.theirs.reset_stream(t.sid, h2.errors.ErrorCodes.CANCEL)
        elif name == "deliver_to_ours":
            self.deliver_to_ours(None if flag else n % 5000)
        elif name == "deliver_to_theirs":
            self.deliver_to_theirs(None if flag else n % 5000)
        elif name == "window_theirs":
            # h2 changes the initial stream window it grants us, mid-stream. Only upwards:
            # h2 itself rejects a zero-length DATA (our END_STREAM) once its own inbound
            # window went negative from a shrink, which RFC 9113 §6.9.2 allows; the
            # shrink is tested on its own below (test_shrunk_window_goes_negative).
            cur = self.theirs.local_settings.initial_window_size
            self.theirs.update_settings({h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: cur + n % 150_000})
        elif name == "ping_theirs":
            self.theirs.ping(n.to_bytes(8, "big"))
        self.move()

    def _received(self) -> int:
        """Bytes delivered so far, both ways (never more than was sent: checked here,
        so a side inventing data cannot keep finish() going forever)."""
        for t in self.tuns.values():
            assert len(t.ours_got) <= len(t.theirs_sent), f"stream {t.sid}: we got more than h2 sent"
            assert len(t.theirs_got) <= len(t.ours_sent), f"stream {t.sid}: h2 got more than we sent"
        return sum(len(t.ours_got) + len(t.theirs_got) for t in self.tuns.values())

    def finish(self) -> None:
        """Acknowledge everything on both sides until nothing moves, then check.

        A round is one acknowledgement: pump() delivers what the windows allow, then
        each side returns the credit and the other sends the next window's worth. So
        a stream needs about (bytes queued / receive window) rounds: 200 KB behind a
        1 KiB window is 200 rounds. The loop therefore ends when a round moves
        nothing, and fails loudly only if acknowledgements keep going round with no
        byte delivered (a real stall), not after a fixed number of rounds."""
        idle_rounds = 0
        while True:
            before = self._received()
            self.pump()
            moved = False
            for t in self.tuns.values():
                if t.refused:
                    continue
                # A reset stream's received bytes still count against the connection's
                # window: each side gives that credit back (as tunnel.StreamEnd does),
                # or the other tunnels stall.
                if t.ours_unacked:
                    self.ours.acknowledge(t.sid, t.ours_unacked)
                    t.ours_unacked = 0
                    moved = True
                if t.theirs_unacked:
                    with contextlib.suppress(h2.exceptions.StreamClosedError):
                        self.theirs.acknowledge_received_data(t.theirs_unacked, t.sid)
                    t.theirs_unacked = 0
                    moved = True
            self.flush_theirs()
            self.move()
            if not moved and not self.to_ours and not self.to_theirs:
                break
            idle_rounds = idle_rounds + 1 if self._received() == before else 0
            assert idle_rounds < 20, "finish: credit goes back and forth but no data moves"
        for t in self.tuns.values():
            if t.reset:
                # Whatever arrived is a prefix of what was sent.
                assert bytes(t.ours_got) == bytes(t.theirs_sent[:len(t.ours_got)])
                assert bytes(t.theirs_got) == bytes(t.ours_sent[:len(t.theirs_got)])
                continue
            if t.refused or not t.up:
                continue
            assert bytes(t.theirs_got) == bytes(t.ours_sent), f"stream {t.sid}: our data did not all arrive"
            assert bytes(t.ours_got) == bytes(t.theirs_sent), f"stream {t.sid}: h2's data did not all arrive"
            assert t.theirs_saw_end == t.ours_ended and t.ours_saw_end == t.theirs_ended
            assert not self.ours.is_blocked(t.sid)


def _run(ours_is_client: bool, ops: list[Any], stream_window: int, conn_window: int) -> None:
    h = Harness(ours_is_client, stream_window, conn_window)
    h.pump()
    for op in ops:
        h.op(*op)
    h.finish()


_settings = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# Found by Hypothesis: 200 KB from h2 behind our 1 KiB stream window takes 201
# acknowledgement rounds in finish(), which used to give up after 200 (a harness cap,
# not a flow-control fault: the last byte arrived on the 201st round).
_SLOW_DRAIN = [("open", 0, 0, False)] * 24 + [("send_theirs", 0, 44732, True), ("send_theirs", 0, 44732, True),
                                              ("send_theirs", 0, 54265, True), ("send_theirs", 0, 61072, True)]


@_settings
@given(ops=st.lists(op_st, min_size=30, max_size=150), stream_window=st.integers(1024, 300_000),
       conn_window=st.integers(65535, 1_000_000))
@example(ops=_SLOW_DRAIN[:24] + [("deliver_to_theirs", 0, 30, False), ("answer", 0, 0, True)] + _SLOW_DRAIN[24:],
         stream_window=1024, conn_window=65535)
def test_our_client_against_h2_server(ops: list[Any], stream_window: int, conn_window: int) -> None:
    _run(True, ops, stream_window, conn_window)


@_settings
@given(ops=st.lists(op_st, min_size=30, max_size=150), stream_window=st.integers(1024, 300_000),
       conn_window=st.integers(65535, 1_000_000))
@example(ops=_SLOW_DRAIN[:24] + [("deliver_to_ours", 0, 0, True), ("answer", 0, 0, True)] + _SLOW_DRAIN[24:],
         stream_window=1024, conn_window=65535)
def test_our_server_against_h2_client(ops: list[Any], stream_window: int, conn_window: int) -> None:
    _run(False, ops, stream_window, conn_window)


def test_early_data_of_a_dropped_stream_returns_connection_credit() -> None:
    """Against h2: data h2 sends ahead of our 200 is held by our core (unacknowledged,
    so the stream window bounds it). When that stream never gets its 200 (we refuse
    it, we reset it, or h2 resets it) the held bytes must go back to the connection
    window; otherwise three such streams of 30,000 bytes exhaust a 65,535 window and
    the whole connection stalls. Afterwards a fourth tunnel moves 60,000 bytes."""
    h = Harness(False, 65535, 65535)
    for how in ("refuse", "reset_ours", "reset_theirs"):
        h.op("open", 0, 0, False)
        sid = h.order[-1]
        for part in (0, 1):  # h2 sends at most 16 KiB a frame by default
            h.theirs.send_data(sid, _blob(15_000, part))
        h.pump()
        assert sid in h.ours._streams and h.ours._streams[sid].early  # held, not acknowledged
        if how == "refuse":
            h.ours.refuse(sid, 503, "busy")
            h.tuns[sid].refused = True
        elif how == "reset_ours":
            h.ours.reset(sid)
            h.tuns[sid].reset = True
        else:
            h.theirs.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            h.tuns[sid].reset = True
        h.pump()
    assert h.ours._recv_window + h.ours._conn_credit == 65535
    h.op("open", 0, 0, False)
    h.pump()
    h.op("answer", 0, 0, True)
    h.pump()
    h.op("send_theirs", 0, 60_000, True)
    h.finish()
    assert len(h.tuns[h.order[-1]].ours_got) == 60_000


def test_large_frames_and_batched_window_updates() -> None:
    """Against h2: with h2 allowing 256 KiB frames, 4 MiB go out in 16 DATA frames;
    acknowledging 1 KiB at a time costs one WINDOW_UPDATE per quarter window, not 4,096."""
    h = Harness(True, hbone.STREAM_WINDOW, hbone.CONNECTION_WINDOW)
    h.theirs.update_settings({h2.settings.SettingCodes.MAX_FRAME_SIZE: 256 * 1024,
                              h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 8 * 1024 * 1024})
    h.theirs.increment_flow_control_window(16 * 1024 * 1024)
    h.pump()
    h.op("open", 0, 0, False)
    h.pump()
    h.op("answer", 0, 0, True)
    h.pump()
    sid = h.order[0]
    blob = _blob(4 * 1024 * 1024, 3)
    h.ours.send(sid, blob)
    wire = h.ours.data_to_send()
    frames = _frame_types(wire)
    assert frames.count(hbone.DATA) == 16 and len(wire) == len(blob) + 16 * 9
    h.to_theirs += wire
    h.pump()
    # Now the other way: h2 sends 4 MiB in 16 KiB frames; we acknowledge 1 KiB at a time.
    h.tuns[sid].theirs_pending += blob
    h.tuns[sid].theirs_sent += blob
    h.tuns[sid].up = True
    h.flush_theirs()
    h.move()
    h.deliver_to_ours()
    got = h.tuns[sid].ours_unacked
    assert got > 0
    for _ in range(got // 1024):
        h.ours.acknowledge(sid, 1024)
    updates = _frame_types(h.ours.data_to_send()).count(hbone.WINDOW_UPDATE)
    assert 1 <= updates <= 2 * (got // (hbone.STREAM_WINDOW // 4) + 1)


def test_large_frame_passed_on_as_it_arrives() -> None:
    """Cut-through: a 256 KiB DATA frame arriving in 1 KiB reads comes out as it
    arrives (nothing waits for the frame's end), and the windows count the frame once."""
    c = hbone.HboneConnection(client=True)
    s = hbone.HboneConnection(client=False)
    c.initiate()
    s.initiate()
    for _ in range(3):
        s.receive_data(c.data_to_send())
        c.receive_data(s.data_to_send())
    sid = c.open_tunnel("10.0.0.5", 80)
    s.receive_data(c.data_to_send())
    s.accept(sid)
    c.receive_data(s.data_to_send())
    blob = _blob(256 * 1024, 9)
    c.send(sid, blob)
    wire = c.data_to_send()
    assert _frame_types(wire) == [hbone.DATA]
    got = bytearray()
    for i in range(0, len(wire), 1024):
        evs = s.receive_data(wire[i:i + 1024])
        got += b"".join(e.data for e in evs if isinstance(e, hbone.Data))
        assert len(got) == min(len(blob), i + 1024 - 9)  # everything but the header, at once
        assert not s._inbuf
    assert bytes(got) == blob
    assert s._streams[sid].recv_window == hbone.STREAM_WINDOW - len(blob)


def test_shrunk_window_goes_negative() -> None:
    """RFC 9113 §6.9.2: a SETTINGS that lowers the initial window can make a
    stream's send window negative; nothing more is sent until WINDOW_UPDATEs
    bring it above zero, then exactly the allowed bytes flow."""
    h = Harness(True, hbone.STREAM_WINDOW, hbone.CONNECTION_WINDOW)
    h.op("open", 0, 0, False)
    h.pump()
    h.op("answer", 0, 0, True)
    h.pump()
    sid = h.order[0]
    h.ours.send(sid, _blob(60_000, 1))  # within h2's 65,535 default
    h.ours.data_to_send()  # in flight, never delivered: this test looks at our side only
    # A SETTINGS frame (length 6, type 4) with INITIAL_WINDOW_SIZE (0x4) = 1000.
    frame = bytes.fromhex("000006040000000000") + (4).to_bytes(2, "big") + (1000).to_bytes(4, "big")
    h.ours.receive_data(frame)  # INITIAL_WINDOW_SIZE 1000: window 5,535 - 64,535 < 0
    assert h.ours._streams[sid].send_window == 65535 - 60_000 - 64_535
    assert h.ours.send(sid, b"more") is True  # blocked
    assert _frame_types(h.ours.data_to_send()) == [hbone.SETTINGS]  # the ACK, no DATA
    h.ours.receive_data(_wu(sid, 58_999))  # still negative (-1)
    assert hbone.DATA not in _frame_types(h.ours.data_to_send())
    evs = h.ours.receive_data(_wu(sid, 3))  # +2: two of the four bytes may go
    wire = h.ours.data_to_send()
    assert _frame_types(wire) == [hbone.DATA] and wire.endswith(b"mo")
    assert hbone.SendUnblocked(sid) not in evs and h.ours.is_blocked(sid)


def _wu(sid: int, inc: int) -> bytes:
    return (4).to_bytes(3, "big") + bytes([hbone.WINDOW_UPDATE, 0]) + sid.to_bytes(4, "big") + inc.to_bytes(4, "big")


def _frame_types(wire: bytes) -> list[int]:
    out, pos = [], 0
    while pos + 9 <= len(wire):
        length = int.from_bytes(wire[pos:pos + 3], "big")
        out.append(wire[pos + 3])
        pos += 9 + length
    return out
