"""The one helper that opens the agent's gRPC channels to the control plane.

TCP: TLS, verifying the control plane's server certificate with its CA (from
the join or controlPlane.caBundleFile) and presenting the node certificate
(nodeagent/identity/attest.py). A unix socket is the control plane's local-admin
transport: plaintext, used by an agent on the control plane's own host.
The registry session, the certificate manager and the xDS client all call
`open_channel`; a renewed node certificate is used by channels opened after it.
The registry session and the xDS client keep their stream up with the one
reconnect loop here (`keep_connected`).
"""

from __future__ import annotations

import asyncio
import logging
import random
from abc import ABC, abstractmethod
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import ClassVar

import grpc

log = logging.getLogger(__name__)

BACKOFF_INITIAL_S = 0.2
BACKOFF_CAP_S = 5.0

# Set on purpose, matching the control plane (controlplane/xds/server.py): its
# Delta responses are split near 1 MiB, a state-of-the-world type or a single
# resource may be larger in a big mesh; gRPC's 4 MiB default made every agent
# fail with RESOURCE_EXHAUSTED and reconnect in a loop once a mesh outgrew it.
MAX_RECEIVE_BYTES = 64 * 1024 * 1024
MAX_SEND_BYTES = 16 * 1024 * 1024
CHANNEL_OPTIONS: tuple[tuple[str, int], ...] = (("grpc.max_receive_message_length", MAX_RECEIVE_BYTES),
                                                 ("grpc.max_send_message_length", MAX_SEND_BYTES))


class CpChannelError(RuntimeError):
    """No channel can be opened yet; the message says what is missing."""


@dataclass(frozen=True)
class NodeCredentials:
    server_ca_pem: bytes  # verifies the control plane's server certificate
    cert_chain_pem: bytes  # the node certificate, leaf first
    key_pem: bytes = field(repr=False)  # never in a log line or traceback that prints the object


_current: NodeCredentials | None = None
_generation = 0
_plaintext_tcp = False  # only for in-process tests against a plaintext fake server


def allow_plaintext_tcp(allow: bool = True) -> None:
    """Tests of the xDS, registry and certificate clients against plaintext fakes
    call this; the agent never does (it installs a node certificate first)."""
    global _plaintext_tcp
    _plaintext_tcp = allow


def configure(creds: NodeCredentials | None) -> None:
    """Install (or replace, after a renewal) the node's credentials."""
    global _current, _generation
    _current = creds
    _generation += 1


def generation() -> int:
    """Bumps at every configure(): a holder of a long-lived channel reopens it."""
    return _generation


def credentials() -> NodeCredentials | None:
    return _current


def open_channel(target: str) -> grpc.aio.Channel:
    if target.startswith("unix:"):
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    creds = _current
    if creds is None and _plaintext_tcp:
        return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
    if creds is None:
        raise CpChannelError(f"no node certificate yet for the control plane at {target}: the agent must join "
                             "first (controlPlane.joinTokenFile)")
    options: list[tuple[str, str | int]] = list(CHANNEL_OPTIONS)
    if target.startswith("ipv4:") and "," in target:
        # Several replicas (controlPlane.addresses): gRPC's authority would be the whole
        # list, so verify every replica's server certificate for the first address's
        # host (each replica lists it, e.g. with --san, docs/reference.md).
        options.append(("grpc.ssl_target_name_override", target[len("ipv4:"):].split(",")[0].rpartition(":")[0]))
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(
        root_certificates=creds.server_ca_pem, private_key=creds.key_pem, certificate_chain=creds.cert_chain_pem),
        options=options)


def open_join_channel(target: str, server_ca_pem: bytes) -> grpc.aio.Channel:
    """TLS without a client certificate: only NodeAttestation.Join accepts it."""
    return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(root_certificates=server_ca_pem))


def backoff_delay(attempt: int, initial: float = BACKOFF_INITIAL_S, cap: float = BACKOFF_CAP_S,
                  rand: Callable[[], float] = random.random) -> float:
    """Delay before reconnect number `attempt` (0-based): doubling up to `cap`,
    then scaled into [50%, 100%] so that many agents do not reconnect in step."""
    base = min(cap, initial * float(2 ** min(attempt, 30)))
    return base * (0.5 + 0.5 * rand())


async def keep_connected(session: Callable[[], Awaitable[bool]], ended: Callable[[str, float], None], *,
                         what: str, closed_reason: str = "the control plane closed the stream",
                         on_rpc_error: Callable[[grpc.aio.AioRpcError], None] | None = None,
                         backoff_initial_s: float = BACKOFF_INITIAL_S, backoff_cap_s: float = BACKOFF_CAP_S,
                         sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
    """Run `session()` (one stream to the control plane; returns whether it got
    anywhere, e.g. a response or a lease) again and again until cancelled. After
    each end, `ended(reason, delay)` is told why and how long until the next try
    (the caller logs and updates its state); the delay backs off exponentially
    with jitter, and starts over once a session got anywhere."""
    attempt = 0
    while True:
        progressed = False
        try:
            progressed = await session()
            reason = closed_reason
        except grpc.aio.AioRpcError as e:
            reason = f"{e.code().name}: {e.details()}"
            if on_rpc_error is not None:
                on_rpc_error(e)
        except (OSError, ConnectionError, CpChannelError) as e:
            reason = str(e)
        except asyncio.CancelledError:
            raise
        except Exception as e:  # noqa: BLE001 - a bug must not end the agent's link to the control plane for good
            log.exception("%s: unexpected error in the session with the control plane", what)
            reason = f"internal error: {e!r}"
        if progressed:
            attempt = 0
        delay = backoff_delay(attempt, backoff_initial_s, backoff_cap_s)
        attempt += 1
        ended(reason, delay)
        await sleep(delay)


class KeptSession(ABC):
    """A stream to the control plane kept up by `keep_connected` (the registry
    session, the xDS client): whether it is up now, and `on_connection` told of
    each change. A subclass supplies one session and what to do when it ends."""

    what: ClassVar[str]  # names the stream in log lines
    closed_reason: ClassVar[str] = "the control plane closed the stream"

    def __init__(self, *, on_connection: Callable[[bool], None] | None,
                 backoff_initial_s: float, backoff_cap_s: float) -> None:
        self.connected = False
        self._on_connection = on_connection
        self._backoff_initial = backoff_initial_s
        self._backoff_cap = backoff_cap_s

    def _set_connected(self, value: bool) -> None:
        if value != self.connected:
            self.connected = value
            if self._on_connection:
                self._on_connection(value)

    async def run(self) -> None:
        """Keep the stream open until cancelled."""
        await keep_connected(self._session, self._ended, what=self.what, closed_reason=self.closed_reason,
                             on_rpc_error=self._rpc_error, backoff_initial_s=self._backoff_initial,
                             backoff_cap_s=self._backoff_cap)

    @abstractmethod
    async def _session(self) -> bool:
        """One stream; returns whether it got anywhere (the backoff starts over)."""

    @abstractmethod
    def _ended(self, reason: str, delay: float) -> None:
        """The stream ended for `reason`; the next try is in `delay` seconds."""

    def _rpc_error(self, e: grpc.aio.AioRpcError) -> None:
        """The stream ended with this gRPC status (told before `_ended`, which logs the reason)."""
        log.debug("%s stream ended with %s", self.what, e.code().name)
