"""The scheduler alone: a fake submitter, a real store in tmp_path, a clock moved by hand.

Each test calls `Scheduler.submit_ready` directly (never the `run` loop), so
backoffs are crossed by advancing the fake clock, not by waiting.
"""

from __future__ import annotations

import asyncio
import shutil
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from orchestrator.config import BackoffSettings, Route, Settings
from orchestrator.errors import (
    AccessDeniedError,
    CredentialsError,
    FatalError,
    ImportInProgressError,
    MarketoError,
    QueueFullError,
    TransientError,
    UnknownOutcomeError,
)
from orchestrator.filecache import FileCache
from orchestrator.keys import LEAD_NAMESPACE, KeySet, key_hash, keys_path
from orchestrator.models import BatchStatus, ChunkRecord, ChunkStatus, FileRecord, ObjectType
from orchestrator.queuemodel import QueueModel
from orchestrator.scheduler import Scheduler
from orchestrator.store import Store
from tests.support.settings import CARS, LEADS, fast_settings
from tests.support.stages import FakeClock, claimed_file

LIST_7 = Route(dir="list7", object=ObjectType.LEADS, list_id=7)
LIST_8 = Route(dir="list8", object=ObjectType.LEADS, list_id=8)
ROUTES = (LEADS, CARS, LIST_7, LIST_8)
# Backoff waits are jittered in [50 %, 100 %] of 10, 20, 40 ... seconds, so
# 4.9 s after a first refusal it surely still waits, 10 s after it surely not.
BACKOFF = BackoffSettings(initial=10.0, max=80.0)
SURELY_WAITING = 4.9
SURELY_OVER = 10.0

QUEUE_FULL = QueueFullError("1016", "Too many imports", operation="import")


class FakeSubmitter:
    """Marketo's create-job call: succeeds with a fresh batch id unless told to raise.

    Chunks are named by their path's stem ("a1" is chunk 1 of a.csv); `calls`
    lists every submit in order, refused or not."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self.errors: dict[str, deque[MarketoError]] = {}
        self.failed: dict[str, str] = {}  # label -> message of a create answered Failed
        self._next_batch = 1001

    def refuse(self, label: str, *errors: MarketoError) -> None:
        """The next submits of chunk `label` raise `errors`, one each, then succeed."""
        self.errors.setdefault(label, deque()).extend(errors)

    def fail(self, label: str, message: str) -> None:
        """The next submit of chunk `label` is answered `"status": "Failed"`."""
        self.failed[label] = message

    async def submit(self, route: Route, path: Path, fmt: str) -> BatchStatus:
        label = path.stem
        self.calls.append(label)
        queue = self.errors.get(label)
        if queue:
            raise queue.popleft()
        status, message = (
            ("Failed", self.failed.pop(label)) if label in self.failed else ("Queued", "")
        )
        batch = BatchStatus(self._next_batch, status, message=message)
        self._next_batch += 1
        return batch


@dataclass
class FakeObserver:
    backoffs: list[tuple[str, float]] = field(default_factory=list)
    current: list[float] = field(default_factory=list)
    jobs: list[int] = field(default_factory=list)  # files in each job created

    def job_created(self, files: int) -> None:
        self.jobs.append(files)

    def backoff(self, reason: str, seconds: float) -> None:
        self.backoffs.append((reason, seconds))

    def set_backoff_current(self, seconds: float) -> None:
        self.current.append(seconds)


@dataclass
class Harness:
    scheduler: Scheduler
    store: Store
    client: FakeSubmitter
    clock: FakeClock
    observer: FakeObserver
    submitted: list[str]
    finals: list[ChunkRecord]
    _claims: int = 0

    async def add_file(
        self,
        route: Route,
        name: str,
        chunks: int,
        *,
        order: Sequence[int] | None = None,
        keys: Sequence[str] | None = None,
    ) -> FileRecord:
        """A claimed, split file of `chunks` chunks, claimed after every earlier one.

        `order` is the order the chunks are recorded in (default 1, 2, ...). With `keys`
        (one string per chunk, its emails joined by spaces) each chunk's key file is
        written beside it before it is recorded, as the split stage does."""
        self._claims += 1
        stem = name.removesuffix(".csv")
        began = await claimed_file(self.store, route.dir, name, number=self._claims)
        for index in order or range(1, chunks + 1):
            path = self.chunk_path(began.id, f"{stem}{index}")
            if keys is not None:
                write_keys(path, keys[index - 1])
            await self.store.add_chunk(
                began.id,
                index=index,
                path=str(path),
                rows=10,
                bytes=900,
                first_line=2 + 10 * (index - 1),
            )
        return await self.store.finish_split(began.id, rows=10 * chunks, chunks_total=chunks)

    def chunk_path(self, file_id: int, label: str) -> Path:
        return self.scheduler.settings.layout.chunk_dir(file_id) / f"{label}.csv"

    async def add_pack(
        self, route: Route, names: Sequence[str], *, seal: bool = True, keys: str | None = None
    ) -> int:
        """Small files packed into one chunk (labelled by the first's stem + "p"), each
        claimed after every earlier one; the chunk's id. With `keys`, the pack's key file
        is written before it is sealed."""
        files = []
        for name in names:
            self._claims += 1
            files.append(await claimed_file(self.store, route.dir, name, number=self._claims))
        owner, stem = files[0], names[0].removesuffix(".csv")
        path = self.chunk_path(owner.id, f"{stem}p")
        if keys is not None:
            write_keys(path, keys)
        pack = await self.store.open_pack(
            owner.id,
            path=str(path),
            rows=2,
            bytes=60,
            first_line=2,
            file_rows=2,
        )
        for joiner in files[1:]:
            await self.store.join_pack(
                pack.id, joiner.id, rows=2, bytes=40, first_line=2, file_rows=2
            )
        if seal:
            await self.store.seal_pack(pack.id)
        return pack.id

    async def submit_ready(self) -> list[str]:
        """One scheduling pass (the conflicts of chunks recorded since found first, as
        the run loop's check does beside it); the chunks it submitted, in order."""
        before = len(self.submitted)
        await self.scheduler.keys.check.run()
        await self.scheduler.submit_ready(asyncio.Event())
        return self.submitted[before:]

    async def chunk(self, label: str) -> ChunkRecord:
        (found,) = [c for c in await self.store.chunks() if Path(c.path).stem == label]
        return found

    async def statuses(self) -> dict[str, ChunkStatus]:
        return {Path(c.path).stem: c.status for c in await self.store.chunks()}

    async def outstanding(self) -> int:
        return len(await self.store.chunks(statuses=[ChunkStatus.SUBMITTED]))

    async def job_done(self, label: str) -> None:
        """Marketo finished one of our jobs: the poller's store call, then its hand-off."""
        chunk = await self.chunk(label)
        await self.store.finish_chunk(
            chunk.id, status=ChunkStatus.COMPLETE, message="", finished_at="2026-11-23T15:00:00Z"
        )
        self.scheduler.job_finished(chunk.id)


def write_keys(chunk: Path, emails: str) -> None:
    """The key file of a chunk of lead rows with these emails (split by spaces)."""
    chunk.parent.mkdir(parents=True, exist_ok=True)
    hashes = [key_hash(LEAD_NAMESPACE, [email]) for email in emails.split()]
    KeySet.of(h for h in hashes if h is not None).save(keys_path(chunk), fsync=False)


def make_settings(tmp_path: Path, **limits: int | bool) -> Settings:
    base = fast_settings("http://marketo.invalid", tmp_path / "data", ROUTES, **limits)
    return replace(base, backoff=BACKOFF)


def make_harness(store: Store, settings: Settings) -> Harness:
    client, clock, observer = FakeSubmitter(), FakeClock(), FakeObserver()
    submitted: list[str] = []
    finals: list[ChunkRecord] = []

    async def on_chunk_final(chunk: ChunkRecord) -> None:
        finals.append(chunk)

    scheduler = Scheduler(
        settings,
        store,
        client,
        on_submitted=lambda chunk: submitted.append(Path(chunk.path).stem),
        on_chunk_final=on_chunk_final,
        files=FileCache(store),
        observer=observer,
        clock=clock,
    )
    return Harness(scheduler, store, client, clock, observer, submitted, finals)


@pytest.fixture
def harness(store: Store, tmp_path: Path) -> Harness:
    return make_harness(store, make_settings(tmp_path))


# -- FIFO and the queue limit ---------------------------------------------------------------


async def test_fifo_by_claim_order_across_routes_and_chunk_order_within_a_file(
    harness: Harness,
) -> None:
    await harness.add_file(LEADS, "a.csv", 3, order=[3, 1, 2])
    await harness.add_file(CARS, "b.csv", 2, order=[2, 1])
    await harness.add_file(LEADS, "c.csv", 1)

    assert await harness.submit_ready() == ["a1", "a2", "a3", "b1", "b2", "c1"]
    assert harness.client.calls == ["a1", "a2", "a3", "b1", "b2", "c1"]
    chunk = await harness.chunk("b2")
    assert (chunk.status, chunk.batch_id, chunk.marketo_status) == (
        ChunkStatus.SUBMITTED,
        1005,
        "Queued",
    )


async def test_never_more_than_queued_jobs_outstanding(store: Store, tmp_path: Path) -> None:
    harness = make_harness(store, make_settings(tmp_path, concurrent_jobs=2, queued_jobs=3))
    await harness.add_file(LEADS, "a.csv", 4)
    await harness.add_file(CARS, "b.csv", 1)

    assert await harness.submit_ready() == ["a1", "a2", "a3"]
    assert await harness.submit_ready() == []
    assert await harness.outstanding() == 3

    await harness.job_done("a1")
    assert await harness.submit_ready() == ["a4"]
    assert await harness.outstanding() == 3
    await harness.job_done("a3")
    await harness.job_done("a2")
    assert await harness.submit_ready() == ["b1"]
    assert harness.client.calls == ["a1", "a2", "a3", "a4", "b1"]


# -- 1016: queue full -------------------------------------------------------------------------


async def test_queue_full_keeps_the_head_and_waits_out_the_backoff(harness: Harness) -> None:
    await harness.add_file(LEADS, "a.csv", 2)
    await harness.add_file(CARS, "b.csv", 1)
    harness.client.refuse("a1", QUEUE_FULL)

    assert await harness.submit_ready() == []
    assert harness.client.calls == ["a1"]  # neither a2 nor b1 jumped the queue
    head = await harness.chunk("a1")
    assert (head.status, head.submit_attempts, head.batch_id) == (ChunkStatus.PENDING, 1, None)
    ((reason, delay),) = harness.observer.backoffs
    assert reason == "1016"
    assert 5.0 <= delay <= 10.0
    assert harness.observer.current[-1] == pytest.approx(delay)
    assert harness.scheduler.backoff_remaining() == pytest.approx(delay)
    assert harness.scheduler.next_deadline() == pytest.approx(delay)

    harness.clock.advance(SURELY_WAITING)
    assert await harness.submit_ready() == []
    assert harness.client.calls == ["a1"]

    harness.clock.advance(SURELY_OVER - SURELY_WAITING)
    # Nothing of ours was outstanding at the 1016: the model probes one slot, the head.
    assert await harness.submit_ready() == ["a1"]
    assert harness.client.calls == ["a1", "a1"]
    head = await harness.chunk("a1")
    assert (head.status, head.submit_attempts) == (ChunkStatus.SUBMITTED, 2)
    assert harness.scheduler.backoff_remaining() == 0.0
    assert harness.observer.current[-1] == 0.0


async def test_repeated_queue_full_doubles_the_backoff(harness: Harness) -> None:
    await harness.add_file(LEADS, "a.csv", 1)
    harness.client.refuse("a1", QUEUE_FULL, QUEUE_FULL)

    await harness.submit_ready()
    harness.clock.advance(SURELY_OVER)
    await harness.submit_ready()

    assert [reason for reason, _ in harness.observer.backoffs] == ["1016", "1016"]
    first, second = (seconds for _, seconds in harness.observer.backoffs)
    assert 5.0 <= first <= 10.0
    assert 10.0 <= second <= 20.0
    harness.clock.advance(2 * SURELY_OVER)
    assert await harness.submit_ready() == ["a1"]


async def test_queue_full_lowers_the_model_until_jobs_leave(harness: Harness) -> None:
    await harness.add_file(LEADS, "a.csv", 6)
    harness.client.refuse("a3", QUEUE_FULL)

    assert await harness.submit_ready() == ["a1", "a2"]
    # 1016 with two of ours at Marketo: other integrations hold the other eight.
    assert harness.scheduler.model.foreign == 8
    assert harness.scheduler.model.capacity(2) == 0

    harness.clock.advance(SURELY_OVER)
    assert await harness.submit_ready() == []  # the backoff is over, the queue is not
    assert harness.client.calls == ["a1", "a2", "a3"]

    # One of ours completes: its slot, and a probe of one more (foreign 8 -> 7).
    await harness.job_done("a1")
    assert await harness.submit_ready() == ["a3", "a4"]
    assert harness.scheduler.model.foreign == 7
    assert await harness.submit_ready() == []

    harness.scheduler.foreign_job_left()  # one of ours left Queued: a foreign job finished
    assert harness.scheduler.model.foreign == 6
    assert await harness.submit_ready() == ["a5"]
    assert await harness.outstanding() == 4
    assert (await harness.chunk("a6")).status is ChunkStatus.PENDING


# -- one job per static list; 1019 ---------------------------------------------------------------


async def test_one_outstanding_job_per_list(harness: Harness) -> None:
    await harness.add_file(LIST_7, "a.csv", 2)
    await harness.add_file(LIST_7, "b.csv", 1)
    await harness.add_file(LIST_8, "c.csv", 1)
    await harness.add_file(LEADS, "d.csv", 2)  # no list: never held back

    # a2 waits for a1 (same list), and b1 waits too: it must not pass a2.
    assert await harness.submit_ready() == ["a1", "c1", "d1", "d2"]
    assert await harness.submit_ready() == []

    await harness.job_done("a1")
    assert await harness.submit_ready() == ["a2"]
    await harness.job_done("a2")
    assert await harness.submit_ready() == ["b1"]
    assert (await harness.chunk("b1")).status is ChunkStatus.SUBMITTED


async def test_import_in_progress_backs_off_only_that_list(harness: Harness) -> None:
    await harness.add_file(LIST_7, "a.csv", 2)
    await harness.add_file(LIST_8, "b.csv", 1)
    harness.client.refuse("a1", ImportInProgressError("1019", "Import in progress"))

    assert await harness.submit_ready() == ["b1"]
    assert harness.client.calls == ["a1", "b1"]
    assert [r for r, _ in harness.observer.backoffs] == ["1019"]
    assert harness.scheduler.backoff_remaining() == 0.0  # the queue itself is not waiting
    assert (await harness.chunk("a1")).status is ChunkStatus.PENDING

    await harness.add_file(LEADS, "c.csv", 1)
    harness.clock.advance(SURELY_WAITING)
    assert await harness.submit_ready() == ["c1"]  # list 7 still waits, others go
    assert harness.client.calls == ["a1", "b1", "c1"]

    harness.clock.advance(SURELY_OVER - SURELY_WAITING)
    assert await harness.submit_ready() == ["a1"]
    assert harness.scheduler.list_waits == {}
    assert harness.scheduler.next_deadline() is None


# -- refusals ---------------------------------------------------------------------------------------


async def test_fatal_error_refuses_the_chunk_and_fails_the_rest_of_its_file(
    harness: Harness,
) -> None:
    refused = FatalError("1003", "Invalid file format", operation="import")
    a = await harness.add_file(LEADS, "a.csv", 3)
    await harness.add_file(CARS, "b.csv", 1)
    harness.client.refuse("a1", refused)

    assert await harness.submit_ready() == ["b1"]
    assert harness.client.calls == ["a1", "b1"]  # a2, a3 were never sent
    a1, a2, a3 = [await harness.chunk(label) for label in ("a1", "a2", "a3")]
    assert (a1.status, a1.message) == (ChunkStatus.FAILED, str(refused))
    note = "not submitted: chunk 1 of this file was refused"
    assert [(c.status, c.message, c.batch_id) for c in (a2, a3)] == [
        (ChunkStatus.FAILED, note, None),
        (ChunkStatus.FAILED, note, None),
    ]
    assert (await harness.store.get_file(a.id)).error == str(refused)
    assert [(Path(c.path).stem, c.status) for c in harness.finals] == [("a1", ChunkStatus.FAILED)]
    assert harness.observer.backoffs == []  # a refusal is not a reason to wait


async def test_a_pack_goes_in_its_oldest_files_place_once_sealed_and_counts_its_files(
    harness: Harness,
) -> None:
    pack = await harness.add_pack(LEADS, ["a.csv", "b.csv", "c.csv"], seal=False)
    await harness.add_file(CARS, "d.csv", 1)
    assert await harness.submit_ready() == ["d1"], "an open pack is not a job yet"
    await harness.store.seal_pack(pack)
    await harness.add_file(LEADS, "e.csv", 1)
    assert await harness.submit_ready() == ["ap", "e1"], "the pack before later files"
    assert harness.observer.jobs == [1, 3, 1]


async def test_a_refused_shared_chunk_fails_for_every_file_in_it(harness: Harness) -> None:
    """The scheduler sets the error on the owner and fails the chunk; every member reads
    the chunk as failed (the pipeline finishes each of them on the one hand-off)."""
    refused = FatalError("1003", "Invalid file format", operation="import")
    pack = await harness.add_pack(LEADS, ["a.csv", "b.csv"])
    await harness.add_file(LEADS, "c.csv", 1)
    harness.client.refuse("ap", refused)

    assert await harness.submit_ready() == ["c1"]
    assert [c.id for c in harness.finals] == [pack]
    members = await harness.store.members(pack)
    assert [(m.status, m.message) for m in members] == [(ChunkStatus.FAILED, str(refused))] * 2
    assert harness.observer.jobs == [1]


async def test_create_answered_failed_ends_its_chunk_at_once_and_takes_no_slot(
    store: Store, tmp_path: Path
) -> None:
    """Issue 19, item 2: Marketo answers a create `Failed` (its status "can be Queued,
    Importing, or Failed"): the chunk ends Failed now, with Marketo's message, holds
    no queue slot, and the next chunk goes in the same pass."""
    harness = make_harness(store, make_settings(tmp_path, queued_jobs=2))
    await harness.add_file(LEADS, "a.csv", 3)
    why = "Import failed: the file could not be read"
    harness.client.fail("a1", why)

    assert await harness.submit_ready() == ["a2", "a3"]

    first = await harness.chunk("a1")
    assert (first.status, first.marketo_status, first.message) == (
        ChunkStatus.FAILED,
        "Failed",
        why,
    )
    assert (first.batch_id, first.submits) == (1001, 1)
    assert [c.id for c in harness.finals] == [first.id]
    assert harness.client.calls == ["a1", "a2", "a3"]
    assert harness.observer.jobs == [1, 1], "no job was counted for the Failed create"
    assert harness.observer.backoffs == []
    assert await harness.outstanding() == 2


async def test_access_denied_waits_and_fails_nothing(harness: Harness) -> None:
    """Issue 19, item 4: 603 is the API role's (or an IP allow-list's) fault, not the
    file's: the chunk keeps the head of the queue, everything waits out a backoff."""
    a = await harness.add_file(LEADS, "a.csv", 2)
    harness.client.refuse("a1", AccessDeniedError("603", "Access denied"))

    assert await harness.submit_ready() == []
    assert set((await harness.statuses()).values()) == {ChunkStatus.PENDING}
    assert (await harness.store.get_file(a.id)).error is None
    assert harness.finals == []
    assert [r for r, _ in harness.observer.backoffs] == ["access-denied"]
    harness.clock.advance(SURELY_WAITING)
    assert await harness.submit_ready() == []
    harness.clock.advance(SURELY_OVER - SURELY_WAITING)
    assert await harness.submit_ready() == ["a1", "a2"]


async def test_credentials_error_waits_and_fails_nothing(harness: Harness) -> None:
    a = await harness.add_file(LEADS, "a.csv", 2)
    await harness.add_file(CARS, "b.csv", 1)
    harness.client.refuse("a1", CredentialsError("http-401", "client id or secret refused"))

    assert await harness.submit_ready() == []
    assert harness.client.calls == ["a1"]
    assert set((await harness.statuses()).values()) == {ChunkStatus.PENDING}
    assert (await harness.store.get_file(a.id)).error is None
    assert harness.finals == []
    assert [r for r, _ in harness.observer.backoffs] == ["credentials"]

    harness.clock.advance(SURELY_WAITING)
    assert await harness.submit_ready() == []
    harness.clock.advance(SURELY_OVER - SURELY_WAITING)
    assert await harness.submit_ready() == ["a1", "a2", "b1"]


async def test_retryable_error_puts_the_chunk_back_and_waits(harness: Harness) -> None:
    await harness.add_file(LEADS, "a.csv", 2)
    harness.client.refuse("a1", TransientError("608", "API Temporarily Unavailable"))

    assert await harness.submit_ready() == []
    assert (await harness.chunk("a1")).status is ChunkStatus.PENDING
    assert [r for r, _ in harness.observer.backoffs] == ["608"]
    assert harness.finals == []

    harness.clock.advance(SURELY_OVER)
    assert await harness.submit_ready() == ["a1", "a2"]


# -- unknown outcomes of a create (issue 10, item 1) -------------------------------------------------


def unknown(code: str = "timeout") -> UnknownOutcomeError:
    return UnknownOutcomeError(code, "the request was sent but its outcome is unknown")


async def test_unknown_outcome_resubmits_after_backoff_and_counts_the_submits(
    harness: Harness,
) -> None:
    """Item 1: the chunk goes back to the head, is sent again after a backoff, and its
    record counts every create that may have made a job."""
    await harness.add_file(LEADS, "a.csv", 2)
    harness.client.refuse("a1", unknown(), unknown("http-503"))

    assert await harness.submit_ready() == []
    assert [r for r, _ in harness.observer.backoffs] == ["unknown-outcome"]
    assert (await harness.chunk("a1")).status is ChunkStatus.PENDING
    assert await harness.submit_ready() == []  # still in the backoff
    harness.clock.advance(SURELY_OVER)
    assert await harness.submit_ready() == []
    harness.clock.advance(2 * SURELY_OVER)
    assert await harness.submit_ready() == ["a1", "a2"]
    first = await harness.chunk("a1")
    assert (first.unknown_outcomes, first.submits) == (2, 3)
    assert (await harness.chunk("a2")).submits == 1
    assert harness.client.calls == ["a1", "a1", "a1", "a2"]


async def test_past_max_resubmits_the_file_fails_naming_the_chunk(
    store: Store, tmp_path: Path
) -> None:
    """Item 1: at most 1 + max_resubmits creates per chunk, then the file fails with an
    error that names the chunk and says Marketo may hold copies of it."""
    harness = make_harness(store, make_settings(tmp_path, max_resubmits=2))
    file = await harness.add_file(LEADS, "a.csv", 2)
    harness.client.refuse("a1", *(unknown() for _ in range(10)))

    for _ in range(6):
        await harness.submit_ready()
        harness.clock.advance(BACKOFF.max)

    assert harness.client.calls == ["a1", "a1", "a1"]
    statuses = await harness.statuses()
    assert statuses == {"a1": ChunkStatus.FAILED, "a2": ChunkStatus.FAILED}
    error = (await store.get_file(file.id)).error or ""
    assert "chunk 1" in error
    assert "Marketo may hold up to 3 copies" in error
    assert (await harness.chunk("a1")).submits == 3


async def test_unknown_outcomes_hold_queue_slots_until_the_chunk_finishes(
    harness: Harness,
) -> None:
    """Item 1: a create with an unknown outcome counts as someone else's job in the
    queue model (Marketo's 10 slots) until its chunk's next job ends."""
    await harness.add_file(LEADS, "a.csv", 11)
    harness.client.refuse("a1", unknown())

    assert await harness.submit_ready() == []
    assert harness.scheduler.model.phantoms == 1
    harness.clock.advance(SURELY_OVER)
    sent = await harness.submit_ready()
    assert sent == [f"a{i}" for i in range(1, 10)]  # 9 of ours + 1 that may be Marketo's
    await harness.job_done("a1")  # its lost copy queued ahead of it: gone too
    assert harness.scheduler.model.phantoms == 0
    assert await harness.submit_ready() == ["a10", "a11"]


# -- the queue model ----------------------------------------------------------------------------------


def test_queue_model_capacity_is_the_limit_less_ours() -> None:
    model = QueueModel(limit=3)
    assert [model.capacity(n) for n in range(5)] == [3, 2, 1, 0, 0]


def test_queue_model_probes_one_slot_when_nothing_of_ours_is_outstanding() -> None:
    model = QueueModel(limit=10)
    model.queue_full(0)
    assert model.foreign == 10
    assert model.capacity(0) == 1  # a probe, though the model believes the queue is full
    assert model.capacity(1) == 0


def test_queue_model_queue_full_counts_the_rest_as_foreign() -> None:
    model = QueueModel(limit=10)
    model.queue_full(4)
    assert (model.foreign, model.capacity(4)) == (6, 0)
    model.queue_full(7)  # a later 1016 with more of ours never lowers the estimate
    assert model.foreign == 6
    model.queue_full(2)
    assert (model.foreign, model.capacity(2)) == (8, 0)


def test_queue_model_job_left_frees_a_slot_never_below_zero() -> None:
    model = QueueModel(limit=10)
    model.queue_full(8)
    assert model.capacity(7) == 1
    model.job_left()
    assert (model.foreign, model.capacity(7)) == (1, 2)
    model.job_left()
    model.job_left()
    assert (model.foreign, model.capacity(7)) == (0, 3)


def test_queue_model_own_limit_caps_what_foreign_slots_leave() -> None:
    model = QueueModel(limit=3, foreign=5)
    assert model.capacity(0) == 3
    model = QueueModel(limit=3, foreign=8)
    assert model.capacity(1) == 1


# -- the key rule (issue 20, items 3 and 6) ------------------------------------------------------
# Key files are written by hand beside the chunks, as the split stage leaves them.


async def test_without_conflicts_fifo_is_unchanged_and_both_slots_stay_busy(
    store: Store, tmp_path: Path
) -> None:
    harness = make_harness(store, make_settings(tmp_path, queued_jobs=2))
    await harness.add_file(LEADS, "a.csv", 2, keys=["a1@x.com a2@x.com", "a3@x.com"])
    await harness.add_file(CARS, "b.csv", 1, keys=["b1@x.com"])
    await harness.add_file(LEADS, "c.csv", 2, keys=["c1@x.com", "c2@x.com"])

    assert await harness.submit_ready() == ["a1", "a2"]
    await harness.job_done("a1")
    assert await harness.submit_ready() == ["b1"]
    await harness.job_done("a2")
    await harness.job_done("b1")
    assert await harness.submit_ready() == ["c1", "c2"]
    assert harness.client.calls == ["a1", "a2", "b1", "c1", "c2"]
    assert await store.holds() == {}


async def test_a_chunk_sharing_keys_with_an_earlier_unfinished_one_waits_until_it_completes(
    harness: Harness,
) -> None:
    await harness.add_file(LEADS, "a.csv", 1, keys=["ann@x.com bob@x.com"])
    await harness.add_file(LEADS, "b.csv", 1, keys=["BOB@x.com  cat@x.com"])  # bob, folded

    assert await harness.submit_ready() == ["a1"]
    b1 = await harness.chunk("b1")
    (hold,) = (await harness.store.holds())[b1.id]
    assert (hold.file, hold.index, hold.status) == ("a.csv", 1, ChunkStatus.SUBMITTED)
    assert await harness.submit_ready() == []

    await harness.job_done("a1")
    assert await harness.submit_ready() == ["b1"]


async def test_later_unrelated_work_passes_a_held_chunk(harness: Harness) -> None:
    await harness.add_file(LEADS, "a.csv", 1, keys=["ann@x.com"])
    await harness.add_file(LEADS, "b.csv", 1, keys=["ann@x.com"])
    await harness.add_file(LEADS, "c.csv", 1, keys=["cat@x.com"])
    await harness.add_file(CARS, "d.csv", 1)  # a route without key columns: no key file

    assert await harness.submit_ready() == ["a1", "c1", "d1"]
    await harness.job_done("c1")
    assert await harness.submit_ready() == []
    await harness.job_done("a1")
    assert await harness.submit_ready() == ["b1"]
    assert harness.client.calls == ["a1", "c1", "d1", "b1"]


async def test_a_held_chunk_holds_the_rest_of_its_file(harness: Harness) -> None:
    await harness.add_file(LEADS, "a.csv", 1, keys=["ann@x.com"])
    await harness.add_file(LEADS, "b.csv", 3, keys=["bob@x.com", "ann@x.com", "cat@x.com"])

    # b3 shares nothing, but chunk order within a file is kept: it waits behind b2.
    assert await harness.submit_ready() == ["a1", "b1"]
    await harness.job_done("b1")
    assert await harness.submit_ready() == []
    await harness.job_done("a1")
    assert await harness.submit_ready() == ["b2", "b3"]


async def test_a_pack_sealed_after_a_chunk_it_meets_waits_for_that_chunk(
    harness: Harness,
) -> None:
    """A pack goes in its oldest file's place in the FIFO, but is checked when sealed:
    a later file's chunk recorded before the seal that shares keys with it goes first."""
    pack = await harness.add_pack(LEADS, ["a.csv", "b.csv"], seal=False, keys="ann@x.com")
    await harness.add_file(LEADS, "c.csv", 2, keys=["ann@x.com", "cat@x.com"])
    assert await harness.submit_ready() == ["c1", "c2"]
    await harness.store.seal_pack(pack)
    assert await harness.submit_ready() == []
    await harness.job_done("c2")
    assert await harness.submit_ready() == []
    await harness.job_done("c1")
    assert await harness.submit_ready() == ["ap"]


async def test_an_unchecked_chunk_is_never_sent(harness: Harness) -> None:
    """Recorded, but killed before its conflicts were found: it waits for its check."""
    await harness.add_file(LEADS, "a.csv", 1, keys=["ann@x.com"])
    await harness.scheduler.submit_ready(asyncio.Event())  # no check ran
    assert harness.submitted == []
    assert await harness.submit_ready() == ["a1"]


async def test_a_refused_chunk_holds_nothing(harness: Harness) -> None:
    await harness.add_file(LEADS, "a.csv", 1, keys=["ann@x.com"])
    await harness.add_file(LEADS, "b.csv", 1, keys=["ann@x.com"])
    harness.client.refuse("a1", FatalError("1003", "Invalid file format", operation="import"))

    assert await harness.submit_ready() == []
    assert (await harness.chunk("a1")).status is ChunkStatus.FAILED
    assert await harness.submit_ready() == ["b1"]


async def test_an_unknown_outcome_holds_its_keys_until_its_resubmission_and_one_more_job_end(
    harness: Harness,
) -> None:
    """A copy of a1 may be queued ahead of its resubmission and still import after it:
    b1 (same key) waits for one more of our jobs to end after a1's resubmission."""
    await harness.add_file(LEADS, "a.csv", 1, keys=["ann@x.com"])
    await harness.add_file(LEADS, "b.csv", 1, keys=["ann@x.com"])
    await harness.add_file(LEADS, "c.csv", 1, keys=["cat@x.com"])
    harness.client.refuse("a1", unknown())

    assert await harness.submit_ready() == []
    harness.clock.advance(SURELY_OVER)
    assert await harness.submit_ready() == ["a1", "c1"]
    await harness.job_done("a1")  # the resubmission finished
    assert await harness.submit_ready() == []
    b1 = await harness.chunk("b1")
    (hold,) = (await harness.store.holds())[b1.id]
    assert (hold.file, hold.status, hold.final) == ("a.csv", ChunkStatus.COMPLETE, True)
    await harness.job_done("c1")  # one more of our jobs ended after it
    assert await harness.submit_ready() == ["b1"]


async def test_with_nothing_of_ours_at_marketo_copies_are_taken_as_gone_after_a_while(
    harness: Harness,
) -> None:
    """No job of ours will end to say a copy of a1 left Marketo: after a1's own last
    job's time at Marketo (at least polling.max_interval) b1 goes, not never."""
    await harness.add_file(LEADS, "a.csv", 1, keys=["ann@x.com"])
    await harness.add_file(LEADS, "b.csv", 1, keys=["ann@x.com"])
    harness.client.refuse("a1", unknown())
    await harness.submit_ready()
    harness.clock.advance(SURELY_OVER)
    assert await harness.submit_ready() == ["a1"]
    await harness.job_done("a1")

    assert await harness.submit_ready() == []
    wait = harness.scheduler.next_deadline()
    assert wait is not None
    assert wait >= harness.scheduler.settings.polling.max_interval
    harness.clock.advance(wait / 2)
    assert await harness.submit_ready() == []
    harness.clock.advance(wait)
    assert await harness.submit_ready() == ["b1"]
    assert harness.scheduler.next_deadline() is None


async def test_after_a_restart_the_rule_still_holds(store: Store, tmp_path: Path) -> None:
    """Conflicts live in the store; a chunk recorded but not checked before the kill is
    checked by the new scheduler before it can go."""
    settings = make_settings(tmp_path)
    before = make_harness(store, settings)
    await before.add_file(LEADS, "a.csv", 1, keys=["ann@x.com"])
    await before.add_file(LEADS, "b.csv", 1, keys=["ann@x.com"])
    assert await before.submit_ready() == ["a1"]
    await before.add_file(LEADS, "c.csv", 1, keys=["ann@x.com"])  # recorded, never checked

    store = await Store.open(store.path)  # a new process: new store connection, scheduler
    try:
        after = make_harness(store, settings)
        after._claims = before._claims
        assert await after.submit_ready() == []
        assert await after.outstanding() == 1
        c1 = await after.chunk("c1")
        assert [h.file for h in (await store.holds())[c1.id]] == ["a.csv", "b.csv"]
        await after.job_done("a1")
        assert await after.submit_ready() == ["b1"]
        await after.job_done("b1")
        assert await after.submit_ready() == ["c1"]
    finally:
        await store.close()


async def test_a_final_chunk_whose_key_file_went_with_its_file_meets_every_later_one(
    store: Store, tmp_path: Path
) -> None:
    """A finished file takes its chunk directory along; a chunk of it that still holds
    its keys (an unknown outcome) is taken to meet any chunk recorded afterwards (key
    sets are read from their files, never cached), before a restart and after."""
    settings = make_settings(tmp_path)
    harness = make_harness(store, settings)
    a = await harness.add_file(LEADS, "a.csv", 1, keys=["ann@x.com"])
    await harness.add_file(LEADS, "c.csv", 1, keys=["cat@x.com"])
    harness.client.refuse("a1", unknown())
    await harness.submit_ready()
    harness.clock.advance(SURELY_OVER)
    assert await harness.submit_ready() == ["a1", "c1"]
    await harness.job_done("a1")
    shutil.rmtree(settings.layout.chunk_dir(a.id))
    await harness.add_file(LEADS, "b.csv", 1, keys=["bob@x.com"])
    assert await harness.submit_ready() == [], "a1's keys went with its file"
    b1 = await harness.chunk("b1")
    assert [h.file for h in (await store.holds())[b1.id]] == ["a.csv"]

    restarted = make_harness(store, settings)
    restarted._claims = harness._claims
    await restarted.add_file(LEADS, "d.csv", 1, keys=["dan@x.com"])
    assert await restarted.submit_ready() == []
    d1 = await restarted.chunk("d1")
    assert [h.file for h in (await store.holds())[d1.id]] == ["a.csv"]
    await restarted.job_done("c1")
    assert await restarted.submit_ready() == ["b1", "d1"]


async def test_key_order_off_sends_in_plain_fifo_order(store: Store, tmp_path: Path) -> None:
    harness = make_harness(store, make_settings(tmp_path, key_order=False))
    await harness.add_file(LEADS, "a.csv", 1, keys=["ann@x.com"])
    await harness.add_file(LEADS, "b.csv", 1, keys=["ann@x.com"])
    assert await harness.submit_ready() == ["a1", "b1"]
