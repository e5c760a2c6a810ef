"""A chunk's transitions at Marketo, from sending to its final word: one method each.

`ChunkTransitions` is one part of the `Store` (see `orchestrator.store.store`).
The scheduler marks a chunk SUBMITTING before the request goes out and SUBMITTED
with Marketo's batch id after; the poller records each poll and the final status;
results records each file's share of a shared chunk. `recover` puts back what a
crash left half sent.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass, replace

from orchestrator.clock import stamp
from orchestrator.models import (
    FINAL_CHUNK_STATUSES,
    FINAL_FILE_STATUSES,
    BatchStatus,
    ChunkRecord,
    ChunkStatus,
    FileRecord,
    FileStatus,
    QuotaState,
)
from orchestrator.store.conflicts import release_after_finish, release_after_job
from orchestrator.store.connection import Runner
from orchestrator.store.rows import (
    check_batch,
    fetch_chunk,
    fetch_file,
    file_record,
    require,
    select_chunks,
    write_batch,
)


@dataclass(frozen=True, slots=True)
class Recovery:
    """What a crash left half done, as `Store.recover` finds it at startup."""

    resubmit: list[ChunkRecord]  # were SUBMITTING (outcome unknown), now PENDING again
    open_packs: list[ChunkRecord]  # packs not sealed: bytes past their size may be on disk
    claiming: list[FileRecord]  # recorded, rename maybe not done
    resplit: list[FileRecord]  # CLAIMED or SPLITTING: split (again), reusing known chunks
    finishing: list[FileRecord]  # result name reserved, result maybe not written


class ChunkTransitions(Runner):
    """The `Store`'s transitions of chunks, and the counts kept beside them."""

    # -- sending (scheduler) -----------------------------------------------------------------

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

    # -- polling and finishing (poller, results) ---------------------------------------------

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
            release_after_finish(conn, chunk_id, chunk.unknown_outcomes)
            if chunk.status is ChunkStatus.SUBMITTED:  # one of our jobs ended at Marketo
                release_after_job(conn, chunk_id)
            return fetch_chunk(conn, chunk_id)

        return await self._run("finish_chunk", body)

    async def set_shares(
        self, chunk_id: int, shares: dict[int, tuple[int, int, int]], *, unmatched: int = 0
    ) -> None:
        """Each file's (processed, failed, warned) rows of a final chunk, by file id, once
        its failures and warnings are matched back, and the rows that matched no record;
        the chunk is then `attributed`."""

        def body(conn: sqlite3.Connection) -> None:
            chunk = fetch_chunk(conn, chunk_id)
            require(chunk, set(FINAL_CHUNK_STATUSES), "set_shares")
            conn.executemany(
                "UPDATE pieces SET rows_processed = ?, rows_failed = ?, rows_with_warning = ?"
                " WHERE chunk_id = ? AND file_id = ?",
                [(*counts, chunk_id, file_id) for file_id, counts in shares.items()],
            )
            conn.execute(
                "UPDATE chunks SET attributed = 1, unmatched_rows = ? WHERE id = ?",
                (unmatched, chunk_id),
            )

        await self._run("set_shares", body)

    # -- recovery at startup -----------------------------------------------------------------

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

    async def save_quota(self, state: QuotaState) -> None:
        """Keep the daily quota as last reckoned (`quota` reads it back)."""
        values = (
            stamp(state.as_of),
            state.quota,
            state.reserve,
            stamp(state.resets_at),
            state.marketo_count,
            stamp(state.read_at) if state.read_at else None,
            stamp(state.next_read_at) if state.next_read_at else None,
            state.ours_since,
            state.ours_today,
            stamp(state.paused_until) if state.paused_until else None,
        )

        def body(conn: sqlite3.Connection) -> None:
            conn.execute(
                "INSERT OR REPLACE INTO quota (id, as_of, daily_quota, daily_reserve, resets_at,"
                " marketo_count, read_at, next_read_at, ours_since, ours_today, paused_until)"
                " VALUES (1, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                values,
            )

        await self._run("save_quota", body)

    # -- machinery ---------------------------------------------------------------------------

    async def _move_chunk(
        self, operation: str, chunk_id: int, sources: set[ChunkStatus], target: ChunkStatus
    ) -> ChunkRecord:
        def body(conn: sqlite3.Connection) -> ChunkRecord:
            require(fetch_chunk(conn, chunk_id), sources, operation)
            conn.execute("UPDATE chunks SET status = ? WHERE id = ?", (target, chunk_id))
            return fetch_chunk(conn, chunk_id)

        return await self._run(operation, body)
