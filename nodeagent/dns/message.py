"""DNS wire format (RFC 1035, EDNS0 of RFC 6891): parse and build messages, no I/O.

Names are kept as tuples of raw label bytes, so whatever a client sent is echoed
back exactly (case included). Parsing is strict and bounded: every length is
checked against the message, compression pointers must point strictly backwards
(so a pointer loop cannot exist), names are at most 255 octets. A bad message
raises `DnsFormatError` with the reason; the server turns that into FORMERR.

Why not dnspython: measured (bench/dns_wire.py), dnspython parses a query 6-9x
and answers one 14-16x slower than this module (121 us against 8 us per mesh
answer), on the path of every workload lookup. dnspython is the oracle of the
tests instead (tests/unit/test_dns_oracle.py: it reads what we build, we read
what it builds).
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass, field, replace

Name = tuple[bytes, ...]

# Types and classes used by the mesh DNS.
TYPE_A = 1
TYPE_NS = 2
TYPE_CNAME = 5
TYPE_SOA = 6
TYPE_PTR = 12
TYPE_MX = 15
TYPE_TXT = 16
TYPE_AAAA = 28
TYPE_OPT = 41
TYPE_ANY = 255
CLASS_IN = 1
CLASS_ANY = 255

OPCODE_QUERY = 0

RCODE_NOERROR = 0
RCODE_FORMERR = 1
RCODE_SERVFAIL = 2
RCODE_NXDOMAIN = 3
RCODE_NOTIMP = 4
RCODE_REFUSED = 5

FLAG_QR = 0x8000
FLAG_AA = 0x0400
FLAG_TC = 0x0200
FLAG_RD = 0x0100
FLAG_RA = 0x0080
FLAG_AD = 0x0020
FLAG_CD = 0x0010

HEADER = struct.Struct("!HHHHHH")
HEADER_LEN = HEADER.size
MAX_NAME_LEN = 255
MAX_LABEL_LEN = 63
# A DNS message over UDP without EDNS is at most 512 octets (RFC 1035 4.2.1).
CLASSIC_UDP_SIZE = 512
MAX_MESSAGE = 65535
# Types whose RDATA holds domain names that RFC 1035 lets senders compress; they
# are expanded when parsed so a record can be re-encoded on its own.
# type -> (octets before the names, number of names)
_NAME_RDATA = {TYPE_NS: (0, 1), TYPE_CNAME: (0, 1), TYPE_PTR: (0, 1), TYPE_MX: (2, 1), TYPE_SOA: (0, 2)}


class DnsFormatError(ValueError):
    """A message that cannot be parsed; `reason` says where and why."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class Question:
    name: Name
    qtype: int
    qclass: int = CLASS_IN


@dataclass(frozen=True)
class Record:
    name: Name
    rtype: int
    rclass: int
    ttl: int
    rdata: bytes  # names inside are uncompressed (see _NAME_RDATA)


@dataclass(frozen=True)
class Message:
    id: int
    flags: int
    questions: tuple[Question, ...] = ()
    answers: tuple[Record, ...] = ()
    authorities: tuple[Record, ...] = ()
    additionals: tuple[Record, ...] = field(default=())

    @property
    def is_response(self) -> bool:
        return bool(self.flags & FLAG_QR)

    @property
    def opcode(self) -> int:
        return (self.flags >> 11) & 0xF

    @property
    def rcode(self) -> int:
        return self.flags & 0xF

    @property
    def opt(self) -> Record | None:
        for r in self.additionals:
            if r.rtype == TYPE_OPT:
                return r
        return None

    @property
    def udp_payload_limit(self) -> int:
        """How large a UDP answer the sender accepts: its EDNS size, never below 512."""
        opt = self.opt
        return max(CLASSIC_UDP_SIZE, opt.rclass) if opt is not None else CLASSIC_UDP_SIZE


# ------------------------------------------------------------------ names


def name_from_text(text: str) -> Name:
    """"web.default.svc.mesh." -> (b"web", b"default", ...); "" and "." are the root."""
    text = text.rstrip(".")
    if not text:
        return ()
    labels = tuple(part.encode("ascii") for part in text.split("."))
    check_name(labels)
    return labels


def name_to_text(name: Name) -> str:
    """Presentation form with a trailing dot; bytes outside printable ASCII, dots
    and backslashes are escaped as \\DDD so a log line never carries raw bytes."""
    if not name:
        return "."
    out = []
    for label in name:
        s = []
        for b in label:
            if b in (0x2E, 0x5C) or not 0x21 <= b <= 0x7E:
                s.append(f"\\{b:03d}")
            else:
                s.append(chr(b))
        out.append("".join(s))
    return ".".join(out) + "."


def check_name(name: Name) -> None:
    total = 1
    for label in name:
        if not label:
            raise DnsFormatError("empty label inside a name")
        if len(label) > MAX_LABEL_LEN:
            raise DnsFormatError(f"label of {len(label)} octets (at most {MAX_LABEL_LEN})")
        total += len(label) + 1
    if total > MAX_NAME_LEN:
        raise DnsFormatError(f"name of {total} octets (at most {MAX_NAME_LEN})")


def name_key(name: Name) -> Name:
    """Names compare without regard to ASCII case (RFC 4343)."""
    return tuple(label.lower() for label in name)


def read_name(data: bytes, offset: int) -> tuple[Name, int]:
    """Decode the name at `offset`; returns it and the offset just after it in
    the original position (after the first pointer, if any)."""
    labels: list[bytes] = []
    total = 1
    end: int | None = None
    # Every pointer must target an offset below this bound, which then drops to
    # the target: the bound strictly decreases, so decoding always terminates.
    bound = offset
    pos = offset
    while True:
        if pos >= len(data):
            raise DnsFormatError(f"name at offset {offset} runs past the end of the message")
        length = data[pos]
        kind = length & 0xC0
        if kind == 0xC0:
            if pos + 1 >= len(data):
                raise DnsFormatError(f"compression pointer at offset {pos} is cut off")
            target = ((length & 0x3F) << 8) | data[pos + 1]
            if target >= bound:
                raise DnsFormatError(
                    f"compression pointer at offset {pos} points to {target}, not strictly backwards"
                )
            if end is None:
                end = pos + 2
            bound = target
            pos = target
            continue
        if kind:
            raise DnsFormatError(f"label type {kind >> 6:#x} at offset {pos} is not supported")
        pos += 1
        if length == 0:
            break
        if pos + length > len(data):
            raise DnsFormatError(f"label at offset {pos - 1} runs past the end of the message")
        total += length + 1
        if total > MAX_NAME_LEN:
            raise DnsFormatError(f"name at offset {offset} is longer than {MAX_NAME_LEN} octets")
        labels.append(bytes(data[pos:pos + length]))
        pos += length
    return tuple(labels), (end if end is not None else pos)


def encode_name_plain(name: Name) -> bytes:
    return b"".join(bytes([len(label)]) + label for label in name) + b"\0"


# ------------------------------------------------------------------ parsing


def parse_header(data: bytes) -> tuple[int, int, int, int, int, int]:
    """(id, flags, qdcount, ancount, nscount, arcount); the message must hold a header."""
    if len(data) < HEADER_LEN:
        raise DnsFormatError(f"message of {len(data)} octets is shorter than the 12-octet header")
    return HEADER.unpack_from(data)


def _read_rdata(data: bytes, rtype: int, start: int, length: int) -> bytes:
    end = start + length
    layout = _NAME_RDATA.get(rtype)
    if layout is None:
        return bytes(data[start:end])
    prefix, names = layout
    if length < prefix:
        raise DnsFormatError(f"RDATA of type {rtype} at offset {start} is too short")
    out = bytearray(data[start:start + prefix])
    pos = start + prefix
    for _ in range(names):
        name, pos = read_name(data, pos)
        if pos > end:
            raise DnsFormatError(f"name in RDATA at offset {start} runs past its RDLENGTH")
        out += encode_name_plain(name)
    out += data[pos:end]
    if rtype == TYPE_SOA and end - pos != 20:
        raise DnsFormatError(f"SOA RDATA at offset {start} must end with 20 octets of counters")
    return bytes(out)


def _read_records(data: bytes, pos: int, count: int, section: str) -> tuple[tuple[Record, ...], int]:
    records = []
    for i in range(count):
        name, pos = read_name(data, pos)
        if pos + 10 > len(data):
            raise DnsFormatError(f"{section} record {i} is cut off after its name")
        rtype, rclass, ttl, rdlength = struct.unpack_from("!HHIH", data, pos)
        pos += 10
        if pos + rdlength > len(data):
            raise DnsFormatError(f"{section} record {i} claims {rdlength} octets of RDATA, past the end")
        records.append(Record(name, rtype, rclass, ttl, _read_rdata(data, rtype, pos, rdlength)))
        pos += rdlength
    return tuple(records), pos


def parse_message(data: bytes) -> Message:
    """Parse a whole message; raises DnsFormatError naming what is wrong."""
    if len(data) > MAX_MESSAGE:
        raise DnsFormatError(f"message of {len(data)} octets exceeds {MAX_MESSAGE}")
    msg_id, flags, qd, an, ns, ar = parse_header(data)
    pos = HEADER_LEN
    questions = []
    for i in range(qd):
        name, pos = read_name(data, pos)
        if pos + 4 > len(data):
            raise DnsFormatError(f"question {i} is cut off after its name")
        qtype, qclass = struct.unpack_from("!HH", data, pos)
        pos += 4
        questions.append(Question(name, qtype, qclass))
    answers, pos = _read_records(data, pos, an, "answer")
    authorities, pos = _read_records(data, pos, ns, "authority")
    additionals, pos = _read_records(data, pos, ar, "additional")
    if pos != len(data):
        raise DnsFormatError(f"{len(data) - pos} octets after the last record")
    opts = [r for r in additionals if r.rtype == TYPE_OPT]
    if len(opts) > 1:
        raise DnsFormatError("more than one OPT record")
    if opts and opts[0].name:
        raise DnsFormatError("OPT record owner is not the root")
    return Message(msg_id, flags, tuple(questions), answers, authorities, additionals)


# ------------------------------------------------------------------ building


class _Writer:
    def __init__(self) -> None:
        self.buf = bytearray()
        self.names: dict[Name, int] = {}

    def name(self, name: Name) -> None:
        check_name(name)
        for i in range(len(name)):
            # Exact bytes, not case-folded: a pointer must reproduce the name as
            # given (resolvers using 0x20 case randomisation check it).
            suffix = name[i:]
            at = self.names.get(suffix)
            if at is not None:
                self.buf += struct.pack("!H", 0xC000 | at)
                return
            if len(self.buf) < 0x4000:  # a pointer holds 14 bits of offset
                self.names[suffix] = len(self.buf)
            label = name[i]
            self.buf += bytes([len(label)]) + label
        self.buf += b"\0"


def build_message(msg: Message) -> bytes:
    """Encode a message, compressing owner names (RDATA is written as held)."""
    w = _Writer()
    w.buf += HEADER.pack(msg.id & 0xFFFF, msg.flags & 0xFFFF, len(msg.questions), len(msg.answers),
                         len(msg.authorities), len(msg.additionals))
    for q in msg.questions:
        w.name(q.name)
        w.buf += struct.pack("!HH", q.qtype, q.qclass)
    for r in msg.answers + msg.authorities + msg.additionals:
        w.name(r.name)
        if len(r.rdata) > 0xFFFF:
            raise ValueError(f"RDATA of {len(r.rdata)} octets does not fit a record")
        w.buf += struct.pack("!HHIH", r.rtype, r.rclass, r.ttl & 0xFFFFFFFF, len(r.rdata)) + r.rdata
    if len(w.buf) > MAX_MESSAGE:
        raise ValueError(f"message of {len(w.buf)} octets exceeds {MAX_MESSAGE}")
    return bytes(w.buf)


def a_record(name: Name, ip: str, ttl: int) -> Record:
    return Record(name, TYPE_A, CLASS_IN, ttl, ipaddress.IPv4Address(ip).packed)


def soa_record(zone: Name, ttl: int, serial: int, negative_ttl: int) -> Record:
    """A synthetic SOA for the mesh zone, so resolvers can cache negative answers
    (RFC 2308: they use the SOA's minimum and TTL)."""
    mname = (b"ns",) + zone
    rname = (b"hostmaster",) + zone
    rdata = (encode_name_plain(mname) + encode_name_plain(rname)
             + struct.pack("!IIIII", serial & 0xFFFFFFFF, 3600, 600, 86400, negative_ttl))
    return Record(zone, TYPE_SOA, CLASS_IN, ttl, rdata)


def opt_record(udp_size: int) -> Record:
    return Record((), TYPE_OPT, udp_size, 0, b"")


def response_flags(query: Message, rcode: int, *, authoritative: bool = False, truncated: bool = False,
                   recursion_available: bool = True) -> int:
    """Flags of an answer to `query`: QR, its opcode, RD and CD echoed."""
    flags = FLAG_QR | (query.flags & (0x7800 | FLAG_RD | FLAG_CD)) | (rcode & 0xF)
    if authoritative:
        flags |= FLAG_AA
    if truncated:
        flags |= FLAG_TC
    if recursion_available:
        flags |= FLAG_RA
    return flags


def make_response(query: Message, rcode: int, answers: tuple[Record, ...] = (),
                  authorities: tuple[Record, ...] = (), *, authoritative: bool = False,
                  edns_size: int = 1232) -> Message:
    """An answer to `query` with its question echoed; an OPT record is added when
    the query had one (RFC 6891 6.1.1)."""
    additionals = (opt_record(edns_size),) if query.opt is not None else ()
    return Message(query.id, response_flags(query, rcode, authoritative=authoritative),
                   query.questions, answers, authorities, additionals)


def error_response(data: bytes, rcode: int) -> bytes | None:
    """FORMERR/SERVFAIL for a message that could not be parsed past its header:
    header only, id and opcode echoed. None when even the header is missing, or
    when it is a response (answering a response could start a loop)."""
    try:
        msg_id, flags, *_ = parse_header(data)
    except DnsFormatError:
        return None
    if flags & FLAG_QR:
        return None
    query = Message(msg_id, flags)
    return build_message(Message(msg_id, response_flags(query, rcode)))


def truncated(query: Message, rcode: int = RCODE_NOERROR, authoritative: bool = False) -> Message:
    """The TC answer for a response too large for the client's UDP limit: the
    question only (and OPT), so the client retries over TCP (RFC 2181 9)."""
    base = make_response(query, rcode, authoritative=authoritative)
    return replace(base, flags=base.flags | FLAG_TC)


def fits_udp(wire: bytes, query: Message) -> bool:
    return len(wire) <= query.udp_payload_limit


def with_id(wire: bytes, msg_id: int) -> bytes:
    """The same message with another ID (the forwarder's upstream ID mapping)."""
    return struct.pack("!H", msg_id & 0xFFFF) + wire[2:]
