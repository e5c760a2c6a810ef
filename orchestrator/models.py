"""Shared records and states: StrEnums and frozen dataclasses, no behaviour."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from enum import IntEnum, StrEnum


class ObjectType(StrEnum):
    """The three object types Bulk Import offers."""

    LEADS = "leads"
    CUSTOM_OBJECT = "customobject"
    PROGRAM_MEMBERS = "programmembers"


class FileStatus(StrEnum):
    """Life of a source file in the state store."""

    CLAIMING = "claiming"  # recorded, not yet moved out of the inbox
    CLAIMED = "claimed"  # in work/, not yet split
    SPLITTING = "splitting"  # chunks being cut (and maybe submitted)
    SPLIT = "split"  # every chunk known; waiting for Marketo
    FINISHING = "finishing"  # result name reserved, being written
    COMPLETE = "complete"  # every chunk Complete; result written
    FAILED = "failed"  # result written with an error


class ChunkStatus(StrEnum):
    """Life of one chunk file: one Marketo job."""

    PENDING = "pending"  # waiting for a queue slot
    SUBMITTING = "submitting"  # request may be in flight: outcome unknown after a crash
    SUBMITTED = "submitted"  # Marketo gave a batch id (Queued or Importing)
    COMPLETE = "complete"  # Marketo said Complete (failed rows are counted, not fatal)
    FAILED = "failed"  # Marketo said Failed, or a fatal error refused the chunk
    # Marketo refused its status call for good (an expired batch id, say): the job may
    # or may not have imported its rows, so it is neither failed nor sent again.
    UNKNOWN = "unknown"


class ExitCode(IntEnum):
    """What `run --once`, `submit --wait` and `check` tell the caller (SPEC section 2)."""

    COMPLETE = 0  # every file complete (row-level failures are reported, not fatal)
    FAILED = 1  # a file failed (or had more failed rows than --max-failed-rows allows)
    USAGE = 2  # configuration or usage error
    CREDENTIALS = 3  # Marketo refused the credentials
    OUTSTANDING = 4  # timed out or interrupted with work outstanding (nothing lost)


FINAL_FILE_STATUSES = frozenset({FileStatus.COMPLETE, FileStatus.FAILED})
UNFINISHED_FILE_STATUSES = frozenset(set(FileStatus) - FINAL_FILE_STATUSES)
FINAL_CHUNK_STATUSES = frozenset({ChunkStatus.COMPLETE, ChunkStatus.FAILED, ChunkStatus.UNKNOWN})


@dataclass(frozen=True, slots=True)
class BatchStatus:
    """One import job as Marketo's status (or create) endpoint describes it."""

    batch_id: int
    status: str  # Queued | Importing | Complete | Failed
    rows_processed: int = 0
    rows_failed: int = 0
    rows_with_warning: int = 0
    message: str = ""


@dataclass(frozen=True, slots=True)
class FileRecord:
    """A claimed source file as the state store holds it."""

    id: int
    route: str
    name: str  # original file name in the inbox
    source_path: str  # where it was in the inbox
    work_path: str  # where it is after the claim
    status: FileStatus
    max_chunk_bytes: int  # the limit it was (or will be) split with
    claimed_at: str  # ISO 8601 UTC
    ticket: str = ""  # the hand-over id (orchestrator.tickets), in result.json as "id"
    rows: int | None = None
    chunks_total: int | None = None
    error: str | None = None
    result_path: str | None = None
    finished_at: str | None = None
    # What its header check warned of (columns Marketo does not know): in result.json.
    warnings: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ChunkRecord:
    """One chunk of a file, and the Marketo job it became."""

    id: int
    file_id: int
    index: int  # 1-based, in file order
    path: str
    rows: int
    bytes: int
    first_line: int  # source line number of its first record
    status: ChunkStatus
    batch_id: int | None = None
    submit_attempts: int = 0
    marketo_status: str | None = None
    rows_processed: int = 0
    rows_failed: int = 0
    rows_with_warning: int = 0
    message: str = ""
    failures_path: str | None = None
    warnings_path: str | None = None
    submitted_at: str | None = None
    finished_at: str | None = None
    unknown_outcomes: int = 0  # creates that may or may not have made a job at Marketo
    # Packing: a chunk may hold the records of several small files (a shared chunk).
    # Read for one file (`Store.chunks(file_id=...)`, `chunks_of`), a record is that
    # file's view: file_id, rows, bytes, first_line and the row counters are the file's
    # share, and job_rows, job_bytes and files describe the whole chunk.
    files: int = 1  # source files with records in the chunk; above 1 it is shared
    sealed: bool = True  # False while a pack still takes files; only a sealed chunk is sent
    first_row: int = 0  # the file's first record, counted from 0 among the chunk's records
    job_rows: int = 0  # records of the whole chunk
    job_bytes: int = 0  # bytes of the whole chunk file, header included
    attributed: bool = False  # failed and warned rows matched back to each file's share
    unmatched_rows: int = 0  # ... of which no record matched (in every file's share, if shared)

    @property
    def submits(self) -> int:
        """Create calls that may have made a job: the unknown ones plus the answered one."""
        return self.unknown_outcomes + (1 if self.batch_id is not None else 0)


@dataclass(frozen=True, slots=True)
class Refusal:
    """Marketo refusing the daemon's calls for a reason of configuration, as the daemon
    last learnt it: `what` is "credentials" or the permission refused (603)."""

    what: str
    code: str  # Marketo's error code, or "http-401" and the like from the identity service
    message: str
    since: str  # ISO 8601 UTC: when the daemon learnt it
    last: str  # ISO 8601 UTC: when Marketo last refused (the daemon keeps trying)


@dataclass(frozen=True, slots=True)
class RejectRecord:
    """A source record the splitter set aside (for the failures file)."""

    file_id: int
    line: int  # source line number where the record starts
    size: int  # bytes
    reason: str
    offset: int = 0  # byte offset of the record in the source file


@dataclass(frozen=True, slots=True)
class QuotaState:
    """The subscription's daily API quota as one daemon reckons it at `as_of`.

    The quota belongs to every integration of the subscription: `used` is Marketo's
    own count of the day at the last reading (GET /rest/v1/stats/usage.json) plus our
    calls since; no new job is created once it reaches `limit` (daily_quota -
    daily_reserve), or while Marketo says 607 (`paused_until`). Times are aware, UTC."""

    as_of: datetime
    quota: int  # limits.daily_quota: the subscription's allocation
    reserve: int  # limits.daily_reserve: left for other integrations
    resets_at: datetime  # the coming reset (the later reading of "12:00AM CST")
    marketo_count: int | None = None  # the subscription's calls today at the last reading
    read_at: datetime | None = None  # when that was read; None: not read yet today
    next_read_at: datetime | None = None  # when it is read again
    ours_since: int = 0  # our counted calls since that reading (or since the reset)
    ours_today: int = 0  # our counted calls in the quota day
    paused_until: datetime | None = None  # 607: every call waits until then

    @property
    def used(self) -> int:
        """The subscription's calls today, as far as we know."""
        return (self.marketo_count or 0) + self.ours_since

    @property
    def limit(self) -> int:
        """Calls the subscription may reach before we create no new job."""
        return max(0, self.quota - self.reserve)

    @property
    def creates_paused(self) -> bool:
        """No new job now: the budget is spent, or Marketo said 607."""
        return self.paused_until is not None or self.used >= self.limit

    @property
    def resumes_at(self) -> datetime:
        """When creates may go on: at the reset, or earlier if a new reading shows room."""
        if self.paused_until is not None:
            return self.paused_until
        if self.next_read_at is not None and self.next_read_at < self.resets_at:
            return self.next_read_at
        return self.resets_at


@dataclass(frozen=True, slots=True)
class Hold:
    """An earlier chunk a pending chunk waits for under the key rule (SPEC section 5): they
    share a record key and it is not done yet (`Store.holds`)."""

    chunk_id: int
    file_id: int  # the chunk's owner (a pack's oldest file)
    file: str  # that file's name
    ticket: str  # its hand-over id
    index: int  # the chunk's index in that file
    status: ChunkStatus
    submitted_at: str | None  # its last job's times at Marketo, if it had one
    finished_at: str | None

    @property
    def final(self) -> bool:
        """Final, held only because a copy of it may still be at Marketo."""
        return self.status in FINAL_CHUNK_STATUSES
