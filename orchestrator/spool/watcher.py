"""The spool's running loop: when to scan, woken by filesystem events, settle times and rescans.

The truth is a directory scan: a full one at startup and every `rescan_seconds`.
watchfiles (inotify, or polling for NFS/SMB/overlay volumes) is only a hint that
brings the scan of one route directory forward; a watch that fails falls back to
polling, and polling that fails to rescans alone. Between hints the loop sleeps
until the next rescan or until the first entry seen may have settled, whichever
comes first, so a file is claimed about `settle_seconds` after it stops changing
whatever the rescan interval.

What a scan does, and what has settled, is the spool's part (`spool.inbox`); the
watcher only decides when to ask.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Protocol

import structlog
from watchfiles import Change, awatch

log = structlog.get_logger(__name__)

WATCH_DEBOUNCE_MS = 1000  # most a burst of events is held back before it wakes a scan


class Scans(Protocol):
    """What the watcher drives: the spool's scans and what its settle rule says."""

    async def scan(self) -> int: ...

    async def scan_routes(self, routes: Iterable[str], *, top: bool) -> int: ...

    def next_settle(self) -> float: ...

    def settled_routes(self, now: float) -> set[str]: ...


class Watcher:
    """Runs the scans of one spool until stopped: at startup, on hints, on settle, on rescan."""

    def __init__(
        self,
        scans: Scans,
        inbox: Path,
        routes: tuple[str, ...],
        *,
        force_polling: bool,
        rescan_seconds: float,
        clock: Callable[[], float],
    ) -> None:
        self._scans = scans
        self._inbox = inbox
        self._routes = routes
        self._force_polling = force_polling
        self._rescan_seconds = rescan_seconds
        self._clock = clock
        self._running = False
        self._wake = asyncio.Event()
        self._dirty: set[str] = set()  # routes a hint named since the last scan
        self._top_dirty = False  # a hint named inbox/ itself

    @property
    def running(self) -> bool:
        """True while run() is watching (readiness)."""
        return self._running

    async def run(self, stop: asyncio.Event) -> None:
        """Claim until `stop` is set: startup scan, then hints, settle re-checks and rescans."""
        halt = asyncio.Event()  # private: awatch sets its stop event when cancelled
        self._wake = asyncio.Event()
        async with asyncio.TaskGroup() as group:
            group.create_task(self._watch(halt))
            relay = group.create_task(self._relay(stop))
            try:
                # One loop turn lets the watcher task install its watches (awatch does
                # that before its first await), so nothing lands between scan and watch.
                await asyncio.sleep(0)
                await self._scans.scan()
                self._running = True
                log.info("spool_started", routes=list(self._routes), inbox=str(self._inbox))
                await self._loop(stop)
            finally:
                self._running = False
                halt.set()
                relay.cancel()

    async def _relay(self, stop: asyncio.Event) -> None:
        await stop.wait()
        self._wake.set()

    async def _loop(self, stop: asyncio.Event) -> None:
        next_rescan = self._clock() + self._rescan_seconds
        while not stop.is_set():
            await self._sleep_until(min(next_rescan, self._scans.next_settle()))
            if stop.is_set():
                return
            now = self._clock()
            if now >= next_rescan:
                self._dirty.clear()
                self._top_dirty = False
                await self._scans.scan()
                next_rescan = self._clock() + self._rescan_seconds
                continue
            routes, top = self._dirty | self._scans.settled_routes(now), self._top_dirty
            self._dirty, self._top_dirty = set(), False
            if routes or top:
                await self._scans.scan_routes(routes, top=top)

    async def _sleep_until(self, deadline: float) -> None:
        """Wait until `deadline` on our clock, or until a hint or stop wakes us."""
        timeout = deadline - self._clock()
        if timeout > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if math.isinf(timeout) else timeout):
                    await self._wake.wait()
        self._wake.clear()

    async def _watch(self, halt: asyncio.Event) -> None:
        """Turn filesystem events into scan hints; fall back to polling, then to rescans only."""
        polling = self._force_polling
        paths = [self._inbox, *(self._inbox / r for r in self._routes)]
        while not halt.is_set():
            watcher = awatch(
                *paths,
                watch_filter=None,
                debounce=WATCH_DEBOUNCE_MS,
                stop_event=halt,
                force_polling=polling or None,  # None: WATCHFILES_FORCE_POLLING may still ask
                recursive=False,
                ignore_permission_denied=True,
            )
            try:
                async with contextlib.aclosing(watcher):
                    async for changes in watcher:
                        self._hint(changes)
                return
            except (OSError, RuntimeError) as exc:
                fallback = "periodic rescans only" if polling else "polling"
                log.warning("watch_failed", error=str(exc), fallback=fallback)
                if polling:
                    return
                polling = True

    def _hint(self, changes: set[tuple[Change, str]]) -> None:
        for _change, raw in changes:
            try:
                parts = Path(raw).relative_to(self._inbox).parts
            except ValueError:  # a path spelled another way: look everywhere
                self._dirty.update(self._routes)
                self._top_dirty = True
                continue
            if parts and parts[0] in self._routes:
                self._dirty.add(parts[0])
            else:
                self._top_dirty = True
        self._wake.set()
