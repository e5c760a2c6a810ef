"""The watched inbox: turns entries dropped into inbox/<route>/ into claimed files.

A claim is three steps, each one safe to be interrupted:

1. intent: `Store.begin_claim` records the source path and the work path
   (status CLAIMING);
2. move: `os.rename` from the inbox into work/ (one filesystem, so atomic);
3. done: `Store.finish_claim` (status CLAIMED), then `on_claimed(record)`.

If the source vanished before the rename, the intent is dropped. A crash
between the steps leaves a CLAIMING record that `recover_claims` completes:
work path present -> finish; source still in the inbox -> move, then finish;
neither -> drop. So every file is claimed exactly once, also across restarts.

Work paths are `work/incoming/<ns>-<name>`: `<ns>` is the claim time in
nanoseconds since the epoch, strictly increasing within a process (two files of
the same name never share a work path), and the same instant as `claimed_at`.
Names too long for the filesystem lose characters from the front, so the
extension survives; the record keeps the original name.

A file handed over by `submit` has a ticket beside it (`orchestrator.tickets`):
its id and the name the caller gave are recorded at the claim, and the ticket
is deleted once the claim is done. Any other file gets a fresh id.

The truth is a directory scan: a full one at startup and every `rescan_seconds`.
watchfiles (inotify, or polling for NFS/SMB/overlay volumes) is only a hint
that brings the scan of one route directory forward. A regular file is claimed
once its size and mtime held still for `watch.settle_seconds`; names starting
with '.' or ending in .part or .tmp are ignored until renamed. Symlinks, pipes,
sockets, devices and directories are classified with lstat, never opened, and
claimed with `error` set so the engine moves them to failed/. The spool never
reads file contents; its blocking filesystem helpers live in `spool.fs`.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import structlog
from watchfiles import Change, awatch

from orchestrator.clock import stamp_ns
from orchestrator.config import Settings
from orchestrator.errors import ConfigError
from orchestrator.layout import Layout
from orchestrator.models import FileRecord, FileStatus
from orchestrator.spool.fs import (
    Entry,
    Move,
    Signature,
    drop_tickets,
    list_routes,
    list_top,
    make_dir,
    move_entries,
    read_tickets,
    resume_move,
    work_name,
)
from orchestrator.store import Claim, Store
from orchestrator.tickets import drop_ticket, new_id

log = structlog.get_logger(__name__)

WATCH_DEBOUNCE_MS = 1000  # most a burst of events is held back before it wakes a scan
# Entries claimed together: one transaction records their intents, one their claims.
CLAIM_BATCH = 100


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
        self._settings = settings
        self._store = store
        self._on_claimed = on_claimed
        self._rescan_seconds = rescan_seconds
        self._clock = clock
        self._settle = settings.watch.settle_seconds
        self._layout = Layout(settings.data_dir.absolute())
        self._inbox = self._layout.inbox
        self._incoming = self._layout.incoming
        self._routes = tuple(r.dir for r in settings.routes)
        self._seen: dict[Path, Sighting] = {}
        self._unmovable: dict[Path, Signature] = {}  # warned once; retried on later scans
        self._unrouted: set[str] = set()  # top-level inbox names warned about
        self._troubled: dict[str, str] = {}  # route -> problem listing it, warned once
        self._lock = asyncio.Lock()
        self._recovered = False
        self._last_ns = 0
        self._running = False
        self._wake = asyncio.Event()
        self._dirty: set[str] = set()
        self._top_dirty = False

    @property
    def running(self) -> bool:
        """True while run() is watching (readiness)."""
        return self._running

    def pending(self) -> int:
        """Entries seen but not yet settled (or not yet claimed)."""
        return sum(1 for path in self._seen if path not in self._unmovable)

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
            await self._recover()

    async def _recover(self) -> None:
        for record in await self._store.files([FileStatus.CLAIMING]):
            if not await asyncio.to_thread(resume_move, record):
                await self._store.drop_claim(record.id)
                log.info("claim_dropped", route=record.route, file=record.name)
                continue
            done = await self._store.finish_claim(record.id)
            await asyncio.to_thread(drop_ticket, Path(record.source_path))
            log.info("claim_recovered", route=done.route, file=done.name, file_id=done.id)
            await self._on_claimed(done)
        self._recovered = True

    # -- scanning ----------------------------------------------------------

    async def scan(self) -> int:
        """One pass over every route directory: claim what has settled; how many were claimed."""
        return await self._scan(self._routes, top=True)

    async def _scan(self, routes: Iterable[str], *, top: bool) -> int:
        wanted = set(routes)
        routes = [r for r in self._routes if r in wanted]
        async with self._lock:
            if not self._recovered:
                await self._recover()  # a half-done claim must never be claimed twice
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

    def _update(self, listing: dict[str, list[Entry]], now: float) -> list[Entry]:
        """Record what each listed route holds now; return the entries that have settled."""
        present = {entry.path for entries in listing.values() for entry in entries}
        for path in [p for p, s in self._seen.items() if s.entry.route in listing]:
            if path not in present:
                del self._seen[path]
                self._unmovable.pop(path, None)
        ready = []
        for entries in listing.values():
            for entry in entries:
                seen = self._seen.get(entry.path)
                if seen is None or seen.entry.signature != entry.signature:
                    seen = self._seen[entry.path] = Sighting(entry, now)
                if now - seen.since >= self._settle:
                    ready.append(entry)
        return ready

    # -- claiming ----------------------------------------------------------

    async def _claim_batch(self, entries: list[Entry]) -> int:
        """Claim settled entries (in this order); how many were claimed."""
        takeable = []
        for entry in entries:
            try:
                entry.name.encode("utf-8")
            except UnicodeEncodeError:
                self._cannot_move(entry, "file name is not valid UTF-8; rename it")
                continue
            takeable.append(entry)
        if not takeable:
            return 0
        try:
            taken = await self._take(takeable)
        except BaseException:
            self._recovered = False  # some may be left CLAIMING: the next scan finishes them
            raise
        for entry, record in taken:
            if record.error:
                log.warning(
                    "refused_entry", route=record.route, file=record.name, reason=record.error
                )
            size = entry.signature.size if record.error is None else None
            log.info(
                "file_claimed", route=record.route, file=record.name, file_id=record.id, bytes=size
            )
            await self._on_claimed(record)
        return len(taken)

    async def _take(self, entries: list[Entry]) -> list[tuple[Entry, FileRecord]]:
        """Intents, renames, done, for a batch: one transaction records every intent
        before any rename, and one more marks the moved files CLAIMED. Returns the
        CLAIMED records; an entry that stays (cannot move) or vanished has none."""
        tickets = await asyncio.to_thread(read_tickets, [e.path for e in entries])
        claims = []
        for entry, found in zip(entries, tickets, strict=True):
            ns = self._next_ns()
            ticket, name = found if found else (new_id(), entry.name)
            claims.append(
                Claim(
                    route=entry.route,
                    name=name,
                    source_path=str(entry.path),
                    work_path=str(self._incoming / work_name(ns, entry.name)),
                    max_chunk_bytes=self._settings.limits.max_chunk_bytes,
                    claimed_at=stamp_ns(ns),
                    ticket=ticket,
                    error=entry.signature.kind.refusal,
                )
            )
        records = await self._store.begin_claims(claims)
        moves = await asyncio.to_thread(
            move_entries, [(e, Path(r.work_path)) for e, r in zip(entries, records, strict=True)]
        )
        moved: list[tuple[Entry, FileRecord]] = []
        for entry, record, outcome in zip(entries, records, moves, strict=True):
            if isinstance(outcome, OSError):
                await self._store.drop_claim(record.id)
                self._cannot_move(
                    entry, f"cannot move it into work/: {outcome.strerror or outcome}"
                )
                continue
            self._seen.pop(entry.path, None)
            self._unmovable.pop(entry.path, None)
            if outcome is not Move.MOVED:
                await self._store.drop_claim(record.id)
                log.info("claim_abandoned", route=entry.route, file=entry.name, why=outcome.value)
                continue
            moved.append((entry, record))
        done = await self._store.finish_claims([record.id for _, record in moved])
        with_ticket = {e.path for e, ticket in zip(entries, tickets, strict=True) if ticket}
        ticketed = [entry.path for entry, _ in moved if entry.path in with_ticket]
        if ticketed:
            await asyncio.to_thread(drop_tickets, ticketed)
        return [(entry, record) for (entry, _), record in zip(moved, done, strict=True)]

    def _cannot_move(self, entry: Entry, reason: str) -> None:
        """Leave an entry in place, warning once per entry (it is retried on later scans)."""
        if self._unmovable.get(entry.path) != entry.signature:
            kind = entry.signature.kind.value
            log.warning(
                "claim_failed", route=entry.route, file=entry.name, kind=kind, reason=reason
            )
        self._unmovable[entry.path] = entry.signature

    def _next_ns(self) -> int:
        """Claim time in ns, at least a microsecond after the previous one (distinct claimed_at)."""
        self._last_ns = max(time.time_ns(), self._last_ns + 1000)
        return self._last_ns

    # -- drain (run --once) ------------------------------------------------

    async def drain(self) -> None:
        """Scan until every eligible entry present now is claimed (or gone, or cannot be moved)."""
        await self.scan()
        targets = self._waiting()
        while targets:
            deadline = min(self._seen[p].since for p in targets) + self._settle
            await asyncio.sleep(max(0.0, deadline - self._clock()))
            await self._scan({self._seen[p].entry.route for p in targets}, top=False)
            targets &= self._waiting()

    def _waiting(self) -> set[Path]:
        """Seen entries still to be claimed (not those that cannot move or cannot be listed)."""
        return {
            path
            for path, seen in self._seen.items()
            if path not in self._unmovable and seen.entry.route not in self._troubled
        }

    # -- run: watch + rescans + settle re-checks -------------------------

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
                await self.scan()
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
            await self._sleep_until(min(next_rescan, self._next_settle()))
            if stop.is_set():
                return
            now = self._clock()
            if now >= next_rescan:
                self._dirty.clear()
                self._top_dirty = False
                await self.scan()
                next_rescan = self._clock() + self._rescan_seconds
                continue
            routes, top = self._dirty | self._due(now), self._top_dirty
            self._dirty, self._top_dirty = set(), False
            if routes or top:
                await self._scan(routes, top=top)

    async def _sleep_until(self, deadline: float) -> None:
        """Wait until `deadline` on our clock, or until a hint or stop wakes us."""
        timeout = deadline - self._clock()
        if timeout > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(None if math.isinf(timeout) else timeout):
                    await self._wake.wait()
        self._wake.clear()

    def _next_settle(self) -> float:
        times = [s.since for p, s in self._seen.items() if p not in self._unmovable]
        return min(times) + self._settle if times else math.inf

    def _due(self, now: float) -> set[str]:
        return {
            s.entry.route
            for p, s in self._seen.items()
            if p not in self._unmovable and s.since + self._settle <= now
        }

    async def _watch(self, halt: asyncio.Event) -> None:
        """Turn filesystem events into scan hints; fall back to polling, then to rescans only."""
        polling = self._settings.watch.force_polling
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
