"""The watched inbox: turns entries dropped into inbox/<route>/ into claimed files.

The spool decides what to claim and when; `spool.claims` claims it (intent
recorded first, then the move, each file exactly once across crashes) and
`spool.watcher` decides when to look again. A regular file is claimed once its
size and mtime held still for `watch.settle_seconds` (the settle rule, kept
here as sightings); names starting with '.' or ending in .part or .tmp are
ignored until renamed. Symlinks, pipes, sockets, devices and directories are
classified with lstat, never opened, and claimed with `error` set so the engine
moves them to failed/. An entry that cannot be moved stays where it is, with one
warning, and is tried again on later scans. The spool never reads file
contents; its blocking filesystem helpers live in `spool.fs`.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import structlog

from orchestrator.config import Settings
from orchestrator.errors import ConfigError
from orchestrator.layout import Layout
from orchestrator.models import FileRecord
from orchestrator.spool.claims import CLAIM_BATCH, Claimer
from orchestrator.spool.fs import Entry, Signature, list_routes, list_top, make_dir
from orchestrator.spool.watcher import Watcher
from orchestrator.store import Store

log = structlog.get_logger(__name__)


@dataclass(frozen=True, slots=True)
class Sighting:
    """An entry's signature and when it was first seen unchanged."""

    entry: Entry
    since: float


class Spool:
    """Watches inbox/<route>/ directories and claims what settles there."""

    def __init__(
        self,
        settings: Settings,
        store: Store,
        on_claimed: Callable[[FileRecord], Awaitable[None]],
        *,
        rescan_seconds: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._on_claimed = on_claimed
        self._clock = clock
        self._settle = settings.watch.settle_seconds
        self._layout = Layout(settings.data_dir.absolute())
        self._inbox = self._layout.inbox
        self._incoming = self._layout.incoming
        self._routes = tuple(r.dir for r in settings.routes)
        self._claimer = Claimer(settings, store, self._incoming)
        self._watcher = Watcher(
            self,
            self._inbox,
            self._routes,
            force_polling=settings.watch.force_polling,
            rescan_seconds=rescan_seconds,
            clock=clock,
        )
        self._seen: dict[Path, Sighting] = {}
        self._unmovable: dict[Path, Signature] = {}  # warned once; retried on later scans
        self._unrouted: set[str] = set()  # top-level inbox names warned about
        self._troubled: dict[str, str] = {}  # route -> problem listing it, warned once
        self._lock = asyncio.Lock()

    @property
    def running(self) -> bool:
        """True while run() is watching (readiness)."""
        return self._watcher.running

    def pending(self) -> int:
        """Entries seen but not yet settled (or not yet claimed)."""
        return sum(1 for _ in self._movable())

    # -- startup -----------------------------------------------------------

    def prepare(self) -> None:
        """Create the data directory tree and check that claiming can be an atomic rename."""
        dirs = [self._inbox, self._incoming]
        for route in self._routes:
            dirs += self._layout.route_dirs(route)
        for path in dirs:
            make_dir(path)
        target = os.stat(self._incoming).st_dev
        for route in self._routes:
            inbox = self._inbox / route
            if os.stat(inbox).st_dev != target:
                raise ConfigError(
                    "data_dir",
                    f"{inbox} and {self._incoming} are on different filesystems; claiming "
                    "moves files with an atomic rename, so inbox/ and work/ must share one volume",
                )

    async def recover_claims(self) -> None:
        """Complete or drop every claim a crash left CLAIMING; completed ones go to on_claimed."""
        async with self._lock:
            await self._claimer.recover(self._on_claimed)

    # -- scanning ----------------------------------------------------------

    async def scan(self) -> int:
        """One pass over every route directory: claim what has settled; how many were claimed."""
        return await self.scan_routes(self._routes, top=True)

    async def scan_routes(self, routes: Iterable[str], *, top: bool) -> int:
        """A pass over some route directories (and inbox/ itself if `top`); how many claimed."""
        wanted = set(routes)
        routes = [r for r in self._routes if r in wanted]
        async with self._lock:
            if not self._claimer.recovered:
                # A half-done claim must never be claimed twice.
                await self._claimer.recover(self._on_claimed)
            if top:
                self._note_unrouted(await asyncio.to_thread(list_top, self._inbox, self._routes))
            listing, problems = await asyncio.to_thread(list_routes, self._inbox, routes)
            self._note_problems(routes, problems)
            ready = self._update(listing, self._clock())
            ready.sort(key=lambda e: (e.signature.mtime_ns, e.name))
            claimed = 0
            for start in range(0, len(ready), CLAIM_BATCH):
                claimed += await self._claim_batch(ready[start : start + CLAIM_BATCH])
            return claimed

    def _note_problems(self, routes: list[str], problems: dict[str, str]) -> None:
        """Warn once per route directory problem; forget it once the directory lists again."""
        for route in routes:
            problem = problems.get(route)
            if problem is None:
                self._troubled.pop(route, None)
            elif self._troubled.get(route) != problem:
                self._troubled[route] = problem
                path = str(self._inbox / route)
                log.warning("route_directory_problem", route=route, path=path, problem=problem)

    def _note_unrouted(self, names: list[tuple[str, bool]]) -> None:
        for name, is_dir in names:
            if name not in self._unrouted:
                event = "unrouted_directory" if is_dir else "unrouted_file"
                log.warning(event, path=str(self._inbox / name), action="left alone")
        self._unrouted = {name for name, _ in names}

    # -- the settle rule ---------------------------------------------------

    def _update(self, listing: dict[str, list[Entry]], now: float) -> list[Entry]:
        """Record what each listed route holds now; return the entries that have settled."""
        present = {entry.path for entries in listing.values() for entry in entries}
        for path in [p for p, s in self._seen.items() if s.entry.route in listing]:
            if path not in present:
                self._forget(path)
        ready = []
        for entries in listing.values():
            for entry in entries:
                seen = self._seen.get(entry.path)
                if seen is None or seen.entry.signature != entry.signature:
                    seen = self._seen[entry.path] = Sighting(entry, now)
                if now - seen.since >= self._settle:
                    ready.append(entry)
        return ready

    def _movable(self) -> Iterator[Sighting]:
        """Sightings still to be claimed: not those left in place after a failed move."""
        return (s for path, s in self._seen.items() if path not in self._unmovable)

    def next_settle(self) -> float:
        """The earliest time an entry seen now may have settled; inf if none is waiting."""
        times = [s.since for s in self._movable()]
        return min(times) + self._settle if times else math.inf

    def settled_routes(self, now: float) -> set[str]:
        """Routes holding an entry that has settled by `now`."""
        return {s.entry.route for s in self._movable() if s.since + self._settle <= now}

    def _forget(self, path: Path) -> None:
        self._seen.pop(path, None)
        self._unmovable.pop(path, None)

    # -- claiming ----------------------------------------------------------

    async def _claim_batch(self, entries: list[Entry]) -> int:
        """Claim settled entries (in this order), then hand each claimed record on."""
        taken = await self._claimer.take(entries)
        for entry, reason in taken.stuck:
            self._cannot_move(entry, reason)
        for entry in taken.gone:
            self._forget(entry.path)
        for entry, _ in taken.claimed:
            self._forget(entry.path)
        for entry, record in taken.claimed:
            if record.error:
                log.warning(
                    "refused_entry", route=record.route, file=record.name, reason=record.error
                )
            size = entry.signature.size if record.error is None else None
            log.info(
                "file_claimed", route=record.route, file=record.name, file_id=record.id, bytes=size
            )
            await self._on_claimed(record)
        return len(taken.claimed)

    def _cannot_move(self, entry: Entry, reason: str) -> None:
        """Leave an entry in place, warning once per entry (it is retried on later scans)."""
        if self._unmovable.get(entry.path) != entry.signature:
            kind = entry.signature.kind.value
            log.warning(
                "claim_failed", route=entry.route, file=entry.name, kind=kind, reason=reason
            )
        self._unmovable[entry.path] = entry.signature

    # -- drain (run --once) and run ------------------------------------------

    async def drain(self) -> None:
        """Scan until every eligible entry present now is claimed (or gone, or cannot be moved)."""
        await self.scan()
        targets = self._waiting()
        while targets:
            deadline = min(self._seen[p].since for p in targets) + self._settle
            await asyncio.sleep(max(0.0, deadline - self._clock()))
            await self.scan_routes({self._seen[p].entry.route for p in targets}, top=False)
            targets &= self._waiting()

    def _waiting(self) -> set[Path]:
        """Seen entries still to be claimed (not those that cannot move or cannot be listed)."""
        return {s.entry.path for s in self._movable() if s.entry.route not in self._troubled}

    async def run(self, stop: asyncio.Event) -> None:
        """Claim until `stop` is set: startup scan, then hints, settle re-checks and rescans."""
        await self._watcher.run(stop)
