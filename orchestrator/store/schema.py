"""The state store's SQLite layer: schema, opening checks, error mapping, row helpers.

The schema version lives in `PRAGMA user_version`; `_MIGRATIONS[n]` takes a
database from version n to n + 1. `connect` opens (creating or migrating) the
database and refuses one that is corrupt, too new or cannot use WAL. SQLite's
errors become `StoreError`s here, each naming the path and how to recover. The
row helpers turn rows into records and enforce the transition rules; like
`connect`, they run in the `Store`'s worker thread (see `orchestrator.store`).
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterable
from collections.abc import Set as AbstractSet
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from orchestrator.errors import StoreError
from orchestrator.models import (
    FINAL_CHUNK_STATUSES,
    BatchStatus,
    ChunkRecord,
    ChunkStatus,
    FileRecord,
    FileStatus,
)

# Seconds a transaction waits for another process's lock (`status` reading while the daemon runs).
_BUSY_TIMEOUT = 10.0

# Statements per migration; frozen text, never generated from the enums (v1 must stay v1).
_MIGRATIONS: tuple[tuple[str, ...], ...] = (
    (
        """CREATE TABLE files (
            id INTEGER PRIMARY KEY,
            route TEXT NOT NULL,
            name TEXT NOT NULL,
            source_path TEXT NOT NULL,
            work_path TEXT NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('claiming', 'claimed', 'splitting', 'split',
                                                   'finishing', 'complete', 'failed')),
            max_chunk_bytes INTEGER NOT NULL,
            claimed_at TEXT NOT NULL,
            rows INTEGER,
            chunks_total INTEGER,
            error TEXT,
            result_path TEXT UNIQUE,
            finished_at TEXT
        )""",
        "CREATE INDEX files_by_status ON files (status)",
        "CREATE INDEX files_by_claim ON files (claimed_at, id)",
        """CREATE TABLE chunks (
            id INTEGER PRIMARY KEY,
            file_id INTEGER NOT NULL REFERENCES files (id),
            idx INTEGER NOT NULL,
            path TEXT NOT NULL,
            rows INTEGER NOT NULL,
            bytes INTEGER NOT NULL,
            first_line INTEGER NOT NULL,
            status TEXT NOT NULL CHECK (status IN ('pending', 'submitting', 'submitted',
                                                   'complete', 'failed')),
            batch_id INTEGER,
            submit_attempts INTEGER NOT NULL DEFAULT 0,
            marketo_status TEXT,
            rows_processed INTEGER NOT NULL DEFAULT 0,
            rows_failed INTEGER NOT NULL DEFAULT 0,
            rows_with_warning INTEGER NOT NULL DEFAULT 0,
            message TEXT NOT NULL DEFAULT '',
            failures_path TEXT,
            warnings_path TEXT,
            submitted_at TEXT,
            finished_at TEXT,
            UNIQUE (file_id, idx)
        )""",
        "CREATE INDEX chunks_by_status ON chunks (status)",
        """CREATE TABLE rejects (
            file_id INTEGER NOT NULL REFERENCES files (id),
            line INTEGER NOT NULL,
            "offset" INTEGER NOT NULL,
            size INTEGER NOT NULL,
            reason TEXT NOT NULL,
            UNIQUE (file_id, line)
        )""",
        "CREATE TABLE api_calls (day TEXT PRIMARY KEY, count INTEGER NOT NULL)",
    ),
    # v2: the hand-over id of each file (orchestrator.tickets); files claimed before it
    # get one made of their claim second and their row id.
    (
        "ALTER TABLE files ADD COLUMN job_id TEXT",
        """UPDATE files SET job_id = strftime('%Y%m%dT%H%M%SZ', claimed_at)
            || '-' || printf('%04x', id % 65536)""",
        "CREATE INDEX files_by_job_id ON files (job_id)",
    ),
    # v3, retention: finished files are pruned by finished_at, and counts of files
    # and chunks by status (and rows processed) are kept by triggers as rows change,
    # so /metrics and status read a few rows instead of scanning the history.
    (
        "CREATE INDEX files_by_finished ON files (finished_at)",
        "CREATE TABLE tallies (name TEXT PRIMARY KEY, n INTEGER NOT NULL)",
        """INSERT INTO tallies (name, n) VALUES
            ('files:claiming', 0), ('files:claimed', 0), ('files:splitting', 0),
            ('files:split', 0), ('files:finishing', 0), ('files:complete', 0),
            ('files:failed', 0), ('chunks:pending', 0), ('chunks:submitting', 0),
            ('chunks:submitted', 0), ('chunks:complete', 0), ('chunks:failed', 0),
            ('rows:processed', 0)""",
        """UPDATE tallies SET n = (SELECT count(*) FROM files AS f
            WHERE 'files:' || f.status = tallies.name) WHERE tallies.name LIKE 'files:%'""",
        """UPDATE tallies SET n = (SELECT count(*) FROM chunks AS c
            WHERE 'chunks:' || c.status = tallies.name) WHERE tallies.name LIKE 'chunks:%'""",
        """UPDATE tallies SET n = (SELECT coalesce(sum(rows_processed), 0) FROM chunks)
            WHERE name = 'rows:processed'""",
        """CREATE TRIGGER files_tally_insert AFTER INSERT ON files BEGIN
            UPDATE tallies SET n = n + 1 WHERE name = 'files:' || NEW.status;
        END""",
        """CREATE TRIGGER files_tally_delete AFTER DELETE ON files BEGIN
            UPDATE tallies SET n = n - 1 WHERE name = 'files:' || OLD.status;
        END""",
        """CREATE TRIGGER files_tally_update AFTER UPDATE OF status ON files
            WHEN OLD.status <> NEW.status BEGIN
            UPDATE tallies SET n = n - 1 WHERE name = 'files:' || OLD.status;
            UPDATE tallies SET n = n + 1 WHERE name = 'files:' || NEW.status;
        END""",
        """CREATE TRIGGER chunks_tally_insert AFTER INSERT ON chunks BEGIN
            UPDATE tallies SET n = n + 1 WHERE name = 'chunks:' || NEW.status;
            UPDATE tallies SET n = n + NEW.rows_processed WHERE name = 'rows:processed';
        END""",
        """CREATE TRIGGER chunks_tally_delete AFTER DELETE ON chunks BEGIN
            UPDATE tallies SET n = n - 1 WHERE name = 'chunks:' || OLD.status;
            UPDATE tallies SET n = n - OLD.rows_processed WHERE name = 'rows:processed';
        END""",
        """CREATE TRIGGER chunks_tally_status AFTER UPDATE OF status ON chunks
            WHEN OLD.status <> NEW.status BEGIN
            UPDATE tallies SET n = n - 1 WHERE name = 'chunks:' || OLD.status;
            UPDATE tallies SET n = n + 1 WHERE name = 'chunks:' || NEW.status;
        END""",
        """CREATE TRIGGER chunks_tally_rows AFTER UPDATE OF rows_processed ON chunks
            WHEN OLD.rows_processed <> NEW.rows_processed BEGIN
            UPDATE tallies SET n = n + NEW.rows_processed - OLD.rows_processed
                WHERE name = 'rows:processed';
        END""",
    ),
    # v4: creates whose outcome is unknown (timeout, drop or 5xx after the body went out,
    # or a kill while SUBMITTING): each may have left a job at Marketo.
    ("ALTER TABLE chunks ADD COLUMN unknown_outcomes INTEGER NOT NULL DEFAULT 0",),
    # v5, packing: a chunk holds the records of one or more files. `pieces` says which
    # (seq 1 is the chunk's owner, its oldest file, whose id chunks.file_id keeps), with
    # each file's share of the counters once failures are matched back (`attributed`).
    # A pack still taking files is a PENDING chunk with sealed = 0, never submitted.
    (
        """CREATE TABLE pieces (
            chunk_id INTEGER NOT NULL REFERENCES chunks (id),
            file_id INTEGER NOT NULL REFERENCES files (id),
            seq INTEGER NOT NULL,
            rows INTEGER NOT NULL,
            bytes INTEGER NOT NULL,
            first_row INTEGER NOT NULL,
            first_line INTEGER NOT NULL,
            rows_processed INTEGER NOT NULL DEFAULT 0,
            rows_failed INTEGER NOT NULL DEFAULT 0,
            rows_with_warning INTEGER NOT NULL DEFAULT 0,
            PRIMARY KEY (chunk_id, seq),
            UNIQUE (file_id, chunk_id)
        )""",
        "ALTER TABLE chunks ADD COLUMN files INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE chunks ADD COLUMN sealed INTEGER NOT NULL DEFAULT 1",
        "ALTER TABLE chunks ADD COLUMN attributed INTEGER NOT NULL DEFAULT 0",
        """INSERT INTO pieces (chunk_id, file_id, seq, rows, bytes, first_row, first_line)
            SELECT id, file_id, 1, rows, bytes, 0, first_line FROM chunks""",
    ),
    # v6: a file's hand-over id is its ticket ("job" names a Marketo import job only).
    (
        "DROP INDEX files_by_job_id",
        "ALTER TABLE files RENAME COLUMN job_id TO ticket",
        "CREATE INDEX files_by_ticket ON files (ticket)",
    ),
)
# A new migration is appended (the next is v7); a released one is never renumbered.
LATEST_VERSION = len(_MIGRATIONS)

_RECOVER_HINT = (
    "stop the daemon, move it aside (with its -wal and -shm files) and restart; "
    "files in work/ will be re-imported (Bulk Import is insert-or-update)"
)

# -- opening and migrating (run in the store's thread) ---------------------------------------


def connect(path: Path, *, check: bool = True) -> sqlite3.Connection:
    """Open the database at `path`, refuse it if unusable, migrate it; StoreError on failure."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        problem = f"cannot create the directory {str(path.parent)!r} ({exc.strerror})"
        raise StoreError(path, f"{problem}: check data_dir and its permissions") from exc
    try:
        conn = sqlite3.connect(
            path, timeout=_BUSY_TIMEOUT, isolation_level=None, check_same_thread=False
        )
    except sqlite3.Error as exc:
        raise _open_error(path, exc) from exc
    try:
        _prepare(conn, path, check=check)
    except BaseException:
        conn.close()
        raise
    return conn


def _prepare(conn: sqlite3.Connection, path: Path, *, check: bool) -> None:
    """Refuse a corrupt or too new database, then set the pragmas and migrate."""
    conn.row_factory = sqlite3.Row
    try:
        # quick_check reads every page: the daemon's start pays it, a reader need not.
        problems = [str(r[0]) for r in conn.execute("PRAGMA quick_check")] if check else ["ok"]
        if problems != ["ok"]:
            raise _corrupt(path, "; ".join(problems[:3]).replace("\n", " "))
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        _check_version(path, version)
        # Setting the mode takes a lock SQLite does not wait for: set it only when it is not
        # WAL yet, so a reader opening beside a writing daemon does not fail on it.
        (mode,) = conn.execute("PRAGMA journal_mode").fetchone()
        if str(mode).lower() != "wal":
            (mode,) = conn.execute("PRAGMA journal_mode = WAL").fetchone()
        if str(mode).lower() != "wal":
            raise StoreError(
                path, f"cannot use WAL journaling here (got {mode!r}): use a local disk"
            )
        conn.execute("PRAGMA synchronous = FULL")
        conn.execute("PRAGMA foreign_keys = ON")
        _migrate(conn, path)
    except sqlite3.Error as exc:
        raise _open_error(path, exc) from exc


def _migrate(conn: sqlite3.Connection, path: Path) -> None:
    """Bring the schema to LATEST_VERSION, one migration per transaction."""
    while True:
        conn.execute("BEGIN IMMEDIATE")
        try:
            # Read under the write lock: another process may have migrated meanwhile.
            (version,) = conn.execute("PRAGMA user_version").fetchone()
            _check_version(path, version)
            if version == LATEST_VERSION:
                conn.execute("COMMIT")
                return
            for statement in _MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version + 1}")
            conn.execute("COMMIT")
        except BaseException:
            if conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("ROLLBACK")
            raise


def _check_version(path: Path, version: int) -> None:
    if version > LATEST_VERSION:
        raise StoreError(
            path,
            f"schema version {version} is newer than this program knows ({LATEST_VERSION}): "
            f"run a newer marketo-orchestrator, or {_RECOVER_HINT}",
        )


def close_if_connected(future: Future[sqlite3.Connection]) -> None:
    """After a cancelled open: close the connection the thread made anyway."""
    if not future.cancelled() and future.exception() is None:
        future.result().close()


# -- errors ------------------------------------------------------------------------------------


def _primary_code(exc: sqlite3.Error) -> int | None:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else None


def _corrupt(path: Path, detail: str) -> StoreError:
    return StoreError(path, f"{path.name} is corrupt ({detail}): {_RECOVER_HINT}")


def _open_error(path: Path, exc: sqlite3.Error) -> StoreError:
    code = _primary_code(exc)
    if code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB):
        return _corrupt(path, str(exc))
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return StoreError(
            path, f"cannot open: the database stays locked by another process ({exc})"
        )
    return StoreError(
        path,
        f"cannot open the state store ({exc}): check that {str(path.parent)!r} is a writable "
        "directory and the path is not taken by something that is not a SQLite file",
    )


_RUNTIME_HINTS = {
    sqlite3.SQLITE_FULL: "the disk is full: free space, then restart the daemon",
    sqlite3.SQLITE_READONLY: "the database is read-only: make data_dir writable and restart",
    sqlite3.SQLITE_IOERR: "a disk I/O error: check the volume (full, read-only, or gone)",
    sqlite3.SQLITE_BUSY: "another process held the lock too long: is a second daemon running?",
    sqlite3.SQLITE_CORRUPT: f"the database is corrupt: {_RECOVER_HINT}",
    sqlite3.SQLITE_NOTADB: f"the database is corrupt: {_RECOVER_HINT}",
}


def runtime_error(path: Path, operation: str, exc: sqlite3.Error) -> StoreError:
    code = _primary_code(exc)
    hint = _RUNTIME_HINTS.get(code, "") if code is not None else ""
    return StoreError(path, f"{operation} failed ({exc})" + (f": {hint}" if hint else ""))


# -- rows and rules (run in the store's thread) ----------------------------------------------


def file_record(row: sqlite3.Row) -> FileRecord:
    values = dict(zip(row.keys(), row, strict=True))
    values["status"] = FileStatus(values["status"])
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
    c.bytes AS job_bytes, c.attributed"""


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
    conn.execute(
        "INSERT INTO chunks (file_id, idx, path, rows, bytes, first_line, status, sealed)"
        " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (file_id, idx) DO NOTHING",
        (file_id, index, path, rows, bytes, first_line, ChunkStatus.PENDING, int(sealed)),
    )
    (chunk_id,) = conn.execute(
        "SELECT id FROM chunks WHERE file_id = ? AND idx = ?", (file_id, index)
    ).fetchone()
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
