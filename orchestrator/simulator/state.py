"""The simulated subscription on disk: a JSON snapshot, so `run --simulate` can restart.

A real Marketo keeps its jobs and records while a client restarts; so does the
simulator when it is given a state file (the CLI gives data_dir/simulator.json).
`snapshot` turns the job queue (jobs with their uploaded rows while outstanding,
how far an importing job got with them, outcomes and failures/warnings files once
finished, the next batch id, peaks) and the stored records (with each key's history
and its twins) into JSON-ready data; `restore` builds them again. Tokens, the
call log and the call limits are not kept: a restarted client gets a new token, as
it would after a token expired. Nor are the knobs (`SimulatorConfig`, with the
counts `late_reply_copies` keeps): they belong to the process that sets them, and
`run --simulate` sets them again at every start. Uploaded rows keep their header
exactly as sent (Marketo does not trim " vin"), warnings files and all.

Times in the queue are readings of the simulator's monotonic clock, which means
nothing in another process. The snapshot stores each as an age (seconds before
the snapshot) with the wall-clock time of the snapshot; restoring counts the
downtime in, so jobs keep importing while the process is down, as Marketo's do.

Writes are atomic (a temporary file, fsync, rename). No sqlite3 here: the
simulator shares no code path with the product it stands in for.
"""

from __future__ import annotations

import json
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any

from orchestrator.durable import write_atomic
from orchestrator.models import ObjectType
from orchestrator.simulator.queue import Job, JobQueue, Outcome, ParsedFile
from orchestrator.simulator.records import JobSpec, Key, RecordStore

VERSION = 1


class StateError(Exception):
    """The state file cannot be used (unreadable, not ours, or from another version)."""


def snapshot(queue: JobQueue, now: float, wall: float | None = None) -> dict[str, Any]:
    """The queue and its records as JSON-ready data, times as ages before `now`."""

    def age(t: float | None) -> float | None:
        return None if t is None else now - t

    def job_data(job: Job) -> dict[str, Any]:
        outcome = job.outcome
        return {
            "batch_id": job.batch_id,
            "owner": job.owner,
            "spec": None if job.spec is None else asdict(job.spec),
            "queued_at": age(job.queued_at),
            "parsed": None if job.parsed is None else asdict(job.parsed),
            "rows": job.rows,
            "deadline": age(job.deadline),
            "status": job.status,
            "started_at": age(job.started_at),
            "due_at": age(job.due_at) if job.started_at is not None else None,
            "finished_at": age(job.finished_at),
            "overhead": job.overhead,
            "rate": job.rate,
            "run": None if job.run is None else job.run.progress(),
            "outcome": {
                **asdict(outcome),
                "failures": text(outcome.failures),
                "warnings": text(outcome.warnings),
            },
        }

    store = queue.store
    return {
        "version": VERSION,
        "saved_at": time.time() if wall is None else wall,
        "next_batch_id": queue.next_batch_id,
        "jobs": [job_data(job) for job in queue.jobs.values()],
        "waiting": [job.batch_id for job in queue.waiting],
        "importing": [job.batch_id for job in queue.importing],
        "max_outstanding": queue.max_outstanding,
        "max_importing": queue.max_importing,
        "records": {
            "leads": {str(k): v for k, v in store.leads.items()},
            "lists": {str(k): [*v] for k, v in store.lists.items()},
            "custom": store.custom,
            "members": store.members,
            "partitions": {str(k): v for k, v in store.partitions.items()},
            "next_lead_id": store.next_lead_id,
            "history": [
                [list(key), [[age(t), batch, values] for t, batch, values in rows]]
                for key, rows in store.history.items()
            ],
            "created": [[list(key), age(t), batch] for key, (t, batch) in store.created.items()],
            "twinned": [list(key) for key in store.twinned],
            "custom_twins": store.custom_twins,
        },
    }


def restore(queue: JobQueue, data: Any, now: float, wall: float | None = None) -> None:
    """Put a `snapshot` back into an empty `queue`; StateError if it is not one of ours."""
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise StateError(f"not a version {VERSION} simulator state")
    try:
        downtime = max(0.0, (time.time() if wall is None else wall) - float(data["saved_at"]))

        def at(age: float | None) -> float | None:
            return None if age is None else now - float(age) - downtime

        jobs = {int(j["batch_id"]): job_from(j, at) for j in data["jobs"]}
        progress_of = {int(j["batch_id"]): j["run"] for j in data["jobs"] if j.get("run")}
        records = data["records"]
        store = RecordStore()
        store.leads = {int(k): dict(v) for k, v in records["leads"].items()}
        store.lists = {
            int(k): dict.fromkeys(int(i) for i in v) for k, v in records["lists"].items()
        }
        store.custom = {
            k: {kk: dict(vv) for kk, vv in v.items()} for k, v in records["custom"].items()
        }
        store.members = {
            k: {kk: dict(vv) for kk, vv in v.items()} for k, v in records["members"].items()
        }
        store.partitions = {int(k): str(v) for k, v in records.get("partitions", {}).items()}
        store.next_lead_id = int(records["next_lead_id"])
        restore_keys(store, records, at)
        waiting = deque(jobs[int(b)] for b in data["waiting"])
        importing = [jobs[int(b)] for b in data["importing"]]
        next_batch_id = int(data["next_batch_id"])
        peaks = (dict(data["max_outstanding"]), dict(data["max_importing"]))
    except (KeyError, TypeError, ValueError) as exc:
        raise StateError(f"malformed simulator state ({type(exc).__name__}: {exc})") from None
    queue.store = store
    queue.jobs = jobs
    queue.waiting = waiting
    queue.importing = importing
    queue.next_batch_id = next_batch_id
    queue.max_outstanding, queue.max_importing = peaks
    for job in importing:  # on where it was, against the records restored
        progress = progress_of.get(job.batch_id)
        if progress is not None:
            queue.resume(job, progress)


def job_from(data: dict[str, Any], at: Callable[[float | None], float | None]) -> Job:
    spec = data["spec"]
    parsed = data["parsed"]
    outcome = dict(data["outcome"])
    for kind in ("failures", "warnings"):
        outcome[kind] = None if outcome[kind] is None else str(outcome[kind]).encode("utf-8")
    queued_at = at(data["queued_at"])
    assert queued_at is not None
    return Job(
        batch_id=int(data["batch_id"]),
        owner=str(data["owner"]),
        spec=None
        if spec is None
        else JobSpec(**{**spec, "object_type": ObjectType(spec["object_type"])}),
        queued_at=queued_at,
        parsed=None if parsed is None else ParsedFile(**parsed),
        rows=int(data["rows"]),
        deadline=at(data["deadline"]),
        status=str(data["status"]),
        started_at=at(data["started_at"]),
        due_at=at(data["due_at"]) or 0.0,
        finished_at=at(data["finished_at"]),
        outcome=Outcome(**{f.name: outcome[f.name] for f in fields(Outcome)}),
        overhead=float(data.get("overhead", 0.0)),
        rate=float(data.get("rate", 1.0)),
    )


def restore_keys(
    store: RecordStore, records: dict[str, Any], at: Callable[[float | None], float | None]
) -> None:
    """Each key's history, creation and twins (none in a state saved before they were
    kept), times back on this process's clock."""

    def key(data: list[Any]) -> Key:
        kind, scope, value = (str(part) for part in data)
        return kind, scope, value

    def when(age: float) -> float:
        moment = at(age)
        assert moment is not None
        return moment

    store.history = {
        key(k): [
            (when(t), int(b), {str(n): str(v) for n, v in vals.items()}) for t, b, vals in rows
        ]
        for k, rows in records.get("history", [])
    }
    store.created = {key(k): (when(t), int(b)) for k, t, b in records.get("created", [])}
    store.twinned = {key(k) for k in records.get("twinned", [])}
    store.custom_twins = {
        str(api): [dict(row) for row in rows]
        for api, rows in records.get("custom_twins", {}).items()
    }


def text(data: bytes | None) -> str | None:
    return None if data is None else data.decode("utf-8")


def save_state(path: Path, data: dict[str, Any]) -> None:
    """Write `data` to `path` atomically (blocking: run it in a thread)."""
    write_atomic(path, json.dumps(data, separators=(",", ":")).encode())


def load_state(path: Path) -> Any | None:
    """The JSON at `path`, None if there is no file; StateError if it cannot be read."""
    try:
        with path.open(encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        raise StateError(f"cannot read {path}: {exc}") from None
