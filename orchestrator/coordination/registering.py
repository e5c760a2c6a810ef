"""Registering: every chunk a daemon records, with its keys, in the shared FIFO.

Each chunk is registered once (`register_chunk`: idempotent, a second call returns the
same id): its file's claim time from the database's clock (the first time any chunk of
that file registers), its key hashes, and the edges from every earlier unfinished
chunk that shares a key with it, which `admission` reads as the key rule across
daemons. Registrations take turns (an advisory lock per subscription), so a chunk
always sees the keys of every chunk registered before it.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable

from orchestrator.coordination.leases import Conn

TWO_64 = 1 << 64
TWO_63 = 1 << 63


def signed(key: int) -> int:
    """A 64-bit key hash (unsigned) as PostgreSQL's bigint."""
    return key - TWO_64 if key >= TWO_63 else key


def register_chunk(
    conn: Conn,
    subscription: str,
    instance: str,
    *,
    file_ref: int,
    chunk_ref: int,
    index: int,
    list_id: int,
    object: str,
    api_name: str,
    keys: Iterable[int],
) -> int:
    """Record a chunk (idempotent: again returns the same id) with its keys and the
    edges from every earlier unfinished chunk that shares one; its id."""
    # Registrations take turns, so a chunk always sees every earlier chunk's keys.
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("register:" + subscription,))
    found = conn.execute(
        """SELECT id FROM marketo_orchestrator.chunks
           WHERE subscription = %s AND instance = %s AND chunk_ref = %s""",
        (subscription, instance, chunk_ref),
    ).fetchone()
    if found is not None:
        return int(found[0])
    conn.execute(
        """INSERT INTO marketo_orchestrator.files (subscription, instance, file_ref)
           VALUES (%s, %s, %s) ON CONFLICT DO NOTHING""",
        (subscription, instance, file_ref),
    )
    row = conn.execute(
        """INSERT INTO marketo_orchestrator.chunks (subscription, instance, file_ref,
               chunk_ref, idx, claimed_at, list_id, object, api_name, state)
           SELECT %s, %s, %s, %s, %s, f.claimed_at, %s, %s, %s, 'pending'
           FROM marketo_orchestrator.files AS f
           WHERE f.subscription = %s AND f.instance = %s AND f.file_ref = %s
           RETURNING id""",
        (
            subscription,
            instance,
            file_ref,
            chunk_ref,
            index,
            list_id,
            object,
            api_name,
            subscription,
            instance,
            file_ref,
        ),
    ).fetchone()
    assert row is not None  # the file row was inserted above
    chunk = int(row[0])
    with conn.cursor().copy("COPY marketo_orchestrator.keys (chunk, key) FROM STDIN") as copy:
        for key in keys:
            copy.write_row((chunk, signed(key)))
    conn.execute(
        """INSERT INTO marketo_orchestrator.edges (held, blocker)
           SELECT DISTINCT %(c)s, other.chunk
           FROM marketo_orchestrator.keys AS mine
           JOIN marketo_orchestrator.keys AS other
             ON other.key = mine.key AND other.chunk < mine.chunk
           JOIN marketo_orchestrator.chunks AS b ON b.id = other.chunk
           JOIN marketo_orchestrator.subscriptions AS s ON s.id = b.subscription
           WHERE mine.chunk = %(c)s
             AND (b.state IN ('pending', 'creating', 'submitted')
                  OR s.finished_jobs < b.blocks_until_finished)""",
        {"c": chunk},
    )
    return chunk


def file_claimed_at(conn: Conn, subscription: str, instance: str, file_ref: int) -> dt.datetime:
    """The file's claim time by the database's clock (registered now if it was not)."""
    conn.execute(
        """INSERT INTO marketo_orchestrator.files (subscription, instance, file_ref)
           VALUES (%s, %s, %s) ON CONFLICT DO NOTHING""",
        (subscription, instance, file_ref),
    )
    row = conn.execute(
        """SELECT claimed_at FROM marketo_orchestrator.files
           WHERE subscription = %s AND instance = %s AND file_ref = %s""",
        (subscription, instance, file_ref),
    ).fetchone()
    assert row is not None
    value: dt.datetime = row[0]
    return value


def chunk_id(conn: Conn, subscription: str, instance: str, chunk_ref: int) -> int | None:
    row = conn.execute(
        """SELECT id FROM marketo_orchestrator.chunks
           WHERE subscription = %s AND instance = %s AND chunk_ref = %s""",
        (subscription, instance, chunk_ref),
    ).fetchone()
    return None if row is None else int(row[0])


def unfinished(conn: Conn, subscription: str, instance: str) -> list[tuple[int, int, str, int]]:
    """This daemon's chunks the database has not seen end: (id, chunk_ref, state,
    unknown_outcomes) each, for the daemon to set right what a kill kept from it."""
    rows = conn.execute(
        """SELECT id, chunk_ref, state, unknown_outcomes FROM marketo_orchestrator.chunks
           WHERE subscription = %s AND instance = %s
             AND state IN ('pending', 'creating', 'submitted')
           ORDER BY id""",
        (subscription, instance),
    ).fetchall()
    return [(int(r[0]), int(r[1]), str(r[2]), int(r[3])) for r in rows]
