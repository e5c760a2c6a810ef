"""The key rule's part of the store: the order chunks were recorded in, and their conflicts.

`KeyOrder` is one part of the `Store` (see `orchestrator.store.store`). Two of our
jobs whose keys meet must never import at once (SPEC section 5), so:

- A chunk enters the key order when it is recorded whole: `add_chunk`, or a pack at
  `seal_pack` (an open pack still takes rows). Its place (`seq`) is the order the
  conflict check takes chunks in; it is unchecked until then.
- The check (`orchestrator.keyorder`) intersects its keys with those of every earlier
  chunk still in the key order and records a conflict (earlier -> later) for each
  that meets it, and the chunk checked, in one transaction (`record_conflicts`). An
  unchecked chunk is never sent: a kill between its record and its check loses
  nothing, the check runs again.
- A chunk stays in the key order, holding its keys, until it is done: final, and no
  copy of it can still be at Marketo. A chunk without an unknown create outcome is
  done when it is final. One with an unknown outcome (a copy may be queued ahead of
  its resubmission, or it was refused past max_resubmits with copies that may exist)
  is done once one more of our jobs finished after it (`finish_chunk` says so,
  `release_after_job`), or when the scheduler saw nothing of ours outstanding for
  long enough (`release_keys`). So the table holds only chunks in flight.
- `holds` says which pending chunks may not be sent yet and why: unchecked, or the
  earlier chunks that meet them and still hold their keys.

Chunks recorded before the rule existed have no place: they hold nothing, wait for
nothing. Conflicts stay until retention prunes their chunks (`forget_chunks`).
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from orchestrator.models import FINAL_CHUNK_STATUSES, ChunkStatus, Hold
from orchestrator.store.connection import Runner

_FINAL = tuple(str(s) for s in sorted(FINAL_CHUNK_STATUSES))


@dataclass(frozen=True, slots=True)
class Keyed:
    """A chunk in the key order: where its keys are, and whether it is final."""

    chunk_id: int
    seq: int
    path: str
    final: bool


# -- writes other transitions make (run in the store's thread) ----------------------------------


def enter_key_order(conn: sqlite3.Connection, chunk_id: int) -> None:
    """A chunk recorded whole takes the next place, unchecked; again is a no-op."""
    conn.execute(
        "INSERT OR IGNORE INTO key_order (chunk_id, seq)"
        " SELECT ?, coalesce(max(seq), 0) + 1 FROM key_order",
        (chunk_id,),
    )


def release_after_finish(conn: sqlite3.Connection, chunk_id: int, unknown_outcomes: int) -> None:
    """A chunk went final: done now, unless a create of it had an unknown outcome."""
    if unknown_outcomes == 0:
        conn.execute("DELETE FROM key_order WHERE chunk_id = ?", (chunk_id,))


_FINAL_HERE = (
    "(SELECT status FROM chunks WHERE id = key_order.chunk_id)"
    f" IN ({', '.join(repr(s) for s in _FINAL)})"
)


def release_after_job(conn: sqlite3.Connection, chunk_id: int) -> None:
    """One of our jobs (`chunk_id`'s) ended at Marketo: every other final chunk still
    holding its keys finished before it, so no copy of those can still be there."""
    conn.execute(f"DELETE FROM key_order WHERE chunk_id <> ? AND {_FINAL_HERE}", (chunk_id,))


def forget_chunks(conn: sqlite3.Connection, chunk_ids: Sequence[int]) -> None:
    """Retention prunes chunks: their places and conflicts go first."""
    ids = [(c,) for c in chunk_ids]
    conn.executemany("DELETE FROM conflicts WHERE earlier = ? OR later = ?", [i * 2 for i in ids])
    conn.executemany("DELETE FROM key_order WHERE chunk_id = ?", ids)


# -- the part of the Store ------------------------------------------------------------------------

_KEYED = "SELECT k.chunk_id, k.seq, c.path, c.status FROM key_order AS k JOIN chunks AS c"


def _keyed(row: sqlite3.Row) -> Keyed:
    return Keyed(int(row[0]), int(row[1]), str(row[2]), ChunkStatus(row[3]) in FINAL_CHUNK_STATUSES)


class KeyOrder(Runner):
    """The `Store`'s key order: places, conflicts and holds."""

    async def unchecked(self) -> list[Keyed]:
        """Chunks whose conflicts are not known yet, in the order they were recorded."""

        def body(conn: sqlite3.Connection) -> list[Keyed]:
            sql = f"{_KEYED} ON c.id = k.chunk_id WHERE k.checked = 0 ORDER BY k.seq"
            return [_keyed(row) for row in conn.execute(sql)]

        return await self._run("unchecked", body, write=False)

    async def holding_before(self, seq: int) -> list[Keyed]:
        """Chunks recorded before place `seq` that still hold their keys, in order."""

        def body(conn: sqlite3.Connection) -> list[Keyed]:
            sql = f"{_KEYED} ON c.id = k.chunk_id WHERE k.seq < ? ORDER BY k.seq"
            return [_keyed(row) for row in conn.execute(sql, (seq,))]

        return await self._run("holding_before", body, write=False)

    async def record_conflicts(self, chunk_id: int, earlier: Iterable[int]) -> None:
        """The chunk's check is done: it waits for each of `earlier` (chunks whose keys
        meet its own) until that one is done. Again is a no-op."""
        edges = [(e, chunk_id) for e in sorted(set(earlier))]

        def body(conn: sqlite3.Connection) -> None:
            conn.executemany(
                "INSERT OR IGNORE INTO conflicts (earlier, later) VALUES (?, ?)", edges
            )
            conn.execute("UPDATE key_order SET checked = 1 WHERE chunk_id = ?", (chunk_id,))

        await self._run("record_conflicts", body)

    async def release_keys(self, chunk_ids: Iterable[int]) -> None:
        """These final chunks are done: no copy of them can still be at Marketo."""
        ids = [(c,) for c in chunk_ids]

        def body(conn: sqlite3.Connection) -> None:
            conn.executemany(f"DELETE FROM key_order WHERE chunk_id = ? AND {_FINAL_HERE}", ids)

        await self._run("release_keys", body)

    async def holds(self, chunk_ids: Iterable[int] | None = None) -> dict[int, tuple[Hold, ...]]:
        """The pending chunks (of `chunk_ids`, or all) the key rule keeps from being sent,
        each with the earlier chunks it waits for in the order they were recorded; an
        empty tuple: its keys are not checked yet."""
        wanted = None if chunk_ids is None else sorted(set(chunk_ids))

        def body(conn: sqlite3.Connection) -> dict[int, tuple[Hold, ...]]:
            found: dict[int, list[Hold]] = {}
            unchecked = conn.execute(
                "SELECT k.chunk_id FROM key_order AS k JOIN chunks AS c ON c.id = k.chunk_id"
                " WHERE k.checked = 0 AND c.status = ? ORDER BY k.seq",
                (ChunkStatus.PENDING,),
            )
            for (chunk_id,) in unchecked:
                found[int(chunk_id)] = []
            rows = conn.execute(
                "SELECT h.later, e.id, e.file_id, f.name, f.ticket, e.idx, e.status,"
                " e.submitted_at, e.finished_at"
                " FROM key_order AS k JOIN conflicts AS h ON h.earlier = k.chunk_id"
                " JOIN chunks AS l ON l.id = h.later JOIN chunks AS e ON e.id = k.chunk_id"
                " JOIN files AS f ON f.id = e.file_id"
                " WHERE l.status = ? ORDER BY h.later, k.seq",
                (ChunkStatus.PENDING,),
            )
            for row in rows:
                hold = Hold(
                    chunk_id=int(row[1]),
                    file_id=int(row[2]),
                    file=str(row[3]),
                    ticket=str(row[4] or ""),
                    index=int(row[5]),
                    status=ChunkStatus(row[6]),
                    submitted_at=row[7],
                    finished_at=row[8],
                )
                found.setdefault(int(row[0]), []).append(hold)
            keep = found if wanted is None else {c: found[c] for c in wanted if c in found}
            return {chunk_id: tuple(holds) for chunk_id, holds in keep.items()}

        return await self._run("holds", body, write=False)

    async def held_chunks(self) -> int:
        """How many pending chunks wait for an earlier chunk that shares keys with them."""

        def body(conn: sqlite3.Connection) -> int:
            (count,) = conn.execute(
                "SELECT count(DISTINCT h.later) FROM key_order AS k"
                " JOIN conflicts AS h ON h.earlier = k.chunk_id JOIN chunks AS l ON l.id = h.later"
                " WHERE l.status = ?",
                (ChunkStatus.PENDING,),
            ).fetchone()
            return int(count)

        return await self._run("held_chunks", body, write=False)
