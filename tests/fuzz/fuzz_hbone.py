"""Fuzz the HBONE framing core (nodeagent/proxy/hbone.py) with atheris.

Each input becomes the bytes a peer sends to one of our cores (server side:
client preface first; client side: after it opened a few tunnels), built
either raw or as a sequence of frames (type, flags, a small stream id, a
payload; sometimes a well-formed CONNECT or 200 header block), so the fuzzer
reaches the stream states and not only the preface check. Properties:
- receive_data() never raises, whatever the bytes;
- fed in one piece or cut at arbitrary points, the same events come out
  (the parser keeps no state that depends on read boundaries; a DATA frame
  passed on as it arrives may come in several Data events, merged here);
- a connection error leaves the core closed with a GOAWAY queued and later
  input ignored;
- flow control holds: what a stream delivers (never acknowledged here) stays
  within its window, and all streams within the connection window.

Run (not in CI):  PYTHONPATH=. python tests/fuzz/fuzz_hbone.py -atheris_runs=1000000
"""

from __future__ import annotations

import struct
import sys

import atheris

with atheris.instrument_imports():
    import hpack

    from nodeagent.proxy import hbone

STREAM_WINDOW = 70_000
CONN_WINDOW = 200_000
_ENC = hpack.Encoder()
CONNECT_BLOCK = _ENC.encode([(":method", "CONNECT"), (":authority", "10.0.0.5:8080")])
OK_BLOCK = hpack.Encoder().encode([(":status", "200")])


def frame(ftype: int, flags: int, sid: int, payload: bytes) -> bytes:
    n = len(payload)
    return struct.pack(">BHBBL", n >> 16, n & 0xFFFF, ftype, flags, sid) + payload


def build(fdp: atheris.FuzzedDataProvider, client: bool) -> bytes:
    out = bytearray()
    if not client and fdp.ConsumeBool():
        out += hbone.PREFACE
    if fdp.ConsumeBool():
        out += frame(hbone.SETTINGS, 0, 0, b"")
    if fdp.ConsumeBool():
        return bytes(out + fdp.ConsumeBytes(fdp.remaining_bytes()))
    for _ in range(fdp.ConsumeIntInRange(0, 24)):
        kind = fdp.ConsumeIntInRange(0, 12)
        flags = fdp.ConsumeIntInRange(0, 255)
        sid = fdp.ConsumeIntInRange(0, 9)
        if kind == 10:
            block = OK_BLOCK if client else CONNECT_BLOCK
            out += frame(hbone.HEADERS, hbone.F_END_HEADERS | (flags & hbone.F_END_STREAM), sid or 1, block)
        elif kind == 11:
            out += frame(hbone.DATA, flags & hbone.F_END_STREAM, sid or 1,
                         fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 40_000)))
        elif kind == 12:
            out += frame(hbone.WINDOW_UPDATE, 0, sid, struct.pack(">L", fdp.ConsumeIntInRange(0, 2**31)))
        else:
            out += frame(kind, flags, sid, fdp.ConsumeBytes(fdp.ConsumeIntInRange(0, 64)))
    return bytes(out)


def new_core(client: bool) -> hbone.HboneConnection:
    core = hbone.HboneConnection(client=client, stream_window=STREAM_WINDOW, connection_window=CONN_WINDOW,
                                 max_concurrent_streams=4)
    core.initiate()
    if client:
        for port in (80, 81, 82):
            core.open_tunnel("10.0.0.5", port)
    core.data_to_send()
    return core


def feed(core: hbone.HboneConnection, data: bytes, cuts: list[int]) -> list[hbone.Event]:
    events: list[hbone.Event] = []
    pos = 0
    for c in [*sorted(cuts), len(data)]:
        if c < pos:
            continue
        events += core.receive_data(memoryview(data)[pos:c] if c % 2 else data[pos:c])
        pos = c
    return events


def merged(events: list[hbone.Event]) -> list[hbone.Event]:
    """Consecutive Data events of one stream as one (cut-through splits a frame by reads)."""
    out: list[hbone.Event] = []
    for ev in events:
        last = out[-1] if out else None
        if isinstance(ev, hbone.Data) and isinstance(last, hbone.Data) and last.stream_id == ev.stream_id:
            out[-1] = hbone.Data(ev.stream_id, last.data + ev.data,
                                 last.flow_controlled_length + ev.flow_controlled_length)
        else:
            out.append(ev)
    return out


def one_input(raw: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(raw)
    client = fdp.ConsumeBool()
    ncuts = fdp.ConsumeIntInRange(0, 6)
    cuts = [fdp.ConsumeIntInRange(0, 1 << 16) for _ in range(ncuts)]
    data = build(fdp, client)
    cuts = [c % (len(data) + 1) for c in cuts]

    whole = new_core(client)
    ev_whole = whole.receive_data(data)
    pieces = new_core(client)
    ev_pieces = feed(pieces, data, cuts)
    assert merged(ev_whole) == merged(ev_pieces), (ev_whole, ev_pieces)
    assert whole.closed == pieces.closed

    per_stream: dict[int, int] = {}
    for ev in ev_whole:
        if isinstance(ev, hbone.Data):
            per_stream[ev.stream_id] = per_stream.get(ev.stream_id, 0) + ev.flow_controlled_length
            assert len(ev.data) <= ev.flow_controlled_length
    assert all(v <= STREAM_WINDOW for v in per_stream.values()), per_stream
    assert sum(per_stream.values()) <= CONN_WINDOW
    closed = [e for e in ev_whole if isinstance(e, hbone.ConnectionClosed)]
    if closed and not closed[0].reason.startswith("GOAWAY from peer"):
        assert whole.closed
        out = whole.data_to_send()
        assert out and hbone.GOAWAY in _types(out), out[:64]
        assert whole.receive_data(b"\x00" * 64) == []


def _types(wire: bytes) -> list[int]:
    out, pos = [], 0
    while pos + 9 <= len(wire):
        out.append(wire[pos + 3])
        pos += 9 + int.from_bytes(wire[pos:pos + 3], "big")
    return out


if __name__ == "__main__":
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()
