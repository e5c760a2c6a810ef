"""The poller: every outstanding batch, polled concurrently, where it can change.

Each round polls all due batches at once (a TaskGroup; the client's limiter
keeps Marketo's limits). Marketo runs one FIFO queue, two jobs importing, so
only the first `limits.concurrent_jobs` of our outstanding jobs in submit order
(or any Marketo reported as Importing) can change status:

- those are polled every `polling.interval`, doubling up to
  `polling.max_interval` while Marketo keeps answering Queued (other
  integrations' jobs are ahead of them);
- the rest wait behind ours and cannot start, let alone finish, before one of
  ours ahead finishes: they are not polled at all. When one moves up its first
  poll comes one interval later, since it started importing only just now.

As the daily budget nears (90 % of daily_quota - daily_reserve used by the whole
subscription, as `QuotaState` reckons it) the jobs that can change are polled at
`max_interval` only, so polling slows before submissions stop; once no new job
is created, the jobs already at Marketo are still polled to their end that way,
and their failures and warnings are still fetched.

A job we saw Queued and then see Importing (or final) tells us a job ahead of
it left Marketo's queue: `on_started` says so (the pipeline tells the
scheduler's queue model). On Complete the failures and warnings files are
downloaded when their counters are above zero; Failed ends the chunk with
Marketo's message.

A status call Marketo refuses for good (a fatal error: an expired batch id,
Marketo keeps one seven days; a 610) ends the chunk `unknown`, never Failed:
the job may have imported its rows, so it is not sent again either, and the
result says why its outcome is unknown. Refused credentials and 603 are the
configuration's fault: the batch is kept and asked again, at `max_interval`
while the refusal lasts.

A batch that is Complete stays complete whatever happens to its files: the rows
were imported. A download that fails is tried again at the batch's next poll,
up to `DOWNLOAD_TRIES` times; after that the chunk ends Complete and its message
says which file could not be fetched. A 404 while the counter says rows failed
(or warned) is a mismatch: it is logged and asked once more at the next poll
before it is read as "no file".
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, TypeVar

import structlog

from orchestrator import constants
from orchestrator.clock import stamp, wait_for_any
from orchestrator.config import Route, Settings
from orchestrator.crashpoints import crashpoint
from orchestrator.errors import AccessDeniedError, CredentialsError, FatalError, MarketoError
from orchestrator.filecache import FileCache
from orchestrator.models import BatchStatus, ChunkRecord, ChunkStatus, FileRecord, QuotaState
from orchestrator.store import Store

log = structlog.get_logger(__name__)

T = TypeVar("T")

BUDGET_SLOWDOWN = 0.9  # share of daily_quota - daily_reserve after which polling slows
DOWNLOAD_TRIES = 3  # polls at which a Complete batch's failures/warnings file is asked for


class StatusSource(Protocol):
    """The part of the Marketo client the poller uses."""

    async def status(self, route: Route, batch_id: int) -> BatchStatus: ...
    async def download_failures(self, route: Route, batch_id: int, dest: Path) -> bool: ...
    async def download_warnings(self, route: Route, batch_id: int, dest: Path) -> bool: ...
    @property
    def quota(self) -> QuotaState: ...


@dataclass
class Track:
    """What the poller remembers about one batch between rounds."""

    last_poll: float
    interval: float
    status: str = constants.STATUS_QUEUED
    behind: bool = False  # waits behind ours that fill the import slots: not polled
    queued_at_finishes: int | None = None  # Poller.finishes when Marketo last said Queued
    refused: bool = False  # the last call was refused (credentials, 603): asked sparingly
    fetch_tries: dict[str, int] = field(default_factory=dict)  # by "failures"/"warnings"


@dataclass
class Poller:
    settings: Settings
    store: Store
    client: StatusSource
    on_chunk_final: Callable[[ChunkRecord], Awaitable[None]]
    files: FileCache = field(kw_only=True)  # shared with the scheduler (orchestrator.filecache)
    on_started: Callable[[], None] = lambda: None
    clock: Callable[[], float] = time.monotonic
    tracks: dict[int, Track] = field(default_factory=dict)
    finishes: int = 0  # our jobs seen leaving Marketo's queue so far
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def submitted(self, chunk: ChunkRecord) -> None:
        """A batch was just created: its create response counts as the first look."""
        self.tracks[chunk.id] = Track(self.clock(), self.settings.polling.interval, behind=True)
        self._wake.set()

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            self._wake.clear()
            outstanding = await self.outstanding()
            if await self.poll_round(outstanding):
                continue
            await wait_for_any(self._wake, stop, within=self.next_due(outstanding))

    async def poll_round(
        self, outstanding: list[tuple[ChunkRecord, float]] | None = None
    ) -> list[ChunkRecord]:
        """Ask for every due batch at once, then record the answers in submit order: a
        job ahead that finished is counted before a job behind it is seen starting.

        Returns the batches asked about."""
        if outstanding is None:
            outstanding = await self.outstanding()
        due = [c for c, interval in outstanding if self.is_due(c, interval)]
        async with asyncio.TaskGroup() as group:
            asked = [group.create_task(self.ask(chunk)) for chunk in due]
        for chunk, task in zip(due, asked, strict=True):
            batch = task.result()
            if batch is not None:
                await self.guarded(chunk, self.record(chunk, batch))
        return due

    async def outstanding(self) -> list[tuple[ChunkRecord, float]]:
        """Our batches at Marketo in submit order, each with the interval it deserves.

        `math.inf` for a batch that cannot change yet (queued behind ours)."""
        chunks = await self.store.chunks(statuses=[ChunkStatus.SUBMITTED])
        chunks.sort(key=lambda c: (c.submitted_at or "", c.id))
        polling, lim = self.settings.polling, self.settings.limits
        quota = self.client.quota
        slow = quota.creates_paused or quota.used >= BUDGET_SLOWDOWN * quota.limit
        now = self.clock()
        result = []
        for rank, chunk in enumerate(chunks):
            # Unknown after a restart: look once it can have changed.
            track = self.tracks.setdefault(chunk.id, Track(-math.inf, polling.interval))
            moving = (constants.STATUS_IMPORTING, constants.STATUS_COMPLETE)  # Complete: files due
            if rank >= lim.concurrent_jobs and track.status not in moving:
                track.behind = True
                result.append((chunk, math.inf))
                continue
            if track.behind:  # just moved up: it started importing no earlier than now
                track.behind = False
                track.last_poll = max(track.last_poll, now)
            result.append((chunk, polling.max_interval if slow else track.interval))
        return result

    def is_due(self, chunk: ChunkRecord, interval: float) -> bool:
        """Due once `interval` passed since the last look; never while it cannot change."""
        if interval == math.inf:
            return False
        return self.clock() - self.tracks[chunk.id].last_poll >= interval

    def next_due(self, outstanding: list[tuple[ChunkRecord, float]]) -> float | None:
        """Seconds until the next poll is due; None when nothing is (wait for a wake-up)."""
        now = self.clock()
        waits = [self.tracks[c.id].last_poll + i - now for c, i in outstanding if i < math.inf]
        return max(0.0, min(waits)) if waits else None

    async def ask(self, chunk: ChunkRecord) -> BatchStatus | None:
        """One status call; None when there is no answer to record."""
        file = await self.files.get(chunk.file_id)
        route = self.settings.route(file.route)
        self.tracks[chunk.id].last_poll = self.clock()
        assert chunk.batch_id is not None, "a SUBMITTED chunk has a batch id"
        if route is None:
            with self.bound(file, chunk):
                await self.finish(chunk, ChunkStatus.FAILED, f"route {file.route!r} is gone", None)
            return None
        batch = await self.guarded(chunk, self.client.status(route, chunk.batch_id))
        if batch is not None:
            crashpoint("polled")
        return batch

    async def guarded(self, chunk: ChunkRecord, step: Awaitable[T]) -> T | None:
        """Run one step for a batch with its log context; Marketo's refusals end here."""
        file = await self.files.get(chunk.file_id)
        with self.bound(file, chunk):
            try:
                return await step
            except CredentialsError as exc:
                # The configuration's fault, not the batch's: keep it, ask again sparingly.
                denied = isinstance(exc, AccessDeniedError)
                log.error("access_denied" if denied else "credentials_refused", error=str(exc))
                track = self.tracks.get(chunk.id)
                if track is not None:
                    track.refused = True
                    track.interval = self.settings.polling.max_interval
            except FatalError as exc:
                # Refused for good (an expired batch id, say): the rows may have landed.
                why = f"Marketo refused its status call for good ({exc})"
                await self.finish(chunk, ChunkStatus.UNKNOWN, why, None)
            except MarketoError as exc:
                log.warning(
                    "poll_deferred",
                    code=exc.code,
                    request_id=exc.request_id or None,
                    error=str(exc),
                )
        return None

    @staticmethod
    def bound(file: FileRecord, chunk: ChunkRecord) -> contextlib.AbstractContextManager[None]:
        return structlog.contextvars.bound_contextvars(
            route=file.route, file=file.name, chunk=chunk.index, batch_id=chunk.batch_id
        )

    async def record(self, chunk: ChunkRecord, batch: BatchStatus) -> None:
        route = self.settings.route((await self.files.get(chunk.file_id)).route)
        assert route is not None, "ask() answers only for a configured route"
        track = self.tracks[chunk.id]
        polling = self.settings.polling
        if track.refused:  # answered again: back to the pace its status deserves
            track.refused, track.interval = False, polling.interval
        if batch.status != constants.STATUS_QUEUED:
            self.note_start(track)
        if batch.status == constants.STATUS_COMPLETE:
            assert chunk.batch_id is not None
            fetched: dict[str, str | None] = {}
            notes: list[str] = []
            later = False
            for kind, count in (
                ("failures", batch.rows_failed),
                ("warnings", batch.rows_with_warning),
            ):
                path, note, again = await self.fetch(route, chunk, kind, count, track)
                fetched[kind] = path
                later = later or again
                if note:
                    notes.append(note)
            if later:
                track.status = batch.status  # Complete: ask again at the next poll
                return
            await self.store.set_chunk_files(
                chunk.id, failures_path=fetched["failures"], warnings_path=fetched["warnings"]
            )
            message = "; ".join([m for m in (batch.message, *notes) if m])
            await self.finish(chunk, ChunkStatus.COMPLETE, message, batch)
        elif batch.status == constants.STATUS_FAILED:
            await self.finish(chunk, ChunkStatus.FAILED, batch.message or "Import failed", batch)
        else:
            if batch.status == track.status == constants.STATUS_QUEUED:
                track.interval = min(track.interval * 2, polling.max_interval)
            elif batch.status != track.status:
                track.interval = polling.interval
            track.status = batch.status
            if batch.status == constants.STATUS_QUEUED:
                track.queued_at_finishes = self.finishes
            if batch.status != chunk.marketo_status or batch.rows_processed != chunk.rows_processed:
                await self.store.update_batch(chunk.id, batch)

    async def fetch(
        self, route: Route, chunk: ChunkRecord, kind: str, count: int, track: Track
    ) -> tuple[str | None, str | None, bool]:
        """Download a Complete batch's failures or warnings file when `count` says it has one.

        Returns (path or None, a note for the chunk's message or None, ask again later).
        Never raises Marketo's errors but refused credentials: the rows were imported."""
        if count <= 0:
            return None, None, False
        assert chunk.batch_id is not None
        dest = Path(chunk.path).with_suffix(f".{kind}")
        download = (
            self.client.download_failures if kind == "failures" else self.client.download_warnings
        )
        tries = track.fetch_tries[kind] = track.fetch_tries.get(kind, 0) + 1
        try:
            found = await download(route, chunk.batch_id, dest)
        except CredentialsError:
            raise
        except MarketoError as exc:
            if tries < DOWNLOAD_TRIES:
                log.warning(
                    "download_deferred", kind=kind, code=exc.code, error=str(exc), attempt=tries
                )
                return None, None, True
            log.error("download_failed", kind=kind, code=exc.code, error=str(exc))
            return None, f"the {kind} file ({count} rows) could not be fetched: {exc}", False
        if found:
            return str(dest), None, False
        missing = track.fetch_tries[f"{kind}-404"] = track.fetch_tries.get(f"{kind}-404", 0) + 1
        if missing < 2:
            log.warning("file_missing_despite_counter", kind=kind, rows=count, note="asking again")
            return None, None, True
        log.warning("file_missing_despite_counter", kind=kind, rows=count, note="read as none")
        return None, f"Marketo counted {count} rows in {kind} but had no {kind} file", False

    def note_start(self, track: Track) -> None:
        """A job we saw Queued has started: a job ahead of it left Marketo's queue.

        If none of ours finished since, that job was another integration's."""
        if track.queued_at_finishes == self.finishes:
            self.on_started()
        track.queued_at_finishes = None

    async def finish(
        self, chunk: ChunkRecord, status: ChunkStatus, message: str, batch: BatchStatus | None
    ) -> None:
        record = await self.store.finish_chunk(
            chunk.id, status=status, message=message, finished_at=stamp(), batch=batch
        )
        self.tracks.pop(chunk.id, None)
        self.finishes += 1
        emit = log.info if status is ChunkStatus.COMPLETE else log.warning
        emit(
            "chunk_finished",
            status=str(status),
            rows_processed=record.rows_processed,
            rows_failed=record.rows_failed,
            rows_with_warning=record.rows_with_warning,
        )
        await self.on_chunk_final(record)
