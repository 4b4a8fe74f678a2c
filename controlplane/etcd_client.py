"""etcd v3 through aetcd (an asyncio client speaking etcd's gRPC API), over TLS
with client certificates or, on loopback only, plaintext.

The client lives on an event loop of its own, in a thread ("etcd-io"): the
control plane's loop never waits on etcd. Its coroutines run there; other loops
await them with `run()`, and code off any event loop (startup, tests, worker
threads) blocks on them with `sync()`.

aetcd opens plaintext channels only, so `_TLSClient` opens the channel itself
(mutual TLS from the CA, certificate and key files) and keeps the rest of
aetcd's client; calls aetcd's helpers do not cover (a range at a revision,
counts, a txn whose answer keeps its header) go to its generated stubs.

Several endpoints may be given (IP addresses): gRPC connects to the first that
answers and moves on when it goes, so one etcd member going away does not stop
the control plane while the cluster keeps quorum.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Coroutine, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

import aetcd
import grpc
from aetcd import rpc

log = logging.getLogger("nodemesh.controlplane.etcd")

DEFAULT_TIMEOUT_S = 5.0
MAX_MESSAGE_BYTES = 32 * 1024 * 1024  # a whole prefix in one range; etcd's own request limit is 1.5 MiB
T = TypeVar("T")


class EtcdError(Exception):
    """etcd refused a request or answered with something unexpected."""


class EtcdUnavailable(EtcdError):
    """No endpoint could be reached."""


class EtcdCompacted(EtcdError):
    """A watch asked for revisions etcd has compacted away."""

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


def prefix_end(prefix: bytes) -> bytes:
    """The range_end that makes a range cover every key starting with `prefix`."""
    b = bytearray(prefix)
    for i in range(len(b) - 1, -1, -1):
        if b[i] < 0xFF:
            b[i] += 1
            return bytes(b[: i + 1])
    return b"\x00"  # every key


@dataclass(frozen=True)
class KeyValue:
    key: bytes
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int

    @classmethod
    def from_pb(cls, kv: Any) -> KeyValue:
        return cls(bytes(kv.key), bytes(kv.value), int(kv.create_revision), int(kv.mod_revision),
                   int(kv.version), int(kv.lease))


@dataclass(frozen=True)
class WatchEvent:
    type: str  # PUT | DELETE
    kv: KeyValue
    prev_kv: KeyValue | None


@dataclass(frozen=True)
class WatchBatch:
    """One watch response: the events of one or more whole revisions, and the
    revision etcd had sent everything up to."""

    events: tuple[WatchEvent, ...]
    revision: int


@dataclass(frozen=True)
class EtcdTLS:
    """Client TLS to etcd: the CA that signed etcd's server certificate, and this
    control plane's client certificate and key (etcd --client-cert-auth)."""

    ca_file: str
    cert_file: str
    key_file: str
    server_name: str = ""  # the name etcd's certificate must carry; default the first endpoint's host


# ------------------------------------------------------------------ txn building blocks

_TARGETS = {"MOD": rpc.Compare.MOD, "CREATE": rpc.Compare.CREATE, "VERSION": rpc.Compare.VERSION,
            "VALUE": rpc.Compare.VALUE, "LEASE": rpc.Compare.LEASE}
_RESULTS = {"EQUAL": rpc.Compare.EQUAL, "GREATER": rpc.Compare.GREATER, "LESS": rpc.Compare.LESS,
            "NOT_EQUAL": rpc.Compare.NOT_EQUAL}


def compare(key: bytes, target: str, result: str, value: int | bytes) -> Any:
    """A txn comparison: target MOD | CREATE | VERSION | VALUE | LEASE; result EQUAL | GREATER | LESS |
    NOT_EQUAL. A missing key compares as revision/version/lease 0."""
    c = rpc.Compare(key=key, target=_TARGETS[target], result=_RESULTS[result])
    if target == "VALUE":
        if not isinstance(value, bytes):
            raise TypeError(f"a VALUE comparison takes bytes, got {type(value).__name__}")
        c.value = value
    else:
        setattr(c, {"MOD": "mod_revision", "CREATE": "create_revision", "VERSION": "version",
                    "LEASE": "lease"}[target], int(value))
    return c


def put_op(key: bytes, value: bytes, lease: int = 0) -> Any:
    return rpc.RequestOp(request_put=rpc.PutRequest(key=key, value=value, lease=lease))


def delete_op(key: bytes, range_end: bytes | None = None) -> Any:
    return rpc.RequestOp(request_delete_range=rpc.DeleteRangeRequest(key=key, range_end=range_end or b""))


def range_op(key: bytes, range_end: bytes | None = None) -> Any:
    return rpc.RequestOp(request_range=rpc.RangeRequest(key=key, range_end=range_end or b""))


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int  # the store revision after the txn (its writes' mod_revision when it wrote)
    responses: tuple[Any, ...]

    def ranges(self) -> list[list[KeyValue]]:
        """The key-values of each range op, in order."""
        return [[KeyValue.from_pb(kv) for kv in r.response_range.kvs] for r in self.responses
                if r.WhichOneof("response") == "response_range"]


# ------------------------------------------------------------------ endpoints and TLS


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def grpc_target(endpoints: Sequence[str], tls: EtcdTLS | None) -> tuple[str, str]:
    """The gRPC target for `endpoints` and the host name etcd's certificate must carry.
    Raises ValueError saying what to change."""
    if not endpoints:
        raise ValueError("at least one etcd endpoint is needed (https://host:port)")
    hosts: list[tuple[str, int]] = []
    for ep in endpoints:
        u = urllib.parse.urlsplit(ep if "://" in ep else f"http://{ep}")
        if u.scheme not in ("http", "https") or not u.hostname:
            raise ValueError(f"etcd endpoint {ep!r} must read https://host:port (or http://127.0.0.1:port)")
        if u.scheme == "https" and tls is None:
            raise ValueError(f"etcd endpoint {ep!r} is https: give --etcd-ca, --etcd-cert and --etcd-key "
                             "(the CA of etcd's server certificate, this control plane's client certificate "
                             "and its key)")
        if u.scheme == "http" and tls is not None:
            raise ValueError(f"etcd endpoint {ep!r} is plain http but TLS files are given: write https://")
        if u.scheme == "http" and not _is_loopback(u.hostname):
            raise ValueError(f"etcd endpoint {ep!r}: plain HTTP to etcd is refused beyond loopback (anyone on "
                             "the path could read and rewrite the mesh's config); use https:// with "
                             "--etcd-ca, --etcd-cert and --etcd-key")
        hosts.append((u.hostname, u.port or 2379))
    if len(hosts) == 1:
        h, p = hosts[0]
        return (f"[{h}]:{p}" if ":" in h else f"{h}:{p}"), h
    for h, _ in hosts:
        try:
            ipaddress.ip_address(h)
        except ValueError:
            raise ValueError(f"several etcd endpoints must be IP addresses ({h!r} is not); or give one name "
                             "that resolves to every member") from None
    v6 = [":" in h for h, _ in hosts]
    if any(v6) and not all(v6):
        raise ValueError("etcd endpoints mix IPv4 and IPv6 addresses: give one family")
    if all(v6):
        return "ipv6:" + ",".join(f"[{h}]:{p}" for h, p in hosts), hosts[0][0]
    return "ipv4:" + ",".join(f"{h}:{p}" for h, p in hosts), hosts[0][0]


def _read(path: str, what: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read the etcd {what} {path}: {e.strerror}") from None


class _TLSClient(aetcd.Client):  # type: ignore[misc]
    """aetcd's client on a channel this module opens: mutual TLS when `creds` is
    given, message sizes raised for whole-prefix ranges."""

    def __init__(self, target: str, creds: grpc.ChannelCredentials | None, server_name: str,
                 timeout_s: float) -> None:
        super().__init__(timeout=timeout_s)
        self._target = target
        self._creds = creds
        self._server_name = server_name

    async def connect(self) -> None:
        if self._connected.is_set():
            return
        options: list[tuple[str, str | int]] = [
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                   ("grpc.keepalive_time_ms", 10_000), ("grpc.keepalive_timeout_ms", 5_000),
                   ("grpc.initial_reconnect_backoff_ms", 200), ("grpc.max_reconnect_backoff_ms", 2_000)]
        if self._creds is not None:
            options.append(("grpc.ssl_target_name_override", self._server_name))
            self.channel = rpc.secure_channel(self._target, self._creds, options=options)
        else:
            self.channel = rpc.insecure_channel(self._target, options=options)
        self.kvstub = rpc.KVStub(self.channel)
        self.clusterstub = rpc.ClusterStub(self.channel)
        self.leasestub = rpc.LeaseStub(self.channel)
        self.maintenancestub = rpc.MaintenanceStub(self.channel)
        self.watchstub = rpc.WatchStub(self.channel)
        self._watcher = None  # watches go to the stub directly (EtcdClient.watch): whole batches
        self._connected.set()


def _error(e: grpc.aio.AioRpcError, what: str) -> EtcdError:
    code = e.code()
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return EtcdUnavailable(f"cannot reach etcd for {what} ({code.name}: {e.details()}); check "
                               "--etcd-endpoints, the TLS files, and that etcd is running and reachable")
    return EtcdError(f"etcd refused {what} ({code.name}: {e.details()})")


# ------------------------------------------------------------------ the client


class EtcdClient:
    """One etcd cluster, through aetcd on the client's own event loop thread."""

    def __init__(self, endpoints: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S,
                 tls: EtcdTLS | None = None) -> None:
        target, host = grpc_target(endpoints, tls)
        creds = None
        if tls is not None:
            creds = grpc.ssl_channel_credentials(_read(tls.ca_file, "CA (--etcd-ca)"),
                                                 _read(tls.key_file, "client key (--etcd-key)"),
                                                 _read(tls.cert_file, "client certificate (--etcd-cert)"))
        self.endpoints = tuple(endpoints)
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="etcd-io", daemon=True)
        self._thread.start()
        self._closed = False
        self._aio: _TLSClient = self.sync(self._make(target, creds, (tls.server_name if tls else "") or host))

    async def _make(self, target: str, creds: grpc.ChannelCredentials | None, name: str) -> _TLSClient:
        c = _TLSClient(target, creds, name, self.timeout_s)
        await c.connect()
        return c

    # ---------------------------------------------------------- running on the etcd loop

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self._loop

    def on_io_thread(self) -> bool:
        return threading.current_thread() is self._thread

    def submit(self, coro: Coroutine[Any, Any, T]) -> Future[T]:
        if self._closed:
            coro.close()
            raise EtcdError("the etcd client is closed")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def sync(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` on the etcd loop and wait for it: for code off any event loop."""
        if self.on_io_thread():
            coro.close()
            raise RuntimeError("EtcdClient.sync() called on the etcd loop itself: await the coroutine")
        return self.submit(coro).result()

    async def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await `coro` run on the etcd loop, from any other loop."""
        if self.on_io_thread():
            return await coro
        return await asyncio.wrap_future(self.submit(coro))

    def close(self) -> None:
        if self._closed:
            return
        with_timeout: Awaitable[None] = asyncio.wait_for(self._aio.close(), 2)
        try:
            self.submit(with_timeout).result(3)  # type: ignore[arg-type]
        except Exception as e:  # noqa: BLE001 - closing anyway
            log.debug("closing the etcd channel: %s", e)
        self._closed = True
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(3)

    # ---------------------------------------------------------- KV (coroutines for the etcd loop)

    async def range(self, key: bytes, range_end: bytes | None = None, *, limit: int = 0, revision: int = 0,
                    descending: bool = False, keys_only: bool = False, count_only: bool = False,
                    sort_target: str = "KEY") -> tuple[list[KeyValue], int, int]:
        """Key-values in [key, range_end) (just `key` without range_end), sorted by key
        (or by `sort_target` MOD/CREATE/VERSION when descending); returns (kvs, store revision, count)."""
        req = rpc.RangeRequest(key=key, range_end=range_end or b"", limit=limit, revision=revision,
                               keys_only=keys_only, count_only=count_only)
        if descending:
            req.sort_order = rpc.RangeRequest.DESCEND
            req.sort_target = getattr(rpc.RangeRequest, sort_target)
        try:
            resp = await self._aio.kvstub.Range(req, timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _error(e, "a read") from None
        return [KeyValue.from_pb(kv) for kv in resp.kvs], int(resp.header.revision), int(resp.count)

    async def get(self, key: bytes) -> tuple[KeyValue | None, int]:
        kvs, rev, _ = await self.range(key)
        return (kvs[0] if kvs else None), rev

    async def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        try:
            resp = await self._aio.kvstub.Put(rpc.PutRequest(key=key, value=value, lease=lease),
                                              timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _error(e, "a write") from None
        return int(resp.header.revision)

    async def delete_range(self, key: bytes, range_end: bytes | None = None) -> tuple[int, int]:
        try:
            resp = await self._aio.kvstub.DeleteRange(rpc.DeleteRangeRequest(key=key, range_end=range_end or b""),
                                                      timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _error(e, "a delete") from None
        return int(resp.deleted), int(resp.header.revision)

    async def txn(self, compares: Sequence[Any], success: Sequence[Any], failure: Sequence[Any] = ()) -> TxnResult:
        try:
            resp = await self._aio.kvstub.Txn(rpc.TxnRequest(compare=list(compares), success=list(success),
                                                             failure=list(failure)), timeout=self.timeout_s)
        except grpc.aio.AioRpcError as e:
            raise _error(e, "a transaction") from None
        return TxnResult(bool(resp.succeeded), int(resp.header.revision), tuple(resp.responses))

    async def revision(self) -> int:
        _, rev, _ = await self.range(b"\x00", count_only=True)
        return rev

    # ---------------------------------------------------------- leases

    async def lease_grant(self, ttl_s: int) -> int:
        try:
            lease = await self._aio.lease(max(1, int(ttl_s)))
        except (aetcd.ClientError, grpc.aio.AioRpcError) as e:
            raise EtcdUnavailable(f"etcd refused a lease of {ttl_s}s: {e}") from None
        return int(lease.id)

    async def lease_keepalive(self, lease_id: int) -> int:
        """Renew a lease once; returns its TTL, 0 when it no longer exists."""
        try:
            reply = await self._aio.refresh_lease(lease_id)
        except (aetcd.ClientError, grpc.aio.AioRpcError) as e:
            raise EtcdUnavailable(f"cannot renew etcd lease {lease_id:x}: {e}") from None
        return int(reply.TTL) if reply is not None else 0

    async def lease_revoke(self, lease_id: int) -> None:
        try:
            await self._aio.revoke_lease(lease_id)
        except (aetcd.ClientError, grpc.aio.AioRpcError) as e:
            if "not found" not in str(e):
                raise EtcdError(f"cannot revoke etcd lease {lease_id:x}: {e}") from None

    # ---------------------------------------------------------- watch

    async def watch(self, key: bytes, range_end: bytes | None, start_revision: int) -> AsyncIterator[WatchBatch]:
        """Changes to [key, range_end) from `start_revision`, batch by batch (on the
        etcd loop). No progress notifications: etcd 3.4 (Debian's) may send one
        ahead of events it has not sent yet, so only events say how far a watch is."""
        requests: asyncio.Queue[Any] = asyncio.Queue()
        requests.put_nowait(rpc.WatchRequest(create_request=rpc.WatchCreateRequest(
            key=key, range_end=range_end or b"", start_revision=start_revision, prev_kv=True)))

        async def outgoing() -> AsyncIterator[Any]:
            while True:
                yield await requests.get()

        call = self._aio.watchstub.Watch(outgoing())
        try:
            async for resp in call:
                if resp.compact_revision:
                    raise EtcdCompacted(f"etcd has compacted revisions up to {resp.compact_revision}",
                                        int(resp.compact_revision))
                if resp.canceled:
                    raise EtcdError(f"etcd canceled the watch: {resp.cancel_reason or 'no reason given'}")
                if not resp.events:
                    continue  # created, or a progress notification: nothing to go by
                yield WatchBatch(tuple(WatchEvent("DELETE" if ev.type == rpc.Event.DELETE else "PUT",
                                                  KeyValue.from_pb(ev.kv),
                                                  KeyValue.from_pb(ev.prev_kv) if ev.HasField("prev_kv") else None)
                                       for ev in resp.events), int(resp.header.revision))
        except grpc.aio.AioRpcError as e:
            raise _error(e, "a watch") from None
        finally:
            call.cancel()
        raise EtcdUnavailable("etcd closed the watch stream")


# ------------------------------------------------------------------ a one-member etcd for the lab and tests


@dataclass(frozen=True)
class EtcdCerts:
    """Files of a small PKI for etcd: its CA, a server certificate for 127.0.0.1 /
    localhost (and any extra IPs), and a client certificate for the control plane."""

    ca: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str

    def tls(self) -> EtcdTLS:
        return EtcdTLS(self.ca, self.client_cert, self.client_key)


def make_etcd_certs(directory: str, ips: Sequence[str] = ("127.0.0.1",)) -> EtcdCerts:
    """Generate etcd's CA, server and client certificates in `directory` (keys 0600)."""
    import datetime
    import os

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    os.makedirs(directory, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(fname: str, data: bytes, private: bool = False) -> str:
        path = os.path.join(directory, fname)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        return path

    def key_pem(k: ec.EllipticCurvePrivateKey) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = (x509.CertificateBuilder().subject_name(name("nodemesh etcd CA")).issuer_name(name("nodemesh etcd CA"))
          .public_key(ca_key.public_key()).serial_number(x509.random_serial_number())
          .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=365))
          .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
          .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                       content_commitment=False, key_encipherment=False, data_encipherment=False,
                                       key_agreement=False, encipher_only=False, decipher_only=False), critical=True)
          .sign(ca_key, hashes.SHA256()))

    def leaf(cn: str, usage: Any, sans: list[x509.GeneralName]) -> tuple[bytes, bytes]:
        k = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca.subject).public_key(k.public_key())
             .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=365))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage(usage), critical=False))
        if sans:
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return b.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM), key_pem(k)

    server_sans: list[x509.GeneralName] = [x509.DNSName("localhost")]
    server_sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ips]
    s_cert, s_key = leaf("etcd", [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], server_sans)
    c_cert, c_key = leaf("nodemesh-controlplane", [ExtendedKeyUsageOID.CLIENT_AUTH], [])
    return EtcdCerts(write("ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
                     write("server.pem", s_cert), write("server.key", s_key, private=True),
                     write("client.pem", c_cert), write("client.key", c_key, private=True))


def single_member_argv(data_dir: str, host: str = "127.0.0.1", client_port: int = 2379,
                       peer_port: int = 2380, etcd: str = "etcd", certs: EtcdCerts | None = None) -> list[str]:
    """The command line of a one-member etcd cluster (Debian's etcd-server) for a
    development machine, the lab and the tests; production runs its own cluster.
    With `certs`, clients must come over TLS with a certificate that CA signed."""
    scheme = "https" if certs else "http"
    client, peer = f"{scheme}://{host}:{client_port}", f"http://{host}:{peer_port}"
    argv = [etcd, "--name", "nodemesh", "--data-dir", data_dir, "--listen-client-urls", client,
            "--advertise-client-urls", client, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"nodemesh={peer}", "--initial-cluster-state", "new", "--log-level", "warn",
            "--logger", "zap"]
    if certs:
        argv += ["--cert-file", certs.server_cert, "--key-file", certs.server_key, "--trusted-ca-file", certs.ca,
                 "--client-cert-auth"]
    return argv


def wait_ready(endpoint: str, timeout_s: float = 20.0, tls: EtcdTLS | None = None) -> None:
    """Block until etcd at `endpoint` answers a read, or raise EtcdUnavailable."""
    import time

    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    client = EtcdClient([endpoint], timeout_s=1.0, tls=tls)
    try:
        while time.monotonic() < deadline:
            try:
                client.sync(client.revision())
                return
            except EtcdError as e:
                last = e
                time.sleep(0.1)
    finally:
        client.close()
    raise EtcdUnavailable(f"etcd at {endpoint} did not answer within {timeout_s:.0f}s: {last}")
