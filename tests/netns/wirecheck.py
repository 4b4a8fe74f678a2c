"""Wire-level checks on what crossed the lab's bridge, read with scapy from the
pcap `Lab.capture_bridge` writes: every TCP stream reassembled per direction
(packets seen on several bridge ports collapse by sequence number), then walked
as TLS records, so "only TLS crossed" means every byte of every stream, not a
count of byte patterns in the file."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from scapy.layers.inet import IP, TCP
from scapy.utils import PcapReader

TLS_CONTENT_TYPES = {20: "change_cipher_spec", 21: "alert", 22: "handshake", 23: "application_data"}
MAX_RECORD = 2**14 + 256  # TLSCiphertext.length limit (RFC 8446 5.2)

Flow = tuple[str, int, str, int]  # src, sport, dst, dport


@dataclass
class FlowBytes:
    """One direction of one TCP connection: its payload in sequence order."""

    segments: dict[int, bytes] = field(default_factory=dict)  # seq -> payload (duplicates collapse)

    def data(self) -> bytes:
        out = bytearray()
        end: int | None = None
        for seq in sorted(self.segments):
            chunk = self.segments[seq]
            if end is not None and seq < end:  # a retransmission overlapping what we have
                chunk = chunk[end - seq:]
            out += chunk
            end = max(end or 0, seq + len(self.segments[seq]))
        return bytes(out)


def tcp_flows(pcap: Path, port: int | None = None) -> dict[Flow, bytes]:
    """Every TCP direction with payload in the pcap (to or from `port` if given)."""
    flows: dict[Flow, FlowBytes] = defaultdict(FlowBytes)
    with PcapReader(str(pcap)) as reader:
        for pkt in reader:
            if IP not in pkt or TCP not in pkt:
                continue
            tcp = pkt[TCP]
            payload = bytes(tcp.payload)
            if not payload or (port is not None and port not in (tcp.sport, tcp.dport)):
                continue
            flows[(pkt[IP].src, tcp.sport, pkt[IP].dst, tcp.dport)].segments[tcp.seq] = payload
    return {k: v.data() for k, v in flows.items()}


@dataclass(frozen=True)
class TlsWalk:
    records: dict[str, int]  # content type name -> records seen
    problem: str  # "" when every byte was part of a well-formed record


def walk_tls(data: bytes) -> TlsWalk:
    """Walk a byte stream as TLS records (type, legacy version 0x0301-0x0303,
    length within the limit). A record cut by the end of the capture is fine."""
    counts: dict[str, int] = defaultdict(int)
    pos = 0
    while pos < len(data):
        head = data[pos:pos + 5]
        if len(head) < 5:
            break  # cut by the end of the capture
        ctype, major, minor, length = head[0], head[1], head[2], int.from_bytes(head[3:5], "big")
        if ctype not in TLS_CONTENT_TYPES or major != 3 or minor not in (1, 2, 3) or length > MAX_RECORD:
            return TlsWalk(dict(counts), f"not a TLS record at offset {pos}: {head.hex()}")
        counts[TLS_CONTENT_TYPES[ctype]] += 1
        pos += 5 + length
    return TlsWalk(dict(counts), "")
