"""The call budget of a subscription, shared by every daemon on it.

Marketo counts calls per subscription: 100 per 20 s, 10 in flight, a daily quota.
Every daemon asks here before each call (`acquire`) and says when it ended
(`release`). Calls are rows of `calls`, stamped by the database's clock, counted under
a transaction-level advisory lock, so the window is a true sliding window over all
daemons together (a token bucket would let twice the budget into one window):

- at most the strictest `calls_per_window` counted calls in any `window_seconds`
  (widened by the same small margin as the local limiter: Marketo counts arrivals);
- at most the strictest `calls_in_flight` calls unanswered at once (a dead daemon's
  calls in flight stop counting when it is taken as dead);
- nothing counted while the subscription is held after a 606 or paused after a 607.

A call Marketo does not count (601, 602, 604, 605, 608, 611) is released as uncounted:
it leaves the window and the day. Identity calls are never counted, but are in flight.
Releasing is idempotent (the first end time stays), so a release that met an outage
is simply written again later.

Marketo's own usage count (`stats/usage.json`) is recorded here as one daemon reads it
(every daemon sees when it was read, so one reading per interval serves them all), and
the day's usage is that count plus every daemon's counted calls since (`usage`; the
admission before a create adds them the same way).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from typing import Any, Final

import psycopg

from orchestrator.coordination.leases import require_lease, strictest

Conn = psycopg.Connection[Any]

WINDOW_MARGIN_FRACTION: Final = 0.05  # as marketo.limits: arrival jitters against our send
WINDOW_MARGIN_MAX: Final = 1.0
IN_FLIGHT_RETRY_SECONDS: Final = 0.05  # asked again this soon when every call slot is busy
STALE_CALL_SECONDS: Final = 900.0  # an unanswered call this old no longer counts as in flight
KEEP_CALLS: Final = dt.timedelta(days=2)  # older rows are of no day that matters


@dataclass(frozen=True, slots=True)
class Wait:
    """No call now: try again in `seconds` (why: for logs). `paused_until`: the wait is
    the 607 pause, which lasts until then."""

    seconds: float
    reason: str
    paused_until: dt.datetime | None = None


@dataclass(frozen=True, slots=True)
class Usage:
    """The subscription's calls in one quota day, as the daemons together know them."""

    as_of: dt.datetime  # the database's clock
    total: int | None  # Marketo's count at the last reading that day (None: not read)
    read_at: dt.datetime | None
    calls_since: int  # counted calls of every daemon since that reading (or the day began)
    paused_until: dt.datetime | None  # a 607 pause still running


def acquire(
    conn: Conn, subscription: str, instance: str, epoch: int, operation: str, *, counted: bool
) -> int | Wait:
    """A call may go now (its row id), or when to ask again; `LeaseLost` when this
    daemon was taken as dead (it registers again before it sends anything)."""
    conn.execute("SELECT pg_advisory_xact_lock(hashtext(%s))", ("calls:" + subscription,))
    require_lease(conn, subscription, instance, epoch)
    row = conn.execute(
        """SELECT hold_until, paused_until, clock_timestamp()
           FROM marketo_orchestrator.subscriptions WHERE id = %s""",
        (subscription,),
    ).fetchone()
    assert row is not None  # registered with the daemon
    hold_until, paused_until, now = row
    limits = strictest(conn, subscription)
    if limits is None:
        return Wait(1.0, "no live daemon holds a lease")
    if counted:
        if paused_until is not None and paused_until > now:
            return Wait((paused_until - now).total_seconds(), "607 pause", paused_until)
        if hold_until is not None and hold_until > now:
            return Wait((hold_until - now).total_seconds(), "606 hold")
    window = limits.window_seconds + min(
        WINDOW_MARGIN_MAX, limits.window_seconds * WINDOW_MARGIN_FRACTION
    )
    counts = conn.execute(
        """SELECT count(*) FILTER (WHERE c.counted AND c.at > %(now)s - make_interval(secs => %(w)s)),
                  min(c.at) FILTER (WHERE c.counted AND c.at > %(now)s - make_interval(secs => %(w)s)),
                  count(*) FILTER (WHERE c.done_at IS NULL AND d.alive
                                   AND c.at > %(now)s - make_interval(secs => %(stale)s))
           FROM marketo_orchestrator.calls AS c
           JOIN marketo_orchestrator.daemons AS d
             ON d.subscription = c.subscription AND d.instance = c.instance
           WHERE c.subscription = %(s)s
             AND c.at > %(now)s - make_interval(secs => greatest(%(w)s, %(stale)s))""",
        {"now": now, "w": window, "stale": STALE_CALL_SECONDS, "s": subscription},
    ).fetchone()
    assert counts is not None  # an aggregate always has its row
    in_window, oldest, in_flight = int(counts[0]), counts[1], int(counts[2])
    if counted and in_window >= limits.calls_per_window and oldest is not None:
        slide = (oldest + dt.timedelta(seconds=window) - now).total_seconds()
        return Wait(max(slide, IN_FLIGHT_RETRY_SECONDS), "call window full")
    if in_flight >= limits.calls_in_flight:
        return Wait(IN_FLIGHT_RETRY_SECONDS, "calls in flight at the limit")
    made = conn.execute(
        """INSERT INTO marketo_orchestrator.calls (subscription, instance, operation, counted, at)
           VALUES (%s, %s, %s, %s, clock_timestamp()) RETURNING id""",
        (subscription, instance, operation, counted),
    ).fetchone()
    assert made is not None
    return int(made[0])


def release(conn: Conn, call: int, *, counted: bool) -> None:
    """The call ended; `counted` False when Marketo did not count it after all. Writing
    it twice changes nothing."""
    conn.execute(
        """UPDATE marketo_orchestrator.calls
           SET done_at = coalesce(done_at, clock_timestamp()), counted = counted AND %s
           WHERE id = %s""",
        (counted, call),
    )


def hold(conn: Conn, subscription: str, seconds: float) -> None:
    """606: no counted call from any daemon for `seconds` (a full window)."""
    conn.execute(
        """UPDATE marketo_orchestrator.subscriptions
           SET hold_until = greatest(coalesce(hold_until, clock_timestamp()),
                                     clock_timestamp() + make_interval(secs => %s))
           WHERE id = %s""",
        (seconds, subscription),
    )


def pause(conn: Conn, subscription: str, until: dt.datetime) -> None:
    """607: no counted call from any daemon until the quota resets."""
    conn.execute(
        """UPDATE marketo_orchestrator.subscriptions
           SET paused_until = greatest(coalesce(paused_until, %s), %s) WHERE id = %s""",
        (until, until, subscription),
    )


def record_usage(conn: Conn, subscription: str, total: int) -> None:
    """Marketo's own count of today's calls, as just read."""
    conn.execute(
        """UPDATE marketo_orchestrator.subscriptions
           SET usage_total = %s, usage_read_at = clock_timestamp() WHERE id = %s""",
        (total, subscription),
    )


def usage_read_at(conn: Conn, subscription: str) -> dt.datetime | None:
    """When Marketo's count was last read, by any daemon (they share the reading)."""
    row = conn.execute(
        "SELECT usage_read_at FROM marketo_orchestrator.subscriptions WHERE id = %s",
        (subscription,),
    ).fetchone()
    value: dt.datetime | None = row[0] if row else None
    return value


def usage(conn: Conn, subscription: str, since: dt.datetime) -> Usage:
    """The subscription's calls in the quota day that began at `since`: Marketo's count if
    it was read that day, and every daemon's counted calls after that reading (or after
    `since`)."""
    row = conn.execute(
        """SELECT usage_total, usage_read_at, paused_until, clock_timestamp()
           FROM marketo_orchestrator.subscriptions WHERE id = %s""",
        (subscription,),
    ).fetchone()
    assert row is not None  # registered with the daemon
    total, read_at, paused_until, now = row
    if read_at is None or read_at < since:
        total, read_at = None, None
    counted = conn.execute(
        """SELECT count(*) FROM marketo_orchestrator.calls
           WHERE subscription = %s AND counted AND at > %s""",
        (subscription, read_at or since),
    ).fetchone()
    return Usage(
        as_of=now,
        total=None if total is None else int(total),
        read_at=read_at,
        calls_since=int(counted[0]) if counted else 0,
        paused_until=paused_until if paused_until is not None and paused_until > now else None,
    )


def prune(conn: Conn, subscription: str) -> int:
    """Forget calls older than any window or day that matters; how many."""
    cur = conn.execute(
        """DELETE FROM marketo_orchestrator.calls
           WHERE subscription = %s AND at < clock_timestamp() - %s""",
        (subscription, KEEP_CALLS),
    )
    return cur.rowcount
