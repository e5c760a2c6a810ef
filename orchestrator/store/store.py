"""The durable state store: the truth about every claimed file and chunk.

One SQLite database (`data_dir/state.db`) in WAL mode with `synchronous=FULL`
and foreign keys on; its schema, opening checks and row helpers live in
`store.schema`. This module holds the `Store`: one method per state transition.

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
import functools
import sqlite3
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from types import TracebackType
from typing import TypeVar

from orchestrator.errors import StoreError
from orchestrator.models import (
    FINAL_CHUNK_STATUSES,
    FINAL_FILE_STATUSES,
    UNFINISHED_FILE_STATUSES,
    BatchStatus,
    ChunkRecord,
    ChunkStatus,
    FileRecord,
    FileStatus,
    RejectRecord,
)
from orchestrator.store.schema import (
    LATEST_VERSION,
    check_batch,
    check_finish,
    close_if_connected,
    connect,
    fetch_chunk,
    fetch_file,
    file_record,
    insert_chunk,
    mark_split,
    require,
    runtime_error,
    select_chunks,
    select_views,
    status_filter,
    write_batch,
)
from orchestrator.tickets import new_id

__all__ = ["LATEST_VERSION", "Claim", "Recovery", "Store"]

T = TypeVar("T")
Body = Callable[[sqlite3.Connection], T]


@dataclass(frozen=True, slots=True)
class Claim:
    """A file the spool means to claim: what `Store.begin_claims` records (`ticket` ""
    gets a fresh hand-over id; `error` is set for an entry that is refused unread)."""

    route: str
    name: str
    source_path: str
    work_path: str
    max_chunk_bytes: int
    claimed_at: str
    ticket: str = ""
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Recovery:
    """What a crash left half done, as `Store.recover` finds it at startup."""

    resubmit: list[ChunkRecord]  # were SUBMITTING (outcome unknown), now PENDING again
    open_packs: list[ChunkRecord]  # packs not sealed: bytes past their size may be on disk
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
    async def open(cls, path: Path, *, check: bool = True) -> Store:
        """Open (creating or migrating) the database at `path`; StoreError if it cannot be used.

        `check` runs SQLite's quick_check first (it reads the whole file): the daemon's
        start does; `status`, which only reads beside a running daemon, does not."""
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        future = executor.submit(functools.partial(connect, path, check=check))
        try:
            conn = await asyncio.wrap_future(future)
        except BaseException:
            # Cancelled while the thread still connects: close what it makes.
            future.add_done_callback(close_if_connected)
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
            raise runtime_error(self.path, "close", exc) from exc
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
        ticket: str = "",
        error: str | None = None,
    ) -> FileRecord:
        """Record the intent to claim a file (CLAIMING), before the rename into work/.

        `ticket` is its hand-over id; a fresh one is made when none is given."""
        claim = Claim(
            route, name, source_path, work_path, max_chunk_bytes, claimed_at, ticket, error
        )
        (record,) = await self.begin_claims([claim])
        return record

    async def begin_claims(self, claims: Sequence[Claim]) -> list[FileRecord]:
        """`begin_claim` for several files in one transaction (one commit, one fsync):
        the CLAIMING records in the order given."""
        rows = [
            (
                c.route,
                c.name,
                c.source_path,
                c.work_path,
                FileStatus.CLAIMING,
                c.max_chunk_bytes,
                c.claimed_at,
                c.ticket or new_id(),
                c.error,
            )
            for c in claims
        ]

        def body(conn: sqlite3.Connection) -> list[FileRecord]:
            records = []
            for row in rows:
                cur = conn.execute(
                    "INSERT INTO files (route, name, source_path, work_path, status,"
                    " max_chunk_bytes, claimed_at, ticket, error)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                    row,
                )
                assert cur.lastrowid is not None  # an INSERT into a rowid table always has one
                records.append(fetch_file(conn, cur.lastrowid))
            return records

        return await self._run("begin_claims", body)

    async def finish_claim(self, file_id: int) -> FileRecord:
        """CLAIMING -> CLAIMED, once the file is in work/. Again on CLAIMED is a no-op."""
        return await self._move_file(
            "finish_claim", file_id, {FileStatus.CLAIMING}, FileStatus.CLAIMED
        )

    async def finish_claims(self, file_ids: Sequence[int]) -> list[FileRecord]:
        """`finish_claim` for several files in one transaction; the records in that order.
        One illegal transition (or unknown id) rolls back all of them."""

        def body(conn: sqlite3.Connection) -> list[FileRecord]:
            records = []
            for file_id in file_ids:
                file = fetch_file(conn, file_id)
                if file.status is not FileStatus.CLAIMED:
                    require(file, {FileStatus.CLAIMING}, "finish_claims")
                    conn.execute(
                        "UPDATE files SET status = ? WHERE id = ?", (FileStatus.CLAIMED, file_id)
                    )
                    file = replace(file, status=FileStatus.CLAIMED)
                records.append(file)
            return records

        return await self._run("finish_claims", body)

    async def drop_claim(self, file_id: int) -> None:
        """Forget a CLAIMING file whose source vanished before the rename."""

        def body(conn: sqlite3.Connection) -> None:
            require(fetch_file(conn, file_id), {FileStatus.CLAIMING}, "drop_claim")
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
            require(fetch_file(conn, file_id), {FileStatus.SPLITTING}, "add_chunk")
            return insert_chunk(
                conn,
                file_id,
                index=index,
                path=path,
                rows=rows,
                bytes=bytes,
                first_line=first_line,
                sealed=True,
            )

        return await self._run("add_chunk", body)

    # -- packing (small files sharing a chunk) -----------------------------------------------

    async def open_pack(
        self, file_id: int, *, path: str, rows: int, bytes: int, first_line: int, file_rows: int
    ) -> ChunkRecord:
        """A SPLITTING file's one chunk becomes a pack that later small files may join:
        an unsealed PENDING chunk it owns, and the file SPLIT (`file_rows` its records).
        Again for a file already SPLIT with its chunk returns that chunk."""

        def body(conn: sqlite3.Connection) -> ChunkRecord:
            file = fetch_file(conn, file_id)
            if file.status is FileStatus.SPLIT:
                (found,) = select_views(conn, "p.file_id = ?", [file_id])
                return fetch_chunk(conn, found.id)
            require(file, {FileStatus.SPLITTING}, "open_pack")
            chunk = insert_chunk(
                conn,
                file_id,
                index=1,
                path=path,
                rows=rows,
                bytes=bytes,
                first_line=first_line,
                sealed=False,
            )
            mark_split(conn, file_id, rows=file_rows, chunks_total=1)
            return chunk

        return await self._run("open_pack", body)

    async def join_pack(
        self,
        chunk_id: int,
        file_id: int,
        *,
        rows: int,
        bytes: int,
        first_line: int,
        file_rows: int,
    ) -> ChunkRecord:
        """A SPLITTING file's records were appended to an open pack (`bytes` of them,
        a separating line ending included): record it as the pack's next piece, and the
        file SPLIT. Committed after the append, so a kill between the two leaves bytes
        past the pack's recorded size, which recovery cuts off."""

        def body(conn: sqlite3.Connection) -> ChunkRecord:
            chunk = fetch_chunk(conn, chunk_id)
            require(chunk, {ChunkStatus.PENDING}, "join_pack")
            if chunk.sealed:
                raise ValueError(f"join_pack: chunk {chunk_id} is sealed")
            require(fetch_file(conn, file_id), {FileStatus.SPLITTING}, "join_pack")
            conn.execute(
                "INSERT INTO pieces (chunk_id, file_id, seq, rows, bytes, first_row, first_line)"
                " VALUES (?, ?, ?, ?, ?, ?, ?)",
                (chunk_id, file_id, chunk.files + 1, rows, bytes, chunk.rows, first_line),
            )
            conn.execute(
                "UPDATE chunks SET rows = rows + ?, bytes = bytes + ?, files = files + 1"
                " WHERE id = ?",
                (rows, bytes, chunk_id),
            )
            mark_split(conn, file_id, rows=file_rows, chunks_total=1)
            return fetch_chunk(conn, chunk_id)

        return await self._run("join_pack", body)

    async def seal_pack(self, chunk_id: int) -> ChunkRecord:
        """An open pack takes no more files: the scheduler may send it. Again is a no-op."""

        def body(conn: sqlite3.Connection) -> ChunkRecord:
            conn.execute("UPDATE chunks SET sealed = 1 WHERE id = ?", (chunk_id,))
            return fetch_chunk(conn, chunk_id)

        return await self._run("seal_pack", body)

    async def open_packs(self) -> list[ChunkRecord]:
        """Packs not yet sealed, as jobs, oldest first."""

        def body(conn: sqlite3.Connection) -> list[ChunkRecord]:
            return select_chunks(conn, "c.sealed = 0", [])

        return await self._run("open_packs", body, write=False)

    async def members(self, chunk_id: int) -> list[ChunkRecord]:
        """The chunk as each of its files sees it, in the order their records are in it."""

        def body(conn: sqlite3.Connection) -> list[ChunkRecord]:
            views = select_views(conn, "p.chunk_id = ?", [chunk_id])
            return sorted(views, key=lambda v: v.first_row)

        return await self._run("members", body, write=False)

    async def set_shares(self, chunk_id: int, shares: dict[int, tuple[int, int, int]]) -> None:
        """Each file's (processed, failed, warned) rows of a final chunk, by file id, once
        its failures and warnings are matched back; the chunk is then `attributed`."""

        def body(conn: sqlite3.Connection) -> None:
            chunk = fetch_chunk(conn, chunk_id)
            require(chunk, set(FINAL_CHUNK_STATUSES), "set_shares")
            conn.executemany(
                "UPDATE pieces SET rows_processed = ?, rows_failed = ?, rows_with_warning = ?"
                " WHERE chunk_id = ? AND file_id = ?",
                [(*counts, chunk_id, file_id) for file_id, counts in shares.items()],
            )
            conn.execute("UPDATE chunks SET attributed = 1 WHERE id = ?", (chunk_id,))

        await self._run("set_shares", body)

    async def add_reject(
        self, file_id: int, *, line: int, offset: int, size: int, reason: str
    ) -> None:
        """Remember a record the splitter set aside; again for the same line is a no-op."""

        def body(conn: sqlite3.Connection) -> None:
            require(fetch_file(conn, file_id), {FileStatus.SPLITTING}, "add_reject")
            conn.execute(
                'INSERT INTO rejects (file_id, line, "offset", size, reason) VALUES (?, ?, ?, ?, ?)'
                " ON CONFLICT (file_id, line) DO NOTHING",
                (file_id, line, offset, size, reason),
            )

        await self._run("add_reject", body)

    async def finish_split(self, file_id: int, *, rows: int, chunks_total: int) -> FileRecord:
        """SPLITTING -> SPLIT; `chunks_total` must equal the chunks recorded for the file."""

        def body(conn: sqlite3.Connection) -> FileRecord:
            require(fetch_file(conn, file_id), {FileStatus.SPLITTING}, "finish_split")
            mark_split(conn, file_id, rows=rows, chunks_total=chunks_total)
            return fetch_file(conn, file_id)

        return await self._run("finish_split", body)

    async def mark_submitting(self, chunk_id: int) -> ChunkRecord:
        """PENDING -> SUBMITTING and count the attempt: committed before the request goes out."""

        def body(conn: sqlite3.Connection) -> ChunkRecord:
            chunk = fetch_chunk(conn, chunk_id)
            require(chunk, {ChunkStatus.PENDING}, "mark_submitting")
            if not chunk.sealed:
                raise ValueError(f"mark_submitting: chunk {chunk_id} is a pack not yet sealed")
            file = fetch_file(conn, chunk.file_id)
            if file.status in FINAL_FILE_STATUSES or file.status is FileStatus.FINISHING:
                raise ValueError(f"mark_submitting: chunk {chunk_id} belongs to {file.status} file")
            conn.execute(
                "UPDATE chunks SET status = ?, submit_attempts = submit_attempts + 1 WHERE id = ?",
                (ChunkStatus.SUBMITTING, chunk_id),
            )
            return fetch_chunk(conn, chunk_id)

        return await self._run("mark_submitting", body)

    async def mark_submitted(
        self, chunk_id: int, *, batch_id: int, marketo_status: str, submitted_at: str
    ) -> ChunkRecord:
        """SUBMITTING -> SUBMITTED with Marketo's batch id. Again with the same id is a no-op."""

        def body(conn: sqlite3.Connection) -> ChunkRecord:
            chunk = fetch_chunk(conn, chunk_id)
            if chunk.status is ChunkStatus.SUBMITTED and chunk.batch_id == batch_id:
                return chunk
            require(chunk, {ChunkStatus.SUBMITTING}, "mark_submitted")
            conn.execute(
                "UPDATE chunks SET status = ?, batch_id = ?, marketo_status = ?, submitted_at = ?"
                " WHERE id = ?",
                (ChunkStatus.SUBMITTED, batch_id, marketo_status, submitted_at, chunk_id),
            )
            return fetch_chunk(conn, chunk_id)

        return await self._run("mark_submitted", body)

    async def mark_pending(self, chunk_id: int) -> ChunkRecord:
        """SUBMITTING -> PENDING: Marketo refused (1016, 1019, retryable); attempts are kept."""
        return await self._move_chunk(
            "mark_pending", chunk_id, {ChunkStatus.SUBMITTING}, ChunkStatus.PENDING
        )

    async def mark_unknown_outcome(self, chunk_id: int) -> ChunkRecord:
        """SUBMITTING -> PENDING after a create whose outcome is unknown; counts it."""

        def body(conn: sqlite3.Connection) -> ChunkRecord:
            chunk = fetch_chunk(conn, chunk_id)
            require(chunk, {ChunkStatus.SUBMITTING}, "mark_unknown_outcome")
            conn.execute(
                "UPDATE chunks SET status = ?, unknown_outcomes = unknown_outcomes + 1"
                " WHERE id = ?",
                (ChunkStatus.PENDING, chunk_id),
            )
            return fetch_chunk(conn, chunk_id)

        return await self._run("mark_unknown_outcome", body)

    async def update_batch(self, chunk_id: int, batch: BatchStatus) -> ChunkRecord:
        """Record a poll of a SUBMITTED chunk: Marketo's status, counters and message."""

        def body(conn: sqlite3.Connection) -> ChunkRecord:
            chunk = fetch_chunk(conn, chunk_id)
            require(chunk, {ChunkStatus.SUBMITTED}, "update_batch")
            check_batch(chunk, batch, "update_batch")
            write_batch(conn, chunk_id, batch)
            return fetch_chunk(conn, chunk_id)

        return await self._run("update_batch", body)

    async def set_chunk_files(
        self, chunk_id: int, *, failures_path: str | None, warnings_path: str | None
    ) -> ChunkRecord:
        """Remember the downloaded failures/warnings files of a chunk Marketo has a batch for."""

        def body(conn: sqlite3.Connection) -> ChunkRecord:
            chunk = fetch_chunk(conn, chunk_id)
            allowed = {ChunkStatus.SUBMITTED, ChunkStatus.COMPLETE, ChunkStatus.FAILED}
            require(chunk, allowed, "set_chunk_files")
            conn.execute(
                "UPDATE chunks SET failures_path = ?, warnings_path = ? WHERE id = ?",
                (failures_path, warnings_path, chunk_id),
            )
            return fetch_chunk(conn, chunk_id)

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
            chunk = fetch_chunk(conn, chunk_id)
            require(chunk, set(ChunkStatus) - FINAL_CHUNK_STATUSES, "finish_chunk")
            if batch is not None:
                check_batch(chunk, batch, "finish_chunk")
                write_batch(conn, chunk_id, batch)
            conn.execute(
                "UPDATE chunks SET status = ?, message = ?, finished_at = ? WHERE id = ?",
                (status, message, finished_at, chunk_id),
            )
            return fetch_chunk(conn, chunk_id)

        return await self._run("finish_chunk", body)

    # -- finishing files (results) -----------------------------------------------------------

    async def reserve_result(self, file_id: int, *, result_path: str) -> FileRecord:
        """Any unfinished file -> FINISHING with its result path, which no other file holds.

        Again with the same path is a no-op; another path for a FINISHING file is refused.
        """

        def body(conn: sqlite3.Connection) -> FileRecord:
            file = fetch_file(conn, file_id)
            if file.status is FileStatus.FINISHING and file.result_path == result_path:
                return file
            require(
                file,
                UNFINISHED_FILE_STATUSES - {FileStatus.FINISHING},
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
            return fetch_file(conn, file_id)

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
            file = fetch_file(conn, file_id)
            require(file, {FileStatus.FINISHING}, "finish_file")
            final_error = error if error is not None else file.error
            check_finish(conn, file, status, final_error)
            conn.execute(
                "UPDATE files SET status = ?, error = ?, finished_at = ? WHERE id = ?",
                (status, final_error, finished_at, file_id),
            )
            return fetch_file(conn, file_id)

        return await self._run("finish_file", body)

    async def set_file_error(self, file_id: int, error: str) -> FileRecord:
        """Remember why an unfinished file will fail; its status does not change."""

        def body(conn: sqlite3.Connection) -> FileRecord:
            require(fetch_file(conn, file_id), UNFINISHED_FILE_STATUSES, "set_file_error")
            conn.execute("UPDATE files SET error = ? WHERE id = ?", (error, file_id))
            return fetch_file(conn, file_id)

        return await self._run("set_file_error", body)

    # -- queries -----------------------------------------------------------------------------

    async def get_file(self, file_id: int) -> FileRecord:
        return await self._run("get_file", lambda conn: fetch_file(conn, file_id), write=False)

    async def find_file(self, ticket: str) -> FileRecord | None:
        """The file handed over with `ticket` (the latest claimed, should it be reused), or None."""

        def body(conn: sqlite3.Connection) -> FileRecord | None:
            row = conn.execute(
                "SELECT * FROM files WHERE ticket = ? ORDER BY claimed_at DESC, id DESC LIMIT 1",
                (ticket,),
            ).fetchone()
            return None if row is None else file_record(row)

        return await self._run("find_file", body, write=False)

    async def files(self, statuses: Iterable[FileStatus] | None = None) -> list[FileRecord]:
        """Files in claim order (claimed_at, then id), optionally only those in `statuses`."""
        where, params = status_filter("status", statuses)

        def body(conn: sqlite3.Connection) -> list[FileRecord]:
            sql = f"SELECT * FROM files WHERE {where} ORDER BY claimed_at, id"
            return [file_record(row) for row in conn.execute(sql, params)]

        return await self._run("files", body, write=False)

    async def chunks(
        self, *, file_id: int | None = None, statuses: Iterable[ChunkStatus] | None = None
    ) -> list[ChunkRecord]:
        """Chunks, optionally filtered by status.

        With `file_id`: that file's chunks as it sees them (its share of a shared one,
        see `ChunkRecord`), open packs included, by index. Without: every chunk as the
        job it is, in its owner's claim order then by index, open packs left out (they
        are not jobs yet; `open_packs` lists them)."""
        where, params = status_filter("c.status", statuses)
        if file_id is not None:

            def views(conn: sqlite3.Connection) -> list[ChunkRecord]:
                return select_views(conn, f"{where} AND p.file_id = ?", [*params, file_id])

            return await self._run("chunks", views, write=False)

        def body(conn: sqlite3.Connection) -> list[ChunkRecord]:
            return select_chunks(conn, f"{where} AND c.sealed = 1", params)

        return await self._run("chunks", body, write=False)

    async def tallies(self) -> dict[str, int]:
        """Counts kept by triggers as rows change: "files:<status>", "chunks:<status>" and
        "rows:processed" over the files the store holds. A few rows, whatever the history."""

        def body(conn: sqlite3.Connection) -> dict[str, int]:
            return {str(r[0]): int(r[1]) for r in conn.execute("SELECT name, n FROM tallies")}

        return await self._run("tallies", body, write=False)

    async def listing(
        self,
        *,
        limit: int | None,
        statuses: Iterable[FileStatus] | None = None,
        ticket: str | None = None,
        name_glob: str | None = None,
    ) -> list[FileRecord]:
        """At most `limit` files (None: no bound), active work first (claim order), then the
        most recently finished (newest first); optionally only those in `statuses`, with
        hand-over id `ticket`, or whose name matches `name_glob` (SQLite's GLOB: `*`, `?`,
        `[...]`, case-sensitive). Index lookups only: the cost follows `limit` and the
        active files, not the history (the status index for active work, finished_at for
        the finished; the id's own index when `ticket` is given)."""
        wanted = set(FileStatus) if statuses is None else set(statuses)
        active = sorted(wanted - FINAL_FILE_STATUSES)
        finished = sorted(wanted & FINAL_FILE_STATUSES)
        extra = ""
        extra_params: list[str] = []
        if ticket is not None:
            extra += " AND ticket = ?"
            extra_params.append(ticket)
        if name_glob is not None:
            extra += " AND name GLOB ?"
            extra_params.append(name_glob)

        def index(name: str) -> str:
            return "" if ticket is not None else f" INDEXED BY {name}"

        def body(conn: sqlite3.Connection) -> list[FileRecord]:
            found: list[FileRecord] = []
            if active:
                where, params = status_filter("status", active)
                sql = (
                    f"SELECT * FROM files{index('files_by_status')} WHERE {where}{extra}"
                    " ORDER BY claimed_at, id LIMIT ?"
                )
                rows = conn.execute(sql, [*params, *extra_params, -1 if limit is None else limit])
                found += [file_record(r) for r in rows]
            room = -1 if limit is None else limit - len(found)
            if finished and room != 0:
                # finished_at is set exactly when a file becomes final: the index serves it.
                where, params = status_filter("status", finished)
                sql = (
                    f"SELECT * FROM files{index('files_by_finished')}"
                    f" WHERE finished_at IS NOT NULL AND {where}{extra}"
                    " ORDER BY finished_at DESC, id DESC LIMIT ?"
                )
                rows = conn.execute(sql, [*params, *extra_params, room])
                found += [file_record(r) for r in rows]
            return found

        return await self._run("listing", body, write=False)

    async def chunks_of(self, file_ids: Iterable[int]) -> list[ChunkRecord]:
        """The chunks of the given files as each sees them (see `chunks`), by file then
        index: a shared chunk once per file in it."""
        ids = sorted(set(file_ids))

        def body(conn: sqlite3.Connection) -> list[ChunkRecord]:
            found: list[ChunkRecord] = []
            for start in range(0, len(ids), 500):  # SQLite caps bound parameters
                part = ids[start : start + 500]
                found += select_views(conn, f"p.file_id IN ({', '.join('?' * len(part))})", part)
            return found

        return await self._run("chunks_of", body, write=False)

    async def prune_finished(self, *, before: str, limit: int) -> int:
        """Forget at most `limit` finished files (complete or failed) that finished before
        `before` (a `stamp`), with their chunks and set-aside records; how many went.

        One short transaction: call it again until it returns less than `limit`. Result
        files on disk are not touched; they belong to the user."""

        def body(conn: sqlite3.Connection) -> int:
            rows = conn.execute(
                "SELECT id FROM files INDEXED BY files_by_finished"
                " WHERE finished_at IS NOT NULL AND finished_at < ?"
                " AND status IN (?, ?) ORDER BY finished_at LIMIT ?",
                (before, FileStatus.COMPLETE, FileStatus.FAILED, limit),
            ).fetchall()
            going = {int(row[0]) for row in rows}
            # A shared chunk goes with all of its files, or waits until it can.
            chunk_ids: set[int] = set()
            for file_id in sorted(going):
                if file_id not in going:
                    continue
                mates = conn.execute(
                    "SELECT q.chunk_id, q.file_id, f.status FROM pieces AS p"
                    " JOIN pieces AS q ON q.chunk_id = p.chunk_id"
                    " JOIN files AS f ON f.id = q.file_id WHERE p.file_id = ?",
                    (file_id,),
                ).fetchall()
                if any(FileStatus(m[2]) not in FINAL_FILE_STATUSES for m in mates):
                    going.discard(file_id)
                    continue
                going.update(int(m[1]) for m in mates)
                chunk_ids.update(int(m[0]) for m in mates)
            ids = [(i,) for i in sorted(going)]
            conn.executemany("DELETE FROM rejects WHERE file_id = ?", ids)
            conn.executemany("DELETE FROM pieces WHERE chunk_id = ?", [(c,) for c in chunk_ids])
            conn.executemany("DELETE FROM chunks WHERE id = ?", [(c,) for c in chunk_ids])
            conn.executemany("DELETE FROM files WHERE id = ?", ids)
            return len(ids)

        return await self._run("prune_finished", body)

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

    async def result_path_taken(self, path: str) -> bool:
        """Whether a result path was ever reserved (an index lookup)."""

        def body(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT 1 FROM files WHERE result_path = ?", (path,)).fetchone()
            return row is not None

        return await self._run("result_path_taken", body, write=False)

    async def recover(self) -> Recovery:
        """At startup: SUBMITTING chunks back to PENDING, and what else was left half done."""

        def body(conn: sqlite3.Connection) -> Recovery:
            unknown = select_chunks(conn, "c.status = ?", [ChunkStatus.SUBMITTING])
            # The request may have gone out before the kill: an unknown outcome.
            conn.execute(
                "UPDATE chunks SET status = ?, unknown_outcomes = unknown_outcomes + 1"
                " WHERE status = ?",
                (ChunkStatus.PENDING, ChunkStatus.SUBMITTING),
            )
            resubmit = [
                replace(c, status=ChunkStatus.PENDING, unknown_outcomes=c.unknown_outcomes + 1)
                for c in unknown
            ]
            open_files = [
                file_record(row)
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
                open_packs=select_chunks(conn, "c.sealed = 0", []),
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
            file = fetch_file(conn, file_id)
            if file.status is target:
                return file
            require(file, sources, operation)
            conn.execute("UPDATE files SET status = ? WHERE id = ?", (target, file_id))
            return fetch_file(conn, file_id)

        return await self._run(operation, body)

    async def _move_chunk(
        self, operation: str, chunk_id: int, sources: set[ChunkStatus], target: ChunkStatus
    ) -> ChunkRecord:
        def body(conn: sqlite3.Connection) -> ChunkRecord:
            require(fetch_chunk(conn, chunk_id), sources, operation)
            conn.execute("UPDATE chunks SET status = ? WHERE id = ?", (target, chunk_id))
            return fetch_chunk(conn, chunk_id)

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
            raise runtime_error(self.path, operation, exc) from exc
        return result
