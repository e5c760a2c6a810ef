"""The scheduler: pending chunks become Marketo import jobs, in FIFO order.

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

With a shared queue (`[coordination] url`: several daemons on one subscription,
`orchestrator.scheduler.shared`) every create is also admitted by the database
first, and everything above still applies on top of that; without one, none of it
runs and a daemon behaves as it always did. The create itself and what its answer does is
`orchestrator.scheduler.creating`; the backoffs are `orchestrator.scheduler.waits`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from orchestrator import constants
from orchestrator.backoff import Backoff
from orchestrator.clock import wait_for_any
from orchestrator.config import Route, Settings
from orchestrator.filecache import FileCache
from orchestrator.keyorder import KeyRule
from orchestrator.models import ChunkRecord, ChunkStatus, FileRecord
from orchestrator.queuemodel import QueueModel
from orchestrator.quotagate import QuotaGate, QuotaSource
from orchestrator.scheduler.creating import Creates, Submitter
from orchestrator.scheduler.shared import SharedAdmission, SharedQueue
from orchestrator.scheduler.waits import Observer, Wait, Waits
from orchestrator.store import Store

OUTSTANDING = (ChunkStatus.SUBMITTING, ChunkStatus.SUBMITTED)
RECHECK_SECONDS = 1.0  # at most this long between two looks at a shared queue that deferred


@dataclass
class Scheduler:
    settings: Settings
    store: Store
    client: Submitter
    on_submitted: Callable[[ChunkRecord], None]
    on_chunk_final: Callable[[ChunkRecord], Awaitable[None]]
    files: FileCache = field(kw_only=True)  # shared with the poller (see orchestrator.filecache)
    quota: QuotaSource | None = field(default=None, kw_only=True)  # None: no quota gate
    shared: SharedQueue | None = field(default=None, kw_only=True)  # None: this daemon alone
    observer: Observer | None = None
    clock: Callable[[], float] = time.monotonic
    model: QueueModel = field(init=False)
    waits: Waits = field(init=False)
    quota_gate: QuotaGate = field(init=False)
    keys: KeyRule = field(init=False)
    admission: SharedAdmission | None = field(init=False)
    creates: Creates = field(init=False)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)
    _recorded: asyncio.Event = field(default_factory=asyncio.Event)  # a chunk to check

    def __post_init__(self) -> None:
        settings = self.settings
        lim = settings.limits
        self.model = QueueModel(limit=min(lim.queued_jobs, constants.MAX_QUEUED_JOBS))
        backoff = Backoff(settings.backoff.initial, settings.backoff.max)
        self.waits = Waits(backoff, self.observer, self.clock)
        self.quota_gate = QuotaGate(self.quota, self.clock, self.observer)
        self.keys = KeyRule(settings, self.store, self.clock)
        self.admission = None
        if self.shared is not None:
            self.admission = SharedAdmission(
                self.shared,
                retry=settings.backoff.initial,
                recheck=min(RECHECK_SECONDS, settings.polling.interval),
                quota=self.quota,
                clock=self.clock,
            )
        self.creates = Creates(
            settings,
            self.store,
            self.client,
            self.model,
            self.waits,
            self.files,
            self.on_submitted,
            self.on_chunk_final,
            wake=self._wake.set,
            observer=self.observer,
            shared=self.admission,
        )

    @property
    def list_waits(self) -> dict[int, Wait]:
        return self.waits.lists

    def wake(self) -> None:
        """Something changed: a chunk was added or a job finished."""
        self._wake.set()
        self._recorded.set()

    def job_finished(self, chunk_id: int | None = None) -> None:
        """One of our jobs ended at Marketo."""
        self.model.job_left()
        if chunk_id is not None:
            self.model.chunk_finished(chunk_id)
            if self.admission is not None:
                self.admission.finished(chunk_id)
        self.wake()

    def recovered(self, chunks: list[ChunkRecord]) -> None:
        """Chunks a kill left SUBMITTING: their last create may have made a job."""
        for chunk in chunks:
            self.model.unknown_outcome(chunk.id)

    def foreign_job_left(self) -> None:
        """A job of ours Marketo had kept Queued started: another integration's job left."""
        self.model.job_left()
        if self.admission is not None:
            self.admission.job_left()
        self.wake()

    async def run(self, stop: asyncio.Event) -> None:
        """Submit whenever there is room (finding conflicts beside), until `stop` is set."""
        changed = [] if self.shared is None else [self.shared.changed]
        async with asyncio.TaskGroup() as group:
            if self.keys.on:
                group.create_task(self.check_keys(stop), name="key-check")
            while not stop.is_set():
                self._wake.clear()
                for event in changed:
                    event.clear()
                await self.submit_ready(stop)
                await wait_for_any(self._wake, stop, *changed, within=self.next_deadline())

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
        waits = [*self.waits.ends(), self.quota_gate.until]
        if self.admission is not None:
            waits.append(self.admission.until)
            if self.admission.reports:  # owed to the database: try again
                waits.append(now + self.admission.retry)
        ends = [t - now for t in waits if t > now]
        release = self.keys.next_deadline()  # copies that may be at Marketo taken as gone
        if release is not None:
            ends.append(release)
        return max(0.0, min(ends)) if ends else None

    def backoff_remaining(self) -> float:
        """Seconds until the queue's backoff ends (0 when none runs)."""
        return self.waits.remaining()

    async def submit_ready(self, stop: asyncio.Event) -> None:
        """Submit pending chunks in FIFO order while the model has room."""
        pending: list[ChunkRecord] | None = None
        if self.admission is not None:
            # What frees slots for every daemon is told first, and new chunks take their
            # place in the shared FIFO as soon as they are recorded, backoff or not.
            pending = await self.store.chunks(statuses=[ChunkStatus.PENDING])
            if not await self.register(pending) or not self.admission.open():
                return
        if not self.waits.queue_open() or self.quota_gate.closed():
            return
        if pending is None:
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
            if list_id in busy_lists or not self.waits.list_open(list_id):
                blocked_files.add(chunk.file_id)
                continue
            problem = file.error or (
                None if route else f"route {file.route!r} is no longer configured"
            )
            if problem is None and chunk.unknown_outcomes > self.creates.max_resubmits:
                problem = self.creates.past_cap(chunk)
            if problem or route is None:
                await self.creates.refuse(chunk, problem or "no route")
                blocked_files.add(chunk.file_id)
                continue
            if chunk.id in held:  # the key rule: the rest of its file waits too
                blocked_files.add(chunk.file_id)
                continue
            if not await self.quota_gate.allows():
                return
            grant = None
            if self.admission is not None:
                grant = await self.admission.admit(chunk)
                if grant is None:  # deferred, or the database is away: this round ends
                    return
            outcome = await self.creates.submit(chunk, file, route, len(outstanding), grant)
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

    async def register(self, pending: list[ChunkRecord]) -> bool:
        """Shared: every pending chunk (of a configured route) registered; False when the
        database cannot be reached (the round ends, nothing fails)."""
        assert self.admission is not None
        if not self.admission.reconciled:
            mine = await self.store.chunks(statuses=[ChunkStatus.PENDING, *OUTSTANDING])
            if not await self.admission.reconcile({c.id for c in mine}):
                return False
        routed: list[tuple[ChunkRecord, Route]] = []
        for chunk in pending:
            route = self.settings.route((await self.files.get(chunk.file_id)).route)
            if route is not None:
                routed.append((chunk, route))
        return await self.admission.prepare(routed)

    def list_of(self, file: FileRecord) -> int:
        route = self.settings.route(file.route)
        return route.list_id if route else 0
