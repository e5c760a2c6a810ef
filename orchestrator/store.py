"""The durable state store: the truth about every claimed file and chunk.

One SQLite database (`data_dir/state.db`) in WAL mode with `synchronous=FULL`
and foreign keys on. The schema version lives in `PRAGMA user_version`;
`_MIGRATIONS[n]` takes a database from version n to n + 1.

All SQLite work runs in one worker thread owned by the `Store`, so the event
loop never waits on the disk. Each public method is one short transaction,
committed before it returns: the caller may rely on it before taking the
external step it enables (a rename, a submit). A call whose task is cancelled
may still commit.

Errors:
- `StoreError(path, problem)`: the database cannot be opened (corrupt, too new,
  unwritable) or a write failed at run time (disk full, read-only); the message
  names the path, the operation and how to recover.
- `ValueError`: an illegal transition (mark_submitted on a complete chunk, say).
  These are bugs of the caller, never a state of the world.
- `LookupError`: no file or chunk with that id.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

from orchestrator.errors import StoreError
from orchestrator.models import (
    FINAL_CHUNK_STATUSES,
    FINAL_FILE_STATUSES,
    BatchStatus,
    ChunkRecord,
    ChunkStatus,
    FileRecord,
    FileStatus,
    RejectRecord,
)

T = TypeVar("T")
Body = Callable[[sqlite3.Connection], T]

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
)
LATEST_VERSION = len(_MIGRATIONS)

_RECOVER_HINT = (
    "stop the daemon, move it aside (with its -wal and -shm files) and restart; "
    "files in work/ will be re-imported (Bulk Import is insert-or-update)"
)


@dataclass(frozen=True, slots=True)
class Recovery:
    """What a crash left half done, as `Store.recover` finds it at startup."""

    resubmit: list[ChunkRecord]  # were SUBMITTING (outcome unknown), now PENDING again
    claiming: list[FileRecord]  # recorded, rename maybe not done
    resplit: list[FileRecord]  # CLAIMED or SPLITTING: split (again), reusing known chunks
    finishing: list[FileRecord]  # result name reserved, result maybe not written


class Store:
    """The state store; open with `await Store.open(path)`, close with `await close()`."""

    def __init__(self, path: Path, executor: ThreadPoolExecutor, conn: sqlite3.Connection) -> None:
        self.path = path
        self._executor = executor
        self._conn = conn
        self._closed = False

    def __repr__(self) -> str:
        state = "closed" if self._closed else "open"
        return f"<Store {str(self.path)!r} {state}>"

    # -- lifecycle ---------------------------------------------------------------------------

    @classmethod
    async def open(cls, path: Path) -> Store:
        """Open (creating or migrating) the database at `path`; StoreError if it cannot be used."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        future = executor.submit(_connect, path)
        try:
            conn = await asyncio.wrap_future(future)
        except BaseException:
            # Cancelled while the thread still connects: close what it makes.
            future.add_done_callback(_close_if_connected)
            executor.shutdown(wait=False)
            raise
        return cls(path, executor, conn)

    async def close(self) -> None:
        """Close the connection once every queued transaction has run. Idempotent."""
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._executor, self._conn.close)
        except sqlite3.Error as exc:
            raise _runtime_error(self.path, "close", exc) from exc
        finally:
            self._executor.shutdown(wait=False)

    async def __aenter__(self) -> Store:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- claiming (spool) --------------------------------------------------------------------

    async def begin_claim(
        self,
        *,
        route: str,
        name: str,
        source_path: str,
        work_path: str,
        max_chunk_bytes: int,
        claimed_at: str,
        error: str | None = None,
    ) -> FileRecord:
        """Record the intent to claim a file (CLAIMING), before the rename into work/."""

        def body(conn: sqlite3.Connection) -> FileRecord:
            cur = conn.execute(
                "INSERT INTO files (route, name, source_path, work_path, status, max_chunk_bytes,"
                " claimed_at, error) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    route,
                    name,
                    source_path,
                    work_path,
                    FileStatus.CLAIMING,
                    max_chunk_bytes,
                    claimed_at,
                    error,
                ),
            )
            assert cur.lastrowid is not None  # an INSERT into a rowid table always has one
            return _get_file(conn, cur.lastrowid)

        return await self._run("begin_claim", body)

    async def finish_claim(self, file_id: int) -> FileRecord:
        """CLAIMING -> CLAIMED, once the file is in work/. Again on CLAIMED is a no-op."""
        return await self._move_file(
            "finish_claim", file_id, {FileStatus.CLAIMING}, FileStatus.CLAIMED
        )

    async def drop_claim(self, file_id: int) -> None:
        """Forget a CLAIMING file whose source vanished before the rename."""

        def body(conn: sqlite3.Connection) -> None:
            _require(_get_file(conn, file_id), {FileStatus.CLAIMING}, "drop_claim")
            conn.execute("DELETE FROM files WHERE id = ?", (file_id,))

        await self._run("drop_claim", body)

    # -- splitting (engine) ------------------------------------------------------------------

    async def start_split(self, file_id: int) -> FileRecord:
        """CLAIMED -> SPLITTING. Again on SPLITTING (resuming after a crash) is a no-op."""
        return await self._move_file(
            "start_split", file_id, {FileStatus.CLAIMED}, FileStatus.SPLITTING
        )

    async def add_chunk(
        self, file_id: int, *, index: int, path: str, rows: int, bytes: int, first_line: int
    ) -> ChunkRecord:
        """Add a PENDING chunk; if (file_id, index) exists, return it unchanged."""

        def body(conn: sqlite3.Connection) -> ChunkRecord:
            _require(_get_file(conn, file_id), {FileStatus.SPLITTING}, "add_chunk")
            conn.execute(
                "INSERT INTO chunks (file_id, idx, path, rows, bytes, first_line, status)"
                " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (file_id, idx) DO NOTHING",
                (file_id, index, path, rows, bytes, first_line, ChunkStatus.PENDING),
            )
            row = conn.execute(
                "SELECT * FROM chunks WHERE file_id = ? AND idx = ?", (file_id, index)
            ).fetchone()
            return _chunk_record(row)

        return await self._run("add_chunk", body)

    async def add_reject(
        self, file_id: int, *, line: int, offset: int, size: int, reason: str
    ) -> None:
        """Remember a record the splitter set aside; again for the same line is a no-op."""

        def body(conn: sqlite3.Connection) -> None:
            _require(_get_file(conn, file_id), {FileStatus.SPLITTING}, "add_reject")
            conn.execute(
                'INSERT INTO rejects (file_id, line, "offset", size, reason) VALUES (?, ?, ?, ?, ?)'
                " ON CONFLICT (file_id, line) DO NOTHING",
                (file_id, line, offset, size, reason),
            )

        await self._run("add_reject", body)

    async def finish_split(self, file_id: int, *, rows: int, chunks_total: int) -> FileRecord:
        """SPLITTING -> SPLIT; `chunks_total` must equal the chunks recorded for the file."""

        def body(conn: sqlite3.Connection) -> FileRecord:
            _require(_get_file(conn, file_id), {FileStatus.SPLITTING}, "finish_split")
            (known,) = conn.execute(
                "SELECT count(*) FROM chunks WHERE file_id = ?", (file_id,)
            ).fetchone()
            if known != chunks_total:
                raise ValueError(
                    f"finish_split: file {file_id} has {known} chunks recorded, not {chunks_total}"
                )
            conn.execute(
                "UPDATE files SET status = ?, rows = ?, chunks_total = ? WHERE id = ?",
                (FileStatus.SPLIT, rows, chunks_total, file_id),
            )
            return _get_file(conn, file_id)

        return await self._run("finish_split", body)

    async def reset_split(self, file_id: int) -> None:
        """Forget never-submitted chunks and all rejects; back to CLAIMED for a fresh split.

        Chunks that were (or may have been) submitted stay: a deterministic re-split gets
        them back from `add_chunk` unchanged.
        """

        def body(conn: sqlite3.Connection) -> None:
            allowed = {FileStatus.CLAIMED, FileStatus.SPLITTING, FileStatus.SPLIT}
            _require(_get_file(conn, file_id), allowed, "reset_split")
            conn.execute(
                "DELETE FROM chunks WHERE file_id = ? AND status = ? AND submit_attempts = 0",
                (file_id, ChunkStatus.PENDING),
            )
            conn.execute("DELETE FROM rejects WHERE file_id = ?", (file_id,))
            conn.execute(
                "UPDATE files SET status = ?, rows = NULL, chunks_total = NULL WHERE id = ?",
                (FileStatus.CLAIMED, file_id),
            )

        await self._run("reset_split", body)

    # -- chunks (scheduler, poller) ----------------------------------------------------------

    async def mark_submitting(self, chunk_id: int) -> ChunkRecord:
        """PENDING -> SUBMITTING and count the attempt: committed before the request goes out."""

        def body(conn: sqlite3.Connection) -> ChunkRecord:
            chunk = _get_chunk(conn, chunk_id)
            _require(chunk, {ChunkStatus.PENDING}, "mark_submitting")
            file = _get_file(conn, chunk.file_id)
            if file.status in FINAL_FILE_STATUSES or file.status is FileStatus.FINISHING:
                raise ValueError(f"mark_submitting: chunk {chunk_id} belongs to {file.status} file")
            conn.execute(
                "UPDATE chunks SET status = ?, submit_attempts = submit_attempts + 1 WHERE id = ?",
                (ChunkStatus.SUBMITTING, chunk_id),
            )
            return _get_chunk(conn, chunk_id)

        return await self._run("mark_submitting", body)

    async def mark_submitted(
        self, chunk_id: int, *, batch_id: int, marketo_status: str, submitted_at: str
    ) -> ChunkRecord:
        """SUBMITTING -> SUBMITTED with Marketo's batch id. Again with the same id is a no-op."""

        def body(conn: sqlite3.Connection) -> ChunkRecord:
            chunk = _get_chunk(conn, chunk_id)
            if chunk.status is ChunkStatus.SUBMITTED and chunk.batch_id == batch_id:
                return chunk
            _require(chunk, {ChunkStatus.SUBMITTING}, "mark_submitted")
            conn.execute(
                "UPDATE chunks SET status = ?, batch_id = ?, marketo_status = ?, submitted_at = ?"
                " WHERE id = ?",
                (ChunkStatus.SUBMITTED, batch_id, marketo_status, submitted_at, chunk_id),
            )
            return _get_chunk(conn, chunk_id)

        return await self._run("mark_submitted", body)

    async def mark_pending(self, chunk_id: int) -> ChunkRecord:
        """SUBMITTING -> PENDING: Marketo refused (1016, 1019, retryable); attempts are kept."""
        return await self._move_chunk(
            "mark_pending", chunk_id, {ChunkStatus.SUBMITTING}, ChunkStatus.PENDING
        )

    async def update_batch(self, chunk_id: int, batch: BatchStatus) -> ChunkRecord:
        """Record a poll of a SUBMITTED chunk: Marketo's status, counters and message."""

        def body(conn: sqlite3.Connection) -> ChunkRecord:
            chunk = _get_chunk(conn, chunk_id)
            _require(chunk, {ChunkStatus.SUBMITTED}, "update_batch")
            _check_batch(chunk, batch, "update_batch")
            _write_batch(conn, chunk_id, batch)
            return _get_chunk(conn, chunk_id)

        return await self._run("update_batch", body)

    async def set_chunk_files(
        self, chunk_id: int, *, failures_path: str | None, warnings_path: str | None
    ) -> ChunkRecord:
        """Remember the downloaded failures/warnings files of a chunk Marketo has a batch for."""

        def body(conn: sqlite3.Connection) -> ChunkRecord:
            chunk = _get_chunk(conn, chunk_id)
            allowed = {ChunkStatus.SUBMITTED, ChunkStatus.COMPLETE, ChunkStatus.FAILED}
            _require(chunk, allowed, "set_chunk_files")
            conn.execute(
                "UPDATE chunks SET failures_path = ?, warnings_path = ? WHERE id = ?",
                (failures_path, warnings_path, chunk_id),
            )
            return _get_chunk(conn, chunk_id)

        return await self._run("set_chunk_files", body)

    async def finish_chunk(
        self,
        chunk_id: int,
        *,
        status: ChunkStatus,
        message: str,
        finished_at: str,
        batch: BatchStatus | None = None,
    ) -> ChunkRecord:
        """Any unfinished chunk -> COMPLETE | FAILED, with Marketo's last word if there is one."""
        if status not in FINAL_CHUNK_STATUSES:
            raise ValueError(f"finish_chunk: {status} is not a final chunk status")

        def body(conn: sqlite3.Connection) -> ChunkRecord:
            chunk = _get_chunk(conn, chunk_id)
            _require(chunk, set(ChunkStatus) - FINAL_CHUNK_STATUSES, "finish_chunk")
            if batch is not None:
                _check_batch(chunk, batch, "finish_chunk")
                _write_batch(conn, chunk_id, batch)
            conn.execute(
                "UPDATE chunks SET status = ?, message = ?, finished_at = ? WHERE id = ?",
                (status, message, finished_at, chunk_id),
            )
            return _get_chunk(conn, chunk_id)

        return await self._run("finish_chunk", body)

    # -- finishing files (results) -----------------------------------------------------------

    async def reserve_result(self, file_id: int, *, result_path: str) -> FileRecord:
        """Any unfinished file -> FINISHING with its result path, which no other file holds.

        Again with the same path is a no-op; another path for a FINISHING file is refused.
        """

        def body(conn: sqlite3.Connection) -> FileRecord:
            file = _get_file(conn, file_id)
            if file.status is FileStatus.FINISHING and file.result_path == result_path:
                return file
            _require(
                file,
                set(FileStatus) - FINAL_FILE_STATUSES - {FileStatus.FINISHING},
                "reserve_result",
            )
            holder = conn.execute(
                "SELECT id FROM files WHERE result_path = ?", (result_path,)
            ).fetchone()
            if holder is not None:
                raise ValueError(f"reserve_result: {result_path!r} is taken by file {holder[0]}")
            conn.execute(
                "UPDATE files SET status = ?, result_path = ? WHERE id = ?",
                (FileStatus.FINISHING, result_path, file_id),
            )
            return _get_file(conn, file_id)

        return await self._run("reserve_result", body)

    async def finish_file(
        self, file_id: int, *, status: FileStatus, error: str | None, finished_at: str
    ) -> FileRecord:
        """FINISHING -> COMPLETE | FAILED, once the result is written.

        Every chunk must be final. COMPLETE needs every chunk COMPLETE, all of them recorded,
        and no error; FAILED needs an error (`error`, or the one `set_file_error` stored).
        """
        if status not in FINAL_FILE_STATUSES:
            raise ValueError(f"finish_file: {status} is not a final file status")

        def body(conn: sqlite3.Connection) -> FileRecord:
            file = _get_file(conn, file_id)
            _require(file, {FileStatus.FINISHING}, "finish_file")
            final_error = error if error is not None else file.error
            _check_finish(conn, file, status, final_error)
            conn.execute(
                "UPDATE files SET status = ?, error = ?, finished_at = ? WHERE id = ?",
                (status, final_error, finished_at, file_id),
            )
            return _get_file(conn, file_id)

        return await self._run("finish_file", body)

    async def set_file_error(self, file_id: int, error: str) -> FileRecord:
        """Remember why an unfinished file will fail; its status does not change."""

        def body(conn: sqlite3.Connection) -> FileRecord:
            _require(
                _get_file(conn, file_id), set(FileStatus) - FINAL_FILE_STATUSES, "set_file_error"
            )
            conn.execute("UPDATE files SET error = ? WHERE id = ?", (error, file_id))
            return _get_file(conn, file_id)

        return await self._run("set_file_error", body)

    # -- queries -----------------------------------------------------------------------------

    async def get_file(self, file_id: int) -> FileRecord:
        return await self._run("get_file", lambda conn: _get_file(conn, file_id), write=False)

    async def files(self, statuses: Iterable[FileStatus] | None = None) -> list[FileRecord]:
        """Files in claim order (claimed_at, then id), optionally only those in `statuses`."""
        where, params = _status_filter("status", statuses)

        def body(conn: sqlite3.Connection) -> list[FileRecord]:
            sql = f"SELECT * FROM files WHERE {where} ORDER BY claimed_at, id"
            return [_file_record(row) for row in conn.execute(sql, params)]

        return await self._run("files", body, write=False)

    async def chunks(
        self, *, file_id: int | None = None, statuses: Iterable[ChunkStatus] | None = None
    ) -> list[ChunkRecord]:
        """Chunks in their file's claim order, then by index; optionally filtered."""
        where, params = _status_filter("c.status", statuses)
        if file_id is not None:
            where += " AND c.file_id = ?"
            params.append(file_id)

        def body(conn: sqlite3.Connection) -> list[ChunkRecord]:
            return _select_chunks(conn, where, params)

        return await self._run("chunks", body, write=False)

    async def rejects(self, file_id: int) -> list[RejectRecord]:
        """The records the splitter set aside for a file, by source line."""

        def body(conn: sqlite3.Connection) -> list[RejectRecord]:
            rows = conn.execute(
                'SELECT file_id, line, size, reason, "offset" FROM rejects WHERE file_id = ?'
                " ORDER BY line",
                (file_id,),
            )
            return [RejectRecord(**dict(zip(row.keys(), row, strict=True))) for row in rows]

        return await self._run("rejects", body, write=False)

    async def result_paths(self) -> set[str]:
        """Every result path ever reserved, so a new result never takes a used name."""

        def body(conn: sqlite3.Connection) -> set[str]:
            rows = conn.execute("SELECT result_path FROM files WHERE result_path IS NOT NULL")
            return {row[0] for row in rows}

        return await self._run("result_paths", body, write=False)

    async def recover(self) -> Recovery:
        """At startup: SUBMITTING chunks back to PENDING, and what else was left half done."""

        def body(conn: sqlite3.Connection) -> Recovery:
            unknown = _select_chunks(conn, "c.status = ?", [ChunkStatus.SUBMITTING])
            conn.execute(
                "UPDATE chunks SET status = ? WHERE status = ?",
                (ChunkStatus.PENDING, ChunkStatus.SUBMITTING),
            )
            resubmit = [replace(c, status=ChunkStatus.PENDING) for c in unknown]
            open_files = [
                _file_record(row)
                for row in conn.execute(
                    "SELECT * FROM files WHERE status IN (?, ?, ?, ?) ORDER BY claimed_at, id",
                    (
                        FileStatus.CLAIMING,
                        FileStatus.CLAIMED,
                        FileStatus.SPLITTING,
                        FileStatus.FINISHING,
                    ),
                )
            ]

            def having(*statuses: FileStatus) -> list[FileRecord]:
                return [f for f in open_files if f.status in statuses]

            return Recovery(
                resubmit=resubmit,
                claiming=having(FileStatus.CLAIMING),
                resplit=having(FileStatus.CLAIMED, FileStatus.SPLITTING),
                finishing=having(FileStatus.FINISHING),
            )

        return await self._run("recover", body)

    # -- API usage (daily budget) ------------------------------------------------------------

    async def add_api_calls(self, day: str, count: int) -> None:
        """Add `count` calls to the tally of `day` (the quota's local date)."""
        if count < 0:
            raise ValueError(f"add_api_calls: count {count} is negative")

        def body(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT INTO api_calls (day, count) VALUES (?, ?)"
                " ON CONFLICT (day) DO UPDATE SET count = count + excluded.count",
                (day, count),
            )

        await self._run("add_api_calls", body)

    async def api_calls(self, day: str) -> int:
        def body(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT count FROM api_calls WHERE day = ?", (day,)).fetchone()
            return int(row[0]) if row is not None else 0

        return await self._run("api_calls", body, write=False)

    async def integrity_check(self) -> str:
        """SQLite's full integrity check: "ok", or the problems it found."""

        def body(conn: sqlite3.Connection) -> str:
            return "; ".join(str(row[0]) for row in conn.execute("PRAGMA integrity_check"))

        return await self._run("integrity_check", body, write=False)

    # -- machinery ---------------------------------------------------------------------------

    async def _move_file(
        self, operation: str, file_id: int, sources: set[FileStatus], target: FileStatus
    ) -> FileRecord:
        def body(conn: sqlite3.Connection) -> FileRecord:
            file = _get_file(conn, file_id)
            if file.status is target:
                return file
            _require(file, sources, operation)
            conn.execute("UPDATE files SET status = ? WHERE id = ?", (target, file_id))
            return _get_file(conn, file_id)

        return await self._run(operation, body)

    async def _move_chunk(
        self, operation: str, chunk_id: int, sources: set[ChunkStatus], target: ChunkStatus
    ) -> ChunkRecord:
        def body(conn: sqlite3.Connection) -> ChunkRecord:
            _require(_get_chunk(conn, chunk_id), sources, operation)
            conn.execute("UPDATE chunks SET status = ? WHERE id = ?", (target, chunk_id))
            return _get_chunk(conn, chunk_id)

        return await self._run(operation, body)

    async def _run(self, operation: str, body: Body[T], *, write: bool = True) -> T:
        """Run `body` as one transaction in the store's thread."""
        if self._closed:
            raise StoreError(self.path, f"{operation}: the store is closed")
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._transact, operation, body, write)

    def _transact(self, operation: str, body: Body[T], write: bool) -> T:
        """In the store's thread: BEGIN, body, COMMIT; ROLLBACK on any exception."""
        conn = self._conn
        try:
            # IMMEDIATE takes the write lock up front, so a writer never fails half way on BUSY.
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                result = body(conn)
                conn.execute("COMMIT")
            except BaseException:
                if conn.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        conn.execute("ROLLBACK")
                raise
        except sqlite3.Error as exc:
            raise _runtime_error(self.path, operation, exc) from exc
        return result


# -- opening and migrating (run in the store's thread) ---------------------------------------


def _connect(path: Path) -> sqlite3.Connection:
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
        _prepare(conn, path)
    except BaseException:
        conn.close()
        raise
    return conn


def _prepare(conn: sqlite3.Connection, path: Path) -> None:
    """Refuse a corrupt or too new database, then set the pragmas and migrate."""
    conn.row_factory = sqlite3.Row
    try:
        problems = [str(row[0]) for row in conn.execute("PRAGMA quick_check")]
        if problems != ["ok"]:
            raise _corrupt(path, "; ".join(problems[:3]).replace("\n", " "))
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        _check_version(path, version)
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


def _close_if_connected(future: Future[sqlite3.Connection]) -> None:
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


def _runtime_error(path: Path, operation: str, exc: sqlite3.Error) -> StoreError:
    code = _primary_code(exc)
    hint = _RUNTIME_HINTS.get(code, "") if code is not None else ""
    return StoreError(path, f"{operation} failed ({exc})" + (f": {hint}" if hint else ""))


# -- rows and rules (run in the store's thread) ----------------------------------------------


def _file_record(row: sqlite3.Row) -> FileRecord:
    values = dict(zip(row.keys(), row, strict=True))
    values["status"] = FileStatus(values["status"])
    return FileRecord(**values)


def _chunk_record(row: sqlite3.Row) -> ChunkRecord:
    values = dict(zip(row.keys(), row, strict=True))
    values["status"] = ChunkStatus(values["status"])
    values["index"] = values.pop("idx")  # INDEX is an SQL keyword
    return ChunkRecord(**values)


def _get_file(conn: sqlite3.Connection, file_id: int) -> FileRecord:
    row = conn.execute("SELECT * FROM files WHERE id = ?", (file_id,)).fetchone()
    if row is None:
        raise LookupError(f"no file with id {file_id} in the state store")
    return _file_record(row)


def _get_chunk(conn: sqlite3.Connection, chunk_id: int) -> ChunkRecord:
    row = conn.execute("SELECT * FROM chunks WHERE id = ?", (chunk_id,)).fetchone()
    if row is None:
        raise LookupError(f"no chunk with id {chunk_id} in the state store")
    return _chunk_record(row)


def _select_chunks(conn: sqlite3.Connection, where: str, params: list[Any]) -> list[ChunkRecord]:
    """Chunks matching `where` (over chunks `c`), in their file's claim order, then by index."""
    sql = (
        "SELECT c.* FROM chunks AS c JOIN files AS f ON f.id = c.file_id"
        f" WHERE {where} ORDER BY f.claimed_at, f.id, c.idx"
    )
    return [_chunk_record(row) for row in conn.execute(sql, params)]


def _require(record: FileRecord | ChunkRecord, allowed: set[Any], operation: str) -> None:
    """Refuse an illegal transition: a bug of the caller, so ValueError."""
    if record.status not in allowed:
        kind = "file" if isinstance(record, FileRecord) else "chunk"
        wanted = " or ".join(sorted(str(s) for s in allowed))
        raise ValueError(f"{operation}: {kind} {record.id} is {record.status}, expected {wanted}")


def _check_batch(chunk: ChunkRecord, batch: BatchStatus, operation: str) -> None:
    if chunk.batch_id is not None and chunk.batch_id != batch.batch_id:
        raise ValueError(
            f"{operation}: chunk {chunk.id} has batch {chunk.batch_id}, not {batch.batch_id}"
        )


def _write_batch(conn: sqlite3.Connection, chunk_id: int, batch: BatchStatus) -> None:
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


def _check_finish(
    conn: sqlite3.Connection, file: FileRecord, status: FileStatus, error: str | None
) -> None:
    """The invariants of a finished file (see `Store.finish_file`)."""
    rows = conn.execute(
        "SELECT status, count(*) FROM chunks WHERE file_id = ? GROUP BY status", (file.id,)
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


def _status_filter(column: str, statuses: Iterable[Any] | None) -> tuple[str, list[Any]]:
    """A WHERE fragment (and its parameters) keeping rows whose `column` is in `statuses`."""
    if statuses is None:
        return "1", []
    wanted = [str(s) for s in statuses]
    if not wanted:
        return "0", []
    return f"{column} IN ({', '.join('?' * len(wanted))})", wanted
