"""A file's transitions, from the claim to its result: one method per transition.

`FileTransitions` is one part of the `Store` (see `orchestrator.store.store`).
Each method is one short transaction, committed before it returns: the caller may
rely on it before taking the external step it enables (a rename, a result write).
The spool claims files, the split stage splits them (alone, or into a shared pack:
`store.packs`), results finishes them, and retention at last forgets them.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass, replace

from orchestrator.models import (
    FINAL_FILE_STATUSES,
    UNFINISHED_FILE_STATUSES,
    ChunkRecord,
    FileRecord,
    FileStatus,
)
from orchestrator.store.conflicts import forget_chunks
from orchestrator.store.connection import Runner
from orchestrator.store.rows import (
    check_finish,
    fetch_file,
    insert_chunk,
    mark_split,
    require,
)
from orchestrator.tickets import new_id


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


class FileTransitions(Runner):
    """The `Store`'s transitions of files (and of the chunks a split adds)."""

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

    # -- finishing files (results) -----------------------------------------------------------

    async def reserve_result(self, file_id: int, *, result_path: str) -> FileRecord:
        """Any unfinished file -> FINISHING with its result path, which no other file holds.

        Again with the same path is a no-op; another path for a FINISHING file is refused.
        """

        def body(conn: sqlite3.Connection) -> FileRecord:
            file = fetch_file(conn, file_id)
            if file.status is FileStatus.FINISHING and file.result_path == result_path:
                return file
            require(file, UNFINISHED_FILE_STATUSES - {FileStatus.FINISHING}, "reserve_result")
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

    async def set_file_warnings(self, file_id: int, warnings: Sequence[str]) -> FileRecord:
        """Remember what an unfinished file's header check warned of (for result.json)."""

        def body(conn: sqlite3.Connection) -> FileRecord:
            require(fetch_file(conn, file_id), UNFINISHED_FILE_STATUSES, "set_file_warnings")
            text = json.dumps(list(warnings)) if warnings else None
            conn.execute("UPDATE files SET warnings = ? WHERE id = ?", (text, file_id))
            return fetch_file(conn, file_id)

        return await self._run("set_file_warnings", body)

    # -- retention ---------------------------------------------------------------------------

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
            forget_chunks(conn, sorted(chunk_ids))
            conn.executemany("DELETE FROM rejects WHERE file_id = ?", ids)
            conn.executemany("DELETE FROM pieces WHERE chunk_id = ?", [(c,) for c in chunk_ids])
            conn.executemany("DELETE FROM chunks WHERE id = ?", [(c,) for c in chunk_ids])
            conn.executemany("DELETE FROM files WHERE id = ?", ids)
            return len(ids)

        return await self._run("prune_finished", body)

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
