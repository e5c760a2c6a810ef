"""The simulated Marketo subscription without HTTP: knobs, the import queue, its rows.

One FIFO queue serves the whole subscription, shared by leads, custom objects
and program members, as Marketo's Bulk Import does: at most `max_importing`
jobs import at once, at most `max_queued` are outstanding (queued plus
importing), and a create beyond that is refused with 1016. The queue runs on
the clock, lazily: `JobQueue.advance(now)` replays every start and finish that
happened up to `now`, in time order, so readers see what a background worker
would have produced, deterministically and without one.

A job imports for `job_overhead + rows / rows_per_second` seconds. When it
finishes its rows are checked and stored insert-or-update (`simulator.records`);
rows that fail or warn go to failures/warnings files in the job's delimiter,
with Marketo's reason column last. A file that cannot be imported at all (not
UTF-8, no header, a header without the lookup field, or without `email` for
program members) ends the job `Failed` with a message.

Foreign jobs stand for another integration's imports. They are ordinary jobs
of the queue: they hold an outstanding slot from the moment they are added,
take import slots in FIFO turn, and all leave the queue `seconds` after they
were added (a foreign job whose turn comes later leaves as soon as it starts).
So "8 foreign jobs for 30 s" leaves us 2 outstanding slots and, while they
hold both import slots, none of our jobs imports during those 30 s.
"""

from __future__ import annotations

import csv
import io
from collections import deque
from dataclasses import dataclass, field
from typing import Any

# delimited also raises the csv module's field limit: Marketo takes far larger fields.
from orchestrator import constants, delimited
from orchestrator.models import ObjectType
from orchestrator.simulator.knobs import SimulatorConfig
from orchestrator.simulator.records import (
    Columns,
    JobSpec,
    RecordStore,
    Warned,
    partition_problem,
)

FOREIGN_OWNER = "foreign"
FIRST_BATCH_ID = 1001
# Marketo's error codes for a refused create.
TOO_MANY_IMPORTS = ("1016", "Too many imports")
IMPORT_IN_PROGRESS = ("1019", "Import in progress")


class Refusal(Exception):
    """Marketo says no: the error code and message of a response envelope."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code} {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, slots=True)
class ParsedFile:
    """An uploaded file read with the csv module; `error` set when it cannot be imported."""

    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    error: str | None = None


def parse_upload(data: bytes, delimiter: str) -> ParsedFile:
    """Decode and split an upload (blank lines skipped). Pure; run it in a thread."""
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return ParsedFile(error=f"file is not valid UTF-8 (byte {exc.start})")
    try:
        records = [r for r in csv.reader(io.StringIO(text, newline=""), delimiter=delimiter) if r]
    except csv.Error as exc:
        return ParsedFile(error=f"malformed file ({exc})")
    if not records or not any(name.strip() for name in records[0]):
        return ParsedFile(error="file has no header row")
    header = list(records[0])  # as sent: Marketo does not trim " vin" to "vin"
    if len(set(header)) != len(header):
        return ParsedFile(error="header row names a column twice")
    return ParsedFile(header=header, rows=records[1:])


@dataclass(frozen=True, slots=True)
class Outcome:
    """What a finished job reports and leaves behind."""

    processed: int = 0
    failed: int = 0
    warned: int = 0
    message: str = ""
    failures: bytes | None = None
    warnings: bytes | None = None


@dataclass(slots=True, eq=False)
class Job:
    """One import job; mutable state owned by `JobQueue`. `spec` None: a foreign job."""

    batch_id: int
    owner: str
    spec: JobSpec | None
    queued_at: float
    parsed: ParsedFile | None = None
    rows: int = 0
    deadline: float | None = None
    status: str = constants.STATUS_QUEUED
    started_at: float | None = None
    due_at: float = 0.0
    finished_at: float | None = None
    outcome: Outcome = field(default_factory=Outcome)

    @property
    def object_name(self) -> str:
        return str(self.spec.object_type) if self.spec else FOREIGN_OWNER

    def as_dict(self, t0: float) -> dict[str, Any]:
        """The job for the test API; times in seconds since the simulator started."""

        def rel(t: float | None) -> float | None:
            return None if t is None else round(t - t0, 6)

        spec = self.spec
        return {
            "batch_id": self.batch_id,
            "object": self.object_name,
            "owner": self.owner,
            "status": self.status,
            "rows": self.rows,
            "queued_at": rel(self.queued_at),
            "started_at": rel(self.started_at),
            "finished_at": rel(self.finished_at),
            "processed": self.outcome.processed,
            "failed": self.outcome.failed,
            "warned": self.outcome.warned,
            "message": self.outcome.message,
            "api_name": spec.api_name if spec else "",
            "program_id": spec.program_id if spec else "",
            "list_id": spec.list_id if spec else None,
        }


def run_job(
    job: Job,
    store: RecordStore,
    warn_marker: str,
    dedupe: tuple[str, ...] = (),
    lead_fields: tuple[str, ...] = (),
    partitions: tuple[str, ...] = (),
    *,
    omit_empty_values: bool = False,
) -> tuple[str, Outcome]:
    """Import a finished job's rows; returns its final status and outcome. `partitions`:
    the lead partitions the API user may import to (none: not checked); failures and
    warnings files without their empty values and columns with `omit_empty_values`."""
    parsed, spec = job.parsed, job.spec
    if spec is None or parsed is None:
        return constants.STATUS_COMPLETE, Outcome()
    if parsed.error:
        return constants.STATUS_FAILED, Outcome(message=f"Import failed: {parsed.error}")
    header, width = parsed.header, len(parsed.header)
    key = spec.lookup_field if spec.object_type is ObjectType.LEADS else "email"
    if spec.object_type is not ObjectType.CUSTOM_OBJECT and not Columns.of(header, key).key:
        message = f"Import failed: field '{key}' is not a column of the file"
        return constants.STATUS_FAILED, Outcome(message=message)
    store_row = store.importer(spec, header, dedupe, lead_fields, partitioned=bool(partitions))
    refused = partition_problem(spec, partitions)  # every row of the job alike
    failures: list[list[str]] = []
    warnings: list[list[str]] = []
    for row in parsed.rows:
        if len(row) != width:  # short rows are padded so the reason lands in its column
            reason = f"1003 Row has {len(row)} fields, the header has {width}"
            failures.append([*row, *[""] * (width - len(row)), reason])
            continue
        if refused:
            failures.append([*row, refused])
            continue
        values = dict(zip(header, row, strict=True))
        ignored = [k for k, v in values.items() if v == warn_marker] if warn_marker in row else []
        for name in ignored:
            del values[name]
        failure = store_row(values)
        if isinstance(failure, Warned):
            warnings.append([*row, str(failure)])
        elif failure:
            failures.append([*row, failure])
        elif ignored:
            warnings.append([*row, f"1005 Value ignored for field(s): {', '.join(ignored)}"])
    processed, failed = len(parsed.rows) - len(failures), len(failures)
    message = f"{processed} records imported ({processed} members)"  # Adobe's words
    if failed:
        message = f"Import completed with errors, {message}, {failed} failed"
    else:
        message = f"Import succeeded, {message}"
    if warnings:  # "1 warning." in Adobe's example; the plural is assumed
        message += f", {len(warnings)} warning{'s' if len(warnings) > 1 else ''}."
    delimiter = delimited.DELIMITERS[spec.fmt.lower()]
    return constants.STATUS_COMPLETE, Outcome(
        processed=processed,
        failed=failed,
        warned=len(warnings),
        message=message,
        failures=write_rows(
            header, constants.FAILURE_REASON_COLUMN, failures, delimiter, omit_empty_values
        ),
        warnings=write_rows(
            header, constants.WARNING_REASON_COLUMN, warnings, delimiter, omit_empty_values
        ),
    )


def write_rows(
    header: list[str],
    reason: str,
    rows: list[list[str]],
    delimiter: str,
    omit_empty: bool = False,
) -> bytes | None:
    """A failures or warnings file: header plus reason column, then the rows; None if none.
    `omit_empty`: only the columns with a value in at least one row (see the knob)."""
    if not rows:
        return None
    if omit_empty:
        width = len(header)
        kept = [i for i in range(width) if any(row[i] for row in rows if i < len(row) - 1)]
        header = [header[i] for i in kept]
        rows = [[*(row[i] for i in kept), row[-1]] for row in rows]
    out = io.StringIO()
    writer = csv.writer(out, delimiter=delimiter, lineterminator="\n")
    writer.writerow([*header, reason])
    writer.writerows(rows)
    return out.getvalue().encode("utf-8")


class JobQueue:
    """The subscription's FIFO import queue, advanced lazily on the clock."""

    def __init__(self, config: SimulatorConfig) -> None:
        self.config = config
        self.store = RecordStore()
        self.jobs: dict[int, Job] = {}
        self.max_outstanding: dict[str, int] = {}
        self.max_importing: dict[str, int] = {}
        self.waiting: deque[Job] = deque()
        self.importing: list[Job] = []
        self.next_batch_id = FIRST_BATCH_ID

    def reset(self) -> None:
        """Forget jobs, records and peaks; batch ids keep increasing."""
        self.store = RecordStore()
        self.jobs.clear()
        self.max_outstanding.clear()
        self.max_importing.clear()
        self.waiting.clear()
        self.importing.clear()

    def reconfigure(self, config: SimulatorConfig, now: float) -> None:
        """Apply new knobs from `now` on (a larger max_importing starts jobs now)."""
        self.advance(now)
        self.config = config
        self._fill(now)

    def outstanding(self) -> list[Job]:
        return [*self.importing, *self.waiting]

    def check_room(self, spec: JobSpec | None) -> None:
        """Raise 1016 when the queue is full, 1019 when the static list has an import."""
        outstanding = self.outstanding()
        if len(outstanding) >= self.config.max_queued:
            raise Refusal(*TOO_MANY_IMPORTS)
        if spec is None or spec.list_id is None:
            return
        for job in outstanding:
            other = job.spec
            if other and other.object_type is spec.object_type and other.list_id == spec.list_id:
                raise Refusal(*IMPORT_IN_PROGRESS)

    def submit(self, spec: JobSpec, parsed: ParsedFile, owner: str, now: float) -> Job:
        """Queue a create (or raise Refusal); it starts at once if a slot is free."""
        self.advance(now)
        self.check_room(spec)
        job = self._enqueue(Job(self._take_id(), owner, spec, now, parsed, len(parsed.rows)))
        self._fill(now)
        return job

    def failed_create(self, spec: JobSpec, owner: str, now: float, message: str) -> Job:
        """A create answered `Failed`: its batch id is spent and says Failed, but no job
        ever took a slot of the queue (or imported a row)."""
        self.advance(now)
        self.check_room(spec)
        job = Job(self._take_id(), owner, spec, now, status=constants.STATUS_FAILED)
        job.finished_at = now
        job.outcome = Outcome(message=message)
        self.jobs[job.batch_id] = job
        return job

    def add_foreign(self, count: int, seconds: float, now: float) -> list[Job]:
        """Add up to `count` foreign jobs (as many as the queue has room for)."""
        self.advance(now)
        room = max(0, self.config.max_queued - len(self.outstanding()))
        added = [
            self._enqueue(Job(self._take_id(), FOREIGN_OWNER, None, now, deadline=now + seconds))
            for _ in range(min(count, room))
        ]
        self._fill(now)
        return added

    def advance(self, now: float) -> None:
        """Replay every finish (and the starts it allows) up to `now`, in time order."""
        while self.importing:
            job = min(self.importing, key=lambda j: (j.due_at, j.batch_id))
            if job.due_at > now:
                return
            self._finish(job)
            self._fill(job.due_at)

    def _take_id(self) -> int:
        batch_id = self.next_batch_id
        self.next_batch_id += 1
        return batch_id

    def _enqueue(self, job: Job) -> Job:
        self.jobs[job.batch_id] = job
        self.waiting.append(job)
        mine = sum(1 for j in self.outstanding() if j.owner == job.owner)
        self.max_outstanding[job.owner] = max(self.max_outstanding.get(job.owner, 0), mine)
        return job

    def _fill(self, at: float) -> None:
        while self.waiting and len(self.importing) < self.config.max_importing:
            self._start(self.waiting.popleft(), at)

    def _start(self, job: Job, at: float) -> None:
        at = max(at, job.queued_at)
        job.status = constants.STATUS_IMPORTING
        job.started_at = at
        if job.deadline is not None:
            job.due_at = max(at, job.deadline)
        else:
            job.due_at = at + self.config.job_overhead + job.rows / self.config.rows_per_second
        self.importing.append(job)
        mine = sum(1 for j in self.importing if j.owner == job.owner)
        self.max_importing[job.owner] = max(self.max_importing.get(job.owner, 0), mine)

    def _finish(self, job: Job) -> None:
        self.importing.remove(job)
        # Not keeping records: the job's rows are checked against a store of their own.
        store = self.store if self.config.keep_records else RecordStore()
        config, spec = self.config, job.spec
        dedupe = config.dedupe_fields(spec.api_name) if spec is not None else ()
        job.status, job.outcome = run_job(
            job,
            store,
            config.warn_marker,
            dedupe,
            config.lead_fields,
            config.partition_names,
            omit_empty_values=config.omit_empty_values,
        )
        job.finished_at = job.due_at
        job.parsed = None  # the rows are stored; keep memory flat on long runs
