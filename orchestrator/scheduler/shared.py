"""Sharing the subscription's queue with other daemons (`[coordination] url`).

The scheduler takes a `SharedQueue` (`orchestrator.coordination.postgres.
PostgresCoordinator` is one; a daemon alone has none) and, through `SharedAdmission`:

- registers each pending chunk before it may be admitted: its file, its index, its
  list, its object and its key hashes (read from the key-set file the splitter wrote
  beside it). Registering is idempotent, so a restart registers again harmlessly;
- asks before every create (`admit`): a `Grant` lets the create go; a `Deferral` ends
  the round until its seconds pass, the shared state changes, or something local
  wakes the scheduler. Other daemons' moves are not announced, so a deferral without
  seconds is looked at again after `recheck` seconds;
- reports what each create's answer, each finished job and each dropped chunk does to
  the shared model. Reports go in order, after the HTTP call and outside any
  transaction; one that cannot reach the database waits, with those after it, for
  the next round (the database's answer is what frees a slot for every daemon).

While the database is away, or this daemon's lease was lost (it registers again on
its own), nothing is admitted and nothing fails: the scheduler tries again after
`retry` seconds.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog

from orchestrator.config import Route
from orchestrator.coordination.shapes import Deferral, Grant
from orchestrator.errors import CoordinationUnavailable, LeaseLost
from orchestrator.keys import KeySet, keys_path
from orchestrator.models import ChunkRecord
from orchestrator.quotagate import QuotaSource

log = structlog.get_logger(__name__)

Report = Callable[[], Awaitable[None]]
UNAVAILABLE = (CoordinationUnavailable, LeaseLost)


class SharedQueue(Protocol):
    """The subscription's queue, shared with the other daemons that name one database."""

    changed: asyncio.Event  # set when the shared state moved

    @property
    def problem(self) -> str | None: ...

    async def register_chunk(
        self,
        *,
        file_ref: int,
        chunk_ref: int,
        index: int,
        list_id: int,
        object: str,
        api_name: str,
        keys: Iterable[int],
    ) -> int: ...
    async def chunk_id(self, chunk_ref: int) -> int | None: ...
    async def unfinished_chunks(self) -> list[tuple[int, int, str, int]]: ...
    async def admit(
        self, chunk: int, *, quota_since: dt.datetime, quota_resets_in: float
    ) -> Grant | Deferral: ...
    async def created(self, grant: Grant, batch_id: int) -> bool: ...
    async def not_created(
        self,
        grant: Grant,
        *,
        reason: str,
        delay: Callable[[int], float] | None = None,
        queue_full: bool = False,
        unknown: bool = False,
    ) -> None: ...
    async def dropped(self, chunk: int) -> None: ...
    async def finished(self, chunk: int) -> bool: ...
    async def job_left(self) -> None: ...
    async def set_paused(self, reason: str) -> None: ...


def read_keys(chunk: ChunkRecord) -> list[int]:
    """The chunk's key hashes from the file beside it (none: a route without keys).

    A key file that cannot be read registers no keys, with a warning: the key rule
    still holds among this daemon's own chunks (`orchestrator.keyorder` takes such a
    chunk to meet everything), only not against other daemons' chunks."""
    path = keys_path(Path(chunk.path))
    try:
        return list(KeySet.load(path).hashes)
    except OSError as exc:
        log.warning("keys_unreadable", path=str(path), error=str(exc), shared=True)
        return []


@dataclass
class SharedAdmission:
    """One daemon's side of the shared queue: registrations, admissions, reports."""

    queue: SharedQueue
    retry: float  # seconds before asking again after the database failed us
    recheck: float  # seconds before asking again after a deferral without a time
    quota: QuotaSource | None = None
    clock: Callable[[], float] = time.monotonic
    ids: dict[int, int] = field(default_factory=dict)  # our chunk id -> the shared id
    reports: deque[Report] = field(default_factory=deque)
    until: float = 0.0  # monotonic: nothing is admitted before
    paused: str = ""  # why this daemon cannot send (the shared FIFO passes it), or ""
    why: str = ""  # the last deferral or problem, for the log
    reconciled: bool = False  # the database heard what this daemon's store knows

    def open(self) -> bool:
        return self.until <= self.clock()

    def deadline(self) -> float | None:
        """When to look again (monotonic), or None when nothing waits."""
        return self.until if self.until > self.clock() else None

    # -- before a create ------------------------------------------------------------

    async def prepare(self, pending: list[tuple[ChunkRecord, Route]]) -> bool:
        """Send what is owed, then register every pending chunk not registered yet;
        False (and a wait) when the database cannot be reached."""
        if not await self.flush():
            return False
        try:
            for chunk, route in pending:
                if chunk.id in self.ids:
                    continue
                keys = await asyncio.to_thread(read_keys, chunk)
                self.ids[chunk.id] = await self.queue.register_chunk(
                    file_ref=chunk.file_id,
                    chunk_ref=chunk.id,
                    index=chunk.index,
                    list_id=route.list_id,
                    object=str(route.object),
                    api_name=route.api_name,
                    keys=keys,
                )
        except UNAVAILABLE as exc:
            self.unavailable(exc)
            return False
        return True

    async def reconcile(self, unfinished: set[int]) -> bool:
        """Once per run, before anything is registered: every chunk the database still
        has as unfinished for this daemon, but this daemon's store does not (`unfinished`:
        its pending and outstanding chunk ids), ended while a report of it was lost to a
        kill (`finished`, `dropped`): the database hears it now. Left so, such a chunk
        would hold a queue slot, or the head of the shared FIFO, for good. False (and a
        wait) when the database cannot be reached."""
        try:
            for shared, ref, state, unknown in await self.queue.unfinished_chunks():
                if ref in unfinished:
                    continue
                if state == "submitted" or unknown:
                    await self.queue.finished(shared)  # it had a job, which has ended
                else:
                    await self.queue.dropped(shared)  # never sent, and never will be
                log.info("coordination_reconciled", chunk=ref, state=state)
        except UNAVAILABLE as exc:
            self.unavailable(exc)
            return False
        self.reconciled = True
        return True

    async def admit(self, chunk: ChunkRecord) -> Grant | None:
        """A grant for `chunk`, or None: the round ends (deferred, or no database)."""
        since, resets_in = self.quota_day()
        try:
            answer = await self.queue.admit(
                self.ids[chunk.id], quota_since=since, quota_resets_in=resets_in
            )
        except UNAVAILABLE as exc:
            self.unavailable(exc)
            return None
        if isinstance(answer, Deferral):
            seconds = self.recheck if answer.seconds is None else max(0.0, answer.seconds)
            self.until, self.why = self.clock() + seconds, answer.reason
            log.debug("admission_deferred", reason=answer.reason, seconds=round(seconds, 3))
            return None
        self.why = ""
        return answer

    def quota_day(self) -> tuple[dt.datetime, float]:
        """When the quota's day began, and seconds until it resets."""
        if self.quota is None:
            now = dt.datetime.now(dt.UTC)
            return now - dt.timedelta(days=1), 86_400.0
        state = self.quota.quota
        resets_in = (state.resets_at - state.as_of).total_seconds()
        # The quota day as the client reckons it (marketo.quota), not reckoned again here.
        return self.quota.quota_day_began, max(0.0, resets_in)

    def unavailable(self, exc: Exception) -> None:
        self.until = self.clock() + self.retry
        if str(exc) != self.why:
            log.warning("coordination_wait", error=str(exc), retry_seconds=self.retry)
        self.why = str(exc)

    # -- reports -----------------------------------------------------------------------

    async def flush(self) -> bool:
        """Send the reports owed, in order; False when the database cannot take them."""
        while self.reports:
            try:
                await self.reports[0]()
            except UNAVAILABLE as exc:
                self.unavailable(exc)
                return False
            self.reports.popleft()
        return True

    def created(self, grant: Grant, batch_id: int) -> None:
        async def report() -> None:
            if await self.queue.created(grant, batch_id):
                return
            # The lease ran out meanwhile: the others took this create as an unknown
            # outcome. Our poller still polls the job; the chunk leaves the shared FIFO.
            log.warning("coordination_lease_lost_at_create", batch_id=batch_id, chunk=grant.chunk)
            await self.queue.dropped(grant.chunk)

        self.reports.append(report)

    def not_created(
        self,
        grant: Grant,
        reason: str,
        *,
        delay: Callable[[int], float] | None = None,
        queue_full: bool = False,
        unknown: bool = False,
    ) -> None:
        async def report() -> None:
            await self.queue.not_created(
                grant, reason=reason, delay=delay, queue_full=queue_full, unknown=unknown
            )

        self.reports.append(report)

    def dropped(self, chunk_id: int) -> None:
        """Our chunk will never be sent (refused, or its file failed)."""
        self.ended(chunk_id, self.queue.dropped)

    def finished(self, chunk_id: int) -> None:
        """Our job ended at Marketo."""
        self.ended(chunk_id, self.queue.finished)

    def ended(self, chunk_id: int, tell: Callable[[int], Awaitable[object]]) -> None:
        """Our chunk is done with: the shared queue hears it (`tell`), and forgets it."""

        async def report() -> None:
            shared = await self.shared_id(chunk_id)
            if shared is not None:
                await tell(shared)
            self.ids.pop(chunk_id, None)

        self.reports.append(report)

    def job_left(self) -> None:
        """Another integration's job left the queue (one of ours Marketo kept started)."""
        self.reports.append(self.queue.job_left)

    def pause(self, reason: str) -> None:
        """This daemon cannot send (refused credentials, 603), or can again (""): the
        other daemons' FIFO passes its chunks meanwhile rather than wait for them."""
        if reason == self.paused:
            return
        self.paused = reason

        async def report() -> None:
            await self.queue.set_paused(reason)

        self.reports.append(report)

    async def shared_id(self, chunk_id: int) -> int | None:
        found = self.ids.get(chunk_id)
        return found if found is not None else await self.queue.chunk_id(chunk_id)
