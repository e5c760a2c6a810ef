"""Admission: which chunk of which daemon may become a Marketo job now.

Every daemon registers each chunk it records (`register_chunk`: its file's claim time
from the database's clock, its key hashes, and the edges from every earlier
unfinished chunk that shares a key with it). A daemon asks before every create
(`admit`), in one short transaction that first locks the subscription's row in a
statement of its own (so admissions take turns and each sees the others' commits:
counting and claiming in one snapshot is what overshoots), then checks, in order:

1. its lease (a daemon taken as dead admits nothing until it registers again);
2. the 607 pause, the 606 hold and the shared 1016 backoff;
3. the subscription's daily usage against the quota less the reserve;
4. the shared queue model: jobs outstanding of all daemons, slots others hold, and
   jobs lost creates may have made, against the strictest `queued_jobs`;
5. the key rule: no unfinished chunk it has an edge from;
6. one outstanding job per static list;
7. FIFO across daemons: no earlier chunk (by claim time) of a live, sending daemon
   that could go now.
Then it takes the lowest free slot (the partial unique index on slots makes the
database refuse an 11th outstanding job whatever the code above believes) and marks
the chunk `creating` under the daemon's epoch, and commits. The HTTP create happens
after, outside any transaction; its batch id is recorded (`created`) only while the
daemon still holds that epoch.

What the create's answer does next is `outcomes`; registering chunks is
`registering`.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from orchestrator import constants
from orchestrator.coordination.budget import usage
from orchestrator.coordination.leases import Conn, require_lease, strictest
from orchestrator.coordination.shapes import Deferral, Grant, Limits

UNFINISHED = ("pending", "creating", "submitted")


def admit(
    conn: Conn,
    subscription: str,
    instance: str,
    epoch: int,
    chunk: int,
    *,
    quota_since: dt.datetime,
    quota_resets_in: float,
) -> Grant | Deferral:
    """May `chunk` (this daemon's, pending) be created now? See the module docstring."""
    model = conn.execute(
        """SELECT foreign_slots, orphans, backoff_until, backoff_reason, hold_until,
                  paused_until, clock_timestamp()
           FROM marketo_orchestrator.subscriptions WHERE id = %s FOR UPDATE""",
        (subscription,),
    ).fetchone()
    assert model is not None  # registered with the daemon
    foreign, orphans, backoff_until, reason, hold_until, paused_until, now = model
    require_lease(conn, subscription, instance, epoch)
    for until, why in (
        (paused_until, "607: the daily quota is spent"),
        (hold_until, "606: the call window is full"),
        (backoff_until, f"backoff after {reason or 'an error'}"),
    ):
        if until is not None and until > now:
            return Deferral(why, (until - now).total_seconds())
    limits = strictest(conn, subscription)
    assert limits is not None  # this daemon's lease is valid, so one is alive
    today = usage(conn, subscription, quota_since)
    used = (today.total or 0) + today.calls_since
    if used >= limits.daily_quota - limits.daily_reserve:
        return Deferral(
            f"the subscription used {used} of its {limits.daily_quota} calls today "
            f"({limits.daily_reserve} are left for others)",
            quota_resets_in,
        )
    room = queue_room(conn, subscription, limits, int(foreign), int(orphans))
    if room <= 0:
        return Deferral("Marketo's queue is full (all daemons' jobs and others')")
    candidate = conn.execute(
        """SELECT state, claimed_at, idx, list_id, file_ref
           FROM marketo_orchestrator.chunks WHERE id = %s AND instance = %s""",
        (chunk, instance),
    ).fetchone()
    if candidate is None or candidate[0] != "pending":
        return Deferral(f"chunk {chunk} is not pending here")
    _, claimed_at, index, list_id, file_ref = candidate
    blocker = first_blocker(conn, chunk)
    if blocker is not None:
        return Deferral(f"shares keys with {blocker}, not finished")
    if list_id and list_busy(conn, subscription, int(list_id)):
        return Deferral(f"an import to list {list_id} is outstanding")
    ahead = earlier_ready(conn, subscription, (claimed_at, instance, file_ref, index))
    if ahead is not None:
        return Deferral(f"FIFO: {ahead} was claimed earlier")
    slot = free_slot(conn, subscription)
    if slot is None:
        return Deferral("every queue slot is taken")
    conn.execute(
        """UPDATE marketo_orchestrator.chunks SET state = 'creating', slot = %s, epoch = %s
           WHERE id = %s""",
        (slot, epoch, chunk),
    )
    return Grant(chunk, slot, epoch)


def queue_room(conn: Conn, subscription: str, limits: Limits, foreign: int, orphans: int) -> int:
    """How many more jobs Marketo's queue takes from all daemons together."""
    row = conn.execute(
        """SELECT count(*) FILTER (WHERE state IN ('creating', 'submitted')),
                  coalesce(sum(unknown_outcomes), 0)
           FROM marketo_orchestrator.chunks
           WHERE subscription = %s AND state IN ('pending', 'creating', 'submitted')""",
        (subscription,),
    ).fetchone()
    assert row is not None  # an aggregate always has its row
    outstanding, phantoms = int(row[0]), int(row[1]) + orphans
    room = min(limits.queued_jobs, constants.MAX_QUEUED_JOBS - foreign - phantoms)
    if outstanding == 0:
        room = max(room, 1)  # nothing will finish to free a slot: probe one
    return room - outstanding


def first_blocker(conn: Conn, chunk: int) -> str | None:
    """An unfinished chunk this one waits for by the key rule, described; None if none."""
    row = conn.execute(
        """SELECT b.instance, b.chunk_ref, b.batch_id
           FROM marketo_orchestrator.edges AS e
           JOIN marketo_orchestrator.chunks AS b ON b.id = e.blocker
           JOIN marketo_orchestrator.subscriptions AS s ON s.id = b.subscription
           WHERE e.held = %s
             AND (b.state IN ('pending', 'creating', 'submitted')
                  OR s.finished_jobs < b.blocks_until_finished)
           ORDER BY b.id LIMIT 1""",
        (chunk,),
    ).fetchone()
    if row is None:
        return None
    batch = f", batch {row[2]}" if row[2] is not None else ""
    return f"chunk {row[1]} of {row[0]}{batch}"


def list_busy(conn: Conn, subscription: str, list_id: int) -> bool:
    row = conn.execute(
        """SELECT 1 FROM marketo_orchestrator.chunks
           WHERE subscription = %s AND list_id = %s AND state IN ('creating', 'submitted')
           LIMIT 1""",
        (subscription, list_id),
    ).fetchone()
    return row is not None


def earlier_ready(conn: Conn, subscription: str, position: tuple[Any, ...]) -> str | None:
    """The first chunk of a live, sending daemon that was claimed before `position`
    (claim time, instance, file, chunk index) and could go now; None if none."""
    row = conn.execute(
        """SELECT c.instance, c.chunk_ref
           FROM marketo_orchestrator.chunks AS c
           JOIN marketo_orchestrator.daemons AS d
             ON d.subscription = c.subscription AND d.instance = c.instance
           WHERE c.subscription = %(s)s AND c.state = 'pending'
             AND d.alive AND d.lease_until > clock_timestamp() AND d.paused_reason = ''
             AND (c.claimed_at, c.instance, c.file_ref, c.idx)
                 < (%(t)s, %(i)s, %(f)s, %(x)s)
             AND NOT EXISTS (
                 SELECT 1 FROM marketo_orchestrator.edges AS e
                 JOIN marketo_orchestrator.chunks AS b ON b.id = e.blocker
                 JOIN marketo_orchestrator.subscriptions AS s ON s.id = b.subscription
                 WHERE e.held = c.id
                   AND (b.state IN ('pending', 'creating', 'submitted')
                        OR s.finished_jobs < b.blocks_until_finished))
             AND (c.list_id = 0 OR NOT EXISTS (
                 SELECT 1 FROM marketo_orchestrator.chunks AS l
                 WHERE l.subscription = c.subscription AND l.list_id = c.list_id
                   AND l.state IN ('creating', 'submitted')))
           ORDER BY c.claimed_at, c.instance, c.file_ref, c.idx
           LIMIT 1""",
        {"s": subscription, "t": position[0], "i": position[1], "f": position[2], "x": position[3]},
    ).fetchone()
    return None if row is None else f"chunk {row[1]} of {row[0]}"


def free_slot(conn: Conn, subscription: str) -> int | None:
    row = conn.execute(
        """SELECT s FROM generate_series(0, %s) AS s
           WHERE s NOT IN (SELECT slot FROM marketo_orchestrator.chunks
                           WHERE subscription = %s AND state IN ('creating', 'submitted'))
           ORDER BY s LIMIT 1""",
        (constants.MAX_QUEUED_JOBS - 1, subscription),
    ).fetchone()
    return None if row is None else int(row[0])
