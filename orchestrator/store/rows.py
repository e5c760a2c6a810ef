"""Rows to records, and the rules every transition checks (run in the store's thread).

Records come out of two shapes of query: a chunk as the job it is (`fetch_chunk`,
`select_chunks`) and a chunk as one of its files sees it (`select_views`). The
rules (`require`, `check_batch`, `check_finish`) raise ValueError: an illegal
transition is a bug of the caller, never a state of the world. The few writes that
more than one transition makes (`insert_chunk`, `mark_split`, `write_batch`) live
here too, so each is written once.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from typing import Any

from orchestrator.models import (
    FINAL_CHUNK_STATUSES,
    BatchStatus,
    ChunkRecord,
    ChunkStatus,
    FileRecord,
    FileStatus,
)
from orchestrator.store.conflicts import enter_key_order


def file_record(row: sqlite3.Row) -> FileRecord:
    values = dict(zip(row.keys(), row, strict=True))
    values["status"] = FileStatus(values["status"])
    values["warnings"] = tuple(json.loads(values["warnings"] or "[]"))
    return FileRecord(**values)


def chunk_record(row: sqlite3.Row) -> ChunkRecord:
    values = dict(zip(row.keys(), row, strict=True))
    values["status"] = ChunkStatus(values["status"])
    values["index"] = values.pop("idx")  # INDEX is an SQL keyword
    values["sealed"] = bool(values["sealed"])
    values["attributed"] = bool(values["attributed"])
    return ChunkRecord(**values)


# A chunk as the job it is: every column, the whole chunk's size again as job_*.
_JOB_COLUMNS = "c.*, 0 AS first_row, c.rows AS job_rows, c.bytes AS job_bytes"

# A chunk as one file sees it (over chunks `c` and that file's piece `p`): the file's
# share of rows, bytes and counters, the whole chunk as job_*. A chunk of one file is
# its own share: its counters are Marketo's, live while it imports.
_VIEW_COLUMNS = """c.id, p.file_id, c.idx, c.path, p.rows, p.bytes, p.first_line, c.status,
    c.batch_id, c.submit_attempts, c.marketo_status,
    CASE WHEN c.files > 1 THEN p.rows_processed ELSE c.rows_processed END AS rows_processed,
    CASE WHEN c.files > 1 THEN p.rows_failed ELSE c.rows_failed END AS rows_failed,
    CASE WHEN c.files > 1 THEN p.rows_with_warning ELSE c.rows_with_warning END
        AS rows_with_warning,
    c.message, c.failures_path, c.warnings_path, c.submitted_at, c.finished_at,
    c.unknown_outcomes, c.files, c.sealed, p.first_row, c.rows AS job_rows,
    c.bytes AS job_bytes, c.attributed, c.unmatched_rows"""


def fetch_file(conn: sqlite3.Connection, file_id: int) -> FileRecord:
    row = conn.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
    if row is None:
        raise LookupError(f"no file with id {file_id} in the state store")
    return file_record(row)


def fetch_chunk(conn: sqlite3.Connection, chunk_id: int) -> ChunkRecord:
    row = conn.execute(f"SELECT {_JOB_COLUMNS} FROM chunks AS c WHERE id = ?", (chunk_id,))
    found = row.fetchone()
    if found is None:
        raise LookupError(f"no chunk with id {chunk_id} in the state store")
    return chunk_record(found)


def select_chunks(conn: sqlite3.Connection, where: str, params: list[Any]) -> list[ChunkRecord]:
    """Chunks matching `where` (over chunks `c`), as jobs, in their owner's claim order
    (a shared chunk goes in the place of its oldest file), then by index."""
    sql = (
        f"SELECT {_JOB_COLUMNS} FROM chunks AS c JOIN files AS f ON f.id = c.file_id"
        f" WHERE {where} ORDER BY f.claimed_at, f.id, c.idx"
    )
    return [chunk_record(row) for row in conn.execute(sql, params)]


def select_views(conn: sqlite3.Connection, where: str, params: list[Any]) -> list[ChunkRecord]:
    """Chunks as files see them (see `_VIEW_COLUMNS`), `where` over chunks `c` and
    pieces `p`: by file, then index."""
    sql = (
        f"SELECT {_VIEW_COLUMNS} FROM pieces AS p JOIN chunks AS c ON c.id = p.chunk_id"
        f" WHERE {where} ORDER BY p.file_id, c.idx"
    )
    return [chunk_record(row) for row in conn.execute(sql, params)]


def insert_chunk(
    conn: sqlite3.Connection,
    file_id: int,
    *,
    index: int,
    path: str,
    rows: int,
    bytes: int,
    first_line: int,
    sealed: bool,
) -> ChunkRecord:
    """A PENDING chunk of `file_id` alone, with its one piece; if (file_id, index) exists,
    that chunk unchanged, as the file sees it."""
    added = conn.execute(
        "INSERT INTO chunks (file_id, idx, path, rows, bytes, first_line, status, sealed)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (file_id, idx) DO NOTHING",
        (file_id, index, path, rows, bytes, first_line, ChunkStatus.PENDING, int(sealed)),
    ).rowcount
    (chunk_id,) = conn.execute(
        "SELECT id FROM chunks WHERE file_id = ? AND idx = ?", (file_id, index)
    ).fetchone()
    if added and sealed:
        enter_key_order(conn, chunk_id)  # recorded whole: its keys are checked next
    conn.execute(
        "INSERT INTO pieces (chunk_id, file_id, seq, rows, bytes, first_row, first_line)"
        " VALUES (?, ?, 1, ?, ?, 0, ?) ON CONFLICT DO NOTHING",
        (chunk_id, file_id, rows, bytes, first_line),
    )
    (view,) = select_views(conn, "p.chunk_id = ? AND p.file_id = ?", [chunk_id, file_id])
    return view


def mark_split(conn: sqlite3.Connection, file_id: int, *, rows: int, chunks_total: int) -> None:
    """A SPLITTING file -> SPLIT; `chunks_total` must equal the chunks it has records in."""
    (known,) = conn.execute("SELECT count(*) FROM pieces WHERE file_id = ?", (file_id,)).fetchone()
    if known != chunks_total:
        raise ValueError(
            f"finish_split: file {file_id} has {known} chunks recorded, not {chunks_total}"
        )
    conn.execute(
        "UPDATE files SET status = ?, rows = ?, chunks_total = ? WHERE id = ?",
        (FileStatus.SPLIT, rows, chunks_total, file_id),
    )


def require(record: FileRecord | ChunkRecord, allowed: AbstractSet[Any], operation: str) -> None:
    """Refuse an illegal transition: a bug of the caller, so ValueError."""
    if record.status not in allowed:
        kind = "file" if isinstance(record, FileRecord) else "chunk"
        wanted = " or ".join(sorted(str(s) for s in allowed))
        raise ValueError(f"{operation}: {kind} {record.id} is {record.status}, expected {wanted}")


def check_batch(chunk: ChunkRecord, batch: BatchStatus, operation: str) -> None:
    if chunk.batch_id is not None and chunk.batch_id != batch.batch_id:
        raise ValueError(
            f"{operation}: chunk {chunk.id} has batch {chunk.batch_id}, not {batch.batch_id}"
        )


def write_batch(conn: sqlite3.Connection, chunk_id: int, batch: BatchStatus) -> None:
    conn.execute(
        "UPDATE chunks SET batch_id = ?, marketo_status = ?, rows_processed = ?, rows_failed = ?,"
        " rows_with_warning = ?, message = ? WHERE id = ?",
        (
            batch.batch_id,
            batch.status,
            batch.rows_processed,
            batch.rows_failed,
            batch.rows_with_warning,
            batch.message,
            chunk_id,
        ),
    )


def check_finish(
    conn: sqlite3.Connection, file: FileRecord, status: FileStatus, error: str | None
) -> None:
    """The invariants of a finished file (see `Store.finish_file`)."""
    rows = conn.execute(
        "SELECT c.status, count(*) FROM pieces AS p JOIN chunks AS c ON c.id = p.chunk_id"
        " WHERE p.file_id = ? GROUP BY c.status",
        (file.id,),
    )
    counts: dict[str, int] = {row[0]: row[1] for row in rows}
    unfinished = sum(n for s, n in counts.items() if ChunkStatus(s) not in FINAL_CHUNK_STATUSES)
    if unfinished:
        raise ValueError(f"finish_file: file {file.id} has {unfinished} unfinished chunks")
    if status is FileStatus.FAILED:
        if not error:
            raise ValueError(f"finish_file: file {file.id} cannot fail without an error")
        return
    if error:
        raise ValueError(f"finish_file: file {file.id} has an error, so it cannot be complete")
    complete = counts.get(ChunkStatus.COMPLETE.value, 0)
    if (
        file.chunks_total is None
        or complete != file.chunks_total
        or complete != sum(counts.values())
    ):
        raise ValueError(
            f"finish_file: file {file.id} has {complete} complete chunks of {file.chunks_total}"
        )


def status_filter(column: str, statuses: Iterable[Any] | None) -> tuple[str, list[Any]]:
    """A WHERE fragment (and its parameters) keeping rows whose `column` is in `statuses`."""
    if statuses is None:
        return "1", []
    wanted = [str(s) for s in statuses]
    if not wanted:
        return "0", []
    return f"{column} IN ({', '.join('?' * len(wanted))})", wanted
