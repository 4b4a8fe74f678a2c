"""Mesh DNS without root: the wire codec, the name -> answer decision, the
responder and forwarder with scripted upstreams, the iptables rules for port
53, config parsing, and the real UDP/TCP server on loopback."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable

import pytest

from nodeagent.capture.iptables import output_rules
from nodeagent.config import ConfigError, parse_config
from nodeagent.dns.dnsserver import DnsResponder, DnsServer, DnsSettings
from nodeagent.dns.forwarder import (
    DnsUpstream,
    Forwarder,
    UpstreamError,
    answers_query,
    parse_resolv_conf,
    parse_upstream,
)
from nodeagent.dns.message import (
    CLASS_IN,
    FLAG_AA,
    FLAG_QR,
    FLAG_RD,
    FLAG_TC,
    RCODE_FORMERR,
    RCODE_NOERROR,
    RCODE_NXDOMAIN,
    RCODE_REFUSED,
    RCODE_SERVFAIL,
    TYPE_A,
    TYPE_AAAA,
    TYPE_CNAME,
    TYPE_MX,
    TYPE_SOA,
    TYPE_TXT,
    DnsFormatError,
    Message,
    Question,
    Record,
    a_record,
    build_message,
    name_from_text,
    name_to_text,
    opt_record,
    parse_message,
    read_name,
)
from nodeagent.dns.zone import MeshZone, decide
from nodeagent.meshview.snapshot import LocalWorkload, MeshSettings, Service, ServicePort, Snapshot
from nodeagent.supervision.settings import ProxySettings

N = name_from_text


def query(name: str, qtype: int = TYPE_A, msg_id: int = 0x1234, edns: int | None = None) -> bytes:
    adds = (opt_record(edns),) if edns is not None else ()
    return build_message(Message(msg_id, FLAG_RD, (Question(N(name), qtype, CLASS_IN),), additionals=adds))


def snapshot(local_ns: tuple[str, ...] = ("default",), domain: str = "mesh") -> Snapshot:
    return Snapshot(
        version="v7", node="node-1", mesh=MeshSettings(dns_domain=domain),
        services=(
            Service("web", "default", "240.240.0.10", (ServicePort(80, 8080),)),
            Service("db", "data", "240.240.0.20", (ServicePort(5432, 5432),)),
            Service("web", "shop", "240.240.0.30", (ServicePort(80, 8080),)),
        ),
        local_workloads=tuple(LocalWorkload(f"w{i}", ns, "sa", "10.0.0.2", (), uid=3000 + i)
                              for i, ns in enumerate(local_ns)),
    )


# ------------------------------------------------------------------ codec


def test_round_trip_with_compression() -> None:
    msg = Message(0xBEEF, FLAG_QR | FLAG_AA | FLAG_RD,
                  (Question(N("web.default.svc.mesh"), TYPE_A),),
                  (a_record(N("web.default.svc.mesh"), "240.240.0.10", 30),
                   a_record(N("WEB.default.svc.mesh"), "240.240.0.11", 30)),
                  (), (opt_record(1232),))
    wire = build_message(msg)
    assert parse_message(wire) == msg
    # The first answer's owner is a 2-octet pointer; the second differs in case
    # in its first label only, so that label is written and the rest pointed to.
    plain = len(b"\x03web\x07default\x03svc\x04mesh\x00")
    assert len(wire) == 12 + plain + 4 + (2 + 10 + 4) + (4 + 2 + 10 + 4) + 11


def test_parse_compressed_rdata_names_are_expanded() -> None:
    # A hand-made answer: CNAME whose target points into the question name.
    qname = b"\x03www\x07example\x03com\x00"
    header = struct.pack("!HHHHHH", 7, FLAG_QR, 1, 2, 0, 0)
    q = qname + struct.pack("!HH", TYPE_A, 1)
    cname_rdata = b"\x04edge\xc0\x10"  # "edge" + pointer to "example.com" (offset 16)
    cname = b"\xc0\x0c" + struct.pack("!HHIH", TYPE_CNAME, 1, 60, len(cname_rdata)) + cname_rdata
    mx_rdata = struct.pack("!H", 10) + b"\x02mx\xc0\x10"
    mx = b"\xc0\x10" + struct.pack("!HHIH", TYPE_MX, 1, 60, len(mx_rdata)) + mx_rdata
    msg = parse_message(header + q + cname + mx)
    assert msg.answers[0].rdata == b"\x04edge\x07example\x03com\x00"
    assert msg.answers[1].name == N("example.com")
    assert msg.answers[1].rdata == struct.pack("!H", 10) + b"\x02mx\x07example\x03com\x00"
    # Re-encoding the parsed message parses back to the same thing.
    assert parse_message(build_message(msg)) == msg


def test_names_text_forms() -> None:
    assert name_to_text(N("Web.default.svc.mesh.")) == "Web.default.svc.mesh."
    assert name_to_text(()) == "."
    assert name_to_text((b"a.b", b"\x00x")) == "a\\046b.\\000x."
    with pytest.raises(DnsFormatError, match="63"):
        name_from_text("a" * 64 + ".mesh")


HDR1 = struct.pack("!HHHHHH", 1, 0, 1, 0, 0, 0)


@pytest.mark.parametrize("body, reason", [
    (b"\xc0\x0c" + b"\x00\x01\x00\x01", "not strictly backwards"),  # pointer to itself
    (b"\x01a\xc0\x0e\x00\x01\x00\x01", "not strictly backwards"),  # forward pointer (loop a->a)
    (b"\x01a\xc0", "cut off"),  # pointer missing its second octet
    (b"\x05ab", "past the end"),  # label longer than the rest
    (b"\x03abc", "past the end"),  # name without its terminating root
    (b"\x01a\x00\x00", "cut off"),  # question without full type/class
    (b"\x80abc\x00\x00\x01\x00\x01", "label type"),  # reserved 10xxxxxx label type
    ((b"\x3f" + b"a" * 63) * 4 + b"\x00\x00\x01\x00\x01", "longer than 255"),
    (b"\x01a\x00\x00\x01\x00\x01junk", "after the last record"),
])
def test_malformed_questions(body: bytes, reason: str) -> None:
    with pytest.raises(DnsFormatError, match=reason):
        parse_message(HDR1 + body)


def test_pointer_cycle_between_two_names_is_rejected() -> None:
    # Two pointers pointing at each other: decoding must stop, not spin.
    data = HDR1 + b"\xc0\x0e\xc0\x0c"
    with pytest.raises(DnsFormatError, match="not strictly backwards"):
        read_name(data, 12)
    with pytest.raises(DnsFormatError):
        read_name(data, 14)


def test_truncated_and_overlong_records() -> None:
    with pytest.raises(DnsFormatError, match="shorter than the 12-octet header"):
        parse_message(b"\x00\x01\x00")
    header = struct.pack("!HHHHHH", 1, FLAG_QR, 0, 1, 0, 0)
    with pytest.raises(DnsFormatError, match="RDATA"):
        parse_message(header + b"\x00" + struct.pack("!HHIH", TYPE_A, 1, 1, 9) + b"\x01\x02")
    with pytest.raises(DnsFormatError, match="cut off after its name"):
        parse_message(header + b"\x00\x00\x01")
    soa_bad = b"\x00\x00" + b"\x00" * 4  # two root names then 4 octets (needs 20)
    with pytest.raises(DnsFormatError, match="20 octets"):
        parse_message(header + b"\x00" + struct.pack("!HHIH", TYPE_SOA, 1, 1, len(soa_bad)) + soa_bad)
    # Counts larger than the message.
    with pytest.raises(DnsFormatError):
        parse_message(struct.pack("!HHHHHH", 1, 0, 3, 0, 0, 0) + b"\x00\x00\x01\x00\x01")


def test_two_opt_records_rejected() -> None:
    wire = build_message(Message(1, 0, (Question(N("a"), TYPE_A),), additionals=(opt_record(1232),
                                                                                     opt_record(512))))
    with pytest.raises(DnsFormatError, match="more than one OPT"):
        parse_message(wire)


# ------------------------------------------------------------------ zone decisions


ZONE = MeshZone.from_snapshot(snapshot())


@pytest.mark.parametrize("name, qtype, kind, addr", [
    ("web.default.svc.mesh", TYPE_A, "answer", "240.240.0.10"),
    ("WEB.Default.SVC.Mesh.", TYPE_A, "answer", "240.240.0.10"),
    ("db.data.svc.mesh", TYPE_A, "answer", "240.240.0.20"),
    ("web.shop.svc.mesh", TYPE_A, "answer", "240.240.0.30"),
    ("web.default.svc.mesh", TYPE_AAAA, "nodata", None),
    ("web.default.svc.mesh", TYPE_TXT, "nodata", None),
    ("nope.default.svc.mesh", TYPE_A, "nxdomain", None),
    ("a.b.web.default.svc.mesh", TYPE_A, "nxdomain", None),
    ("default.svc.mesh", TYPE_A, "nodata", None),  # empty non-terminal
    ("svc.mesh", TYPE_A, "nodata", None),
    ("ghost.svc.mesh", TYPE_A, "nxdomain", None),
    ("other.mesh", TYPE_A, "forward", None),  # not under svc.<domain>
    ("web.default.svc", TYPE_A, "answer", "240.240.0.10"),
    ("db.data", TYPE_A, "answer", "240.240.0.20"),
    ("web.shop", TYPE_A, "answer", "240.240.0.30"),
    ("web", TYPE_A, "answer", "240.240.0.10"),  # this node's workloads are all in default
    ("web", TYPE_AAAA, "nodata", None),
    ("db", TYPE_A, "forward", None),  # no db in default
    ("example.com", TYPE_A, "forward", None),
    ("www.example.com", TYPE_A, "forward", None),
    ("web.default.svc.cluster.local", TYPE_A, "forward", None),
])
def test_decide(name: str, qtype: int, kind: str, addr: str | None) -> None:
    d = decide(ZONE, Question(N(name), qtype))
    assert d.kind == kind, d
    if addr:
        assert d.addresses == (addr,)


def test_bare_names_follow_the_callers_namespace() -> None:
    zone = MeshZone.from_snapshot(snapshot(local_ns=("default", "shop")))
    assert decide(zone, Question(N("web"), TYPE_A)).kind == "forward"  # ambiguous: no guessing
    assert decide(zone, Question(N("web"), TYPE_A), caller_namespace="shop").addresses == ("240.240.0.30",)
    assert decide(zone, Question(N("web.default"), TYPE_A)).addresses == ("240.240.0.10",)


def test_other_dns_domain_and_class() -> None:
    zone = MeshZone.from_snapshot(snapshot(domain="corp.internal"))
    assert decide(zone, Question(N("web.default.svc.corp.internal"), TYPE_A)).kind == "answer"
    assert decide(zone, Question(N("web.default.svc.mesh"), TYPE_A)).kind == "forward"
    assert decide(zone, Question(N("web.default.svc.corp.internal"), TYPE_A, 3)).kind == "forward"  # CHAOS


# ------------------------------------------------------------------ responder + forwarder


class ScriptedUpstreams:
    """Upstream exchanges scripted per address: a function of the query, or an error."""

    def __init__(self, behaviours: dict[str, Callable[[bytes], bytes] | str]) -> None:
        self.behaviours = behaviours
        self.seen: list[tuple[str, int, bool]] = []  # (upstream, id sent, tcp)

    def exchange(self, tcp: bool) -> Callable[[DnsUpstream, bytes, float, int], object]:
        async def run(up: DnsUpstream, q: bytes, timeout_s: float, mark: int) -> bytes:
            self.seen.append((up.host, struct.unpack_from("!H", q)[0], tcp))
            b = self.behaviours[up.host]
            if isinstance(b, str):
                raise UpstreamError(b, f"{up}: {b}")
            return b(q)
        return run


def answer_with(ip: str, rcode: int = RCODE_NOERROR, extra_txt: int = 0) -> Callable[[bytes], bytes]:
    def make(q: bytes) -> bytes:
        m = parse_message(q)
        answers: tuple[Record, ...] = (a_record(m.questions[0].name, ip, 300),) if rcode == RCODE_NOERROR else ()
        if extra_txt:
            answers += tuple(Record(m.questions[0].name, TYPE_TXT, 1, 300, b"\xff" + b"t" * 255)
                             for _ in range(extra_txt))
        return build_message(Message(m.id, FLAG_QR | FLAG_RD | 0x80 | rcode, m.questions, answers))
    return make


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def responder(behaviours: dict[str, Callable[[bytes], bytes] | str],
              clock: Clock | None = None) -> tuple[DnsResponder, ScriptedUpstreams]:
    script = ScriptedUpstreams(behaviours)
    fwd = Forwarder([DnsUpstream(h) for h in behaviours], 0.5, udp=script.exchange(False),  # type: ignore[arg-type]
                    tcp=script.exchange(True), clock=clock or Clock())  # type: ignore[arg-type]
    r = DnsResponder(fwd)
    r.set_snapshot(snapshot())
    return r, script


def respond(r: DnsResponder, data: bytes, tcp: bool = False) -> Message:
    out = asyncio.run(r.respond(data, tcp=tcp))
    assert out is not None
    return parse_message(out)


def test_mesh_name_answered_locally() -> None:
    r, script = responder({"10.0.0.53": answer_with("192.0.2.1")})
    m = respond(r, query("web.default.svc.mesh", msg_id=77))
    assert m.id == 77 and m.flags & FLAG_QR and m.flags & FLAG_AA and m.flags & FLAG_RD
    assert m.rcode == RCODE_NOERROR
    assert m.answers == (a_record(N("web.default.svc.mesh"), "240.240.0.10", 30),)
    assert not script.seen
    aaaa = respond(r, query("web.default.svc.mesh", TYPE_AAAA))
    assert aaaa.rcode == RCODE_NOERROR and not aaaa.answers
    assert aaaa.authorities and aaaa.authorities[0].rtype == TYPE_SOA
    nx = respond(r, query("ghost.default.svc.mesh", edns=4096))
    assert nx.rcode == RCODE_NXDOMAIN and nx.opt is not None


def test_snapshot_swap_changes_answers() -> None:
    r, _ = responder({"10.0.0.53": answer_with("192.0.2.1")})
    snap = snapshot()
    r.set_snapshot(Snapshot("v8", "node-1", snap.mesh, services=(
        Service("web", "default", "240.240.0.99", (ServicePort(80, 8080),)),), local_workloads=snap.local_workloads))
    assert respond(r, query("web.default.svc.mesh")).answers[0].rdata == bytes([240, 240, 0, 99])
    assert respond(r, query("db.data.svc.mesh")).rcode == RCODE_NXDOMAIN


def test_forwarded_unchanged_with_id_mapping() -> None:
    r, script = responder({"10.0.0.53": answer_with("192.0.2.1")})
    q = query("www.example.com", msg_id=4242)
    out = asyncio.run(r.respond(q, tcp=False))
    assert out is not None
    upstream_id = script.seen[0][1]
    # Byte for byte what the upstream sent, but with the client's ID.
    expected = answer_with("192.0.2.1")(struct.pack("!H", upstream_id) + q[2:])
    assert out == struct.pack("!H", 4242) + expected[2:]


def test_failover_timeouts_then_servfail_and_down_marking() -> None:
    clock = Clock()
    r, script = responder({"10.0.0.1": "upstream_timeout", "10.0.0.2": answer_with("192.0.2.2")}, clock)
    assert respond(r, query("a.example")).answers[0].rdata == bytes([192, 0, 2, 2])
    assert [h for h, _, _ in script.seen] == ["10.0.0.1", "10.0.0.2"]
    # The timed-out upstream is now tried last...
    script.seen.clear()
    respond(r, query("b.example"))
    assert [h for h, _, _ in script.seen] == ["10.0.0.2"]
    assert "down=['10.0.0.1:53']" in repr(r.forwarder)
    # ...until DOWN_FOR_S passes.
    clock.now += 31
    script.seen.clear()
    respond(r, query("c.example"))
    assert [h for h, _, _ in script.seen] == ["10.0.0.1", "10.0.0.2"]
    # Every upstream timing out: SERVFAIL with the client's ID and question.
    r2, _ = responder({"10.0.0.1": "upstream_timeout", "10.0.0.3": "upstream_refused"})
    m = respond(r2, query("d.example", msg_id=9))
    assert m.rcode == RCODE_SERVFAIL and m.id == 9 and m.questions[0].name == N("d.example")


def test_servfail_and_refused_fail_over_but_are_kept() -> None:
    r, _script = responder({"10.0.0.1": answer_with("", RCODE_SERVFAIL), "10.0.0.2": answer_with("192.0.2.9")})
    assert respond(r, query("x.example")).answers[0].rdata == bytes([192, 0, 2, 9])
    r2, _ = responder({"10.0.0.1": answer_with("", RCODE_REFUSED)})
    assert respond(r2, query("x.example")).rcode == RCODE_REFUSED


def test_udp_truncation_without_edns_and_tcp_untouched() -> None:
    r, script = responder({"10.0.0.53": answer_with("192.0.2.1", extra_txt=3)})
    small = respond(r, query("big.example"))
    assert small.flags & FLAG_TC and not small.answers and small.questions[0].name == N("big.example")
    assert len(build_message(small)) <= 512
    # With EDNS 4096 the full answer fits; over TCP there is no limit.
    assert len(respond(r, query("big.example", edns=4096)).answers) == 4
    assert len(respond(r, query("big.example"), tcp=True).answers) == 4
    assert script.seen[-1][2] is True  # TCP clients are forwarded over TCP


def test_malformed_queries_get_formerr_or_are_dropped() -> None:
    r, script = responder({"10.0.0.53": answer_with("192.0.2.1")})
    bad = HDR1[:2] + struct.pack("!H", FLAG_RD) + HDR1[4:] + b"\xc0\x0c\x00\x01\x00\x01"
    m = respond(r, bad)
    assert m.rcode == RCODE_FORMERR and m.id == 1 and m.flags & FLAG_RD
    assert asyncio.run(r.respond(b"\x00\x01", tcp=False)) is None  # no header: drop
    resp = answer_with("192.0.2.1")(query("a.example"))
    assert asyncio.run(r.respond(resp, tcp=False)) is None  # a response: never answered
    two = build_message(Message(5, 0, (Question(N("a"), TYPE_A), Question(N("b"), TYPE_A))))
    assert respond(r, two).rcode == RCODE_FORMERR
    assert not script.seen
    assert r.stats["formerr"] == 2 and r.stats["dropped_response"] == 1


def test_answers_query_checks_id_and_question() -> None:
    q = query("a.example", msg_id=1)
    assert answers_query(q, answer_with("192.0.2.1")(q))
    assert not answers_query(q, answer_with("192.0.2.1")(query("b.example", msg_id=1)))
    assert not answers_query(q, answer_with("192.0.2.1")(query("a.example", msg_id=2)))
    assert not answers_query(q, q)  # not a response


# ------------------------------------------------------------------ upstream config


def test_resolv_conf_skips_loopback_stubs() -> None:
    text = """# generated
search example.com
nameserver 127.0.0.53
nameserver 10.0.0.2  # primary
nameserver ::1
nameserver fd00::53
nameserver 10.0.0.2
nameserver bogus
options edns0
"""
    assert parse_resolv_conf(text) == (DnsUpstream("10.0.0.2"), DnsUpstream("fd00::53"))


def test_parse_upstream() -> None:
    assert parse_upstream("10.0.0.2") == DnsUpstream("10.0.0.2", 53)
    assert parse_upstream("10.0.0.2:5353") == DnsUpstream("10.0.0.2", 5353)
    assert parse_upstream("[fd00::1]:54") == DnsUpstream("fd00::1", 54)
    assert parse_upstream("fd00::1") == DnsUpstream("fd00::1", 53)
    with pytest.raises(ValueError, match="not an IP address"):
        parse_upstream("dns.example.com")
    with pytest.raises(ValueError, match="port"):
        parse_upstream("10.0.0.2:99999")


BASE = {"node": {"name": "n1", "address": "10.0.0.2"}, "controlPlane": {"address": "10.0.0.1:15010"}}


def test_dns_config() -> None:
    cfg = parse_config(BASE)
    assert cfg.dns.enabled and cfg.dns.port == 15053 and cfg.dns.address == "127.0.0.1"
    cfg = parse_config({**BASE, "dns": {"enabled": False, "port": 5353, "upstreams": ["10.0.0.9:53"],
                                        "upstreamTimeout": 0.5}})
    assert not cfg.dns.enabled and cfg.dns.upstreams == ("10.0.0.9:53",) and cfg.dns.upstream_timeout_s == 0.5
    for bad, path in (({"upstreams": ["dns.example"]}, "dns.upstreams[0]"), ({"port": 15001}, "dns.port"),
                      ({"enabled": "yes"}, "dns.enabled"), ({"domain": "x"}, "dns.domain"),
                      ({"upstreamTimeout": 0}, "dns.upstreamTimeout")):
        with pytest.raises(ConfigError) as e:
            parse_config({**BASE, "dns": bad})
        assert e.value.path == path, e.value


# ------------------------------------------------------------------ capture rules


def test_iptables_dns_rules_golden() -> None:
    settings = ProxySettings(node_name="node-1", node_address="10.0.0.2")
    wls = (LocalWorkload("web", "default", "web", "10.0.0.2", (8080,), uid=2001),
           LocalWorkload("db", "data", "db", "10.0.0.2", (), cgroup="nodemesh/db"))
    assert output_rules(settings, wls, ["192.168.0.0/16"], dns_port=15053) == (
        "-m mark --mark 0x6e6d -j RETURN",
        "-p udp -m udp --dport 53 -m owner --uid-owner 2001 -j REDIRECT --to-ports 15053",
        "-p tcp -m tcp --dport 53 -m owner --uid-owner 2001 -j REDIRECT --to-ports 15053",
        "-p udp -m udp --dport 53 -m cgroup --path /nodemesh/db -j REDIRECT --to-ports 15053",
        "-p tcp -m tcp --dport 53 -m cgroup --path /nodemesh/db -j REDIRECT --to-ports 15053",
        "-d 127.0.0.0/8 -j RETURN",
        "-d 192.168.0.0/16 -j RETURN",
        "-p tcp -m owner --uid-owner 2001 -j REDIRECT --to-ports 15001",
        "-p tcp -m cgroup --path /nodemesh/db -j REDIRECT --to-ports 15001",
    )
    # Off by default: exactly the rules without DNS.
    assert not any("--dport 53" in r for r in output_rules(settings, wls, []))


# ------------------------------------------------------------------ real sockets on loopback


class FakeUpstream(asyncio.DatagramProtocol):
    """A loopback resolver answering every A query with 192.0.2.7, except names
    starting with "drop" (never answered)."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        self.queries: list[bytes] = []

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queries.append(data)
        if parse_message(data).questions[0].name[0].startswith(b"drop"):
            return
        self.transport.sendto(answer_with("192.0.2.7")(data), addr)  # type: ignore[attr-defined]


async def _udp_ask(addr: tuple[str, int], data: bytes, timeout: float = 3.0) -> bytes:
    loop = asyncio.get_running_loop()
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setblocking(False)
    try:
        await loop.sock_connect(s, addr)
        await loop.sock_sendall(s, data)
        return await asyncio.wait_for(loop.sock_recv(s, 65535), timeout)
    finally:
        s.close()


async def _tcp_ask(addr: tuple[str, int], *msgs: bytes) -> list[bytes]:
    reader, writer = await asyncio.open_connection(*addr)
    writer.write(b"".join(struct.pack("!H", len(m)) + m for m in msgs))
    out = []
    for _ in msgs:
        (n,) = struct.unpack("!H", await reader.readexactly(2))
        out.append(await reader.readexactly(n))
    writer.close()
    return out


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])  # the agent runs on uvloop
def test_server_over_udp_and_tcp_on_loopback(loop: str) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport, fake = await loop.create_datagram_endpoint(FakeUpstream, local_addr=("127.0.0.1", 0))
        up_port = transport.get_extra_info("sockname")[1]
        server = DnsServer(DnsSettings("127.0.0.1", 0, (DnsUpstream("127.0.0.1", up_port),), 0.3))
        server.set_snapshot(snapshot())
        await server.start()
        try:
            addr = server.udp_address
            assert server.tcp_address == addr
            mesh = parse_message(await _udp_ask(addr, query("web.default.svc.mesh", msg_id=11)))
            assert mesh.id == 11 and mesh.answers[0].rdata == bytes([240, 240, 0, 10])
            fwd = parse_message(await _udp_ask(addr, query("www.example.com", msg_id=12)))
            assert fwd.id == 12 and fwd.answers[0].rdata == bytes([192, 0, 2, 7])
            assert parse_message(fake.queries[-1]).questions[0].name == N("www.example.com")
            # A dead upstream: SERVFAIL within the timeout, and other queries meanwhile unaffected.
            t0 = loop.time()
            slow = loop.create_task(_udp_ask(addr, query("drop.example.com", msg_id=13)))
            await asyncio.sleep(0.05)
            ok = parse_message(await _udp_ask(addr, query("web.default.svc.mesh", msg_id=14)))
            assert ok.id == 14 and not slow.done()
            sf = parse_message(await slow)
            assert sf.rcode == RCODE_SERVFAIL and loop.time() - t0 < 1.5
            # Garbage between good queries: FORMERR, and the server keeps serving.
            bad = parse_message(await _udp_ask(addr, HDR1 + b"\xc0\x0c"))
            assert bad.rcode == RCODE_FORMERR
            # TCP: two pipelined queries on one connection (the fake upstream has no
            # TCP, so only mesh names are asked here).
            a, b = await _tcp_ask(addr, query("web.default.svc.mesh", msg_id=21), query("db.data", msg_id=22))
            ids = {parse_message(a).id: parse_message(a), parse_message(b).id: parse_message(b)}
            assert ids[21].answers[0].rdata == bytes([240, 240, 0, 10])
            assert ids[22].answers[0].rdata == bytes([240, 240, 0, 20])
            assert server.responder.stats["forwarded"] == 2
        finally:
            await server.stop()
            transport.close()
        assert not server.listening

    if loop == "uvloop":
        import uvloop

        uvloop.run(main())
    else:
        asyncio.run(main())


def test_server_bind_error_names_the_port() -> None:
    async def main() -> None:
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        try:
            with pytest.raises(OSError, match=f"cannot bind UDP 127.0.0.1:{port}.*dns.port"):
                await DnsServer(DnsSettings("127.0.0.1", port)).start()
        finally:
            s.close()

    asyncio.run(main())
