"""The simulated Marketo subscription without HTTP: knobs, the import queue, its rows.

One FIFO queue serves the whole subscription, shared by leads, custom objects
and program members, as Marketo's Bulk Import does: at most `max_importing`
jobs import at once, at most `max_queued` are outstanding (queued plus
importing), and a create beyond that is refused with 1016. The queue runs on
the clock, lazily: `JobQueue.advance(now)` replays every start and finish that
happened up to `now`, in time order, so readers see what a background worker
would have produced, deterministically and without one.

A job imports for `job_overhead + rows / rows_per_second` seconds, its rows
applied one at a time as it goes (`simulator.importing`): rows of two jobs
importing at once are applied in turns, in time order. A file that cannot be
imported at all ends the job `Failed` with a message.

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

from orchestrator import (
    constants,
    delimited,  # noqa: F401 (raises csv's field limit for parse_upload)
)
from orchestrator.simulator.importing import Importing, Outcome, ParsedFile
from orchestrator.simulator.knobs import SimulatorConfig
from orchestrator.simulator.records import JobSpec, RecordStore

__all__ = ["Importing", "Job", "JobQueue", "Outcome", "ParsedFile", "Refusal", "parse_upload"]

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
    overhead: float = 0.0  # job_overhead and rows_per_second when it started
    rate: float = 1.0
    run: Importing | None = None  # its rows being applied, while it imports

    def next_event(self) -> float:
        """When its next row is applied, or, with none left, when it finishes."""
        if self.run is not None and self.run.remaining and self.started_at is not None:
            return self.started_at + self.overhead + (self.run.applied + 1) / self.rate
        return self.due_at

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
        """Replay every row applied, finish and the starts it allows up to `now`, in
        time order (two jobs at the same moment: the older first)."""
        while self.importing:
            job = min(self.importing, key=lambda j: (j.next_event(), j.batch_id))
            at = job.next_event()
            if at > now:
                return
            if job.run is None or not job.run.remaining:
                self._finish(job)
                self._fill(job.due_at)
                continue
            # Its rows up to the next event of another job (or now) go in one stretch.
            others = [(j.next_event(), j.batch_id) for j in self.importing if j is not job]
            until = min(others, default=(now, job.batch_id))
            while job.run.remaining and (at, job.batch_id) <= until and at <= now:
                job.run.apply_next(at)
                at = job.next_event()

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
            job.overhead, job.rate = self.config.job_overhead, self.config.rows_per_second
            job.due_at = at + job.overhead + job.rows / job.rate
            job.run = self._importing(job)
        self.importing.append(job)
        mine = sum(1 for j in self.importing if j.owner == job.owner)
        self.max_importing[job.owner] = max(self.max_importing.get(job.owner, 0), mine)

    def _importing(self, job: Job) -> Importing | None:
        """The import of a job of ours that starts now; None for a foreign one."""
        if job.spec is None or job.parsed is None:
            return None
        cfg = self.config
        # Not keeping records: the job's rows are checked against a store of their own.
        store = self.store if cfg.keep_records else RecordStore()
        return Importing.begin(
            job.spec,
            job.parsed,
            store,
            job.batch_id,
            warn_marker=cfg.warn_marker,
            dedupe=cfg.dedupe_fields(job.spec.api_name),
            lead_fields=cfg.lead_fields,
            partitions=cfg.partition_names,
            reverse=cfg.reverse_rows,
            twin_window=cfg.twin_window,
            omit_empty_values=cfg.omit_empty_values,
        )

    def resume(self, job: Job, progress: dict[str, Any]) -> None:
        """A job a state file left importing goes on where it was (`Importing.progress`)."""
        job.run = self._importing(job)
        if job.run is not None:
            job.run.resume(progress)

    def _finish(self, job: Job) -> None:
        self.importing.remove(job)
        if job.run is not None:
            job.status, job.outcome = job.run.finish()
        else:
            job.status, job.outcome = constants.STATUS_COMPLETE, Outcome()
        job.finished_at = job.due_at
        job.parsed, job.run = None, None  # the rows are stored; keep memory flat on long runs
