"""The local FIFO scheduler that mirrors Marketo's import queue.

Pending chunks are submitted in claim order across routes (chunk order kept
within a file), keeping up to `limits.queued_jobs` of our jobs outstanding at
Marketo so its two import slots never idle while we have work, and never more.

`QueueModel` (`orchestrator.queuemodel`) is our picture of the subscription's
queue: how many more jobs it takes from us, lowered on 1016 and probed upward
as jobs leave.

A create whose outcome is unknown (the body went out, then a timeout, a dropped
connection or an HTTP 5xx) may have made a job at Marketo that we will never
hear of: Bulk Import has no way to list or cancel import jobs. The chunk goes
back to the head of the queue after a backoff and is sent again, at most
`limits.max_resubmits` times; past that its file fails, naming the chunk and
saying that Marketo may hold copies of it. Meanwhile each unknown outcome counts
as another integration's job in the queue model until it would have finished:
until the chunk's own next job finishes (that job queued behind the lost one
and carries the same rows), or, for a chunk that is not sent again, until the
next of our jobs finishes.

A create Marketo answers `Failed` made no job that holds a slot: the chunk ends
Failed at once with Marketo's message, and the next chunk may take its place.
Refused credentials and 603 (the API role or an IP allow-list) are the
configuration's fault, not the chunk's: nothing fails, the chunk keeps the head
of the queue, and every later create waits out a backoff (the next create is the
probe that learns when the configuration is fixed).

Before each create the daily quota is asked (`orchestrator.quotagate`): once the
subscription used daily_quota - daily_reserve, no new job is created until the
quota resets or Marketo's count shows room again.

On 1016 the chunk keeps the head of the queue and everything waits out an
exponential, jittered backoff. At most one of our jobs per static list
(`listId`) is outstanding, since Marketo answers 1019 otherwise; a chunk whose
list is busy is passed over by chunks of other lists, never by its own file.

The key rule (`orchestrator.keyorder`, `limits.key_order`): a chunk is sent only
once its conflicts with earlier chunks are known and every earlier chunk that shares
a record key with it is done. A held chunk holds the rest of its file, and lets
later, unrelated work (other files) pass it; chunks without conflicts go in FIFO
order as before. The conflicts are found beside the submits (`check_keys`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import structlog

from orchestrator import constants
from orchestrator.backoff import Backoff
from orchestrator.clock import stamp, wait_for_any
from orchestrator.config import Route, Settings
from orchestrator.crashpoints import crashpoint
from orchestrator.errors import (
    AccessDeniedError,
    CredentialsError,
    FatalError,
    ImportInProgressError,
    MarketoError,
    QueueFullError,
    UnknownOutcomeError,
)
from orchestrator.filecache import FileCache
from orchestrator.keyorder import KeyRule
from orchestrator.models import BatchStatus, ChunkRecord, ChunkStatus, FileRecord
from orchestrator.queuemodel import QueueModel
from orchestrator.quotagate import QuotaGate, QuotaSource
from orchestrator.store import Store

log = structlog.get_logger(__name__)

OUTSTANDING = (ChunkStatus.SUBMITTING, ChunkStatus.SUBMITTED)


class Submitter(Protocol):
    """The part of the Marketo client the scheduler uses."""

    async def submit(self, route: Route, path: Path, fmt: str) -> BatchStatus: ...


class Observer(Protocol):
    """What the scheduler reports (orchestrator.metrics.Metrics)."""

    def backoff(self, reason: str, seconds: float) -> None: ...
    def set_backoff_current(self, seconds: float) -> None: ...
    def job_created(self, files: int) -> None: ...


@dataclass
class Wait:
    """A backoff in progress: nothing is submitted before `until` (monotonic)."""

    attempts: int = 0
    until: float = 0.0
    reason: str = ""


@dataclass
class Scheduler:
    settings: Settings
    store: Store
    client: Submitter
    on_submitted: Callable[[ChunkRecord], None]
    on_chunk_final: Callable[[ChunkRecord], Awaitable[None]]
    files: FileCache = field(kw_only=True)  # shared with the poller (see orchestrator.filecache)
    quota: QuotaSource | None = field(default=None, kw_only=True)  # None: no quota gate
    observer: Observer | None = None
    clock: Callable[[], float] = time.monotonic
    model: QueueModel = field(init=False)
    backoff: Backoff = field(init=False)
    quota_gate: QuotaGate = field(init=False)
    queue_wait: Wait = field(default_factory=Wait)
    list_waits: dict[int, Wait] = field(default_factory=dict)
    keys: KeyRule = field(init=False)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _recorded: asyncio.Event = field(default_factory=asyncio.Event)  # a chunk to check

    def __post_init__(self) -> None:
        lim = self.settings.limits
        self.model = QueueModel(limit=min(lim.queued_jobs, constants.MAX_QUEUED_JOBS))
        self.backoff = Backoff(self.settings.backoff.initial, self.settings.backoff.max)
        self.quota_gate = QuotaGate(self.quota, self.clock, self.observer)
        self.keys = KeyRule(self.settings, self.store, self.clock)

    def wake(self) -> None:
        """Something changed: a chunk was added or a job finished."""
        self._wake.set()
        self._recorded.set()

    def job_finished(self, chunk_id: int | None = None) -> None:
        """One of our jobs ended at Marketo."""
        self.model.job_left()
        if chunk_id is not None:
            self.model.chunk_finished(chunk_id)
        self.wake()

    def recovered(self, chunks: list[ChunkRecord]) -> None:
        """Chunks a kill left SUBMITTING: their last create may have made a job."""
        for chunk in chunks:
            self.model.unknown_outcome(chunk.id)

    def foreign_job_left(self) -> None:
        """A job of ours Marketo had kept Queued started: another integration's job left."""
        self.model.job_left()
        self.wake()

    async def run(self, stop: asyncio.Event) -> None:
        """Submit whenever there is room (finding conflicts beside), until `stop` is set."""
        async with asyncio.TaskGroup() as group:
            if self.keys.on:
                group.create_task(self.check_keys(stop), name="key-check")
            while not stop.is_set():
                self._wake.clear()
                await self.submit_ready(stop)
                await wait_for_any(self._wake, stop, within=self.next_deadline())

    async def check_keys(self, stop: asyncio.Event) -> None:
        """Find each recorded chunk's conflicts as it comes, until `stop` is set."""
        while not stop.is_set():
            self._recorded.clear()
            if await self.keys.check.run(stop):
                self._wake.set()
            await wait_for_any(self._recorded, stop, within=None)

    def next_deadline(self) -> float | None:
        """Seconds until the earliest backoff ends, or None to wait for a wake-up."""
        now = self.clock()
        waits = [self.queue_wait.until, self.quota_gate.until]
        ends = [t - now for t in (*waits, *(w.until for w in self.list_waits.values())) if t > now]
        release = self.keys.next_deadline()  # copies that may be at Marketo taken as gone
        if release is not None:
            ends.append(release)
        return max(0.0, min(ends)) if ends else None

    def backoff_remaining(self) -> float:
        """Seconds until the queue's backoff ends (0 when none runs)."""
        return max(0.0, self.queue_wait.until - self.clock())

    async def submit_ready(self, stop: asyncio.Event) -> None:
        """Submit pending chunks in FIFO order while the model has room."""
        if self.queue_wait.until > self.clock() or self.quota_gate.closed():
            return
        pending = await self.store.chunks(statuses=[ChunkStatus.PENDING])
        outstanding = await self.store.chunks(statuses=OUTSTANDING)
        held = await self.keys.holds(len(outstanding))
        busy_lists = {self.list_of(await self.files.get(c.file_id)) for c in outstanding} - {0}
        blocked_files: set[int] = set()
        for chunk in pending:
            if stop.is_set() or self.model.capacity(len(outstanding)) <= 0:
                return
            if chunk.file_id in blocked_files:
                continue
            file = await self.files.get(chunk.file_id)
            route = self.settings.route(file.route)
            list_id = self.list_of(file)
            wait = self.list_waits.get(list_id)
            if list_id in busy_lists or (wait and wait.until > self.clock()):
                blocked_files.add(chunk.file_id)
                continue
            problem = file.error or (
                None if route else f"route {file.route!r} is no longer configured"
            )
            if problem is None and chunk.unknown_outcomes > self.max_resubmits:
                problem = self.past_cap(chunk)
            if problem or route is None:
                await self.refuse(chunk, problem or "no route")
                blocked_files.add(chunk.file_id)
                continue
            if chunk.id in held:  # the key rule: the rest of its file waits too
                blocked_files.add(chunk.file_id)
                continue
            if not await self.quota_gate.allows():
                return
            outcome = await self.submit(chunk, file, route, len(outstanding))
            if outcome == "queue-full":
                return
            if outcome == "submitted":
                outstanding.append(chunk)
                if list_id:
                    busy_lists.add(list_id)
            elif outcome == "failed":  # Marketo refused the job at once: no slot taken
                continue
            else:  # refused or list busy at Marketo: the rest of this file waits
                blocked_files.add(chunk.file_id)

    async def submit(
        self, chunk: ChunkRecord, file: FileRecord, route: Route, outstanding: int
    ) -> str:
        """One submit with its state transitions; returns what happened."""
        bound = structlog.contextvars.bound_contextvars(
            route=file.route, file=file.name, chunk=chunk.index
        )
        with bound:
            await self.store.mark_submitting(chunk.id)
            crashpoint("before_submit")
            try:
                batch = await self.client.submit(
                    route, Path(chunk.path), route.format_for(file.name)
                )
            except QueueFullError:
                await self.store.mark_pending(chunk.id)
                self.model.queue_full(outstanding)
                self.start_wait(self.queue_wait, "1016")
                log.info("queue_full", outstanding=outstanding, foreign=self.model.foreign)
                return "queue-full"
            except ImportInProgressError:
                await self.store.mark_pending(chunk.id)
                self.start_wait(self.list_waits.setdefault(route.list_id, Wait()), "1019")
                return "list-busy"
            except UnknownOutcomeError as exc:
                return await self.unknown_outcome(chunk, exc)
            except CredentialsError as exc:
                # Nothing can go until the configuration changes (credentials, or the
                # API role's permissions: 603): wait, fail nothing.
                await self.store.mark_pending(chunk.id)
                denied = isinstance(exc, AccessDeniedError)
                self.start_wait(self.queue_wait, "access-denied" if denied else "credentials")
                log.error("access_denied" if denied else "credentials_refused", error=str(exc))
                return "queue-full"
            except FatalError as exc:
                await self.refuse(chunk, str(exc))
                return "refused"
            except MarketoError as exc:
                # Retryable trouble the client already retried: try again later.
                await self.store.mark_pending(chunk.id)
                self.start_wait(self.queue_wait, exc.code)
                log.warning(
                    "submit_deferred",
                    code=exc.code,
                    request_id=exc.request_id or None,
                    error=str(exc),
                )
                return "queue-full"
            crashpoint("after_submit")
            record = await self.store.mark_submitted(
                chunk.id,
                batch_id=batch.batch_id,
                marketo_status=batch.status,
                submitted_at=stamp(),
            )
            if batch.status == constants.STATUS_FAILED:
                return await self.failed_at_create(record, batch)
            if self.observer:
                self.observer.job_created(record.files)
            self.queue_wait = Wait()
            self.list_waits.pop(route.list_id, None)
            self.report_backoff()
            log.info(
                "chunk_submitted",
                batch_id=batch.batch_id,
                rows=chunk.rows,
                bytes=chunk.bytes,
                files=chunk.files,
            )
            self.on_submitted(record)
            return "submitted"

    async def failed_at_create(self, chunk: ChunkRecord, batch: BatchStatus) -> str:
        """Marketo answered the create `Failed`: the chunk ends now, with its message."""
        message = batch.message or "Import failed when the job was created"
        log.warning("chunk_failed_at_create", batch_id=batch.batch_id, error=message)
        self.model.abandon(chunk.id)  # copies an unknown outcome may have left stay counted
        self.queue_wait = Wait()  # Marketo answered: the queue itself is not in trouble
        self.report_backoff()
        finished = await self.store.finish_chunk(
            chunk.id, status=ChunkStatus.FAILED, message=message, finished_at=stamp(), batch=batch
        )
        await self.on_chunk_final(finished)
        return "failed"

    @property
    def max_resubmits(self) -> int:
        return self.settings.limits.max_resubmits

    def past_cap(self, chunk: ChunkRecord) -> str:
        """The file's error once a chunk used up its resubmits."""
        n = chunk.unknown_outcomes
        return (
            f"chunk {chunk.index}: {n} creates of its import job had an unknown outcome "
            f"(limits.max_resubmits = {self.max_resubmits}); Marketo may hold up to {n} "
            "copies of it, so it is not sent again"
        )

    async def unknown_outcome(self, chunk: ChunkRecord, exc: UnknownOutcomeError) -> str:
        """The create went out and we cannot know whether Marketo made the job."""
        record = await self.store.mark_unknown_outcome(chunk.id)
        self.model.unknown_outcome(chunk.id)
        log.warning(
            "submit_outcome_unknown",
            code=exc.code,
            request_id=exc.request_id or None,
            unknown_outcomes=record.unknown_outcomes,
            max_resubmits=self.max_resubmits,
            phantoms=self.model.phantoms,
        )
        if record.unknown_outcomes > self.max_resubmits:
            await self.refuse(record, self.past_cap(record))
            return "refused"
        self.start_wait(self.queue_wait, "unknown-outcome")
        return "queue-full"

    def start_wait(self, wait: Wait, reason: str) -> None:
        wait.attempts += 1
        wait.reason = reason
        delay = self.backoff.delay(wait.attempts)
        wait.until = self.clock() + delay
        if self.observer:
            self.observer.backoff(reason, delay)
        self.report_backoff()
        # A retry after a wait: warning level, like every retry.
        log.warning("backoff", reason=reason, attempt=wait.attempts, seconds=round(delay, 3))

    def report_backoff(self) -> None:
        if self.observer:
            self.observer.set_backoff_current(self.backoff_remaining())

    async def refuse(self, chunk: ChunkRecord, message: str) -> None:
        """A fatal refusal fails this chunk and keeps the file's later chunks from going."""
        log.error("chunk_refused", error=message)
        self.model.abandon(chunk.id)
        await self.store.set_file_error(chunk.file_id, message)
        self.files.forget(chunk.file_id)
        finished = await self.store.finish_chunk(
            chunk.id, status=ChunkStatus.FAILED, message=message, finished_at=stamp()
        )
        later = await self.store.chunks(file_id=chunk.file_id, statuses=[ChunkStatus.PENDING])
        note = f"not submitted: chunk {chunk.index} of this file was refused"
        for other in later:
            await self.store.finish_chunk(
                other.id, status=ChunkStatus.FAILED, message=note, finished_at=stamp()
            )
        self._wake.set()  # chunks it held back may go now
        await self.on_chunk_final(finished)

    def list_of(self, file: FileRecord) -> int:
        route = self.settings.route(file.route)
        return route.list_id if route else 0
