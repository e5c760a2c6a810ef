"""The poller alone: a scripted status source, a real store in tmp_path, a clock moved by hand.

Tests drive rounds themselves (`poll_round`: what one turn of `Poller.run` does),
so intervals are crossed by advancing the fake clock, never by waiting.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from orchestrator.config import PollingSettings, Route, Settings
from orchestrator.errors import (
    AccessDeniedError,
    AuthError,
    CredentialsError,
    FatalError,
    MarketoError,
    RateLimitError,
    TransientError,
)
from orchestrator.filecache import FileCache
from orchestrator.models import BatchStatus, ChunkRecord, ChunkStatus, QuotaState
from orchestrator.poller import Poller
from orchestrator.store import Store
from tests.support.settings import CARS, LEADS, fast_settings
from tests.support.stages import FakeClock, claimed_file

INTERVAL = 5.0
MAX_INTERVAL = 40.0
DAILY_QUOTA, DAILY_RESERVE = 1100, 100  # 1000 calls of the subscription's before creates stop
NOW = datetime(2026, 11, 23, 20, 0, tzinfo=UTC)

Answer = BatchStatus | MarketoError


def used_today(count: int, *, ours: int = 0) -> QuotaState:
    """The quota once the subscription used `count` calls by Marketo's last reading and
    we made `ours` since."""
    return QuotaState(
        as_of=NOW,
        quota=DAILY_QUOTA,
        reserve=DAILY_RESERVE,
        resets_at=NOW + timedelta(hours=10),
        marketo_count=count,
        read_at=NOW,
        ours_since=ours,
    )


class FakeStatusSource:
    """Marketo's status and download calls, answering from a script per batch.

    A poll of a batch with nothing left in its script fails the test (IndexError)."""

    def __init__(self) -> None:
        self.scripts: dict[int, deque[Answer]] = {}
        self.polls: list[int] = []
        self.downloads: list[tuple[str, int, Path]] = []
        # Per kind, what the next downloads do: an error to raise, False for a 404.
        self.download_answers: dict[str, deque[MarketoError | bool]] = {}
        self.quota = used_today(0)

    def script(self, batch_id: int, *answers: str | Answer) -> None:
        """Answers for the next polls of `batch_id`; a bare string is a status."""
        queue = self.scripts.setdefault(batch_id, deque())
        for answer in answers:
            queue.append(BatchStatus(batch_id, answer) if isinstance(answer, str) else answer)

    async def status(self, route: Route, batch_id: int) -> BatchStatus:
        self.polls.append(batch_id)
        answer = self.scripts[batch_id].popleft()
        if isinstance(answer, MarketoError):
            raise answer
        return answer

    async def download_failures(self, route: Route, batch_id: int, dest: Path) -> bool:
        return self._download("failures", batch_id, dest)

    async def download_warnings(self, route: Route, batch_id: int, dest: Path) -> bool:
        return self._download("warnings", batch_id, dest)

    def _download(self, kind: str, batch_id: int, dest: Path) -> bool:
        self.downloads.append((kind, batch_id, dest))
        planned = self.download_answers.get(kind)
        if planned:
            answer = planned.popleft()
            if isinstance(answer, MarketoError):
                raise answer
            if answer is False:
                return False
        dest.write_text(f"email,Import {kind} reason\nx@y.z,bad\n", encoding="utf-8")
        return True


@dataclass
class Harness:
    poller: Poller
    store: Store
    client: FakeStatusSource
    clock: FakeClock
    chunk_dir: Path
    finals: list[ChunkRecord] = field(default_factory=list)
    started: list[None] = field(default_factory=list)
    _files: int = 0

    async def submitted_chunks(
        self, route: Route, *submits: tuple[int, int], announce: bool = False
    ) -> list[ChunkRecord]:
        """A file whose chunks Marketo holds: (batch id, second submitted) per chunk.

        `announce`: hand each to `Poller.submitted`, as the scheduler does; else the
        poller meets them as after a restart, in the store only."""
        self._files += 1
        name = f"f{self._files}.csv"
        began = await claimed_file(self.store, route.dir, name, number=self._files)
        chunks = []
        for index, (batch_id, second) in enumerate(submits, 1):
            chunk = await self.store.add_chunk(
                began.id,
                index=index,
                path=str(self.chunk_dir / f"b{batch_id}.csv"),
                rows=10,
                bytes=900,
                first_line=2 + 10 * (index - 1),
            )
            await self.store.mark_submitting(chunk.id)
            chunks.append(
                await self.store.mark_submitted(
                    chunk.id,
                    batch_id=batch_id,
                    marketo_status="Queued",
                    submitted_at=f"2026-11-23T14:10:{second:02d}.000000Z",
                )
            )
        await self.store.finish_split(began.id, rows=10 * len(submits), chunks_total=len(submits))
        if announce:
            for chunk in chunks:
                self.poller.submitted(chunk)
        return chunks

    async def poll_round(self) -> list[int]:
        """One turn of `Poller.run`: poll every due batch concurrently; the batches polled."""
        due = await self.poller.poll_round()
        return [c.batch_id for c in due if c.batch_id is not None]

    async def intervals(self) -> dict[int, float]:
        return {c.batch_id or 0: i for c, i in await self.poller.outstanding()}

    async def chunk(self, batch_id: int) -> ChunkRecord:
        (found,) = [c for c in await self.store.chunks() if c.batch_id == batch_id]
        return found


def make_settings(tmp_path: Path, **limits: int) -> Settings:
    base = fast_settings(
        "http://marketo.invalid",
        tmp_path / "data",
        (LEADS, CARS),
        **{"concurrent_jobs": 2, "daily_quota": DAILY_QUOTA, "daily_reserve": DAILY_RESERVE}
        | limits,
    )
    return replace(base, polling=PollingSettings(interval=INTERVAL, max_interval=MAX_INTERVAL))


@pytest.fixture
def harness(store: Store, tmp_path: Path) -> Harness:
    client, clock = FakeStatusSource(), FakeClock()
    chunk_dir = tmp_path / "chunks"
    chunk_dir.mkdir()
    finals: list[ChunkRecord] = []
    started: list[None] = []

    async def on_chunk_final(chunk: ChunkRecord) -> None:
        finals.append(chunk)

    poller = Poller(
        make_settings(tmp_path),
        store,
        client,
        on_chunk_final=on_chunk_final,
        files=FileCache(store),
        on_started=lambda: started.append(None),
        clock=clock,
    )
    return Harness(poller, store, client, clock, chunk_dir, finals, started)


# -- who is polled ----------------------------------------------------------------------------


async def test_only_the_first_concurrent_jobs_are_polled(harness: Harness) -> None:
    # Submit order is not claim order: file 2's chunks went first.
    await harness.submitted_chunks(LEADS, (103, 2), (104, 3), announce=True)
    await harness.submitted_chunks(CARS, (101, 0), (102, 1), announce=True)
    harness.client.script(101, "Importing", BatchStatus(101, "Complete", rows_processed=10))
    harness.client.script(102, "Importing", "Importing", "Importing")
    harness.client.script(103, "Queued")

    assert await harness.poll_round() == []
    assert await harness.intervals() == {101: 5.0, 102: 5.0, 103: math.inf, 104: math.inf}
    harness.clock.advance(INTERVAL)
    assert await harness.poll_round() == [101, 102]
    harness.clock.advance(INTERVAL)
    assert await harness.poll_round() == [101, 102]  # 101 completes
    assert (await harness.chunk(101)).status is ChunkStatus.COMPLETE

    # 103 moved up; it started importing no earlier than now: first poll one interval on.
    assert await harness.intervals() == {102: 5.0, 103: 5.0, 104: math.inf}
    assert await harness.poll_round() == []
    harness.clock.advance(INTERVAL)
    assert await harness.poll_round() == [102, 103]
    assert 104 not in harness.client.polls


async def test_after_a_restart_the_first_jobs_are_polled_at_once(harness: Harness) -> None:
    await harness.submitted_chunks(LEADS, (101, 0), (102, 1))
    harness.client.script(101, "Importing")
    harness.client.script(102, "Queued")

    assert await harness.poll_round() == [101, 102]
    assert (await harness.chunk(101)).marketo_status == "Importing"


async def test_after_a_restart_the_batches_behind_ours_are_not_polled(harness: Harness) -> None:
    await harness.submitted_chunks(LEADS, (101, 0), (102, 1), (103, 2), (104, 3))
    for batch_id in (101, 102, 103, 104):
        harness.client.script(batch_id, "Queued")

    assert await harness.poll_round() == [101, 102]


async def test_a_new_batch_is_first_polled_one_interval_after_its_submit(
    harness: Harness,
) -> None:
    (chunk,) = await harness.submitted_chunks(LEADS, (101, 0))
    harness.poller.submitted(chunk)  # the create response counts as the first look
    harness.client.script(101, "Queued")

    assert await harness.poll_round() == []
    harness.clock.advance(INTERVAL - 0.25)
    assert await harness.poll_round() == []
    harness.clock.advance(0.25)
    assert await harness.poll_round() == [101]


# -- intervals --------------------------------------------------------------------------------


async def test_queued_answers_double_the_interval_up_to_max_interval(harness: Harness) -> None:
    (chunk,) = await harness.submitted_chunks(LEADS, (101, 0))
    harness.poller.submitted(chunk)
    harness.client.script(101, "Queued", "Queued", "Queued", "Queued", "Importing", "Importing")

    assert await harness.poll_round() == []  # run() looks right after the submit
    seen = []
    waited = INTERVAL
    for _ in range(6):
        harness.clock.advance(waited - 0.25)
        assert await harness.poll_round() == []  # not due a moment early
        harness.clock.advance(0.25)
        assert await harness.poll_round() == [101]
        waited = (await harness.intervals())[101]
        seen.append(waited)

    assert seen == [10.0, 20.0, 40.0, 40.0, 5.0, 5.0]
    chunk = await harness.chunk(101)
    assert (chunk.status, chunk.marketo_status) == (ChunkStatus.SUBMITTED, "Importing")


async def test_near_the_daily_budget_jobs_are_polled_at_max_interval(harness: Harness) -> None:
    await harness.submitted_chunks(LEADS, (101, 0), (102, 1), (103, 2), announce=True)
    harness.client.script(101, "Importing", "Importing")
    harness.client.script(102, "Importing", "Importing")

    limit = DAILY_QUOTA - DAILY_RESERVE
    harness.client.quota = used_today(int(0.9 * limit) - 2, ours=1)  # the subscription's
    assert await harness.poll_round() == []
    harness.clock.advance(INTERVAL)
    assert await harness.poll_round() == [101, 102]
    assert await harness.intervals() == {101: 5.0, 102: 5.0, 103: math.inf}

    harness.client.quota = used_today(int(0.9 * limit) - 2, ours=2)
    assert await harness.intervals() == {101: 40.0, 102: 40.0, 103: math.inf}
    harness.clock.advance(INTERVAL)
    assert await harness.poll_round() == []
    harness.clock.advance(MAX_INTERVAL - INTERVAL)
    assert await harness.poll_round() == [101, 102]
    assert 103 not in harness.client.polls


async def test_once_no_job_is_created_jobs_at_marketo_are_polled_to_their_end_sparingly(
    harness: Harness,
) -> None:
    """Item 5: the subscription reached daily_quota - daily_reserve (other integrations'
    calls and ours): no new job goes, but ours at Marketo are polled at max_interval until
    they end, and their failures are still fetched."""
    (chunk,) = await harness.submitted_chunks(LEADS, (101, 0))
    harness.client.quota = used_today(DAILY_QUOTA - DAILY_RESERVE)
    assert harness.client.quota.creates_paused
    complete = BatchStatus(101, "Complete", rows_processed=9, rows_failed=1)
    harness.client.script(101, "Importing", complete)

    assert await harness.poll_round() == [101]
    assert await harness.intervals() == {101: MAX_INTERVAL}
    harness.clock.advance(INTERVAL)
    assert await harness.poll_round() == []
    harness.clock.advance(MAX_INTERVAL - INTERVAL)
    assert await harness.poll_round() == [101]

    failures = Path(chunk.path).with_suffix(".failures")
    assert harness.client.downloads == [("failures", 101, failures)]
    done = await harness.chunk(101)
    assert (done.status, done.rows_failed, done.failures_path) == (
        ChunkStatus.COMPLETE,
        1,
        str(failures),
    )


# -- final answers --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("failed", "warned", "kinds"),
    [
        (2, 1, ["failures", "warnings"]),
        (2, 0, ["failures"]),
        (0, 3, ["warnings"]),
        (0, 0, []),
    ],
)
async def test_complete_downloads_the_files_whose_counters_are_above_zero(
    harness: Harness, failed: int, warned: int, kinds: list[str]
) -> None:
    (chunk,) = await harness.submitted_chunks(LEADS, (101, 0))
    complete = BatchStatus(
        101,
        "Complete",
        rows_processed=10 - failed,
        rows_failed=failed,
        rows_with_warning=warned,
        message="Import completed with errors",
    )
    harness.client.script(101, complete)

    assert await harness.poll_round() == [101]

    chunk_path = Path(chunk.path)
    paths = {kind: chunk_path.with_suffix(f".{kind}") for kind in kinds}
    assert harness.client.downloads == [(kind, 101, paths[kind]) for kind in kinds]
    done = await harness.chunk(101)
    assert (done.status, done.marketo_status, done.message) == (
        ChunkStatus.COMPLETE,
        "Complete",
        "Import completed with errors",
    )
    assert (done.rows_processed, done.rows_failed, done.rows_with_warning) == (
        10 - failed,
        failed,
        warned,
    )
    failures, warnings = paths.get("failures"), paths.get("warnings")
    assert done.failures_path == (str(failures) if failures else None)
    assert done.warnings_path == (str(warnings) if warnings else None)
    assert harness.finals == [done]
    assert await harness.poller.outstanding() == []
    assert harness.poller.tracks == {}


async def test_failed_finishes_the_chunk_with_marketos_message(harness: Harness) -> None:
    await harness.submitted_chunks(LEADS, (101, 0), (102, 1))
    why = "Import failed: field 'email' is not a column of the file"
    harness.client.script(101, BatchStatus(101, "Failed", message=why))
    harness.client.script(102, BatchStatus(102, "Failed"))

    assert await harness.poll_round() == [101, 102]

    first, second = await harness.chunk(101), await harness.chunk(102)
    assert (first.status, first.marketo_status, first.message) == (
        ChunkStatus.FAILED,
        "Failed",
        why,
    )
    assert (second.status, second.message) == (ChunkStatus.FAILED, "Import failed")
    assert sorted(c.batch_id or 0 for c in harness.finals) == [101, 102]
    assert all(c.status is ChunkStatus.FAILED for c in harness.finals)
    assert harness.client.downloads == []


@pytest.mark.parametrize(
    "error",
    [
        FatalError("610", "Requested resource not found", operation="status"),
        FatalError("1003", "Batch id 101 not found", operation="status"),
        FatalError("invalid-response", "no batchId in the result", operation="status"),
    ],
    ids=lambda e: e.code,
)
async def test_status_refused_for_good_leaves_the_outcome_unknown_never_failed(
    harness: Harness, error: FatalError
) -> None:
    """Issue 19, item 3: Marketo refusing a status call for good (an expired batch id,
    a 610) says nothing of the rows, which may have landed: the chunk ends `unknown`,
    with Marketo's code and message, and is never resubmitted (it is final)."""
    await harness.submitted_chunks(LEADS, (101, 0), (102, 1))
    harness.client.script(101, BatchStatus(101, "Importing", rows_processed=4), error)
    harness.client.script(102, "Queued", "Queued")

    assert await harness.poll_round() == [101, 102]
    harness.clock.advance(INTERVAL)
    assert await harness.poll_round() == [101]

    chunk = await harness.chunk(101)
    assert chunk.status is ChunkStatus.UNKNOWN
    assert chunk.message == f"Marketo refused its status call for good ({error})"
    assert error.code in chunk.message
    assert (chunk.marketo_status, chunk.rows_processed) == ("Importing", 4)  # its last word
    assert harness.finals == [chunk]
    assert (await harness.chunk(102)).status is ChunkStatus.SUBMITTED
    harness.clock.advance(MAX_INTERVAL)
    assert 101 not in await harness.poll_round()  # final: never asked again


@pytest.mark.parametrize(
    "error",
    [
        TransientError("608", "API Temporarily Unavailable"),
        RateLimitError("606", "Max rate limit exceeded"),
        AuthError("601", "Access token invalid"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_retryable_error_leaves_the_chunk_outstanding(
    harness: Harness, error: MarketoError
) -> None:
    await harness.submitted_chunks(LEADS, (101, 0))
    harness.client.script(101, error, BatchStatus(101, "Complete", rows_processed=10))

    assert await harness.poll_round() == [101]
    chunk = await harness.chunk(101)
    assert (chunk.status, chunk.marketo_status) == (ChunkStatus.SUBMITTED, "Queued")
    assert harness.finals == []
    assert await harness.intervals() == {101: INTERVAL}

    assert await harness.poll_round() == []  # tried again at the interval, not at once
    harness.clock.advance(INTERVAL)
    assert await harness.poll_round() == [101]
    assert (await harness.chunk(101)).status is ChunkStatus.COMPLETE


@pytest.mark.parametrize(
    "error",
    [
        CredentialsError("http-401", "client id or secret refused"),
        AccessDeniedError("603", "Access denied", operation="getImportLeadStatusUsingGET"),
    ],
    ids=lambda e: type(e).__name__,
)
async def test_refused_configuration_keeps_the_batch_and_asks_again_sparingly(
    harness: Harness, error: MarketoError
) -> None:
    """Issue 19, item 4: refused credentials and 603 (the API role, an IP allow-list) are
    the configuration's fault: the batch stays outstanding, asked again at
    `max_interval` while refused, and at its own pace once Marketo answers."""
    await harness.submitted_chunks(LEADS, (101, 0))
    harness.client.script(101, error, error, "Importing", "Complete")

    assert await harness.poll_round() == [101]
    assert (await harness.chunk(101)).status is ChunkStatus.SUBMITTED
    assert harness.finals == []
    assert await harness.intervals() == {101: MAX_INTERVAL}
    harness.clock.advance(INTERVAL)
    assert await harness.poll_round() == []
    harness.clock.advance(MAX_INTERVAL)
    assert await harness.poll_round() == [101]  # refused again
    harness.clock.advance(MAX_INTERVAL)
    assert await harness.poll_round() == [101]  # Importing: answered
    assert await harness.intervals() == {101: INTERVAL}
    harness.clock.advance(INTERVAL)
    assert await harness.poll_round() == [101]
    assert (await harness.chunk(101)).status is ChunkStatus.COMPLETE


# -- a Complete batch stays complete whatever happens to its files (item 2) ----------------------


COMPLETE_WITH_FAILURES = BatchStatus(
    101, "Complete", rows_processed=8, rows_failed=2, message="Import completed with errors"
)


@pytest.mark.parametrize(
    "error",
    [
        FatalError("invalid-response", "a JSON body where a file was expected"),
        TransientError("http-503", "Service Unavailable"),
    ],
    ids=["fatal", "transient"],
)
async def test_download_error_on_complete_is_retried_and_never_fails_the_chunk(
    harness: Harness, error: MarketoError
) -> None:
    """Item 2: the rows were imported; a failing download is tried again at the next
    polls, then the chunk ends Complete saying the file could not be fetched."""
    await harness.submitted_chunks(LEADS, (101, 0))
    harness.client.script(101, *[COMPLETE_WITH_FAILURES] * 3)
    harness.client.download_answers["failures"] = deque([error, error, error])

    assert await harness.poll_round() == [101]
    assert (await harness.chunk(101)).status is ChunkStatus.SUBMITTED
    harness.clock.advance(INTERVAL)
    assert await harness.poll_round() == [101]
    assert (await harness.chunk(101)).status is ChunkStatus.SUBMITTED
    harness.clock.advance(INTERVAL)
    assert await harness.poll_round() == [101]

    done = await harness.chunk(101)
    assert done.status is ChunkStatus.COMPLETE
    assert done.rows_processed == 8
    assert "the failures file (2 rows) could not be fetched" in done.message
    assert done.failures_path is None
    assert harness.finals == [done]


async def test_download_error_then_success_keeps_the_file(harness: Harness) -> None:
    await harness.submitted_chunks(LEADS, (101, 0))
    harness.client.script(101, *[COMPLETE_WITH_FAILURES] * 2)
    harness.client.download_answers["failures"] = deque([TransientError("network", "reset")])

    await harness.poll_round()
    harness.clock.advance(INTERVAL)
    await harness.poll_round()

    done = await harness.chunk(101)
    assert (done.status, done.message) == (ChunkStatus.COMPLETE, "Import completed with errors")
    assert done.failures_path is not None


@pytest.mark.parametrize(("answers", "kept"), [([False, True], True), ([False, False], False)])
async def test_404_while_rows_failed_is_asked_once_more_before_it_means_no_file(
    harness: Harness, answers: list[bool], kept: bool
) -> None:
    """Item 2: a 404 on failures.json while numOfRowsFailed > 0 is a mismatch: logged,
    asked again at the next poll, only then read as "no file"."""
    await harness.submitted_chunks(LEADS, (101, 0))
    harness.client.script(101, *[COMPLETE_WITH_FAILURES] * 2)
    harness.client.download_answers["failures"] = deque(answers)

    with capture_logs() as logs:
        await harness.poll_round()
        assert (await harness.chunk(101)).status is ChunkStatus.SUBMITTED
        harness.clock.advance(INTERVAL)
        await harness.poll_round()

    done = await harness.chunk(101)
    assert done.status is ChunkStatus.COMPLETE
    assert [d[0] for d in harness.client.downloads] == ["failures", "failures"]
    assert (done.failures_path is not None) is kept
    assert any(e["event"] == "file_missing_despite_counter" for e in logs)
    if not kept:
        assert "no failures file" in done.message


# -- a start tells the scheduler a foreign job left -------------------------------------------------


async def test_queued_then_importing_reports_that_a_job_ahead_left(harness: Harness) -> None:
    await harness.submitted_chunks(LEADS, (101, 0), (102, 1))
    harness.client.script(101, "Queued", "Importing", "Importing")
    harness.client.script(102, "Importing", "Importing", "Importing")

    await harness.poll_round()
    # 102 was never seen Queued by a poll: its Importing tells nothing.
    assert harness.started == []

    harness.clock.advance(2 * INTERVAL)
    await harness.poll_round()  # 101: Queued -> Importing, and none of ours finished
    assert harness.started == [None]

    harness.clock.advance(INTERVAL)
    await harness.poll_round()  # still Importing: no new start
    assert harness.started == [None]


async def test_a_start_after_one_of_ours_finished_is_not_reported(harness: Harness) -> None:
    await harness.submitted_chunks(LEADS, (101, 0), (102, 1))
    harness.client.script(101, "Importing", BatchStatus(101, "Complete", rows_processed=10))
    harness.client.script(102, "Queued", "Importing")

    assert await harness.poll_round() == [101, 102]
    harness.clock.advance(INTERVAL)
    assert await harness.poll_round() == [101]  # 101 completes; 102 (Queued) is not due yet
    harness.clock.advance(INTERVAL)
    assert await harness.poll_round() == [102]  # 102 Importing: our 101 made the room
    assert harness.started == []
    assert [c.batch_id for c in harness.finals] == [101]


async def test_a_start_in_the_round_one_of_ours_finishes_is_not_reported(
    harness: Harness,
) -> None:
    await harness.submitted_chunks(LEADS, (101, 0), (102, 1))
    complete = BatchStatus(101, "Complete", rows_processed=10)
    harness.client.script(101, "Importing", "Importing", complete)
    harness.client.script(102, "Queued", "Importing")

    assert await harness.poll_round() == [101, 102]
    harness.clock.advance(INTERVAL)
    assert await harness.poll_round() == [101]
    harness.clock.advance(INTERVAL)
    # Marketo's one picture: our 101 is done, so 102 (right behind it) started.
    assert await harness.poll_round() == [101, 102]

    assert (await harness.chunk(101)).status is ChunkStatus.COMPLETE
    assert harness.started == []
