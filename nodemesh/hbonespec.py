"""The HBONE limits (MeshConfig spec.hbone): streams per connection, flow-control
windows, frame size and idle timeouts of the mTLS connections between node
proxies. Shared by the control plane (validation, carried to agents in the
MeshSecurity resource) and the agents (nodeagent/proxy/hbone.py HboneLimits,
whose defaults these are: a test keeps the two equal).

Defaults: Envoy's HTTP/2 defaults are 2^31-1 concurrent streams and 256 MiB
windows, sized for an edge proxy with memory to spare; a node proxy buffers
at most one window per stream and per connection (docs/security.md), so ours
are smaller (4 MiB per stream, 16 MiB per connection) and a client opens a
sibling connection past 100 streams, as Envoy's `max_requests_per_connection`
style pooling does."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from nodemesh.httpedge import non_default_spec, parse_fields


@dataclass(frozen=True)
class HboneSettings:
    max_concurrent_streams: int = 1000  # server: SETTINGS_MAX_CONCURRENT_STREAMS; REFUSED_STREAM beyond
    streams_per_connection: int = 100  # client: a sibling connection to the same node beyond
    stream_window_bytes: int = 4 * 1024 * 1024  # per stream, both ways: at most this is buffered
    connection_window_bytes: int = 16 * 1024 * 1024  # per connection, both ways
    max_frame_bytes: int = 256 * 1024  # SETTINGS_MAX_FRAME_SIZE we accept
    idle_timeout_s: float = 60.0  # client connection with no stream: closed
    server_idle_timeout_s: float = 300.0  # server connection with no stream: GOAWAY, close
    stream_idle_timeout_s: float = 3600.0  # an inbound tunnel moving no byte either way: closed

    def to_spec(self) -> dict[str, Any]:
        """The non-default fields, as MeshConfig spec.hbone keys."""
        return non_default_spec(self, _SPEC_NAMES)


DEFAULT_HBONE = HboneSettings()

_SPEC_NAMES = {
    "max_concurrent_streams": "maxConcurrentStreams",
    "streams_per_connection": "streamsPerConnection",
    "stream_window_bytes": "streamWindowBytes",
    "connection_window_bytes": "connectionWindowBytes",
    "max_frame_bytes": "maxFrameBytes",
    "idle_timeout_s": "idleTimeoutSeconds",
    "server_idle_timeout_s": "serverIdleTimeoutSeconds",
    "stream_idle_timeout_s": "streamIdleTimeoutSeconds",
}
HBONE_SPEC_FIELDS = tuple(_SPEC_NAMES.values())
_BOUNDS: dict[str, tuple[float, float]] = {
    "max_concurrent_streams": (1, 100_000),
    "streams_per_connection": (1, 100_000),
    "stream_window_bytes": (65_535, 2**31 - 1),  # RFC 9113 6.9.1
    "connection_window_bytes": (65_535, 2**31 - 1),
    "max_frame_bytes": (16_384, 16_777_215),  # RFC 9113 6.5.2
    "idle_timeout_s": (0.1, 7 * 86_400),
    "server_idle_timeout_s": (0.1, 7 * 86_400),
    "stream_idle_timeout_s": (0.1, 7 * 86_400),
}


def parse_hbone(raw: Mapping[str, Any], path: str = "spec.hbone") -> tuple[HboneSettings, list[tuple[str, str]]]:
    """spec.hbone -> HboneSettings and a (field path, reason) per problem; unknown fields are problems."""
    kw, problems = parse_fields(raw, path, _SPEC_NAMES, _BOUNDS)
    return HboneSettings(**kw), problems
