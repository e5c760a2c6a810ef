"""What the orchestrator is doing, as data: files and chunks from the state store.

- `jobs_snapshot`: files and chunks as JSON-ready data, the body of `GET /jobs`
  and of `marketo-orchestrator status --json` (`read_snapshot` opens the store
  for the CLI).
- `Query`: which files a snapshot shows: by id, name, activity, status, limit.
  `load_snapshot` is the one way from a query to the store: it asks the
  store's bounded `listing` (active work first in claim order, then the most
  recently finished; at most `limit` files, `JOBS_LIMIT` unless the query says
  otherwise), so its cost follows the limit and the active files, never the
  months of history; the totals count everything the store holds, from the
  tallies its triggers keep. `truncated` says more files matched than shown.
- `live_state` and `WAITING_FOR`: what a file waits for now, in a word and in
  a phrase (the progress lines say the phrase).
- `quota_entry`: the subscription's daily quota as the daemon last reckoned it
  (`"quota"` in the snapshot): how much of it was used, when it resets, and,
  while no new job is created for it, why (`"reason"`).
- The key rule: a pending chunk that waits for an earlier chunk sharing record keys
  with it (`Store.holds`) says which (`held_by`: file, id and chunk), its file which
  of its chunks is held first (`held`), and the file's state is `held` where it
  would be `waiting`.

Work paths and other internals stay out of the snapshot; the store holds no
secrets, so none can leak from here.
"""

from __future__ import annotations

import asyncio
import fnmatch
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Final

from orchestrator.clock import stamp, utc_now
from orchestrator.errors import StoreError
from orchestrator.metrics import StoreReader
from orchestrator.models import (
    FINAL_CHUNK_STATUSES,
    FINAL_FILE_STATUSES,
    ChunkRecord,
    ChunkStatus,
    FileRecord,
    FileStatus,
    Hold,
    QuotaState,
)
from orchestrator.store import Store

JOBS_LIMIT: Final = 100  # a snapshot's files when the query names no limit (GET /jobs)


@dataclass(frozen=True, slots=True)
class Query:
    """Which files a snapshot shows (the totals always count every file)."""

    ticket: str | None = None  # exactly this hand-over id
    name: str | None = None  # the file name, or a shell pattern (`nightly-*.csv`)
    active: bool = False  # only files without a result yet
    statuses: frozenset[str] | None = None  # file statuses or live states
    limit: int | None = None  # at most this many files


def jobs_snapshot(
    files: list[FileRecord],
    chunks: list[ChunkRecord],
    query: Query | None = None,
    tallies: Mapping[str, int] | None = None,
    quota: dict[str, Any] | None = None,
    holds: Holds | None = None,
) -> dict[str, Any]:
    """Files (active work first in claim order, then the latest finished) with their chunks
    (in file order), and totals by status: from the store's `tallies` when given
    (everything it holds), else counted over `files` and `chunks`; the `quota_entry`.
    `holds`: what the key rule's held chunks wait for (`Store.holds`)."""
    query = query or Query()
    holds = holds or {}
    by_file: dict[int, list[ChunkRecord]] = defaultdict(list)
    for chunk in chunks:
        by_file[chunk.file_id].append(chunk)
    entries = [file_entry(f, sorted(by_file[f.id], key=lambda c: c.index), holds) for f in files]
    active = sorted(
        (e for e in entries if e["status"] not in FINAL),
        key=lambda e: (e["claimed_at"], e["file_id"]),
    )
    finished = sorted(
        (e for e in entries if e["status"] in FINAL),
        key=lambda e: (e["finished_at"] or "", e["file_id"]),
        reverse=True,
    )
    shown = [e for e in active + finished if matches(e, query)]
    limit = len(shown) if query.limit is None else query.limit
    return {
        "files": shown[:limit],
        "totals": totals(files, chunks) if tallies is None else totals_from_tallies(tallies),
        "truncated": len(shown) > limit,
        "quota": quota,
    }


FINAL: Final = frozenset(str(s) for s in FINAL_FILE_STATUSES)


def matches(entry: dict[str, Any], query: Query) -> bool:
    if query.ticket is not None and entry["id"] != query.ticket:
        return False
    if query.name is not None and not fnmatch.fnmatchcase(entry["file"], query.name):
        return False
    if query.active and entry["status"] in FINAL:
        return False
    wanted = query.statuses
    return wanted is None or entry["status"] in wanted or entry["state"] in wanted


def live_state(file: FileRecord, chunks: list[ChunkRecord], *, held: bool = False) -> str:
    """What a file waits for now, in a word.

    claimed, splitting; packing (its records are in a pack that waits for more small
    files); then, while its chunks are at Marketo: importing (one of them is), queued
    (submitted, waiting in Marketo's queue), held (a chunk of it waits for an earlier
    job sharing record keys with it: `held`), waiting (for a slot in our queue or a
    backoff); finishing; complete or failed."""
    if file.status in (FileStatus.CLAIMING, FileStatus.CLAIMED):
        return "claimed"
    if file.status in (FileStatus.FINISHING, *FINAL_FILE_STATUSES):
        return str(file.status)
    if any(c.marketo_status == "Importing" for c in chunks):
        return "importing"
    if any(c.status is ChunkStatus.SUBMITTED for c in chunks):
        return "queued"
    if file.status is FileStatus.SPLITTING and not any(
        c.status not in FINAL_CHUNK_STATUSES for c in chunks
    ):
        return "splitting"
    if any(not c.sealed for c in chunks):
        return "packing"
    return "held" if held else "waiting"


# What a file in each live state waits for (progress lines).
WAITING_FOR: Final = {
    "inbox": "a daemon to claim it",
    "claimed": "the splitter",
    "splitting": "the splitter",
    "packing": "more small files to share a job (limits.pack_wait_seconds)",
    "waiting": "a queue slot",
    "held": "an earlier job sharing record keys with it",
    "queued": "Marketo's queue",
    "importing": "Marketo's import",
    "finishing": "the result file",
}


Holds = Mapping[int, tuple[Hold, ...]]


def file_entry(
    file: FileRecord, chunks: list[ChunkRecord], holds: Holds | None = None
) -> dict[str, Any]:
    final = file.status in FINAL_FILE_STATUSES
    waits = {c.id: hold_entries(holds.get(c.id, ())) for c in chunks} if holds else {}
    first = next((c for c in chunks if waits.get(c.id)), None)
    return {
        "id": file.ticket,
        "file_id": file.id,
        "route": file.route,
        "file": file.name,
        "status": file.status.value,
        "state": live_state(file, chunks, held=first is not None),
        "error": file.error,
        "rows": file.rows,
        "rows_processed": sum(c.rows_processed for c in chunks),
        "rows_failed": sum(c.rows_failed for c in chunks),
        "rows_with_warning": sum(c.rows_with_warning for c in chunks),
        "chunks_done": sum(1 for c in chunks if c.status in FINAL_CHUNK_STATUSES),
        "chunks_total": file.chunks_total,
        "batch_ids": [c.batch_id for c in chunks if c.batch_id is not None],
        "claimed_at": file.claimed_at,
        "finished_at": file.finished_at,
        "result": result_in_data_dir(file.result_path) if final else None,
        "held": None if first is None else {"chunk": first.index, "waits_for": waits[first.id]},
        "chunks": [chunk_entry(c, waits.get(c.id)) for c in chunks],
    }


def hold_entries(holds: tuple[Hold, ...]) -> list[dict[str, Any]]:
    """The earlier chunks a held chunk waits for: file, hand-over id, chunk index."""
    return [{"id": h.ticket, "file": h.file, "chunk": h.index} for h in holds]


def result_in_data_dir(path: str | None) -> str | None:
    """A result path as `<done|failed>/<route>/<name>.result.json`, relative to data_dir
    (the store keeps it as the daemon spelled data_dir; a pipeline may mount it elsewhere)."""
    if not path:
        return None
    return "/".join(Path(path).parts[-3:])


def chunk_entry(chunk: ChunkRecord, held_by: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    return {
        "index": chunk.index,
        "rows": chunk.rows,
        "bytes": chunk.bytes,
        "status": chunk.status.value,
        "batch_id": chunk.batch_id,
        "marketo_status": chunk.marketo_status,
        "rows_processed": chunk.rows_processed,
        "rows_failed": chunk.rows_failed,
        "rows_with_warning": chunk.rows_with_warning,
        "message": chunk.message,
        "submit_attempts": chunk.submit_attempts,
        "shared": shared_entry(chunk),
        "held_by": held_by or None,
    }


def shared_entry(chunk: ChunkRecord) -> dict[str, int] | None:
    """For a chunk several small files share (a pack), the whole job: how many files,
    rows and bytes (the chunk's own rows, bytes and counters are this file's share)."""
    if chunk.files == 1:
        return None
    return {"files": chunk.files, "rows": chunk.job_rows, "bytes": chunk.job_bytes}


def totals(files: list[FileRecord], chunks: list[ChunkRecord]) -> dict[str, Any]:
    file_counts = Counter(f.status for f in files)
    chunk_counts = Counter(c.status for c in chunks)
    return {
        "files": {s.value: file_counts[s] for s in FileStatus},
        "chunks": {s.value: chunk_counts[s] for s in ChunkStatus},
        "jobs_outstanding": chunk_counts[ChunkStatus.SUBMITTED],
    }


def totals_from_tallies(tallies: Mapping[str, int]) -> dict[str, Any]:
    """`totals` from the counts the store keeps as rows change."""
    return {
        "files": {s.value: tallies.get(f"files:{s.value}", 0) for s in FileStatus},
        "chunks": {s.value: tallies.get(f"chunks:{s.value}", 0) for s in ChunkStatus},
        "jobs_outstanding": tallies.get(f"chunks:{ChunkStatus.SUBMITTED.value}", 0),
    }


def quota_entry(state: QuotaState | None, now: datetime | None = None) -> dict[str, Any] | None:
    """The daily quota as the daemon last reckoned it; None before it ever did. Past its
    reset the day it describes is over: nothing waits for it any more."""
    if state is None:
        return None
    over = (now or utc_now()) >= state.resets_at
    paused = state.creates_paused and not over
    return {
        "daily_quota": state.quota,
        "daily_reserve": state.reserve,
        "limit": state.limit,
        "used": 0 if over else state.used,
        "marketo_count": None if over else state.marketo_count,
        "read_at": None if over or state.read_at is None else stamp(state.read_at),
        "ours_today": state.ours_today,
        "resets_at": stamp(state.resets_at),
        "as_of": stamp(state.as_of),
        "creates_paused": paused,
        "reason": quota_reason(state) if paused else None,
    }


def quota_reason(state: QuotaState) -> str:
    """Why no new import job is created, and until when."""
    if state.paused_until is not None:
        return (
            "Marketo answered 607 (daily quota reached): every call waits until "
            f"{stamp(state.paused_until)}"
        )
    again = ""
    if state.next_read_at is not None and state.next_read_at < state.resets_at:
        again = (
            f" (or until Marketo's count, read again at {stamp(state.next_read_at)}, shows room)"
        )
    return (
        f"the subscription used {state.used} of its {state.quota} daily API calls and "
        f"{state.reserve} are left for other integrations (limits.daily_reserve): no new "
        f"import job until the quota resets at {stamp(state.resets_at)}{again}; jobs at "
        "Marketo are still polled"
    )


# The file statuses a file in each live state can have (live states are read from chunks).
LIVE_STATES: Final = {
    "claimed": frozenset({FileStatus.CLAIMING, FileStatus.CLAIMED}),
    "splitting": frozenset({FileStatus.SPLITTING}),
    "packing": frozenset({FileStatus.SPLIT}),
    "waiting": frozenset({FileStatus.SPLITTING, FileStatus.SPLIT}),
    "held": frozenset({FileStatus.SPLITTING, FileStatus.SPLIT}),
    "queued": frozenset({FileStatus.SPLITTING, FileStatus.SPLIT}),
    "importing": frozenset({FileStatus.SPLITTING, FileStatus.SPLIT}),
}


FILE_STATUSES: Final = frozenset(s.value for s in FileStatus)


def store_statuses(query: Query) -> tuple[set[FileStatus] | None, bool]:
    """The file statuses to ask the store for, and whether a live state must then be
    checked on each file (`matches`) so that the store cannot apply the limit itself."""
    wanted: set[FileStatus] | None = None
    live = False
    if query.statuses is not None:
        wanted = set()
        for name in query.statuses:
            if name in LIVE_STATES:
                wanted |= LIVE_STATES[name]
            if name in FILE_STATUSES:
                wanted.add(FileStatus(name))
            else:
                live = True
    if query.active:
        wanted = (set(FileStatus) if wanted is None else wanted) - FINAL_FILE_STATUSES
    return wanted, live


def glob_of(pattern: str) -> str:
    """A shell pattern (fnmatch) as SQLite's GLOB spells it: `[!...]` is `[^...]`."""
    return pattern.replace("[!", "[^")


async def load_snapshot(store: StoreReader, query: Query | None = None) -> dict[str, Any]:
    """The snapshot of at most `query.limit` files (`JOBS_LIMIT` by default), read through
    the store's bounded listing, with their chunks and the store's tallies."""
    query = query or Query()
    limit = JOBS_LIMIT if query.limit is None else query.limit
    bounded = replace(query, limit=limit)
    tallies = await store.tallies()
    statuses, live = store_statuses(query)
    # One more than the limit tells whether there are more (`truncated`). A live state
    # (waiting, queued, importing) is known only from a file's chunks: the store returns
    # every active file of the statuses it allows (active work is what is in flight,
    # not the history) and `jobs_snapshot` keeps those in that state.
    files = await store.listing(
        limit=None if live else limit + 1,
        statuses=statuses,
        ticket=query.ticket,
        name_glob=None if query.name is None else glob_of(query.name),
    )
    chunks = await store.chunks_of(f.id for f in files)
    holds = await store.holds(c.id for c in chunks if c.status is ChunkStatus.PENDING)
    quota = quota_entry(await store.quota())
    return jobs_snapshot(files, chunks, bounded, tallies, quota, holds)


async def read_snapshot(db_path: Path, query: Query | None = None) -> dict[str, Any]:
    """Open the state store at `db_path` (read, then close) and snapshot it.

    No store there is a `StoreError` (a wrong data_dir, or a daemon that never
    ran with it); nothing is created on disk.
    """
    if not await asyncio.to_thread(db_path.is_file):
        raise StoreError(
            db_path,
            "no state store here: is data_dir right (--config, ORCHESTRATOR_DATA_DIR)? "
            "It appears once a daemon has run with this data_dir",
        )
    store = await Store.open(db_path, check=False)  # the daemon checked it at its start
    try:
        return await load_snapshot(store, query)
    finally:
        await store.close()
