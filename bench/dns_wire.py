"""The mesh DNS wire codec (nodeagent/dns/message.py) against dnspython, per
query, on the two paths the DNS proxy runs: parse (every query, forwarded ones
too) and parse + build a mesh answer (A record, AA, EDNS echoed).

This is the measured reason the codec stays hand-written: on 2026-12-05 (shared
2-core machine, noisy; two runs) ours took 3.0-5.7 us to parse and 7.8-9.1 us to
answer, dnspython 28-36 us and 121-128 us: 6-9x and 14-16x, on a path every
workload lookup takes (up to five queries per name with a search list). dnspython stays the
oracle in tests/unit/test_dns_oracle.py.

Run: .venv/bin/python bench/dns_wire.py [--n 5000]   (dnspython is a dev dependency)
"""

from __future__ import annotations

import argparse
import json
import sys
import timeit
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import dns.flags  # noqa: E402
import dns.message  # noqa: E402
import dns.rrset  # noqa: E402

from nodeagent.dns import message as m  # noqa: E402

QUERY = m.build_message(m.Message(7, m.FLAG_RD, (m.Question(m.name_from_text("web.default.svc.mesh"), m.TYPE_A),),
                                  additionals=(m.opt_record(1232),)))


def ours_answer() -> bytes:
    q = m.parse_message(QUERY)
    r = m.make_response(q, m.RCODE_NOERROR, (m.a_record(q.questions[0].name, "240.240.0.1", 30),), authoritative=True)
    return m.build_message(r)


def dnspython_answer() -> bytes:
    q = dns.message.from_wire(QUERY)
    r = dns.message.make_response(q)
    r.flags |= dns.flags.AA | dns.flags.RA  # as ours: authoritative, recursion available
    r.answer.append(dns.rrset.from_text(q.question[0].name, 30, "IN", "A", "240.240.0.1"))
    return bytes(r.to_wire())


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000, help="calls per timing (best of 3)")
    a = ap.parse_args()
    ours, theirs = dns.message.from_wire(ours_answer()), dns.message.from_wire(dnspython_answer())
    if (ours.flags, ours.answer) != (theirs.flags, theirs.answer):
        raise SystemExit(f"the two answers differ:\n{ours}\n---\n{theirs}")
    cases = {"ours_parse": lambda: m.parse_message(QUERY), "dnspython_parse": lambda: dns.message.from_wire(QUERY),
             "ours_answer": ours_answer, "dnspython_answer": dnspython_answer}
    us = {k: round(min(timeit.repeat(f, number=a.n, repeat=3)) / a.n * 1e6, 1) for k, f in cases.items()}
    us["parse_ratio"] = round(us["dnspython_parse"] / us["ours_parse"], 1)
    us["answer_ratio"] = round(us["dnspython_answer"] / us["ours_answer"], 1)
    print(json.dumps(us, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
