"""The bridge checks of tests/netns (wirecheck.py) on crafted pcaps: scapy
writes TCP segments (out of order, duplicated on two bridge ports, retransmitted
with overlap), the reader reassembles each direction, and the TLS walk tells
records from clear text. A check that cannot fail would prove nothing."""

from __future__ import annotations

from pathlib import Path

from scapy.layers.inet import IP, TCP
from scapy.layers.l2 import Ether
from scapy.utils import wrpcap

from tests.netns.wirecheck import tcp_flows, walk_tls


def _rec(ctype: int, body: bytes) -> bytes:
    return bytes([ctype, 3, 3]) + len(body).to_bytes(2, "big") + body


def _seg(seq: int, payload: bytes, sport: int = 40000, dport: int = 15008) -> Ether:
    tcp = TCP(sport=sport, dport=dport, seq=seq, flags="PA")
    return Ether() / IP(src="10.77.0.11", dst="10.77.0.12") / tcp / payload


def test_streams_reassemble_in_order_without_duplicates(tmp_path: Path) -> None:
    stream = _rec(22, b"h" * 40) + _rec(23, b"a" * 300) + _rec(23, b"b" * 10)
    a, b, c = stream[:45], stream[45:200], stream[200:]
    pkts = [_seg(1000 + 45, b), _seg(1000, a), _seg(1000 + 45, b),  # seen on two bridge ports
            _seg(1000 + 100, stream[100:260]),  # a retransmission overlapping both
            _seg(1000 + 200, c), _seg(7, b"GET / HTTP/1.1\r\n", 40001, 8080)]
    wrpcap(str(tmp_path / "x.pcap"), pkts)
    flows = tcp_flows(tmp_path / "x.pcap", port=15008)
    assert flows == {("10.77.0.11", 40000, "10.77.0.12", 15008): stream}
    walk = walk_tls(stream)
    assert walk.problem == "" and walk.records == {"handshake": 1, "application_data": 2}
    assert set(tcp_flows(tmp_path / "x.pcap")) == {("10.77.0.11", 40000, "10.77.0.12", 15008),
                                                   ("10.77.0.11", 40001, "10.77.0.12", 8080)}


def test_clear_text_or_a_bad_record_is_named() -> None:
    assert "offset 0" in walk_tls(b"GET /secret HTTP/1.1\r\n\r\n").problem
    tls_then_clear = _rec(23, b"x" * 20) + b"HTTP/1.1 200 OK\r\n"
    assert "offset 25" in walk_tls(tls_then_clear).problem
    too_long = bytes([23, 3, 3]) + (2**14 + 257).to_bytes(2, "big")
    assert walk_tls(too_long).problem
    # A record cut by the end of the capture is not a problem.
    assert walk_tls(_rec(23, b"y" * 50)[:30]).problem == ""
