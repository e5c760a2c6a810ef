"""Leases: which daemons of a subscription are alive, and what happens to a dead one's work.

Each daemon holds a lease row (`daemons`), renewed every few seconds; its `epoch`
goes up whenever it registers and whenever another daemon takes it as dead. Every
write that matters (admitting a chunk, recording its batch id) names the epoch it was
made under, and is refused if the epoch moved on: a daemon taken as dead cannot write
late. A daemon whose renewal is refused registers again before it sends anything.

A daemon silent for `lease_seconds` is dead (`reap`, run by every live daemon as it
renews). Then, in the same transaction:
- its chunks that were being created have an unknown outcome, exactly as after a
  kill -9 of a lone daemon: they go back to pending (its own, to send again when it
  returns) with one more possible copy at Marketo counted in the queue model;
- its chunks with a batch id stay outstanding: live daemons poll them (`orphans`),
  so their slots free when Marketo finishes them; nobody creates them again;
- its pending chunks wait for it (its data directory holds their files); the shared
  FIFO passes them meanwhile, but they still hold back later chunks that share keys.

All times are the database's (`clock_timestamp()`), never a daemon's own clock.
"""

from __future__ import annotations

from typing import Any

import psycopg

from orchestrator.coordination.shapes import Limits, Orphan
from orchestrator.errors import LeaseLost

Conn = psycopg.Connection[Any]


def register(
    conn: Conn, subscription: str, instance: str, limits: Limits, lease_seconds: float
) -> int:
    """Join (or rejoin) the subscription with a fresh lease; the new epoch.

    A daemon coming back after it was taken as dead gets a new epoch here: whatever it
    still believed it held was settled by the others (see `reap`)."""
    conn.execute(
        "INSERT INTO marketo_orchestrator.subscriptions (id) VALUES (%s) ON CONFLICT DO NOTHING",
        (subscription,),
    )
    row = conn.execute(
        """INSERT INTO marketo_orchestrator.daemons AS d (subscription, instance, epoch, alive,
               lease_until, started_at, queued_jobs, calls_per_window, window_seconds,
               calls_in_flight, daily_quota, daily_reserve)
           VALUES (%(s)s, %(i)s, 1, true, clock_timestamp() + make_interval(secs => %(lease)s),
               clock_timestamp(), %(q)s, %(c)s, %(w)s, %(f)s, %(dq)s, %(dr)s)
           ON CONFLICT (subscription, instance) DO UPDATE SET
               epoch = d.epoch + 1, alive = true, lease_until = EXCLUDED.lease_until,
               started_at = EXCLUDED.started_at, queued_jobs = EXCLUDED.queued_jobs,
               calls_per_window = EXCLUDED.calls_per_window,
               window_seconds = EXCLUDED.window_seconds,
               calls_in_flight = EXCLUDED.calls_in_flight, daily_quota = EXCLUDED.daily_quota,
               daily_reserve = EXCLUDED.daily_reserve
           RETURNING epoch""",
        {
            "s": subscription,
            "i": instance,
            "lease": lease_seconds,
            "q": limits.queued_jobs,
            "c": limits.calls_per_window,
            "w": limits.window_seconds,
            "f": limits.calls_in_flight,
            "dq": limits.daily_quota,
            "dr": limits.daily_reserve,
        },
    ).fetchone()
    assert row is not None  # an upsert with RETURNING always returns its row
    # What this daemon left creating in an earlier life had an unknown outcome.
    settle_creating(conn, subscription, instance)
    return int(row[0])


def renew(conn: Conn, subscription: str, instance: str, epoch: int, lease_seconds: float) -> bool:
    """Extend the lease; False when it was lost (taken as dead: register again)."""
    row = conn.execute(
        """UPDATE marketo_orchestrator.daemons
           SET lease_until = clock_timestamp() + make_interval(secs => %s)
           WHERE subscription = %s AND instance = %s AND epoch = %s AND alive
             AND lease_until > clock_timestamp()
           RETURNING 1""",
        (lease_seconds, subscription, instance, epoch),
    ).fetchone()
    return row is not None


def leave(conn: Conn, subscription: str, instance: str, epoch: int) -> None:
    """A clean stop: the lease ends now (chunks at Marketo stay outstanding, polled by
    the others until this daemon returns)."""
    conn.execute(
        """UPDATE marketo_orchestrator.daemons SET lease_until = clock_timestamp()
           WHERE subscription = %s AND instance = %s AND epoch = %s""",
        (subscription, instance, epoch),
    )


def reap(conn: Conn, subscription: str) -> list[str]:
    """Take every daemon whose lease ran out as dead; the instances taken."""
    dead = [
        str(row[0])
        for row in conn.execute(
            """UPDATE marketo_orchestrator.daemons
               SET alive = false, epoch = epoch + 1
               WHERE subscription = %s AND alive AND lease_until <= clock_timestamp()
               RETURNING instance""",
            (subscription,),
        ).fetchall()
    ]
    for instance in dead:
        settle_creating(conn, subscription, instance)
    return dead


def settle_creating(conn: Conn, subscription: str, instance: str) -> None:
    """Chunks a daemon was creating when it died (or stopped answering): pending again,
    with one more job at Marketo that nobody can see (it counts as taken meanwhile)."""
    conn.execute(
        """UPDATE marketo_orchestrator.chunks
           SET state = 'pending', slot = NULL, epoch = NULL,
               unknown_outcomes = unknown_outcomes + 1
           WHERE subscription = %s AND instance = %s AND state = 'creating'""",
        (subscription, instance),
    )


def orphans(conn: Conn, subscription: str, instance: str | None = None) -> list[Orphan]:
    """Batches at Marketo whose daemon is dead: someone must poll them. With `instance`,
    that live daemon's share only (the live daemons in name order take every n-th by
    id), so each orphan is polled by one daemon a round, not by every one of them."""
    rows = conn.execute(
        """WITH live AS (
               SELECT instance, row_number() OVER (ORDER BY instance) - 1 AS rank,
                      count(*) OVER () AS n
               FROM marketo_orchestrator.daemons
               WHERE subscription = %(s)s AND alive AND lease_until > clock_timestamp())
           SELECT c.id, c.instance, c.batch_id, c.object, c.api_name
           FROM marketo_orchestrator.chunks AS c
           JOIN marketo_orchestrator.daemons AS d
             ON d.subscription = c.subscription AND d.instance = c.instance
           WHERE c.subscription = %(s)s AND c.state = 'submitted' AND NOT d.alive
             AND (%(i)s::text IS NULL OR EXISTS (
                 SELECT 1 FROM live WHERE live.instance = %(i)s AND c.id %% live.n = live.rank))
           ORDER BY c.id""",
        {"s": subscription, "i": instance},
    ).fetchall()
    return [Orphan(int(r[0]), str(r[1]), int(r[2]), str(r[3]), str(r[4])) for r in rows]


def strictest(conn: Conn, subscription: str) -> Limits | None:
    """The strictest limits of the live daemons (None when none is alive): the smallest
    queue share, call budget and quota, the largest reserve."""
    row = conn.execute(
        """SELECT min(queued_jobs), min(calls_per_window), max(window_seconds),
                  min(calls_in_flight), min(daily_quota), max(daily_reserve)
           FROM marketo_orchestrator.daemons
           WHERE subscription = %s AND alive AND lease_until > clock_timestamp()""",
        (subscription,),
    ).fetchone()
    if row is None or row[0] is None:
        return None
    return Limits(int(row[0]), int(row[1]), float(row[2]), int(row[3]), int(row[4]), int(row[5]))


def daemons(conn: Conn, subscription: str) -> list[dict[str, Any]]:
    """Every daemon of the subscription, for status: instance, alive, lease left."""
    rows = conn.execute(
        """SELECT d.instance, d.alive AND d.lease_until > clock_timestamp(),
                  extract(epoch FROM d.lease_until - clock_timestamp()),
                  (SELECT count(*) FROM marketo_orchestrator.chunks AS c
                     WHERE c.subscription = d.subscription AND c.instance = d.instance
                       AND c.state IN ('creating', 'submitted'))
           FROM marketo_orchestrator.daemons AS d WHERE d.subscription = %s
           ORDER BY d.instance""",
        (subscription,),
    ).fetchall()
    return [
        {"instance": r[0], "alive": bool(r[1]), "lease_seconds": float(r[2]), "outstanding": r[3]}
        for r in rows
    ]


def require_lease(conn: Conn, subscription: str, instance: str, epoch: int) -> None:
    """This daemon still holds its lease under `epoch`, or `LeaseLost`: a daemon taken as
    dead sends nothing (no admission, no call) until it has registered again."""
    row = conn.execute(
        """SELECT 1 FROM marketo_orchestrator.daemons
           WHERE subscription = %s AND instance = %s AND epoch = %s AND alive
             AND lease_until > clock_timestamp()""",
        (subscription, instance, epoch),
    ).fetchone()
    if row is None:
        raise LeaseLost(f"{instance}: lease lost (epoch {epoch})")
