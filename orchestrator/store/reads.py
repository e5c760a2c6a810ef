"""The store's read side: files, chunks and counts as records, each read one transaction.

`Reads` is one part of the `Store` (see `orchestrator.store.store`); its methods
take no write lock, so `status` and the hand-over client read beside a running
daemon without holding it up.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable
from datetime import datetime

from orchestrator.models import (
    FINAL_FILE_STATUSES,
    ChunkRecord,
    ChunkStatus,
    FileRecord,
    FileStatus,
    QuotaState,
    RejectRecord,
)
from orchestrator.store.connection import Runner
from orchestrator.store.rows import (
    fetch_file,
    file_record,
    select_chunks,
    select_views,
    status_filter,
)


class Reads(Runner):
    """The `Store`'s queries."""

    # -- files -------------------------------------------------------------------------------

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

    async def result_path_taken(self, path: str) -> bool:
        """Whether a result path was ever reserved (an index lookup)."""

        def body(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT 1 FROM files WHERE result_path = ?", (path,)).fetchone()
            return row is not None

        return await self._run("result_path_taken", body, write=False)

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

    # -- chunks ------------------------------------------------------------------------------

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

    async def members(self, chunk_id: int) -> list[ChunkRecord]:
        """The chunk as each of its files sees it, in the order their records are in it."""

        def body(conn: sqlite3.Connection) -> list[ChunkRecord]:
            views = select_views(conn, "p.chunk_id = ?", [chunk_id])
            return sorted(views, key=lambda v: v.first_row)

        return await self._run("members", body, write=False)

    async def open_packs(self) -> list[ChunkRecord]:
        """Packs not yet sealed, as jobs, oldest first."""

        def body(conn: sqlite3.Connection) -> list[ChunkRecord]:
            return select_chunks(conn, "c.sealed = 0", [])

        return await self._run("open_packs", body, write=False)

    # -- counts and checks -------------------------------------------------------------------

    async def tallies(self) -> dict[str, int]:
        """Counts kept by triggers as rows change: "files:<status>", "chunks:<status>" and
        "rows:processed" over the files the store holds. A few rows, whatever the history."""

        def body(conn: sqlite3.Connection) -> dict[str, int]:
            return {str(r[0]): int(r[1]) for r in conn.execute("SELECT name, n FROM tallies")}

        return await self._run("tallies", body, write=False)

    async def api_calls(self, day: str) -> int:
        def body(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT count FROM api_calls WHERE day = ?", (day,)).fetchone()
            return int(row[0]) if row is not None else 0

        return await self._run("api_calls", body, write=False)

    async def quota(self) -> QuotaState | None:
        """The daily quota as the daemon last reckoned it; None before it did."""

        def body(conn: sqlite3.Connection) -> QuotaState | None:
            row = conn.execute(
                "SELECT as_of, daily_quota, daily_reserve, resets_at, marketo_count, read_at,"
                " next_read_at, ours_since, ours_today, paused_until FROM quota WHERE id = 1"
            ).fetchone()
            if row is None:
                return None

            def at(text: str | None) -> datetime | None:
                return None if text is None else datetime.fromisoformat(text)

            return QuotaState(
                as_of=datetime.fromisoformat(row[0]),
                quota=int(row[1]),
                reserve=int(row[2]),
                resets_at=datetime.fromisoformat(row[3]),
                marketo_count=None if row[4] is None else int(row[4]),
                read_at=at(row[5]),
                next_read_at=at(row[6]),
                ours_since=int(row[7]),
                ours_today=int(row[8]),
                paused_until=at(row[9]),
            )

        return await self._run("quota", body, write=False)

    async def integrity_check(self) -> str:
        """SQLite's full integrity check: "ok", or the problems it found."""

        def body(conn: sqlite3.Connection) -> str:
            return "; ".join(str(row[0]) for row in conn.execute("PRAGMA integrity_check"))

        return await self._run("integrity_check", body, write=False)
