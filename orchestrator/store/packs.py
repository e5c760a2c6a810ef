"""Packs: small files sharing one chunk (one Marketo job), one method per transition.

`PackTransitions` is one part of the `Store` (see `orchestrator.store.store`). A
small file's one chunk opens a pack (`open_pack`), later small files of the same
route, format and header join it (`join_pack`, after their records were appended),
and the packer seals it (`seal_pack`) when it takes no more: only then may the
scheduler send it, and only then does it take its place in the key rule's order.
"""

from __future__ import annotations

import sqlite3

from orchestrator.models import ChunkRecord, ChunkStatus, FileStatus
from orchestrator.store.conflicts import enter_key_order
from orchestrator.store.connection import Runner
from orchestrator.store.rows import (
    fetch_chunk,
    fetch_file,
    insert_chunk,
    mark_split,
    require,
    select_views,
)


class PackTransitions(Runner):
    """The `Store`'s transitions of packs."""

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
            sealed = conn.execute(
                "UPDATE chunks SET sealed = 1 WHERE id = ? AND sealed = 0", (chunk_id,)
            ).rowcount
            record = fetch_chunk(conn, chunk_id)
            if sealed:
                enter_key_order(conn, chunk_id)  # whole now: its keys are checked next
            return record

        return await self._run("seal_pack", body)
