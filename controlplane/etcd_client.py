"""A small etcd v3 client over etcd's JSON gateway (/v3/kv/*, /v3/watch,
/v3/lease/*), with only the standard library's http.client.

etcd's gateway speaks the v3 gRPC API as JSON: keys and values are base64,
64-bit integers are strings, zero values are omitted. Calls are blocking and
short (the control plane makes them from its event loop, like its SQLite
calls); a watch is a long-lived chunked response read in a thread of its own.

Several endpoints may be given: a call goes to the last one that answered and
moves on to the next when a connection fails, so one etcd member going away
does not stop the control plane while the cluster keeps quorum.
"""

from __future__ import annotations

import base64
import http.client
import json
import socket
import threading
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

DEFAULT_TIMEOUT_S = 5.0


class EtcdError(Exception):
    """etcd refused a request or answered with something unexpected."""


class EtcdUnavailable(EtcdError):
    """No endpoint could be reached."""


class EtcdCompacted(EtcdError):
    """A watch asked for revisions etcd has compacted away."""

    def __init__(self, message: str, compact_revision: int) -> None:
        super().__init__(message)
        self.compact_revision = compact_revision


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def _unb64(text: str | None) -> bytes:
    return base64.b64decode(text) if text else b""


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
    def from_json(cls, d: dict[str, Any]) -> KeyValue:
        return cls(key=_unb64(d.get("key")), value=_unb64(d.get("value")),
                   create_revision=int(d.get("create_revision", 0)), mod_revision=int(d.get("mod_revision", 0)),
                   version=int(d.get("version", 0)), lease=int(d.get("lease", 0)))


@dataclass(frozen=True)
class WatchEvent:
    type: str  # PUT | DELETE
    kv: KeyValue
    prev_kv: KeyValue | None


# ------------------------------------------------------------------ txn building blocks

def compare(key: bytes, target: str, result: str, value: int | bytes) -> dict[str, Any]:
    """A txn comparison: target MOD | CREATE | VERSION | VALUE | LEASE; result EQUAL | GREATER | LESS |
    NOT_EQUAL. A missing key compares as revision/version/lease 0."""
    field = {"MOD": "mod_revision", "CREATE": "create_revision", "VERSION": "version",
             "VALUE": "value", "LEASE": "lease"}[target]
    v: Any = _b64(value) if isinstance(value, bytes) else str(int(value))
    return {"key": _b64(key), "target": target, "result": result, field: v}


def put_op(key: bytes, value: bytes, lease: int = 0) -> dict[str, Any]:
    body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
    if lease:
        body["lease"] = str(lease)
    return {"request_put": body}


def delete_op(key: bytes, range_end: bytes | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"key": _b64(key)}
    if range_end is not None:
        body["range_end"] = _b64(range_end)
    return {"request_delete_range": body}


def range_op(key: bytes, range_end: bytes | None = None) -> dict[str, Any]:
    body: dict[str, Any] = {"key": _b64(key)}
    if range_end is not None:
        body["range_end"] = _b64(range_end)
    return {"request_range": body}


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int  # the store revision after the txn (its writes' mod_revision when it wrote)
    responses: list[dict[str, Any]]

    def ranges(self) -> list[list[KeyValue]]:
        """The key-values of each range op, in order."""
        out = []
        for r in self.responses:
            if "response_range" in r:
                out.append([KeyValue.from_json(kv) for kv in r["response_range"].get("kvs", [])])
        return out


# ------------------------------------------------------------------ the client

class EtcdClient:
    """Blocking calls to one etcd cluster. Safe to share between threads (each
    thread keeps its own HTTP connection)."""

    def __init__(self, endpoints: Sequence[str], timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        if not endpoints:
            raise ValueError("at least one etcd endpoint is needed (http://host:port)")
        self._endpoints: list[tuple[str, int]] = []
        for ep in endpoints:
            u = urllib.parse.urlsplit(ep if "://" in ep else f"http://{ep}")
            if u.scheme != "http" or not u.hostname:
                raise ValueError(f"etcd endpoint {ep!r} must read http://host:port (TLS to etcd is not "
                                 "supported yet: keep etcd on loopback or a private network)")
            self._endpoints.append((u.hostname, u.port or 2379))
        self.endpoints = tuple(endpoints)
        self._timeout = timeout_s
        self._preferred = 0
        self._local = threading.local()
        self._closed = False

    # ---------------------------------------------------------- transport

    def _conn(self, i: int) -> http.client.HTTPConnection:
        conns: dict[int, http.client.HTTPConnection] = self._local.__dict__.setdefault("conns", {})
        c = conns.get(i)
        if c is None:
            host, port = self._endpoints[i]
            c = conns[i] = http.client.HTTPConnection(host, port, timeout=self._timeout)
        return c

    def _drop(self, i: int) -> None:
        conns: dict[int, http.client.HTTPConnection] = self._local.__dict__.setdefault("conns", {})
        c = conns.pop(i, None)
        if c is not None:
            c.close()

    def call(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST `body` to /v3/<path> and return the decoded answer."""
        if self._closed:
            raise EtcdError("the etcd client is closed")
        data = json.dumps(body).encode()
        errors = []
        n = len(self._endpoints)
        for attempt in range(n + 1):  # a reused keep-alive connection may have gone stale: one more try
            i = (self._preferred + attempt) % n if attempt < n else self._preferred
            try:
                c = self._conn(i)
                c.request("POST", f"/v3/{path}", body=data, headers={"Content-Type": "application/json"})
                resp = c.getresponse()
                raw = resp.read()
            except (OSError, http.client.HTTPException) as e:
                self._drop(i)
                host, port = self._endpoints[i]
                errors.append(f"{host}:{port}: {e or type(e).__name__}")
                continue
            self._preferred = i
            try:
                answer = json.loads(raw or b"{}")
            except ValueError:
                raise EtcdError(f"etcd answered /v3/{path} with something that is not JSON "
                                f"(HTTP {resp.status}): {raw[:200]!r}") from None
            if resp.status != 200 or "error" in answer and "header" not in answer:
                raise EtcdError(f"etcd refused /v3/{path} (HTTP {resp.status}): "
                                f"{answer.get('message') or answer.get('error') or raw[:200]!r}")
            assert isinstance(answer, dict)
            return answer
        raise EtcdUnavailable(f"cannot reach etcd ({'; '.join(errors)}); check --etcd-endpoints and that "
                              "etcd is running and reachable from this host")

    def close(self) -> None:
        self._closed = True
        for c in self._local.__dict__.get("conns", {}).values():
            c.close()

    # ---------------------------------------------------------- KV

    @staticmethod
    def _revision(answer: dict[str, Any]) -> int:
        return int(answer.get("header", {}).get("revision", 0))

    def range(self, key: bytes, range_end: bytes | None = None, *, limit: int = 0, revision: int = 0,
              descending: bool = False, keys_only: bool = False, count_only: bool = False,
              sort_target: str = "KEY") -> tuple[list[KeyValue], int, int]:
        """Key-values in [key, range_end) (just `key` without range_end), sorted by key
        (or by `sort_target` MOD/CREATE/VERSION when descending); returns (kvs, store revision, count)."""
        body: dict[str, Any] = {"key": _b64(key)}
        if range_end is not None:
            body["range_end"] = _b64(range_end)
        if limit:
            body["limit"] = str(limit)
        if revision:
            body["revision"] = str(revision)
        if descending:
            body["sort_order"] = "DESCEND"
            body["sort_target"] = sort_target
        if keys_only:
            body["keys_only"] = True
        if count_only:
            body["count_only"] = True
        a = self.call("kv/range", body)
        return ([KeyValue.from_json(kv) for kv in a.get("kvs", [])], self._revision(a), int(a.get("count", 0)))

    def get(self, key: bytes) -> tuple[KeyValue | None, int]:
        kvs, rev, _ = self.range(key)
        return (kvs[0] if kvs else None), rev

    def put(self, key: bytes, value: bytes, lease: int = 0) -> int:
        body: dict[str, Any] = {"key": _b64(key), "value": _b64(value)}
        if lease:
            body["lease"] = str(lease)
        return self._revision(self.call("kv/put", body))

    def delete_range(self, key: bytes, range_end: bytes | None = None) -> tuple[int, int]:
        body: dict[str, Any] = {"key": _b64(key)}
        if range_end is not None:
            body["range_end"] = _b64(range_end)
        a = self.call("kv/deleterange", body)
        return int(a.get("deleted", 0)), self._revision(a)

    def txn(self, compares: Sequence[dict[str, Any]], success: Sequence[dict[str, Any]],
            failure: Sequence[dict[str, Any]] = ()) -> TxnResult:
        a = self.call("kv/txn", {"compare": list(compares), "success": list(success), "failure": list(failure)})
        return TxnResult(bool(a.get("succeeded", False)), self._revision(a), list(a.get("responses", [])))

    def revision(self) -> int:
        _, rev, _ = self.range(b"\x00", count_only=True)
        return rev

    # ---------------------------------------------------------- leases

    def lease_grant(self, ttl_s: int) -> int:
        a = self.call("lease/grant", {"TTL": str(max(1, int(ttl_s)))})
        if a.get("error"):
            raise EtcdError(f"etcd refused a lease of {ttl_s}s: {a['error']}")
        return int(a["ID"])

    def lease_keepalive(self, lease_id: int) -> int:
        """Renew a lease once; returns its TTL, 0 when it no longer exists."""
        a = self.call("lease/keepalive", {"ID": str(lease_id)})
        return int(a.get("result", a).get("TTL", 0))

    def lease_revoke(self, lease_id: int) -> None:
        try:
            self.call("lease/revoke", {"ID": str(lease_id)})
        except EtcdError as e:
            if "not found" not in str(e):
                raise

    # ---------------------------------------------------------- watch

    def watch(self, key: bytes, range_end: bytes | None = None, start_revision: int = 0) -> Watch:
        """Changes to [key, range_end) from `start_revision` (0: from now on)."""
        return Watch(self, key, range_end, start_revision)


class Watch:
    """One etcd watch: a chunked POST /v3/watch whose answer is a stream of JSON
    objects, one per line. Iterate for batches of events (one batch holds
    the events of one or more revisions, in order); close() from any thread."""

    def __init__(self, client: EtcdClient, key: bytes, range_end: bytes | None, start_revision: int) -> None:
        create: dict[str, Any] = {"key": _b64(key), "prev_kv": True}
        if range_end is not None:
            create["range_end"] = _b64(range_end)
        if start_revision:
            create["start_revision"] = str(start_revision)
        self._body = json.dumps({"create_request": create}).encode()
        self._client = client
        self._conn: http.client.HTTPConnection | None = None
        self._resp: http.client.HTTPResponse | None = None
        self._closed = False

    def _open(self) -> http.client.HTTPResponse:
        errors = []
        for host, port in self._client._endpoints:
            # No read timeout: a quiet watch is normal. close() ends a blocked read.
            c = http.client.HTTPConnection(host, port, timeout=self._client._timeout)
            try:
                c.request("POST", "/v3/watch", body=self._body, headers={"Content-Type": "application/json"})
                resp = c.getresponse()
                if c.sock is not None:
                    c.sock.settimeout(None)
            except (OSError, http.client.HTTPException) as e:
                c.close()
                errors.append(f"{host}:{port}: {e}")
                continue
            if resp.status != 200:
                c.close()
                raise EtcdError(f"etcd refused the watch (HTTP {resp.status})")
            self._conn = c
            return resp
        raise EtcdUnavailable(f"cannot open an etcd watch ({'; '.join(errors)}); check --etcd-endpoints "
                              "and that etcd is running")

    def __iter__(self) -> Iterator[list[WatchEvent]]:
        resp = self._resp = self._open()
        if self._closed:
            return
        while not self._closed:
            try:
                line = resp.readline()
            except (OSError, ValueError, http.client.HTTPException) as e:
                if self._closed:
                    return
                raise EtcdUnavailable(f"the etcd watch broke: {e}") from None
            if not line:
                if self._closed:
                    return
                raise EtcdUnavailable("etcd closed the watch stream")
            line = line.strip()
            if not line:
                continue
            msg = json.loads(line)
            if "error" in msg:
                raise EtcdError(f"etcd ended the watch: {msg['error'].get('message', msg['error'])}")
            result = msg.get("result", {})
            compact = int(result.get("compact_revision", 0))
            if compact:
                raise EtcdCompacted(f"etcd has compacted revisions up to {compact}", compact)
            if result.get("canceled"):
                raise EtcdError(f"etcd canceled the watch: {result.get('cancel_reason', 'no reason given')}")
            events = [WatchEvent(e.get("type", "PUT"), KeyValue.from_json(e["kv"]),
                                 KeyValue.from_json(e["prev_kv"]) if "prev_kv" in e else None)
                      for e in result.get("events", [])]
            if events:
                yield events

    def close(self) -> None:
        self._closed = True
        conn = self._conn
        if conn is not None and conn.sock is not None:
            try:
                conn.sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if conn is not None:
            conn.close()


def single_member_argv(data_dir: str, host: str = "127.0.0.1", client_port: int = 2379,
                       peer_port: int = 2380, etcd: str = "etcd") -> list[str]:
    """The command line of a one-member etcd cluster (Debian's etcd-server) for a
    development machine, the lab and the tests; production runs its own cluster."""
    client, peer = f"http://{host}:{client_port}", f"http://{host}:{peer_port}"
    return [etcd, "--name", "nodemesh", "--data-dir", data_dir, "--listen-client-urls", client,
            "--advertise-client-urls", client, "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
            "--initial-cluster", f"nodemesh={peer}", "--initial-cluster-state", "new", "--log-level", "warn",
            "--logger", "zap"]


def wait_ready(endpoint: str, timeout_s: float = 20.0) -> None:
    """Block until etcd at `endpoint` answers a read, or raise EtcdUnavailable."""
    import time

    client = EtcdClient([endpoint], timeout_s=1.0)
    deadline = time.monotonic() + timeout_s
    last: Exception | None = None
    try:
        while time.monotonic() < deadline:
            try:
                client.revision()
                return
            except EtcdError as e:
                last = e
                time.sleep(0.1)
    finally:
        client.close()
    raise EtcdUnavailable(f"etcd at {endpoint} did not answer within {timeout_s:.0f}s: {last}")
