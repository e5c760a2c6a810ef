"""What a create's answer (and a job's end) does to the shared model.

After the HTTP create, outside any transaction: `created` records the batch id, only
while the daemon still holds the grant's epoch (a daemon taken as dead cannot write
late); `not_created` frees the slot (on 1016 the model learns that others hold the
rest of the queue and every daemon backs off together; an unknown outcome counts as a
job nobody can see until a job of that chunk finishes); `dropped` is a chunk its
daemon will never send; `finished` a job that ended at Marketo (whoever polled it,
and whether or not its batch id reached the database);
`job_left` another integration's job that left the queue.
"""

from __future__ import annotations

from collections.abc import Callable

from orchestrator import constants
from orchestrator.coordination.leases import Conn
from orchestrator.coordination.shapes import Grant


def created(conn: Conn, subscription: str, grant: Grant, batch_id: int) -> bool:
    """Record the batch id, only while the daemon still holds the grant's epoch."""
    row = conn.execute(
        """UPDATE marketo_orchestrator.chunks AS c SET state = 'submitted', batch_id = %s
           FROM marketo_orchestrator.daemons AS d
           WHERE c.id = %s AND c.state = 'creating' AND c.epoch = %s
             AND d.subscription = c.subscription AND d.instance = c.instance
             AND d.epoch = %s AND d.alive AND d.lease_until > clock_timestamp()
           RETURNING 1""",
        (batch_id, grant.chunk, grant.epoch, grant.epoch),
    ).fetchone()
    if row is None:
        return False
    conn.execute(
        """UPDATE marketo_orchestrator.subscriptions
           SET backoff_attempts = 0, backoff_until = NULL, backoff_reason = ''
           WHERE id = %s""",
        (subscription,),
    )
    return True


def not_created(
    conn: Conn,
    subscription: str,
    grant: Grant,
    *,
    reason: str,
    delay: Callable[[int], float] | None = None,
    queue_full: bool = False,
    unknown: bool = False,
) -> None:
    """The create did not leave a job we know of: the chunk is pending again.

    `queue_full` (1016): the rest of the queue is others'; `unknown`: it may have made a
    job nobody can see; `delay(attempts)`: the shared backoff to start (None: none)."""
    conn.execute(
        """UPDATE marketo_orchestrator.chunks
           SET state = 'pending', slot = NULL, epoch = NULL,
               unknown_outcomes = unknown_outcomes + %s
           WHERE id = %s AND state = 'creating' AND epoch = %s""",
        (1 if unknown else 0, grant.chunk, grant.epoch),
    )
    if queue_full:
        room = conn.execute(
            """SELECT count(*) FILTER (WHERE c.state IN ('creating', 'submitted')),
                      coalesce(sum(c.unknown_outcomes), 0) + max(s.orphans)
               FROM marketo_orchestrator.chunks AS c
               JOIN marketo_orchestrator.subscriptions AS s ON s.id = c.subscription
               WHERE c.subscription = %s AND c.state IN ('pending', 'creating', 'submitted')""",
            (subscription,),
        ).fetchone()
        outstanding, phantoms = (int(room[0]), int(room[1] or 0)) if room else (0, 0)
        others = constants.MAX_QUEUED_JOBS - outstanding - phantoms
        conn.execute(
            """UPDATE marketo_orchestrator.subscriptions
               SET foreign_slots = greatest(foreign_slots, %s) WHERE id = %s""",
            (others, subscription),
        )
    if delay is not None:
        row = conn.execute(
            """UPDATE marketo_orchestrator.subscriptions
               SET backoff_attempts = backoff_attempts + 1 WHERE id = %s
               RETURNING backoff_attempts""",
            (subscription,),
        ).fetchone()
        attempts = int(row[0]) if row else 1
        conn.execute(
            """UPDATE marketo_orchestrator.subscriptions
               SET backoff_until = clock_timestamp() + make_interval(secs => %s),
                   backoff_reason = %s
               WHERE id = %s""",
            (delay(attempts), reason, subscription),
        )


def dropped(conn: Conn, subscription: str, chunk: int) -> None:
    """A chunk its daemon will never send (its file failed, or past max_resubmits): it no
    longer holds FIFO or keys, but copies lost creates may have made still count until
    one more job finishes."""
    conn.execute(
        """UPDATE marketo_orchestrator.chunks AS c
           SET state = 'dropped', slot = NULL, finished_at = clock_timestamp(),
               blocks_until_finished = CASE WHEN c.unknown_outcomes > 0
                   THEN s.finished_jobs + 1 ELSE 0 END
           FROM marketo_orchestrator.subscriptions AS s
           WHERE c.id = %s AND s.id = c.subscription
             AND c.state IN ('pending', 'creating')""",
        (chunk,),
    )
    conn.execute(
        """UPDATE marketo_orchestrator.subscriptions AS s
           SET orphans = s.orphans + c.unknown_outcomes
           FROM marketo_orchestrator.chunks AS c
           WHERE c.id = %s AND s.id = c.subscription AND c.state = 'dropped'""",
        (chunk,),
    )


def finished(conn: Conn, subscription: str, chunk: int) -> bool:
    """A job ended at Marketo (Complete or Failed): its slot is free, the copies of its
    chunk queued ahead of it ended too, and by FIFO one lost copy of another. False if
    it was recorded already (another daemon polled it first).

    The chunk may still be pending here: its daemon was killed after Marketo made the
    job and it kept the batch id, but before `created` reached the database, so the
    others settled the create as an unknown outcome. Back again, the daemon polls that
    job to its end; the chunk is done then (left pending, it would stay ahead of every
    later chunk in the shared FIFO, and its phantom in the queue model, for good)."""
    row = conn.execute(
        """UPDATE marketo_orchestrator.chunks
           SET state = 'done', slot = NULL, unknown_outcomes = 0,
               finished_at = clock_timestamp()
           WHERE id = %s AND state IN ('pending', 'creating', 'submitted') RETURNING 1""",
        (chunk,),
    ).fetchone()
    if row is None:
        return False
    conn.execute("DELETE FROM marketo_orchestrator.keys WHERE chunk = %s", (chunk,))
    conn.execute(
        """UPDATE marketo_orchestrator.subscriptions
           SET foreign_slots = greatest(0, foreign_slots - 1),
               orphans = greatest(0, orphans - 1),
               finished_jobs = finished_jobs + 1
           WHERE id = %s""",
        (subscription,),
    )
    return True


def job_left(conn: Conn, subscription: str) -> None:
    """A job of ours Marketo kept queued started: one of others' jobs left the queue."""
    conn.execute(
        """UPDATE marketo_orchestrator.subscriptions
           SET foreign_slots = greatest(0, foreign_slots - 1) WHERE id = %s""",
        (subscription,),
    )
