"""Zero-copy relay for two plain TCP sockets: os.splice through a pipe per
direction, driven by the event loop's readiness callbacks.

Used where both ends of a relayed connection are plain TCP and nobody needs
to see the bytes (plaintext passthrough, a same-node L4 hop): the payload
moves socket -> pipe -> socket inside the kernel, never copied into Python.
Each pipe is grown to PIPE_SIZE with F_SETPIPE_SZ so one splice moves up to
that much. Back-pressure is the kernel's: a direction whose pipe cannot be
emptied into a full destination socket stops reading its source until the
destination is writable again. EOF travels as shutdown(SHUT_WR) once the
pipe is drained; an error or reset on either socket closes both at once, as the
Protocol relay does (transport.abort()).

The handover from the asyncio transports (relay.TcpEnd.attach) happens only
when both transports have nothing buffered: the sockets are duplicated, the
transports closed (which closes only their descriptors: uvloop does not
shut a socket down on close), and this relay owns the duplicates.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import logging
import os
import socket
from collections.abc import Callable

log = logging.getLogger(__name__)

PIPE_SIZE = 1 << 20
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
_FLAGS = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK if hasattr(os, "splice") else 0
AVAILABLE = hasattr(os, "splice")


def _pipe() -> tuple[int, int]:
    r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    # Over /proc/sys/fs/pipe-max-size for an unprivileged worker: the default 64 KiB works too.
    with contextlib.suppress(OSError):
        fcntl.fcntl(w, F_SETPIPE_SZ, PIPE_SIZE)
    return r, w


class _Direction:
    """src -> pipe -> dst."""

    __slots__ = (
        "count",
        "dst",
        "dst_sock",
        "eof",
        "pipe_r",
        "pipe_w",
        "queued",
        "reading",
        "relay",
        "src",
        "writing",
    )

    def __init__(self, relay: SpliceRelay, src: socket.socket, dst: socket.socket,
                 count: Callable[[int], None]) -> None:
        self.relay = relay
        self.src = src.fileno()
        self.dst = dst.fileno()
        self.dst_sock = dst
        self.count = count
        self.pipe_r, self.pipe_w = _pipe()
        self.queued = 0  # bytes in the pipe
        self.eof = False
        self.reading = False
        self.writing = False

    def start(self) -> None:
        self._want_read(True)

    def _want_read(self, on: bool) -> None:
        if on != self.reading:
            self.reading = on
            if on:
                self.relay.loop.add_reader(self.src, self.on_readable)
            else:
                self.relay.loop.remove_reader(self.src)

    def _want_write(self, on: bool) -> None:
        if on != self.writing:
            self.writing = on
            if on:
                self.relay.loop.add_writer(self.dst, self.on_writable)
            else:
                self.relay.loop.remove_writer(self.dst)

    def on_readable(self) -> None:
        try:
            n = os.splice(self.src, self.pipe_w, PIPE_SIZE, flags=_FLAGS)
        except BlockingIOError:
            return
        except OSError as e:
            self.relay.fail(e)
            return
        if n == 0:
            self.eof = True
            self._want_read(False)
            self.relay.half_closed(self)
            if not self.queued:
                self._send_eof()
            return
        self.queued += n
        self.count(n)
        self.relay.moved()
        self.on_writable()

    def on_writable(self) -> None:
        while self.queued:
            try:
                n = os.splice(self.pipe_r, self.dst, self.queued, flags=_FLAGS)
            except BlockingIOError:
                # The destination is full: stop reading the source until it drains.
                self._want_read(False)
                self._want_write(True)
                return
            except OSError as e:
                self.relay.fail(e)
                return
            if n == 0:
                break
            self.queued -= n
        self._want_write(False)
        if self.eof:
            self._send_eof()
        elif not self.relay.closed:
            self._want_read(True)

    def _send_eof(self) -> None:
        with contextlib.suppress(OSError):
            self.dst_sock.shutdown(socket.SHUT_WR)
        self.relay.eof_sent(self)

    def stop(self) -> None:
        self._want_read(False)
        self._want_write(False)
        for fd in (self.pipe_r, self.pipe_w):
            os.close(fd)


class SpliceRelay:
    """Owns two connected TCP sockets (non-blocking) and relays between them."""

    def __init__(self, a: socket.socket, b: socket.socket, count_a_to_b: Callable[[int], None],
                 count_b_to_a: Callable[[int], None], on_done: Callable[[str], None],
                 loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.socks = (a, b)
        for s in self.socks:
            s.setblocking(False)
        self.on_done = on_done
        self.on_activity: Callable[[], None] | None = None
        self.closed = False
        self._eofs = 0
        self.ab = _Direction(self, a, b, count_a_to_b)
        self.ba = _Direction(self, b, a, count_b_to_a)

    def start(self) -> None:
        self.ab.start()
        self.ba.start()

    def moved(self) -> None:
        if self.on_activity is not None:
            self.on_activity()

    def half_closed(self, d: _Direction) -> None:
        pass

    def eof_sent(self, d: _Direction) -> None:
        self._eofs += 1
        if self._eofs == 2:
            self._finish("")

    def fail(self, e: OSError) -> None:
        """A reset or a write to a closed peer: both sides go, the other with a reset."""
        self.abort(f"connection reset: {e}" if e.errno != errno.EPIPE else "peer closed while data was in flight")

    def abort(self, why: str = "") -> None:
        """Close both sockets now, whatever is in flight (as transport.abort() does)."""
        self._finish(why or "aborted")

    def _finish(self, why: str) -> None:
        if self.closed:
            return
        self.closed = True
        self.ab.stop()
        self.ba.stop()
        for s in self.socks:
            s.close()
        self.on_done(why)
