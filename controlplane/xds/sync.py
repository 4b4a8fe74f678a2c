"""Per-client xDS sync state, as `istioctl proxy-status` shows it: for every ADS
stream and type, what was last sent, what the client last ACKed, and whether
it NACKed (with its reason). The same records time each push from the moment
the response was handed to the stream to the client's answer, so the push
latency metric measures the push and nothing before it (a node's first ACK
used to be timed from when the version was built, which counted the time the
node was not even connected)."""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

# `nodemesh get proxystatus` lists these rows through ConfigService.List.
PROXY_STATUS_KIND = "ProxyStatus"
PROXY_STATUS_KINDS = frozenset({"proxystatus", "proxy-status", "ps"})
SYNCED = "synced"
STALE = "stale"
NACKED = "nacked"
# Responses awaiting an answer, per stream and type; clients answer each at once,
# the bound only stops a client that never answers from growing the map.
MAX_PENDING = 64


class SyncObserver(Protocol):
    """What the metrics module is told (controlplane.metrics.ControlPlaneMetrics)."""

    def pushed(self, type_url: str, nbytes: int) -> None: ...
    def acked(self, node: str, type_url: str, latency_s: float) -> None: ...
    def nacked(self, node: str, type_url: str) -> None: ...


@dataclass
class TypeSync:
    sent_version: str = ""
    acked_version: str = ""
    nacked_version: str = ""
    nack_reason: str = ""
    last_answer_nack: bool = False
    responses: int = 0
    bytes_sent: int = 0
    # nonce -> (version, t sent, SnapshotCache.generation it was built at)
    pending: OrderedDict[str, tuple[str, float, int]] = field(default_factory=OrderedDict)
    # The latest cache generation this type was fully delivered at: nothing pending,
    # and nothing newer to send (the watch found it holds nothing new, or the
    # client answered the last response).
    caught_up: int = 0

    @property
    def state(self) -> str:
        if self.last_answer_nack:
            return NACKED
        if self.pending or self.acked_version != self.sent_version:
            return STALE
        return SYNCED


@dataclass
class ClientSync:
    stream: int
    node: str = ""
    client: str = ""  # the Node's user_agent_name: nodemesh-agent, envoy, gRPC C-core …
    client_version: str = ""
    protocol: str = "sotw"  # or "delta"
    connected_at: float = 0.0  # wall clock, for display
    types: dict[str, TypeSync] = field(default_factory=dict)

    def type(self, type_url: str) -> TypeSync:
        ts = self.types.get(type_url)
        if ts is None:
            ts = self.types[type_url] = TypeSync()
        return ts

    @property
    def queue_depth(self) -> int:
        """Responses sent and not yet answered, over every type."""
        return sum(len(t.pending) for t in self.types.values())

    def versions_behind(self, generation: int) -> int:
        """How many snapshot versions (cache generations) this stream has yet to
        catch up on, over its types: 0 when every type is delivered and answered
        at the current generation; N when a type last caught up N snapshots ago
        (its response waits for an answer, or the fan-out has not reached it)."""
        if not self.types:
            return 0
        return max(0, max(generation - t.caught_up for t in self.types.values()))


class SyncTracker:
    """Owned by the ADS servicer; every stream reports here."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 generation: Callable[[], int] = lambda: 0) -> None:
        self._clock = clock
        self.clients: dict[int, ClientSync] = {}
        self.observer: SyncObserver | None = None
        self.generation = generation  # the cache's current generation (SnapshotCache.generation)
        self._awaiting: set[int] = set()  # streams with a response sent and not yet answered

    def awaiting_answers(self) -> int:
        """Streams that were sent a response their client has not answered yet: how
        much of the last push is still in flight (SnapshotPublisher holds the next
        rebuild on it)."""
        return len(self._awaiting)

    def current(self, stream: int, type_url: str, generation: int) -> None:
        """The cache found nothing new for this stream's type at `generation`."""
        c = self.clients.get(stream)
        if c is None:
            return
        ts = c.type(type_url)
        if not ts.pending:
            ts.caught_up = max(ts.caught_up, generation)

    def versions_behind(self) -> dict[str, int]:
        """Per node (or stream, while unidentified): snapshot versions not yet caught up on."""
        gen = self.generation()
        out: dict[str, int] = {}
        for c in self.clients.values():
            key = c.node or f"stream-{c.stream}"
            out[key] = max(out.get(key, 0), c.versions_behind(gen))
        return out

    def opened(self, stream: int, protocol: str) -> ClientSync:
        c = self.clients[stream] = ClientSync(stream, protocol=protocol, connected_at=time.time())
        return c

    def identify(self, stream: int, node: Any) -> None:
        """`node`: the envoy.config.core.v3.Node of a request (only the first carries it)."""
        c = self.clients.get(stream)
        if c is None or not node.id:
            return
        c.node = node.id
        c.client = node.user_agent_name or "unknown"
        c.client_version = node.user_agent_version

    def closed(self, stream: int) -> None:
        self.clients.pop(stream, None)
        self._awaiting.discard(stream)

    def sent(self, stream: int, type_url: str, version: str, nonce: str, nbytes: int, generation: int = 0) -> None:
        c = self.clients.get(stream)
        if c is None:
            return
        ts = c.type(type_url)
        ts.sent_version = version
        ts.responses += 1
        ts.bytes_sent += nbytes
        ts.pending[nonce] = (version, self._clock(), generation)
        self._awaiting.add(stream)
        while len(ts.pending) > MAX_PENDING:
            ts.pending.popitem(last=False)
        if self.observer is not None:
            self.observer.pushed(type_url, nbytes)

    def answered(self, stream: int, type_url: str, nonce: str, nack_reason: str | None) -> bool:
        """An ACK (nack_reason None) or NACK of response `nonce`. Returns False
        when the nonce is not one this stream is waiting on (stale)."""
        c = self.clients.get(stream)
        ts = c.types.get(type_url) if c is not None else None
        if c is None or ts is None:
            return False
        got = ts.pending.pop(nonce, None)
        if got is None:
            return False
        # Anything older than this nonce was superseded: the client answers in order.
        for old in [n for n in ts.pending if int(n) < int(nonce)] if nonce.isdigit() else []:
            del ts.pending[old]
        version, t0, generation = got
        if not ts.pending:
            ts.caught_up = max(ts.caught_up, generation)  # answered (ACK or NACK): nothing more in flight
            if not any(t.pending for t in c.types.values()):
                self._awaiting.discard(stream)
        if nack_reason is None:
            ts.acked_version = version
            ts.last_answer_nack = False
            if self.observer is not None:
                self.observer.acked(c.node, type_url, max(0.0, self._clock() - t0))
        else:
            ts.nacked_version = version
            ts.nack_reason = nack_reason
            ts.last_answer_nack = True
            if self.observer is not None:
                self.observer.nacked(c.node, type_url)
        return True

    def rows(self) -> list[dict[str, Any]]:
        """One row per client and type, for the API and `nodemesh get proxystatus`."""
        out = []
        for c in sorted(self.clients.values(), key=lambda c: (c.node, c.stream)):
            for type_url, ts in sorted(c.types.items()):
                out.append({
                    "node": c.node, "client": c.client, "client_version": c.client_version,
                    "protocol": c.protocol, "stream": c.stream,
                    "type": type_url.rsplit(".", 1)[-1], "state": ts.state,
                    "sent_version": ts.sent_version, "acked_version": ts.acked_version,
                    "nack_reason": ts.nack_reason if ts.last_answer_nack else "",
                    "nacked_version": ts.nacked_version if ts.last_answer_nack else "",
                    "pending": len(ts.pending), "responses": ts.responses, "bytes_sent": ts.bytes_sent,
                    "versions_behind": max(0, self.generation() - ts.caught_up),
                })
        return out

    def summary(self) -> dict[str, int]:
        """Clients by their worst type state."""
        out = {SYNCED: 0, STALE: 0, NACKED: 0}
        for c in self.clients.values():
            states = {t.state for t in c.types.values()}
            worst = NACKED if NACKED in states else STALE if STALE in states else SYNCED
            out[worst] += 1
        return out
