"""Protocol detection for `auto` service ports: look at the client's first
bytes. An HTTP/1.x request line means HTTP; the HTTP/2 preface means h2c;
anything else (or nothing within the timeout: a server-first protocol) means
opaque TCP. Ports of well-known server-first protocols skip detection, as
Linkerd's default opaque ports do."""

from __future__ import annotations

import re

# SMTP, submission, MySQL, PostgreSQL, Redis (client-first, but binary and
# latency sensitive), Memcached, MongoDB, NATS, Elasticsearch transport, Kafka.
SERVER_FIRST_PORTS = frozenset({25, 587, 3306, 4222, 4444, 5432, 6379, 9092, 9300, 11211, 27017})
H2_PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
_H1_LINE = re.compile(rb"^[A-Z]{3,10} \S+ HTTP/1\.[01]\r?\n")
_H1_PREFIX = re.compile(rb"^[A-Z]{1,10}( \S*( H(T(T(P(/(1(\.[01]?\r?)?)?)?)?)?)?)?)?$")
DEFAULT_TIMEOUT_S = 0.3

HTTP1, HTTP2, TCP, UNKNOWN = "http", "http2", "tcp", ""


def sniff(data: bytes) -> str:
    """Return HTTP1/HTTP2/TCP, or UNKNOWN when more bytes are needed to tell."""
    if not data:
        return UNKNOWN
    if data.startswith(H2_PREFACE):
        return HTTP2
    if H2_PREFACE.startswith(data):
        return UNKNOWN
    line_end = data.find(b"\n")
    if line_end >= 0:
        return HTTP1 if _H1_LINE.match(data[: line_end + 1]) else TCP
    if len(data) > 8192:
        return TCP
    return UNKNOWN if _H1_PREFIX.match(data) else TCP


def skip_detection(port: int) -> bool:
    return port in SERVER_FIRST_PORTS
