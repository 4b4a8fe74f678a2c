"""Fuzz the one path normalizer (nodeagent/proxy/http/pathnorm.py).

Properties, for every input string and every escaped-slash action:
- it returns a Target or raises BadTarget with a 400, nothing else;
- the path starts with "/" (or is "*"), has no "#", no empty segment except
  a trailing one, no "." or ".." segment;
- with REJECT_REQUEST no "%2F"/"%5C"/"\\" is left; no unreserved character
  stays percent-encoded;
- it is idempotent: normalizing the result gives the result (a later hop that
  normalizes again, e.g. the receiving node, decides on the same path).
"""

from __future__ import annotations

import re
import sys

import atheris

with atheris.instrument_imports():
    from nodeagent.proxy.http.pathnorm import BadTarget, normalize_target

ACTIONS = ("REJECT_REQUEST", "KEEP_UNCHANGED", "UNESCAPE_AND_FORWARD")
_ENCODED_UNRESERVED = re.compile(r"%(4[1-9A-F]|5[0-9A]|6[1-9A-F]|7[0-9A]|3[0-9]|2D|2E|5F|7E)")


def check(raw: str, action: str, method: str) -> None:
    try:
        t = normalize_target(raw, method, action)
    except BadTarget as e:
        assert e.status == 400 and e.reason, e
        return
    p = t.path
    if p == "*":
        assert method == "OPTIONS" and t.query == ""
        return
    assert p.startswith("/") and "#" not in p and "?" not in p, (raw, p)
    segs = p.split("/")[1:]
    assert all(s not in (".", "..") for s in segs), (raw, p)
    assert all(segs[i] != "" for i in range(len(segs) - 1)), (raw, p)
    assert not _ENCODED_UNRESERVED.search(p), (raw, p)
    if action == "REJECT_REQUEST":
        assert "\\" not in p and "%2F" not in p.upper() and "%5C" not in p.upper(), (raw, p)
    again = normalize_target(t.target, method, action)
    assert again.path == p and again.query == t.query, (raw, p, again)


def one_input(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    action = ACTIONS[fdp.ConsumeIntInRange(0, 2)]
    method = "OPTIONS" if fdp.ConsumeBool() else "GET"
    # Bias towards the interesting alphabet of paths.
    alphabet = "/.%2fF5cC\\;=#?aA0:@-_~e"
    n = fdp.ConsumeIntInRange(0, 64)
    if fdp.ConsumeBool():
        raw = "".join(alphabet[b % len(alphabet)] for b in fdp.ConsumeBytes(n))
    else:
        raw = fdp.ConsumeUnicodeNoSurrogates(n)
    if fdp.ConsumeBool():
        raw = "/" + raw
    elif fdp.ConsumeBool():
        raw = "http://web" + ("/" if fdp.ConsumeBool() else "") + raw
    check(raw, action, method)


def main() -> None:
    atheris.Setup(sys.argv, one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
