"""Which control plane replica runs the duties that must run once (singleton
duties): the shared-records sweep, the rollout controller, node lease expiry
(controlplane/noderegistry.py), anything that would act twice if every replica
did it.

With the SQLite store there is one control plane and it always leads
(`Leadership.sole()`). With etcd the replicas campaign for the key <prefix>/leader
under their etcd lease (controlplane/store_etcd.py): the holder leads until it
stops renewing that lease (it dies, or loses etcd for a whole lease TTL); then
the key goes and another replica takes it, within one lease TTL of the last
renewal. A leader whose lease lapsed is told it lost before another can win:
it renews at a third of the TTL, so it learns within that, while the key lasts
the whole TTL.

Use from the control plane's event loop:

    cp.leader.is_leader()                         # now
    await cp.leader.wait_leader()                 # until this replica leads
    cp.leader.on_change(lambda leading: ...)      # told on every change
    await cp.leader.run_while_leader("rollouts", controller.run)
        # runs controller.run() while leading, cancels it when leadership is
        # lost, runs it again when regained; never returns (cancel it to stop)
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

log = logging.getLogger("nodemesh.controlplane.leader")


class Leadership:
    """This replica's leadership as the election last decided it (thread-safe to
    set; read and awaited on the event loop given at construction)."""

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._leading = False
        self._holder = ""
        self._changed = asyncio.Event()
        self._listeners: list[Callable[[bool], None]] = []

    @classmethod
    def sole(cls, loop: asyncio.AbstractEventLoop | None = None) -> Leadership:
        """The only control plane (SQLite store): it leads, always."""
        lead = cls(loop)
        lead._leading = True
        lead._holder = "this control plane"
        return lead

    def is_leader(self) -> bool:
        return self._leading

    @property
    def holder(self) -> str:
        """The leading replica's id as last seen ('' while nobody is known to lead)."""
        return self._holder

    def on_change(self, listener: Callable[[bool], None]) -> None:
        """Call `listener(leading)` on the event loop whenever this replica gains or loses leadership."""
        self._listeners.append(listener)

    async def wait_leader(self) -> None:
        while not self._leading:
            self._changed.clear()
            await self._changed.wait()

    async def wait_follower(self) -> None:
        while self._leading:
            self._changed.clear()
            await self._changed.wait()

    async def run_while_leader(self, name: str, duty: Callable[[], Awaitable[None]]) -> None:
        """Run `duty()` while this replica leads; cancel it when leadership goes."""
        while True:
            await self.wait_leader()
            log.info("leading: starting %s", name)
            task = asyncio.ensure_future(duty())
            lost = asyncio.ensure_future(self.wait_follower())
            try:
                await asyncio.wait([task, lost], return_when=asyncio.FIRST_COMPLETED)
            finally:
                lost.cancel()
                if not task.done():
                    task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            if task.done() and not task.cancelled() and task.exception() is not None:
                log.error("singleton duty %s failed: %r; restarting it in 1 s", name, task.exception())
                await asyncio.sleep(1.0)
            elif self._leading:
                return  # the duty ended by itself
            else:
                log.warning("leadership lost: stopped %s", name)

    def _set(self, leading: bool, holder: str) -> None:
        """From the election (any thread)."""
        self._loop.call_soon_threadsafe(self._apply, leading, holder)

    def _apply(self, leading: bool, holder: str) -> None:
        self._holder = holder
        if leading == self._leading:
            return
        self._leading = leading
        log.info("this replica %s", "now leads" if leading else "no longer leads")
        self._changed.set()
        for listener in list(self._listeners):
            try:
                listener(leading)
            except Exception:
                log.exception("leadership listener failed")
