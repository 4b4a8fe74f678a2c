"""The mesh DNS wire codec (nodeagent/dns/message.py) against dnspython, an
independent, well-kept implementation: what we build, dnspython reads the same;
what dnspython builds (compressed, with EDNS and name-bearing RDATA), we read
the same; and the responder's answers read right in dnspython. The codec stays
hand-written for speed (measured in bench/dns_wire.py, see its module doc);
dnspython is the oracle that keeps it honest."""

from __future__ import annotations

import asyncio

import dns.edns
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.rrset
from hypothesis import given, settings
from hypothesis import strategies as st

from nodeagent.dns.dnsserver import DnsResponder
from nodeagent.dns.forwarder import DnsUpstream, Forwarder
from nodeagent.dns.message import (
    CLASS_IN,
    FLAG_RD,
    TYPE_A,
    TYPE_AAAA,
    Message,
    Question,
    a_record,
    build_message,
    name_from_text,
    name_key,
    opt_record,
    parse_message,
    read_name,
)
from nodeagent.meshview.snapshot import LocalWorkload, MeshSettings, Service, ServicePort, Snapshot

LABEL = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_", min_size=1,
                max_size=20)
NAMES = st.lists(LABEL, min_size=1, max_size=6).map(lambda labels: ".".join(labels) + ".")
TYPES = st.sampled_from([dns.rdatatype.A, dns.rdatatype.AAAA, dns.rdatatype.MX, dns.rdatatype.TXT,
                         dns.rdatatype.SRV, dns.rdatatype.PTR, dns.rdatatype.ANY])


def _wire_name(name: dns.name.Name) -> tuple[bytes, ...]:
    return tuple(label for label in name.labels if label)


@settings(max_examples=200, deadline=None)
@given(name=NAMES, rdtype=TYPES, msg_id=st.integers(0, 0xFFFF), edns=st.sampled_from([None, 512, 1232, 4096]))
def test_queries_dnspython_builds_parse_the_same(name: str, rdtype: dns.rdatatype.RdataType, msg_id: int,
                                                 edns: int | None) -> None:
    q = dns.message.make_query(name, rdtype, use_edns=edns is not None, payload=edns or 1232)
    q.id = msg_id
    ours = parse_message(q.to_wire())
    assert ours.id == msg_id and ours.flags == q.flags
    assert ours.questions == (Question(_wire_name(dns.name.from_text(name)), rdtype, CLASS_IN),)
    assert ours.udp_payload_limit == (max(512, edns) if edns is not None else 512)


@settings(max_examples=200, deadline=None)
@given(name=NAMES, msg_id=st.integers(0, 0xFFFF), ips=st.lists(st.ip_addresses(v=4).map(str), min_size=1, max_size=5),
       ttl=st.integers(0, 2**31 - 1))
def test_answers_we_build_read_the_same_in_dnspython(name: str, msg_id: int, ips: list[str], ttl: int) -> None:
    owner = name_from_text(name)
    msg = Message(msg_id, 0x8000 | 0x0400 | FLAG_RD, (Question(owner, TYPE_A),),
                  tuple(a_record(owner, ip, ttl) for ip in ips), (), (opt_record(1232),))
    theirs = dns.message.from_wire(build_message(msg))  # compressed owners included
    assert theirs.id == msg_id and theirs.flags & dns.flags.AA and theirs.rcode() == dns.rcode.NOERROR
    assert theirs.question[0].name == dns.name.from_text(name) and theirs.payload == 1232
    (rrset,) = theirs.answer
    assert rrset.ttl == ttl and sorted(r.address for r in rrset) == sorted(set(ips))


def test_compressed_answers_from_dnspython_parse_with_names_expanded() -> None:
    q = dns.message.make_query("www.Example.com.", "MX")
    r = dns.message.make_response(q)
    r.answer.append(dns.rrset.from_text("www.Example.com.", 300, "IN", "CNAME", "mail.example.com."))
    r.answer.append(dns.rrset.from_text("mail.example.com.", 60, "IN", "MX", "10 mx1.mail.example.com.",
                                        "20 mx2.mail.example.com."))
    r.authority.append(dns.rrset.from_text("example.com.", 900, "IN", "SOA",
                                           "ns.example.com. hostmaster.example.com. 7 3600 600 86400 30"))
    r.additional.append(dns.rrset.from_text("mx1.mail.example.com.", 60, "IN", "AAAA", "2001:db8::1"))
    wire = r.to_wire()
    ours = parse_message(wire)
    assert ours.questions[0].name == (b"www", b"Example", b"com")  # the client's case, as sent
    cname, mx1, mx2 = ours.answers
    # dnspython compresses case-insensitively (RFC 1035 4.1.4): "example.com" may
    # point at the question's "Example.com"; compare names as DNS does.
    assert name_key(read_name(cname.rdata, 0)[0]) == (b"mail", b"example", b"com")
    assert {name_key(read_name(m.rdata, 2)[0]) for m in (mx1, mx2)} == {(b"mx1", b"mail", b"example", b"com"),
                                                                    (b"mx2", b"mail", b"example", b"com")}
    soa = ours.authorities[0]
    assert name_key(read_name(soa.rdata, 0)[0]) == (b"ns", b"example", b"com") and soa.ttl == 900
    assert ours.additionals[0].rtype == TYPE_AAAA and ours.additionals[0].rdata[:2] == b"\x20\x01"
    # Re-encoded uncompressed by us, dnspython reads the same records back.
    again = dns.message.from_wire(build_message(ours))
    assert again.answer == r.answer and again.authority == r.authority and again.additional == r.additional


def _responder() -> DnsResponder:
    async def never(up: DnsUpstream, q: bytes, timeout_s: float, mark: int) -> bytes:
        raise AssertionError("a mesh name must not be forwarded")

    r = DnsResponder(Forwarder([DnsUpstream("10.0.0.53")], 0.5, udp=never, tcp=never))
    r.set_snapshot(Snapshot(version="v1", node="node-1", mesh=MeshSettings(dns_domain="mesh"),
                            services=(Service("web", "default", "240.240.0.10", (ServicePort(80, 8080),)),),
                            local_workloads=(LocalWorkload("c", "default", "sa", "10.0.0.2", (), uid=3000),)))
    return r


def test_responder_answers_read_right_in_dnspython() -> None:
    r = _responder()

    def ask(name: str, rdtype: str, use_edns: int | None = None, payload: int = 1232) -> dns.message.Message:
        q = dns.message.make_query(name, rdtype, use_edns=use_edns, payload=payload)
        out = asyncio.run(r.respond(q.to_wire(), tcp=False))
        assert out is not None
        answer = dns.message.from_wire(out)
        assert answer.id == q.id and answer.question == q.question
        return answer

    a = ask("Web.default.svc.mesh.", "A")
    assert a.flags & dns.flags.AA and a.rcode() == dns.rcode.NOERROR
    assert a.question[0].name.labels[0] == b"Web"  # echoed as the client wrote it
    assert [rr.address for rr in a.answer[0]] == ["240.240.0.10"] and a.answer[0].ttl == 30
    nodata = ask("web.default.svc.mesh.", "AAAA")
    assert nodata.rcode() == dns.rcode.NOERROR and not nodata.answer
    assert nodata.authority[0].rdtype == dns.rdatatype.SOA
    nx = ask("ghost.default.svc.mesh.", "A", use_edns=0, payload=4096)
    assert nx.rcode() == dns.rcode.NXDOMAIN and nx.edns == 0
    bare = ask("web.", "A")  # a bare name follows the caller's namespace
    assert [rr.address for rr in bare.answer[0]] == ["240.240.0.10"]
